<?php
// make bench: amqp_rs, php-amqp and php-amqplib side by side, in one run, against the same
// broker, with two references: 'raw' (the broker's ceiling) and 'lapin' (the Rust library
// amqp_rs is built on, used directly: what the PHP layer costs). Writes
// benches/results/latest.json, latest.md and the charts throughput.png, cpu.png, latency.png.
//
//   php benches/run.php [--rounds=3] [--only=P1,C1-64K,R1,M1,L1,S1] [--clients=amqp_rs,lapin]
//       [--count=N] [--m1-count=N] [--so=PATH] [--lapin=PATH] [--out=DIR] [--l1=run|json|off]
//       [--l1-jobs=N] [--web-requests=N] [--s1=run|json|off] [--s1-messages=N] [--e1=run|json|off]
//       [--e1-calls=N] [--report-only]
//
// Scenarios (the counts are the defaults; --count=N sets every count at once, for a quick run):
//   P1, P2, P3          publish 100 B persistent: no confirms / confirms, one wait at the end /
//                       each confirmed before the next
//   P2-1K, P2-64K       P2 with 1 KB and 64 KB bodies
//   C1, C2              consume 100 B persistent from a queue filled beforehand, outside the
//                       timing, by amqp_rs: ack each / auto-ack; prefetch 500
//   C1-1K, C1-64K       C1 with 1 KB and 64 KB bodies
//   R1                  --count (10 000) sequential RPC round trips of 100 B, latency
//                       percentiles. Every client calls the same server, an amqp_rs process that
//                       consumes the request queue and answers with Message::reply()
//                       (clients/serve_amqp_rs.php), started afresh for each measurement: only
//                       the client differs. amqp_rs calls rpc() and lapin publishes to it with
//                       direct reply-to; php-amqp and php-amqplib do the classic RPC of the
//                       RabbitMQ tutorial (an exclusive reply queue, a correlation id per call).
//                       'raw' has no RPC client.
//   M1 (opt-in)         RSS of an amqp_rs worker, and of a php-amqp one, over --m1-count
//                       messages (1 000 000, several minutes). Only with --only=...M1; its
//                       figures go to results/m1-latest.json, and every report includes the
//                       latest ones found there.
//   L1                  Laravel queue:work, amqp-rs driver against the database driver: runs
//                       benches/laravel.php (when it exists) with the same --rounds and --so, and
//                       includes results/laravel-latest.json. --l1=json only reads that file,
//                       --l1=off leaves L1 out.
//   W1, W2, W3          the short path, one web request through php-fpm behind nginx: publish one
//                       message with its confirm / one RPC call / a Laravel route dispatching one
//                       job; runs benches/web.php (its own pool per client, a RabbitMQ node of its
//                       own) with the same --rounds and --so, and includes results/web-latest.json
//   MICRO               round trip, connect + close, producer open, RSS and threads, amqp_rs against
//                       php-amqp: runs benches/micro.php, includes results/micro-latest.json
//   S1                  Symfony messenger:consume, amqp-rs transport against Symfony's AMQP
//                       transport (php-amqp) and its Doctrine transport (sqlite): runs
//                       benches/symfony.php likewise (results/symfony-latest.json); --s1=json
//                       only reads that file, --s1=off leaves S1 out.
//   E1                  RPC calls from one process: 50 Revolt fibers (amqp-rs/revolt's
//                       Client::rpc()) against the same calls one after another and against
//                       php-amqplib's blocking RPC, to a server answering at once and one answering
//                       after 20 ms: runs benches/event_loop.php with the same --rounds in the
//                       Debian sid root (the only place with Revolt), through `scripts/matrix.sh
//                       --run` (needs root; builds the extension there, its own RabbitMQ 4.3, waits
//                       for the matrix lock), and includes results/event-loop-latest.json.
//                       Skipped with a note where that root does not exist (`make matrix` makes
//                       it). --e1-calls=N: timed calls against the echo server (default 5 000);
//                       --e1=json only reads the file, --e1=off leaves E1 out.
//
// Clients: amqp_rs (--so), php-amqp (the C extension), php-amqplib (pure PHP), raw (AMQP
// written by hand on a plain socket, clients/raw_amqp.php: a ratio it cannot reach is ruled out
// by the broker, not the client) and lapin (--lapin, target/release/lapin_baseline).
//
// Each measurement runs in a fresh process that loads only the client it measures; the clients
// take turns, in the opposite order every other round, so that none always runs on a warmer or
// fuller broker. Figures per client and scenario: the median over the rounds and the min–max.
// msgs/s is counted from the client's first message to its last (consumers: to the return of
// their consume loop); client CPU µs/msg is the user + system time of the client process, every
// thread, over that same span, divided by the count. Peak RSS is the ru_maxrss that wait4()
// reports when the orchestrator reaps the client (the whole process's high-water mark, start-up
// included, the same measure for PHP and Rust clients).
//
// Every message is checked: a publisher must leave exactly COUNT messages in its queue; a
// consumer must have handled every message once and left none behind; every RPC call must have
// been served. A measurement that fails its check is left out of the figures and listed under
// "Failed checks" in the report; the run goes on.
//
// A run with --only writes the scenarios it ran, and keeps the others from the latest.json it
// finds (each scenario records when and at which commit it was measured).

declare(strict_types=1);

require_once __DIR__ . '/process.php';
require_once __DIR__ . '/report_event_loop.php';

$opts = getopt('', ['count:', 'rounds:', 'only:', 'clients:', 'so:', 'lapin:', 'm1-count:', 'out:', 'l1:',
    'l1-jobs:', 'web-requests:', 's1:', 's1-messages:', 'e1:', 'e1-calls:', 'report-only']);
$root = dirname(__DIR__);
$so = $opts['so'] ?? "$root/target/release/libamqp_rs.so";
$lapin = $opts['lapin'] ?? "$root/target/release/lapin_baseline";
$rounds = max(1, (int) ($opts['rounds'] ?? 3));
$out = rtrim($opts['out'] ?? __DIR__ . '/results', '/');
$l1Mode = $opts['l1'] ?? 'run';
$s1Mode = $opts['s1'] ?? 'run';
$e1Mode = $opts['e1'] ?? 'run';
$only = isset($opts['only']) ? explode(',', $opts['only']) : null;
$m1Count = (int) ($opts['m1-count'] ?? 1_000_000);

$scenarios = [
    'P1' => ['side' => 'publish', 'base' => 'P1', 'size' => 100, 'count' => 100_000, 'what' => '100 B persistent, no confirms'],
    'P2' => ['side' => 'publish', 'base' => 'P2', 'size' => 100, 'count' => 100_000, 'what' => '100 B persistent, confirms, one wait at the end'],
    'P3' => ['side' => 'publish', 'base' => 'P3', 'size' => 100, 'count' => 5_000, 'what' => '100 B persistent, confirm each before the next'],
    'P2-1K' => ['side' => 'publish', 'base' => 'P2', 'size' => 1024, 'count' => 50_000, 'what' => '1 KB persistent, confirms, one wait at the end'],
    'P2-64K' => ['side' => 'publish', 'base' => 'P2', 'size' => 65536, 'count' => 10_000, 'what' => '64 KB persistent, confirms, one wait at the end'],
    'C1' => ['side' => 'consume', 'base' => 'C1', 'size' => 100, 'count' => 100_000, 'what' => '100 B persistent, pre-filled, ack each, prefetch 500'],
    'C2' => ['side' => 'consume', 'base' => 'C2', 'size' => 100, 'count' => 100_000, 'what' => '100 B persistent, pre-filled, auto-ack, prefetch 500'],
    'C1-1K' => ['side' => 'consume', 'base' => 'C1', 'size' => 1024, 'count' => 50_000, 'what' => '1 KB persistent, pre-filled, ack each, prefetch 500'],
    'C1-64K' => ['side' => 'consume', 'base' => 'C1', 'size' => 65536, 'count' => 10_000, 'what' => '64 KB persistent, pre-filled, ack each, prefetch 500'],
];
$r1 = ['count' => 10_000, 'size' => 100, 'what' => 'sequential RPC round trips, 100 B each way, one amqp_rs server (consume + reply)'];
if (isset($opts['count'])) {
    foreach ($scenarios as $name => $s) {
        // P3 and the 64 KB ones are slow per message: never more than their default.
        $scenarios[$name]['count'] = in_array($name, ['P3', 'P2-64K', 'C1-64K'], true)
            ? min((int) $opts['count'], $s['count']) : (int) $opts['count'];
    }
    $r1['count'] = (int) $opts['count'];
}
$selected = fn (string $name) => $only === null ? !in_array($name, ['M1'], true) : in_array($name, $only, true);

$php = [
    'amqp_rs' => [PHP_BINARY, '-n', '-d', "extension=$so"],
    'php-amqp' => [PHP_BINARY, '-n', '-d', 'extension=amqp.so'],
    'php-amqplib' => [PHP_BINARY, '-n', '-d', 'extension=sockets.so', '-d', 'extension=mbstring.so'],
    'raw' => [PHP_BINARY, '-n'],
];
$allClients = ['amqp_rs', 'php-amqp', 'php-amqplib', 'raw', 'lapin'];
$clients = isset($opts['clients']) ? array_values(array_intersect($allClients, explode(',', $opts['clients']))) : $allClients;
$notes = [];
if (in_array('lapin', $clients, true) && !is_executable($lapin)) {
    $notes[] = "no lapin baseline at $lapin (cargo build --release --bin lapin_baseline, or --lapin=PATH): left out";
    $clients = array_values(array_diff($clients, ['lapin']));
}
$script = fn (string $side, string $client) => __DIR__ . "/clients/{$side}_" . str_replace('-', '_', $client) . '.php';
$queue = 'amqp_rs.bench.publish';
$consumeQueue = 'amqp_rs.bench.consume';
$rpcQueue = 'amqp_rs.bench.rpc';

/** Starts $cmd with its stdout and stderr piped: [process, pipes, pid]. */
function spawn(array $cmd): array
{
    $proc = proc_open($cmd, [1 => ['pipe', 'w'], 2 => ['pipe', 'w']], $pipes);
    if ($proc === false) {
        throw new RuntimeException('cannot start ' . implode(' ', $cmd));
    }
    // Right after the fork, the child cannot have exited yet: this does not reap it.
    return [$proc, $pipes, proc_get_status($proc)['pid']];
}

/** Runs $cmd to its end; its JSON line, with '_peak_rss_kb' (see finish()) added. */
function run(array $cmd, float $timeout = 600): array
{
    return finish(spawn($cmd), $cmd, $timeout);
}

// A consumer that never gets its last message would block the whole run: give up on it after
// $timeout, and say so, rather than hang (collect() in process.php).
function finish(array $spawned, array $cmd, float $timeout): array
{
    [$proc, $pipes, $pid] = $spawned;
    $what = basename($cmd[0]) . ' ' . implode(' ', array_slice($cmd, -4));
    [$code, $out, $err, , $peak] = collect($proc, $pipes, $pid, $what, $timeout);
    $result = json_decode(trim($out), true);
    if ($code !== 0 || !is_array($result)) {
        throw new RuntimeException(implode(' ', array_map(fn ($a) => strlen($a) > 60 ? basename($a) : $a, $cmd))
            . " failed ($code): " . trim("$out $err"));
    }
    return $result + ['_peak_rss_kb' => $peak];
}

/** ['median' => , 'min' => , 'max' => ] of the non-null values, or null if none. */
function stats(array $xs): ?array
{
    $xs = array_values(array_filter($xs, fn ($x) => $x !== null));
    return $xs ? ['median' => median($xs), 'min' => min($xs), 'max' => max($xs)] : null;
}

function progress(string $line): void
{
    fwrite(STDERR, date('H:i:s') . " $line\n");
}

function sh(string $cmd): string
{
    return trim((string) shell_exec("$cmd 2>/dev/null"));
}

// The publishers need a durable queue; amqp_rs itself declares and purges it.
$setup = fn (string $q) => [...$php['amqp_rs'], '-r',
    '$c = new AmqpRs\Connection(); $c->declareQueue($argv[1]); echo json_encode(["purged" => $c->purgeQueue($argv[1])]);',
    $q];
// Waits for the consumer's channel to be gone from the queue first: only then would the broker
// have put back any message whose ack never reached it. With a count (publishers, whose last
// messages may still be on their way when they stop: P1), waits up to 10 s for that depth.
$status = fn (string $q, int $expect = -1) => [...$php['amqp_rs'], '-r',
    '$c = new AmqpRs\Connection();
    for ($i = 0; ($s = $c->queueStatus($argv[1]))["consumers"] > 0 && $i < 100; $i++) usleep(50_000);
    for ($i = 0; $s["messages"] < (int) $argv[2] && $i < 200; $i++) { usleep(50_000); $s = $c->queueStatus($argv[1]); }
    echo json_encode($s);',
    $q, (string) $expect];
$fill = fn (int $count, int $size, int $maxDepth = 0) => [...$php['amqp_rs'], $script('feed', 'amqp_rs'), (string) $count,
    (string) $size, $consumeQueue, (string) $maxDepth];
$command = fn (string $client, string $side, array $args) => $client === 'lapin'
    ? [$lapin, $side, ...$args]
    : [...$php[$client], $script($side, $client), ...$args];

// Anything short of every message handled once and acked is a client bug, not a slow result.
function check(string $what, int $count, array $r, array $after): void
{
    if ($r['handled'] !== $count || $r['seen'] !== $count || $after['messages'] !== 0) {
        throw new RuntimeException("$what: $count messages queued, the client handled {$r['handled']}, "
            . "its callback ran {$r['seen']} times, {$after['messages']} left in the queue afterwards");
    }
}

/** The clients in the order of round $round: alternating. */
function order(array $clients, int $round): array
{
    return $round % 2 === 1 ? array_reverse($clients) : $clients;
}

$failures = [];
$started = microtime(true);
$loadBefore = sh('cat /proc/loadavg');
$measured = [];      // scenario => ['what', 'count', 'size', 'clients' => client => [rounds]]
$childrenRun = [];   // scenarios run by another script whose earlier failures this run replaces

if (!isset($opts['report-only'])) {
    foreach ($scenarios as $name => $s) {
        if (!$selected($name)) {
            continue;
        }
        $measured[$name] = ['what' => $s['what'], 'count' => $s['count'], 'size' => $s['size'], 'rounds' => $rounds, 'clients' => []];
        for ($round = 0; $round < $rounds; $round++) {
            foreach (order($clients, $round) as $client) {
                try {
                    if ($s['side'] === 'publish') {
                        run($setup($queue));
                        $r = run($command($client, 'publish', [$s['base'], (string) $s['count'], (string) $s['size'], $queue]));
                        $after = run($status($queue, $s['count']));
                        if ($after['messages'] !== $s['count']) {
                            throw new RuntimeException("$name $client: published {$s['count']}, the queue holds {$after['messages']}");
                        }
                    } else {
                        run($setup($consumeQueue));
                        $filled = run($fill($s['count'], $s['size']));
                        if ($filled['depth'] !== $s['count']) {
                            throw new RuntimeException("$name: filled {$s['count']} messages, the queue holds {$filled['depth']}");
                        }
                        $r = run($command($client, 'consume', [$s['base'], (string) $s['count'], $consumeQueue]));
                        check("$name $client", $s['count'], $r, run($status($consumeQueue)));
                    }
                } catch (Throwable $e) {
                    $failures[] = ['scenario' => $name, 'client' => $client, 'round' => $round + 1, 'error' => $e->getMessage()];
                    progress("$name round " . ($round + 1) . " $client FAILED: " . $e->getMessage());
                    continue;
                }
                $row = ['rate' => $s['count'] / $r['elapsed'], 'cpu_us' => $r['cpu_us'] / $s['count'],
                    'peak_rss_kb' => $r['_peak_rss_kb'], 'elapsed' => $r['elapsed']];
                $measured[$name]['clients'][$client][] = $row;
                progress(sprintf('%-6s round %d/%d %-12s %9.0f msgs/s %8.2f µs/msg CPU %6.1f MB peak', $name, $round + 1,
                    $rounds, $client, $row['rate'], $row['cpu_us'], ($row['peak_rss_kb'] ?? 0) / 1024));
            }
        }
    }
    if (array_intersect_key($measured, $scenarios)) {
        run($setup($queue));
        run($setup($consumeQueue));
    }

    if ($selected('R1')) {
        $measured['R1'] = ['what' => $r1['what'], 'count' => $r1['count'], 'size' => $r1['size'], 'rounds' => $rounds, 'clients' => []];
        $serveCmd = [...$php['amqp_rs'], $script('serve', 'amqp_rs'), $rpcQueue];
        for ($round = 0; $round < $rounds; $round++) {
            foreach (order(array_values(array_diff($clients, ['raw'])), $round) as $client) {
                try {
                    $server = spawn($serveCmd);
                    if (fgets($server[1][1]) !== "ready\n") {
                        throw new RuntimeException('R1 server did not start: ' . stream_get_contents($server[1][2]));
                    }
                    try {
                        $r = run($client === 'lapin'
                            ? [$lapin, 'rpc', 'R1', (string) $r1['count'], (string) $r1['size'], $rpcQueue]
                            : $command($client, 'rpc', ['R1', (string) $r1['count'], $rpcQueue]));
                    } finally {
                        proc_terminate($server[0]);     // SIGTERM: consume() returns, it reports
                        $served = finish($server, $serveCmd, 30);
                    }
                    if ($served['served'] !== $r['calls']) {
                        throw new RuntimeException("R1 $client: {$r['calls']} calls, the server served {$served['served']}");
                    }
                } catch (Throwable $e) {
                    $failures[] = ['scenario' => 'R1', 'client' => $client, 'round' => $round + 1, 'error' => $e->getMessage()];
                    progress("R1 round " . ($round + 1) . " $client FAILED: " . $e->getMessage());
                    continue;
                }
                $row = ['rate' => $r['timed'] / $r['elapsed'], 'cpu_us' => $r['cpu_us'] / $r['timed'],
                    'peak_rss_kb' => $r['_peak_rss_kb'], 'elapsed' => $r['elapsed'], 'mean_us' => $r['mean_us'],
                    'p50_us' => $r['p50_us'], 'p99_us' => $r['p99_us'], 'max_us' => $r['max_us'],
                    'server_cpu_us' => $served['cpu_us'] / $served['served']];
                $measured['R1']['clients'][$client][] = $row;
                progress(sprintf('R1     round %d/%d %-12s %9.0f calls/s p50 %6.0f µs p99 %6.0f µs %7.1f µs/call CPU', $round + 1,
                    $rounds, $client, $row['rate'], $row['p50_us'], $row['p99_us'], $row['cpu_us']));
            }
        }
    }

    // M1: one worker per client, fed while it runs by a separate amqp_rs process. php-amqplib
    // is left out: it has no native memory of its own to leak, and a million messages take it long.
    if ($selected('M1')) {
        $memory = [];
        foreach (['amqp_rs', 'php-amqp'] as $client) {
            try {
                run($setup($consumeQueue));
                $feedCmd = $fill($m1Count, 100, 50_000);
                $feeder = spawn($feedCmd);
                try {
                    $r = run($command($client, 'consume', ['M1', (string) $m1Count, $consumeQueue]), max(600, $m1Count / 1_000));
                } catch (Throwable $e) {
                    proc_terminate($feeder[0]);
                    throw $e;
                }
                finish($feeder, $feedCmd, 60);
                check("M1 $client", $m1Count, $r, run($status($consumeQueue)));
            } catch (Throwable $e) {
                $failures[] = ['scenario' => 'M1', 'client' => $client, 'round' => 1, 'error' => $e->getMessage()];
                progress("M1 $client FAILED: " . $e->getMessage());
                continue;
            }
            $memory[$client] = ['rate' => $m1Count / $r['elapsed'], 'rss_kb' => $r['rss_kb'], 'peak_rss_kb' => $r['_peak_rss_kb']];
            progress(sprintf('M1     %-12s %9.0f msgs/s, RSS %s MB', $client, $m1Count / $r['elapsed'],
                implode(' ', array_map(fn ($kb) => sprintf('%.1f', $kb / 1024), $r['rss_kb']))));
        }
        run($setup($consumeQueue));
        if ($memory) {
            @mkdir($out, 0777, true);
            file_put_contents("$out/m1-latest.json", json_encode(['when' => date('c'), 'count' => $m1Count,
                'what' => 'worker RSS over the messages, ack each, prefetch 500, sampled every tenth (the first once warm)',
                'clients' => $memory], JSON_PRETTY_PRINT | JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE) . "\n");
        }
    }
    // Only after a run that used them: another run may be using them now.
    try {
        if ($measured || $selected('M1')) {
            run([...$php['amqp_rs'], '-r', '$c = new AmqpRs\Connection(); foreach (array_slice($argv, 1) as $q) $c->deleteQueue($q); echo "{}";',
                $queue, $consumeQueue, $rpcQueue]);
        }
    } catch (Throwable $e) {
        $notes[] = 'could not delete the bench queues: ' . $e->getMessage();
    }

    // L1 and S1: Laravel and Symfony workers, by benches/laravel.php and benches/symfony.php
    // (other processes, with their own rounds and JSON).
    foreach ([['L1', $l1Mode, 'laravel', '--jobs=', 'l1-jobs'], ['S1', $s1Mode, 'symfony', '--messages=', 's1-messages']] as [$scenario, $mode, $script, $countFlag, $countOpt]) {
        $path = __DIR__ . "/$script.php";
        if (!$selected($scenario) || $mode !== 'run' || !is_file($path)) {
            continue;
        }
        $cmd = [PHP_BINARY, $path, "--rounds=$rounds", '--so=' . $so, "--json=$out/$script-latest.json"];
        if (isset($opts[$countOpt])) {
            $cmd[] = $countFlag . (int) $opts[$countOpt];
        }
        progress("$scenario     running " . implode(' ', array_slice($cmd, 1)));
        $p = proc_open($cmd, [1 => ['pipe', 'w'], 2 => STDERR], $pipes);
        $frameworkOut = stream_get_contents($pipes[1]);
        if (($code = proc_close($p)) !== 0) {
            $notes[] = "$scenario: benches/$script.php exited $code; the table below, if any, is from an earlier run: " . trim($frameworkOut);
            $failures[] = ['scenario' => $scenario, 'client' => '-', 'round' => 0, 'error' => "benches/$script.php exited $code"];
        }
    }

    // W1-W3 and MICRO, by benches/web.php and benches/micro.php (other processes, their own JSON).
    $web = array_values(array_filter(['W1', 'W2', 'W3'], $selected));
    $children = [
        'W' => $web ? [__DIR__ . '/web.php', '--only=' . implode(',', $web), "--rounds=$rounds", "--json=$out/web-latest.json"] : null,
        'MICRO' => $selected('MICRO') ? [__DIR__ . '/micro.php', "--json=$out/micro-latest.json"] : null,
    ];
    if (isset($opts['web-requests']) && $children['W']) {
        $children['W'][] = '--requests=' . (int) $opts['web-requests'];
    }
    foreach (array_filter($children) as $name => $args) {
        $cmd = [PHP_BINARY, ...$args, '--so=' . $so];
        progress("$name      running " . implode(' ', array_map('basename', array_slice($cmd, 1))));
        $p = proc_open($cmd, [1 => ['pipe', 'w'], 2 => STDERR], $pipes);
        $childOut = stream_get_contents($pipes[1]);
        if (($code = proc_close($p)) !== 0) {
            $notes[] = "$name: " . basename($args[0]) . " exited $code; its tables below may hold failures or be from an earlier run: "
                . substr(trim($childOut), -300);
            $failures[] = ['scenario' => $name, 'client' => '-', 'round' => 0, 'error' => basename($args[0]) . " exited $code"];
        }
    }

    // E1, in the sid root (report_event_loop.php); a machine without it skips E1 with a note.
    if ($selected('E1') && $e1Mode === 'run') {
        if (($why = e1_unavailable($root, $out)) !== null) {
            $notes[] = "E1 not run: $why; the E1 table, if any, is from an earlier run";
            progress("E1     skipped: $why");
        } else {
            $childrenRun[] = 'E1';
            progress('E1     running benches/event_loop.php in the sid root (scripts/matrix.sh --run)');
            if (($code = e1_run($root, $out, $rounds, isset($opts['e1-calls']) ? (int) $opts['e1-calls'] : null)) !== 0) {
                $notes[] = "E1: scripts/matrix.sh --run ... event_loop.php exited $code; the E1 table may hold failures or be from an earlier run";
                $failures[] = ['scenario' => 'E1', 'client' => '-', 'round' => 0, 'error' => "benches/event_loop.php in the sid root exited $code"];
            }
        }
    }
}

// ---- The report: results/latest.json, then latest.md and the charts drawn from it. ----

function machine(string $so, string $root): array
{
    $cpuinfo = (string) @file_get_contents('/proc/cpuinfo');
    preg_match('/^model name\s*:\s*(.+)$/m', $cpuinfo, $model);
    preg_match('/^MemTotal:\s+(\d+)/m', (string) @file_get_contents('/proc/meminfo'), $mem);
    preg_match('/^PRETTY_NAME="?([^"\n]+)/m', (string) @file_get_contents('/etc/os-release'), $os);
    $rabbit = sh('timeout 30 rabbitmq-diagnostics -q server_version') ?: sh('timeout 30 rabbitmqctl -q version');
    $ri = sh(implode(' ', array_map('escapeshellarg', [PHP_BINARY, '-n', '-d', "extension=$so", '--ri', 'amqp_rs'])));
    preg_match('/^version => (\S+)/m', $ri, $amqpRs);
    preg_match('/^lapin version => (\S+)/m', $ri, $lapinVersion);
    $amqplib = (string) @file_get_contents('/usr/share/php/PhpAmqpLib/Package.php');
    preg_match("/VERSION = '([^']+)'/", $amqplib, $amqplibVersion);
    $dirty = sh("git -C " . escapeshellarg($root) . " status --porcelain --untracked-files=no") !== '';
    return [
        'host' => php_uname('n'),
        'cpu' => trim($model[1] ?? 'unknown'),
        'cores' => (int) sh('nproc'),
        'virtual' => (bool) preg_match('/^flags\s*:.*\bhypervisor\b/m', $cpuinfo),
        'ram_gb' => isset($mem[1]) ? round($mem[1] / 1048576, 1) : null,
        'os' => $os[1] ?? PHP_OS,
        'kernel' => php_uname('r'),
        'php' => PHP_VERSION,
        'rabbitmq' => $rabbit ?: 'unknown',
        'commit' => sh("git -C " . escapeshellarg($root) . " rev-parse --short=12 HEAD") . ($dirty ? ' (with uncommitted changes)' : ''),
        'versions' => [
            'amqp_rs' => $amqpRs[1] ?? 'unknown',
            'lapin' => $lapinVersion[1] ?? 'unknown',
            'php-amqp' => sh(implode(' ', array_map('escapeshellarg', [PHP_BINARY, '-n', '-d', 'extension=amqp.so', '-r', 'echo phpversion("amqp");']))) ?: 'unknown',
            'php-amqplib' => $amqplibVersion[1] ?? 'unknown',
        ],
        'extension' => ['path' => $so, 'sha256' => is_file($so) ? substr(hash_file('sha256', $so), 0, 16) : null,
            'built' => is_file($so) ? date('c', filemtime($so)) : null],
    ];
}

/** Medians, min–max and ratios of one scenario's rounds. */
function summarize(array $scenario): array
{
    $sum = [];
    foreach ($scenario['clients'] as $client => $rows) {
        foreach (array_keys($rows[0]) as $key) {
            $sum[$client][$key] = stats(array_column($rows, $key));
        }
        $sum[$client]['ok_rounds'] = count($rows);
    }
    $ratio = fn (?array $a, ?array $b) => $a && $b && $b['median'] > 0 ? $a['median'] / $b['median'] : null;
    foreach ($sum as $client => $s) {
        $base = $sum['php-amqp'] ?? null;
        $sum[$client]['vs_php_amqp'] = ['rate' => $ratio($s['rate'], $base['rate'] ?? null),
            'cpu_us' => $ratio($s['cpu_us'], $base['cpu_us'] ?? null)];
        if (isset($s['p50_us'])) {
            $sum[$client]['vs_php_amqp']['p50_us'] = $ratio($s['p50_us'], $base['p50_us'] ?? null);
        }
    }
    $overhead = null;
    if (isset($sum['amqp_rs'], $sum['lapin'])) {
        $a = $sum['amqp_rs'];
        $l = $sum['lapin'];
        $overhead = ['cpu_us_diff' => $a['cpu_us']['median'] - $l['cpu_us']['median'], 'cpu_ratio' => $ratio($a['cpu_us'], $l['cpu_us']),
            'rate_ratio' => $ratio($a['rate'], $l['rate'])];
        if (isset($a['p50_us'])) {
            $overhead['p50_ratio'] = $ratio($a['p50_us'], $l['p50_us']);
            $overhead['p50_us_diff'] = $a['p50_us']['median'] - $l['p50_us']['median'];
        }
    }
    return ['summary' => $sum, 'amqp_rs_vs_lapin' => $overhead];
}

$now = date('c');
$machine = machine($so, $root);
$report = [];
if (is_file("$out/latest.json") && ($only !== null || isset($opts['report-only']))) {
    $report = json_decode((string) file_get_contents("$out/latest.json"), true) ?: [];
}
if (isset($opts['report-only']) && !isset($report['machine'])) {
    fwrite(STDERR, "--report-only: no $out/latest.json to report from\n");
    exit(2);
}
if (!isset($opts['report-only'])) {
    $report['when'] = $report['when'] ?? $now;
    $report['machine'] = $report['machine'] ?? $machine;
    if ($only === null) {
        $report = ['when' => $now, 'machine' => $machine];
    }
    $report['rounds'] = $report['rounds'] ?? $rounds;
    $report['clients'] = [
        'amqp_rs' => 'this extension (lapin inside, PHP API)',
        'php-amqp' => 'the C extension (librabbitmq)',
        'php-amqplib' => 'pure PHP',
        'raw' => 'AMQP written by hand on a socket: the broker\'s ceiling',
        'lapin' => 'lapin used directly from Rust (src/bin/lapin_baseline.rs): what amqp_rs costs on top of it',
    ];
    $report['method'] = 'median of the rounds (min-max beside it); each measurement a fresh process, clients in '
        . 'alternating order; CPU = user + system of the client process over the timed span, per message; '
        . 'peak RSS = ru_maxrss of the client process (wait4)';
    if ($only === null) {
        $report['load_average'] = ['before' => $loadBefore, 'after' => sh('cat /proc/loadavg')];
        $report['duration_s'] = round(microtime(true) - $started, 1);
        $report['notes'] = $notes;
    } else {
        // A note about a scenario run again ("E1: ...", "E1 not run: ...") is replaced by this run's.
        $kept = array_filter($report['notes'] ?? [], fn ($n) => !in_array(strtok($n, ' :'), $childrenRun, true));
        $report['notes'] = array_values(array_unique([...$kept, ...$notes]));
    }
    $report['failures'] = array_merge($only !== null ? array_values(array_filter($report['failures'] ?? [],
        fn ($f) => !isset($measured[$f['scenario']]) && !in_array($f['scenario'], $childrenRun, true))) : [], $failures);
    foreach ($measured as $name => $m) {
        if (!$m['clients']) {
            continue;
        }
        $report['scenarios'][$name] = ['what' => $m['what'], 'count' => $m['count'], 'size' => $m['size'],
            'rounds' => $m['rounds'], 'measured' => $now, 'commit' => $machine['commit']]
            + summarize($m) + ['raw_rounds' => $m['clients']];
    }
    $report['scenarios'] = $report['scenarios'] ?? [];
    // Keep the scenarios in their canonical order.
    $orderKeys = [...array_keys($scenarios), 'R1'];
    uksort($report['scenarios'], fn ($a, $b) => array_search($a, $orderKeys, true) <=> array_search($b, $orderKeys, true));
}
$report['M1'] = is_file("$out/m1-latest.json") ? json_decode((string) file_get_contents("$out/m1-latest.json"), true) : null;
$report['L1'] = $l1Mode !== 'off' && is_file("$out/laravel-latest.json")
    ? json_decode((string) file_get_contents("$out/laravel-latest.json"), true) : null;
$report['W'] = is_file("$out/web-latest.json") ? json_decode((string) file_get_contents("$out/web-latest.json"), true) : null;
$report['MICRO'] = is_file("$out/micro-latest.json") ? json_decode((string) file_get_contents("$out/micro-latest.json"), true) : null;
$report['E1'] = $e1Mode !== 'off' && is_file("$out/event-loop-latest.json")
    ? json_decode((string) file_get_contents("$out/event-loop-latest.json"), true) : null;
$report['S1'] = $s1Mode !== 'off' && is_file("$out/symfony-latest.json")
    ? json_decode((string) file_get_contents("$out/symfony-latest.json"), true) : null;

@mkdir($out, 0777, true);
file_put_contents("$out/latest.json", json_encode($report, JSON_PRETTY_PRINT | JSON_UNESCAPED_SLASHES
    | JSON_UNESCAPED_UNICODE | JSON_PRESERVE_ZERO_FRACTION) . "\n");

// ---- latest.md ----

$fmtRate = fn (float $x) => $x >= 100 ? number_format($x) : sprintf('%.1f', $x);
$fmtUs = fn (float $x) => $x >= 100 ? number_format($x) : sprintf('%.2f', $x);
$fmtX = fn (?float $x) => $x === null ? '–' : sprintf('%.2f×', $x);
$range = fn (?array $s, callable $f) => $s ? $f($s['min']) . '–' . $f($s['max']) : '–';
$mb = fn (?array $s) => $s ? sprintf('%.1f', $s['median'] / 1024) : '–';
$m = $report['machine'];
$md = [];
$md[] = '# amqp_rs benchmarks';
$md[] = '';
$md[] = sprintf('Measured %s at commit `%s` on **%s** (%s): %s, %d cores, %s GB RAM, %s, kernel %s; PHP %s, RabbitMQ %s '
    . '(local, same machine); amqp_rs %s (lapin %s), php-amqp %s, php-amqplib %s. Medians of %d rounds, min–max beside them. '
    . 'Load average %s before the run, %s after: on a small or shared machine figures move by 10–30 %% between runs; '
    . 'read the ratios, not the last digit.',
    substr($report['when'], 0, 16), $m['commit'], $m['host'], $m['os'], $m['cpu'], $m['cores'], $m['ram_gb'],
    $m['virtual'] ? 'a virtual machine' : 'bare metal', $m['kernel'], $m['php'], $m['rabbitmq'], $m['versions']['amqp_rs'], $m['versions']['lapin'],
    $m['versions']['php-amqp'], $m['versions']['php-amqplib'], $report['rounds'],
    explode(' ', $report['load_average']['before'] ?? '?')[0], explode(' ', $report['load_average']['after'] ?? '?')[0]);
$md[] = '';
$md[] = 'Clients: ' . implode('; ', array_map(fn ($c, $w) => "**$c** $w", array_keys($report['clients']), $report['clients'])) . '.';
$md[] = '';
$md[] = 'Method: ' . $report['method'] . '.';
$md[] = '';
$md[] = '![throughput](throughput.png)';
$md[] = '';
$throughput = array_filter($report['scenarios'] ?? [], fn ($k) => $k !== 'R1', ARRAY_FILTER_USE_KEY);
if ($throughput) {
    $md[] = '## Throughput and client CPU (P: publish, C: consume)';
    $md[] = '';
    $md[] = '| scenario | client | msgs/s | min–max | vs php-amqp | CPU µs/msg | min–max | CPU vs php-amqp | peak RSS MB |';
    $md[] = '|---|---|--:|--:|--:|--:|--:|--:|--:|';
    foreach ($throughput as $name => $sc) {
        $first = true;
        foreach ($sc['summary'] as $client => $s) {
            $label = $first ? "**$name** " . number_format($sc['count']) . ' × ' . ($sc['size'] >= 1024 ? ($sc['size'] / 1024) . ' KB' : $sc['size'] . ' B') : '';
            $md[] = sprintf('| %s | %s | %s | %s | %s | %s | %s | %s | %s |', $label, $client === 'amqp_rs' ? '**amqp_rs**' : $client,
                $fmtRate($s['rate']['median']), $range($s['rate'], $fmtRate), $fmtX($s['vs_php_amqp']['rate']),
                $fmtUs($s['cpu_us']['median']), $range($s['cpu_us'], $fmtUs), $fmtX($s['vs_php_amqp']['cpu_us']), $mb($s['peak_rss_kb']));
            $first = false;
        }
    }
    $md[] = '';
    $md[] = 'What each scenario does: ' . implode('; ', array_map(fn ($k, $s) => "$k " . $s['what'], array_keys($throughput), $throughput)) . '. '
        . 'P1 has no confirms: its clock stops once the client has handed its last message to the socket (raw: once the '
        . 'broker has read it), so it measures buffering more than the broker and is the noisiest figure.';
    $md[] = '';
}
if (isset($report['scenarios']['R1'])) {
    $sc = $report['scenarios']['R1'];
    $md[] = sprintf('## R1: %s %s', number_format($sc['count']), $sc['what']);
    $md[] = '';
    $md[] = '![latency](latency.png)';
    $md[] = '';
    $md[] = '| client | calls/s | mean µs | p50 µs | p50 min–max | p99 µs | p99 min–max | p50 vs php-amqp | client CPU µs/call | server CPU µs/call | peak RSS MB |';
    $md[] = '|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|';
    foreach ($sc['summary'] as $client => $s) {
        $md[] = sprintf('| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |', $client === 'amqp_rs' ? '**amqp_rs**' : $client,
            $fmtRate($s['rate']['median']), $fmtUs($s['mean_us']['median']), $fmtUs($s['p50_us']['median']), $range($s['p50_us'], $fmtUs),
            $fmtUs($s['p99_us']['median']), $range($s['p99_us'], $fmtUs), $fmtX($s['vs_php_amqp']['p50_us'] ?? null),
            $fmtUs($s['cpu_us']['median']), $fmtUs($s['server_cpu_us']['median']), $mb($s['peak_rss_kb']));
    }
    $md[] = '';
}
$overheads = array_filter($report['scenarios'] ?? [], fn ($sc) => $sc['amqp_rs_vs_lapin'] !== null);
if ($overheads) {
    $md[] = '## What the PHP layer costs: amqp_rs against lapin used directly';
    $md[] = '';
    $md[] = 'The same scenarios with lapin driven from Rust (src/bin/lapin_baseline.rs: one Tokio worker thread; it awaits '
        . 'each `basic_publish` (until the io-loop has written its frames) and each `ack`, one by one). That is lapin used '
        . 'the plain way, not a floor: amqp_rs hands each publish to the io-loop without waiting for the write and '
        . 'batches acks (`multiple`), so where it is below lapin, that is why. CPU difference = amqp_rs − lapin, µs per '
        . 'message (R1: per call); negative: amqp_rs used less.';
    $md[] = '';
    $md[] = '| scenario | amqp_rs CPU µs/msg | lapin CPU µs/msg | difference µs | CPU ratio | amqp_rs msgs/s | lapin msgs/s | throughput ratio |';
    $md[] = '|---|--:|--:|--:|--:|--:|--:|--:|';
    foreach ($overheads as $name => $sc) {
        $o = $sc['amqp_rs_vs_lapin'];
        $a = $sc['summary']['amqp_rs'];
        $l = $sc['summary']['lapin'];
        $md[] = sprintf('| %s | %s | %s | %+.2f | %s | %s | %s | %s |', $name, $fmtUs($a['cpu_us']['median']), $fmtUs($l['cpu_us']['median']),
            $o['cpu_us_diff'], $fmtX($o['cpu_ratio']), $fmtRate($a['rate']['median']), $fmtRate($l['rate']['median']), $fmtX($o['rate_ratio']));
    }
    if (isset($overheads['R1']['amqp_rs_vs_lapin']['p50_ratio'])) {
        $o = $overheads['R1']['amqp_rs_vs_lapin'];
        $md[] = '';
        $md[] = sprintf('R1 latency: amqp_rs p50 %s lapin\'s (%+.0f µs).', $fmtX($o['p50_ratio']), $o['p50_us_diff']);
    }
    $md[] = '';
}
if ($report['M1']) {
    $m1 = $report['M1'];
    $md[] = sprintf('## M1: worker RSS over %s messages (measured %s; opt-in: `--only=M1`)', number_format($m1['count']), substr($m1['when'], 0, 16));
    $md[] = '';
    $md[] = '| client | msgs/s | warm MB | end MB | growth MB | RSS by tenth, MB |';
    $md[] = '|---|--:|--:|--:|--:|---|';
    foreach ($m1['clients'] as $client => $r) {
        $tenths = array_map(fn ($kb) => $kb / 1024, $r['rss_kb']);
        $md[] = sprintf('| %s | %s | %.1f | %.1f | %+.2f | %s |', $client, $fmtRate($r['rate']), $tenths[0], end($tenths),
            end($tenths) - $tenths[0], implode(' ', array_map(fn ($x) => sprintf('%.1f', $x), $tenths)));
    }
    $md[] = '';
}
/** The markdown table of a framework bench's JSON (L1, S1): its config, then medians (min–max). */
function frameworkTable(array $bench, string $title, string $first): array
{
    $md = [sprintf('## %s (measured %s)', $title, substr($bench['when'] ?? '?', 0, 16)), ''];
    if (isset($bench['config'])) {
        $md[] = implode('; ', array_map(fn ($k, $v) => "$k: " . (is_scalar($v) ? $v : json_encode($v)), array_keys($bench['config']), $bench['config'])) . '.';
        $md[] = '';
    }
    $keys = array_keys(reset($bench['medians']));
    $md[] = "| $first | " . implode(' | ', array_map(fn ($k) => str_replace('_', ' ', $k), $keys)) . ' |';
    $md[] = '|---|' . str_repeat('--:|', count($keys));
    foreach ($bench['medians'] as $name => $row) {
        $cells = [];
        foreach ($keys as $k) {
            $v = $row[$k] ?? null;
            $col = array_column($bench['rounds'][$name] ?? [], $k);
            $num = fn ($x) => is_numeric($x) ? ($x >= 100 ? number_format((float) $x) : (string) round((float) $x, 3)) : (string) $x;
            $cells[] = $v === null ? '–' : $num($v) . (count($col) > 1 ? ' (' . $num(min($col)) . '–' . $num(max($col)) . ')' : '');
        }
        $md[] = "| $name | " . implode(' | ', $cells) . ' |';
    }
    $md[] = '';
    return $md;
}
if ($report['L1'] && isset($report['L1']['medians'])) {
    array_push($md, ...frameworkTable($report['L1'], 'L1: Laravel `queue:work`, amqp-rs driver against the database driver', 'driver'));
}
if (($report['S1'] ?? null) && isset($report['S1']['medians'])) {
    array_push($md, ...frameworkTable($report['S1'], "S1: Symfony `messenger:consume`, amqp-rs transport against Symfony's AMQP and Doctrine transports", 'transport'));
}
if (($report['E1'] ?? null) && ($report['E1']['medians'] ?? [])) {
    array_push($md, ...e1_markdown($report['E1']));
}
require_once __DIR__ . '/report_web.php';
if ($report['W'] && ($report['W']['scenarios'] ?? [])) {
    array_push($md, ...[...web_markdown($report['W']), '']);
}
if ($report['MICRO'] && ($report['MICRO']['summary'] ?? [])) {
    array_push($md, ...micro_markdown($report['MICRO']));
}
$stale = array_filter($report['scenarios'] ?? [], fn ($sc) => substr($sc['measured'], 0, 16) !== substr($report['when'], 0, 16));
if ($stale) {
    $md[] = 'Measured in a later run (`--only`): ' . implode(', ', array_map(fn ($k, $sc) => "$k " . substr($sc['measured'], 0, 16)
        . " at {$sc['commit']}", array_keys($stale), $stale)) . '.';
    $md[] = '';
}
if ($report['failures'] ?? []) {
    $md[] = '## Failed checks (left out of the figures above)';
    $md[] = '';
    foreach ($report['failures'] as $f) {
        $md[] = "- {$f['scenario']} {$f['client']} round {$f['round']}: " . str_replace("\n", ' ', $f['error']);
    }
    $md[] = '';
}
foreach ($report['notes'] ?? [] as $note) {
    $md[] = "Note: $note";
    $md[] = '';
}
$md[] = sprintf('Full run: %.0f s. Written by `php benches/run.php` (`make bench`); the figures, every round included, are in latest.json.',
    $report['duration_s'] ?? 0);
file_put_contents("$out/latest.md", implode("\n", $md) . "\n");

// ---- Charts: another process, for PHP's GD (not loaded by `php -n`, maybe not at all). ----

$chart = [PHP_BINARY, __DIR__ . '/chart.php', "$out/latest.json", $out];
if (!extension_loaded('gd')) {
    array_splice($chart, 1, 0, ['-d', 'extension=gd.so']);
}
exec(implode(' ', array_map('escapeshellarg', $chart)) . ' 2>&1', $chartOut, $chartCode);
echo implode("\n", $md), "\n\n";
echo $chartCode === 0 ? implode("\n", $chartOut) . "\n" : "charts not drawn ($chartCode): " . implode(' ', $chartOut) . "\n";
echo "wrote $out/latest.json, $out/latest.md\n";
exit($failures ? 1 : 0);
