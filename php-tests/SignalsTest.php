<?php

declare(strict_types=1);

use AmqpRs\Connection;
use AmqpRs\Tests\Support\Broker;
use AmqpRs\Tests\Support\Children;
use PHPUnit\Framework\TestCase;

/** A real child PHP worker gets real signals. */
final class SignalsTest extends TestCase
{
    private Connection $conn;
    private string $queue;
    /** @var resource|null */
    private $proc = null;
    /** @var array<int, resource> */
    private array $pipes = [];

    protected function setUp(): void
    {
        $this->conn = new Connection(Broker::uri());
        $this->queue = $this->conn->declareQueue(Broker::unique('signals'));
    }

    protected function tearDown(): void
    {
        Children::end($this->proc);
        $this->conn->deleteQueue($this->queue);
    }

    private function startWorker(int $sleepMs, bool $userHandler = false): int
    {
        $so = Broker::extensionPath();
        $cmd = [PHP_BINARY, '-d', "extension=$so", __DIR__ . '/Support/worker.php', $this->queue, (string) $sleepMs];
        if ($userHandler) {
            $cmd[] = 'user-handler';
        }
        $this->proc = proc_open($cmd, [1 => ['pipe', 'w'], 2 => ['pipe', 'w']], $this->pipes);
        // Answered from inside consume(), once its signal handling is in place.
        $producer = $this->conn->producer();
        $producer->publish('ready', $this->queue);
        $producer->waitForConfirms();
        $this->assertSame('ready', $this->readLine(10.0));
        return proc_get_status($this->proc)['pid'];
    }

    private function readLine(float $timeout): ?string
    {
        $read = [$this->pipes[1]];
        $w = $e = null;
        if (stream_select($read, $w, $e, (int) $timeout, (int) (fmod($timeout, 1) * 1e6)) === 1) {
            $line = fgets($this->pipes[1]);
            return $line === false ? null : rtrim($line);
        }
        return null;
    }

    public function testIdleWorkerReturnsWithinASecondOfSigterm(): void
    {
        $pid = $this->startWorker(0);
        $sent = microtime(true);
        posix_kill($pid, SIGTERM);
        $this->assertSame('returned 1', $this->readLine(3.0), 'the ready message, then nothing');
        $this->assertLessThan(1.0, microtime(true) - $sent);
    }

    public function testSigintStopsTooByDefault(): void
    {
        $pid = $this->startWorker(0);
        posix_kill($pid, SIGINT);
        $this->assertSame('returned 1', $this->readLine(3.0));
    }

    public function testBusyWorkerFinishesAndAcksTheMessageInHandThenReturns(): void
    {
        $pid = $this->startWorker(1500);
        $producer = $this->conn->producer();
        $producer->publish('job-1', $this->queue);
        $producer->publish('job-2', $this->queue);
        $producer->waitForConfirms();
        $this->assertSame('got job-1', $this->readLine(5.0));
        posix_kill($pid, SIGTERM);
        $this->assertSame('done job-1', $this->readLine(5.0));
        $this->assertSame('returned 2', $this->readLine(3.0), 'ready and job-1');
        $this->assertNull($this->readLine(0.5), 'job-2 must not be started');
        proc_close($this->proc);
        $this->proc = null;
        // job-1 was acked, job-2 is back in the queue for the next worker.
        $this->assertSame('job-2', $this->conn->get($this->queue, true)?->getBody());
        $this->assertNull($this->conn->get($this->queue));
    }

    public function testUserPcntlHandlerStillRuns(): void
    {
        $pid = $this->startWorker(0, true);
        posix_kill($pid, SIGTERM);
        $lines = [$this->readLine(3.0), $this->readLine(3.0)];
        $this->assertContains('user handler ran', $lines);
        $this->assertContains('returned 1', $lines);
    }
}
