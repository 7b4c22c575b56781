<?php
// An RPC server for the event-loop tests (EventLoop*Test, RevoltTest) that never serialises
// its requests: it takes them with Consumer::next(0.0) in a stream_select loop on the
// connection's readiness stream and answers each one DELAY_MS after it arrived, echoing its body
// (after the prefix), from a list of replies that are due. A request header delay_ms overrides
// the delay; a body starting with "noreply" is only acked.
// Args: queue [delay_ms (200)] [idle_timeout_s (20)] [reply prefix ('')]. Prints "ready" once
// it is subscribed, "served <correlation_id>" per reply; returns after idle_timeout without a
// request, or dies on SIGTERM.
declare(strict_types=1);

$queue = $argv[1];
$delay = (int) ($argv[2] ?? 200);
$idle = (float) ($argv[3] ?? 20);
$prefix = $argv[4] ?? '';

$conn = new AmqpRs\Connection(getenv('AMQP_RS_TEST_URI') ?: 'amqp://guest:guest@127.0.0.1:5672/%2f', ['name' => 'slow_rpc_server']);
$consumer = $conn->consumer($queue, ['prefetch' => 1000]);
$ready = $conn->readiness();
/** @var list<array{float, AmqpRs\Message}> $due replies to send, by when */
$due = [];
$last = microtime(true);
echo "ready\n";
while (microtime(true) - $last < $idle) {
    while (($m = $consumer->next(0.0)) !== null) {
        $last = microtime(true);
        if (str_starts_with($m->getBody(), 'noreply')) {
            $m->ack();
            continue;
        }
        $due[] = [$last + (int) $m->getHeader('delay_ms', $delay) / 1000, $m];
    }
    usort($due, fn (array $a, array $b) => $a[0] <=> $b[0]);
    while ($due !== [] && $due[0][0] <= microtime(true)) {
        [, $m] = array_shift($due);
        $m->reply($prefix . $m->getBody());
        $m->ack();
        echo 'served ', $m->getCorrelationId(), "\n";
    }
    $wait = $due === [] ? 1.0 : max(0.0, $due[0][0] - microtime(true));
    $read = [$ready];
    $w = $e = null;
    stream_select($read, $w, $e, 0, (int) ($wait * 1_000_000));
}
$conn->close();
