<?php
// W2 for amqp_rs: connect, one Connection::rpc() (direct reply-to) to the bench's server, end.
require __DIR__ . '/common.php';
$conn = new AmqpRs\Connection($uri, $persistent ? ['persistent' => true] : []);
if ($conn->rpc(BODY, $queue, '', [], 5.0)->getBody() !== BODY) {
    throw new RuntimeException('a reply that is not the echo of the request');
}
if (!$persistent) {
    $conn->close();
}
echo 'ok';
