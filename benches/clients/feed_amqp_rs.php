<?php
// Fills the consumer scenarios' queue with amqp_rs, outside any timed part. Args: count size
// queue [max_depth]. With max_depth (M1) it feeds a running consumer and keeps the backlog
// under max_depth, so a million messages never sit in the broker at once.
[$_, $count, $size, $queue] = $argv;
$count = (int) $count;
$maxDepth = (int) ($argv[4] ?? 0);
$body = str_repeat('x', (int) $size);
$conn = new AmqpRs\Connection('amqp://guest:guest@127.0.0.1:5672/%2f');
$producer = $conn->producer();
$start = hrtime(true);
for ($i = 1; $i <= $count; $i++) {
    $producer->publish($body, $queue);
    if ($maxDepth && $i % 10_000 === 0) {
        $producer->waitForConfirms();
        while ($conn->queueStatus($queue)['messages'] > $maxDepth) {
            usleep(20_000);
        }
    }
}
$producer->waitForConfirms(120);
$depth = $conn->queueStatus($queue)['messages'];
$conn->close();
echo json_encode(['elapsed' => (hrtime(true) - $start) / 1e9, 'depth' => $depth]), "\n";
