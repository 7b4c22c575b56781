<?php
// W1 for amqp_rs: connect, publish one persistent message, wait for its confirm, end.
require __DIR__ . '/common.php';
$conn = new AmqpRs\Connection($uri, $persistent ? ['persistent' => true] : []);
$producer = $conn->producer();
$producer->publish(BODY, $queue, '', ['delivery_mode' => 2]);
$producer->waitForConfirms(5.0);
if (!$persistent) {
    $conn->close();
}
echo 'ok';
