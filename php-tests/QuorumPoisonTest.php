<?php

declare(strict_types=1);

use AmqpRs\Connection;
use AmqpRs\Message;
use AmqpRs\Tests\Support\Broker;
use PHPUnit\Framework\TestCase;

/**
 * A task queue on a quorum queue, with a poison task among good ones. RabbitMQ 4.x gives
 * quorum queues a delivery limit of 20 by default: a task handed out more often than that is
 * dead-lettered, or dropped when the queue has no dead-letter exchange. So the queue must name
 * one (docs/task-queue.md). On 3.x there is no default limit: the test sets the same limit
 * explicitly there, and uses the default on 4.x.
 */
final class QuorumPoisonTest extends TestCase
{
    private const LIMIT = 20;

    private Connection $conn;
    private string $queue;
    private string $dead;
    private string $out;

    protected function setUp(): void
    {
        $this->conn = new Connection(Broker::uri());
        $this->queue = Broker::unique('quorum-tasks');
        $this->dead = $this->queue . '.dead';
        $this->out = tempnam(sys_get_temp_dir(), 'amqp_rs_quorum');
        $this->conn->declareQueue($this->dead, ['arguments' => ['x-queue-type' => 'quorum']]);
        $arguments = [
            'x-queue-type' => 'quorum',
            'x-dead-letter-exchange' => '',
            'x-dead-letter-routing-key' => $this->dead,
        ];
        if (Broker::majorVersion() < 4) {
            $arguments['x-delivery-limit'] = self::LIMIT;
        }
        $this->conn->declareQueue($this->queue, ['arguments' => $arguments]);
    }

    protected function tearDown(): void
    {
        $this->conn->deleteQueue($this->queue);
        $this->conn->deleteQueue($this->dead);
        @unlink($this->out);
    }

    public function testACrashingPoisonTaskIsDeadLetteredAtTheDeliveryLimitAndTheWorkersGoOn(): void
    {
        $producer = $this->conn->producer();
        $producer->publish('poison', $this->queue, '', ['message_id' => 'poison']);
        for ($i = 0; $i < 5; $i++) {
            $producer->publish("good $i", $this->queue);
        }
        $producer->waitForConfirms();

        // One worker after another, as a supervisor restarts them: each takes the poison
        // task, crashes, and the broker hands the task out again to the next one.
        $crashes = 0;
        for ($run = 0; $run <= self::LIMIT + 5 && $this->conn->queueStatus($this->dead)['messages'] === 0; $run++) {
            $crashes += $this->runWorker(idle: 0.5) === 'crashed' ? 1 : 0;
        }
        // The poison task was dead-lettered, once, after LIMIT + 1 deliveries ...
        $this->assertSame(1, $this->conn->queueStatus($this->dead)['messages'], "crashes: $crashes");
        $this->assertSame(self::LIMIT + 1, $crashes);
        $dead = $this->conn->get($this->dead, true);
        $this->assertInstanceOf(Message::class, $dead);
        $this->assertSame('poison', $dead->getBody());
        $this->assertSame('delivery_limit', $dead->getHeader('x-first-death-reason'));

        // ... and a worker goes on with the good tasks: each done once, the queue empty.
        $this->assertSame('idle', $this->runWorker(idle: 1.0));
        $done = file($this->out, FILE_IGNORE_NEW_LINES);
        sort($done);
        $this->assertSame(['good 0', 'good 1', 'good 2', 'good 3', 'good 4'], $done);
        $this->assertSame(0, $this->conn->queueStatus($this->queue)['messages']);
    }

    /** Runs one worker process to its end: 'crashed' (SIGKILL by the poison) or 'idle'. */
    private function runWorker(float $idle): string
    {
        $so = Broker::extensionPath();
        $cmd = [PHP_BINARY, '-d', "extension=$so", __DIR__ . '/Support/crashing_worker.php', $this->queue, $this->out, (string) $idle];
        $proc = proc_open($cmd, [1 => ['file', '/dev/null', 'w'], 2 => STDERR], $pipes);
        $this->assertIsResource($proc);
        $deadline = microtime(true) + 30;
        while (($status = proc_get_status($proc))['running'] && microtime(true) < $deadline) {
            usleep(20_000);
        }
        if ($status['running']) {
            proc_terminate($proc, SIGKILL);
            proc_close($proc);
            $this->fail('worker did not return within 30 s');
        }
        proc_close($proc);
        if ($status['signaled'] && $status['termsig'] === SIGKILL) {
            return 'crashed';
        }
        $this->assertSame(0, $status['exitcode'], 'worker exit code');
        return 'idle';
    }
}
