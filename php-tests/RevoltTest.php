<?php

declare(strict_types=1);

use AmqpRs\Connection;
use AmqpRs\ConnectionException;
use AmqpRs\Message;
use AmqpRs\Revolt\Client;
use AmqpRs\Tests\Support\Broker;
use AmqpRs\Tests\Support\Children;
use AmqpRs\Tests\Support\Node;
use AmqpRs\Tests\Support\Revolt;
use PHPUnit\Framework\TestCase;

require_once __DIR__ . '/Support/Revolt.php';

/**
 * amqp-rs/revolt (revolt/): the calls that wait suspend a fiber, never the thread, so timers
 * and other fibers of the process keep running. Runs where Revolt is installed (the sid root
 * of `make matrix`); skipped elsewhere.
 *
 * Timer lag is the feature here (issue 19), so it is measured and asserted: a 10 ms timer's
 * worst gap beyond its interval stays under 50 ms. Each figure is printed to stderr.
 */
final class RevoltTest extends TestCase
{
    private const MAX_LAG = 0.050;
    private const SERVER_DELAY = 0.2;

    private ?Connection $conn = null;
    /** @var list<string> queues to delete */
    private array $queues = [];
    /** @var resource|null the slow RPC server */
    private $server = null;
    /** @var array<int, resource> */
    private array $serverPipes = [];

    protected function setUp(): void
    {
        $why = Revolt::load();
        if ($why !== null) {
            $this->markTestSkipped($why);
        }
    }

    protected function tearDown(): void
    {
        if ($this->server !== null) {
            Children::end($this->server, $this->serverPipes, SIGTERM, 2.0);
        }
        $cleanup = new Connection(Broker::uri(), ['reconnect' => false]);
        foreach ($this->queues as $queue) {
            $cleanup->deleteQueue($queue);
        }
        $cleanup->close();
        if ($this->conn?->isConnected()) {
            $this->conn->close();
        }
    }

    private function connect(): Connection
    {
        return $this->conn = new Connection(Broker::uri());
    }

    private function queue(Connection $conn, string $what): string
    {
        // Durable: RabbitMQ 4 deprecates transient queues that are not exclusive.
        return $this->queues[] = $conn->declareQueue(Broker::unique("revolt-$what"), ['durable' => true, 'auto_delete' => false]);
    }

    /** Starts Support/slow_rpc_server.php on a queue of its own; returns the queue. */
    private function slowServer(): string
    {
        $queue = $this->queue($this->conn ?? $this->connect(), 'rpc');
        $this->server = proc_open(
            [PHP_BINARY, '-d', 'extension=' . Broker::extensionPath(), __DIR__ . '/Support/slow_rpc_server.php', $queue, (string) (int) (self::SERVER_DELAY * 1000), '120', 're: '],
            [1 => ['pipe', 'w'], 2 => ['pipe', 'w']],
            $this->serverPipes,
        );
        $this->assertSame('ready', $this->readLine($this->serverPipes[1], 10.0), 'the slow RPC server started');
        return $queue;
    }

    /** @param resource $pipe */
    private function readLine($pipe, float $timeout): ?string
    {
        $read = [$pipe];
        $w = $e = null;
        if (stream_select($read, $w, $e, (int) $timeout, (int) (fmod($timeout, 1.0) * 1e6)) === 1) {
            $line = fgets($pipe);
            return $line === false ? null : rtrim($line);
        }
        return null;
    }

    private function assertLag(string $scenario, array $measured): void
    {
        [$worst, $ticks, $seconds] = $measured;
        fwrite(STDERR, sprintf("\n[revolt] %s: worst timer lag %.1f ms, %d ticks in %.3f s\n", $scenario, $worst * 1000, $ticks, $seconds));
        $this->assertGreaterThan(0, $ticks, "$scenario: the timer never fired");
        $this->assertLessThan(self::MAX_LAG, $worst, sprintf('%s: worst timer lag %.1f ms', $scenario, $worst * 1000));
    }

    public function testATimerKeepsItsPaceWhileConsuming10000Messages(): void
    {
        $conn = $this->connect();
        $queue = $this->queue($conn, 'consume');
        $producer = $conn->producer();
        for ($i = 0; $i < 10_000; $i++) {
            $producer->publish("m$i", $queue);
        }
        $producer->waitForConfirms(30);
        $client = new Client($conn);
        $consumer = $conn->consumer($queue, ['prefetch' => 500]);
        $seen = 0;
        $measured = Revolt::withTimer(function () use ($client, $consumer, &$seen, &$handled): void {
            $count = function (Message $m) use (&$seen): void {
                $seen++;
            };
            $handled = Revolt::all(['consume' => fn () => $client->consume($consumer, $count, ['max_messages' => 10_000, 'idle_timeout' => 10])])['consume'];
        });
        $this->assertSame(10_000, $handled);
        $this->assertSame(10_000, $seen);
        $this->assertLag('consume 10,000 messages', $measured);
        $client->close();
        $conn->close();
        $this->assertSame(0, Broker::countWithAmqplib($queue), 'every message acked');
    }

    public function testATimerKeepsItsPaceWhileWaitingFor10000Confirms(): void
    {
        $conn = $this->connect();
        $queue = $this->queue($conn, 'confirms');
        $client = new Client($conn);
        $producer = $conn->producer();
        $measured = Revolt::withTimer(function () use ($client, $producer, $queue): void {
            $waited = Revolt::all(['publish' => function () use ($client, $producer, $queue): array {
                $waited = [];
                for ($i = 0; $i < 10_000; $i++) {
                    $producer->publish("m$i", $queue);
                    if ($i % 100 === 99 && $i < 9_999) {
                        // publish() blocks the thread while 2000 are unconfirmed (the
                        // producer's window): wait for them in the fiber before that.
                        if ($producer->pendingConfirms() >= 1_000) {
                            $waited[] = $producer->pendingConfirms();
                            $client->waitForConfirms($producer, 30);
                        } else {
                            Revolt::sleep(0); // publishing is work too: let the loop run
                        }
                    }
                }
                $waited[] = $producer->pendingConfirms();
                $client->waitForConfirms($producer, 30);
                return $waited;
            }])['publish'];
            $this->assertIsArray($waited, $waited instanceof Throwable ? (string) $waited : '');
            fwrite(STDERR, sprintf("\n[revolt] confirms: %d waits, for %d confirms in all\n", count($waited), array_sum($waited)));
        });
        $this->assertSame(0, $producer->pendingConfirms());
        $this->assertLag('wait for 10,000 confirms', $measured);
        $this->assertSame(10_000, $conn->queueStatus($queue)['messages']);
    }

    public function testATimerKeepsItsPaceWith100RpcCallsOutstandingToASlowServer(): void
    {
        $queue = $this->slowServer();
        $client = new Client($this->conn);
        $tasks = [];
        for ($i = 0; $i < 100; $i++) {
            $tasks["call $i"] = static fn () => $client->rpc("req $i", $queue, '', [], 10)->getBody();
        }
        $measured = Revolt::withTimer(function () use ($tasks, &$replies): void {
            $replies = Revolt::all($tasks);
        });
        foreach ($replies as $key => $reply) {
            $this->assertSame('re: req ' . substr($key, 5), $reply, $key);
        }
        $this->assertLag('100 RPC calls to a 200 ms server', $measured);
        $this->assertGreaterThanOrEqual(self::SERVER_DELAY, $measured[2], 'the server took its time');
    }

    public function test50ConcurrentRpcCallsFinishInAboutOneServerDelay(): void
    {
        $queue = $this->slowServer();
        $client = new Client($this->conn);
        $tasks = [];
        for ($i = 0; $i < 50; $i++) {
            $tasks[$i] = static fn () => $client->rpc("req $i", $queue, '', [], 10)->getBody();
        }
        $started = hrtime(true) / 1e9;
        $replies = Revolt::all($tasks);
        $took = hrtime(true) / 1e9 - $started;
        fwrite(STDERR, sprintf("\n[revolt] 50 concurrent RPC calls (server delay 200 ms): %.3f s\n", $took));
        for ($i = 0; $i < 50; $i++) {
            $this->assertSame("re: req $i", $replies[$i]);
        }
        // One after another they take 50 delays (10 s); concurrently about one.
        $this->assertLessThan(5 * self::SERVER_DELAY, $took);
    }

    public function testSigtermLetsTheWorkerFinishTheMessageInHandAndTheLoopEnd(): void
    {
        $conn = $this->connect();
        $queue = $this->queue($conn, 'sigterm');
        $proc = proc_open(
            [PHP_BINARY, '-d', 'extension=' . Broker::extensionPath(), __DIR__ . '/Support/revolt_worker.php', $queue, '1000'],
            [1 => ['pipe', 'w'], 2 => ['pipe', 'w']],
            $pipes,
        );
        try {
            $producer = $conn->producer();
            $producer->publish('ready', $queue);
            $producer->waitForConfirms();
            $this->assertSame('ready', $this->readLine($pipes[1], 10.0), 'the worker consumes');
            $producer->publish('job-1', $queue);
            $producer->publish('job-2', $queue);
            $producer->waitForConfirms();
            $this->assertSame('got job-1', $this->readLine($pipes[1], 5.0));
            posix_kill(proc_get_status($proc)['pid'], SIGTERM);
            $this->assertSame('ticking', $this->readLine($pipes[1], 5.0), 'the loop ran while the job was in hand');
            $this->assertSame('done job-1', $this->readLine($pipes[1], 5.0), 'the job in hand was finished');
            $this->assertSame('returned 2', $this->readLine($pipes[1], 5.0), 'then consume() returned (ready + job-1)');
            $status = proc_get_status($proc);
            for ($i = 0; $i < 250 && $status['running']; $i++) {
                usleep(20_000);
                $status = proc_get_status($proc);
            }
            $this->assertFalse($status['running'], 'the loop ended and the worker exited by itself');
            $this->assertSame(0, $status['exitcode'], stream_get_contents($pipes[2]));
        } finally {
            Children::end($proc, $pipes);
        }
        // job-1 was acked before the worker left (not redelivered); job-2 went back unseen.
        $left = [];
        while ($m = $conn->get($queue, true)) {
            $left[] = $m->getBody() . ($m->isRedelivered() ? ' (redelivered)' : '');
        }
        $this->assertCount(1, $left, implode(', ', $left));
        $this->assertStringStartsWith('job-2', $left[0]);
    }

    public function testCallsWaitingWhenTheConnectionClosesGetAConnectionException(): void
    {
        $conn = $this->connect();
        $queue = $this->queue($conn, 'closed');
        $client = new Client($conn);
        $stream = $conn->readiness();
        $consumer = $conn->consumer($queue);
        // A queue of its own for the request: in the consumed one, 'next' could take it.
        $nobody = $this->queue($conn, 'closed-rpc');
        $results = Revolt::all([
            'consume' => static fn () => $client->consume($consumer, static fn () => null, ['idle_timeout' => 20]),
            'rpc' => static fn () => $client->rpc('nobody answers', $nobody, '', [], 20),
            'next' => static fn () => $client->next($consumer, 20),
            'close' => static function () use ($conn): void {
                Revolt::sleep(0.1);
                $conn->close();
            },
        ], 10.0);
        foreach (['consume', 'rpc', 'next'] as $call) {
            $this->assertInstanceOf(ConnectionException::class, $results[$call], "$call: " . (is_object($results[$call]) ? get_class($results[$call]) : var_export($results[$call], true)));
            $this->assertStringContainsString('closed', $results[$call]->getMessage());
        }
        // The stream stays readable after close(); each take on it then throws.
        $read = [$stream];
        $w = $e = null;
        $this->assertSame(1, stream_select($read, $w, $e, 0), 'readable for good after close()');
        $this->assertThrows(ConnectionException::class, static fn () => $client->next($consumer, 1.0));
        $this->assertThrows(ConnectionException::class, static fn () => new Client($conn));
        $this->assertThrows(ConnectionException::class, static fn () => $conn->readiness());
    }

    public function testAClosedClientFailsItsWaitersAndLaterCalls(): void
    {
        $conn = $this->connect();
        $queue = $this->queue($conn, 'client-closed');
        $client = new Client($conn);
        $results = Revolt::all([
            'rpc' => static fn () => $client->rpc('nobody answers', $queue, '', [], 20),
            'close' => static function () use ($client): void {
                Revolt::sleep(0.05);
                $client->close();
            },
        ], 10.0);
        $this->assertInstanceOf(ConnectionException::class, $results['rpc']);
        $this->assertStringContainsString('closed while this call waited', $results['rpc']->getMessage());
        $this->assertThrows(ConnectionException::class, static fn () => $client->rpc('x', $queue));
        $this->assertTrue($conn->isConnected(), 'the connection is the caller\'s to close');
    }

    public function testAReplyIsTakenOnce(): void
    {
        $queue = $this->slowServer();
        $client = new Client($this->conn);
        $call = $this->conn->rpcAsync('once', $queue, '', [], 10);
        $results = Revolt::all([
            'first' => static fn () => $client->awaitReply($call)->getBody(),
            'second' => static fn () => $client->awaitReply($call)->getBody(),
        ]);
        $replies = array_filter($results, 'is_string');
        $failures = array_filter($results, static fn ($r) => $r instanceof AmqpRs\Exception);
        $this->assertSame(['re: once'], array_values($replies), 'one fiber gets the reply');
        $this->assertCount(1, $failures, 'the other an AmqpRs\Exception');
        $this->assertStringContainsString('already taken', reset($failures)->getMessage());
        $this->assertTrue($call->isDone());
        $this->assertThrows(AmqpRs\Exception::class, static fn () => $client->awaitReply($call), 'already taken');
    }

    public function testAClientUsedInAForkedChildFailsClearlyAndTheParentCarriesOn(): void
    {
        $queue = $this->slowServer();
        $conn = $this->conn;
        $client = new Client($conn);
        $producer = $conn->producer();
        $consumer = $conn->consumer($this->queue($conn, 'fork'));
        $results = Revolt::all([
            // In flight in the parent when it forks: the child's copy of this fiber must not
            // hang the child, and the parent's must get its reply.
            'parent' => static fn () => $client->rpc('parent', $queue, '', [], 10)->getBody(),
            'fork' => function () use ($client, $conn, $queue, $producer, $consumer): int {
                Revolt::sleep(0.02);
                $pid = pcntl_fork();
                if ($pid === 0) {
                    $this->inForkedChild([
                        static fn () => $client->rpc('child', $queue, '', [], 2),
                        static fn () => $client->waitForConfirms($producer, 2),
                        static fn () => $client->consume($consumer, static fn () => null, ['max_time' => 2]),
                        static fn () => $client->next($consumer, 2),
                        static fn () => new Client($conn),
                    ]);
                }
                $this->assertGreaterThan(0, $pid, 'fork failed');
                while (pcntl_waitpid($pid, $status, WNOHANG) === 0) {
                    Revolt::sleep(0.01); // the parent's loop keeps running meanwhile
                }
                return pcntl_wifsignaled($status) ? pcntl_wtermsig($status) : -pcntl_wexitstatus($status);
            },
        ]);
        $this->assertSame(SIGUSR1, $results['fork'], 'the child: each call failed with ConnectionException naming fork() (SIGUSR1), else SIGKILL');
        $this->assertSame('re: parent', $results['parent'], 'the parent is unaffected');
        $this->assertSame('re: after', $client->rpc('after', $queue, '', [], 10)->getBody());
    }

    /**
     * In a forked child: every call must throw a ConnectionException that names fork(). Ends
     * the child without PHPUnit's shutdown handlers (they belong to the parent): SIGUSR1 for
     * success, SIGKILL for failure (as ForkTest does).
     *
     * @param list<Closure(): mixed> $calls
     */
    private function inForkedChild(array $calls): never
    {
        $ok = true;
        foreach ($calls as $i => $call) {
            try {
                $call();
                fwrite(STDERR, "child: call $i did not throw\n");
                $ok = false;
            } catch (ConnectionException $e) {
                if (!str_contains($e->getMessage(), 'before fork()')) {
                    fwrite(STDERR, "child: call $i: {$e->getMessage()}\n");
                    $ok = false;
                }
            } catch (Throwable $e) {
                fwrite(STDERR, "child: call $i: " . get_class($e) . ": {$e->getMessage()}\n");
                $ok = false;
            }
        }
        posix_kill(getmypid(), $ok ? SIGUSR1 : SIGKILL);
        exit(1);
    }

    public function testFibersSuspendedAcrossARecoveryResumeOrGetTheBlockingCallsException(): void
    {
        require_once __DIR__ . '/Support/Node.php';
        $node = Node::start('amqprs-revolt-' . getmypid(), Node::freePort());
        try {
            $conn = new Connection($node->uri());
            $queue = $conn->declareQueue('revolt.recovery', ['durable' => true, 'auto_delete' => false]);
            $rpcQueue = $conn->declareQueue('revolt.recovery.rpc', ['durable' => true, 'auto_delete' => false]);
            $client = new Client($conn);
            $producer = $conn->producer();
            $consumer = $conn->consumer($queue, ['prefetch' => 10]);
            $seen = [];
            $lag = [0.0, 0, 0.0];
            $results = Revolt::all([
                'consume' => static function () use ($client, $consumer, &$seen): int {
                    return $client->consume($consumer, static function (Message $m) use (&$seen): void {
                        $seen[] = $m->getBody();
                    }, ['max_messages' => 1, 'max_time' => 90]);
                },
                // Nobody serves it, and a reply could only come on the lost channel.
                'rpc' => static fn () => $client->rpc('who', $rpcQueue, '', [], 20),
                'confirms' => static function () use ($client, $producer, $queue): string {
                    // 12.5 MB of persistent messages: the broker cannot have confirmed them
                    // all when the node is killed right after.
                    $body = str_repeat('x', 64 << 10);
                    for ($i = 0; $i < 200; $i++) {
                        $producer->publish($body, $queue, '', ['message_id' => "big$i"]);
                    }
                    $client->waitForConfirms($producer, 90);
                    return 'confirmed';
                },
                'fault' => function () use ($node, $queue, &$lag): void {
                    $node->kill();
                    $node->restart();
                    $other = new Connection($node->uri());
                    $producer = $other->producer();
                    $producer->publish('after', $queue);
                    $producer->waitForConfirms(10);
                    $other->close();
                    // The suspended fibers finish while this one keeps a timer.
                    $lag = Revolt::withTimer(static fn () => Revolt::sleep(0.5));
                },
            ], 120.0);
            foreach ($results as $key => $result) {
                fwrite(STDERR, sprintf("\n[revolt] recovery: %s -> %s", $key, $result instanceof Throwable ? get_class($result) . ': ' . $result->getMessage() : var_export($result, true)));
            }
            fwrite(STDERR, sprintf("\n[revolt] recovery: worst timer lag in the 0.5 s after the restart %.1f ms\n", $lag[0] * 1000));
            $this->assertNull($results['fault'], (string) ($results['fault'] ?? ''));
            // The consumer is recovered with the connection: it resumes with the next message.
            $this->assertSame(1, $results['consume'], (string) ($results['consume'] instanceof Throwable ? $results['consume'] : ''));
            // 'after' was published once the node was back; big* messages may come first.
            $this->assertCount(1, $seen);
            // What the blocking calls give: rpc() the ConnectionException of the lost
            // connection ("lost during the call") when lapin reports the loss on the reply
            // consumer, else its TimeoutException (the consumer is recovered with the
            // connection, and nobody took the request on the restarted node): both seen, as
            // for a blocking rpc(). waitForConfirms() reports what was lost before the broker
            // confirmed it.
            $rpc = $results['rpc'];
            $this->assertTrue(
                $rpc instanceof AmqpRs\TimeoutException
                    || ($rpc instanceof AmqpRs\ConnectionException && str_contains($rpc->getMessage(), 'lost during the call')),
                (string) ($rpc instanceof Throwable ? $rpc : var_export($rpc, true)),
            );
            if ($results['confirms'] !== 'confirmed') {
                $this->assertInstanceOf(AmqpRs\PublishException::class, $results['confirms'], (string) $results['confirms']);
                foreach ($results['confirms']->getFailures() as $failure) {
                    $this->assertStringContainsString('lost before the broker confirmed it', $failure['reason']);
                }
            }
            $this->assertTrue($conn->isConnected(), 'recovered');
            $client->close();
            $conn->close();
        } finally {
            $node->stop();
        }
    }

    /** @param class-string<Throwable> $class */
    private function assertThrows(string $class, Closure $call, string $message = ''): void
    {
        try {
            $call();
        } catch (Throwable $e) {
            $this->assertInstanceOf($class, $e, (string) $e);
            $this->assertStringContainsString($message, $e->getMessage());
            return;
        }
        $this->fail("expected $class");
    }
}
