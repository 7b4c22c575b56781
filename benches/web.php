<?php
// Benchmarks W1-W3 (issue 14): the short path, one web request that connects, does one thing
// with the broker and ends, through real php-fpm behind nginx (php-tests/Support/Fpm.php: our
// own configs, pid files and socket in a temp dir, 127.0.0.1 at a free high port; never
// /etc/php nor the system nginx). Load from ab (apache2-utils), keep-alive to nginx.
//
//   php benches/web.php [--rounds=3] [--requests=500] [--laravel-requests=200] [--workers=4]
//       [--concurrency=4] [--so=PATH] [--only=W1,W2,W3] [--broker=own|shared] [--json=PATH]
//
//   W1  publish one persistent (delivery_mode 2) 100 B message, wait for its confirm
//   W2  one RPC call to a server process (clients/serve_amqp_rs.php, the server of R1, started
//       afresh for each measurement): amqp_rs Connection::rpc() (direct reply-to), the others
//       the classic RPC (an exclusive auto-delete reply queue, a correlation id)
//   W3  a Laravel route (GET /dispatch, php-tests/Support/LaravelApp.php) that dispatches one
//       job: amqp-rs driver (its default, persistent, and with persistent off) against the
//       database driver (sqlite)
//
// Clients of W1 and W2: amqp_rs (a new Connection per request), amqp_rs persistent
// (['persistent' => true]), php-amqp connect(), php-amqp pconnect(), php-amqplib. A client whose
// feature this build lacks (amqp_rs persistent before it exists) is listed as unavailable.
//
// Each measurement starts its own pool (pm=static, --workers workers) with -n and only the
// extensions that client needs, plus opcache; sends 2 x workers untimed requests (each worker
// gets its connection), then --requests timed ones with ab at --concurrency; reads the
// workers' RSS, threads and CPU; stops the pool. The broker's count of connections and channels
// opened during the measurement (warm-up included) comes from its churn counters
// (rabbitmqctl eval). They count the whole broker: so that they count our requests only, the
// scenarios run against a RabbitMQ node of their own (php-tests/Support/Node.php, started once,
// 5-7 s; --broker=shared uses the shared broker on 5672, where other clients are counted too;
// so does a run that cannot start a node, e.g. not as root). Check: every request answered 200 "ok", and the queue holds exactly one
// message per request (W1, W3 amqp-rs), the server served one call per request (W2), the jobs
// table holds one row per request (W3 database). Clients run in alternating order each round.
// Writes results/web-latest.json; run.php puts its tables in latest.md.

declare(strict_types=1);

require_once __DIR__ . '/../php-tests/Support/Fpm.php';
require_once __DIR__ . '/../php-tests/Support/LaravelApp.php';
require_once __DIR__ . '/../php-tests/Support/Node.php';
require_once __DIR__ . '/report_web.php';

use AmqpRs\Tests\Support\Fpm;
use AmqpRs\Tests\Support\LaravelApp;
use AmqpRs\Tests\Support\Node;

$opts = getopt('', ['rounds:', 'requests:', 'laravel-requests:', 'workers:', 'concurrency:', 'so:', 'only:', 'broker:', 'json:']);
$rounds = max(1, (int) ($opts['rounds'] ?? 3));
// ab's p99 reads past its samples below 100 requests.
$requests = max(100, (int) ($opts['requests'] ?? 500));
$laravelRequests = max(100, (int) ($opts['laravel-requests'] ?? 200));
$workers = max(1, (int) ($opts['workers'] ?? 4));
$concurrency = max(1, (int) ($opts['concurrency'] ?? $workers));
$so = realpath($opts['so'] ?? __DIR__ . '/../target/release/libamqp_rs.so') ?: '';
$jsonPath = $opts['json'] ?? __DIR__ . '/results/web-latest.json';
$only = isset($opts['only']) ? explode(',', $opts['only']) : ['W1', 'W2', 'W3'];
$why = match (true) {
    $so === '' || !is_file($so) => 'no amqp_rs extension (build it, or pass --so=PATH)',
    Fpm::missing() !== null => Fpm::missing(),
    !is_executable('/usr/bin/ab') => '/usr/bin/ab not found (Debian package apache2-utils, scripts/setup.sh installs it)',
    default => null,
};
if ($why !== null) {
    fwrite(STDERR, "$why\n");
    exit(2);
}

$opcache = ['zend_extension=opcache.so', 'opcache.enable=1'];
$libs = [
    'amqp_rs' => ["extension=$so"],
    'php_amqp' => ['extension=amqp.so'],
    'php_amqplib' => ['extension=sockets.so', 'extension=mbstring.so'],
];
$amqpClients = [
    'amqp_rs' => ['lib' => 'amqp_rs', 'persistent' => false],
    'amqp_rs persistent' => ['lib' => 'amqp_rs', 'persistent' => true],
    'php-amqp connect()' => ['lib' => 'php_amqp', 'persistent' => false],
    'php-amqp pconnect()' => ['lib' => 'php_amqp', 'persistent' => true],
    'php-amqplib' => ['lib' => 'php_amqplib', 'persistent' => false],
];
$laravelExtensions = ['extension=ctype.so', 'extension=mbstring.so', 'extension=tokenizer.so', 'extension=pdo.so', 'extension=pdo_sqlite.so'];
$scenarios = [
    'W1' => ['what' => 'one request: connect, publish one persistent 100 B message, wait for its confirm', 'clients' => $amqpClients],
    'W2' => ['what' => 'one request: connect, one RPC call (100 B each way) to a server process', 'clients' => $amqpClients],
    'W3' => ['what' => 'one request to a Laravel route that dispatches one job (Laravel ' . LaravelApp::version() . ')', 'clients' => [
        'amqp-rs driver' => ['lib' => 'laravel', 'connection' => 'amqp-rs', 'php' => [...$laravelExtensions, "extension=$so"]],
        'amqp-rs driver, persistent off' => ['lib' => 'laravel', 'connection' => 'amqp-rs', 'persistent' => false,
            'php' => [...$laravelExtensions, "extension=$so"]],
        'database driver (sqlite)' => ['lib' => 'laravel', 'connection' => 'database', 'php' => $laravelExtensions],
    ]],
];

function progress(string $line): void
{
    fwrite(STDERR, date('H:i:s') . " $line\n");
}

/** The broker the scenarios run against: its port, URI, and its node when it is our own. */
final class Target
{
    public static int $port = 5672;
    public static string $uri = 'amqp://guest:guest@127.0.0.1:5672/%2f';
    public static ?Node $node = null;
}

/** Runs PHP code with amqp_rs loaded in a child process ($argv[1]: the URI); returns its output, JSON-decoded. */
function rs(string $so, string $code, string ...$args): mixed
{
    $cmd = implode(' ', array_map('escapeshellarg', [PHP_BINARY, '-n', '-d', "extension=$so", '-r', $code, Target::$uri, ...$args]));
    exec("$cmd 2>&1", $out, $status);
    if ($status !== 0) {
        throw new RuntimeException('amqp_rs helper failed: ' . implode(' ', $out));
    }
    return json_decode(implode("\n", $out), true, 512, JSON_THROW_ON_ERROR);
}

/** The broker's churn counters: ['connections' => opened so far, 'channels' => opened so far], or null. */
function churn(): ?array
{
    $expr = 'ets:lookup(connection_churn_metrics, node()).';
    try {
        $out = Target::$node ? Target::$node->ctl('-q', 'eval', $expr) : shell_exec("rabbitmqctl -q eval '$expr' 2>/dev/null");
    } catch (Throwable) {
        return null;
    }
    // {Node, connections created, closed, channels created, closed, queues declared, created, deleted}
    if (!is_string($out) || !preg_match('/\{[^,]+,(\d+),(\d+),(\d+),(\d+),(\d+),(\d+),(\d+)\}/', $out, $m)) {
        return null;
    }
    return ['connections' => (int) $m[1], 'channels' => (int) $m[3], 'queues_kept' => (int) $m[6] - (int) $m[7]];
}

/**
 * CPU time of the pids so far, every thread, in ms: /proc/PID/task/TID/schedstat counts it in
 * ns, where /proc/PID/stat counts 10 ms ticks (too coarse for a fraction of a ms per request).
 */
function cpuMs(array $pids): float
{
    $ns = 0;
    foreach ($pids as $pid) {
        foreach (glob("/proc/$pid/task/*/schedstat") ?: [] as $file) {
            $ns += (int) explode(' ', (string) @file_get_contents($file))[0];
        }
    }
    return $ns / 1e6;
}

/**
 * Runs ab; returns its requests/s, percentiles in ms (with $timed) and counts of failures. ab's
 * percentile table reads past its samples below 100 requests: the warm-up asks for none.
 */
function ab(string $url, int $n, int $c, string $dir, bool $timed = true): array
{
    $csv = "$dir/ab.csv";
    $cmd = implode(' ', array_map('escapeshellarg', ['/usr/bin/ab', '-q', '-k', '-s', '30', '-n', (string) $n, '-c', (string) $c,
        ...($timed ? ['-e', $csv] : []), $url]));
    exec("$cmd 2>&1", $out, $status);
    $text = implode("\n", $out);
    preg_match('/^Complete requests:\s+(\d+)/m', $text, $complete);
    preg_match('/^Failed requests:\s+(\d+)/m', $text, $failed);
    preg_match('/^Non-2xx responses:\s+(\d+)/m', $text, $non2xx);
    preg_match('/^Requests per second:\s+([\d.]+)/m', $text, $rate);
    $pct = [];
    foreach ($timed ? file($csv, FILE_IGNORE_NEW_LINES) ?: [] : [] as $line) {
        [$p, $ms] = explode(',', $line) + [1 => ''];
        if (is_numeric($p)) {
            $pct[(int) $p] = (float) $ms;
        }
    }
    if ($status !== 0 || !isset($complete[1], $rate[1]) || ($timed && !isset($pct[50], $pct[99], $pct[100]))) {
        throw new RuntimeException("ab failed ($status): $text");
    }
    return ['complete' => (int) $complete[1], 'failed' => (int) $failed[1] + (int) ($non2xx[1] ?? 0),
        'rate' => (float) $rate[1], 'p50_ms' => $pct[50] ?? null, 'p99_ms' => $pct[99] ?? null, 'max_ms' => $pct[100] ?? null];
}

/** Waits until $read() returns $expect (5 s at most); returns its last value. */
function settle(callable $read, int $expect): int
{
    $deadline = microtime(true) + 5;
    while (($got = $read()) !== $expect && microtime(true) < $deadline) {
        usleep(50_000);
    }
    return $got;
}

/** One measurement of $client in $scenario: a pool of its own, warm-up, ab, checks. */
function measure(string $scenario, string $client, array $spec, array $ctx): array
{
    ['so' => $so, 'workers' => $workers, 'concurrency' => $concurrency] = $ctx;
    $queue = sprintf('amqp_rs.bench.web.%s.%d.%s', strtolower($scenario), getmypid(), bin2hex(random_bytes(3)));
    $n = $scenario === 'W3' ? $ctx['laravel_requests'] : $ctx['requests'];
    $warm = 2 * $workers;
    $server = null;
    if ($scenario === 'W3') {
        $docroot = $ctx['app']->dir . '/public';
        $php = $spec['php'];
        $path = '/dispatch';
        $env = ['AMQP_URI' => Target::$uri, 'AMQP_QUEUE' => $queue, 'QUEUE_CONNECTION' => $spec['connection'],
            'AMQP_PERSISTENT' => ($spec['persistent'] ?? true) ? '1' : '0'];
        $ctx['app']->pdo()->exec('DELETE FROM jobs');
    } else {
        $docroot = __DIR__ . '/web';
        $php = $ctx['libs'][$spec['lib']];
        $path = '/' . strtolower($scenario) . '_' . $spec['lib'] . '.php';
        $env = ['AMQP_PORT' => (string) Target::$port, 'QUEUE' => $queue, 'PERSISTENT' => $spec['persistent'] ? '1' : '0'];
        if ($scenario === 'W1') {
            rs($so, '$c = new AmqpRs\Connection($argv[1]); $c->declareQueue($argv[2]); echo "{}";', $queue);
        } else {
            $serveCmd = [PHP_BINARY, '-n', '-d', "extension=$so", __DIR__ . '/clients/serve_amqp_rs.php', $queue, '60', Target::$uri];
            $server = proc_open($serveCmd, [1 => ['pipe', 'w'], 2 => ['pipe', 'w']], $serverPipes);
            if (fgets($serverPipes[1]) !== "ready\n") {
                throw new RuntimeException('W2 server did not start: ' . stream_get_contents($serverPipes[2]));
            }
        }
    }
    $fpm = new Fpm($docroot, $workers, [...$ctx['opcache'], ...$php], $env);
    try {
        $fpm->start();
        $pids = $fpm->workerPids();
        $before = churn();
        $warmed = ab($fpm->url($path), $warm, $concurrency, $fpm->dir, false);
        $cpu = cpuMs($pids);
        $r = ab($fpm->url($path), $n, $concurrency, $fpm->dir);
        $cpu = cpuMs($pids) - $cpu;
        $after = churn();
        $status = array_map([Fpm::class, 'processStatus'], $fpm->workerPids());
        if ($r['failed'] + $warmed['failed'] > 0) {
            [$code, $body] = $fpm->get($path);
            throw new RuntimeException("{$r['failed']} of $n requests failed; one more: $code " . substr($body, 0, 300) . $fpm->logs(5));
        }
    } finally {
        $fpm->stop();
        if ($server !== null) {
            proc_terminate($server);   // SIGTERM: consume() returns, the server reports
            $served = json_decode((string) stream_get_contents($serverPipes[1]), true)['served'] ?? null;
            proc_close($server);
        }
    }
    $total = $warm + $n;
    if ($scenario === 'W2') {
        $found = $served;
        $what = 'calls served';
    } elseif ($scenario === 'W3' && $spec['connection'] === 'database') {
        $found = settle(fn () => (int) $ctx['app']->pdo()->query('SELECT COUNT(*) FROM jobs')->fetchColumn(), $total);
        $what = 'rows in the jobs table';
    } else {
        $found = settle(fn () => rs($so, '$c = new AmqpRs\Connection($argv[1]); echo json_encode($c->queueStatus($argv[2])["messages"]);', $queue), $total);
        $what = 'messages in the queue';
        rs($so, '$c = new AmqpRs\Connection($argv[1]); $c->deleteQueue($argv[2]); echo "{}";', $queue);
    }
    if ($found !== $total) {
        throw new RuntimeException("$total requests answered ok, $found $what");
    }
    $rss = array_column($status, 'rss_kb');
    sort($rss);
    return ['rate' => $r['rate'], 'p50_ms' => $r['p50_ms'], 'p99_ms' => $r['p99_ms'], 'max_ms' => $r['max_ms'],
        'worker_rss_kb' => $rss[intdiv(count($rss), 2)], 'worker_rss_max_kb' => max($rss),
        'worker_threads' => max(array_column($status, 'threads')), 'cpu_ms_per_request' => $cpu / $n,
        'connections' => $before && $after ? $after['connections'] - $before['connections'] : null,
        'channels' => $before && $after ? $after['channels'] - $before['channels'] : null,
        // Queues created and not deleted while the pool ran (W2's classic clients: reply queues).
        'queues_kept' => $before && $after ? $after['queues_kept'] - $before['queues_kept'] : null,
        'requests' => $total, 'checked' => "$found $what"];
}

/** Why $client cannot run with this build, or null (amqp_rs persistent before it exists). */
function unavailable(string $so, array $spec): ?string
{
    if (($spec['lib'] ?? '') !== 'amqp_rs' || !$spec['persistent']) {
        return null;
    }
    try {
        return rs($so, 'try { new AmqpRs\Connection($argv[1], ["persistent" => true]); echo "null"; }
            catch (Throwable $e) { echo json_encode(get_class($e) . ": " . $e->getMessage()); }');
    } catch (Throwable $e) {
        return $e->getMessage();
    }
}

$ctx = ['so' => $so, 'workers' => $workers, 'concurrency' => $concurrency, 'requests' => $requests,
    'laravel_requests' => $laravelRequests, 'libs' => $libs, 'opcache' => $opcache, 'app' => null];
$report = ['when' => date('c'), 'config' => ['workers' => $workers, 'pm' => 'static', 'concurrency' => $concurrency,
    'requests' => $requests, 'laravel_requests' => $laravelRequests, 'warm_up' => 2 * $workers, 'rounds' => $rounds,
    'load' => 'ab -k (keep-alive to nginx)', 'php' => PHP_VERSION, 'nginx' => trim((string) shell_exec('/usr/sbin/nginx -v 2>&1')),
    'extension' => $so, 'commit' => trim((string) shell_exec('git -C ' . escapeshellarg(dirname(__DIR__)) . ' rev-parse --short=12 HEAD 2>/dev/null'))],
    'scenarios' => [], 'failures' => []];
// A run of some scenarios keeps the others from the last report (each says when it was measured).
if (isset($opts['only']) && is_file($jsonPath)) {
    $old = json_decode((string) file_get_contents($jsonPath), true) ?: [];
    $report['scenarios'] = array_diff_key($old['scenarios'] ?? [], array_flip($only));
    $report['failures'] = array_values(array_filter($old['failures'] ?? [], fn ($f) => !in_array($f['scenario'], $only, true)));
}
$started = microtime(true);
$report['load_average'] = ['before' => trim((string) @file_get_contents('/proc/loadavg'))];
$report['config']['broker'] = 'the shared broker (127.0.0.1:5672): its connection counts include other clients';
if (($opts['broker'] ?? 'own') === 'own') {
    try {
        progress('starting a RabbitMQ node of our own');
        Target::$node = Node::start('amqprs-web-' . getmypid(), Node::freePort());
        Target::$port = Target::$node->port;
        Target::$uri = Target::$node->uri();
        $report['config']['broker'] = 'a RabbitMQ node of the bench\'s own (' . Target::$node->name . ', port ' . Target::$port . ')';
    } catch (Throwable $e) {
        $report['config']['broker'] .= ' (no node of our own: ' . $e->getMessage() . ')';
        progress('no node of our own, the shared broker then: ' . $e->getMessage());
    }
}
try {
    foreach ($scenarios as $name => $sc) {
        if (!in_array($name, $only, true)) {
            continue;
        }
        if ($name === 'W3') {
            if (($why = LaravelApp::missing()) !== null) {
                $report['failures'][] = ['scenario' => 'W3', 'client' => '-', 'round' => 0, 'error' => $why];
                continue;
            }
            $ctx['app'] ??= new LaravelApp($so);
        }
        $entry = ['what' => $sc['what'], 'measured' => date('c'), 'commit' => $report['config']['commit'], 'requests' => $name === 'W3' ? $laravelRequests : $requests, 'unavailable' => [], 'rounds' => []];
        $clients = [];
        foreach ($sc['clients'] as $client => $spec) {
            if (($why = unavailable($so, $spec)) !== null) {
                $entry['unavailable'][$client] = $why;
                progress("$name   $client unavailable: $why");
            } else {
                $clients[] = $client;
            }
        }
        for ($round = 0; $round < $rounds; $round++) {
            foreach ($round % 2 ? array_reverse($clients) : $clients as $client) {
                try {
                    $row = measure($name, $client, $sc['clients'][$client], $ctx);
                } catch (Throwable $e) {
                    $report['failures'][] = ['scenario' => $name, 'client' => $client, 'round' => $round + 1, 'error' => $e->getMessage()];
                    progress("$name   round " . ($round + 1) . " $client FAILED: " . $e->getMessage());
                    continue;
                }
                $entry['rounds'][$client][] = $row;
                progress(sprintf('%s   round %d/%d %-26s %7.0f req/s p50 %6.2f ms p99 %6.2f ms, RSS/worker %5.1f MB, %d connections',
                    $name, $round + 1, $rounds, $client, $row['rate'], $row['p50_ms'], $row['p99_ms'], $row['worker_rss_kb'] / 1024, $row['connections'] ?? -1));
            }
        }
        $entry['summary'] = web_summary($entry['rounds']);
        $report['scenarios'][$name] = $entry;
    }
} finally {
    $ctx['app']?->remove();
    Target::$node?->stop();
}
ksort($report['scenarios']);
$report['load_average']['after'] = trim((string) @file_get_contents('/proc/loadavg'));
$report['duration_s'] = round(microtime(true) - $started, 1);
@mkdir(dirname($jsonPath), 0777, true);
file_put_contents($jsonPath, json_encode($report, JSON_PRETTY_PRINT | JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE) . "\n");
echo implode("\n", web_markdown($report)), "\nwrote $jsonPath\n";
exit($report['failures'] ? 1 : 0);
