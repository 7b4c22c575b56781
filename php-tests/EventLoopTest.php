<?php

declare(strict_types=1);

require_once __DIR__ . '/Support/ForkedChild.php';
require_once __DIR__ . '/Support/Select.php';

use AmqpRs\Connection;
use AmqpRs\ConnectionException;
use AmqpRs\Consumer;
use AmqpRs\PublishException;
use AmqpRs\RpcCall;
use AmqpRs\TimeoutException;
use AmqpRs\Tests\Support\Broker;
use AmqpRs\Tests\Support\Children;
use AmqpRs\Tests\Support\ForkedChild;
use AmqpRs\Tests\Support\Select;
use PHPUnit\Framework\TestCase;

/**
 * The raw event-loop API (issue 19): Connection::readiness(), Consumer::next(0.0),
 * Producer::pollConfirms(), Connection::rpcAsync() and RpcCall, driven by plain stream_select()
 * loops. Readability is checked with a zero timeout, waited for up to a deadline.
 */
final class EventLoopTest extends TestCase
{
    use ForkedChild;

    /** @var list<string> queues that outlive their connection, deleted in tearDown */
    private array $queues = [];
    /** @var resource|null Support/slow_rpc_server.php */
    private $server = null;
    private array $pipes = [];

    protected function tearDown(): void
    {
        if ($this->server !== null) {
            Children::end($this->server, $this->pipes, SIGTERM, 5.0);
        }
        if ($this->queues !== []) {
            $conn = new Connection(Broker::uri());
            foreach ($this->queues as $queue) {
                $conn->deleteQueue($queue);
            }
            $conn->close();
        }
    }

    private function exclusiveQueue(Connection $conn): string
    {
        return $conn->declareQueue('', ['exclusive' => true, 'durable' => false]);
    }

    /** Starts Support/slow_rpc_server.php on a new queue; returns the queue once it serves. */
    private function slowServer(int $delayMs = 200): string
    {
        $queue = Broker::unique('rawloop-rpc');
        $admin = new Connection(Broker::uri());
        $admin->declareQueue($queue, ['durable' => false]);
        $admin->close();
        $this->queues[] = $queue;
        $cmd = [PHP_BINARY, '-d', 'extension=' . Broker::extensionPath(), __DIR__ . '/Support/slow_rpc_server.php', $queue, (string) $delayMs];
        $this->server = proc_open($cmd, [1 => ['pipe', 'w'], 2 => ['pipe', 'w']], $this->pipes);
        $read = [$this->pipes[1]];
        $w = $e = null;
        $this->assertSame(1, stream_select($read, $w, $e, 10), 'the slow RPC server did not start');
        $this->assertSame("ready\n", fgets($this->pipes[1]));
        return $queue;
    }

    /** Takes until null; returns the bodies taken (acked). */
    private function drain(Consumer $consumer): array
    {
        $bodies = [];
        while (($m = $consumer->next(0.0)) !== null) {
            $bodies[] = $m->getBody();
            $m->ack();
        }
        return $bodies;
    }

    /** Polls $call whenever $stream is readable until it gives its reply (or throws). */
    private function awaitReply(RpcCall $call, $stream, float $timeout = 10.0): AmqpRs\Message
    {
        $deadline = microtime(true) + $timeout;
        while (($reply = $call->poll()) === null) {
            Select::awaitReadable($stream, 'the RPC call ' . $call->getCorrelationId(), max(0.0, $deadline - microtime(true)));
        }
        return $reply;
    }

    /** Waits for the slow server's "served <correlation id>" line (its reply is confirmed by then). */
    private function awaitServed(string $correlationId, float $timeout = 10.0): void
    {
        $deadline = microtime(true) + $timeout;
        while (($left = $deadline - microtime(true)) > 0) {
            $read = [$this->pipes[1]];
            $w = $e = null;
            if (stream_select($read, $w, $e, 0, (int) ceil($left * 1_000_000)) === 1) {
                $line = fgets($this->pipes[1]);
                $this->assertNotFalse($line, 'the slow server ended');
                if ($line === "served $correlationId\n") {
                    return;
                }
            }
        }
        $this->fail("the slow server did not serve $correlationId within $timeout s");
    }

    /** Asserts $stream stays unreadable for $window seconds (nothing pending must not wake a loop). */
    private function assertStaysUnreadable($stream, string $what, float $window = 0.3): void
    {
        $read = [$stream];
        $w = $e = null;
        $this->assertSame(0, stream_select($read, $w, $e, 0, (int) ($window * 1_000_000)), $what);
    }

    /** Calls $take, which must throw an AmqpRs\Exception (not a subclass) saying the reply was already taken. */
    private function assertAlreadyTaken(callable $take, string $what): void
    {
        try {
            $take();
            $this->fail("$what: no exception");
        } catch (AmqpRs\Exception $e) {
            $this->assertSame(AmqpRs\Exception::class, get_class($e), $what);
            $this->assertStringContainsString('already taken', $e->getMessage(), $what);
        }
    }

    // --- the contract ---

    public function testTheStreamFollowsAConsumerFromItsFirstTakeUntilItTakesNull(): void
    {
        $conn = new Connection(Broker::uri());
        $stream = $conn->readiness();
        $this->assertFalse(Select::readable($stream), 'nothing pending on a new connection');
        $q = $this->exclusiveQueue($conn);
        $consumer = $conn->consumer($q);
        $this->assertNull($consumer->next(0.0));
        $this->assertFalse(Select::readable($stream), 'the consumer took null');

        Broker::publishWithAmqplib('', $q, 3);
        Select::awaitReadable($stream, 'three deliveries');
        $bodies = [];
        while (count($bodies) < 3) {
            $m = $consumer->next(0.0);
            if ($m === null) {
                $this->assertFalse(Select::readable($stream), 'unreadable after null');
                Select::awaitReadable($stream, 'the rest of the deliveries');
                continue;
            }
            $bodies[] = $m->getBody();
            $m->ack();
            $this->assertTrue(Select::readable($stream), 'readable while deliveries may remain untaken');
        }
        $this->assertSame(['m0', 'm1', 'm2'], $bodies);
        $this->assertNull($consumer->next(0.0));
        $this->assertFalse(Select::readable($stream), 'unreadable after next(0.0) returned null');
        $conn->close();
    }

    public function testTheStreamTurnsReadableOnceEveryConfirmIsInAndUnreadableAfterPollConfirmsReturnedZero(): void
    {
        $conn = new Connection(Broker::uri());
        $stream = $conn->readiness();
        $q = $this->exclusiveQueue($conn);
        $producer = $conn->producer();
        $this->assertSame(0, $producer->pollConfirms());
        $this->assertFalse(Select::readable($stream));
        for ($i = 0; $i < 2000; $i++) {
            $producer->publish("m$i", $q);
        }
        $pending = [$producer->pollConfirms()];
        $this->assertGreaterThan(0, $pending[0], 'just published: some confirms are still out');
        while (end($pending) > 0) {
            Select::awaitReadable($stream, '2000 confirms');
            $pending[] = $producer->pollConfirms();
        }
        // Readable once all are settled; at most one wake-up before that, when the last
        // publish's frame is written (its future waits for that before its confirm).
        $this->assertLessThanOrEqual(3, count($pending), 'unconfirmed at each wake-up: ' . implode(' ', $pending));
        $this->assertFalse(Select::readable($stream), 'unreadable after pollConfirms() returned 0');
        $this->assertSame(2000, $conn->queueStatus($q)['messages']);
        $conn->close();
    }

    public function testTheStreamTurnsReadableWhenAnRpcReplyCameAndUnreadableOncePollTookIt(): void
    {
        $client = new Connection(Broker::uri());
        $stream = $client->readiness();
        $server = new Connection(Broker::uri());
        $q = $this->exclusiveQueue($server);
        $serving = $server->consumer($q, ['auto_ack' => true]);

        $call = $client->rpcAsync('ping', $q, '', [], 10.0);
        $request = $serving->next(5.0);
        $this->assertNotNull($request);
        // The broker's confirm of the request may wake the loop once: a poll then finds nothing.
        while (Select::readable($stream)) {
            $this->assertNull($call->poll());
        }
        $this->assertFalse($call->isDone());
        $request->reply('pong');
        Select::awaitReadable($stream, 'the reply');
        $this->assertSame('pong', $call->poll()?->getBody());
        $this->assertTrue($call->isDone());
        $this->assertFalse(Select::readable($stream), 'unreadable once poll() took the reply');
        $client->close();
        $server->close();
    }

    public function testOneStreamServesAConsumerAProducerAndRpcCallsAtOnce(): void
    {
        $conn = new Connection(Broker::uri());
        $stream = $conn->readiness();
        $server = new Connection(Broker::uri());
        $serverStream = $server->readiness();
        $sq = $this->exclusiveQueue($server);
        $serving = $server->consumer($sq, ['auto_ack' => true]);
        $serving->next(0.0);
        $q = $this->exclusiveQueue($conn);
        $consumer = $conn->consumer($q);
        $producer = $conn->producer();

        $consumed = [];
        $replies = [];
        $calls = [];
        $consumer->next(0.0);
        for ($i = 0; $i < 200; $i++) {
            $producer->publish("m$i", $q);
        }
        for ($i = 0; $i < 20; $i++) {
            $calls[$i] = $conn->rpcAsync("call $i", $sq, '', [], 10.0);
        }
        $pending = $producer->pollConfirms();
        $deadline = microtime(true) + 15;
        while (count($consumed) < 200 || $pending > 0 || count($replies) < 20) {
            $this->assertLessThan($deadline, microtime(true), sprintf('consumed %d, unconfirmed %d, replies %d', count($consumed), $pending, count($replies)));
            $read = [$stream, $serverStream];
            $w = $e = null;
            stream_select($read, $w, $e, 1);
            while (($request = $serving->next(0.0)) !== null) {
                $request->reply('re: ' . $request->getBody());
            }
            array_push($consumed, ...$this->drain($consumer));
            $pending = $producer->pollConfirms();
            foreach ($calls as $i => $call) {
                if (!$call->isDone() && ($reply = $call->poll()) !== null) {
                    $replies[$i] = $reply->getBody();
                }
            }
        }
        $this->assertSame(array_map(fn ($i) => "m$i", range(0, 199)), $consumed);
        ksort($replies);
        $this->assertSame(array_map(fn ($i) => "re: call $i", range(0, 19)), $replies);
        $this->assertNull($consumer->next(0.0));
        $this->assertFalse(Select::readable($stream), 'everything taken: unreadable');
        $conn->close();
        $server->close();
    }

    public function testTwoConnectionsStreamsAreIndependent(): void
    {
        $a = new Connection(Broker::uri());
        $b = new Connection(Broker::uri());
        [$streamA, $streamB] = [$a->readiness(), $b->readiness()];
        $qa = $this->exclusiveQueue($a);
        $qb = $this->exclusiveQueue($b);
        [$consumerA, $consumerB] = [$a->consumer($qa), $b->consumer($qb)];
        $this->assertNull($consumerA->next(0.0));
        $this->assertNull($consumerB->next(0.0));

        Broker::publishWithAmqplib('', $qa, 1);
        Select::awaitReadable($streamA, "a delivery on A's queue");
        $this->assertFalse(Select::readable($streamB), "B has nothing: A's delivery does not wake it");
        Broker::publishWithAmqplib('', $qb, 1);
        Select::awaitReadable($streamB, "a delivery on B's queue");
        $this->assertSame(['m0'], $this->drain($consumerB));
        $this->assertFalse(Select::readable($streamB));
        $this->assertTrue(Select::readable($streamA), "B's take leaves A readable");
        $this->assertSame(['m0'], $this->drain($consumerA));
        $this->assertFalse(Select::readable($streamA));
        $a->close();
        $b->close();
    }

    // --- a 10 ms timer in the same loop keeps its lag under 50 ms ---

    private function assertTimerKept(string $scenario, array $measured): void
    {
        fwrite(STDERR, sprintf(
            "\n[EventLoopTest] %s: 10 ms timer worst lag %.2f ms over %d ticks, %d wake-ups, %.0f ms\n",
            $scenario,
            $measured['worst'] * 1000,
            $measured['ticks'],
            $measured['wakes'],
            $measured['elapsed'] * 1000,
        ));
        $this->assertGreaterThan(0, $measured['ticks']);
        $this->assertLessThan(0.050, $measured['worst'], "$scenario: worst timer lag");
    }

    public function testATimerKeepsItsLagWhileTenThousandMessagesAreConsumed(): void
    {
        $conn = new Connection(Broker::uri());
        $q = $this->exclusiveQueue($conn);
        $producer = $conn->producer();
        for ($i = 0; $i < 10_000; $i++) {
            $producer->publish("m$i", $q);
        }
        $producer->waitForConfirms(30);
        $consumer = $conn->consumer($q);
        $got = 0;
        $measured = Select::withTimer([$conn->readiness()], function () use ($consumer, &$got): void {
            // Bounded, so that a full buffer cannot hold the timer back.
            for ($n = 0; $n < 500 && ($m = $consumer->next(0.0)) !== null; $n++) {
                $this->assertSame("m$got", $m->getBody());
                $m->ack();
                $got++;
            }
        }, function () use (&$got): bool {
            return $got === 10_000;
        }, 60);
        $this->assertTimerKept('consume 10,000 with next(0.0)', $measured);
        $this->assertSame(10_000, $got);
        $this->assertNull($consumer->next(0.0));
        $consumer->cancel();
        $this->assertSame(0, $conn->queueStatus($q)['messages'], 'all acked');
        $conn->close();
    }

    public function testATimerKeepsItsLagWhileTenThousandConfirmsAreTaken(): void
    {
        $conn = new Connection(Broker::uri());
        $q = $this->exclusiveQueue($conn);
        $producer = $conn->producer();
        $published = 0;
        $pending = 0;
        $measured = Select::withTimer([$conn->readiness()], function () use ($producer, $q, &$published, &$pending): void {
            $pending = $producer->pollConfirms();
            if ($pending === 0 && $published < 10_000) {
                // One chunk per wake-up keeps each stretch of publish() calls short.
                for ($n = 0; $n < 250; $n++, $published++) {
                    $producer->publish("m$published", $q);
                }
                $pending = $producer->pollConfirms();
            }
        }, function () use (&$published, &$pending): bool {
            return $published === 10_000 && $pending === 0;
        }, 60);
        $this->assertTimerKept('10,000 confirms with pollConfirms()', $measured);
        $this->assertSame(0, $producer->pendingConfirms());
        $this->assertSame(10_000, $conn->queueStatus($q)['messages']);
        $conn->close();
    }

    public function testATimerKeepsItsLagWithAHundredRpcCallsToASlowServerOutstanding(): void
    {
        $queue = $this->slowServer(200);
        $conn = new Connection(Broker::uri());
        /** @var array<int, RpcCall> $calls */
        $calls = [];
        $replies = [];
        $measured = Select::withTimer([$conn->readiness()], function () use ($conn, $queue, &$calls, &$replies): void {
            for ($i = count($calls); $i < 100; $i++) {
                $calls[$i] = $conn->rpcAsync("call $i", $queue, '', [], 10.0);
            }
            foreach ($calls as $i => $call) {
                if (!$call->isDone() && ($reply = $call->poll()) !== null) {
                    $replies[$i] = $reply;
                }
            }
        }, function () use (&$replies): bool {
            return count($replies) === 100;
        }, 30);
        $this->assertTimerKept('100 rpcAsync calls to a server replying after 200 ms', $measured);
        foreach ($replies as $i => $reply) {
            $this->assertSame("call $i", $reply->getBody());
            $this->assertSame($calls[$i]->getCorrelationId(), $reply->getCorrelationId());
        }
        // Served one after the other they would take 100 x 200 ms = 20 s.
        $this->assertLessThan(5.0, $measured['elapsed'], 'the calls were in flight together');
        $conn->close();
    }

    // --- RPC calls in flight ---

    public function testManyCallsInFlightEachGetTheirOwnReplyAndACallersCorrelationIdIsKept(): void
    {
        $conn = new Connection(Broker::uri());
        $stream = $conn->readiness();
        $server = new Connection(Broker::uri());
        $serverStream = $server->readiness();
        $q = $this->exclusiveQueue($server);
        $serving = $server->consumer($q, ['auto_ack' => true, 'prefetch' => 500]);
        $serving->next(0.0);
        $mine = 'mine-' . bin2hex(random_bytes(4));
        $calls = [$conn->rpcAsync('call 0', $q, '', ['correlation_id' => $mine], 10.0)];
        for ($i = 1; $i < 200; $i++) {
            $calls[$i] = $conn->rpcAsync("call $i", $q, '', [], 10.0);
        }
        $this->assertSame($mine, $calls[0]->getCorrelationId());
        $this->assertCount(200, array_unique(array_map(fn (RpcCall $c) => $c->getCorrelationId(), $calls)));

        $requests = [];
        $replies = [];
        $deadline = microtime(true) + 15;
        while (count($replies) < 200) {
            $this->assertLessThan($deadline, microtime(true), sprintf('%d requests, %d replies', count($requests), count($replies)));
            $read = [$stream, $serverStream];
            $w = $e = null;
            stream_select($read, $w, $e, 1);
            while (($request = $serving->next(0.0)) !== null) {
                $requests[] = $request;
            }
            if (count($requests) === 200) {
                // All in flight at once, answered in the reverse order.
                foreach (array_reverse($requests) as $request) {
                    $request->reply('re: ' . $request->getBody());
                }
                $this->assertSame($mine, $requests[0]->getCorrelationId(), 'the request carried the caller\'s id');
                $requests = [];
            }
            foreach ($calls as $i => $call) {
                if (!$call->isDone() && ($reply = $call->poll()) !== null) {
                    $replies[$i] = $reply;
                }
            }
        }
        foreach ($calls as $i => $call) {
            $this->assertSame("re: call $i", $replies[$i]->getBody());
            $this->assertSame($call->getCorrelationId(), $replies[$i]->getCorrelationId());
        }
        $this->assertFalse(Select::readable($stream), 'every reply taken');
        $conn->close();
        $server->close();
    }

    public function testAnUnroutableRequestFailsFromPollWith312SoonNotAtItsTimeout(): void
    {
        $conn = new Connection(Broker::uri());
        $stream = $conn->readiness();
        $started = microtime(true);
        $call = $conn->rpcAsync('anyone?', Broker::unique('rawloop-nobody'), '', [], 20.0);
        try {
            $this->awaitReply($call, $stream, 5.0);
            $this->fail('an unroutable request got a reply');
        } catch (PublishException $e) {
            $this->assertSame(312, $e->getFailures()[0]['reply_code'], $e->getMessage());
        }
        $this->assertLessThan(5.0, microtime(true) - $started);
        $this->assertTrue($call->isDone());
        $this->assertFalse(Select::readable($stream));
        $this->assertAlreadyTaken(fn () => $call->poll(), 'poll() after the failure');
        $conn->close();
    }

    public function testATimedOutCallThrowsFromPollOnceTheStreamTurnedReadableAndItsOutcomeIsTakenOnce(): void
    {
        $conn = new Connection(Broker::uri());
        $stream = $conn->readiness();
        $q = $this->exclusiveQueue($conn);
        $started = microtime(true);
        $call = $conn->rpcAsync('nobody serves this', $q, '', [], 0.3);
        try {
            // poll() only runs when the stream is readable: a timeout seen here made it so.
            $this->awaitReply($call, $stream, 5.0);
            $this->fail('no server, yet a reply');
        } catch (TimeoutException $e) {
            $this->assertStringContainsString($call->getCorrelationId(), $e->getMessage());
        }
        $this->assertGreaterThanOrEqual(0.3, microtime(true) - $started);
        $this->assertFalse(Select::readable($stream));
        $this->assertAlreadyTaken(fn () => $call->poll(), 'poll() after the timeout');
        $this->assertAlreadyTaken(fn () => $call->wait(), 'wait() after the timeout');
        $conn->close();
    }

    public function testAReplyIsTakenOnceByPollOrWait(): void
    {
        $queue = $this->slowServer(20);
        $conn = new Connection(Broker::uri());
        $stream = $conn->readiness();
        $polled = $conn->rpcAsync('polled', $queue, '', [], 10.0);
        $this->assertSame('polled', $this->awaitReply($polled, $stream)->getBody());
        $this->assertAlreadyTaken(fn () => $polled->poll(), 'poll() twice');
        $this->assertAlreadyTaken(fn () => $polled->wait(), 'wait() after poll()');
        $waited = $conn->rpcAsync('waited', $queue, '', [], 10.0);
        $this->assertSame('waited', $waited->wait()->getBody());
        $this->assertTrue($waited->isDone());
        $this->assertAlreadyTaken(fn () => $waited->wait(), 'wait() twice');
        $this->assertAlreadyTaken(fn () => $waited->poll(), 'poll() after wait()');
        $this->assertFalse(Select::readable($stream));
        $conn->close();
    }

    public function testWaitReturnsWhenTheReplyComesNotAtTheCallsTimeout(): void
    {
        $queue = $this->slowServer(200);
        $conn = new Connection(Broker::uri());
        $stream = $conn->readiness();
        $other = $conn->rpcAsync('other', $queue, '', [], 20.0);
        $call = $conn->rpcAsync('waited', $queue, '', [], 20.0);
        $started = microtime(true);
        $this->assertSame('waited', $call->wait()->getBody());
        // A reply 200 ms away; its timeout (20 s) is not what ended the wait.
        $this->assertLessThan(10.0, microtime(true) - $started, 'wait() woke for the reply');
        $this->assertSame('other', $this->awaitReply($other, $stream)->getBody());
        $this->assertFalse(Select::readable($stream));
        $conn->close();
    }

    /**
     * A request's confirm may already be in when rpcAsync() (or rpc()) first polls it, right
     * after the publish: many calls one after the other make that happen at least once.
     */
    public function testCallsOneAfterAnotherEachGetTheirReplyHoweverSoonTheirRequestIsConfirmed(): void
    {
        $queue = $this->slowServer(0);
        $conn = new Connection(Broker::uri());
        $stream = $conn->readiness();
        for ($i = 0; $i < 300; $i++) {
            $this->assertSame("waited $i", $conn->rpcAsync("waited $i", $queue, '', [], 10.0)->wait()->getBody());
            $this->assertSame("polled $i", $this->awaitReply($conn->rpcAsync("polled $i", $queue, '', [], 10.0), $stream)->getBody());
            $this->assertSame("blocking $i", $conn->rpc("blocking $i", $queue, '', [], 10.0)->getBody());
        }
        $this->assertFalse(Select::readable($stream));
        $conn->close();
    }

    public function testABlockingRpcWhileCallsAreInFlightLeavesTheirWakeUpAndReplies(): void
    {
        $queue = $this->slowServer(100);
        $conn = new Connection(Broker::uri());
        $stream = $conn->readiness();
        $calls = [];
        for ($i = 0; $i < 5; $i++) {
            $calls[$i] = $conn->rpcAsync("async $i", $queue, '', [], 10.0);
        }
        // Their replies (after 100 ms) all come while rpc() waits for its own (after 400 ms).
        $this->assertSame('sync', $conn->rpc('sync', $queue, '', ['headers' => ['delay_ms' => 400]], 10.0)->getBody());
        $this->assertTrue(Select::readable($stream), 'the replies that came during rpc() left the stream readable');
        foreach ($calls as $i => $call) {
            $this->assertSame("async $i", $call->poll()?->getBody(), "call $i's reply is there at once");
        }
        $this->assertFalse(Select::readable($stream));
        $conn->close();
    }

    public function testALateReplyToATimedOutCallIsDroppedWithoutDisturbingLaterCallsOrTheStream(): void
    {
        $queue = $this->slowServer(200);
        $conn = new Connection(Broker::uri());
        $stream = $conn->readiness();
        $late = $conn->rpcAsync('late', $queue, '', ['headers' => ['delay_ms' => 500]], 0.2);
        try {
            $this->awaitReply($late, $stream);
            $this->fail('the late call got its reply in time');
        } catch (TimeoutException) {
        }
        // The late reply (at 500 ms) arrives while this call (reply at 200 + 600 ms) waits.
        $next = $conn->rpcAsync('next', $queue, '', ['headers' => ['delay_ms' => 600]], 10.0);
        $reply = $this->awaitReply($next, $stream);
        $this->assertSame('next', $reply->getBody());
        $this->assertSame($next->getCorrelationId(), $reply->getCorrelationId());
        $this->assertFalse(Select::readable($stream));

        // With no call in flight, a late reply must not leave the stream readable for good.
        $alone = $conn->rpcAsync('alone', $queue, '', ['headers' => ['delay_ms' => 400]], 0.2);
        try {
            $this->awaitReply($alone, $stream);
            $this->fail('the lone call got its reply in time');
        } catch (TimeoutException) {
        }
        $this->awaitServed($alone->getCorrelationId());
        $this->assertStaysUnreadable($stream, 'a late reply with no call in flight');
        $this->assertSame('after', $this->awaitReply($conn->rpcAsync('after', $queue, '', [], 10.0), $stream)->getBody());
        $conn->close();
    }

    public function testADroppedCallDoesNotKeepTheStreamReadable(): void
    {
        $queue = $this->slowServer(100);
        $conn = new Connection(Broker::uri());
        $stream = $conn->readiness();
        $call = $conn->rpcAsync('dropped', $queue, '', [], 10.0);
        $id = $call->getCorrelationId();
        unset($call);
        $this->awaitServed($id);
        $this->assertStaysUnreadable($stream, 'the reply of a dropped call');
        $conn->close();
    }

    // --- lifecycle ---

    public function testAfterCloseTheStreamIsReadableAndEveryTakeThrowsNamingTheClosedConnection(): void
    {
        $conn = new Connection(Broker::uri());
        $stream = $conn->readiness();
        $q = $this->exclusiveQueue($conn);
        $consumer = $conn->consumer($q);
        $this->assertNull($consumer->next(0.0));
        $producer = $conn->producer();
        $this->assertSame(0, $producer->pollConfirms());
        $call = $conn->rpcAsync('unanswered', $q, '', [], 10.0);
        $this->assertNull($call->poll());
        $conn->close();

        $this->assertTrue(Select::readable($stream), 'readable after close(), so that a loop learns of it');
        $takes = [
            'readiness()' => fn () => $conn->readiness(),
            'next(0.0)' => fn () => $consumer->next(0.0),
            'pollConfirms()' => fn () => $producer->pollConfirms(),
            'rpcAsync()' => fn () => $conn->rpcAsync('x', $q),
            'poll()' => fn () => $call->poll(),
        ];
        foreach ($takes as $what => $take) {
            try {
                $take();
                $this->fail("$what on a closed connection did not throw");
            } catch (ConnectionException $e) {
                $this->assertStringContainsString('closed', $e->getMessage(), $what);
                $this->assertStringContainsString(Broker::endpoint(), $e->getMessage(), $what);
            }
        }
        $this->assertTrue(Select::readable($stream), 'still readable');
    }

    public function testClosingTheStreamLeavesTheConnectionAndANewStreamWorks(): void
    {
        $conn = new Connection(Broker::uri());
        $first = $conn->readiness();
        $q = $this->exclusiveQueue($conn);
        $consumer = $conn->consumer($q);
        $this->assertNull($consumer->next(0.0));
        fclose($first);
        $this->assertTrue($conn->isConnected());
        $second = $conn->readiness();
        Broker::publishWithAmqplib('', $q, 2);
        Select::awaitReadable($second, 'deliveries, on a stream made after fclose() of the first');
        $bodies = $this->drain($consumer);
        while (count($bodies) < 2) {
            Select::awaitReadable($second, 'the second delivery');
            array_push($bodies, ...$this->drain($consumer));
        }
        $this->assertSame(['m0', 'm1'], $bodies);
        $this->assertFalse(Select::readable($second));
        $conn->close();
    }

    public function testAForkedChildCannotUseTheParentsConnectionForAnEventLoopAndTheParentKeepsWorking(): void
    {
        $conn = new Connection(Broker::uri());
        $stream = $conn->readiness();
        $q = $this->exclusiveQueue($conn);
        $consumer = $conn->consumer($q);
        $this->assertNull($consumer->next(0.0));
        $producer = $conn->producer();
        $this->assertSame(0, $producer->pollConfirms());
        $call = $conn->rpcAsync('unanswered', $this->exclusiveQueue($conn), '', [], 10.0);
        // Joined to the stream in the parent, each of them is the parent's alone.
        $status = $this->inChild(function () use ($conn, $consumer, $producer, $call, $q): bool {
            $ok = true;
            $takes = [
                'readiness()' => fn () => $conn->readiness(),
                'next(0.0)' => fn () => $consumer->next(0.0),
                'pollConfirms()' => fn () => $producer->pollConfirms(),
                'rpcAsync()' => fn () => $conn->rpcAsync('x', $q),
                'poll()' => fn () => $call->poll(),
            ];
            foreach ($takes as $what => $take) {
                try {
                    $take();
                    fwrite(STDERR, "child: $what did not throw\n");
                    $ok = false;
                } catch (ConnectionException $e) {
                    if (!str_contains($e->getMessage(), 'fork()')) {
                        fwrite(STDERR, "child: $what: {$e->getMessage()}\n");
                        $ok = false;
                    }
                }
            }
            return $ok;
        });
        $this->assertSame(0, $status, 'each take in the child threw a ConnectionException about fork()');

        $producer->publish('after the fork', $q);
        $this->assertGreaterThanOrEqual(0, $producer->pollConfirms());
        Select::awaitReadable($stream, "the parent's delivery");
        $m = $consumer->next(0.0);
        while ($m === null) {
            Select::awaitReadable($stream, "the parent's delivery");
            $m = $consumer->next(0.0);
        }
        $this->assertSame('after the fork', $m->getBody());
        $m->ack();
        while ($producer->pollConfirms() > 0) {
            Select::awaitReadable($stream, "the parent's confirm");
        }
        $this->assertNull($consumer->next(0.0));
        $this->assertNull($call->poll());
        $this->assertFalse(Select::readable($stream));
        $conn->close();
    }

    public function testACancelledConsumerDoesNotKeepTheStreamReadable(): void
    {
        $conn = new Connection(Broker::uri());
        $stream = $conn->readiness();
        $q = $this->exclusiveQueue($conn);
        $consumer = $conn->consumer($q);
        $this->assertNull($consumer->next(0.0));
        Broker::publishWithAmqplib('', $q, 3);
        Select::awaitReadable($stream, 'deliveries');
        $consumer->cancel();
        $this->assertFalse(Select::readable($stream), 'its untaken deliveries went back to the queue');
        $this->assertStaysUnreadable($stream, 'a cancelled consumer');
        $conn->close();
    }

    /**
     * close() only releases a persistent connection: the broker connection (and its readiness
     * fd) stays in the pool for the next new Connection() with the same settings, so the stream
     * does not turn readable, the consumer made before keeps receiving, and the next
     * Connection's stream watches the same fd. closePersistent() closes it as close() does.
     */
    public function testAPersistentConnectionsStreamAfterCloseAndClosePersistent(): void
    {
        $options = ['persistent' => true, 'name' => Broker::unique('rawloop-persistent')];
        $conn = new Connection(Broker::uri(), $options);
        $stream = $conn->readiness();
        $q = $this->exclusiveQueue($conn);
        $consumer = $conn->consumer($q);
        $this->assertNull($consumer->next(0.0));
        Broker::publishWithAmqplib('', $q, 1);
        Select::awaitReadable($stream, 'a delivery on a persistent connection');
        $this->assertSame(['m0'], $this->drain($consumer));
        $this->assertFalse(Select::readable($stream));

        $conn->close();
        $this->assertFalse(Select::readable($stream), 'released, not closed: nothing to tell');
        try {
            $conn->readiness();
            $this->fail('readiness() after close() did not throw');
        } catch (ConnectionException $e) {
            $this->assertStringContainsString('pool', $e->getMessage());
        }
        $again = new Connection(Broker::uri(), $options);
        $againStream = $again->readiness();
        Broker::publishWithAmqplib('', $q, 1);
        Select::awaitReadable($stream, 'a delivery to the consumer made before close()');
        $this->assertTrue(Select::readable($againStream), 'the pooled connection has one fd');
        $this->assertSame(['m0'], $this->drain($consumer));
        $this->assertFalse(Select::readable($againStream));

        $again->closePersistent();
        $this->assertTrue(Select::readable($againStream), 'closed for good: readable');
        $this->assertTrue(Select::readable($stream));
        $this->expectException(ConnectionException::class);
        $consumer->next(0.0);
    }
}
