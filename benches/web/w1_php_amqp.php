<?php
// W1 for php-amqp: connect() or pconnect(), a channel in confirm mode, publish one persistent
// message, wait for its confirm, end (pconnect(): the connection stays in the worker).
require __DIR__ . '/common.php';
$conn = new AMQPConnection(['host' => $host, 'port' => $port, 'login' => 'guest', 'password' => 'guest', 'read_timeout' => 5]);
$persistent ? $conn->pconnect() : $conn->connect();
$ch = new AMQPChannel($conn);
$ch->confirmSelect();
$ch->setConfirmCallback(fn () => false, fn () => throw new RuntimeException('nacked'));
$ex = new AMQPExchange($ch);
$ex->setName('');
$ex->publish(BODY, $queue, AMQP_NOPARAM, ['delivery_mode' => 2]);
$ch->waitForConfirm(5.0);
if (!$persistent) {
    $conn->disconnect();
}
echo 'ok';
