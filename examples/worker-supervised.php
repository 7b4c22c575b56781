<?php
// A long-running worker for supervisord or systemd (examples/supervisord.conf,
// examples/amqp-rs-worker.service).
//
// - SIGTERM (what both send to stop a program) or SIGINT: the job in hand is finished and
//   acked, then the worker exits 0; jobs it had prefetched but not started go back to the
//   queue for the other workers. Nothing is lost, nothing is cut in half.
// - It recycles itself: after --max-time seconds, or once PHP uses more than --memory MiB, it
//   exits 0 the same way, and the supervisor starts a fresh process (leaks and stale state go).
// - It logs one line per event to stdout, which the supervisor collects (journald, log files).
// - A lost connection is recovered by the extension; one that cannot be recovered ends the
//   worker with exit code 1, and the supervisor starts it again after its back-off.
//
//   php examples/worker-supervised.php [--queue=NAME] [--demo-jobs=0] [--work-ms=200]
//       [--max-time=3600] [--memory=128] [--idle=0]
//
// --queue: the durable queue to work on (default "<prefix>.jobs"); --demo-jobs=N: publish N
// jobs to it first, to watch it work (press Ctrl-C in the middle of one); --idle=S: also exit
// after S seconds without a job (0: never). AMQP_URI (default
// amqp://guest:guest@127.0.0.1:5672/%2f) picks the broker, AMQP_PREFIX (default "example")
// prefixes the queue's name.

declare(strict_types=1);

use AmqpRs\Message;

$opt = getopt('', ['queue:', 'demo-jobs:', 'work-ms:', 'max-time:', 'memory:', 'idle:'])
    + ['demo-jobs' => 0, 'work-ms' => 200, 'max-time' => 3600, 'memory' => 128, 'idle' => 0];
$uri = getenv('AMQP_URI') ?: 'amqp://guest:guest@127.0.0.1:5672/%2f';
$queue = $opt['queue'] ?? (getenv('AMQP_PREFIX') ?: 'example') . '.jobs';

function logLine(string $message): void
{
    echo date('Y-m-d\TH:i:sP'), ' worker[', getmypid(), '] ', $message, "\n";
}

$stoppedBy = null;
foreach ([SIGTERM => 'SIGTERM', SIGINT => 'SIGINT'] as $signal => $signalName) {
    pcntl_signal($signal, function () use (&$stoppedBy, $signalName) {
        $stoppedBy = $signalName;           // consume() stops by itself; this is for the log
    });
}

try {
    $conn = new AmqpRs\Connection($uri, ['name' => 'worker ' . gethostname() . ' ' . getmypid()]);
    $conn->declareQueue($queue);            // durable
    if ($opt['demo-jobs'] > 0) {
        $producer = $conn->producer();
        for ($i = 1; $i <= (int) $opt['demo-jobs']; $i++) {
            $producer->publishJson(['job' => $i], $queue);
        }
        $producer->waitForConfirms();
    }
    logLine("started, consuming $queue");

    $started = microtime(true);
    $options = [
        'max_time' => (float) $opt['max-time'],
        'memory_limit' => (int) $opt['memory'],     // MiB
        'stop_signals' => [SIGTERM, SIGINT],        // the default, spelt out
    ];
    if ($opt['idle'] > 0) {
        $options['idle_timeout'] = (float) $opt['idle'];
    }
    $done = $conn->consumer($queue, ['prefetch' => 10])->consume(function (Message $m) use ($opt) {
        $job = $m->json();
        logLine("job {$job['job']} started" . ($m->isRedelivered() ? ' (redelivered)' : ''));
        usleep((int) $opt['work-ms'] * 1000);       // the work
        logLine("job {$job['job']} done");
    }, $options);

    pcntl_signal_dispatch();                        // runs our handler if a signal came mid-job
    $why = match (true) {
        $stoppedBy !== null => "got $stoppedBy",
        memory_get_usage() >= $opt['memory'] * 1024 * 1024 => 'memory limit reached',
        microtime(true) - $started >= $opt['max-time'] => 'max time reached',
        default => 'idle',
    };
    logLine("stopping ($why) after $done jobs");
    $conn->close();
    exit(0);
} catch (AmqpRs\Exception $e) {
    logLine('error: ' . get_class($e) . ': ' . $e->getMessage());
    exit(1);
}
