<?php
// Publisher side of P1-P3 for amqp_rs. Args: scenario count size queue. Prints JSON.
require __DIR__ . '/common.php';
[$_, $scenario, $count, $size, $queue] = $argv;
$count = (int) $count;
$body = str_repeat('x', (int) $size);
$conn = new AmqpRs\Connection('amqp://guest:guest@127.0.0.1:5672/%2f');
$producer = $conn->producer(['confirms' => $scenario !== 'P1']);
$start = hrtime(true);
$r0 = getrusage();
for ($i = 0; $i < $count; $i++) {
    $producer->publish($body, $queue);
    if ($scenario === 'P3') {
        $producer->waitForConfirms();
    }
}
$producer->waitForConfirms();
$elapsed = (hrtime(true) - $start) / 1e9;
$r1 = getrusage();
$conn->close();
echo json_encode(['elapsed' => $elapsed, 'cpu_us' => cpu_us($r0, $r1)]), "\n";
