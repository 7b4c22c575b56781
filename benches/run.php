<?php
// make bench: amqp_rs, php-amqp and php-amqplib side by side, in one run, against the same
// broker. Prints msgs/s and client CPU µs/msg per scenario, and ratios against php-amqp.
//
//   php benches/run.php [--count=N] [--rounds=R] [--only=P1,C1,R1,M1] [--m1-count=N] [--so=PATH]
//
// P1-P3 publish. C1-C2 consume a queue that amqp_rs filled beforehand, outside the timing.
// 'raw' is the broker's ceiling: AMQP written by hand on a plain socket, no client overhead
// (clients/raw_amqp.php); a ratio it cannot reach is ruled out by the broker, not the client.
// R1 is request/reply: --count (default 10 000) sequential round trips of 100 B, latency
// percentiles per client. Every client calls the same server, an amqp_rs process that consumes
// the request queue and answers with Message::reply() (clients/serve_amqp_rs.php), started
// afresh for each measurement: only the client differs. amqp_rs calls rpc() (direct reply-to);
// php-amqp and php-amqplib do the classic RPC of the RabbitMQ tutorial (an exclusive reply
// queue, a correlation id per call). 'raw' has no RPC client.
// M1 is opt-in (only with --only=M1): it reports how the RSS of an amqp_rs worker, and of a
// php-amqp one, grows over --m1-count messages (default 1 000 000, several minutes).
//
// Each measurement runs in a fresh PHP process that loads only the client it measures.

declare(strict_types=1);

$opts = getopt('', ['count:', 'rounds:', 'only:', 'so:', 'm1-count:']);
$so = $opts['so'] ?? __DIR__ . '/../target/release/libamqp_rs.so';
$rounds = (int) ($opts['rounds'] ?? 3);
$only = isset($opts['only']) ? explode(',', $opts['only']) : null;
$scenarios = [
    'P1' => ['what' => '100 B persistent, no confirms', 'count' => 100_000],
    'P2' => ['what' => '100 B persistent, confirms, one wait at the end', 'count' => 100_000],
    'P3' => ['what' => '100 B persistent, confirm each before the next', 'count' => 5_000],
    'C1' => ['what' => '100 B persistent, pre-filled, ack each, prefetch 500', 'count' => 100_000],
    'C2' => ['what' => '100 B persistent, pre-filled, auto-ack, prefetch 500', 'count' => 100_000],
];
$m1Count = (int) ($opts['m1-count'] ?? 1_000_000);
$php = [
    'amqp_rs' => [PHP_BINARY, '-n', '-d', "extension=$so"],
    'php-amqp' => [PHP_BINARY, '-n', '-d', 'extension=amqp.so'],
    'php-amqplib' => [PHP_BINARY, '-n', '-d', 'extension=sockets.so', '-d', 'extension=mbstring.so'],
    'raw' => [PHP_BINARY, '-n'],
];
$script = fn (string $side, string $client) => __DIR__ . "/clients/{$side}_" . str_replace('-', '_', $client) . '.php';
$queue = 'amqp_rs.bench.publish';
$consumeQueue = 'amqp_rs.bench.consume';
$rpcQueue = 'amqp_rs.bench.rpc';

function ctl(string ...$args): void
{
    exec('rabbitmqctl ' . implode(' ', array_map('escapeshellarg', $args)) . ' -q 2>&1', $out, $code);
}

function run(array $cmd, float $timeout = 600): array
{
    $proc = proc_open($cmd, [1 => ['pipe', 'w'], 2 => ['pipe', 'w']], $pipes);
    return finish($proc, $pipes, $cmd, $timeout);
}

// A consumer that never gets its last message would block the whole run: give up on it after
// $timeout, and say so, rather than hang.
function finish($proc, array $pipes, array $cmd, float $timeout): array
{
    $deadline = microtime(true) + $timeout;
    $buf = [1 => '', 2 => ''];
    $open = [1 => $pipes[1], 2 => $pipes[2]];
    while ($open) {
        $left = $deadline - microtime(true);
        if ($left <= 0) {
            proc_terminate($proc);
            usleep(500_000);
            proc_terminate($proc, 9);
            proc_close($proc);
            throw new RuntimeException(implode(' ', $cmd) . " timed out after {$timeout} s: $buf[1] $buf[2]");
        }
        $ready = array_values($open);
        $none = null;
        if (!stream_select($ready, $none, $none, (int) $left, 0)) {
            continue;
        }
        foreach ($open as $i => $pipe) {
            if (in_array($pipe, $ready, true)) {
                $chunk = (string) fread($pipe, 65536);
                $buf[$i] .= $chunk;
                if ($chunk === '' && feof($pipe)) {
                    unset($open[$i]);
                }
            }
        }
    }
    $code = proc_close($proc);
    $result = json_decode(trim($buf[1]), true);
    if ($code !== 0 || !is_array($result)) {
        throw new RuntimeException(implode(' ', $cmd) . " failed ($code): $buf[1] $buf[2]");
    }
    return $result;
}

// The publishers need a durable queue; amqp_rs itself declares and purges it.
$setup = fn (string $q) => [...$php['amqp_rs'], '-r',
    '$c = new AmqpRs\Connection(); $c->declareQueue($argv[1]); echo json_encode(["purged" => $c->purgeQueue($argv[1])]);',
    $q];
// Waits for the consumer's channel to be gone from the queue first: only then would the broker
// have put back any message whose ack never reached it.
$status = [...$php['amqp_rs'], '-r',
    '$c = new AmqpRs\Connection();
    for ($i = 0; ($s = $c->queueStatus($argv[1]))["consumers"] > 0 && $i < 100; $i++) usleep(50_000);
    echo json_encode($s);',
    $consumeQueue];
$fill = fn (int $count, int $maxDepth = 0) => [...$php['amqp_rs'], $script('feed', 'amqp_rs'), (string) $count, '100',
    $consumeQueue, (string) $maxDepth];

// Anything short of every message handled once and acked is a client bug, not a slow result.
function check(string $what, int $count, array $r, array $after): void
{
    if ($r['handled'] !== $count || $r['seen'] !== $count || $after['messages'] !== 0) {
        throw new RuntimeException("$what: $count messages queued, consume() returned {$r['handled']}, "
            . "callback ran {$r['seen']} times, {$after['messages']} left in the queue afterwards");
    }
}

$results = [];
foreach ($scenarios as $name => $s) {
    if ($only !== null && !in_array($name, $only, true)) {
        continue;
    }
    $count = (int) ($opts['count'] ?? $s['count']);
    if ($name === 'P3') {
        $count = min($count, 5_000);
    }
    $side = $name[0] === 'P' ? 'publish' : 'consume';
    for ($round = 0; $round < $rounds; $round++) {
        // Alternate the order so no client always runs on a warmer or fuller broker.
        $order = array_keys($php);
        if ($round % 2 === 1) {
            $order = array_reverse($order);
        }
        foreach ($order as $client) {
            $cmd = [...$php[$client], $script($side, $client), $name, (string) $count];
            if ($side === 'publish') {
                run($setup($queue));
                $r = run([...$cmd, '100', $queue]);
            } else {
                run($setup($consumeQueue));
                $filled = run($fill($count));
                if ($filled['depth'] !== $count) {
                    throw new RuntimeException("$name: filled $count messages, queue holds {$filled['depth']}");
                }
                $r = run([...$cmd, $consumeQueue]);
                check("$name $client", $count, $r, run($status));
            }
            $results[$name][$client][] = ['rate' => $count / $r['elapsed'], 'cpu' => $r['cpu_us'] / $count];
        }
    }
    run($setup($side === 'publish' ? $queue : $consumeQueue));
}

$latency = [];
if ($only === null || in_array('R1', $only, true)) {
    $r1Count = (int) ($opts['count'] ?? 10_000);
    $serveCmd = [...$php['amqp_rs'], $script('serve', 'amqp_rs'), $rpcQueue];
    for ($round = 0; $round < $rounds; $round++) {
        $order = ['amqp_rs', 'php-amqp', 'php-amqplib'];
        if ($round % 2 === 1) {
            $order = array_reverse($order);
        }
        foreach ($order as $client) {
            $server = proc_open($serveCmd, [1 => ['pipe', 'w'], 2 => ['pipe', 'w']], $serverPipes);
            if (fgets($serverPipes[1]) !== "ready\n") {
                throw new RuntimeException('R1 server did not start: ' . stream_get_contents($serverPipes[2]));
            }
            try {
                $r = run([...$php[$client], $script('rpc', $client), 'R1', (string) $r1Count, $rpcQueue]);
            } finally {
                proc_terminate($server);                // SIGTERM: consume() returns, it reports
            }
            $served = finish($server, $serverPipes, $serveCmd, 30);
            if ($served['served'] !== $r['calls']) {
                throw new RuntimeException("R1 $client: {$r['calls']} calls, the server served {$served['served']}");
            }
            $latency[$client][] = $r;
        }
    }
}

// One worker per client, fed while it runs by a separate amqp_rs process. php-amqplib is left
// out: it has no native memory of its own to leak, and a million messages take it long.
$memory = [];
if ($only !== null && in_array('M1', $only, true)) {
    foreach (['amqp_rs', 'php-amqp'] as $client) {
        run($setup($consumeQueue));
        $feedCmd = $fill($m1Count, 50_000);
        $feeder = proc_open($feedCmd, [1 => ['pipe', 'w'], 2 => ['pipe', 'w']], $feedPipes);
        $timeout = max(600, $m1Count / 1_000);
        try {
            $r = run([...$php[$client], $script('consume', $client), 'M1', (string) $m1Count, $consumeQueue], $timeout);
        } catch (Throwable $e) {
            proc_terminate($feeder);
            throw $e;
        }
        finish($feeder, $feedPipes, $feedCmd, 60);
        check("M1 $client", $m1Count, $r, run($status));
        $memory[$client] = $r;
    }
    run($setup($consumeQueue));
}
run([...$php['amqp_rs'], '-r', '$c = new AmqpRs\Connection(); foreach (array_slice($argv, 1) as $q) $c->deleteQueue($q); echo "{}";',
    $queue, $consumeQueue, $rpcQueue]);

function median(array $xs): float
{
    sort($xs);
    $n = count($xs);
    return $n % 2 ? $xs[intdiv($n, 2)] : ($xs[$n / 2 - 1] + $xs[$n / 2]) / 2;
}

if ($results) {
    printf("%-4s %-12s %12s %10s %14s %10s\n", 'scen', 'client', 'msgs/s', 'vs amqp', 'cpu µs/msg', 'vs amqp');
}
foreach ($results as $name => $byClient) {
    $base = $byClient['php-amqp'] ?? null;
    $baseRate = $base ? median(array_column($base, 'rate')) : null;
    $baseCpu = $base ? median(array_column($base, 'cpu')) : null;
    foreach ($byClient as $client => $rows) {
        $rate = median(array_column($rows, 'rate'));
        $cpu = median(array_column($rows, 'cpu'));
        printf("%-4s %-12s %12.0f %9.2fx %14.2f %9.2fx\n", $name, $client, $rate,
            $baseRate ? $rate / $baseRate : 0, $cpu, $baseCpu ? $cpu / $baseCpu : 0);
    }
}
if ($results) {
    printf("(medians of %d rounds; %s)\n", $rounds, php_uname('n') . ', ' . trim((string) shell_exec('nproc')) . ' cores');
}
if ($latency) {
    // Per client, the median over the rounds of each figure; p50 against php-amqplib's.
    printf("%sR1: %d sequential RPC round trips, 100 B each way, one amqp_rs server (consume + reply)\n",
        $results ? "\n" : '', $r1Count);
    printf("%-4s %-12s %10s %10s %10s %10s %12s %12s\n", 'scen', 'client', 'calls/s', 'mean µs', 'p50 µs', 'p99 µs',
        'p50 vs lib', 'cpu µs/call');
    $med = fn (string $client, string $key) => median(array_column($latency[$client], $key));
    foreach ($latency as $client => $rows) {
        printf("%-4s %-12s %10.0f %10.0f %10.0f %10.0f %11.2fx %12.1f\n", 'R1', $client,
            median(array_map(fn ($r) => $r['timed'] / $r['elapsed'], $rows)), $med($client, 'mean_us'),
            $med($client, 'p50_us'), $med($client, 'p99_us'),
            isset($latency['php-amqplib']) ? $med($client, 'p50_us') / $med('php-amqplib', 'p50_us') : 0,
            median(array_map(fn ($r) => $r['cpu_us'] / $r['timed'], $rows)));
    }
    printf("(medians of %d rounds; %s)\n", $rounds, php_uname('n') . ', ' . trim((string) shell_exec('nproc')) . ' cores');
}
if ($memory) {
    // Warm = after the first tenth, once buffers and the allocator have settled; the tenths in
    // between show whether any growth is steady (a leak) or a step.
    printf("%sM1: worker RSS over %d messages, ack each, prefetch 500\n", $results ? "\n" : '', $m1Count);
    printf("%-4s %-12s %12s %10s %10s %10s  %s\n", 'scen', 'client', 'msgs/s', 'warm MB', 'end MB', 'growth MB', 'RSS by tenth, MB');
    foreach ($memory as $client => $r) {
        $mb = array_map(fn ($kb) => $kb / 1024, $r['rss_kb']);
        printf("%-4s %-12s %12.0f %10.1f %10.1f %10.2f  %s\n", 'M1', $client, $m1Count / $r['elapsed'], $mb[0],
            end($mb), end($mb) - $mb[0], implode(' ', array_map(fn ($x) => sprintf('%.1f', $x), $mb)));
    }
}
