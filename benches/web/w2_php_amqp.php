<?php
// W2 for php-amqp, the classic RPC of the RabbitMQ tutorial, as in R1: an exclusive,
// auto-delete, server-named reply queue (gone with the channel at request end, also on a
// pconnect() connection), consumed with auto-ack, a correlation id, wait for the reply.
require __DIR__ . '/common.php';
$conn = new AMQPConnection(['host' => $host, 'port' => $port, 'login' => 'guest', 'password' => 'guest', 'read_timeout' => 5]);
$persistent ? $conn->pconnect() : $conn->connect();
$ch = new AMQPChannel($conn);
$replies = new AMQPQueue($ch);
$replies->setFlags(AMQP_EXCLUSIVE | AMQP_AUTODELETE);
$replies->declareQueue();
$replies->consume(null, AMQP_AUTOACK);
$ex = new AMQPExchange($ch);
$ex->setName('');
$corr = bin2hex(random_bytes(8));
$ex->publish(BODY, $queue, AMQP_NOPARAM, ['correlation_id' => $corr, 'reply_to' => $replies->getName()]);
$reply = null;
$replies->consume(function (AMQPEnvelope $env) use ($corr, &$reply) {
    if ($env->getCorrelationId() !== $corr) {
        return true;
    }
    $reply = $env->getBody();
    return false;
}, AMQP_JUST_CONSUME);
if ($reply !== BODY) {
    throw new RuntimeException('a reply that is not the echo of the request');
}
if (!$persistent) {
    $conn->disconnect();
}
echo 'ok';
