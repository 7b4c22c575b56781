<?php
// Micro figures of the short path (issue 14), amqp_rs against php-amqp, each in a fresh
// process that loads only its client (clients/micro_amqp_rs.php, clients/micro_php_amqp.php):
// a round trip on an open connection, connect + close, opening and dropping a producer, the
// RSS added by loading the extension (against `php -n` with no extension, measured in the same
// run), by the first connection and by each further one, and the threads of the process.
//
//   php benches/micro.php [--runs=5] [--so=PATH] [--json=PATH]
//
// Figures: the median over the runs (min-max beside it) of each run's figure; each run's
// timings are themselves medians (round trip of 2 000, connect + close of 30, producer of 200).
// The processes take turns in the opposite order every other run. Writes
// results/micro-latest.json; run.php puts its table in latest.md.

declare(strict_types=1);

require_once __DIR__ . '/report_web.php';

$opts = getopt('', ['runs:', 'so:', 'json:']);
$runs = max(1, (int) ($opts['runs'] ?? 5));
$so = realpath($opts['so'] ?? __DIR__ . '/../target/release/libamqp_rs.so') ?: '';
$jsonPath = $opts['json'] ?? __DIR__ . '/results/micro-latest.json';
if ($so === '' || !is_file($so)) {
    fwrite(STDERR, "no amqp_rs extension (build it, or pass --so=PATH)\n");
    exit(2);
}
$uri = 'amqp://guest:guest@127.0.0.1:5672/%2f';
$commands = [
    'none' => [PHP_BINARY, '-n', '-r', 'require $argv[1]; echo json_encode(["rss_loaded_kb" => rss_kb(), "threads_loaded" => threads()]);',
        __DIR__ . '/clients/common.php'],
    'amqp_rs' => [PHP_BINARY, '-n', '-d', "extension=$so", __DIR__ . '/clients/micro_amqp_rs.php'],
    'php-amqp' => [PHP_BINARY, '-n', '-d', 'extension=amqp.so', __DIR__ . '/clients/micro_php_amqp.php'],
];
$figures = [
    'round_trip_us' => 'round trip on an open connection (passive queue declare), µs',
    'connect_close_us' => 'connect + close, µs',
    'producer_new_us' => 'producer open, a new channel (the earlier ones held; php-amqp: channel + confirmSelect), µs',
    'producer_us' => 'producer open + drop, as a request does (amqp_rs may reuse the dropped one\'s channel), µs',
    'rss_extension_mb' => 'RSS added by loading the extension, MB',
    'rss_first_mb' => 'RSS added by the first connection, MB',
    'rss_further_mb' => 'RSS added by each further connection, MB',
    'rss_one_connection_mb' => 'RSS of a process with one connection, MB',
    'threads_loaded' => 'threads once loaded',
    'threads_first' => 'threads with one connection',
    'threads_more' => 'threads with five connections',
];

$rows = [];
$failures = [];
$loadBefore = trim((string) @file_get_contents('/proc/loadavg'));
for ($run = 0; $run < $runs; $run++) {
    $order = $run % 2 ? array_reverse(array_keys($commands)) : array_keys($commands);
    $got = [];
    foreach ($order as $client) {
        $cmd = $commands[$client];
        if ($client !== 'none') {
            array_push($cmd, $uri, sprintf('amqp_rs.bench.micro.%d.%s', getmypid(), bin2hex(random_bytes(3))));
        }
        exec(implode(' ', array_map('escapeshellarg', $cmd)) . ' 2>&1', $out, $status);
        $json = json_decode((string) end($out), true);
        if ($status !== 0 || !is_array($json)) {
            $failures[] = ['client' => $client, 'run' => $run + 1, 'error' => "exit $status: " . implode(' ', $out)];
        } else {
            $got[$client] = $json;
        }
        $out = [];
    }
    foreach (['amqp_rs', 'php-amqp'] as $client) {
        if (!isset($got[$client], $got['none'])) {
            continue;
        }
        $r = $got[$client];
        $rows[$client][] = [
            'round_trip_us' => $r['round_trip_us'],
            'connect_close_us' => $r['connect_close_us'],
            'producer_new_us' => $r['producer_new_us'],
            'producer_us' => $r['producer_us'],
            'rss_extension_mb' => ($r['rss_loaded_kb'] - $got['none']['rss_loaded_kb']) / 1024,
            'rss_first_mb' => ($r['rss_first_kb'] - $r['rss_loaded_kb']) / 1024,
            'rss_further_mb' => ($r['rss_more_kb'] - $r['rss_first_kb']) / 4 / 1024,
            'rss_one_connection_mb' => $r['rss_first_kb'] / 1024,
            'threads_loaded' => $r['threads_loaded'],
            'threads_first' => $r['threads_first'],
            'threads_more' => $r['threads_more'],
        ];
        fprintf(STDERR, "%s micro run %d/%d %-9s round trip %6.1f µs, connect+close %7.0f µs, producer %6.0f µs, RSS +%.1f / +%.1f / +%.2f MB, %d threads\n",
            date('H:i:s'), $run + 1, $runs, $client, $r['round_trip_us'], $r['connect_close_us'], $r['producer_us'],
            ($r['rss_loaded_kb'] - $got['none']['rss_loaded_kb']) / 1024, ($r['rss_first_kb'] - $r['rss_loaded_kb']) / 1024,
            ($r['rss_more_kb'] - $r['rss_first_kb']) / 4 / 1024, $r['threads_first']);
    }
}

$report = [
    'when' => date('c'),
    'commit' => trim((string) shell_exec('git -C ' . escapeshellarg(dirname(__DIR__)) . ' rev-parse --short=12 HEAD 2>/dev/null')),
    'runs' => $runs,
    'extension' => $so,
    'method' => sprintf('Each figure: the median of %d runs (min–max beside it), each run a fresh `php -n` process per client '
        . 'loading only that client, against the shared broker. Timings are medians within a run: round trip of 2 000 '
        . 'calls (amqp_rs `queueStatus()`, php-amqp a passive `declareQueue()`), connect + close of 30, producer open '
        . 'of 100 held at once, producer open + drop of 200. RSS (VmRSS): loading the extension against `php -n` with none; the first connection (amqp_rs: '
        . 'constructed; php-amqp: connected, with a channel and one declare); each further one: four more, each used once, '
        . 'divided by four. Ratio: amqp_rs / php-amqp.', $runs),
    'load_average' => ['before' => $loadBefore, 'after' => trim((string) @file_get_contents('/proc/loadavg'))],
    'figures' => $figures,
    'summary' => web_summary($rows),
    'rounds' => $rows,
    'failures' => $failures,
];
@mkdir(dirname($jsonPath), 0777, true);
file_put_contents($jsonPath, json_encode($report, JSON_PRETTY_PRINT | JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE) . "\n");
echo implode("\n", micro_markdown($report)), "\nwrote $jsonPath\n";
exit($failures ? 1 : 0);
