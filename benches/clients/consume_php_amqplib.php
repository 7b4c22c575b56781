<?php
// Consumer side of C1 and C2 for php-amqplib (pure PHP). Args: scenario count queue.
require __DIR__ . '/common.php';
require '/usr/share/php/PhpAmqpLib/autoload.php';

use PhpAmqpLib\Connection\AMQPStreamConnection;
use PhpAmqpLib\Message\AMQPMessage;

[$_, $scenario, $count, $queue] = $argv;
$count = (int) $count;
$conn = new AMQPStreamConnection('127.0.0.1', 5672, 'guest', 'guest');
$ch = $conn->channel();
$autoAck = $scenario === 'C2';
$ch->basic_qos(null, 500, null);
$n = 0;
$start = hrtime(true);
$r0 = getrusage();
$ch->basic_consume($queue, '', false, $autoAck, false, false, function (AMQPMessage $m) use ($autoAck, &$n, &$last) {
    if (!$autoAck) {
        $m->ack();
    }
    $n++;
    $last = hrtime(true);
});
while ($n < $count) {
    $ch->wait();
}
$end = hrtime(true);
$r1 = getrusage();
$conn->close();
echo json_encode([
    'elapsed' => ($end - $start) / 1e9, 'cpu_us' => cpu_us($r0, $r1), 'handled' => $n, 'seen' => $n,
    'tail_ms' => ($end - $last) / 1e6, 'rss_kb' => [],
]), "\n";
