<?php

declare(strict_types=1);

require_once __DIR__ . '/Support/EventLoopFixtures.php';
require_once __DIR__ . '/Support/ForkedChild.php';
require_once __DIR__ . '/Support/Select.php';

use AmqpRs\Connection;
use AmqpRs\ConnectionException;
use AmqpRs\Tests\Support\Broker;
use AmqpRs\Tests\Support\EventLoopFixtures;
use AmqpRs\Tests\Support\ForkedChild;
use AmqpRs\Tests\Support\Select;
use PHPUnit\Framework\TestCase;

/**
 * The raw event-loop API (issue 19): Connection::readiness(), Consumer::next(0.0),
 * Producer::pollConfirms(), Connection::rpcAsync() and RpcCall, driven by plain stream_select()
 * loops. Readability is checked with a zero timeout, waited for up to a deadline. RPC calls in
 * flight: EventLoopRpcTest; a timer's lag in such loops: EventLoopLagTest.
 */
final class EventLoopTest extends TestCase
{
    use EventLoopFixtures;
    use ForkedChild;

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
