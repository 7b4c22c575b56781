<?php
// An RPC server for RevoltTest that answers each request DELAY_MS after it came, without
// serialising them: a plain stream_select loop on the connection's readiness stream (no
// Revolt), taking with next(0.0) and replying to each request once its time is up.
// Args: queue delay_ms. Prints "ready" once it consumes, "served <n>" when it ends (SIGTERM).
// The reply: body "re: <request body>".
declare(strict_types=1);

[, $queue, $delayMs] = $argv;
$delay = (int) $delayMs / 1000;
$stop = false;
pcntl_async_signals(true);
pcntl_signal(SIGTERM, function () use (&$stop): void {
    $stop = true;
});

$conn = new AmqpRs\Connection(getenv('AMQP_RS_TEST_URI') ?: 'amqp://guest:guest@127.0.0.1:5672/%2f', ['name' => 'slow_rpc_server']);
$consumer = $conn->consumer($queue, ['prefetch' => 1000, 'auto_ack' => true]);
$ready = $conn->readiness();
$due = new SplQueue(); // [time, message], in arrival order: the same delay keeps them sorted
$served = 0;
$consumer->next(0.0);
echo "ready\n";
while (!$stop) {
    $now = hrtime(true) / 1e9;
    while (!$due->isEmpty() && $due->bottom()[0] <= $now) {
        [, $m] = $due->dequeue();
        $m->reply('re: ' . $m->getBody());
        $served++;
    }
    $wait = $due->isEmpty() ? 0.5 : max(0.0, $due->bottom()[0] - $now);
    $read = [$ready];
    $w = $e = null;
    if (@stream_select($read, $w, $e, (int) $wait, (int) (fmod($wait, 1.0) * 1e6)) > 0) {
        while ($m = $consumer->next(0.0)) {
            $due->enqueue([hrtime(true) / 1e9 + $delay, $m]);
        }
    }
}
echo "served $served\n";
$conn->close();
