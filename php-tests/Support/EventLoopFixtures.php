<?php

declare(strict_types=1);

namespace AmqpRs\Tests\Support;

use AmqpRs\Connection;
use AmqpRs\Consumer;
use AmqpRs\RpcCall;

/**
 * What the event-loop tests (EventLoopTest, EventLoopRpcTest, EventLoopLagTest) share: queues
 * and the slow RPC server (Support/slow_rpc_server.php) they start, and their assertions.
 */
trait EventLoopFixtures
{
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
        // Durable: RabbitMQ 4 deprecates transient queues that are not exclusive; tearDown deletes it.
        $admin->declareQueue($queue);
        $admin->close();
        $this->queues[] = $queue;
        $cmd = [PHP_BINARY, '-d', 'extension=' . Broker::extensionPath(), __DIR__ . '/slow_rpc_server.php', $queue, (string) $delayMs];
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
    private function awaitReply(RpcCall $call, $stream, float $timeout = 10.0): \AmqpRs\Message
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
        } catch (\AmqpRs\Exception $e) {
            $this->assertSame(\AmqpRs\Exception::class, get_class($e), $what);
            $this->assertStringContainsString('already taken', $e->getMessage(), $what);
        }
    }
}
