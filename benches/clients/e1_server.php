<?php
// The server of bench E1 (benches/event_loop.php): one amqp_rs process that answers many
// requests at once. It consumes the request queue on a stream_select() loop over the
// connection's readiness() stream (Consumer::next(0.0) until null) and keeps the requests not
// yet due in a list, so that a reply delayed by DELAY_MS never holds up the requests behind it.
// Args: uri queue delay_ms.
//
// Replies go through a Producer without confirms (publish() hands them to the io-loop and
// returns), not Message::reply(), which waits for its confirm: a server that waits a round trip
// per reply would serialise the very calls E1 makes concurrent. A lost reply shows up as the
// client's timeout. Prints "ready" once its consumer is registered; ends when its stdin is
// closed, printing one JSON line: requests served and its CPU time over the serving span.
declare(strict_types=1);

require __DIR__ . '/common.php';

[, $uri, $queue, $delayMs] = $argv;
$delay = (float) $delayMs / 1000;
$conn = new AmqpRs\Connection($uri, ['name' => 'e1 bench server']);
$conn->declareQueue($queue, ['durable' => false, 'auto_delete' => true]);
$consumer = $conn->consumer($queue, ['auto_ack' => true]);
$replies = $conn->producer(['confirms' => false]);
$ready = $conn->readiness();
$consumer->next(0.0);       // joins the readiness stream (the queue is new: nothing to take yet)

$reply = static function (AmqpRs\Message $request) use ($replies): void {
    $replies->publish($request->getBody(), (string) $request->getReplyTo(), '',
        ['correlation_id' => (string) $request->getCorrelationId()]);
};
echo "ready\n";
$r0 = getrusage();
$served = 0;
$due = new SplQueue();      // [due time, request]: the delay is constant, so it stays sorted
$stdin = STDIN;
stream_set_blocking($stdin, false);
while (true) {
    $wait = $due->isEmpty() ? 1.0 : max(0.0, $due->bottom()[0] - microtime(true));
    $read = [$ready, $stdin];
    $none = null;
    if (stream_select($read, $none, $none, (int) $wait, (int) (($wait - (int) $wait) * 1e6)) === false) {
        throw new RuntimeException('stream_select failed');
    }
    if (in_array($stdin, $read, true) && fread($stdin, 1) === '' && feof($stdin)) {
        break;
    }
    while ($request = $consumer->next(0.0)) {
        if ($delay <= 0.0) {
            $reply($request);
            $served++;
        } else {
            $due->enqueue([microtime(true) + $delay, $request]);
        }
    }
    $now = microtime(true);
    while (!$due->isEmpty() && $due->bottom()[0] <= $now) {
        $reply($due->dequeue()[1]);
        $served++;
    }
}
$r1 = getrusage();
$conn->close();
echo json_encode(['served' => $served, 'pending' => $due->count(), 'cpu_us' => cpu_us($r0, $r1)]), "\n";
