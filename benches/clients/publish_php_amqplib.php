<?php
// Publisher side of P1-P3 for php-amqplib (pure PHP). Args: scenario count size queue.
require __DIR__ . '/common.php';
require '/usr/share/php/PhpAmqpLib/autoload.php';

use PhpAmqpLib\Connection\AMQPStreamConnection;
use PhpAmqpLib\Message\AMQPMessage;

[$_, $scenario, $count, $size, $queue] = $argv;
$count = (int) $count;
$conn = new AMQPStreamConnection('127.0.0.1', 5672, 'guest', 'guest');
$ch = $conn->channel();
if ($scenario !== 'P1') {
    $ch->confirm_select();
}
$msg = new AMQPMessage(str_repeat('x', (int) $size), ['delivery_mode' => AMQPMessage::DELIVERY_MODE_PERSISTENT]);
$start = hrtime(true);
$r0 = getrusage();
for ($i = 0; $i < $count; $i++) {
    $ch->basic_publish($msg, '', $queue);
    if ($scenario === 'P3') {
        $ch->wait_for_pending_acks(30);
    }
}
if ($scenario === 'P2') {
    $ch->wait_for_pending_acks(60);
}
$elapsed = (hrtime(true) - $start) / 1e9;
$r1 = getrusage();
$conn->close();
echo json_encode(['elapsed' => $elapsed, 'cpu_us' => cpu_us($r0, $r1)]), "\n";
