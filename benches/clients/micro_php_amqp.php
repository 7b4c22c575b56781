<?php
// Micro figures for php-amqp (benches/micro.php), the same as micro_amqp_rs.php: a round trip
// is a passive declareQueue() (AMQP_PASSIVE), what queueStatus() sends; a connection is ready
// once it has a channel (php-amqp needs one for any method); a producer is a new AMQPChannel
// with confirmSelect(), dropped. Args: uri queue (the URI's host and port are used). Prints JSON.
require __DIR__ . '/common.php';
[, $uri, $queue] = $argv;
$parts = parse_url($uri);
$params = ['host' => $parts['host'], 'port' => $parts['port'] ?? 5672, 'login' => 'guest', 'password' => 'guest', 'read_timeout' => 5];
$open = function () use ($params, $queue): AMQPQueue {
    $conn = new AMQPConnection($params);
    $conn->connect();
    $q = new AMQPQueue(new AMQPChannel($conn));
    $q->setName($queue);
    $q->setFlags(AMQP_PASSIVE);
    return $q;
};
$out = ['rss_loaded_kb' => rss_kb(), 'threads_loaded' => threads()];
$first = $open();
$declare = new AMQPQueue($first->getChannel());
$declare->setName($queue);
$declare->declareQueue();
$out += ['rss_first_kb' => rss_kb(), 'threads_first' => threads()];
$more = [];
for ($i = 0; $i < 4; $i++) {
    $more[$i] = $open();
    $more[$i]->declareQueue();
}
$out += ['rss_more_kb' => rss_kb(), 'threads_more' => threads()];
foreach ($more as $q) {
    $q->getConnection()->disconnect();
}
$out['round_trip_us'] = median_us(fn () => $first->declareQueue(), 2000, 200);
$out['connect_close_us'] = median_us(function () use ($params) {
    $c = new AMQPConnection($params);
    $c->connect();
    $c->disconnect();
}, 30, 3);
$conn = $first->getConnection();
$held = [];
$out['producer_new_us'] = median_us(function () use ($conn, &$held) {
    $held[] = $ch = new AMQPChannel($conn);
    $ch->confirmSelect();
}, 100, 0);
$held = [];
$out['producer_us'] = median_us(function () use ($conn) {
    $ch = new AMQPChannel($conn);
    $ch->confirmSelect();
    unset($ch);
}, 200, 20);
$declare->delete();
$conn->disconnect();
echo json_encode($out), "\n";
