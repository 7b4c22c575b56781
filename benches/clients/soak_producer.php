<?php
// Producer side of the soak (benches/soak.php): publishes ids 0..N-1 to a durable queue,
// persistent, with confirms, as an at-least-once producer would: every id reported as failed
// (PublishException::getFailures() from waitForConfirms(), or a whole batch when the broker
// closed the channel) is published again, until every id is confirmed.
//
//   php -d extension=amqp_rs.so soak_producer.php --messages=N --queue=Q --name=CONN_NAME [--batch=1000] [--rate=MSGS_PER_S]
//
// Body: the id as 8 bytes (pack('J')); message_id: the id in decimal. Talks to the
// orchestrator in JSON lines: progress on stdout ({"p": ...} every batch), the summary last
// ({"final": ...}). The orchestrator holds it back with "gate N" lines on stdin: no id
// beyond N is published until a later gate allows it (see soak.php).
declare(strict_types=1);

require __DIR__ . '/common.php';

use AmqpRs\ChannelException;
use AmqpRs\PublishException;
use AmqpRs\TimeoutException;

$opts = getopt('', ['messages:', 'queue:', 'name:', 'batch:', 'rate:', 'uri:']);
$total = (int) $opts['messages'];
$queue = $opts['queue'];
$batchSize = (int) ($opts['batch'] ?? 1000);
$rate = (float) ($opts['rate'] ?? 0);           // 0: as fast as the broker confirms
$uri = $opts['uri'] ?? 'amqp://guest:guest@127.0.0.1:5672/%2f';

// A call that blocks longer than this is a stall (recovery, a full broker): it is reported
// with its wall-clock start so the orchestrator can match it with a disconnect.
const STALL_S = 0.05;

function emit(array $line): void
{
    fwrite(STDOUT, json_encode($line) . "\n");
}

stream_set_blocking(STDIN, false);
$gate = $total;
$stdinBuf = '';
/** Reads the orchestrator's "gate N" lines, if any arrived. */
$readGate = function () use (&$gate, &$stdinBuf): void {
    while (($chunk = fread(STDIN, 8192)) !== false && $chunk !== '') {
        $stdinBuf .= $chunk;
    }
    while (($nl = strpos($stdinBuf, "\n")) !== false) {
        $line = substr($stdinBuf, 0, $nl);
        $stdinBuf = substr($stdinBuf, $nl + 1);
        if (preg_match('/^gate (\d+)$/', $line, $m)) {
            $gate = (int) $m[1];
        }
    }
};

$conn = new AmqpRs\Connection($uri, ['name' => $opts['name']]);
$producer = $conn->producer();

$confirmed = str_repeat("\0", $total);   // 1 once the broker confirmed the id (and did not fail it)
$confirmedCount = 0;
$next = 0;                                  // the next id never published
$retry = [];                                // id => true: to publish again
$batch = [];                                // ids published since the last waitForConfirms()
$stats = [
    'published' => 0, 'republished' => 0, 'failures_reported' => 0, 'failure_reasons' => [],
    'batches_failed_whole' => 0, 'channel_exceptions' => 0, 'timeouts' => 0, 'publish_exceptions' => 0,
    'gate_wait_s' => 0.0, 'stalls' => 0, 'max_stall_s' => 0.0,
];
$errors = [];
$t0 = microtime(true);
$rusage0 = getrusage();

$stall = function (string $what, float $start, float $took) use (&$stats): void {
    if ($took >= STALL_S) {
        $stats['stalls']++;
        $stats['max_stall_s'] = max($stats['max_stall_s'], $took);
        emit(['stall' => $what, 'at' => $start, 's' => round($took, 4)]);
    }
};

/** A failure reason without the endpoint and the lapin detail, to count reasons by kind. */
function reason_kind(string $reason): string
{
    if (str_contains($reason, 'lost before the broker confirmed it')) {
        return 'lost before the broker confirmed it';
    }
    return substr($reason, 0, 80);
}

/** Waits for the batch's confirms; failed ids go to $retry, the others are confirmed. */
$settle = function () use ($producer, &$batch, &$retry, &$confirmed, &$confirmedCount, &$stats, &$errors, $stall): void {
    if (!$batch) {
        return;
    }
    $failed = [];
    for ($attempt = 1; ; $attempt++) {
        $start = microtime(true);
        try {
            $producer->waitForConfirms(60);
            $stall('waitForConfirms', $start, microtime(true) - $start);
            break;
        } catch (PublishException $e) {
            $stall('waitForConfirms', $start, microtime(true) - $start);
            foreach ($e->getFailures() as $f) {
                $id = $f['message_id'];
                $failed[$id] = true;
                $stats['failures_reported']++;
                $kind = reason_kind((string) $f['reason']);
                $stats['failure_reasons'][$kind] = ($stats['failure_reasons'][$kind] ?? 0) + 1;
            }
            break;
        } catch (ChannelException $e) {
            // The broker closed the channel: the exception says how many failed, not which.
            // Every id of the batch is published again (some may then arrive twice).
            $stall('waitForConfirms', $start, microtime(true) - $start);
            $stats['channel_exceptions']++;
            $stats['batches_failed_whole']++;
            $errors[] = 'waitForConfirms: ' . get_class($e) . ': ' . $e->getMessage();
            foreach ($batch as $id) {
                $failed[(string) $id] = true;
            }
            break;
        } catch (TimeoutException $e) {
            $stall('waitForConfirms', $start, microtime(true) - $start);
            $stats['timeouts']++;
            $errors[] = 'waitForConfirms: ' . get_class($e) . ': ' . $e->getMessage();
            if ($attempt >= 5) {
                throw $e;
            }
        }
    }
    foreach ($batch as $id) {
        if (isset($failed[(string) $id])) {
            $retry[$id] = true;
        } elseif ($confirmed[$id] === "\0") {
            $confirmed[$id] = "\1";
            $confirmedCount++;
            unset($retry[$id]);
        }
    }
    $batch = [];
};

$lastEmit = 0;
while ($confirmedCount < $total) {
    // Republish what failed first, then go on with new ids (up to the gate).
    if ($retry) {
        $id = array_key_first($retry);
        unset($retry[$id]);
        if ($confirmed[$id] !== "\0") {
            continue;
        }
        $again = true;
    } elseif ($next < $total) {
        if ($next >= $gate) {
            $settle();
            if ($retry) {
                continue;
            }
            emit(['p' => $confirmedCount, 'at' => microtime(true)]);
            $start = microtime(true);
            while ($next >= $gate) {
                usleep(20_000);
                $readGate();
            }
            $stats['gate_wait_s'] += microtime(true) - $start;
            continue;
        }
        $id = $next++;
        $again = false;
    } else {
        // Every id published; only confirms (and any republishing) remain.
        $settle();
        if (!$retry && $confirmedCount < $total) {
            throw new RuntimeException("producer: $confirmedCount of $total confirmed, nothing left to publish or retry");
        }
        continue;
    }
    $start = microtime(true);
    try {
        $producer->publish(pack('J', $id), $queue, '', ['message_id' => (string) $id]);
    } catch (ChannelException $e) {
        // Raised by publish() for an earlier publish's channel: this one was not sent, and
        // which of the batch failed is not known. All of them are published again.
        $stall('publish', $start, microtime(true) - $start);
        $stats['publish_exceptions']++;
        $stats['batches_failed_whole']++;
        $errors[] = 'publish: ' . get_class($e) . ': ' . $e->getMessage();
        $retry[$id] = true;
        foreach ($batch as $b) {
            $retry[$b] = true;
        }
        $batch = [];
        continue;
    }
    $stall('publish', $start, microtime(true) - $start);
    $stats['published']++;
    if ($again) {
        $stats['republished']++;
    }
    $batch[] = $id;
    if ($rate > 0 && $stats['published'] % 100 === 0) {
        // Paced: publishes so far at no more than $rate a second, evenly.
        $ahead = $t0 + $stats['gate_wait_s'] + $stats['published'] / $rate - microtime(true);
        if ($ahead > 0) {
            usleep((int) ($ahead * 1e6));
        }
    }
    if (count($batch) >= $batchSize) {
        $settle();
        $readGate();
        $now = microtime(true);
        if ($now - $lastEmit >= 0.05) {
            emit(['p' => $confirmedCount, 'at' => $now]);
            $lastEmit = $now;
        }
    }
}
$settle();
emit(['p' => $confirmedCount, 'at' => microtime(true)]);
$elapsed = microtime(true) - $t0;
$rusage1 = getrusage();
$pending = $producer->pendingConfirms();
$conn->close();
preg_match('/^VmHWM:\s+(\d+)/m', (string) file_get_contents('/proc/self/status'), $hwm);
emit(['final' => $stats + [
    'confirmed' => $confirmedCount,
    'unconfirmed_ids' => $total - substr_count($confirmed, "\1"),
    'pending_at_end' => $pending,
    'elapsed_s' => $elapsed,
    'cpu_s' => cpu_us($rusage0, $rusage1) / 1e6,
    'peak_rss_kb' => (int) ($hwm[1] ?? 0),
    'rss_end_kb' => rss_kb(),
    'errors' => array_slice($errors, 0, 20),
]]);
exit($confirmedCount === $total ? 0 : 1);
