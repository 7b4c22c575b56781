<?php

declare(strict_types=1);

use AmqpRs\ChannelException;
use AmqpRs\Connection;
use AmqpRs\Producer;
use AmqpRs\PublishException;
use AmqpRs\TimeoutException;
use AmqpRs\Tests\Support\Broker;
use PhpAmqpLib\Message\AMQPMessage;
use PHPUnit\Framework\Attributes\DataProvider;
use PHPUnit\Framework\TestCase;

final class ProducerTest extends TestCase
{
    private Connection $conn;
    private string $queue;

    protected function setUp(): void
    {
        $this->conn = new Connection(Broker::uri());
        $this->queue = $this->conn->declareQueue(Broker::unique('producer'), ['auto_delete' => false]);
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
        $conn->deleteQueue($this->queue);
        $conn->close();
    }

    /** Reads one message with php-amqplib, an independent client. */
    private function getWithAmqplib(): AMQPMessage
    {
        $conn = Broker::amqplib();
        $msg = $conn->channel()->basic_get($this->queue, true);
        $conn->close();
        $this->assertNotNull($msg, 'queue was empty');
        return $msg;
    }

    public function testProducersAreMadeOnlyByTheConnection(): void
    {
        $this->expectException(Error::class);
        $this->expectExceptionMessage('private');
        new Producer();
    }

    public function testPublishedMessagesReachTheQueueOnceConfirmed(): void
    {
        $producer = $this->conn->producer();
        for ($i = 0; $i < 500; $i++) {
            $producer->publish("message $i", $this->queue);
        }
        $producer->waitForConfirms(10);
        $this->assertSame(0, $producer->pendingConfirms());
        $this->assertSame(500, Broker::countWithAmqplib($this->queue));
    }

    public function testPublishIsPipelinedAndPendingConfirmsCountsDown(): void
    {
        $producer = $this->conn->producer();
        for ($i = 0; $i < 2000; $i++) {
            $producer->publish('x', $this->queue);
        }
        // publish() does not wait for the broker, so most confirms are still on their way.
        $this->assertGreaterThan(0, $producer->pendingConfirms());
        $producer->waitForConfirms();
        $this->assertSame(0, $producer->pendingConfirms());
    }

    public function testBodyIsBinarySafe(): void
    {
        $body = "\x00\xff\xfe binary \x00 not utf-8 \xc3\x28" . random_bytes(64);
        $producer = $this->conn->producer();
        $producer->publish($body, $this->queue);
        $producer->waitForConfirms();
        $this->assertSame($body, $this->getWithAmqplib()->getBody());
    }

    public function testLargeBodySpanningManyFramesArrivesIntact(): void
    {
        $body = random_bytes(3 * 1024 * 1024);
        $producer = $this->conn->producer();
        $producer->publish($body, $this->queue);
        $producer->waitForConfirms();
        $this->assertSame(md5($body), md5($this->getWithAmqplib()->getBody()));
    }

    public function testEveryPropertyIsSentAsGiven(): void
    {
        $producer = $this->conn->producer();
        $producer->publish('{}', $this->queue, '', [
            'content_type' => 'application/json',
            'content_encoding' => 'utf-8',
            'delivery_mode' => 1,
            'priority' => 7,
            'correlation_id' => 'corr-1',
            'reply_to' => 'replies',
            'expiration' => 60000,
            'message_id' => 'msg-1',
            'timestamp' => 1700000000,
            'type' => 'order.created',
            'user_id' => 'guest',
            'app_id' => 'billing',
        ]);
        $producer->waitForConfirms();
        $props = $this->getWithAmqplib()->get_properties();
        $this->assertSame('application/json', $props['content_type']);
        $this->assertSame('utf-8', $props['content_encoding']);
        $this->assertSame(1, $props['delivery_mode']);
        $this->assertSame(7, $props['priority']);
        $this->assertSame('corr-1', $props['correlation_id']);
        $this->assertSame('replies', $props['reply_to']);
        $this->assertSame('60000', $props['expiration']);
        $this->assertSame('msg-1', $props['message_id']);
        $this->assertSame(1700000000, $props['timestamp']);
        $this->assertSame('order.created', $props['type']);
        $this->assertSame('guest', $props['user_id']);
        $this->assertSame('billing', $props['app_id']);
    }

    public function testDeliveryModeDefaultsToPersistent(): void
    {
        $producer = $this->conn->producer();
        $producer->publish('p', $this->queue);
        $producer->waitForConfirms();
        $this->assertSame(2, $this->getWithAmqplib()->get('delivery_mode'));
    }

    public function testNestedHeadersKeepTheirTypes(): void
    {
        $headers = [
            'string' => 'text',
            'binary' => "\x00\xff",
            'int' => 42,
            'big' => PHP_INT_MAX,
            'negative' => -9_000_000_000,
            'float' => 3.25,
            'true' => true,
            'false' => false,
            'null' => null,
            'list' => [1, 'two', 3.5, [false]],
            'table' => ['a' => 1, 'nested' => ['deep' => 'yes']],
        ];
        $producer = $this->conn->producer();
        $producer->publish('h', $this->queue, '', ['headers' => $headers]);
        $producer->waitForConfirms();
        $got = $this->getWithAmqplib()->get('application_headers')->getNativeData();
        // AMQP tables are unordered; lapin keeps them sorted by key.
        ksort($headers);
        $this->assertSame($headers, $got);
    }

    public function testMissingExchangeRaisesChannelException404AndTheProducerGoesOn(): void
    {
        $producer = $this->conn->producer();
        $producer->publish('lost', 'k', Broker::unique('missing-exchange'));
        try {
            $producer->waitForConfirms(5);
            $this->fail('expected ChannelException');
        } catch (ChannelException $e) {
            $this->assertSame(404, $e->getCode());
            $this->assertStringContainsString('missing-exchange', $e->getMessage());
        }
        $producer->publish('kept', $this->queue);
        $producer->waitForConfirms(5);
        $this->assertSame('kept', $this->getWithAmqplib()->getBody());
    }

    public function testChannelErrorIsRaisedByTheNextPublish(): void
    {
        $producer = $this->conn->producer();
        $producer->publish('lost', 'k', Broker::unique('missing-exchange'));
        $raised = null;
        $deadline = microtime(true) + 5;
        while ($raised === null && microtime(true) < $deadline) {
            try {
                usleep(20_000);
                $producer->publish('probe', $this->queue);
            } catch (ChannelException $e) {
                $raised = $e;
            }
        }
        $this->assertNotNull($raised, 'no publish raised the 404');
        $this->assertSame(404, $raised->getCode());
        $producer->waitForConfirms(5);
        $this->assertTrue($this->conn->isConnected());
    }

    public function testUnroutableMandatoryMessageIsReportedWithItsDetails(): void
    {
        $producer = $this->conn->producer(['mandatory' => true]);
        $producer->publish('nowhere', 'no-such-binding', 'amq.direct', ['message_id' => 'm-42']);
        $producer->publish('somewhere', $this->queue);
        try {
            $producer->waitForConfirms(5);
            $this->fail('expected PublishException');
        } catch (PublishException $e) {
            $this->assertSame([[
                'exchange' => 'amq.direct',
                'routing_key' => 'no-such-binding',
                'message_id' => 'm-42',
                'reply_code' => 312,
                'reason' => 'returned by the broker: 312 NO_ROUTE',
            ]], $e->getFailures());
        }
        $this->assertSame(1, Broker::countWithAmqplib($this->queue));
        $producer->waitForConfirms(5);
    }

    public function testUnroutableWithoutMandatoryIsSilentlyDroppedByTheBrokerAsAmqpSays(): void
    {
        $producer = $this->conn->producer();
        $producer->publish('nowhere', 'no-such-binding', 'amq.direct');
        $producer->waitForConfirms(5);
        $this->assertSame(0, $producer->pendingConfirms());
    }

    public function testWithoutConfirmsPublishStillDelivers(): void
    {
        $producer = $this->conn->producer(['confirms' => false]);
        for ($i = 0; $i < 100; $i++) {
            $producer->publish("m$i", $this->queue);
        }
        $producer->waitForConfirms(5);
        $this->assertSame(0, $producer->pendingConfirms());
        $deadline = microtime(true) + 5;
        while (Broker::countWithAmqplib($this->queue) < 100 && microtime(true) < $deadline) {
            usleep(50_000);
        }
        $this->assertSame(100, Broker::countWithAmqplib($this->queue));
    }

    /** A queue that nacks what would take it over $max messages (x-overflow reject-publish). */
    private function boundedQueue(int $max): string
    {
        return $this->conn->declareQueue(Broker::unique('bounded'), ['auto_delete' => false, 'arguments' => [
            'x-max-length' => $max,
            'x-overflow' => 'reject-publish',
        ]]);
    }

    public function testNackedMessagesAreRepublishedWithBackoffUntilTheBrokerTakesThem(): void
    {
        $queue = $this->boundedQueue(5);
        try {
            $producer = $this->conn->producer();
            for ($i = 0; $i < 8; $i++) {
                $producer->publish("m$i", $queue, '', ['message_id' => "m$i"]);
            }
            // m5 to m7 are nacked: the queue is full. Make room before their republish.
            usleep(100_000);
            $this->assertSame(3, $producer->pendingConfirms(), 'the nacked ones wait for their republish');
            $reader = new Connection(Broker::uri());
            for ($i = 0; $i < 5; $i++) {
                $message = $reader->get($queue);
                $this->assertSame("m$i", $message?->getBody());
                $message->ack();
            }
            $reader->close();
            $producer->waitForConfirms(20);
            $this->assertSame(0, $producer->pendingConfirms());
            $this->assertSame(3, Broker::countWithAmqplib($queue), 'the nacked ones landed on a retry');
        } finally {
            $this->conn->deleteQueue($queue);
        }
    }

    public function testANackedMessageIsReportedOnceItsRetriesAreSpent(): void
    {
        $queue = $this->boundedQueue(1);
        try {
            $producer = $this->conn->producer(['nack_retries' => 2]);
            $producer->publish('kept', $queue, '', ['message_id' => 'kept']);
            $producer->publish('refused', $queue, '', ['message_id' => 'refused']);
            try {
                $producer->waitForConfirms(20);
                $this->fail('expected PublishException');
            } catch (PublishException $e) {
                $this->assertCount(1, $e->getFailures());
                $this->assertSame('refused', $e->getFailures()[0]['message_id']);
                $this->assertSame(0, $e->getFailures()[0]['reply_code']);
                $this->assertStringContainsString('nacked by the broker 3 times (republished 2 times', $e->getFailures()[0]['reason']);
            }

            $once = $this->conn->producer(['nack_retries' => 0]);
            $once->publish('refused', $queue, '', ['message_id' => 'refused']);
            try {
                $once->waitForConfirms(5);
                $this->fail('expected PublishException');
            } catch (PublishException $e) {
                $this->assertSame('nacked by the broker', $e->getFailures()[0]['reason']);
            }
            $this->assertSame(1, Broker::countWithAmqplib($queue));
        } finally {
            $this->conn->deleteQueue($queue);
        }
    }

    public function testCloseReportsFailuresNotYetCollected(): void
    {
        $producer = $this->conn->producer(['mandatory' => true]);
        $producer->publish('nowhere', 'no-such-binding', 'amq.direct');
        try {
            $this->conn->close();
            $this->fail('expected PublishException');
        } catch (PublishException $e) {
            $this->assertCount(1, $e->getFailures());
            $this->assertSame(312, $e->getFailures()[0]['reply_code']);
        }
        $this->assertFalse($this->conn->isConnected());
    }

    public function testProducerDestroyedWithFailuresPendingWarns(): void
    {
        $producer = $this->conn->producer(['mandatory' => true]);
        $producer->publish('nowhere', 'no-such-binding', 'amq.direct', ['message_id' => 'dropped-1']);
        $warnings = [];
        set_error_handler(function (int $no, string $msg) use (&$warnings): bool {
            $warnings[] = [$no, $msg];
            return true;
        });
        try {
            unset($producer);
        } finally {
            restore_error_handler();
        }
        $this->assertCount(1, $warnings);
        $this->assertSame(E_WARNING, $warnings[0][0]);
        $this->assertStringContainsString('1 messages failed', $warnings[0][1]);
        $this->assertStringContainsString('312 NO_ROUTE', $warnings[0][1]);
    }

    public function testProducerOutlivesItsConnectionObject(): void
    {
        $conn = new Connection(Broker::uri());
        $producer = $conn->producer();
        unset($conn);
        $producer->publish('still here', $this->queue);
        $producer->waitForConfirms(5);
        $this->assertSame('still here', $this->getWithAmqplib()->getBody());
    }

    public function testUnknownPropertyRaisesInvalidArgumentException(): void
    {
        $producer = $this->conn->producer();
        $this->expectException(InvalidArgumentException::class);
        $this->expectExceptionMessage("unknown option 'contentType'");
        $producer->publish('b', $this->queue, '', ['contentType' => 'text/plain']);
    }

    public function testHeaderValueAmqpCannotCarryIsNamed(): void
    {
        $producer = $this->conn->producer();
        try {
            $producer->publish('b', $this->queue, '', ['headers' => ['ok' => 1, 'file' => fopen('php://memory', 'r')]]);
            $this->fail('expected InvalidArgumentException');
        } catch (InvalidArgumentException $e) {
            $this->assertStringContainsString('headers[file]', $e->getMessage());
            $this->assertStringContainsString('resource', $e->getMessage());
        }
        $producer->publish('b', $this->queue);
        $producer->waitForConfirms();
        $this->assertSame(1, Broker::countWithAmqplib($this->queue));
    }

    public function testUnknownProducerOptionRaisesInvalidArgumentException(): void
    {
        $this->expectException(InvalidArgumentException::class);
        $this->expectExceptionMessage("unknown option 'confirm'");
        $this->conn->producer(['confirm' => true]);
    }

    /** @return iterable<string, array{callable(Producer): mixed}> */
    public static function wrongTypes(): iterable
    {
        yield 'body as array' => [fn (Producer $p) => $p->publish([])];
        yield 'routing key as array' => [fn (Producer $p) => $p->publish('b', [])];
        yield 'properties as string' => [fn (Producer $p) => $p->publish('b', 'k', '', 'x')];
        yield 'priority as string' => [fn (Producer $p) => $p->publish('b', 'k', '', ['priority' => 'high'])];
        yield 'timeout as string' => [fn (Producer $p) => $p->waitForConfirms('soon')];
    }

    /** @dataProvider wrongTypes */
    #[DataProvider('wrongTypes')]
    public function testWrongPhpTypesRaiseTypeError(callable $call): void
    {
        $this->expectException(TypeError::class);
        $call($this->conn->producer());
    }

    public function testHeadersLargerThanAFrameAreRefusedLocallyAndTheConnectionLives(): void
    {
        $producer = $this->conn->producer();
        try {
            // frame_max is 128 KiB on RabbitMQ 3.10: the broker would close the connection.
            $producer->publish('b', $this->queue, '', ['headers' => ['big' => str_repeat('h', 200_000)]]);
            $this->fail('expected InvalidArgumentException');
        } catch (InvalidArgumentException $e) {
            $this->assertStringContainsString('frame_max', $e->getMessage());
        }
        // Just under the limit is sent as it is.
        $producer->publish('b', $this->queue, '', ['headers' => ['big' => str_repeat('h', 120_000)]]);
        $producer->waitForConfirms(5);
        $this->assertTrue($this->conn->isConnected());
        $this->assertSame(120_000, strlen($this->getWithAmqplib()->get('application_headers')->getNativeData()['big']));
    }

    public function testBodyOverTheBrokersMaxMessageSizeRaisesChannelException406(): void
    {
        $producer = $this->conn->producer();
        $producer->publish(str_repeat('b', 128 * 1024 * 1024 + 1), $this->queue);
        try {
            $producer->waitForConfirms(30);
            $this->fail('expected ChannelException');
        } catch (ChannelException $e) {
            $this->assertSame(406, $e->getCode());
            $this->assertStringContainsString('max size', $e->getMessage());
        }
        $this->assertTrue($this->conn->isConnected());
        $producer->publish('small', $this->queue);
        $producer->waitForConfirms(5);
        $this->assertSame('small', $this->getWithAmqplib()->getBody());
    }

    public function testPhpAmqpReadsEveryPropertyAndHeaderType(): void
    {
        $headers = ['s' => 'text', 'i' => -42, 'big' => PHP_INT_MAX, 'f' => 2.5, 'b' => true, 'n' => null,
            // php-amqp decodes lists of strings only: it returns [] for a list of ints even when
            // php-amqplib published it, so lists of other types are checked with php-amqplib.
            'words' => ['x', 'y'], 'table' => ['k' => 'v']];
        $producer = $this->conn->producer();
        $producer->publish("body\x00", $this->queue, '', [
            'content_type' => 'text/plain', 'content_encoding' => 'gzip', 'headers' => $headers,
            'delivery_mode' => 2, 'priority' => 3, 'correlation_id' => 'c1', 'reply_to' => 'r1',
            'expiration' => '5000', 'message_id' => 'id1', 'timestamp' => 1234567890, 'type' => 't1',
            'user_id' => 'guest', 'app_id' => 'a1',
        ]);
        $producer->waitForConfirms();
        $conn = new AMQPConnection(Broker::phpAmqpCredentials());
        $conn->connect();
        $q = new AMQPQueue(new AMQPChannel($conn));
        $q->setName($this->queue);
        $env = $q->get(AMQP_AUTOACK);
        $conn->disconnect();
        $this->assertInstanceOf(AMQPEnvelope::class, $env);
        $this->assertSame("body\x00", $env->getBody());
        $this->assertSame('text/plain', $env->getContentType());
        $this->assertSame('gzip', $env->getContentEncoding());
        $this->assertSame(2, $env->getDeliveryMode());
        $this->assertSame(3, $env->getPriority());
        $this->assertSame('c1', $env->getCorrelationId());
        $this->assertSame('r1', $env->getReplyTo());
        $this->assertSame('5000', $env->getExpiration());
        $this->assertSame('id1', $env->getMessageId());
        $this->assertSame(1234567890, $env->getTimestamp());
        $this->assertSame('t1', $env->getType());
        $this->assertSame('guest', $env->getUserId());
        $this->assertSame('a1', $env->getAppId());
        $got = $env->getHeaders();
        ksort($headers);
        ksort($got);
        $this->assertSame($headers, $got);
    }

    public function testPublishWaitsWhileTheBrokerBlocksTheConnectionThenTimesOutClearly(): void
    {
        $producer = $this->conn->producer(['blocked_timeout' => 0.5]);
        $producer->publish('before the alarm', $this->queue);
        $producer->waitForConfirms(5);
        // A memory alarm: the broker blocks every connection that publishes.
        Broker::ctl('set_vm_memory_high_watermark', '0.000001');
        try {
            $thrown = null;
            $published = 0;
            for ($i = 0; $i < 100 && $thrown === null; $i++) {
                try {
                    $producer->publish("during the alarm $i", $this->queue);
                    $published++;
                    usleep(50_000);
                } catch (TimeoutException $e) {
                    $thrown = $e;
                }
            }
            $this->assertNotNull($thrown, 'publish() went on into a blocked connection');
            $this->assertStringContainsString('the broker has blocked this connection', $thrown->getMessage());
            $this->assertStringContainsString('0.5 s (blocked_timeout)', $thrown->getMessage());
        } finally {
            Broker::ctl('set_vm_memory_high_watermark', '0.4');
        }
        // Unblocked: work resumes, and what was published during the alarm arrives.
        $producer->publish('after the alarm', $this->queue);
        $producer->waitForConfirms(10);
        $this->assertSame(2 + $published, Broker::countWithAmqplib($this->queue));
    }
}
