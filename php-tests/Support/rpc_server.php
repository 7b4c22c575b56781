<?php
// An RPC server process for PatternsTest: consumes QUEUE (prefetch 1, so requests are served
// one at a time, in order) and answers each with Message::reply(). Args: queue [idle_timeout_s]
// [max_messages]. Prints "ready" once its consumer is registered, "served <correlation_id>" per
// reply, "returned <n>" at the end; returns by itself after idle_timeout (default 10 s) without
// a request, after max_messages (default 1000), or on SIGTERM.
//
// The reply: body "re: <request body>", content_type text/plain, headers served_by (this
// pid), request_correlation_id and request_headers (what the request carried). A request
// header delay_ms makes it sleep that long before replying (to produce late replies).
declare(strict_types=1);

$queue = $argv[1];
$idle = (float) ($argv[2] ?? 10);
$max = (int) ($argv[3] ?? 1000);

$conn = new AmqpRs\Connection(getenv('AMQP_RS_TEST_URI') ?: 'amqp://guest:guest@127.0.0.1:5672/%2f', ['name' => 'rpc_server']);
$consumer = $conn->consumer($queue, ['prefetch' => 1]);
echo "ready\n";
$n = $consumer->consume(function (AmqpRs\Message $m) {
    usleep((int) $m->getHeader('delay_ms', 0) * 1000);
    $m->reply('re: ' . $m->getBody(), [
        'content_type' => 'text/plain',
        'headers' => [
            'served_by' => getmypid(),
            'request_correlation_id' => $m->getCorrelationId(),
            'request_headers' => $m->getHeaders(),
        ],
    ]);
    echo 'served ', $m->getCorrelationId(), "\n";
}, ['idle_timeout' => $idle, 'max_messages' => $max]);
echo "returned $n\n";
$conn->close();
