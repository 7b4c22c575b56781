<?php
// A worker process for the signal tests: consume(QUEUE) with a callback that sleeps
// SLEEP_MS, printing what happens. Args: queue sleep_ms [user-handler]
// A message 'ready' makes it print "ready" from inside consume(), whose stop-signal handling
// is in place by then: the tests send their signal only after that line.
declare(strict_types=1);

[$script, $queue, $sleepMs] = $argv;
$userHandler = ($argv[3] ?? '') === 'user-handler';
if ($userHandler) {
    pcntl_signal(SIGTERM, function () {
        echo "user handler ran\n";
    });
}
$conn = new AmqpRs\Connection(getenv('AMQP_RS_TEST_URI') ?: 'amqp://guest:guest@127.0.0.1:5672/%2f');
$consumer = $conn->consumer($queue, ['prefetch' => 1]);
$n = $consumer->consume(function (AmqpRs\Message $m) use ($sleepMs) {
    if ($m->getBody() === 'ready') {
        echo "ready\n";
        return;
    }
    echo 'got ', $m->getBody(), "\n";
    usleep((int) $sleepMs * 1000);
    echo 'done ', $m->getBody(), "\n";
});
echo "returned $n\n";
$conn->close();
