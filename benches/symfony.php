<?php
// Benchmark S1 (not part of `make test`): Symfony Messenger messages through
// `bin/console messenger:consume`, with the amqp-rs transport (symfony/) against Symfony's own
// AMQP transport (php-amqp, basic.get per message) and its Doctrine transport on sqlite, in the
// same minimal Symfony application (Debian's packages, built by
// php-tests/Support/SymfonyApp.php) and the same message (App\Message\Noop: its handler writes
// the message's number to a file).
//
//   php benches/symfony.php [--messages=2000] [--rounds=3] [--so=PATH] [--json=PATH]
//
// Each round, per transport: a booted script dispatches --messages messages through the bus
// (timed from the first dispatch to the last; amqp-rs waits for each publisher confirm,
// Symfony's AMQP transport does not unless confirm_timeout is set, Doctrine commits each
// INSERT), then ONE `messenger:consume async --limit=N --sleep=0` process handles them all:
// timed from its start to its exit (PHP and Symfony booting included, as a real worker pays
// them once), with its CPU time and its peak RSS (ru_maxrss from wait4); and the rate from the
// first handler call to the last (the handler writes when it ran), which leaves out booting
// and exit: with 2000 trivial messages boot is half the time or more. Every number must be
// in the handler's file exactly once and the queue left empty. The transports take turns, in the
// opposite order every other round. Every process loads both
// extensions (amqp_rs and php-amqp), so their RSS is comparable. Prints medians of --rounds
// rounds; writes them and every round to benches/results/symfony-latest.json.

declare(strict_types=1);

require_once __DIR__ . '/../php-tests/Support/SymfonyApp.php';
require_once __DIR__ . '/process.php';

use AmqpRs\Tests\Support\SymfonyApp;

$opts = getopt('', ['messages:', 'rounds:', 'so:', 'json:']);
$messages = (int) ($opts['messages'] ?? 2000);
$rounds = (int) ($opts['rounds'] ?? 3);
$so = realpath($opts['so'] ?? __DIR__ . '/../target/release/libamqp_rs.so') ?: '';
$jsonPath = $opts['json'] ?? __DIR__ . '/results/symfony-latest.json';
if ($so === '' || !is_file($so)) {
    fwrite(STDERR, "no amqp_rs extension (build it, or pass --so=PATH)\n");
    exit(2);
}
if (($missing = SymfonyApp::missing()) !== null) {
    fwrite(STDERR, "$missing\n");
    exit(2);
}
// php-amqp for Symfony's AMQP transport: loaded by the CLI's ini, or loaded here.
$phpArgs = extension_loaded('amqp') ? [] : ['-d', 'extension=amqp'];
$app = new SymfonyApp($so, $phpArgs);
$broker = 'guest:guest@127.0.0.1:5672/%2f';

$transports = [
    'amqp-rs' => fn (string $q, string $db) => "amqp-rs://$broker/$q",
    'amqp-rs prefetch=10' => fn (string $q, string $db) => "amqp-rs://$broker/$q?prefetch=10",
    'symfony amqp (php-amqp)' => fn (string $q, string $db) => "amqp://$broker/$q",
    'symfony amqp, confirms' => fn (string $q, string $db) => "amqp://$broker/$q?confirm_timeout=30",
    'doctrine (sqlite)' => fn (string $q, string $db) => "doctrine://default?queue_name=$q&table_name=messenger_messages",
];
if (!SymfonyApp::hasDoctrine()) {
    unset($transports['doctrine (sqlite)']);
}

/** Runs $cmd to its end; returns [exit code, stdout, stderr, seconds, CPU s, peak RSS KiB]. */
function measure(array $cmd, array $env, float $timeout = 600): array
{
    $start = microtime(true);
    $proc = proc_open($cmd, [1 => ['pipe', 'w'], 2 => ['pipe', 'w']], $pipes, null, $env + getenv());
    [$code, $out, $err, $cpu, $rss] = collect($proc, $pipes, proc_get_status($proc)['pid'], implode(' ', $cmd), $timeout);
    return [$code, $out, $err, microtime(true) - $start, $cpu, $rss ?? 0];
}

/** Ready messages left in the AMQP queue (then deleted, with its exchange) or the Doctrine table. */
function leftOver(string $name, string $queue, string $db, string $so): int
{
    if (str_starts_with($name, 'doctrine')) {
        $pdo = new PDO("sqlite:$db");
        return (int) $pdo->query('SELECT COUNT(*) FROM messenger_messages WHERE delivered_at IS NULL AND queue_name = ' . $pdo->quote($queue))->fetchColumn();
    }
    // In a child: this script runs without the extension (make bench: php benches/run.php).
    [$code, $out, $err] = SymfonyApp::run([PHP_BINARY, '-d', "extension=$so", '-r', '
        $conn = new AmqpRs\Connection("amqp://guest:guest@127.0.0.1:5672/%2f");
        echo $conn->queueStatus($argv[1])["messages"];
        $conn->deleteQueue($argv[1]);
        if ($argv[2] === "1") { $conn->deleteExchange($argv[1]); }', $queue, str_starts_with($name, 'symfony amqp') ? '1' : '0']);
    if ($code !== 0) {
        throw new RuntimeException("$name: cannot count the queue's messages: $out $err");
    }
    return (int) $out;
}

$results = [];
try {
    // The container is compiled once, here, not in the first timed process.
    [$code, $out, $err] = SymfonyApp::run($app->console('cache:warmup'), ['MESSENGER_TRANSPORT_DSN' => 'in-memory://', 'MESSENGER_FAILED_DSN' => 'in-memory://']);
    if ($code !== 0) {
        throw new RuntimeException("cache:warmup failed ($code): $out $err");
    }
    for ($round = 1; $round <= $rounds; $round++) {
        // Alternating order, so that no transport always runs on a warmer or busier broker.
        foreach ($round % 2 ? $transports : array_reverse($transports, true) as $name => $dsn) {
            $queue = sprintf('amqp_rs.bench.symfony.%d.%d.%s', getmypid(), $round, substr(md5($name), 0, 6));
            $db = "$app->dir/var/bench-$round-" . substr(md5($name), 0, 6) . '.sqlite';
            $file = "$app->dir/var/handled-$round-" . substr(md5($name), 0, 6);
            $env = ['MESSENGER_TRANSPORT_DSN' => $dsn($queue, $db), 'MESSENGER_FAILED_DSN' => 'in-memory://', 'MESSENGER_SQLITE' => $db];

            [$code, $out, $err] = SymfonyApp::run($app->dispatch('Noop', $messages, 0, $file, '{i}'), $env, 600);
            $dispatched = json_decode($out, true);
            if ($code !== 0 || !is_array($dispatched) || $dispatched['dispatched'] !== $messages) {
                throw new RuntimeException("$name: dispatch failed ($code): $out $err");
            }

            [$code, $out, $err, $seconds, $cpu, $rss] = measure($app->console('messenger:consume', 'async', "--limit=$messages", '--sleep=0', '--time-limit=300'), $env);
            // Each line: the message's number and when its handler ran.
            $lines = file_exists($file) ? file($file, FILE_IGNORE_NEW_LINES) : [];
            $handled = array_map(fn ($l) => explode(' ', $l)[0], $lines);
            $times = array_map(fn ($l) => (float) (explode(' ', $l)[1] ?? 0), $lines);
            $unique = count(array_unique($handled));
            if ($code !== 0 || count($handled) !== $messages || $unique !== $messages) {
                throw new RuntimeException(sprintf('%s: messenger:consume exited %d having handled %d messages (%d distinct) of %d: %s', $name, $code, count($handled), $unique, $messages, $err));
            }
            if (($left = leftOver($name, $queue, $db, $so)) !== 0) {
                throw new RuntimeException("$name: $left messages left after messenger:consume");
            }
            $results[$name][] = [
                'dispatch_msgs_per_s' => round($messages / $dispatched['seconds'], 1),
                'consume_s' => round($seconds, 3),
                'consume_msgs_per_s' => round($messages / $seconds, 1),
                'handling_msgs_per_s' => round(($messages - 1) / max(1e-6, max($times) - min($times)), 1),
                'worker_cpu_ms_per_msg' => round($cpu * 1000 / $messages, 3),
                'worker_peak_rss_mb' => round($rss / 1024, 1),
            ];
            fprintf(STDERR, "round %d %-26s dispatch %7.0f msgs/s, consume %6.3f s (%6.0f msgs/s; first to last handled %6.0f msgs/s), worker RSS %5.1f MB\n", $round, $name, $messages / $dispatched['seconds'], $seconds, $messages / $seconds, ($messages - 1) / max(1e-6, max($times) - min($times)), $rss / 1024);
        }
    }
} finally {
    $app->remove();
}

$summary = [];
foreach ($results as $name => $runs) {
    foreach (array_keys($runs[0]) as $key) {
        $summary[$name][$key] = round(median(array_column($runs, $key)), 3);
    }
}

printf("\nS1: %d trivial messages, dispatched from a script, then one `messenger:consume --limit=%d` (boot included)\n", $messages, $messages);
printf("%-26s %16s %12s %15s %18s %18s %14s\n", 'transport', 'dispatch msgs/s', 'consume s', 'consume msgs/s', 'handling msgs/s', 'worker CPU ms/msg', 'worker RSS MB');
foreach ($summary as $name => $s) {
    printf("%-26s %16.0f %12.3f %15.0f %18.0f %18.3f %14.1f\n", $name, $s['dispatch_msgs_per_s'], $s['consume_s'], $s['consume_msgs_per_s'], $s['handling_msgs_per_s'], $s['worker_cpu_ms_per_msg'], $s['worker_peak_rss_mb']);
}
$host = php_uname('n') . ', ' . trim((string) shell_exec('nproc')) . ' cores';
printf("(medians of %d rounds; Symfony %s, PHP %s; %s)\n", $rounds, SymfonyApp::version(), PHP_VERSION, $host);

@mkdir(dirname($jsonPath), 0777, true);
file_put_contents($jsonPath, json_encode([
    'when' => date('c'),
    'host' => $host,
    'php' => PHP_VERSION,
    'symfony' => SymfonyApp::version(),
    'extension' => $so,
    'config' => [
        'messages' => $messages,
        'rounds' => $rounds,
        'message' => 'App\Message\Noop (its handler appends the number to a file, checked: each exactly once)',
        'worker' => 'bin/console messenger:consume async --limit=N --sleep=0, timed from start to exit (consume s, consume msgs/s); handling msgs/s = from the first handler call to the last, boot and exit excluded; peak RSS = ru_maxrss',
        'dispatch' => 'bus->dispatch() in a loop in a booted script (amqp-rs waits for each confirm; symfony amqp: no confirms, its default; doctrine: one INSERT each)',
        'amqp-rs' => 'amqp-rs://.../queue, prefetch 50 (its default), and prefetch=10',
        'symfony amqp' => 'amqp://.../exchange (fanout + queue of that name), basic.get per message; without publisher confirms (its default), and with confirm_timeout=30 (dispatch waits for each confirm, as amqp-rs always does)',
        'doctrine' => 'doctrine://default on an sqlite file (DBAL pdo_sqlite)',
    ],
    'medians' => $summary,
    'rounds' => $results,
], JSON_PRETTY_PRINT | JSON_UNESCAPED_SLASHES) . "\n");
echo 'wrote ', realpath($jsonPath), "\n";
