<?php
// Client side of R1 for amqp_rs: Connection::rpc() (direct reply-to), one call after the other.
// Args: scenario count queue. Prints JSON (latencies in µs).
require __DIR__ . '/common.php';
[$_, $scenario, $count, $queue] = $argv;
$count = (int) $count;
$body = str_repeat('x', 100);
$conn = new AmqpRs\Connection('amqp://guest:guest@127.0.0.1:5672/%2f');
$call = function () use ($conn, $body, $queue): void {
    if ($conn->rpc($body, $queue, '', [], 5.0)->getBody() !== $body) {
        throw new RuntimeException('a reply that is not the echo of its request');
    }
};
rpc_measure($call, $count);
$conn->close();
