<?php
// Task queue, worker side: handles tasks from the three task queues, one at a time.
//
// Start as many as you like, on as many machines as you like; the broker hands each task to
// one worker. prefetch 1 gives a worker one task at a time (per queue), so a slow task does not
// hold others back. A task is acked only when its handler returns: kill a worker (even with
// kill -9) in the middle of a task and the broker hands that task to another worker, marked
// redelivered. A handler that throws has its task retried after 1 s, then 2 s; then the task
// goes to the dead-letter queue "<prefix>.tasks.<type>.dead" with the reason in its headers.
//
//   php examples/tasks/worker.php [--work-ms=500] [--fail=report] [--retry-delay=1] [--idle=10] [--max-time=3600]
//
// --work-ms: how long a task takes; --fail=TYPE: pretend the service behind TYPE is down (its
// tasks fail, are retried, then dead-lettered); the worker exits after --idle seconds without
// a task or after --max-time seconds, and on SIGTERM/SIGINT once the task in hand is done.
// AMQP_URI and AMQP_PREFIX as for producer.php.

declare(strict_types=1);

use AmqpRs\Message;

$opt = getopt('', ['work-ms:', 'fail:', 'retry-delay:', 'idle:', 'max-time:'])
    + ['work-ms' => 500, 'fail' => '', 'retry-delay' => 1.0, 'idle' => 10, 'max-time' => 3600];
$uri = getenv('AMQP_URI') ?: 'amqp://guest:guest@127.0.0.1:5672/%2f';
$prefix = getenv('AMQP_PREFIX') ?: 'example';
$me = 'worker ' . getmypid();

$conn = new AmqpRs\Connection($uri, ['name' => $me]);
$conn->declareExchange("$prefix.tasks", 'direct');
$queues = [];
foreach (['email', 'image', 'report'] as $type) {
    $queues[] = $conn->declareQueue("$prefix.tasks.$type");
    $conn->bindQueue("$prefix.tasks.$type", "$prefix.tasks", $type);
}

$handlers = [
    'email' => fn (array $task) => usleep((int) $opt['work-ms'] * 1000),    // send the e-mail
    'image' => fn (array $task) => usleep((int) $opt['work-ms'] * 1000),    // resize the image
    'report' => fn (array $task) => usleep((int) $opt['work-ms'] * 1000),   // render the report
];
if ($opt['fail'] !== '') {
    $handlers[$opt['fail']] = fn (array $task) => throw new RuntimeException("the {$opt['fail']} service is down");
}

$consumer = $conn->consumer($queues, ['prefetch' => 1]);
echo "$me: waiting for tasks on ", implode(', ', $queues), "\n";

$handled = $consumer->consume(function (Message $m) use ($handlers, $me) {
    $task = $m->json();
    echo "$me: start task {$task['id']} ({$task['type']}), attempt {$m->getAttempt()}",
        $m->isRedelivered() ? ', redelivered' : '', "\n";
    try {
        $handlers[$task['type']]($task);
    } catch (Throwable $e) {
        echo "$me: task {$task['id']} failed: {$e->getMessage()}\n";
        throw $e;                                   // on_error 'retry' takes it from here
    }
    echo "$me: done task {$task['id']} ({$task['type']})\n";
    // returning acks the task
}, [
    'on_error' => 'retry',                          // retried after retry_delay, doubling,
    'max_retries' => 2,                             // then dead-lettered to <queue>.dead
    'retry_delay' => (float) $opt['retry-delay'],
    'idle_timeout' => (float) $opt['idle'],
    'max_time' => (float) $opt['max-time'],
]);
echo "$me: handled $handled deliveries, exiting\n";
$conn->close();
