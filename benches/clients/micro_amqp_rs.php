<?php
// Micro figures for amqp_rs (benches/micro.php), in one process that loads only amqp_rs: RSS
// and threads once loaded, after a first connection, after 4 more; then the medians of a
// round trip (queueStatus(), a passive declare), of connect + close, of opening a producer (a
// channel in confirm mode) while the earlier ones are held, and of opening and dropping one.
// Args: uri queue. Prints JSON.
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
// Each open while the earlier producers are held: a new channel in confirm mode every time.
$held = [];
$out['producer_new_us'] = median_us(function () use ($conn, &$held) {
    $held[] = $conn->producer();
}, 100, 0);
$held = [];
// What a request does: open, publish nothing, drop (a clean drop may leave the channel for the
// next producer to reuse).
$out['producer_us'] = median_us(function () use ($conn) {
    $producer = $conn->producer();
    unset($producer);
}, 200, 20);
$conn->deleteQueue($queue);
$conn->close();
echo json_encode($out), "\n";
