<?php
// Task queue, producer side: queues --count tasks, routed by type to one durable queue per type.
//
// A direct exchange "<prefix>.tasks" routes each task by its type (email, image, report) to the
// durable queue "<prefix>.tasks.<type>"; tasks are persistent (the default) and confirmed by the
// broker, so a task that was queued survives a broker restart and any worker's death.
//
//   php examples/tasks/producer.php [--count=12]
//
// Then start workers (examples/tasks/worker.php). AMQP_URI (default amqp://guest:guest@127.0.0.1:5672/%2f)
// picks the broker, AMQP_PREFIX (default "example") prefixes every name.

declare(strict_types=1);

$opt = getopt('', ['count:']) + ['count' => 12];
$uri = getenv('AMQP_URI') ?: 'amqp://guest:guest@127.0.0.1:5672/%2f';
$prefix = getenv('AMQP_PREFIX') ?: 'example';

$conn = new AmqpRs\Connection($uri, ['name' => 'task producer']);

// Producer and workers both declare the topology: whichever starts first creates it.
$conn->declareExchange("$prefix.tasks", 'direct');
foreach (['email', 'image', 'report'] as $type) {
    $conn->declareQueue("$prefix.tasks.$type");                 // durable by default
    $conn->bindQueue("$prefix.tasks.$type", "$prefix.tasks", $type);
}

$producer = $conn->producer(['mandatory' => true]);             // a task no queue takes is an error
$types = ['email', 'image', 'report'];
for ($id = 1; $id <= (int) $opt['count']; $id++) {
    $type = $types[($id - 1) % count($types)];
    $producer->publishJson(
        ['id' => $id, 'type' => $type, 'args' => ['to' => "user$id@example.com"]],
        $type,                                                   // the routing key picks the queue
        "$prefix.tasks",
        ['message_id' => "task-$id"],
    );
    echo "queued task $id ($type)\n";
}
$producer->waitForConfirms(10);                                  // throws if the broker refused any
echo "all {$opt['count']} tasks confirmed by the broker\n";
$conn->close();
