<?php
// The server side of R1, the same for every client measured: consumes the request queue and
// answers each request with Message::reply() (its body echoed). Args: queue [idle_timeout_s]
// [uri] (the broker: benches/web.php runs W2 on a node of its own).
// Declares the queue (non-durable, so that no client pays for persistence), prints "ready" once
// its consumer is registered, then, when SIGTERM (or idle_timeout, default 60 s) ends it, one
// JSON line: how many it served and its CPU time.
require __DIR__ . '/common.php';
$queue = $argv[1];
$idle = (float) ($argv[2] ?? 60);
$conn = new AmqpRs\Connection($argv[3] ?? 'amqp://guest:guest@127.0.0.1:5672/%2f', ['name' => 'bench rpc server']);
$conn->declareQueue($queue, ['durable' => false]);
$conn->purgeQueue($queue);
$consumer = $conn->consumer($queue);
echo "ready\n";
$r0 = getrusage();
$served = $consumer->consume(function (AmqpRs\Message $m) {
    $m->reply($m->getBody());
}, ['idle_timeout' => $idle]);
$r1 = getrusage();
$conn->close();
echo json_encode(['served' => $served, 'cpu_us' => cpu_us($r0, $r1)]), "\n";
