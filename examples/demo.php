<?php
// make demo: two of the examples end to end, as real processes, with their output interleaved.
//
//  1. A task queue (examples/tasks): two workers, then a producer queuing 12 tasks routed by
//     type; the "report" service is made to fail, so its tasks are retried and dead-lettered.
//  2. A dispatch centre (examples/dispatch): two execution nodes, then a dispatcher handing
//     them 10 tasks and collecting every result (task id, type, status, params, result).
//
// Run with the extension loaded: php -d extension=target/release/libamqp_rs.so examples/demo.php
// The broker is AMQP_URI (default amqp://guest:guest@127.0.0.1:5672/%2f). Queues are named
// demo.* and deleted at the end. Exits non-zero when a step fails.

declare(strict_types=1);

$php = [PHP_BINARY, '-d', 'extension=' . (ini_get('extension') ?: 'amqp_rs')];
foreach (file('/proc/self/maps') ?: [] as $line) {
    if (preg_match('#\s(/\S*amqp_rs\S*\.so)$#', trim($line), $m)) {
        $php = [PHP_BINARY, '-d', "extension=$m[1]"];
        break;
    }
}
$env = ['AMQP_URI' => getenv('AMQP_URI') ?: 'amqp://guest:guest@127.0.0.1:5672/%2f', 'AMQP_PREFIX' => 'demo'] + getenv();
$dir = __DIR__;

/** Starts a background process whose lines are printed with a label; returns [proc, stdout]. */
function start(array $cmd, array $env, string $label): array
{
    $proc = proc_open($cmd, [1 => ['pipe', 'w'], 2 => ['pipe', 'w']], $pipes, null, $env);
    stream_set_blocking($pipes[1], false);
    stream_set_blocking($pipes[2], false);
    return ['proc' => $proc, 'out' => $pipes[1], 'err' => $pipes[2], 'label' => $label, 'buf' => ''];
}

/** Prints what the processes wrote so far, line by line; true while any is running. */
function pump(array &$procs): bool
{
    $running = false;
    foreach ($procs as &$p) {
        foreach (['out', 'err'] as $stream) {
            $p['buf'] .= (string) stream_get_contents($p[$stream]);
        }
        while (($nl = strpos($p['buf'], "\n")) !== false) {
            printf("  %-11s %s\n", $p['label'], substr($p['buf'], 0, $nl));
            $p['buf'] = substr($p['buf'], $nl + 1);
        }
        if (!isset($p['code'])) {
            // proc_get_status() gives the exit code once only: keep it.
            $status = proc_get_status($p['proc']);
            if (!$status['running']) {
                $p['code'] = $status['exitcode'];
            }
        }
        $running = $running || !isset($p['code']);
    }
    return $running;
}

/** Waits for the given processes (others keep printing), then returns their exit codes. */
function wait_for(array &$procs, array $labels, float $limit): array
{
    $deadline = microtime(true) + $limit;
    $codes = [];
    while (microtime(true) < $deadline) {
        pump($procs);
        foreach ($procs as $p) {
            if (in_array($p['label'], $labels, true) && isset($p['code'])) {
                $codes[$p['label']] = $p['code'];
            }
        }
        if (count($codes) === count($labels)) {
            return $codes;
        }
        usleep(50_000);
    }
    throw new RuntimeException('demo: ' . implode(', ', $labels) . " did not finish within {$limit} s");
}

$failed = false;

echo "== 1. task queue: 2 workers, 12 tasks routed by type; the report service is down ==\n";
$procs = [];
foreach ([1, 2] as $n) {
    $procs[] = start([...$php, "$dir/tasks/worker.php", '--work-ms=150', '--fail=report', '--retry-delay=0.5', '--idle=4'], $env, "worker-$n");
}
usleep(1_500_000);
$procs[] = start([...$php, "$dir/tasks/producer.php", '--count=12'], $env, 'producer');
$codes = wait_for($procs, ['producer', 'worker-1', 'worker-2'], 90);
foreach (array_filter($codes) as $label => $code) {
    echo "demo: $label exited with $code\n";
    $failed = true;
}

echo "\n== 2. dispatch centre: 2 execution nodes, 10 tasks, every result collected ==\n";
$procs = [];
foreach ([1, 2] as $n) {
    $procs[] = start([...$php, "$dir/dispatch/node.php", "--name=node-$n", '--idle=3', '--queue=demo.dispatch.tasks'], $env, "node-$n");
}
usleep(1_500_000);
$procs[] = start([...$php, "$dir/dispatch/dispatcher.php", '--tasks=10', '--timeout=30', '--queue=demo.dispatch.tasks'], $env, 'dispatcher');
$codes = wait_for($procs, ['dispatcher', 'node-1', 'node-2'], 90);
foreach (array_filter($codes) as $label => $code) {
    echo "demo: $label exited with $code\n";
    $failed = true;
}

// Clean up what the demo made (the examples keep their durable queues on purpose).
$conn = new AmqpRs\Connection($env['AMQP_URI'], ['reconnect' => false]);
$dead = $conn->queueStatus('demo.tasks.report.dead')['messages'];
echo "\n$dead report tasks were dead-lettered to demo.tasks.report.dead after 3 attempts\n";
foreach (['email', 'image', 'report'] as $type) {
    $conn->deleteQueue("demo.tasks.$type");
    $conn->deleteQueue("demo.tasks.$type.dead");
}
$conn->deleteQueue('demo.dispatch.tasks');
$conn->deleteExchange('demo.tasks');
$conn->close();
echo $failed ? "\ndemo: a step failed (see above)\n" : "\ndemo: done\n";
exit($failed ? 1 : 0);
