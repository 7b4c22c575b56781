<?php
// Event-driven system, publisher side: publishes --count events on the topic exchange
// "<prefix>.events", the event's name as routing key: order.created, order.paid, user.signed_up.
//
// The publisher does not know who listens: each consumer group (examples/events/subscriber.php)
// binds its own queue with the patterns it cares about. stamp_message_id gives every event a
// UUID message_id, by which subscribers recognise an event they have handled already.
//
//   php examples/events/publisher.php [--count=9] [--duplicate] [--bad=0]
//
// --duplicate: also publish one event twice with the same message_id, as a publisher does that
// republishes an event it is unsure about (docs/recovery.md); subscribers handle it once.
// --bad=N: also publish N order.created events with a negative amount, which handlers reject:
// they are retried, then dead-lettered.
// Start the subscribers first: a topic exchange drops events no queue is bound for.
// AMQP_URI (default amqp://guest:guest@127.0.0.1:5672/%2f) picks the broker, AMQP_PREFIX
// (default "example") prefixes every name.

declare(strict_types=1);

$opt = getopt('', ['count:', 'duplicate', 'bad:']) + ['count' => 9, 'bad' => 0];
$uri = getenv('AMQP_URI') ?: 'amqp://guest:guest@127.0.0.1:5672/%2f';
$prefix = getenv('AMQP_PREFIX') ?: 'example';

$conn = new AmqpRs\Connection($uri, ['name' => 'event publisher']);
$conn->declareExchange("$prefix.events", 'topic');
$producer = $conn->producer(['stamp_message_id' => true]);

/** Publishes one event; its name is the routing key (and the type property). */
$publish = function (string $name, array $data, array $properties = []) use ($producer, $prefix) {
    $producer->publishJson(['event' => $name] + $data, $name, "$prefix.events", ['type' => $name] + $properties);
    echo "published $name ", json_encode($data), "\n";
};

for ($n = 1; $n <= (int) $opt['count']; $n++) {
    match ($n % 3) {
        1 => $publish('order.created', ['n' => $n, 'order' => $n, 'amount' => 10 * $n]),
        2 => $publish('order.paid', ['n' => $n, 'order' => $n - 1]),
        0 => $publish('user.signed_up', ['n' => $n, 'email' => "user$n@example.com"]),
    };
}
if (isset($opt['duplicate'])) {
    // Republishing keeps the message_id: that is what makes the copy recognisable.
    $id = bin2hex(random_bytes(8));
    $publish('order.paid', ['n' => 'dup', 'order' => 1], ['message_id' => $id]);
    $publish('order.paid', ['n' => 'dup', 'order' => 1], ['message_id' => $id]);
}
for ($i = 1; $i <= (int) $opt['bad']; $i++) {
    $publish('order.created', ['n' => "bad$i", 'order' => 900 + $i, 'amount' => -1]);
}
$producer->waitForConfirms(10);
echo "all events confirmed by the broker\n";
$conn->close();
