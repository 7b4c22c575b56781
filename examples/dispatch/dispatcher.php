<?php
// Dispatch centre: hands tasks to execution nodes (examples/dispatch/node.php) and collects
// their results: task id, type, status, params, result.
//
// Each task goes out with Producer::publishJson() to the shared task queue, with
//   message_id = correlation_id = its task id  (nodes and the dispatcher deduplicate by it),
//   reply_to = this dispatcher's own results queue (exclusive, gone when it exits),
//   expiration = the collection timeout (a task nobody waits for any more is not worth doing).
// The nodes take tasks one at a time (prefetch 1: a free node gets the next one) and answer
// with Message::reply(); the dispatcher reads the results as they come, with Message::json().
// It does not use Connection::rpc(): that waits for one reply at a time, here every task is in
// flight at once and the results come back in any order.
//
//   php -d extension=target/release/libamqp_rs.so examples/dispatch/node.php --name=node-1 &
//   php -d extension=target/release/libamqp_rs.so examples/dispatch/node.php --name=node-2 &
//   php -d extension=target/release/libamqp_rs.so examples/dispatch/dispatcher.php [--tasks=12] [--timeout=30] [--queue=examples.dispatch.tasks]
//
// The broker is AMQP_URI (default amqp://guest:guest@127.0.0.1:5672/%2f). Exits 0 once every
// result is in, 1 when the timeout ran out first (the missing tasks are listed).
declare(strict_types=1);

use AmqpRs\Connection;
use AmqpRs\Message;

$uri = getenv('AMQP_URI') ?: 'amqp://guest:guest@127.0.0.1:5672/%2f';
$opts = getopt('', ['tasks:', 'timeout:', 'queue:']);
$count = (int) ($opts['tasks'] ?? 12);
$timeout = (float) ($opts['timeout'] ?? 30);
$taskQueue = $opts['queue'] ?? 'examples.dispatch.tasks';

$conn = new Connection($uri, ['name' => 'dispatch centre']);
$conn->declareQueue($taskQueue);                       // durable: tasks wait for a node
$results = $conn->declareQueue('', ['exclusive' => true, 'durable' => false]);

// A mix of task types; some are meant to fail.
$kinds = [
    fn (int $i) => ['sum', ['numbers' => range(1, $i + 1)]],
    fn (int $i) => ['hash', ['text' => "document $i", 'algo' => 'sha256']],
    fn (int $i) => ['resize', ['width' => 100 * $i, 'height' => 50 * $i, 'scale' => 0.5]],
    fn (int $i) => ['divide', ['a' => $i, 'b' => intdiv($i, 4) % 2 * 2]],   // b = 0 for i = 3, 11...: fails
];
$tasks = [];
$producer = $conn->producer();
$run = bin2hex(random_bytes(3));
for ($i = 1; $i <= $count; $i++) {
    [$type, $params] = $kinds[$i % count($kinds)]($i);
    $id = sprintf('%s-%03d', $run, $i);
    $tasks[$id] = ['type' => $type, 'params' => $params];
    $producer->publishJson(['task_id' => $id, 'type' => $type, 'params' => $params], $taskQueue, '', [
        'message_id' => $id,
        'correlation_id' => $id,
        'reply_to' => $results,
        'type' => $type,
        'expiration' => (int) ($timeout * 1000),
    ]);
}
$producer->waitForConfirms();
printf("dispatcher: sent %d tasks to '%s', results come to %s\n", $count, $taskQueue, $results);

$done = [];
$started = microtime(true);
$consumer = $conn->consumer($results);
$consumer->consume(function (Message $m) use (&$done, $tasks, $consumer, $started) {
    $id = (string) $m->getCorrelationId();
    if (!isset($tasks[$id]) || isset($done[$id])) {
        // A node that died after replying but before its ack has the task again: same id.
        echo "dispatcher: duplicate or unknown result for '$id' ignored\n";
        return;
    }
    $done[$id] = $m->json();
    printf("dispatcher: [%2d/%d] %s %-6s %-7s by %s (%.0f ms)\n", count($done), count($tasks), $id,
        $tasks[$id]['type'], $done[$id]['status'], $done[$id]['node'], (microtime(true) - $started) * 1000);
    if (count($done) === count($tasks)) {
        $consumer->stop();
    }
}, ['max_time' => $timeout]);

echo "\n";
printf("%-10s  %-6s  %-7s  %-7s  %-38s  %s\n", 'task id', 'type', 'status', 'node', 'params', 'result');
foreach ($tasks as $id => $task) {
    $r = $done[$id] ?? ['status' => 'missing', 'node' => '-', 'result' => null, 'error' => 'no result in time'];
    $params = json_encode($task['params']);
    printf("%-10s  %-6s  %-7s  %-7s  %-38s  %s\n", $id, $task['type'], $r['status'], $r['node'],
        strlen($params) > 38 ? substr($params, 0, 35) . '...' : $params,
        $r['status'] === 'done' ? json_encode($r['result']) : $r['error']);
}
$statuses = array_count_values(array_column($done, 'status'));
printf("\ndispatcher: %d of %d results collected (%s) in %.2f s\n", count($done), count($tasks),
    implode(', ', array_map(fn ($s, $n) => "$n $s", array_keys($statuses), $statuses)) ?: 'none',
    microtime(true) - $started);
$conn->close();
exit(count($done) === count($tasks) ? 0 : 1);
