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
}
