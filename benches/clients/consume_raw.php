<?php
// The broker's ceiling for C1 and C2: deliveries read off the socket with no client machinery,
// acks (C1) sent as one multiple ack per 100 deliveries. Args: scenario count queue.
require __DIR__ . '/common.php';
require __DIR__ . '/raw_amqp.php';
[$_, $scenario, $count, $queue] = $argv;
$count = (int) $count;
$autoAck = $scenario === 'C2';
$amqp = new RawAmqp();
$amqp->method(1, 60, 10, pack('Nnc', 0, 500, 0));
$amqp->expect(60, 11);
$start = hrtime(true);
$r0 = getrusage();
$amqp->method(1, 60, 20, pack('n', 0) . RawAmqp::short($queue) . RawAmqp::short('') . ($autoAck ? "\x02" : "\0") . pack('N', 0));
$amqp->expect(60, 21);
$n = 0;
while ($n < $count) {
    [$type, , $k, $m, $args] = $amqp->read();
    if ($type === 3) {
        $n++; // a 100-byte body is one frame
        if (!$autoAck && ($n % 100 === 0 || $n === $count)) {
            $amqp->method(1, 60, 80, pack('J', $n) . "\x01");
        }
    }
}
$end = hrtime(true);
$r1 = getrusage();
$amqp->close();
echo json_encode([
    'elapsed' => ($end - $start) / 1e9, 'cpu_us' => cpu_us($r0, $r1), 'handled' => $n, 'seen' => $n,
    'tail_ms' => 0, 'rss_kb' => [],
]), "\n";
