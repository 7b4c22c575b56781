<?php
// make soak: a soak benchmark (not part of `make test`). N messages (default 1 000 000) go
// producer → durable queue → worker, each side a PHP process of its own with its own
// amqp_rs connection, while the broker closes one of those connections every --every
// messages (rabbitmqctl close_connection): the producer's, then the worker's, then both,
// and round again. Automatic recovery must carry both on with nothing lost.
//
//   php benches/soak.php [--messages=N] [--every=N] [--prefetch=500] [--batch=1000]
//                        [--rate=MSGS_PER_S] [--timeout=S] [--hang=S] [--so=PATH] [--json=PATH]
//
// - Queue 'amqp_rs.soak': a durable classic queue (x-queue-type classic), persistent messages.
// - The producer (clients/soak_producer.php) publishes ids 0..N-1 with confirms, waits for
//   them every --batch publishes and publishes again every id reported failed
//   (PublishException::getFailures(): "lost before the broker confirmed it" after a
//   disconnect), until every id is confirmed: an at-least-once producer.
// - The worker (clients/soak_worker.php) acks each message (prefetch --prefetch), records
//   the ids in a bitmap and counts duplicates and redelivered flags; it ends once every id
//   was seen, the producer is done and the queue is drained.
// - Disconnect k (k = 1, 2, ... while k * every < N) is made when the side it hits has
//   reached k * every messages (producer: confirmed, worker: distinct ids seen; "both" goes
//   by the producer). One at a time: the next waits until the broker shows the closed
//   connections back under new ids. So that a fast producer cannot outrun the schedule, it
//   is held (a "gate") from publishing past the threshold after the pending one; the time it
//   spent held is reported, and is 0 when the schedule keeps up.
//
// --rate caps the producer (msgs/s) for short runs: with --messages=50000 --every=10000 an
// unpaced producer reaches each threshold before rabbitmqctl has closed anything, waits at its
// gate, and the closes land with nothing in flight; --rate=4000 keeps publishes in flight.
//
// Reports total time, msgs/s, each disconnect with the client's stall around it, failures
// reported to the producer and republished, duplicates and redelivered flags at the worker,
// ids missing (must be 0), peak RSS (VmHWM) of both processes. Writes the summary as JSON to
// benches/results/soak-latest.json. Exits 1 if an id is missing or anything failed.
// A process that makes no progress for --hang seconds (default 120) has its threads'
// backtraces taken with gdb (benches/results/soak-hang-*.txt) before the run is abandoned.

declare(strict_types=1);

$opts = getopt('', ['messages:', 'every:', 'prefetch:', 'batch:', 'rate:', 'timeout:', 'hang:', 'so:', 'json:', 'queue:']);
$total = (int) ($opts['messages'] ?? 1_000_000);
$every = (int) ($opts['every'] ?? 100_000);
$prefetch = (int) ($opts['prefetch'] ?? 500);
$batch = (int) ($opts['batch'] ?? 1000);
$rate = (float) ($opts['rate'] ?? 0);
$timeout = (float) ($opts['timeout'] ?? max(1800, $total / 250));
$hangAfter = (float) ($opts['hang'] ?? 120);
$so = $opts['so'] ?? __DIR__ . '/../target/release/libamqp_rs.so';
$queue = $opts['queue'] ?? 'amqp_rs.soak';
$resultsDir = __DIR__ . '/results';
$jsonPath = $opts['json'] ?? "$resultsDir/soak-latest.json";
if ($total < 1 || $every < 1) {
    fwrite(STDERR, "--messages and --every must be positive\n");
    exit(2);
}
if (!is_file($so)) {
    fwrite(STDERR, "no extension at $so (build it, or pass --so=PATH)\n");
    exit(2);
}
@mkdir($resultsDir, 0777, true);

$php = [PHP_BINARY, '-n', '-d', "extension=$so", '-d', 'display_errors=stderr', '-d', 'memory_limit=512M'];
$tag = 'amqp_rs.soak.' . getmypid();
$names = ['producer' => "$tag.producer", 'worker' => "$tag.worker"];

/** A child process whose output is read without blocking, line by line. */
final class Child
{
    /** @var resource */
    public $proc;
    public array $pipes = [];
    public int $pid;
    public string $out = '';
    public string $err = '';
    public ?int $code = null;
    public float $started;
    public ?float $ended = null;

    public function __construct(public array $cmd, bool $stdin = false)
    {
        $spec = [1 => ['pipe', 'w'], 2 => ['pipe', 'w']];
        $spec[0] = $stdin ? ['pipe', 'r'] : ['file', '/dev/null', 'r'];
        $this->proc = proc_open($cmd, $spec, $this->pipes);
        if (!is_resource($this->proc)) {
            throw new RuntimeException('cannot start ' . implode(' ', $cmd));
        }
        $this->pid = proc_get_status($this->proc)['pid'];
        $this->started = microtime(true);
        stream_set_blocking($this->pipes[1], false);
        stream_set_blocking($this->pipes[2], false);
    }

    /** Open output pipes, for stream_select(). */
    public function streams(): array
    {
        return array_values(array_filter([$this->pipes[1] ?? null, $this->pipes[2] ?? null]));
    }

    /** Reads what is there; reaps the process once both pipes are at EOF. */
    public function pump(): void
    {
        foreach ([1 => 'out', 2 => 'err'] as $i => $buf) {
            if (!isset($this->pipes[$i])) {
                continue;
            }
            while (($chunk = fread($this->pipes[$i], 65536)) !== false && $chunk !== '') {
                $this->$buf .= $chunk;
            }
            if (feof($this->pipes[$i])) {
                fclose($this->pipes[$i]);
                unset($this->pipes[$i]);
            }
        }
        if ($this->code === null && !isset($this->pipes[1]) && !isset($this->pipes[2])) {
            if (isset($this->pipes[0])) {
                fclose($this->pipes[0]);
                unset($this->pipes[0]);
            }
            $this->code = proc_close($this->proc);
            $this->ended = microtime(true);
        }
    }

    /** Complete stdout lines read since the last call. */
    public function lines(): array
    {
        $nl = strrpos($this->out, "\n");
        if ($nl === false) {
            return [];
        }
        $lines = explode("\n", substr($this->out, 0, $nl));
        $this->out = substr($this->out, $nl + 1);
        return $lines;
    }

    public function send(string $line): void
    {
        if (isset($this->pipes[0])) {
            @fwrite($this->pipes[0], "$line\n");
        }
    }

    public function done(): bool
    {
        return $this->code !== null;
    }

    public function kill(): void
    {
        if ($this->code === null) {
            proc_terminate($this->proc, 9);
        }
    }
}

function ctl(string ...$args): Child
{
    return new Child(['rabbitmqctl', ...$args]);
}

/** Runs a child to its end (short commands), pumping it. */
function finish(Child $c, float $limit = 60): Child
{
    $deadline = microtime(true) + $limit;
    while (!$c->done()) {
        if (microtime(true) > $deadline) {
            $c->kill();
        }
        $r = $c->streams();
        $none = null;
        if ($r) {
            @stream_select($r, $none, $none, 0, 100_000);
        }
        $c->pump();
    }
    return $c;
}

/** name => broker connection pid, for our connections, from a finished list_connections. */
function parse_connections(Child $c, array $names): array
{
    $found = [];
    foreach (explode("\n", $c->out) as $line) {
        foreach ($names as $who => $name) {
            // client_properties holds {"connection_name",longstr,"<name>"}
            if (str_contains($line, "\"$name\"")) {
                $found[$who] = strtok($line, "\t");
            }
        }
    }
    return $found;
}

$listConnections = fn () => ctl('list_connections', 'pid', 'client_properties', '-q', '--no-table-headers');

// Fresh queue.
$setup = finish(new Child([...$php, '-r',
    '$c = new AmqpRs\Connection(); $c->deleteQueue($argv[1]);
     $c->declareQueue($argv[1], ["durable" => true, "arguments" => ["x-queue-type" => "classic"]]);
     echo json_encode($c->queueStatus($argv[1])), "\n"; $c->close();', $queue]));
if ($setup->code !== 0) {
    fwrite(STDERR, "queue setup failed: $setup->out $setup->err\n");
    exit(1);
}

// The schedule: producer, worker, both, producer, ... (with at least one "both").
$plan = [];
$cycle = ['producer', 'worker', 'both'];
$count = (int) ceil($total / $every) - 1;
for ($k = 1; $k <= $count; $k++) {
    $plan[] = ['k' => $k, 'target' => $cycle[($k - 1) % 3], 'threshold' => $k * $every];
}
if ($plan && $count < 3) {
    $plan[$count - 1]['target'] = 'both';
}
// What the producer may publish up to while disconnect $done + 1 is pending: the next
// threshold, and before the last disconnect all but one id, so it is still there for it.
$gateFor = function (int $done) use ($plan, $total): int {
    if (isset($plan[$done + 1])) {
        return $plan[$done + 1]['threshold'];
    }
    return $done < count($plan) ? $total - 1 : $total;
};

$t0 = microtime(true);
$worker = new Child([...$php, __DIR__ . '/clients/soak_worker.php', "--messages=$total", "--queue=$queue",
    "--name={$names['worker']}", "--prefetch=$prefetch", "--timeout=$timeout"], true);
$producer = new Child([...$php, __DIR__ . '/clients/soak_producer.php', "--messages=$total", "--queue=$queue",
    "--name={$names['producer']}", "--batch=$batch", "--rate=$rate"], true);
$gate = $gateFor(0);
$producer->send("gate $gate");
$children = ['producer' => $producer, 'worker' => $worker];

$progress = ['producer' => 0, 'worker' => 0];
$lastMove = ['producer' => microtime(true), 'worker' => microtime(true)];
$finals = [];
$other = ['producer' => [], 'worker' => []];       // stdout lines that are not ours
$events = ['producer' => [], 'worker' => []];      // [start, duration] of stalls / delivery gaps
$brokerPids = [];
$done = 0;
$action = null;                                    // the disconnect under way
$poll = null;                                      // a list_connections under way
$disconnects = [];
$problems = [];
$hangs = [];
$lastStatus = $t0;
$producerDoneSent = false;

$say = function (string $line) use ($t0): void {
    printf("[%7.1f s] %s\n", microtime(true) - $t0, $line);
};
$say(sprintf('soak: %d messages, a disconnect every %d (%d planned), queue %s (durable classic), prefetch %d, confirm batch %d',
    $total, $every, count($plan), $queue, $prefetch, $batch));

while (!$worker->done() || !$producer->done()) {
    $now = microtime(true);
    if ($now - $t0 > $timeout + 120) {
        $problems[] = sprintf('the run took more than %.0f s: abandoned', $timeout + 120);
        foreach ($children as $c) {
            $c->kill();
        }
        break;
    }
    $read = [];
    foreach ([...array_values($children), ...array_filter([$poll, ...($action['closes'] ?? [])])] as $c) {
        array_push($read, ...$c->streams());
    }
    $none = null;
    if ($read) {
        @stream_select($read, $none, $none, 0, 50_000);
    }

    foreach ($children as $who => $c) {
        $c->pump();
        foreach ($c->lines() as $line) {
            $msg = json_decode($line, true);
            if (!is_array($msg)) {
                $other[$who][] = $line;
            } elseif (isset($msg['final'])) {
                $finals[$who] = $msg['final'];
            } elseif (isset($msg['p']) || isset($msg['w'])) {
                $n = $msg['p'] ?? $msg['w'];
                if ($n !== $progress[$who]) {
                    $lastMove[$who] = microtime(true);
                }
                $progress[$who] = $n;
            } elseif (isset($msg['stall'])) {
                $events[$who][] = [$msg['at'], $msg['s'], $msg['stall']];
            } elseif (isset($msg['gap'])) {
                $events[$who][] = [$msg['at'], $msg['gap'], 'delivery gap'];
            }
        }
    }

    // Our connections' broker ids: known before the first disconnect, refreshed after each.
    if ($poll === null && ($action === null ? count($brokerPids) < 2 && $done === 0 : $action['phase'] === 'awaiting')) {
        $poll = $listConnections();
    }
    if ($poll !== null) {
        $poll->pump();
        if ($poll->done()) {
            $found = parse_connections($poll, $names);
            $polledAt = microtime(true);
            $poll = null;
            if ($action === null) {
                $brokerPids = $found;
            } else {
                $back = true;
                foreach ($action['who'] as $who) {
                    if (!isset($found[$who]) || $found[$who] === $action['old'][$who]) {
                        $back = false;
                    }
                }
                if ($back || $polledAt - $action['closed_at'] > 90) {
                    $d = &$disconnects[count($disconnects) - 1];
                    $d['back_within_s'] = $back ? round($polledAt - $action['closed_at'], 3) : null;
                    if (!$back) {
                        $problems[] = "disconnect {$d['k']} ({$d['target']}): the connection did not come back within 90 s";
                    }
                    unset($d);
                    $brokerPids = $found + $brokerPids;
                    $action = null;
                    $done++;
                    $gate = $gateFor($done);
                    $producer->send("gate $gate");
                    $say(sprintf('disconnect %d back: broker shows %s', $done, implode(', ', array_map(
                        fn ($w) => "$w " . ($found[$w] ?? 'none'), array_keys($names)))));
                }
            }
        }
    }

    // The next disconnect, when its side has got that far.
    if ($action === null && $poll === null && isset($plan[$done]) && count($brokerPids) === 2) {
        $step = $plan[$done];
        $side = $step['target'] === 'worker' ? 'worker' : 'producer';
        if ($progress[$side] >= $step['threshold']) {
            $who = $step['target'] === 'both' ? ['producer', 'worker'] : [$step['target']];
            $alive = array_filter($who, fn ($w) => !$children[$w]->done());
            $action = ['phase' => 'closing', 'who' => array_values($alive), 'old' => [], 'closes' => [],
                'issued_at' => microtime(true)];
            foreach ($alive as $w) {
                $action['old'][$w] = $brokerPids[$w];
                $action['closes'][$w] = ctl('close_connection', $brokerPids[$w], "soak disconnect {$step['k']}");
            }
            $disconnects[] = $step + [
                'issued_at' => $action['issued_at'] - $t0,
                'producer_confirmed' => $progress['producer'], 'worker_seen' => $progress['worker'],
                'closed' => array_values($alive),
            ];
            if (count($alive) !== count($who)) {
                $problems[] = "disconnect {$step['k']}: " . implode(', ', array_diff($who, $alive)) . ' had already exited';
            }
            $say(sprintf('disconnect %d: closing %s (producer %d confirmed, worker %d seen)',
                $step['k'], implode(' + ', $alive), $progress['producer'], $progress['worker']));
        }
    }
    if ($action !== null && $action['phase'] === 'closing') {
        $allClosed = true;
        foreach ($action['closes'] as $w => $c) {
            $c->pump();
            $allClosed = $allClosed && $c->done();
        }
        if ($allClosed) {
            $d = &$disconnects[count($disconnects) - 1];
            foreach ($action['closes'] as $w => $c) {
                if ($c->code !== 0) {
                    $problems[] = "disconnect {$d['k']}: rabbitmqctl close_connection for the $w failed ($c->code): " . trim($c->out . $c->err);
                }
            }
            $action['closed_at'] = microtime(true);
            $d['rabbitmqctl_s'] = round($action['closed_at'] - $action['issued_at'], 3);
            $d['closed_at'] = $action['closed_at'] - $t0;
            unset($d);
            $action['phase'] = 'awaiting';
            $action['closes'] = [];
        }
    }

    // Producer finished: the worker may drain once the schedule is complete.
    if ($producer->done() && !$producerDoneSent && ($done >= count($plan) || $action === null && !isset($plan[$done]))) {
        $worker->send('done');
        $producerDoneSent = true;
        $say(sprintf('producer finished (exit %d): %d confirmed', $producer->code, $progress['producer']));
    }
    if ($producer->done() && $producer->code !== 0 && !$producerDoneSent) {
        // It failed: nothing more will come; let the worker end so the failure is reported.
        $worker->send('done');
        $producerDoneSent = true;
        $problems[] = "producer exited with $producer->code";
    }

    // A process that stopped moving: take its backtraces, then give up on the run.
    foreach ($children as $who => $c) {
        // The producer held at its gate, or a worker that has all the producer confirmed so
        // far, is waiting, not stuck.
        $shouldMove = $who === 'producer'
            ? $progress['producer'] < min($gate, $total)
            : $progress['worker'] < $progress['producer'];
        if (!$shouldMove) {
            $lastMove[$who] = microtime(true);
        }
        if (!$c->done() && $shouldMove && microtime(true) - $lastMove[$who] > $hangAfter && !isset($hangs[$who])) {
            $file = "$resultsDir/soak-hang-$who-$c->pid.txt";
            exec(sprintf('gdb -p %d -batch -ex %s 2>&1', $c->pid, escapeshellarg('thread apply all bt')), $bt);
            file_put_contents($file, implode("\n", $bt) . "\n");
            $hangs[$who] = $file;
            $problems[] = sprintf('%s (pid %d) made no progress for %.0f s at %d: backtraces in %s',
                $who, $c->pid, $hangAfter, $progress[$who], $file);
            $say(end($problems));
            foreach ($children as $k) {
                $k->kill();
            }
        }
    }

    if (microtime(true) - $lastStatus >= 10) {
        $lastStatus = microtime(true);
        $say(sprintf('producer %d confirmed, worker %d seen', $progress['producer'], $progress['worker']));
    }
}
$elapsed = ($worker->ended ?? microtime(true)) - $t0;
$say(sprintf('worker finished (exit %s)', var_export($worker->code, true)));

// What each disconnect cost the side(s) it hit: the longest stall (producer: one publish()
// or waitForConfirms() call; worker: the pause between two deliveries) that overlaps the
// time from the close being asked for to 5 s after the broker showed the connection back,
// counted from the moment the close was asked for at the earliest (a worker that was idle
// before is not charged for it). An upper bound on the client's recovery: a worker also
// pauses while the producer has nothing for it.
foreach ($disconnects as $i => &$d) {
    $from = $t0 + $d['issued_at'];
    $to = $t0 + ($d['closed_at'] ?? $d['issued_at']) + ($d['back_within_s'] ?? 0) + 5;
    if (isset($disconnects[$i + 1])) {
        $to = min($to, $t0 + $disconnects[$i + 1]['issued_at']);
    }
    foreach ($d['closed'] as $who) {
        $worst = null;
        foreach ($events[$who] as [$at, $s, $what]) {
            $s = $at + $s - max($at, $from);
            if ($at < $to && $s > 0 && ($worst === null || $s > $worst[1])) {
                $worst = [$at, $s, $what];
            }
        }
        $d['stall_s'][$who] = $worst ? round($worst[1], 3) : null;
        $d['stall_in'][$who] = $worst[2] ?? null;
    }
    $d['issued_at'] = round($d['issued_at'], 3);
    $d['closed_at'] = round($d['closed_at'] ?? 0, 3);
}
unset($d);

$p = $finals['producer'] ?? null;
$w = $finals['worker'] ?? null;
foreach (['producer' => $producer, 'worker' => $worker] as $who => $c) {
    if (!isset($finals[$who])) {
        $problems[] = "$who gave no summary (exit " . var_export($c->code, true) . ')';
    } elseif ($c->code !== 0) {
        $problems[] = "$who exited with $c->code";
    }
    if (trim($c->err) !== '') {
        $problems[] = "$who stderr: " . substr(trim($c->err), 0, 4000);
    }
    if ($other[$who]) {
        $problems[] = "$who other output: " . substr(implode("\n", $other[$who]), 0, 2000);
    }
}
$missing = $w['missing'] ?? $total;
if ($w !== null && $missing > 0) {
    $problems[] = "$missing ids never reached the worker, e.g. " . implode(', ', $w['missing_sample']);
}
if ($w !== null && $w['bad_messages'] > 0) {
    $problems[] = "{$w['bad_messages']} deliveries were not ours or did not match their message_id";
}
if ($w !== null && !$w['drained']) {
    $problems[] = 'the queue was not drained at the end (' . var_export($w['queue_left'], true) . ' ready)';
}
if ($p !== null && $p['unconfirmed_ids'] > 0) {
    $problems[] = "the producer ended with {$p['unconfirmed_ids']} ids never confirmed";
}
if (count($disconnects) < count($plan)) {
    $problems[] = sprintf('%d of %d planned disconnects done', count($disconnects), count($plan));
}

// Leave the queue for inspection if anything went wrong.
if (!$problems) {
    finish(new Child([...$php, '-r', '$c = new AmqpRs\Connection(); $c->deleteQueue($argv[1]); $c->close();', $queue]));
}

$stalls = fn (string $who) => array_values(array_filter(array_map(fn ($d) => $d['stall_s'][$who] ?? null, $disconnects), fn ($x) => $x !== null));
$summary = [
    'when' => date('c'),
    'host' => php_uname('n') . ', ' . trim((string) shell_exec('nproc')) . ' cores',
    'extension' => realpath($so),
    'config' => ['messages' => $total, 'every' => $every, 'prefetch' => $prefetch, 'confirm_batch' => $batch,
        'producer_rate_limit' => $rate ?: null,
        'queue' => $queue, 'queue_type' => 'classic, durable', 'delivery_mode' => 2, 'body' => '8 bytes (id), message_id = id'],
    'ok' => !$problems,
    'elapsed_s' => round($elapsed, 3),
    'msgs_per_s' => round($total / $elapsed, 1),
    'disconnects_planned' => count($plan),
    'disconnects_done' => count($disconnects),
    'disconnects' => $disconnects,
    'producer' => $p,
    'worker' => $w,
    'missing_ids' => $missing,
    'problems' => $problems,
    // Every producer call that blocked >= 50 ms and every worker pause >= 100 ms between two
    // deliveries: [seconds since the start, seconds, what].
    'stalls' => array_map(fn ($who) => array_map(fn ($e) => [round($e[0] - $t0, 3), $e[1], $e[2]], $events[$who]),
        ['producer' => 'producer', 'worker' => 'worker']),
];
file_put_contents($jsonPath, json_encode($summary, JSON_PRETTY_PRINT | JSON_UNESCAPED_SLASHES) . "\n");

$mb = fn ($kb) => $kb === null ? '-' : sprintf('%.1f MB', $kb / 1024);
$fmtStalls = function (array $xs): string {
    if (!$xs) {
        return '-';
    }
    return sprintf('%d: min %.2f s, median %.2f s, max %.2f s', count($xs), min($xs), (function ($xs) {
        sort($xs);
        $n = count($xs);
        return $n % 2 ? $xs[intdiv($n, 2)] : ($xs[$n / 2 - 1] + $xs[$n / 2]) / 2;
    })($xs), max($xs));
};
echo "\n";
printf("%-4s %-9s %12s %12s %10s %10s %12s %12s\n", 'k', 'closed', 'producer at', 'worker at', 'ctl s', 'back ≤ s', 'prod stall', 'work stall');
foreach ($disconnects as $d) {
    printf("%-4d %-9s %12d %12d %10.2f %10s %12s %12s\n", $d['k'], $d['target'], $d['producer_confirmed'], $d['worker_seen'],
        $d['rabbitmqctl_s'] ?? 0, isset($d['back_within_s']) ? sprintf('%.2f', $d['back_within_s']) : '-',
        isset($d['stall_s']['producer']) ? sprintf('%.3f s', $d['stall_s']['producer']) : '-',
        isset($d['stall_s']['worker']) ? sprintf('%.3f s', $d['stall_s']['worker']) : '-');
}
echo "\n";
$rows = [
    'messages' => number_format($total),
    'total time' => sprintf('%.1f s', $elapsed),
    'throughput' => sprintf('%.0f msgs/s (end to end, producer start to worker end)', $total / $elapsed),
    'disconnects' => sprintf('%d of %d planned (%s)', count($disconnects), count($plan),
        implode(', ', array_map(fn ($d) => $d['target'], $disconnects))),
    'stall, producer' => $fmtStalls($stalls('producer')),
    'stall, worker' => $fmtStalls($stalls('worker')),
    'producer: published' => $p ? sprintf('%d (%d republished)', $p['published'], $p['republished']) : '-',
    'producer: failures' => $p ? sprintf('%d reported (%s)', $p['failures_reported'],
        $p['failure_reasons'] ? implode('; ', array_map(fn ($r, $n) => "$n $r", array_keys($p['failure_reasons']), $p['failure_reasons'])) : 'none') : '-',
    'producer: exceptions' => $p ? sprintf('%d channel, %d timeouts, %d from publish()', $p['channel_exceptions'], $p['timeouts'], $p['publish_exceptions']) : '-',
    'producer: held by gate' => $p ? sprintf('%.1f s', $p['gate_wait_s']) : '-',
    'producer: confirmed' => $p ? sprintf('%d of %d', $p['confirmed'], $total) : '-',
    'worker: deliveries' => $w ? sprintf('%d (%d distinct ids)', $w['deliveries'], $w['unique']) : '-',
    'worker: duplicates' => $w ? sprintf('%d (%d flagged redelivered, %d not: republished by the producer); max %d times one id',
        $w['duplicates'], $w['duplicates_redelivered'], $w['duplicates_not_redelivered'], $w['max_times_seen']) : '-',
    'worker: redelivered flag' => $w ? sprintf('%d deliveries (%d of them the first sight of their id)', $w['redelivered_flag'], $w['first_seen_redelivered']) : '-',
    'missing ids' => (string) $missing,
    'peak RSS producer' => $p ? $mb($p['peak_rss_kb']) . sprintf(' (%.1f s CPU)', $p['cpu_s']) : '-',
    'peak RSS worker' => $w ? $mb($w['peak_rss_kb']) . sprintf(' (%.1f s CPU)', $w['cpu_s']) : '-',
];
foreach ($rows as $k => $v) {
    printf("%-26s %s\n", $k, $v);
}
printf("%-26s %s\n", 'summary', $jsonPath);
if ($problems) {
    echo "\nPROBLEMS:\n";
    foreach ($problems as $pr) {
        echo " - $pr\n";
    }
}
exit($problems ? 1 : 0);
