<?php
// Consumer side of C1, C2 and M1 for php-amqp (the C extension). Args: scenario count queue.
require __DIR__ . '/common.php';
[$_, $scenario, $count, $queue] = $argv;
$count = (int) $count;
$conn = new AMQPConnection(['host' => '127.0.0.1', 'port' => 5672, 'login' => 'guest', 'password' => 'guest']);
$conn->connect();
$ch = new AMQPChannel($conn);
$ch->setPrefetchCount(500);
$q = new AMQPQueue($ch);
$q->setName($queue);
$autoAck = $scenario === 'C2';
// Same RSS sampling as consume_amqp_rs.php, so M1 compares like with like.
$step = $scenario === 'M1' ? max(1, intdiv($count, 10)) : PHP_INT_MAX;
$rss = [];
$n = 0;
$start = hrtime(true);
$r0 = getrusage();
// consume() returns once the callback answers false, i.e. right after the last message.
$q->consume(function (AMQPEnvelope $env, AMQPQueue $q) use ($autoAck, $count, $step, &$n, &$rss, &$last) {
    if (!$autoAck) {
        $q->ack($env->getDeliveryTag());
    }
    if (++$n % $step === 0) {
        $rss[] = rss_kb();
    }
    $last = hrtime(true);
    return $n < $count;
}, $autoAck ? AMQP_AUTOACK : AMQP_NOPARAM);
$end = hrtime(true);
$r1 = getrusage();
$rssEnd = rss_kb();
$conn->disconnect();
echo json_encode([
    'elapsed' => ($end - $start) / 1e9, 'cpu_us' => cpu_us($r0, $r1), 'handled' => $n, 'seen' => $n,
    'tail_ms' => ($end - $last) / 1e6, 'rss_kb' => $rss ? [...$rss, $rssEnd] : [],
]), "\n";
