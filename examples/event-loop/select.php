<?php
// One process, one plain stream_select() loop, nothing ever blocking it: a consumer works
// through a queue of jobs, a producer waits for its confirms, an RPC client has calls in
// flight to a (slow) RPC server living in the same process on a second connection, and a
// 20 ms ticker keeps its beat through all of it. See docs/event-loops.md.
//
//   php -d extension=amqp_rs.so examples/event-loop/select.php [queue-prefix]
//
// The pattern: watch each connection's readiness() stream; when select() says one is
// readable, take from everything of that connection without waiting (Consumer::next(0.0)
// until null, Producer::pollConfirms(), RpcCall::poll()). Never read the stream itself.
declare(strict_types=1);

use AmqpRs\Connection;
use AmqpRs\Message;

$prefix = $argv[1] ?? 'example.event-loop';
$uri = getenv('AMQP_URI') ?: 'amqp://guest:guest@127.0.0.1:5672/%2f';
const JOBS = 2000, CALLS = 20, SERVER_DELAY = 0.2, TICK = 0.02;

$client = new Connection($uri, ['name' => 'event-loop client']);
$server = new Connection($uri, ['name' => 'event-loop server']);
$jobs = $client->declareQueue("$prefix.jobs", ['exclusive' => true, 'durable' => false]);
$requests = $server->declareQueue("$prefix.rpc", ['exclusive' => true, 'durable' => false]);

$producer = $client->producer();
$worker = $client->consumer($jobs);
$rpcServer = $server->consumer($requests, ['auto_ack' => true]);
$streams = [$client->readiness(), $server->readiness()];

// Join the consumers to their streams: take until there is nothing.
$worker->next(0.0);
$rpcServer->next(0.0);

$start = microtime(true);
for ($i = 0; $i < JOBS; $i++) {
    $producer->publish("job $i", $jobs);
}
$unconfirmed = $producer->pollConfirms();
$calls = [];
for ($i = 0; $i < CALLS; $i++) {
    $calls[$i] = $client->rpcAsync("call $i", $requests, '', [], 5.0);
}
echo "select: waiting for " . JOBS . " jobs and " . CALLS . " replies\n";

$done = 0;
$replies = [];
$dueReplies = [];         // [due time, request] the server answers once SERVER_DELAY is over
$nextTick = $start + TICK;
$ticks = 0;
$worstLag = 0.0;
while ($done < JOBS || $unconfirmed > 0 || count($replies) < CALLS) {
    $now = microtime(true);
    $wake = min($nextTick, $dueReplies ? $dueReplies[0][0] : INF);
    $wait = max(0.0, $wake - $now);
    $read = $streams;
    $w = $e = null;
    stream_select($read, $w, $e, (int) $wait, (int) (($wait - (int) $wait) * 1e6));

    $now = microtime(true);
    if ($now >= $nextTick) {
        $worstLag = max($worstLag, $now - $nextTick);
        $ticks++;
        $nextTick += TICK * (1 + floor(($now - $nextTick) / TICK));
    }
    // The worker: everything buffered, without waiting.
    while ($job = $worker->next(0.0)) {
        $job->ack();
        $done++;
    }
    if ($unconfirmed > 0) {
        $unconfirmed = $producer->pollConfirms();
    }
    // The server: note each request, answer it once its delay is over.
    while ($request = $rpcServer->next(0.0)) {
        $dueReplies[] = [microtime(true) + SERVER_DELAY, $request];
    }
    while ($dueReplies && $dueReplies[0][0] <= microtime(true)) {
        /** @var Message $request */
        [, $request] = array_shift($dueReplies);
        $request->reply(strtoupper($request->getBody()));
    }
    foreach ($calls as $i => $call) {
        if ($reply = $call->poll()) {
            $replies[$i] = $reply->getBody();
            unset($calls[$i]);
        }
    }
}
$took = microtime(true) - $start;
printf("select: %d jobs published, confirmed and consumed\n", JOBS);
printf("select: %d replies (%s ... %s), each served %.0f ms after it came\n",
    count($replies), $replies[0], $replies[CALLS - 1], SERVER_DELAY * 1000);
printf("select: done in %.0f ms; the %d ms ticker fired %d times, worst lag %.1f ms\n",
    $took * 1000, TICK * 1000, $ticks, $worstLag * 1000);
$client->close();
$server->close();
