<?php
// Publisher side of P1-P3 for php-amqp (the C extension). Args: scenario count size queue.
require __DIR__ . '/common.php';
[$_, $scenario, $count, $size, $queue] = $argv;
$count = (int) $count;
$body = str_repeat('x', (int) $size);
$conn = new AMQPConnection(['host' => '127.0.0.1', 'port' => 5672, 'login' => 'guest', 'password' => 'guest']);
$conn->connect();
$ch = new AMQPChannel($conn);
if ($scenario !== 'P1') {
    $ch->confirmSelect();
    // waitForConfirm() returns once the callback answers false: after every ack for P3, after
    // the last one for P2.
    $ch->setConfirmCallback(
        fn (int $tag, bool $multiple) => $scenario === 'P2' && $tag < $count,
        fn (int $tag, bool $multiple, bool $requeue) => throw new RuntimeException("nack $tag"),
    );
}
$ex = new AMQPExchange($ch);
$ex->setName('');
$attrs = ['delivery_mode' => 2];
$start = hrtime(true);
$r0 = getrusage();
for ($i = 0; $i < $count; $i++) {
    $ex->publish($body, $queue, AMQP_NOPARAM, $attrs);
    if ($scenario === 'P3') {
        $ch->waitForConfirm(30);
    }
}
if ($scenario === 'P2') {
    $ch->waitForConfirm(60);
}
$elapsed = (hrtime(true) - $start) / 1e9;
$r1 = getrusage();
$conn->disconnect();
echo json_encode(['elapsed' => $elapsed, 'cpu_us' => cpu_us($r0, $r1)]), "\n";
