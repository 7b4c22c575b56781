<?php
// Real-time data sync between servers: each server keeps a copy of some records (here an
// array), publishes each change it makes to the fanout exchange "<prefix>.sync" and applies
// the others' changes from its own queue. A change is (entity, id, version, data); of two
// changes to a record the higher version wins, and at equal versions the higher server name,
// so every server ends with the same records whatever order the changes arrived in.
//
//   php examples/sync/server.php --name=a [--idle=5] [--max-time=3600]   # in one terminal
//   php examples/sync/server.php --name=b                 # in another
//
// Then type changes into either, e.g.   set user 1 {"name":"Ann"}   and watch the other apply
// them; `show` prints the records. At the end of its input (Ctrl-D, or a pipe that closes) a
// server goes on applying the others' changes until none came for --idle seconds, prints its
// records as "state {json}" and exits (at the latest after --max-time seconds). AMQP_URI (default amqp://guest:guest@127.0.0.1:5672/%2f)
// picks the broker, AMQP_PREFIX (default "example") prefixes the exchange's name.

declare(strict_types=1);

use AmqpRs\Message;

$opt = getopt('', ['name:', 'idle:', 'max-time:']) + ['name' => gethostname(), 'idle' => 5, 'max-time' => 3600];
$uri = getenv('AMQP_URI') ?: 'amqp://guest:guest@127.0.0.1:5672/%2f';
$prefix = getenv('AMQP_PREFIX') ?: 'example';
$name = $opt['name'];

$conn = new AmqpRs\Connection($uri, ['name' => "sync server $name on $prefix.sync"]);
$conn->declareExchange("$prefix.sync", 'fanout');
// A queue of this server's own: named by the client (amq_rs.gen-...), so that after a lost
// connection it is declared and bound again under the same name; exclusive, so it goes with us.
$queue = $conn->declareQueue('', ['exclusive' => true]);
$conn->bindQueue($queue, "$prefix.sync");
$producer = $conn->producer();
$consumer = $conn->consumer($queue);

$records = [];                              // "entity:id" => the change that set it

/** Keeps $change unless the record has a later one: last writer wins, by version. */
$apply = function (array $change) use (&$records): bool {
    $key = "{$change['entity']}:{$change['id']}";
    $have = $records[$key] ?? null;
    if ($have !== null && [$have['version'], $have['origin']] >= [$change['version'], $change['origin']]) {
        return false;
    }
    $records[$key] = $change;
    return true;
};

/** A local change: apply it here, then tell the others. */
$set = function (string $entity, string $id, array $data) use (&$records, $apply, $producer, $prefix, $name) {
    $version = ($records["$entity:$id"]['version'] ?? 0) + 1;
    $change = ['entity' => $entity, 'id' => $id, 'version' => $version, 'origin' => $name, 'data' => $data];
    $apply($change);
    $producer->publishJson($change, '', "$prefix.sync", ['app_id' => $name]);
    $producer->waitForConfirms(5);
    echo "$name: set $entity:$id v$version\n";
};

/** A change from another server. */
$onChange = function (Message $m) use ($apply, $name) {
    if ($m->getAppId() === $name) {
        return;                             // our own, applied already
    }
    $c = $m->json();
    echo $apply($c) ? "$name: applied {$c['entity']}:{$c['id']} v{$c['version']} from {$c['origin']}\n"
                    : "$name: ignored {$c['entity']}:{$c['id']} v{$c['version']} from {$c['origin']} (older)\n";
};

echo "$name: ready, queue $queue\n";
stream_set_blocking(STDIN, false);
$idleSince = null;                          // set once our input has ended
$deadline = microtime(true) + (float) $opt['max-time'];
while (($idleSince === null || microtime(true) - $idleSince < (float) $opt['idle']) && microtime(true) < $deadline) {
    while (($line = fgets(STDIN)) !== false) {
        if (preg_match('/^set (\S+) (\S+) (.+)$/', trim($line), $cmd)) {
            $set($cmd[1], $cmd[2], json_decode($cmd[3], true, flags: JSON_THROW_ON_ERROR));
        } elseif (trim($line) === 'show') {
            echo json_encode($records, JSON_PRETTY_PRINT) . "\n";
        }
    }
    if ($idleSince === null && feof(STDIN)) {
        $idleSince = microtime(true);
    }
    // Apply what the others sent, for up to 0.2 s, then look at our input again. next() takes
    // from the prefetch buffer and keeps the subscription between slices (consume() would give
    // the buffer back to the queue each time it returns).
    $until = microtime(true) + 0.2;
    while (($m = $consumer->next(max(0.0, $until - microtime(true)))) !== null) {
        $onChange($m);
        $m->ack();
        if ($idleSince !== null) {
            $idleSince = microtime(true);
        }
    }
}
ksort($records);
echo "state ", json_encode($records), "\n";
$conn->close();
