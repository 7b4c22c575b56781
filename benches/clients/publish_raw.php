<?php
// The broker's ceiling for P1-P3: every frame built before the clock starts and written in
// large chunks, confirms read without any client machinery. A ratio against php-amqp that
// this one cannot reach is ruled out by the broker, not the client.
// Args: scenario count size queue.
require __DIR__ . '/common.php';
require __DIR__ . '/raw_amqp.php';
[$_, $scenario, $count, $size, $queue] = $argv;
$count = (int) $count;
$body = str_repeat('x', (int) $size);
$amqp = new RawAmqp();
if ($scenario !== 'P1') {
    $amqp->method(1, 85, 10, "\0");
    $amqp->expect(85, 11);
}

// publish + header (delivery_mode 2) + body, the same for every message.
$one = RawAmqp::methodFrame(1, 60, 40, pack('n', 0) . RawAmqp::short('') . RawAmqp::short($queue) . "\0")
    . RawAmqp::frame(2, 1, pack('nnJn', 60, 0, strlen($body), 0x1000) . "\x02")
    . RawAmqp::frame(3, 1, $body);
$perChunk = max(1, intdiv(256 * 1024, strlen($one)));
$chunk = str_repeat($one, $perChunk);
$confirmed = 0;
$awaitConfirms = function (int $upTo) use ($amqp, &$confirmed): void {
    while ($confirmed < $upTo) {
        [$type, , $k, $m, $args] = $amqp->read();
        if ($type === 1 && $k === 60 && $m === 80) {
            $confirmed = unpack('Jtag', $args)['tag'];
        } elseif ($type === 1) {
            throw new RuntimeException("unexpected $k.$m (60.120 is a nack)");
        }
    }
};

$start = hrtime(true);
$r0 = getrusage();
if ($scenario === 'P3') {
    for ($i = 1; $i <= $count; $i++) {
        fwrite($amqp->sock, $one);
        $awaitConfirms($i);
    }
} else {
    for ($sent = 0; $sent < $count; $sent += $n) {
        $n = min($perChunk, $count - $sent);
        fwrite($amqp->sock, $n === $perChunk ? $chunk : str_repeat($one, $n));
    }
    if ($scenario === 'P2') {
        $awaitConfirms($count);
    } else {
        // Stricter than the other clients, which stop once the last publish is written: a
        // second channel's open-ok comes after the broker has read every frame before it.
        $amqp->method(2, 20, 10, RawAmqp::short(''));
        $amqp->expect(20, 11);
    }
}
$elapsed = (hrtime(true) - $start) / 1e9;
$r1 = getrusage();
$amqp->close();
echo json_encode(['elapsed' => $elapsed, 'cpu_us' => cpu_us($r0, $r1)]), "\n";
