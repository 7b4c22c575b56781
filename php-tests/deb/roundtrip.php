<?php
// Run by scripts/deb-test.sh inside the clean root, with the extension that the Debian package
// installed (no -d extension=...): connects to the host's broker, publishes with confirms and
// consumes the same messages back. Exit 0 and one line "roundtrip: ..." when all came back.
declare(strict_types=1);

$uri = getenv('AMQP_URI') ?: 'amqp://guest:guest@127.0.0.1:5672/%2f';
$count = 20;
$conn = new AmqpRs\Connection($uri, ['name' => 'amqp_rs deb test']);
// Exclusive: the broker deletes it when this connection goes, even if this script dies.
$queue = $conn->declareQueue('deb-test.' . getmypid() . '.' . bin2hex(random_bytes(4)), [
    'durable' => false,
    'exclusive' => true,
]);

$producer = $conn->producer(['confirms' => true]);
for ($i = 0; $i < $count; $i++) {
    $producer->publish("message $i", $queue, '', ['message_id' => "m$i"]);
}
$producer->waitForConfirms(10.0);
$unconfirmed = $producer->pendingConfirms();

$got = [];
$conn->consumer($queue, ['prefetch' => 5])->consume(function (AmqpRs\Message $m) use (&$got) {
    $got[] = $m->getBody();
}, ['max_messages' => $count, 'max_time' => 10.0]);

$want = array_map(fn ($i) => "message $i", range(0, $count - 1));
$left = $conn->queueStatus($queue)['messages'];
$conn->deleteQueue($queue);
$conn->close();

if ($got !== $want || $unconfirmed !== 0 || $left !== 0) {
    fwrite(STDERR, sprintf(
        "roundtrip failed: %d of %d consumed, %d unconfirmed, %d left in %s\n",
        count($got),
        $count,
        $unconfirmed,
        $left,
        $queue
    ));
    exit(1);
}
printf("roundtrip: %d published, all confirmed, %d consumed in order\n", $count, count($got));
