<?php
// The clients of bench E1 (benches/event_loop.php), one per process. Args:
//   mode uri queue calls warm concurrency
// mode: fibers      `concurrency` Revolt fibers on one amqp_rs connection, each calling
//                   AmqpRs\Revolt\Client::rpc() back to back until `calls` calls in all;
//       sequential  Connection::rpc(), one call after the other;
//       amqplib     php-amqplib's classic blocking RPC (an exclusive reply queue, a
//                   correlation id per call), as benches/clients/rpc_php_amqplib.php.
// First `warm` calls the same way, untimed (connection, reply consumer, first allocations).
// A call's latency runs from its own start to its reply in hand (in a fiber: to the fiber's
// resumption). Every request body is unique and the server echoes it: a reply that is not the
// echo of its own request is counted as wrong. Prints one JSON line.
declare(strict_types=1);

require __DIR__ . '/common.php';

[, $mode, $uri, $queue, $calls, $warm, $concurrency] = $argv;
[$calls, $warm, $concurrency] = [(int) $calls, (int) $warm, (int) $concurrency];
$tag = bin2hex(random_bytes(4));

/**
 * Makes $count calls through $call(body): the latencies in ns, how many replies were wrong.
 *
 * @return array{list<int>, int}
 */
function sequential(callable $call, int $count, string $tag): array
{
    $lat = [];
    $wrong = 0;
    for ($i = 0; $i < $count; $i++) {
        $body = "$tag.$i." . str_repeat('x', 80);
        $t = hrtime(true);
        $reply = $call($body);
        $lat[] = hrtime(true) - $t;
        $wrong += $reply === $body ? 0 : 1;
    }
    return [$lat, $wrong];
}

/** The same over $fibers fibers on Revolt's loop, each taking the next call number until $count. */
function concurrent(AmqpRs\Revolt\Client $client, string $queue, int $count, int $fibers, string $tag): array
{
    $lat = [];
    $wrong = 0;
    $next = 0;
    for ($f = 0; $f < $fibers; $f++) {
        Revolt\EventLoop::queue(function () use ($client, $queue, $count, $tag, &$lat, &$wrong, &$next): void {
            while ($next < $count) {
                $body = "$tag." . $next++ . '.' . str_repeat('x', 80);
                $t = hrtime(true);
                $reply = $client->rpc($body, $queue, '', [], 30.0)->getBody();
                $lat[] = hrtime(true) - $t;
                $wrong += $reply === $body ? 0 : 1;
            }
        });
    }
    // Returns once every fiber is done: the Client's watcher is enabled only while a call waits.
    Revolt\EventLoop::run();
    return [$lat, $wrong];
}

/** php-amqplib's classic RPC: a function(body): reply body, and the connection to close. */
function amqplib(string $uri, string $queue): array
{
    require_once '/usr/share/php/PhpAmqpLib/autoload.php';
    $u = parse_url($uri);
    $conn = new PhpAmqpLib\Connection\AMQPStreamConnection($u['host'], $u['port'] ?? 5672,
        rawurldecode($u['user'] ?? 'guest'), rawurldecode($u['pass'] ?? 'guest'), rawurldecode(ltrim($u['path'] ?? '/', '/')) ?: '/');
    $ch = $conn->channel();
    [$replyQueue] = $ch->queue_declare('', false, false, true, false);
    $reply = null;
    $corr = '';
    $ch->basic_consume($replyQueue, '', false, true, false, false, function (PhpAmqpLib\Message\AMQPMessage $m) use (&$reply, &$corr): void {
        if ($m->get('correlation_id') === $corr) {
            $reply = $m->getBody();
        }
    });
    $n = 0;
    $call = function (string $body) use ($ch, $queue, $replyQueue, &$reply, &$corr, &$n): string {
        $corr = 'c' . ++$n;
        $reply = null;
        $ch->basic_publish(new PhpAmqpLib\Message\AMQPMessage($body, ['correlation_id' => $corr, 'reply_to' => $replyQueue]), '', $queue);
        while ($reply === null) {
            $ch->wait(null, false, 30.0);
        }
        return $reply;
    };
    return [$call, fn () => $conn->close()];
}

if ($mode === 'fibers') {
    require_once __DIR__ . '/../../php-tests/Support/Revolt.php';
    if (($why = AmqpRs\Tests\Support\Revolt::load()) !== null) {
        fwrite(STDERR, "$why\n");
        exit(2);
    }
    $conn = new AmqpRs\Connection($uri, ['name' => 'e1 bench fibers']);
    $client = new AmqpRs\Revolt\Client($conn);
    $measure = fn (int $count, string $tag) => concurrent($client, $queue, $count, $concurrency, $tag);
    $close = fn () => $conn->close();
} elseif ($mode === 'sequential') {
    $conn = new AmqpRs\Connection($uri, ['name' => 'e1 bench sequential']);
    $call = fn (string $body): string => $conn->rpc($body, $queue, '', [], 30.0)->getBody();
    $measure = fn (int $count, string $tag) => sequential($call, $count, $tag);
    $close = fn () => $conn->close();
} elseif ($mode === 'amqplib') {
    [$call, $close] = amqplib($uri, $queue);
    $measure = fn (int $count, string $tag) => sequential($call, $count, $tag);
} else {
    fwrite(STDERR, "unknown mode $mode\n");
    exit(2);
}

[, $wrongWarm] = $measure($warm, "$tag.w");
$r0 = getrusage();
$start = hrtime(true);
[$lat, $wrong] = $measure($calls, $tag);
$elapsed = (hrtime(true) - $start) / 1e9;
$r1 = getrusage();
$close();
sort($lat);
$n = count($lat);
$pct = fn (float $p) => $n ? $lat[min($n - 1, (int) ceil($p * $n) - 1)] / 1e3 : null;
echo json_encode([
    'calls' => $n, 'warm' => $warm, 'wrong' => $wrong + $wrongWarm, 'elapsed' => $elapsed, 'cpu_us' => cpu_us($r0, $r1),
    'p50_us' => $pct(0.50), 'p99_us' => $pct(0.99), 'max_us' => $n ? $lat[$n - 1] / 1e3 : null,
    'mean_us' => $n ? array_sum($lat) / $n / 1e3 : null,
]), "\n";
