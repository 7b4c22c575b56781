<?php

declare(strict_types=1);

use AmqpRs\ChannelException;
use AmqpRs\Connection;
use AmqpRs\Consumer;
use AmqpRs\Message;
use AmqpRs\Tests\Support\Broker;
use PHPUnit\Framework\TestCase;

final class ConsumerTest extends TestCase
{
    private Connection $conn;
    private string $queue;

    protected function setUp(): void
    {
        $this->conn = new Connection(Broker::uri());
        $this->queue = $this->conn->declareQueue(Broker::unique('consumer'));
    }

    protected function tearDown(): void
    {
        // Closed first: left open, its recovery from a later test's broker restart
        // (RecoveryTest) would declare the queue again after it is deleted below.
        try {
            $this->conn->close();
        } catch (\AmqpRs\Exception) {
        }
        $conn = new Connection(Broker::uri());
        try {
            $conn->deleteQueue($this->queue);
        } catch (ChannelException) {
        }
        $conn->close();
    }

    private function publish(int $count, array $properties = []): void
    {
        $producer = $this->conn->producer();
        for ($i = 0; $i < $count; $i++) {
            $producer->publish("m$i", $this->queue, '', $properties);
        }
        $producer->waitForConfirms();
    }

    /** Ready + unacked messages of the queue, as the broker counts them. */
    private function total(): int
    {
        $rows = Broker::ctl('list_queues', 'name', 'messages', '-q', '--no-table-headers');
        preg_match('/^' . preg_quote($this->queue, '/') . '\s+(\d+)$/m', $rows, $m);
        return (int) ($m[1] ?? -1);
    }

    public function testConsumersAndMessagesAreMadeOnlyByTheExtension(): void
    {
        foreach ([Consumer::class, Message::class] as $class) {
            try {
                new $class();
                $this->fail("new $class must fail");
            } catch (Error $e) {
                $this->assertStringContainsString('private', $e->getMessage());
            }
        }
    }

    public function testCallbackGetsEachMessageInOrderAndReturnedMessagesAreAcked(): void
    {
        $this->publish(5);
        $seen = [];
        $n = $this->conn->consumer($this->queue)->consume(function (Message $m) use (&$seen) {
            $seen[] = $m->getBody();
        }, ['max_messages' => 5]);
        $this->assertSame(5, $n);
        $this->assertSame(['m0', 'm1', 'm2', 'm3', 'm4'], $seen);
        Broker::eventually(fn () => $this->total() === 0, 'all 5 acked');
    }

    public function testMessageCarriesEveryPropertyAndNestedHeaders(): void
    {
        $headers = ['n' => 42, 'f' => 1.5, 'b' => false, 'null' => null, 'list' => [1, 'x', [true]], 'table' => ['deep' => ['k' => 'v']], 'bin' => "\x00\xff"];
        $props = ['content_type' => 'text/plain', 'content_encoding' => 'gzip', 'headers' => $headers, 'delivery_mode' => 1,
            'priority' => 5, 'correlation_id' => 'c', 'reply_to' => 'r', 'expiration' => '60000', 'message_id' => 'id',
            'timestamp' => 1700000000, 'type' => 't', 'user_id' => 'guest', 'app_id' => 'app'];
        $producer = $this->conn->producer();
        $this->conn->bindQueue($this->queue, 'amq.direct', 'rk');
        $producer->publish("bin\x00ary", 'rk', 'amq.direct', $props);
        $producer->waitForConfirms();
        $got = null;
        $this->conn->consumer($this->queue, ['consumer_tag' => 'my-tag'])->consume(function (Message $m) use (&$got) {
            $got = $m;
        }, ['max_messages' => 1]);
        $this->assertInstanceOf(Message::class, $got);
        $this->assertSame("bin\x00ary", $got->getBody());
        $this->assertSame('rk', $got->getRoutingKey());
        $this->assertSame('amq.direct', $got->getExchange());
        $this->assertSame('my-tag', $got->getConsumerTag());
        $this->assertFalse($got->isRedelivered());
        $this->assertSame(1, $got->getDeliveryTag());
        ksort($headers);
        $expected = $props;
        $expected['headers'] = $headers;
        $actual = $got->getProperties();
        ksort($expected);
        ksort($actual);
        $this->assertSame($expected, $actual);
        $this->assertSame($headers, $got->getHeaders());
        $this->assertSame(42, $got->getHeader('n'));
        $this->assertSame('fallback', $got->getHeader('missing', 'fallback'));
        $this->assertNull($got->getHeader('missing'));
        $this->assertSame('text/plain', $got->getContentType());
        $this->assertSame('id', $got->getMessageId());
        $this->assertSame('c', $got->getCorrelationId());
        $this->assertSame('r', $got->getReplyTo());
        $this->assertSame(5, $got->getPriority());
        $this->assertSame(1700000000, $got->getTimestamp());
        $this->assertSame('t', $got->getType());
        $this->assertSame('app', $got->getAppId());
        $this->assertSame('60000', $got->getExpiration());
        $this->assertSame(1, $got->getDeliveryMode());
        $this->assertTrue($got->isSettled(), 'acked when the callback returned');
    }

    public function testSettlingTwiceRaises(): void
    {
        $this->publish(1);
        $this->conn->consumer($this->queue)->consume(function (Message $m) {
            $m->ack();
            $this->assertTrue($m->isSettled());
            try {
                $m->nack();
                $this->fail('second settlement must raise');
            } catch (AmqpRs\Exception $e) {
                $this->assertStringContainsString('settled already', $e->getMessage());
            }
        }, ['max_messages' => 1]);
    }

    public function testNackWithoutRequeueDropsAndRejectWithRequeueRedelivers(): void
    {
        $this->publish(2);
        $redelivered = null;
        $this->conn->consumer($this->queue)->consume(function (Message $m) use (&$redelivered) {
            if ($m->getBody() === 'm0') {
                $m->nack(false);
            } elseif (!$m->isRedelivered()) {
                $m->reject(true);
            } else {
                $redelivered = $m->getBody();
            }
        }, ['max_messages' => 3]);
        $this->assertSame('m1', $redelivered);
    }

    public function testThrowingCallbackRequeuesByDefaultAndTheExceptionLeavesConsume(): void
    {
        $this->publish(1);
        $consumer = $this->conn->consumer($this->queue);
        try {
            $consumer->consume(function (Message $m) {
                throw new DomainException('handler failed on ' . $m->getBody());
            });
            $this->fail('the exception must leave consume()');
        } catch (DomainException $e) {
            $this->assertSame('handler failed on m0', $e->getMessage());
        }
        $again = null;
        $consumer->consume(function (Message $m) use (&$again) {
            $again = $m->isRedelivered();
        }, ['max_messages' => 1]);
        $this->assertTrue($again);
    }

    public function testThrowingCallbackWithOnErrorRejectDeadLetters(): void
    {
        $dlq = $this->conn->declareQueue('', ['exclusive' => true]);
        $q = Broker::unique('dlx-source');
        $this->conn->declareQueue($q, ['arguments' => ['x-dead-letter-exchange' => '', 'x-dead-letter-routing-key' => $dlq]]);
        $producer = $this->conn->producer();
        $producer->publish('poison', $q);
        $producer->waitForConfirms();
        try {
            $this->conn->consumer($q)->consume(fn () => throw new LogicException('bad'), ['on_error' => 'reject']);
            $this->fail('the exception must leave consume()');
        } catch (LogicException) {
        }
        $dead = null;
        Broker::eventually(function () use ($dlq, &$dead) {
            return ($dead = $this->conn->get($dlq, true)) !== null;
        }, 'the message in the dead-letter queue');
        $this->assertSame('poison', $dead->getBody());
        $this->assertSame(0, $this->conn->deleteQueue($q));
    }

    public function testStopFromTheCallbackReturnsAfterTheMessageInHand(): void
    {
        $this->publish(5);
        $consumer = $this->conn->consumer($this->queue, ['prefetch' => 1]);
        $n = $consumer->consume(function (Message $m) use ($consumer) {
            if ($m->getBody() === 'm1') {
                $consumer->stop();
            }
        });
        $this->assertSame(2, $n);
        $consumer->cancel();
        Broker::eventually(fn () => $this->total() === 3, 'm0 and m1 acked, 3 left');
    }

    public function testIdleTimeoutAndMaxTimeEndAnIdleWorker(): void
    {
        $consumer = $this->conn->consumer($this->queue);
        $t = microtime(true);
        $this->assertSame(0, $consumer->consume(fn () => null, ['idle_timeout' => 0.3]));
        $this->assertLessThan(1.0, microtime(true) - $t);
        $t = microtime(true);
        $this->assertSame(0, $consumer->consume(fn () => null, ['max_time' => 0.3]));
        $elapsed = microtime(true) - $t;
        $this->assertGreaterThanOrEqual(0.3, $elapsed);
        $this->assertLessThan(1.0, $elapsed);
    }

    public function testMemoryLimitEndsTheLoopOnceExceeded(): void
    {
        $this->publish(3);
        $hog = [];
        $n = $this->conn->consumer($this->queue)->consume(function () use (&$hog) {
            $hog[] = str_repeat('x', 4 * 1024 * 1024);
        }, ['memory_limit' => intdiv(memory_get_usage(), 1024 * 1024) + 2]);
        $this->assertSame(1, $n);
    }

    public function testAutoAckMessagesAreSettledAlready(): void
    {
        $this->publish(1);
        $this->conn->consumer($this->queue, ['auto_ack' => true])->consume(function (Message $m) {
            $this->assertTrue($m->isSettled());
            $this->expectException(AmqpRs\Exception::class);
            $m->ack();
        }, ['max_messages' => 1]);
    }

    public function testSeveralQueuesAreConsumedTogether(): void
    {
        $other = $this->conn->declareQueue('', ['exclusive' => true]);
        $producer = $this->conn->producer();
        $producer->publish('a', $this->queue);
        $producer->publish('b', $other);
        $producer->waitForConfirms();
        $bodies = [];
        $this->conn->consumer([$this->queue, $other])->consume(function (Message $m) use (&$bodies) {
            $bodies[] = $m->getBody();
        }, ['max_messages' => 2]);
        sort($bodies);
        $this->assertSame(['a', 'b'], $bodies);
    }

    public function testDeletingTheQueueEndsConsumeWithAClearException(): void
    {
        $consumer = $this->conn->consumer($this->queue);
        $other = new Connection(Broker::uri());
        $other->deleteQueue($this->queue);
        $this->expectException(ChannelException::class);
        $this->expectExceptionMessage($this->queue);
        $consumer->consume(fn () => null, ['max_time' => 5]);
    }

    public function testGetReturnsNullOnAnEmptyQueueAndMessagesOtherwise(): void
    {
        $this->assertNull($this->conn->get($this->queue));
        $this->publish(1, ['message_id' => 'g1']);
        $m = $this->conn->get($this->queue);
        $this->assertSame('g1', $m->getMessageId());
        $this->assertNull($m->getConsumerTag());
        $this->assertFalse($m->isSettled());
        $m->ack();
        $this->assertNull($this->conn->get($this->queue));
    }

    public function testUnknownOptionsAndBadValuesAreRefused(): void
    {
        try {
            $this->conn->consumer($this->queue, ['prefech' => 10]);
            $this->fail('unknown consumer option');
        } catch (InvalidArgumentException $e) {
            $this->assertStringContainsString("unknown option 'prefech'", $e->getMessage());
        }
        try {
            $this->conn->consumer($this->queue)->consume(fn () => null, ['on_error' => 'ignore']);
            $this->fail('bad on_error');
        } catch (InvalidArgumentException $e) {
            $this->assertStringContainsString("'on_error' must be 'requeue', 'reject' or 'retry'", $e->getMessage());
        }
        $this->expectException(TypeError::class);
        $this->conn->consumer($this->queue)->consume('no_such_function_anywhere');
    }

    public function testHeartbeatsAreKeptWhileACallbackWorksForSeconds(): void
    {
        // heartbeat 2 s: a client that misses two would be disconnected by the broker within
        // ~4 s; the callback blocks PHP for 6 s and the ack must still land afterwards. (1 s
        // left too little slack on a loaded 2-core machine: lapin itself gives up on a broker
        // silent for 2 s.)
        $conn = new Connection(Broker::uri(), ['heartbeat' => 2, 'name' => Broker::unique('hb')]);
        $this->publish(1);
        $n = $conn->consumer($this->queue)->consume(function () {
            sleep(6);
        }, ['max_messages' => 1]);
        $this->assertSame(1, $n);
        $this->assertTrue($conn->isConnected());
        $conn->close();
        Broker::eventually(fn () => $this->total() === 0, 'the ack landed');
    }

    public function testNextPullsFromThePrefetchBufferAndLeavesSettlingToTheCaller(): void
    {
        $this->publish(3);
        $consumer = $this->conn->consumer($this->queue, ['prefetch' => 10]);
        $first = $consumer->next(5);
        $this->assertSame('m0', $first?->getBody());
        $this->assertFalse($first->isSettled(), 'nothing is settled for you');
        $second = $consumer->next(5);
        $this->assertSame('m1', $second?->getBody());
        $second->ack();
        $first->nack(true);
        $seen = [];
        while ($m = $consumer->next(1)) {
            $seen[] = $m->getBody();
            $m->ack();
        }
        sort($seen);
        $this->assertSame(['m0', 'm2'], $seen, 'the nacked one came back, the acked one did not');
        $this->assertNull($consumer->next(0), 'null when nothing is there');
        Broker::eventually(fn () => $this->total() === 0, 'every ack was sent');
    }

    public function testNextLeavesUnsettledMessagesToTheBrokerWhenTheConsumerGoes(): void
    {
        $this->publish(2);
        $consumer = $this->conn->consumer($this->queue, ['prefetch' => 10]);
        $this->assertSame('m0', $consumer->next(5)?->getBody());
        unset($consumer);
        Broker::eventually(
            fn () => Broker::countWithAmqplib($this->queue) === 2,
            'the unsettled message is back in the queue, ready'
        );
    }

    public function testNextReturnsAtOnceOnASigtermTheScriptHandles(): void
    {
        $caught = 0;
        pcntl_signal(SIGTERM, function () use (&$caught) {
            $caught++;
        });
        try {
            $consumer = $this->conn->consumer($this->queue);
            $pid = getmypid();
            exec("(sleep 0.3; kill -TERM $pid) >/dev/null 2>&1 &");
            $started = microtime(true);
            $this->assertNull($consumer->next(10));
            $this->assertLessThan(5, microtime(true) - $started, 'not the whole timeout');
            $this->assertSame(1, $caught, 'the handler ran');
        } finally {
            pcntl_signal(SIGTERM, SIG_DFL);
        }
    }

    public function testDeliveriesNotHandedOutGoBackToTheQueueWhenConsumeReturns(): void
    {
        $this->publish(10);
        $first = $this->conn->consumer($this->queue, ['prefetch' => 10]);
        $this->assertSame(2, $first->consume(fn () => null, ['max_messages' => 2]));
        // $first lives on, and had all 10 prefetched: another worker must get the other 8 now.
        $other = new Connection(Broker::uri());
        $seen = [];
        $got = $other->consumer($this->queue)->consume(function (Message $m) use (&$seen) {
            $seen[] = $m->getBody();
        }, ['max_messages' => 8, 'max_time' => 10]);
        $this->assertSame(8, $got, 'the second consumer received what the first did not hand out');
        sort($seen);
        $this->assertSame(['m2', 'm3', 'm4', 'm5', 'm6', 'm7', 'm8', 'm9'], $seen);
        $other->close();
        Broker::eventually(fn () => $this->total() === 0, 'all 10 acked once');
        $this->assertSame(0, $first->consume(fn () => null, ['max_time' => 0.3]), 'consume() again subscribes again');
    }

    public function testCancelGivesTheUnseenDeliveriesBackAndLeavesTheOneInHandToSettle(): void
    {
        $this->publish(5);
        $consumer = $this->conn->consumer($this->queue, ['prefetch' => 10]);
        $inHand = $consumer->next(5);
        $this->assertSame('m0', $inHand?->getBody());
        Broker::eventually(fn () => Broker::countWithAmqplib($this->queue) === 0, 'all 5 prefetched');
        $consumer->cancel();
        Broker::eventually(fn () => Broker::countWithAmqplib($this->queue) === 4, 'the 4 unseen are ready again');
        $inHand->ack();
        $other = new Connection(Broker::uri());
        $got = $other->consumer($this->queue)->consume(fn () => null, ['max_messages' => 4, 'max_time' => 10]);
        $this->assertSame(4, $got);
        $other->close();
        Broker::eventually(fn () => $this->total() === 0, 'the one in hand acked, the 4 by the other');
    }
}
