<?php
// RPC client: calls examples/rpc/server.php with Connection::rpc() and prints each answer.
//
// rpc() publishes the request with reply_to (RabbitMQ's direct reply-to, no reply queue to
// declare) and a correlation_id, and blocks until the matching reply arrives or the timeout
// runs out. Start the server first:
//
//   php -d extension=target/release/libamqp_rs.so examples/rpc/server.php [queue] &
//   php -d extension=target/release/libamqp_rs.so examples/rpc/client.php [queue]
//
// queue defaults to examples.rpc; the broker is AMQP_URI (default amqp://guest:guest@127.0.0.1:5672/%2f).
// Exits 0 when every call was answered, 1 when the server is not running or did not answer.
declare(strict_types=1);

use AmqpRs\Connection;
use AmqpRs\PublishException;
use AmqpRs\TimeoutException;

$uri = getenv('AMQP_URI') ?: 'amqp://guest:guest@127.0.0.1:5672/%2f';
$queue = $argv[1] ?? 'examples.rpc';
$conn = new Connection($uri, ['name' => 'rpc example client']);

$calls = [
    ['op' => 'add', 'args' => [2, 3, 4]],
    ['op' => 'mul', 'args' => [1.5, 4]],
    ['op' => 'div', 'args' => [1, 0]],
    ['op' => 'pow', 'args' => [2, 8]],
];
try {
    foreach ($calls as $call) {
        $started = hrtime(true);
        $reply = $conn->rpc(json_encode($call), $queue, '', ['content_type' => 'application/json'], 5.0);
        $answer = $reply->json();
        printf("client: %s(%s) = %s  [%.2f ms]\n", $call['op'], implode(', ', $call['args']),
            $answer['ok'] ? json_encode($answer['result']) : 'error: ' . $answer['error'],
            (hrtime(true) - $started) / 1e6);
    }
} catch (PublishException $e) {
    // No queue took the request: the server is not running (its queue goes with it).
    fwrite(STDERR, "client: no server on '$queue' (start examples/rpc/server.php first)\n");
    exit(1);
} catch (TimeoutException $e) {
    fwrite(STDERR, "client: {$e->getMessage()}\n");
    exit(1);
}
$conn->close();
