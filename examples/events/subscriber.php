<?php
// Event-driven system, subscriber side: one process of a consumer group.
//
// A consumer group is one durable queue, "<prefix>.events.<group>", bound to the topic
// exchange with the group's patterns. Every group gets its own copy of each event it is bound
// for; the processes of one group share its queue, so each event is handled by one of them.
// A handler that throws has its event retried (after 1 s, then 2 s, 4 s), then dead-lettered to
// "<prefix>.events.<group>.dead" with the reason. Handlers are idempotent: an event whose
// message_id was handled already is skipped (ProcessedIds below).
//
//   php examples/events/subscriber.php --group=billing [--bind='order.*'] [--work-ms=20]
//       [--retry-delay=1] [--idle=10] [--max-time=3600] [--store=DIR]
//
// --bind: comma-separated patterns (default '#', every event: * is one word, # any number);
// --store: the directory in which each group keeps the ids it handled (default /tmp).
// Exits after --idle seconds without an event, after --max-time seconds, or on SIGTERM/SIGINT
// once the event in hand is handled. AMQP_URI and AMQP_PREFIX as for publisher.php.

declare(strict_types=1);

use AmqpRs\Message;

/**
 * The message_ids a consumer group has handled, one file each, shared by the group's processes
 * on this machine. A file lock held while the handler runs keeps two copies of an event from
 * being handled at once, and is let go by the OS if the process dies, so the redelivered event
 * is handled then. In production keep the ids where the handler writes: a table with the id as
 * primary key, inserted in the handler's own transaction (INSERT fails: a duplicate), or Redis
 * (SET id NX with an expiry); and expire old ids, which this directory never does.
 */
final class ProcessedIds
{
    public function __construct(private string $dir)
    {
        // Several subscribers may start at once: another one may make the directory between
        // the check and the mkdir(), which then fails with a warning while the directory is there.
        if (!is_dir($dir) && !@mkdir($dir, 0777, true) && !is_dir($dir)) {
            throw new RuntimeException("cannot create the processed-ids directory $dir");
        }
    }

    /** Runs $handler unless the event was handled already; true when it ran. */
    public function once(?string $id, callable $handler): bool
    {
        if ($id === null) {                                     // nothing to recognise it by
            $handler();
            return true;
        }
        $file = fopen("$this->dir/" . sha1($id), 'c+');
        try {
            if (!flock($file, LOCK_EX | LOCK_NB)               // another process is handling it
                || stream_get_contents($file) === 'done') {     // or it was handled
                return false;
            }
            $handler();                                         // throws: not done, a retry may run it
            fwrite($file, 'done');
            return true;
        } finally {
            fclose($file);                                      // lets go of the lock
        }
    }
}

$opt = getopt('', ['group:', 'bind:', 'work-ms:', 'retry-delay:', 'idle:', 'max-time:', 'store:'])
    + ['group' => 'audit', 'bind' => '#', 'work-ms' => 20, 'retry-delay' => 1.0, 'idle' => 10, 'max-time' => 3600];
$uri = getenv('AMQP_URI') ?: 'amqp://guest:guest@127.0.0.1:5672/%2f';
$prefix = getenv('AMQP_PREFIX') ?: 'example';
$group = $opt['group'];
$me = "$group/" . getmypid();

$conn = new AmqpRs\Connection($uri, ['name' => "subscriber $me"]);
$conn->declareExchange("$prefix.events", 'topic');
$queue = $conn->declareQueue("$prefix.events.$group");         // durable: the group's events wait
foreach (explode(',', $opt['bind']) as $pattern) {             // while none of its processes run
    $conn->bindQueue($queue, "$prefix.events", $pattern);
}
$processed = new ProcessedIds(($opt['store'] ?? sys_get_temp_dir()) . "/$prefix.events.$group.processed");

/** The group's business logic. */
$handle = function (string $event, array $data) use ($opt) {
    if ($event === 'order.created' && $data['amount'] < 0) {
        throw new DomainException("order {$data['order']} has a negative amount");
    }
    usleep((int) $opt['work-ms'] * 1000);                       // update the books, send a mail...
};

$consumer = $conn->consumer($queue, ['prefetch' => 10]);
echo "$me: listening on $queue for {$opt['bind']}\n";

$handled = $consumer->consume(function (Message $m) use ($processed, $handle, $me) {
    // The event's name is its routing key, on a retry too (the original is kept).
    $event = $m->getRoutingKey();
    $data = $m->json();
    try {
        $ran = $processed->once($m->getMessageId(), fn () => $handle($event, $data));
    } catch (Throwable $e) {
        echo "$me: failed $event {$data['n']} (attempt {$m->getAttempt()}): {$e->getMessage()}\n";
        throw $e;                                               // on_error 'retry' takes it from here
    }
    echo $ran ? "$me: handled $event {$data['n']} {$m->getMessageId()}\n"
              : "$me: skipped duplicate $event {$data['n']} {$m->getMessageId()}\n";
}, [
    'on_error' => 'retry',
    'max_retries' => 3,
    'retry_delay' => (float) $opt['retry-delay'],
    'idle_timeout' => (float) $opt['idle'],
    'max_time' => (float) $opt['max-time'],
]);
echo "$me: $handled deliveries, exiting\n";
$conn->close();
