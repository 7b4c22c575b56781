<?php
// Client side of R1 for php-amqp (the C extension), its classic RPC: an exclusive
// server-named reply queue, consumed with auto-ack (basic.consume once, then consume() with
// AMQP_JUST_CONSUME to wait), a correlation id per call. Args: scenario count queue. Prints JSON.
require __DIR__ . '/common.php';
[$_, $scenario, $count, $queue] = $argv;
$count = (int) $count;
$body = str_repeat('x', 100);
$conn = new AMQPConnection(['host' => '127.0.0.1', 'port' => 5672, 'login' => 'guest', 'password' => 'guest',
    'read_timeout' => 5]);
$conn->connect();
$ch = new AMQPChannel($conn);
$replies = new AMQPQueue($ch);
$replies->setFlags(AMQP_EXCLUSIVE);
$replies->declareQueue();
$replyQueue = $replies->getName();
$replies->consume(null, AMQP_AUTOACK);    // basic.consume only
$ex = new AMQPExchange($ch);
$ex->setName('');
$n = 0;
$call = function () use ($ex, $replies, $body, $queue, $replyQueue, &$n): void {
    $corr = 'c' . ++$n;
    $ex->publish($body, $queue, AMQP_NOPARAM, ['correlation_id' => $corr, 'reply_to' => $replyQueue]);
    $reply = null;
    // The callback answering false makes consume() return.
    $replies->consume(function (AMQPEnvelope $env) use ($corr, &$reply) {
        if ($env->getCorrelationId() !== $corr) {
            return true;
        }
        $reply = $env;
        return false;
    }, AMQP_JUST_CONSUME);
    if ($reply->getBody() !== $body) {
        throw new RuntimeException('a reply that is not the echo of its request');
    }
};
rpc_measure($call, $count);
$conn->disconnect();
