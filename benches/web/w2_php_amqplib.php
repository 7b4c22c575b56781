<?php
// W2 for php-amqplib, the classic RPC of the RabbitMQ tutorial, as in R1: an exclusive
// server-named reply queue consumed with no-ack, a correlation id, wait() for the reply.
require __DIR__ . '/common.php';
require '/usr/share/php/PhpAmqpLib/autoload.php';
$conn = new PhpAmqpLib\Connection\AMQPStreamConnection($host, $port, 'guest', 'guest');
$ch = $conn->channel();
[$replyQueue] = $ch->queue_declare('', false, false, true, true);
$corr = bin2hex(random_bytes(8));
$reply = null;
$ch->basic_consume($replyQueue, '', false, true, false, false, function ($m) use ($corr, &$reply) {
    if ($m->get('correlation_id') === $corr) {
        $reply = $m->getBody();
    }
});
$ch->basic_publish(new PhpAmqpLib\Message\AMQPMessage(BODY, ['correlation_id' => $corr, 'reply_to' => $replyQueue]), '', $queue);
while ($reply === null) {
    $ch->wait(null, false, 5.0);
}
$conn->close();
if ($reply !== BODY) {
    throw new RuntimeException('a reply that is not the echo of the request');
}
echo 'ok';
