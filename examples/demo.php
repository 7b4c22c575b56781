<?php
// make demo: connect, declare a small task-queue topology, show what the broker has, clean up.
// Later issues grow this into a producer/worker demo.

declare(strict_types=1);

use AmqpRs\Connection;

$uri = getenv('AMQP_URI') ?: 'amqp://guest:guest@127.0.0.1:5672/%2f';
$conn = new Connection($uri, ['name' => 'amqp_rs demo']);
printf("connected to %s: %s\n", preg_replace('/:[^:@\/]*@/', '@', $uri), $conn->isConnected() ? 'yes' : 'no');

$conn->declareExchange('demo.tasks', 'topic', ['durable' => false, 'auto_delete' => false]);
echo "declared exchange demo.tasks (topic)\n";

$queues = [
    'demo.tasks.images' => 'image.*',
    'demo.tasks.emails' => 'email.#',
];
foreach ($queues as $queue => $pattern) {
    $conn->declareQueue($queue, ['durable' => false, 'arguments' => ['x-max-length' => 1000]]);
    $conn->bindQueue($queue, 'demo.tasks', $pattern);
    echo "declared queue $queue, bound with '$pattern'\n";
}

$reply = $conn->declareQueue('', ['exclusive' => true, 'durable' => false]);
echo "declared a server-named reply queue: $reply\n";

try {
    $conn->declareQueue('demo.tasks.images', ['durable' => false, 'arguments' => ['x-max-length' => 5]]);
} catch (AmqpRs\ChannelException $e) {
    printf("redeclaring with other arguments is refused (%d): %s\n", $e->getCode(), $e->getMessage());
}

$producer = $conn->producer();
$started = microtime(true);
for ($i = 1; $i <= 1000; $i++) {
    $kind = $i % 2 ? 'image.resize' : 'email.welcome';
    $producer->publish(json_encode(['task' => $i, 'kind' => $kind]), $kind, 'demo.tasks', [
        'content_type' => 'application/json',
        'message_id' => "task-$i",
    ]);
}
$producer->waitForConfirms();
printf("published 1000 tasks, all confirmed, in %.0f ms\n", (microtime(true) - $started) * 1000);

$strict = $conn->producer(['mandatory' => true]);
$strict->publish('lost?', 'video.encode', 'demo.tasks', ['message_id' => 'task-video']);
try {
    $strict->waitForConfirms();
} catch (AmqpRs\PublishException $e) {
    foreach ($e->getFailures() as $f) {
        printf("not routed: %s (%s)\n", $f['message_id'], $f['reason']);
    }
}

foreach (array_keys($queues) as $queue) {
    $status = $conn->queueStatus($queue);
    printf("%s: %d messages, %d consumers\n", $queue, $status['messages'], $status['consumers']);
}

foreach (array_keys($queues) as $queue) {
    $conn->deleteQueue($queue);
}
$conn->deleteExchange('demo.tasks');
$conn->close();
echo "cleaned up and closed\n";
