<?php
// W1 for php-amqplib: connect, a channel in confirm mode, publish one persistent message, wait
// for its confirm, close. (php-amqplib has no connection that outlives the request.)
require __DIR__ . '/common.php';
require '/usr/share/php/PhpAmqpLib/autoload.php';
$conn = new PhpAmqpLib\Connection\AMQPStreamConnection($host, $port, 'guest', 'guest');
$ch = $conn->channel();
$ch->confirm_select();
$nacked = false;
$ch->set_nack_handler(function () use (&$nacked) {
    $nacked = true;
});
$ch->basic_publish(new PhpAmqpLib\Message\AMQPMessage(BODY, ['delivery_mode' => 2]), '', $queue);
$ch->wait_for_pending_acks(5.0);
$conn->close();
if ($nacked) {
    throw new RuntimeException('nacked');
}
echo 'ok';
