<?php
// Benchmark E1 (issue 19; not part of `make test`): what fibers buy an RPC caller. One process
// with N concurrent RPC calls over Revolt fibers (amqp-rs/revolt's Client::rpc(), the package in
// revolt/), against the same calls made one after another with Connection::rpc(), and against
// php-amqplib's classic blocking RPC. Needs Revolt (Debian's php-revolt-event-loop): run.php
// runs it in the sid root through `scripts/matrix.sh --run`, against the root's RabbitMQ 4.3.
//
//   php -d extension=amqp_rs.so benches/event_loop.php [--rounds=3] [--so=PATH] [--json=PATH]
//       [--calls=5000] [--delayed-calls=250] [--concurrency=50] [--uri=amqp://...] [--commit=ID]
//
// The server (clients/e1_server.php) is one amqp_rs process that answers requests
// concurrently (readiness() + Consumer::next(0.0) on a stream_select() loop, a list of replies
// not yet due), started afresh for every measurement, in two modes: 'echo' answers at once;
// '20 ms' answers each request 20 ms after it came (a slow backend: there, concurrency is the
// whole gain). The clients (clients/e1_client.php) run each in a fresh process: --calls calls
// against the echo server, --delayed-calls against the 20 ms one (fewer: the one-after-another
// clients need 20 ms a call), after untimed warm-up calls made the same way.
//
// Per server mode and client: calls/s (timed calls over the span from the first call's start to
// the last reply), per-call latency p50/p99 (each call's own start to its reply, for fibers
// too), client CPU per call (user + system of the client process over that span, every thread)
// and server CPU per call. Every call must get its own reply (unique bodies, echoed by the
// server) and the server must have served exactly the calls made; a measurement that fails
// either check is left out and listed. The clients take turns, in the opposite order every
// other round. Prints medians of --rounds rounds; writes them and every round to --json
// (default benches/results/event-loop-latest.json).

declare(strict_types=1);

require_once __DIR__ . '/process.php';

$opts = getopt('', ['rounds:', 'so:', 'json:', 'calls:', 'delayed-calls:', 'concurrency:', 'uri:', 'commit:']);
$rounds = max(1, (int) ($opts['rounds'] ?? 3));
$so = realpath($opts['so'] ?? __DIR__ . '/../target/release/libamqp_rs.so') ?: '';
$jsonPath = $opts['json'] ?? __DIR__ . '/results/event-loop-latest.json';
$concurrency = max(1, (int) ($opts['concurrency'] ?? 50));
$uri = $opts['uri'] ?? (getenv('AMQP_URI') ?: 'amqp://guest:guest@127.0.0.1:5672/%2f');
if ($so === '' || !is_file($so)) {
    fwrite(STDERR, "no amqp_rs extension (build it, or pass --so=PATH)\n");
    exit(2);
}
// [delay ms, timed calls, warm-up calls]
$servers = [
    'echo' => [0, max(1, (int) ($opts['calls'] ?? 5000)), 100],
    '20 ms' => [20, max(1, (int) ($opts['delayed-calls'] ?? 250)), $concurrency],
];
$amqpRs = [PHP_BINARY, '-d', "extension=$so"];
$clients = [
    "amqp_rs fibers ($concurrency)" => [...$amqpRs, __DIR__ . '/clients/e1_client.php', 'fibers'],
    'amqp_rs sequential' => [...$amqpRs, __DIR__ . '/clients/e1_client.php', 'sequential'],
    'php-amqplib' => [PHP_BINARY, __DIR__ . '/clients/e1_client.php', 'amqplib'],
];

/** Starts $cmd with stdin, stdout and stderr piped: [process, pipes, pid]. */
function start(array $cmd): array
{
    $proc = proc_open($cmd, [0 => ['pipe', 'r'], 1 => ['pipe', 'w'], 2 => ['pipe', 'w']], $pipes);
    if ($proc === false) {
        throw new RuntimeException('cannot start ' . implode(' ', $cmd));
    }
    return [$proc, $pipes, proc_get_status($proc)['pid']];
}

/** Reads a started process to its end: its JSON line, CPU s and peak RSS KiB added. */
function result(array $started, string $what, float $timeout): array
{
    [$proc, $pipes, $pid] = $started;
    [$code, $out, $err, $cpu, $rss] = collect($proc, $pipes, $pid, $what, $timeout);
    $json = json_decode(trim($out), true);
    if ($code !== 0 || !is_array($json) || trim($err) !== '') {
        throw new RuntimeException("$what exited $code: " . trim("$out $err"));
    }
    return $json + ['_cpu_s' => $cpu, '_peak_rss_kb' => $rss];
}

/** One measurement: a fresh server in $delay mode, then the client; the round's row. */
function measure(array $amqpRs, array $client, string $uri, int $delay, int $calls, int $warm, int $concurrency): array
{
    $queue = 'amqp_rs.bench.e1.' . getmypid() . '.' . bin2hex(random_bytes(3));
    $server = start([...$amqpRs, __DIR__ . '/clients/e1_server.php', $uri, $queue, (string) $delay]);
    try {
        if (($line = fgets($server[1][1])) !== "ready\n") {
            throw new RuntimeException('E1 server did not start: ' . $line . stream_get_contents($server[1][2]));
        }
        $r = result(start([...$client, $uri, $queue, (string) $calls, (string) $warm, (string) $concurrency]), 'E1 client', 120);
    } finally {
        fclose($server[1][0]);      // its stdin: the server stops and reports
        unset($server[1][0]);
        $served = result($server, 'E1 server', 30);
    }
    if ($r['calls'] !== $calls || $r['wrong'] !== 0) {
        throw new RuntimeException("$calls calls timed, {$r['calls']} made, {$r['wrong']} replies not the echo of their request");
    }
    if ($served['served'] !== $calls + $warm || $served['pending'] !== 0) {
        throw new RuntimeException(sprintf('%d calls made, the server served %d (%d still due)', $calls + $warm, $served['served'], $served['pending']));
    }
    return [
        'calls_per_s' => round($calls / $r['elapsed'], 1),
        'p50_ms' => round($r['p50_us'] / 1000, 3),
        'p99_ms' => round($r['p99_us'] / 1000, 3),
        'mean_ms' => round($r['mean_us'] / 1000, 3),
        'client_cpu_us_per_call' => round($r['cpu_us'] / $calls, 1),
        'server_cpu_us_per_call' => round($served['cpu_us'] / $served['served'], 1),
        'client_peak_rss_mb' => round(($r['_peak_rss_kb'] ?? 0) / 1024, 1),
    ];
}

$results = [];
$failures = [];
$loadBefore = trim((string) @file_get_contents('/proc/loadavg'));
$started = microtime(true);
for ($round = 1; $round <= $rounds; $round++) {
    foreach ($servers as $mode => [$delay, $calls, $warm]) {
        // Alternating order, so that no client always runs on a warmer or busier broker.
        foreach ($round % 2 ? $clients : array_reverse($clients, true) as $name => $cmd) {
            $key = "$mode: $name";
            try {
                $row = measure($amqpRs, $cmd, $uri, $delay, $calls, $warm, $concurrency);
            } catch (Throwable $e) {
                $failures[] = ['scenario' => 'E1', 'client' => $key, 'round' => $round, 'error' => $e->getMessage()];
                fprintf(STDERR, "E1 round %d %-34s FAILED: %s\n", $round, $key, $e->getMessage());
                continue;
            }
            $results[$key][] = $row;
            fprintf(STDERR, "E1 round %d/%d %-34s %8.0f calls/s  p50 %8.3f ms  p99 %8.3f ms  client CPU %6.1f µs/call\n",
                $round, $rounds, $key, $row['calls_per_s'], $row['p50_ms'], $row['p99_ms'], $row['client_cpu_us_per_call']);
        }
    }
}

$summary = [];
foreach ($results as $key => $runs) {
    foreach (array_keys($runs[0]) as $k) {
        $summary[$key][$k] = round(median(array_column($runs, $k)), 3);
    }
}
// The gain over the same calls one after another, per server mode.
foreach ($summary as $key => $s) {
    $base = $summary[explode(': ', $key)[0] . ': amqp_rs sequential']['calls_per_s'] ?? null;
    $summary[$key]['vs_sequential'] = $base ? round($s['calls_per_s'] / $base, 2) : null;
}

printf("\nE1: RPC calls from one process, %d fibers against one after another (medians of %d rounds)\n", $concurrency, $rounds);
printf("%-36s %10s %10s %10s %16s %16s %9s\n", 'server: client', 'calls/s', 'p50 ms', 'p99 ms', 'client CPU µs', 'server CPU µs', 'vs seq');
foreach ($summary as $key => $s) {
    printf("%-36s %10.0f %10.3f %10.3f %16.1f %16.1f %9s\n", $key, $s['calls_per_s'], $s['p50_ms'], $s['p99_ms'],
        $s['client_cpu_us_per_call'], $s['server_cpu_us_per_call'], $s['vs_sequential'] === null ? '-' : $s['vs_sequential'] . '×');
}
foreach ($failures as $f) {
    printf("FAILED round %d %s: %s\n", $f['round'], $f['client'], $f['error']);
}

@mkdir(dirname($jsonPath), 0777, true);
file_put_contents($jsonPath, json_encode([
    'when' => date('c'),
    // The root has no git: run.php passes the clone's commit.
    'commit' => $opts['commit'] ?? (trim((string) shell_exec('git -C ' . escapeshellarg(__DIR__) . ' rev-parse --short=12 HEAD 2>/dev/null')) ?: 'unknown'),
    'host' => php_uname('n') . ', ' . trim((string) shell_exec('nproc')) . ' cores',
    'php' => PHP_VERSION,
    'revolt' => trim((string) shell_exec("dpkg-query -W -f '\${Version}' php-revolt-event-loop 2>/dev/null")) ?: 'unknown',
    'php-amqplib' => trim((string) shell_exec("dpkg-query -W -f '\${Version}' php-amqplib 2>/dev/null")) ?: 'unknown',
    'rabbitmq' => trim((string) shell_exec("dpkg-query -W -f '\${Version}' rabbitmq-server 2>/dev/null")) ?: 'unknown',
    'load_average' => ['before' => $loadBefore, 'after' => trim((string) @file_get_contents('/proc/loadavg'))],
    'duration_s' => round(microtime(true) - $started, 1),
    'config' => [
        'rounds' => $rounds,
        'calls' => implode(', ', array_map(fn ($m, $s) => "$m server: {$s[1]} timed after {$s[2]} warm-up", array_keys($servers), $servers)),
        'fibers' => "$concurrency Revolt fibers on one connection, each calling AmqpRs\\Revolt\\Client::rpc() back to back",
        'sequential' => 'Connection::rpc() one call after the other (direct reply-to)',
        'php-amqplib' => 'its classic blocking RPC: exclusive reply queue, correlation id per call, wait() until the reply',
        'server' => 'one amqp_rs process per measurement, answering concurrently (readiness() + next(0.0), replies due after the delay, published without confirms); echo: at once; 20 ms: 20 ms after each request came',
        'latency' => "each call's own start to its reply in hand (fibers: to the fiber's resumption)",
        'checks' => 'unique request bodies echoed back, each reply compared with its request; the server served exactly the calls made',
    ],
    'medians' => $summary,
    'rounds' => $results,
    'failures' => $failures,
], JSON_PRETTY_PRINT | JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE) . "\n");
echo 'wrote ', realpath($jsonPath), "\n";
exit($failures ? 1 : 0);
