<?php
// Client side of R1 for php-amqplib, its classic RPC (as in the RabbitMQ tutorial): an
// exclusive server-named reply queue consumed with no-ack, a correlation id per call, and
// wait() until the reply with that id has arrived. Args: scenario count queue. Prints JSON.
require __DIR__ . '/common.php';
require '/usr/share/php/PhpAmqpLib/autoload.php';

use PhpAmqpLib\Connection\AMQPStreamConnection;
use PhpAmqpLib\Message\AMQPMessage;

[$_, $scenario, $count, $queue] = $argv;
$count = (int) $count;
$body = str_repeat('x', 100);
$conn = new AMQPStreamConnection('127.0.0.1', 5672, 'guest', 'guest');
$ch = $conn->channel();
[$replyQueue] = $ch->queue_declare('', false, false, true, false);
$reply = null;
$corr = '';
$ch->basic_consume($replyQueue, '', false, true, false, false, function (AMQPMessage $m) use (&$reply, &$corr) {
    if ($m->get('correlation_id') === $corr) {
        $reply = $m;
    }
});
$n = 0;
$call = function () use ($ch, $body, $queue, $replyQueue, &$reply, &$corr, &$n): void {
    $corr = 'c' . ++$n;
    $reply = null;
    $ch->basic_publish(new AMQPMessage($body, ['correlation_id' => $corr, 'reply_to' => $replyQueue]), '', $queue);
    while ($reply === null) {
        $ch->wait(null, false, 5.0);
    }
    if ($reply->getBody() !== $body) {
        throw new RuntimeException('a reply that is not the echo of its request');
    }
};
rpc_measure($call, $count);
$conn->close();
