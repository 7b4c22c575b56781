<?php
// Micro figures for amqp_rs (benches/micro.php), in one process that loads only amqp_rs: RSS
// and threads once loaded, after a first connection, after 4 more; then the medians of a
// round trip (queueStatus(), a passive declare), of connect + close, and of opening and
// dropping a producer (a channel in confirm mode). Args: uri queue. Prints JSON.
require __DIR__ . '/common.php';
[, $uri, $queue] = $argv;
$out = ['rss_loaded_kb' => rss_kb(), 'threads_loaded' => threads()];
$conn = new AmqpRs\Connection($uri);
$conn->declareQueue($queue, ['durable' => false]);
$out += ['rss_first_kb' => rss_kb(), 'threads_first' => threads()];
$more = [];
for ($i = 0; $i < 4; $i++) {
    $more[$i] = new AmqpRs\Connection($uri);
    $more[$i]->queueStatus($queue);
}
$out += ['rss_more_kb' => rss_kb(), 'threads_more' => threads()];
foreach ($more as $c) {
    $c->close();
}
$out['round_trip_us'] = median_us(fn () => $conn->queueStatus($queue), 2000, 200);
$out['connect_close_us'] = median_us(function () use ($uri) {
    (new AmqpRs\Connection($uri))->close();
}, 30, 3);
$out['producer_us'] = median_us(function () use ($conn) {
    $producer = $conn->producer();
    unset($producer);
}, 200, 20);
$conn->deleteQueue($queue);
$conn->close();
echo json_encode($out), "\n";
