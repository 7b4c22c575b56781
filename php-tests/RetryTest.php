<?php

declare(strict_types=1);

use AmqpRs\Connection;
use AmqpRs\Message;
use AmqpRs\Tests\Support\Broker;
use PHPUnit\Framework\TestCase;

/** Retries with backoff and dead letters (consume() on_error 'retry'), and delayed publish. */
final class RetryTest extends TestCase
{
    private Connection $conn;
    private string $queue;

    protected function setUp(): void
    {
        $this->conn = new Connection(Broker::uri());
        $this->queue = $this->conn->declareQueue(Broker::unique('retry'), ['auto_delete' => false]);
    }

    protected function tearDown(): void
    {
        $conn = new Connection(Broker::uri());
        foreach ([$this->queue, "{$this->queue}.dead", "{$this->queue}.graveyard"] as $queue) {
            $conn->deleteQueue($queue);
        }
        $conn->close();
    }

    /** Publishes each body, with its body as message_id, and waits for the confirms. */
    private function publish(string ...$bodies): void
    {
        $producer = $this->conn->producer();
        foreach ($bodies as $body) {
            $producer->publish($body, $this->queue, '', ['message_id' => $body, 'headers' => ['origin' => 'test']]);
        }
        $producer->waitForConfirms(10);
    }

    public function testAFailingMessageIsRetriedWithBackoffThenDeadLetteredWithItsReason(): void
    {
        $this->publish('bad', 'flaky', 'good');
        $seen = [];
        $handled = $this->conn->consumer($this->queue)->consume(function (Message $m) use (&$seen) {
            $seen[] = [$m->getBody(), $m->getAttempt(), microtime(true)];
            if ($m->getBody() === 'bad' || ($m->getBody() === 'flaky' && $m->getAttempt() === 1)) {
                throw new DomainException("cannot handle {$m->getBody()}");
            }
        }, ['on_error' => 'retry', 'max_retries' => 2, 'retry_delay' => 0.2, 'idle_timeout' => 1.5, 'max_time' => 20]);

        $attempts = fn (string $body) => array_column(array_filter($seen, fn ($s) => $s[0] === $body), 1);
        $this->assertSame([1, 2, 3], $attempts('bad'), 'first attempt and two retries');
        $this->assertSame([1, 2], $attempts('flaky'), 'succeeded on its retry');
        $this->assertSame([1], $attempts('good'));
        $this->assertSame(6, $handled, 'consume() went on past the failures');
        $times = array_column(array_filter($seen, fn ($s) => $s[0] === 'bad'), 2);
        $this->assertGreaterThanOrEqual(0.2, $times[1] - $times[0], 'first retry after retry_delay');
        $this->assertGreaterThanOrEqual(0.4, $times[2] - $times[1], 'the delay doubles');

        $this->assertSame(0, Broker::countWithAmqplib($this->queue));
        $dead = $this->conn->get("{$this->queue}.dead", true);
        $this->assertNotNull($dead, 'the message whose retries were spent is dead-lettered');
        $this->assertSame('bad', $dead->getBody());
        $this->assertSame('bad', $dead->getMessageId());
        $this->assertSame('test', $dead->getHeader('origin'), 'its own headers are kept');
        $this->assertSame(3, $dead->getHeader('x-attempt'));
        $this->assertSame('DomainException: cannot handle bad', $dead->getHeader('x-failure-reason'));
        $this->assertSame($this->queue, $dead->getHeader('x-failed-queue'));
        $this->assertNull($this->conn->get("{$this->queue}.dead", true), 'only that one');
    }

    public function testWithNoRetriesTheFirstFailureGoesToTheNamedDeadLetterQueue(): void
    {
        $this->publish('bad');
        $this->conn->consumer($this->queue)->consume(function (Message $m) {
            throw new RuntimeException('no');
        }, ['on_error' => 'retry', 'max_retries' => 0, 'dead_letter' => "{$this->queue}.graveyard", 'idle_timeout' => 0.5]);
        $dead = $this->conn->get("{$this->queue}.graveyard", true);
        $this->assertSame('bad', $dead?->getBody());
        $this->assertSame(1, $dead->getAttempt());
    }

    public function testAMessageTheCallbackSettledItselfIsNotRetried(): void
    {
        $this->publish('settled');
        $this->conn->consumer($this->queue)->consume(function (Message $m) {
            $m->reject(false);
            throw new RuntimeException('after settling');
        }, ['on_error' => 'retry', 'retry_delay' => 0, 'idle_timeout' => 0.5]);
        $this->assertSame(0, Broker::countWithAmqplib($this->queue));
        $this->assertStringNotContainsString("{$this->queue}.dead", Broker::ctl('list_queues', 'name', '-q', '--no-table-headers'), 'nothing dead-lettered');
    }

    public function testBadRetryOptionsAreRefused(): void
    {
        $this->expectException(InvalidArgumentException::class);
        $this->expectExceptionMessage("'max_retries' must be between 0 and 100");
        $this->conn->consumer($this->queue)->consume(fn () => null, ['on_error' => 'retry', 'max_retries' => -1]);
    }

    public function testADelayedPublishIsRoutedOnlyAfterItsDelay(): void
    {
        $producer = $this->conn->producer();
        $producer->publish('later', $this->queue, '', ['delay' => 600, 'message_id' => 'later']);
        $producer->publish('now', $this->queue);
        $producer->waitForConfirms(10);
        $sent = microtime(true);
        $arrivals = [];
        $this->conn->consumer($this->queue)->consume(function (Message $m) use (&$arrivals, $sent) {
            $arrivals[$m->getBody()] = microtime(true) - $sent;
        }, ['max_messages' => 2, 'max_time' => 10]);
        $this->assertSame(['now', 'later'], array_keys($arrivals));
        $this->assertGreaterThanOrEqual(0.5, $arrivals['later']);
        $this->assertLessThan(0.5, $arrivals['now']);
        $this->assertStringContainsString("amq_rs.delay.600ms.(default).{$this->queue}", Broker::ctl('list_queues', 'name', '-q', '--no-table-headers'));
    }

    public function testADelayedPublishToAnExchangeKeepsItsRoutingKey(): void
    {
        $exchange = Broker::unique('delayed-topic');
        $this->conn->declareExchange($exchange, 'topic', ['auto_delete' => true]);
        $this->conn->bindQueue($this->queue, $exchange, 'orders.*');
        $producer = $this->conn->producer();
        $producer->publishJson(['order' => 7], 'orders.created', $exchange, ['delay' => 300]);
        $producer->waitForConfirms(10);
        $this->assertSame(0, Broker::countWithAmqplib($this->queue), 'not routed yet');
        $got = null;
        $this->conn->consumer($this->queue)->consume(function (Message $m) use (&$got) {
            $got = $m;
        }, ['max_messages' => 1, 'max_time' => 10]);
        $this->assertSame(['order' => 7], $got?->json());
        $this->assertSame('orders.created', $got->getRoutingKey());
        $this->assertSame($exchange, $got->getExchange());
    }

    public function testADelayMustBeAWholeNumberOfMilliseconds(): void
    {
        $this->expectException(InvalidArgumentException::class);
        $this->conn->producer()->publish('x', $this->queue, '', ['delay' => -5]);
    }

    public function testARetriedMessageKeepsItsExchangeAndRoutingKey(): void
    {
        $exchange = Broker::unique('retry-topic');
        $this->conn->declareExchange($exchange, 'topic', ['auto_delete' => true]);
        $this->conn->bindQueue($this->queue, $exchange, 'order.*');
        $producer = $this->conn->producer();
        $producer->publishJson(['id' => 1], 'order.created', $exchange);
        $producer->waitForConfirms(10);
        $seen = [];
        $this->conn->consumer($this->queue)->consume(function (Message $m) use (&$seen) {
            $seen[] = [$m->getAttempt(), $m->getExchange(), $m->getRoutingKey()];
            throw new RuntimeException('handler down');
        }, ['on_error' => 'retry', 'max_retries' => 1, 'retry_delay' => 0.1, 'idle_timeout' => 1]);
        $this->assertSame([[1, $exchange, 'order.created'], [2, $exchange, 'order.created']], $seen);
        $dead = $this->conn->get("{$this->queue}.dead", true);
        $this->assertSame('order.created', $dead?->getRoutingKey(), 'the dead letter too');
        $this->assertSame($exchange, $dead->getExchange());
    }
}
