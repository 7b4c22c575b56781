<?php
// Consumer side of C1, C2 and M1 for amqp_rs. Args: scenario count queue. Prints JSON.
require __DIR__ . '/common.php';
[$_, $scenario, $count, $queue] = $argv;
$count = (int) $count;
$conn = new AmqpRs\Connection('amqp://guest:guest@127.0.0.1:5672/%2f');
// M1 samples its own RSS: once warm (after the first tenth), then every tenth, to tell steady
// growth from a one-off step.
$step = $scenario === 'M1' ? max(1, intdiv($count, 10)) : PHP_INT_MAX;
$rss = [];
$n = 0;
$start = hrtime(true);
$r0 = getrusage();
$consumer = $conn->consumer($queue, ['prefetch' => 500, 'auto_ack' => $scenario === 'C2']);
$handled = $consumer->consume(function (AmqpRs\Message $m) use ($scenario, $step, &$n, &$rss, &$last) {
    if ($scenario !== 'C2') {
        $m->ack();
    }
    if (++$n % $step === 0) {
        $rss[] = rss_kb();
    }
    $last = hrtime(true);
}, ['max_messages' => $count]);
// Timed to consume()'s return rather than to the last callback, so acks still buffered then
// count; "tail" shows how long that took.
$end = hrtime(true);
$r1 = getrusage();
$rssEnd = rss_kb();
$conn->close();
echo json_encode([
    'elapsed' => ($end - $start) / 1e9, 'cpu_us' => cpu_us($r0, $r1), 'handled' => $handled, 'seen' => $n,
    'tail_ms' => ($end - $last) / 1e6, 'rss_kb' => $rss ? [...$rss, $rssEnd] : [],
]), "\n";
