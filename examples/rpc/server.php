<?php
// RPC server: a small calculator service answering requests with Message::reply().
//
// Each request is JSON {"op": "add"|"mul"|"div", "args": [numbers]}; the reply is JSON
// {"ok": true, "result": ...} or {"ok": false, "error": "..."}, sent to the caller's reply_to with
// its correlation_id copied. Pair it with examples/rpc/client.php:
//
//   php -d extension=target/release/libamqp_rs.so examples/rpc/server.php [queue] &
//   php -d extension=target/release/libamqp_rs.so examples/rpc/client.php [queue]
//
// queue defaults to examples.rpc; the broker is AMQP_URI (default amqp://guest:guest@127.0.0.1:5672/%2f).
// The server stops by itself after 30 s without a request, after 5 minutes, or on SIGTERM/Ctrl-C.
declare(strict_types=1);

use AmqpRs\Connection;
use AmqpRs\Message;

$uri = getenv('AMQP_URI') ?: 'amqp://guest:guest@127.0.0.1:5672/%2f';
$queue = $argv[1] ?? 'examples.rpc';

$conn = new Connection($uri, ['name' => 'rpc example server']);
// Goes with the server: once it is gone, calls fail at once (PublishException) instead of
// waiting for their timeout. Durable although requests are transient: RabbitMQ 4.x deprecates
// transient queues that are not exclusive (a later version will refuse them).
$conn->declareQueue($queue, ['durable' => true, 'auto_delete' => true]);
$consumer = $conn->consumer($queue, ['prefetch' => 10]);
echo "server: waiting for requests on '$queue'\n";

$handled = $consumer->consume(function (Message $request) {
    try {
        $call = $request->json();                        // AmqpRs\Exception if not JSON
        if (!is_array($call) || !is_array($call['args'] ?? null)) {
            throw new DomainException('expected {"op": ..., "args": [...]}');
        }
        $args = $call['args'];
        $result = match ($call['op'] ?? null) {
            'add' => array_sum($args),
            'mul' => array_product($args),
            'div' => $args[1] == 0 ? throw new DomainException('division by zero') : $args[0] / $args[1],
            default => throw new DomainException('unknown op ' . json_encode($call['op'] ?? null)),
        };
        $reply = ['ok' => true, 'result' => $result];
    } catch (AmqpRs\Exception | DomainException $e) {
        $reply = ['ok' => false, 'error' => $e->getMessage()];
    }
    $request->reply(json_encode($reply), ['content_type' => 'application/json']);
    printf("server: %s -> %s\n", $request->getBody(), json_encode($reply));
}, ['idle_timeout' => 30, 'max_time' => 300]);

echo "server: handled $handled requests, stopping\n";
$conn->close();
