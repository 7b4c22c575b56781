<?php
// Execution node for the dispatch centre (examples/dispatch/dispatcher.php): takes tasks from
// the shared task queue one at a time, runs them, and answers each with Message::reply():
// {"task_id", "status": "done"|"failed", "result" | "error", "node", "ms"} as JSON, to the
// dispatcher's reply_to, with the task id as correlation_id.
//
// The task is acked after the reply is confirmed by the broker (the callback returns): a node
// that dies in between leaves the task to another node, and the dispatcher gets a second
// result with the same id, which it ignores. A node that sees a message_id again (a
// redelivery) skips the work and replies with what it had.
//
//   php -d extension=target/release/libamqp_rs.so examples/dispatch/node.php [--name=node-1] [--idle=20] [--queue=examples.dispatch.tasks]
//
// Start one or more, then the dispatcher. The broker is AMQP_URI (default
// amqp://guest:guest@127.0.0.1:5672/%2f). A node stops by itself after --idle seconds without
// a task (default 20), after 10 minutes, or on SIGTERM/Ctrl-C.
declare(strict_types=1);

use AmqpRs\Connection;
use AmqpRs\Message;

$uri = getenv('AMQP_URI') ?: 'amqp://guest:guest@127.0.0.1:5672/%2f';
$opts = getopt('', ['name:', 'idle:', 'queue:']);
$name = $opts['name'] ?? 'node-' . getmypid();
$idle = (float) ($opts['idle'] ?? 20);
$taskQueue = $opts['queue'] ?? 'examples.dispatch.tasks';

/** Runs one task; throws for a task that fails. */
function run_task(string $type, array $params): mixed
{
    return match ($type) {
        'sum' => array_sum($params['numbers']),
        'hash' => hash($params['algo'], $params['text']),
        'resize' => ['width' => (int) ($params['width'] * $params['scale']), 'height' => (int) ($params['height'] * $params['scale'])],
        'divide' => $params['b'] == 0 ? throw new DomainException('division by zero') : $params['a'] / $params['b'],
        default => throw new DomainException("unknown task type '$type'"),
    };
}

$conn = new Connection($uri, ['name' => "dispatch $name"]);
$conn->declareQueue($taskQueue);
$consumer = $conn->consumer($taskQueue, ['prefetch' => 1]);
echo "$name: waiting for tasks on '$taskQueue'\n";

$answered = [];                                    // message_id => reply, for redeliveries
$handled = $consumer->consume(function (Message $m) use ($name, &$answered) {
    $id = (string) $m->getMessageId();
    if (isset($answered[$id])) {
        $m->reply($answered[$id], ['content_type' => 'application/json']);
        echo "$name: task $id seen before, result sent again\n";
        return;
    }
    try {
        $task = $m->json();
    } catch (AmqpRs\Exception $e) {
        $m->reject();                              // not a task: dead-lettered or dropped
        echo "$name: message $id is not JSON, rejected\n";
        return;
    }
    $started = hrtime(true);
    usleep(random_int(20, 120) * 1000);            // the work takes a while
    try {
        $out = ['status' => 'done', 'result' => run_task($task['type'], $task['params'])];
    } catch (Throwable $e) {
        $out = ['status' => 'failed', 'error' => $e->getMessage()];
    }
    $ms = (hrtime(true) - $started) / 1e6;
    $reply = json_encode(['task_id' => $task['task_id']] + $out + ['node' => $name, 'ms' => round($ms)]);
    $m->reply($reply, ['content_type' => 'application/json']);
    $answered[$id] = $reply;
    printf("%s: task %s (%s) %s in %.0f ms\n", $name, $id, $task['type'], $out['status'], $ms);
}, ['idle_timeout' => $idle, 'max_time' => 600]);

echo "$name: handled $handled tasks, stopping\n";
$conn->close();
