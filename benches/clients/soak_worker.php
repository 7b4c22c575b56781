<?php
// Worker side of the soak (benches/soak.php): consumes the queue with manual acks and
// records each id (the 8-byte body, checked against message_id) in a one-byte-per-id
// bitmap of how often it was seen: duplicates and redelivered flags are counted, and the ids
// never seen are listed at the end.
//
//   php -d extension=amqp_rs.so soak_worker.php --messages=N --queue=Q --name=CONN_NAME [--prefetch=500] [--timeout=S]
//
// Runs until every id was seen, the orchestrator says the producer is done ("done" on
// stdin) and the queue is drained (nothing for 2 s and no message ready), or --timeout.
// Progress on stdout as JSON lines ({"w": ...}), the summary last ({"final": ...}).
declare(strict_types=1);

require __DIR__ . '/common.php';

$opts = getopt('', ['messages:', 'queue:', 'name:', 'prefetch:', 'timeout:', 'uri:']);
$total = (int) $opts['messages'];
$queue = $opts['queue'];
$prefetch = (int) ($opts['prefetch'] ?? 500);
$timeout = (float) ($opts['timeout'] ?? 3600);
$uri = $opts['uri'] ?? 'amqp://guest:guest@127.0.0.1:5672/%2f';

// A pause between two deliveries longer than this is reported with its wall-clock start, so
// the orchestrator can match it with a disconnect.
const GAP_S = 0.1;

function emit(array $line): void
{
    fwrite(STDOUT, json_encode($line) . "\n");
}

stream_set_blocking(STDIN, false);
$producerDone = false;
$stdinBuf = '';
$readStdin = function () use (&$producerDone, &$stdinBuf): void {
    while (($chunk = fread(STDIN, 8192)) !== false && $chunk !== '') {
        $stdinBuf .= $chunk;
    }
    if (preg_match('/^done$/m', $stdinBuf)) {
        $producerDone = true;
    }
};

$conn = new AmqpRs\Connection($uri, ['name' => $opts['name']]);
$consumer = $conn->consumer($queue, ['prefetch' => $prefetch]);

$seen = str_repeat("\0", $total);   // times each id was delivered, saturating at 255
$unique = 0;
$stats = [
    'deliveries' => 0, 'duplicates' => 0, 'redelivered_flag' => 0,
    'duplicates_redelivered' => 0, 'duplicates_not_redelivered' => 0, 'first_seen_redelivered' => 0,
    'max_times_seen' => 0, 'bad_messages' => 0, 'gaps' => 0, 'max_gap_s' => 0.0,
];
$badSamples = [];
$t0 = microtime(true);
$rusage0 = getrusage();
$last = null;
$lastEmit = 0.0;
$allSeenAt = null;

$handle = function (AmqpRs\Message $m) use (&$seen, &$unique, &$stats, &$badSamples, &$last, &$lastEmit, &$allSeenAt, $total, $consumer): void {
    $now = microtime(true);
    if ($last !== null && $now - $last >= GAP_S) {
        $stats['gaps']++;
        $stats['max_gap_s'] = max($stats['max_gap_s'], $now - $last);
        emit(['gap' => round($now - $last, 4), 'at' => $last]);
    }
    $last = $now;
    $stats['deliveries']++;
    $body = $m->getBody();
    $id = strlen($body) === 8 ? unpack('J', $body)[1] : -1;
    if ($id < 0 || $id >= $total || (string) $id !== $m->getMessageId()) {
        $stats['bad_messages']++;
        if (count($badSamples) < 10) {
            $badSamples[] = ['body_hex' => bin2hex(substr($body, 0, 16)), 'message_id' => $m->getMessageId()];
        }
        $m->ack();
        return;
    }
    $redelivered = $m->isRedelivered();
    if ($redelivered) {
        $stats['redelivered_flag']++;
    }
    $times = ord($seen[$id]);
    if ($times === 0) {
        $unique++;
        if ($redelivered) {
            $stats['first_seen_redelivered']++;
        }
    } else {
        $stats['duplicates']++;
        $stats[$redelivered ? 'duplicates_redelivered' : 'duplicates_not_redelivered']++;
    }
    if ($times < 255) {
        $seen[$id] = chr($times + 1);
        $stats['max_times_seen'] = max($stats['max_times_seen'], $times + 1);
    }
    $m->ack();
    if ($unique === $total && $allSeenAt === null) {
        $allSeenAt = $now;
        $consumer->stop();
    }
    if ($now - $lastEmit >= 0.05) {
        emit(['w' => $unique, 'd' => $stats['deliveries'], 'at' => $now]);
        $lastEmit = $now;
    }
};

$timedOut = false;
$drained = false;
$queueLeft = null;
while (true) {
    if (microtime(true) - $t0 > $timeout) {
        $timedOut = true;
        break;
    }
    $readStdin();
    if ($unique < $total || !$producerDone) {
        // consume() returns now and then so that "done" from the orchestrator is read.
        $consumer->consume($handle, ['idle_timeout' => 1.0, 'max_time' => 2.0]);
        emit(['w' => $unique, 'd' => $stats['deliveries'], 'at' => microtime(true)]);
        continue;
    }
    // Every id seen and every one confirmed to the producer: what is left in the queue can
    // only be duplicates (republished ids that had arrived after all, or redeliveries).
    $n = $consumer->consume($handle, ['idle_timeout' => 2.0, 'max_time' => 10.0]);
    if ($n === 0) {
        $queueLeft = $conn->queueStatus($queue)['messages'];
        if ($queueLeft === 0) {
            $drained = true;
            break;
        }
    }
}
$elapsed = microtime(true) - $t0;
$rusage1 = getrusage();
emit(['w' => $unique, 'd' => $stats['deliveries'], 'at' => microtime(true)]);
$missing = [];
$missingCount = 0;
for ($pos = strpos($seen, "\0"); $pos !== false; $pos = strpos($seen, "\0", $pos + 1)) {
    $missingCount++;
    if (count($missing) < 50) {
        $missing[] = $pos;
    }
}
$conn->close();
preg_match('/^VmHWM:\s+(\d+)/m', (string) file_get_contents('/proc/self/status'), $hwm);
emit(['final' => $stats + [
    'unique' => $unique,
    'missing' => $missingCount,
    'missing_sample' => $missing,
    'bad_samples' => $badSamples,
    'timed_out' => $timedOut,
    'drained' => $drained,
    'queue_left' => $queueLeft,
    'all_seen_s' => $allSeenAt === null ? null : $allSeenAt - $t0,
    'elapsed_s' => $elapsed,
    'cpu_s' => cpu_us($rusage0, $rusage1) / 1e6,
    'peak_rss_kb' => (int) ($hwm[1] ?? 0),
    'rss_end_kb' => rss_kb(),
]]);
exit($missingCount === 0 && !$timedOut ? 0 : 1);
