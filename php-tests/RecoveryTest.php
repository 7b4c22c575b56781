<?php

declare(strict_types=1);

use AmqpRs\Connection;
use AmqpRs\ConnectionException;
use AmqpRs\Message;
use AmqpRs\PublishException;
use AmqpRs\Tests\Support\Broker;
use PhpAmqpLib\Message\AMQPMessage;
use PHPUnit\Framework\TestCase;

/**
 * Automatic recovery against real faults: the broker closes our connection
 * (rabbitmqctl close_connection) while a producer or a worker is busy, and the work goes on by
 * itself, with nothing confirmed lost and nothing unconfirmed left unreported.
 */
final class RecoveryTest extends TestCase
{
    private string $name;
    private string $queue;
    /** @var resource[] rabbitmqctl runs started in the background */
    private array $faults = [];
    private ?string $lastClosed = null;
    /** @var list<array{resource, resource, resource}> fault proxies: process, stdin, stdout */
    private array $proxies = [];

    protected function setUp(): void
    {
        $this->name = Broker::unique('recovery');
        $this->queue = Broker::unique('recovery-queue');
    }

    protected function tearDown(): void
    {
        foreach ($this->faults as $fault) {
            proc_close($fault);
        }
        foreach ($this->proxies as [$proc, $stdin]) {
            fclose($stdin);
            proc_close($proc);
        }
        $conn = new Connection(Broker::uri(), ['reconnect' => false]);
        $conn->deleteQueue($this->queue);
        $conn->close();
    }

    /** The broker's id of the connection named $name, or null if it has none. */
    private function connectionPid(): ?string
    {
        foreach (explode("\n", Broker::ctl('list_connections', 'pid', 'client_properties', '-q', '--no-table-headers')) as $line) {
            if (str_contains($line, $this->name)) {
                return strtok($line, "\t");
            }
        }
        return null;
    }

    /**
     * Has the broker close our connection, without waiting for rabbitmqctl to finish. A
     * previous close must have taken effect first: our connection is back under a new id.
     */
    private function closeConnectionSoon(): string
    {
        $this->awaitReplaced();
        $pid = $this->lastClosed = $this->connectionPid();
        $this->assertNotNull($pid, "no connection named {$this->name} on the broker");
        $this->faults[] = proc_open(Broker::ctlArgv('close_connection', $pid, 'recovery test'), [1 => ['file', '/dev/null', 'w'], 2 => ['file', '/dev/null', 'w']], $pipes);
        return $pid;
    }

    /** Waits until the last close took effect and our connection is back, under a new id. */
    private function awaitReplaced(): ?string
    {
        if ($this->faults) {
            proc_close(array_pop($this->faults));
        }
        for ($i = 0; $i < 100; $i++) {
            $pid = $this->connectionPid();
            if ($pid !== null && $pid !== $this->lastClosed) {
                return $pid;
            }
            usleep(100_000);
        }
        return null;
    }

    /** Starts a fault proxy in front of the broker (Support/proxy.php fault); returns its port. */
    private function proxy(): int
    {
        $proc = proc_open([PHP_BINARY, __DIR__ . '/Support/proxy.php', 'fault', (string) Broker::port()], [0 => ['pipe', 'r'], 1 => ['pipe', 'w'], 2 => STDERR], $pipes);
        $this->assertIsResource($proc);
        $port = (int) trim((string) fgets($pipes[1]));
        $this->assertGreaterThan(0, $port, 'proxy did not start');
        $this->proxies[] = [$proc, $pipes[0], $pipes[1]];
        return $port;
    }

    /** Tells the last proxy started to 'freeze' or go 'down', and waits until it has. */
    private function fault(string $command): void
    {
        [, $stdin, $stdout] = $this->proxies[array_key_last($this->proxies)];
        fwrite($stdin, "$command\n");
        $this->assertSame("ok\n", fgets($stdout));
    }

    /** Message ids in the queue, read with php-amqplib (independent of amqp_rs). */
    private function idsInQueue(): array
    {
        $conn = Broker::amqplib();
        $ch = $conn->channel();
        $ids = [];
        while ($m = $ch->basic_get($this->queue, true)) {
            $ids[] = $m->get('message_id');
        }
        $conn->close();
        return $ids;
    }

    public function testAPublishingLoopCarriesOnAndReportsEveryUnconfirmedMessage(): void
    {
        $conn = new Connection(Broker::uri(), ['name' => $this->name]);
        $conn->declareQueue($this->queue, ['durable' => true, 'auto_delete' => false]);
        $producer = $conn->producer();
        $failed = [];
        $pids = [];
        $collect = function () use ($producer, &$failed): void {
            try {
                $producer->waitForConfirms(60);
            } catch (PublishException $e) {
                foreach ($e->getFailures() as $f) {
                    $failed[$f['message_id']] = $f['reason'];
                }
            }
        };
        for ($i = 0; $i < 20_000; $i++) {
            if ($i === 4_000 || $i === 12_000) {
                // Lands while publishes are in flight: rabbitmqctl takes a moment to act.
                $pids[] = $this->closeConnectionSoon();
            }
            $producer->publish("body $i", $this->queue, '', ['message_id' => "m$i"]);
            // Paced so that each close, which rabbitmqctl makes about a second after it is
            // asked, lands while messages are in flight.
            usleep(150);
            if ($i % 500 === 499) {
                $collect();
            }
        }
        $collect();
        $this->assertSame(0, $producer->pendingConfirms());
        $pids[] = $this->awaitReplaced();
        $this->assertCount(3, array_unique(array_filter($pids)), 'the connection was replaced twice');
        foreach ($failed as $reason) {
            $this->assertStringContainsString('lost before the broker confirmed it', $reason);
        }

        $conn->close();
        $inQueue = array_flip($this->idsInQueue());
        $confirmedMissing = [];
        for ($i = 0; $i < 20_000; $i++) {
            if (!isset($inQueue["m$i"]) && !isset($failed["m$i"])) {
                $confirmedMissing[] = "m$i";
            }
        }
        $this->assertSame([], $confirmedMissing, 'confirmed (never reported) but not in the queue');
    }

    public function testAWorkerCarriesOnAndEveryMessageIsHandled(): void
    {
        $setup = new Connection(Broker::uri(), ['reconnect' => false]);
        $setup->declareQueue($this->queue, ['durable' => true, 'auto_delete' => false]);
        $producer = $setup->producer();
        for ($i = 0; $i < 3_000; $i++) {
            $producer->publish("body $i", $this->queue, '', ['message_id' => "m$i"]);
        }
        $producer->waitForConfirms(30);
        $setup->close();

        $conn = new Connection(Broker::uri(), ['name' => $this->name]);
        $seen = [];
        $pids = [];
        $handled = $conn->consumer($this->queue, ['prefetch' => 50])->consume(
            function (Message $m) use (&$seen, &$pids) {
                $n = count($seen);
                if ($n === 500 || $n === 1_500) {
                    $pids[] = $this->closeConnectionSoon();
                }
                $seen[$m->getMessageId()] = ($seen[$m->getMessageId()] ?? 0) + 1;
                // Slow enough for the close to land mid-stream, with acks held.
                usleep(200);
            },
            ['idle_timeout' => 3, 'max_time' => 120],
        );
        $pids[] = $this->awaitReplaced();
        $conn->close();

        $this->assertCount(3, array_unique(array_filter($pids)), 'the connection was replaced twice');
        $this->assertCount(3_000, $seen, 'every message handled at least once');
        $this->assertGreaterThanOrEqual(3_000, $handled);
        $this->assertSame(0, Broker::countWithAmqplib($this->queue), 'every message acked in the end');
    }

    public function testPublishingAndWorkCarryOnAcrossABrokerRestart(): void
    {
        $setup = new Connection(Broker::uri(), ['reconnect' => false]);
        $setup->declareQueue($this->queue, ['durable' => true, 'auto_delete' => false]);
        $setup->close();

        $conn = new Connection(Broker::uri(), ['name' => $this->name]);
        $this->lastClosed = $this->connectionPid();
        $producer = $conn->producer();
        $failed = [];
        $record = function (PublishException $e) use (&$failed): void {
            foreach ($e->getFailures() as $f) {
                $failed[$f['message_id']] = true;
            }
        };
        $restart = null;
        for ($i = 0; $i < 4_000; $i++) {
            if ($i === 1_000) {
                // The broker stops and starts again while publishes are in flight.
                $restart = proc_open(implode(' ', array_map('escapeshellarg', Broker::ctlArgv('stop_app'))) . ' && ' . implode(' ', array_map('escapeshellarg', Broker::ctlArgv('start_app'))), [1 => ['file', '/dev/null', 'w'], 2 => ['file', '/dev/null', 'w']], $pipes);
            }
            try {
                $producer->publish("body $i", $this->queue, '', ['message_id' => "m$i"]);
                usleep(500);
                if ($i % 200 === 199) {
                    $producer->waitForConfirms(60);
                }
            } catch (PublishException $e) {
                $record($e);
            }
        }
        $this->assertSame(0, proc_close($restart), 'rabbitmqctl stop_app && start_app');
        try {
            $producer->waitForConfirms(60);
        } catch (PublishException $e) {
            $record($e);
        }
        $this->assertNotNull($this->awaitReplaced(), 'the connection came back after the restart');

        // The same connection, recovered, now works through what was published.
        $seen = [];
        $conn->consumer($this->queue, ['prefetch' => 100])->consume(
            function (Message $m) use (&$seen) {
                $seen[$m->getMessageId()] = true;
            },
            ['idle_timeout' => 2, 'max_time' => 60],
        );
        $conn->close();
        $missing = [];
        for ($i = 0; $i < 4_000; $i++) {
            if (!isset($seen["m$i"]) && !isset($failed["m$i"])) {
                $missing[] = "m$i";
            }
        }
        $this->assertSame([], $missing, 'confirmed (never reported) but not consumed');
        $this->assertSame(0, Broker::countWithAmqplib($this->queue));
    }

    public function testWithReconnectOffALostConnectionIsAClearError(): void
    {
        $conn = new Connection(Broker::uri(), ['name' => $this->name, 'reconnect' => false]);
        $conn->declareQueue($this->queue, ['auto_delete' => false]);
        $producer = $conn->producer();
        Broker::ctl('close_connection', $this->connectionPid(), 'recovery test');
        for ($i = 0; $i < 100 && $conn->isConnected(); $i++) {
            usleep(20_000);
        }
        $this->expectException(ConnectionException::class);
        $this->expectExceptionMessage('reconnect is off');
        $producer->publish('x', $this->queue);
    }

    public function testASilentBlackHoleIsFoundByHeartbeatsAndRecovered(): void
    {
        $port = $this->proxy();
        $conn = new Connection("amqp://guest:guest@127.0.0.1:$port/%2f", ['name' => $this->name, 'heartbeat' => 2]);
        $conn->declareQueue($this->queue, ['durable' => true, 'auto_delete' => false]);
        $producer = $conn->producer();
        $failed = [];
        $publish = function (int $from, int $to) use ($producer, &$failed): void {
            for ($i = $from; $i < $to; $i++) {
                $producer->publish("body $i", $this->queue, '', ['message_id' => "m$i"]);
            }
            try {
                // Without heartbeats this would wait out its 30 s: no byte ever comes back.
                $producer->waitForConfirms(30);
            } catch (PublishException $e) {
                foreach ($e->getFailures() as $f) {
                    $this->assertStringContainsString('lost before the broker confirmed it', $f['reason']);
                    $failed[] = $f['message_id'];
                }
            }
        };
        $publish(0, 300);
        $this->assertSame([], $failed);
        $before = $this->lastClosed = $this->connectionPid();

        // The flow goes silent, no FIN, no RST: only missing heartbeats can tell.
        $this->fault('freeze');
        $publish(300, 600);
        $this->assertNotSame([], $failed, 'the publishes written into the black hole are reported');
        $this->assertNotSame($before, $this->awaitReplaced(), 'a new connection replaced the silent one');

        // The caller republishes what was reported; everything is then in the queue, once.
        foreach ($failed as $id) {
            $producer->publish('again', $this->queue, '', ['message_id' => $id]);
        }
        $producer->waitForConfirms(30);
        $conn->close();
        $ids = $this->idsInQueue();
        sort($ids);
        $expected = array_map(fn ($i) => "m$i", range(0, 599));
        sort($expected);
        $this->assertSame($expected, $ids);
    }

    public function testOnceTheAttemptsAreSpentTheErrorSaysSo(): void
    {
        $port = $this->proxy();
        $conn = new Connection("amqp://guest:guest@127.0.0.1:$port/%2f", ['name' => $this->name]);
        $conn->declareQueue($this->queue, ['durable' => true, 'auto_delete' => false]);
        $producer = $conn->producer();
        $producer->publish('before', $this->queue);
        $producer->waitForConfirms(10);

        // The broker's address refuses connections for good: every attempt fails.
        $this->fault('down');
        for ($i = 0; $i < 100 && $conn->isConnected(); $i++) {
            usleep(20_000);
        }
        $this->assertFalse($conn->isConnected(), 'the loss was noticed');
        try {
            $producer->publish('after', $this->queue);
            $this->fail('expected ConnectionException');
        } catch (ConnectionException $e) {
            $this->assertStringContainsString("publish on amqp://guest@127.0.0.1:$port/%2F", $e->getMessage());
            $this->assertStringContainsString('could not be recovered (10 attempts)', $e->getMessage());
        }
        $this->assertFalse($conn->isConnected());
        $this->assertSame(1, Broker::countWithAmqplib($this->queue));
    }

    public function testExclusiveQueuesComeBackWithTheirBindingsAndConsumers(): void
    {
        // A subscriber as events systems have them: a generated exclusive queue bound to a
        // fanout exchange. The broker deletes both queues with the lost connection.
        $exchange = Broker::unique('recovery-fanout');
        $conn = new Connection(Broker::uri(), ['name' => $this->name]);
        $conn->declareExchange($exchange, 'fanout', ['durable' => false, 'auto_delete' => true]);
        $generated = $conn->declareQueue('', ['exclusive' => true]);
        $named = $conn->declareQueue($this->queue, ['exclusive' => true, 'durable' => false]);
        foreach ([$generated, $named] as $queue) {
            $conn->bindQueue($queue, $exchange);
        }
        $consumer = $conn->consumer([$generated, $named], ['prefetch' => 10]);
        $this->closeConnectionSoon();
        $this->assertNotNull($this->awaitReplaced());

        // Published by another client after the recovery: it reaches both queues again.
        for ($i = 0; $i < 50 && !$this->bound($exchange, $generated, $named); $i++) {
            usleep(100_000);
        }
        Broker::publishWithAmqplib($exchange, '', 3);
        $seen = [];
        $consumer->consume(function (Message $m) use (&$seen) {
            $seen[] = $m->getRoutingKey() . '|' . $m->getBody();
        }, ['idle_timeout' => 1, 'max_time' => 10]);
        $this->assertCount(6, $seen, 'each queue got the 3 messages: ' . implode(', ', $seen));
        $conn->close();
    }

    /** Whether the broker shows both queues bound to the exchange again. */
    private function bound(string $exchange, string ...$queues): bool
    {
        $bindings = Broker::ctl('list_bindings', 'source_name', 'destination_name', '-q', '--no-table-headers');
        foreach ($queues as $queue) {
            if (!str_contains($bindings, "$exchange\t$queue")) {
                return false;
            }
        }
        return true;
    }
}
