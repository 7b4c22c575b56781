<?php
// A task worker for QuorumPoisonTest: consumes QUEUE one task at a time (prefetch 1) and
// appends each task's body to OUT. A task whose body is "poison" crashes the process (SIGKILL
// to itself, as a segfault in a native library would): the task is never settled, and the
// broker hands it out again. Returns after IDLE seconds without a task.
// Args: queue out idle
declare(strict_types=1);

[, $queue, $out, $idle] = $argv;
$conn = new AmqpRs\Connection(getenv('AMQP_RS_TEST_URI') ?: 'amqp://guest:guest@127.0.0.1:5672/%2f');
$consumer = $conn->consumer($queue, ['prefetch' => 1]);
$consumer->consume(function (AmqpRs\Message $m) use ($out) {
    if ($m->getBody() === 'poison') {
        posix_kill(getmypid(), SIGKILL);
    }
    file_put_contents($out, $m->getBody() . "\n", FILE_APPEND);
}, ['idle_timeout' => (float) $idle]);
$conn->close();
