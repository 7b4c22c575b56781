<?php
// make bench: amqp_rs, php-amqp and php-amqplib side by side, in one run, against the same
// broker. Prints msgs/s and client CPU µs/msg per scenario, and ratios against php-amqp.
//
//   php benches/run.php [--count=N] [--rounds=R] [--only=P1,P2]
//
// Each measurement runs in a fresh PHP process that loads only the client it measures.

declare(strict_types=1);

$opts = getopt('', ['count:', 'rounds:', 'only:', 'so:']);
$so = $opts['so'] ?? __DIR__ . '/../target/release/libamqp_rs.so';
$rounds = (int) ($opts['rounds'] ?? 3);
$only = isset($opts['only']) ? explode(',', $opts['only']) : null;
$scenarios = [
    'P1' => ['what' => '100 B persistent, no confirms', 'count' => 100_000],
    'P2' => ['what' => '100 B persistent, confirms, one wait at the end', 'count' => 100_000],
    'P3' => ['what' => '100 B persistent, confirm each before the next', 'count' => 5_000],
];
$clients = [
    'amqp_rs' => [PHP_BINARY, '-n', '-d', "extension=$so", __DIR__ . '/clients/publish_amqp_rs.php'],
    'php-amqp' => [PHP_BINARY, '-n', '-d', 'extension=amqp.so', __DIR__ . '/clients/publish_php_amqp.php'],
    'php-amqplib' => [PHP_BINARY, '-n', '-d', 'extension=sockets.so', '-d', 'extension=mbstring.so', __DIR__ . '/clients/publish_php_amqplib.php'],
];
$queue = 'amqp_rs.bench.publish';

function ctl(string ...$args): void
{
    exec('rabbitmqctl ' . implode(' ', array_map('escapeshellarg', $args)) . ' -q 2>&1', $out, $code);
}

function run(array $cmd): array
{
    $proc = proc_open($cmd, [1 => ['pipe', 'w'], 2 => ['pipe', 'w']], $pipes);
    $out = stream_get_contents($pipes[1]);
    $err = stream_get_contents($pipes[2]);
    $code = proc_close($proc);
    $result = json_decode(trim((string) $out), true);
    if ($code !== 0 || !is_array($result)) {
        throw new RuntimeException(implode(' ', $cmd) . " failed ($code): $out $err");
    }
    return $result;
}

// The publishers need a durable queue; amqp_rs itself declares and purges it.
$setup = [PHP_BINARY, '-n', '-d', "extension=$so", '-r',
    '$c = new AmqpRs\Connection(); $c->declareQueue($argv[1]); echo json_encode(["purged" => $c->purgeQueue($argv[1])]);',
    $queue];

$results = [];
foreach ($scenarios as $name => $s) {
    if ($only !== null && !in_array($name, $only, true)) {
        continue;
    }
    $count = (int) ($opts['count'] ?? $s['count']);
    if ($name === 'P3') {
        $count = min($count, 5_000);
    }
    for ($round = 0; $round < $rounds; $round++) {
        // Alternate the order so no client always runs on a warmer or fuller broker.
        $order = array_keys($clients);
        if ($round % 2 === 1) {
            $order = array_reverse($order);
        }
        foreach ($order as $client) {
            run($setup);
            $r = run([...$clients[$client], $name, (string) $count, '100', $queue]);
            $results[$name][$client][] = ['rate' => $count / $r['elapsed'], 'cpu' => $r['cpu_us'] / $count];
        }
    }
    run($setup);
}
run([PHP_BINARY, '-n', '-d', "extension=$so", '-r', '(new AmqpRs\Connection())->deleteQueue($argv[1]); echo "{}";', $queue]);

function median(array $xs): float
{
    sort($xs);
    $n = count($xs);
    return $n % 2 ? $xs[intdiv($n, 2)] : ($xs[$n / 2 - 1] + $xs[$n / 2]) / 2;
}

printf("%-4s %-12s %12s %10s %14s %10s\n", 'scen', 'client', 'msgs/s', 'vs amqp', 'cpu µs/msg', 'vs amqp');
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
printf("(medians of %d rounds; %s)\n", $rounds, php_uname('n') . ', ' . trim((string) shell_exec('nproc')) . ' cores');
