<?php
// A worker for RevoltTest's signal case: AmqpRs\Revolt\Client::consume(QUEUE) on Revolt's
// loop, next to a 10 ms timer, with a callback that awaits WORK_MS (a Revolt delay: the loop
// runs meanwhile) per message. Args: queue work_ms. Prints "ready" for a message 'ready' (its
// stop-signal handling is in place by then), "got X" / "done X" around each job, "ticking"
// once the timer has fired while a job was in hand, and "returned <n>" when consume() returns;
// then closes its connection and ends by itself, leaving nothing in the loop.
declare(strict_types=1);

require __DIR__ . '/Revolt.php';

use AmqpRs\Revolt\Client;
use Revolt\EventLoop;

if (($why = AmqpRs\Tests\Support\Revolt::load()) !== null) {
    fwrite(STDERR, "$why\n");
    exit(2);
}
[, $queue, $workMs] = $argv;
$conn = new AmqpRs\Connection(getenv('AMQP_RS_TEST_URI') ?: 'amqp://guest:guest@127.0.0.1:5672/%2f');
$client = new Client($conn);
$ticks = 0;
// Unreferenced: it must not keep the loop alive once consume() has returned.
$timer = EventLoop::unreference(EventLoop::repeat(0.01, function () use (&$ticks): void {
    $ticks++;
}));
$n = $client->consume($conn->consumer($queue, ['prefetch' => 1]), function (AmqpRs\Message $m) use ($workMs, &$ticks): void {
    if ($m->getBody() === 'ready') {
        echo "ready\n";
        return;
    }
    echo 'got ', $m->getBody(), "\n";
    $before = $ticks;
    $suspension = EventLoop::getSuspension();
    EventLoop::delay((int) $workMs / 1000, static fn () => $suspension->resume());
    $suspension->suspend();
    if ($ticks > $before) {
        echo "ticking\n";
    }
    echo 'done ', $m->getBody(), "\n";
});
echo "returned $n\n";
$client->close();
$conn->close();
