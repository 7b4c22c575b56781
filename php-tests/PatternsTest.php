<?php

declare(strict_types=1);

use AmqpRs\Connection;
use AmqpRs\Message;
use AmqpRs\PublishException;
use AmqpRs\TimeoutException;
use AmqpRs\Tests\Support\Broker;
use AmqpRs\Tests\Support\Children;
use PhpAmqpLib\Connection\AMQPStreamConnection;
use PhpAmqpLib\Message\AMQPMessage;
use PHPUnit\Framework\TestCase;

/**
 * The patterns of issue 6: Connection::rpc() against a real server process
 * (Support/rpc_server.php), Message::reply(), Message::json(), Producer::publishJson() and the
 * producer option stamp_message_id.
 */
final class PatternsTest extends TestCase
{
    private const UUID_V4 = '/^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/';

    private Connection $conn;
    private string $queue;
    /** @var resource|null */
    private $server = null;
    /** @var array<int, resource> */
    private array $pipes = [];

    protected function setUp(): void
    {
        $this->conn = new Connection(Broker::uri());
        $this->queue = $this->conn->declareQueue(Broker::unique('patterns'));
    }

    protected function tearDown(): void
    {
        // Closed first: left open, its recovery from a later test's broker restart
        // (RecoveryTest) would declare the queue again after it is deleted below.
        try {
            $this->conn->close();
        } catch (\AmqpRs\Exception) {
        }
        if (is_resource($this->server)) {
            $this->stopServer();
        }
        $conn = new Connection(Broker::uri());
        $conn->deleteQueue($this->queue);
        $conn->close();
    }

    /** Starts Support/rpc_server.php on $this->queue; returns once its consumer is registered. */
    private function startServer(float $idleTimeout = 20): void
    {
        $so = Broker::extensionPath();
        $cmd = [PHP_BINARY, '-d', "extension=$so", __DIR__ . '/Support/rpc_server.php', $this->queue, (string) $idleTimeout];
        $this->server = proc_open($cmd, [1 => ['pipe', 'w'], 2 => ['pipe', 'w']], $this->pipes);
        $read = [$this->pipes[1]];
        $w = $e = null;
        $this->assertSame(1, stream_select($read, $w, $e, 10), 'the RPC server did not start');
        $this->assertSame("ready\n", fgets($this->pipes[1]));
    }

    /** SIGTERM to the server (it returns after the request in hand); returns what it printed. */
    private function stopServer(): string
    {
        $out = Children::end($this->server, $this->pipes, SIGTERM, 5.0);
        $this->server = null;
        return $out;
    }

    /** The one message in $this->queue (fails when it is empty). */
    private function take(): Message
    {
        $m = $this->conn->get($this->queue, true);
        $this->assertNotNull($m, 'queue was empty');
        return $m;
    }

    // --- rpc() and reply() ---

    public function testRpcReturnsTheServersReplyWithBodyHeadersAndContentType(): void
    {
        $this->startServer();
        $reply = $this->conn->rpc('ping', $this->queue, '', ['headers' => ['tenant' => 42]], 5.0);
        $this->assertSame('re: ping', $reply->getBody());
        $this->assertSame('text/plain', $reply->getContentType());
        $serverPid = proc_get_status($this->server)['pid'];
        $this->assertSame($serverPid, $reply->getHeader('served_by'));
        // The request carried the caller's headers to the server.
        $this->assertSame(['tenant' => 42], $reply->getHeader('request_headers'));
        // The reply carries the request's correlation_id (copied by reply()).
        $this->assertNotNull($reply->getCorrelationId());
        $this->assertSame($reply->getCorrelationId(), $reply->getHeader('request_correlation_id'));
    }

    public function testRpcKeepsTheCallersCorrelationId(): void
    {
        $this->startServer();
        $reply = $this->conn->rpc('order 7', $this->queue, '', ['correlation_id' => 'order-7-attempt-1'], 5.0);
        $this->assertSame('re: order 7', $reply->getBody());
        $this->assertSame('order-7-attempt-1', $reply->getHeader('request_correlation_id'));
        $this->assertSame('order-7-attempt-1', $reply->getCorrelationId());
    }

    public function testEachOfManySequentialCallsGetsItsOwnReply(): void
    {
        $this->startServer();
        $ids = [];
        for ($i = 0; $i < 200; $i++) {
            $reply = $this->conn->rpc("call $i", $this->queue, '', [], 5.0);
            $this->assertSame("re: call $i", $reply->getBody());
            $ids[] = $reply->getCorrelationId();
        }
        $this->assertCount(200, array_unique($ids), 'correlation ids must differ between calls');
        $this->assertStringContainsString('served ' . $ids[199], $this->stopServer());
    }

    public function testRpcWithoutAConsumerTimesOutNamingTheCorrelationId(): void
    {
        $started = microtime(true);
        try {
            $this->conn->rpc('anyone?', $this->queue, '', [], 0.5);
            $this->fail('expected TimeoutException');
        } catch (TimeoutException $e) {
            $elapsed = microtime(true) - $started;
        }
        $this->assertGreaterThanOrEqual(0.45, $elapsed);
        $this->assertLessThan(2.0, $elapsed);
        // The request waits in the queue, with the reply_to and correlation_id rpc() set.
        $request = $this->take();
        $this->assertSame('anyone?', $request->getBody());
        $this->assertStringStartsWith('amq.rabbitmq.reply-to.', (string) $request->getReplyTo());
        $corr = (string) $request->getCorrelationId();
        $this->assertNotSame('', $corr);
        $this->assertStringContainsString("'$corr'", $e->getMessage());
        $this->assertStringContainsString($this->queue, $e->getMessage());
    }

    public function testRpcRequestsAreTransientUnlessAskedAndRefuseAReplyToOrAnEmptyId(): void
    {
        try {
            $this->conn->rpc('x', $this->queue, '', [], 0.2);
        } catch (TimeoutException) {
        }
        $this->assertSame(1, $this->take()->getDeliveryMode(), 'transient by default');
        try {
            $this->conn->rpc('x', $this->queue, '', ['delivery_mode' => 2], 0.2);
        } catch (TimeoutException) {
        }
        $this->assertSame(2, $this->take()->getDeliveryMode(), 'as asked');
        foreach ([['reply_to' => 'mine'], ['correlation_id' => '']] as $properties) {
            try {
                $this->conn->rpc('x', $this->queue, '', $properties, 0.2);
                $this->fail('expected InvalidArgumentException for ' . json_encode($properties));
            } catch (InvalidArgumentException $e) {
                $this->assertStringContainsString(array_key_first($properties), $e->getMessage());
            }
        }
        $this->assertSame(0, $this->conn->queueStatus($this->queue)['messages'], 'nothing sent');
    }

    public function testRpcToARoutingKeyNoQueueIsBoundForRaisesPublishException312AtOnce(): void
    {
        $nowhere = Broker::unique('no-such-queue');
        $started = microtime(true);
        try {
            $this->conn->rpc('lost', $nowhere, '', [], 10.0);
            $this->fail('expected PublishException');
        } catch (PublishException $e) {
            $elapsed = microtime(true) - $started;
        }
        // Reported when the broker returns it, not after the 10 s timeout.
        $this->assertLessThan(2.0, $elapsed);
        $failures = $e->getFailures();
        $this->assertCount(1, $failures);
        $this->assertSame(312, $failures[0]['reply_code']);
        $this->assertSame($nowhere, $failures[0]['routing_key']);
        $this->assertStringContainsString($nowhere, $e->getMessage());
        // The connection goes on calling.
        $this->startServer();
        $this->assertSame('re: after', $this->conn->rpc('after', $this->queue, '', [], 5.0)->getBody());
    }

    public function testLateReplyToATimedOutCallIsNotTakenForTheNextCallsReply(): void
    {
        $this->startServer();
        try {
            // The server takes 1 s over this one, so its reply comes after the call gave up.
            $this->conn->rpc('slow', $this->queue, '', ['headers' => ['delay_ms' => 1000]], 0.3);
            $this->fail('expected TimeoutException');
        } catch (TimeoutException) {
        }
        // Served one at a time: the late reply to 'slow' arrives while this call waits.
        $started = microtime(true);
        $reply = $this->conn->rpc('fast', $this->queue, '', [], 5.0);
        $this->assertSame('re: fast', $reply->getBody());
        $this->assertGreaterThan(0.4, microtime(true) - $started, 'the server was still busy with slow');
        // And nothing of it is left over for the call after.
        $this->assertSame('re: next', $this->conn->rpc('next', $this->queue, '', [], 5.0)->getBody());
    }

    public function testReplyToAMessageWithoutReplyToRaises(): void
    {
        $producer = $this->conn->producer();
        $producer->publish('no return address', $this->queue, '', ['correlation_id' => 'c-1']);
        $producer->waitForConfirms();
        $m = $this->take();
        $this->expectException(AmqpRs\Exception::class);
        $this->expectExceptionMessage('no reply_to');
        $m->reply('nowhere to go');
    }

    public function testReplyGoesToANamedReplyQueueWithTheCorrelationIdCopied(): void
    {
        // Not exclusive: php-amqplib, another connection, reads it.
        $results = $this->conn->declareQueue(Broker::unique('results'), ['auto_delete' => true]);
        $producer = $this->conn->producer();
        $producer->publish('task', $this->queue, '', ['reply_to' => $results, 'correlation_id' => 'task-9']);
        $producer->waitForConfirms();
        $this->take()->reply('{"status":"done"}', ['content_type' => 'application/json', 'headers' => ['node' => 'n1']]);
        // reply() waited for the broker, so the reply is in the queue now; read it with php-amqplib.
        $amqplib = Broker::amqplib();
        $got = $amqplib->channel()->basic_get($results, true);
        $amqplib->close();
        $this->conn->deleteQueue($results);
        $this->assertInstanceOf(AMQPMessage::class, $got);
        $this->assertSame('{"status":"done"}', $got->getBody());
        $this->assertSame('task-9', $got->get('correlation_id'));
        $this->assertSame('application/json', $got->get('content_type'));
        $this->assertSame(['node' => 'n1'], $got->get('application_headers')->getNativeData());
    }

    // --- json() and publishJson() ---

    public function testPublishJsonThenJsonRoundTripsNestedArraysFloatsAndUnicode(): void
    {
        $value = [
            'task_id' => 17,
            'ratio' => 0.1,
            'whole' => 3.0,
            'negative' => -2.5e-8,
            'text' => 'Zürich → 東京 😀',
            'path' => '/var/spool/x',
            'nested' => ['list' => [1, [2, [3.5, null]], true], 'empty' => []],
            'flag' => false,
        ];
        $producer = $this->conn->producer();
        $producer->publishJson($value, $this->queue);
        $producer->waitForConfirms();
        $m = $this->take();
        $this->assertSame($value, $m->json());
        // Unicode and slashes unescaped, the float 3.0 kept as a float.
        $this->assertStringContainsString('"Zürich → 東京 😀"', $m->getBody());
        $this->assertStringContainsString('"/var/spool/x"', $m->getBody());
        $this->assertStringContainsString('"whole":3.0', $m->getBody());
    }

    public function testJsonDecodesABodyPublishedByAnotherClient(): void
    {
        $amqplib = Broker::amqplib();
        $amqplib->channel()->basic_publish(new AMQPMessage('{"a":{"b":[1,2.5,"\u00e9"]},"c":null}'), '', $this->queue);
        $amqplib->close();
        $deadline = microtime(true) + 5;
        while (($m = $this->conn->get($this->queue, true)) === null && microtime(true) < $deadline) {
            usleep(20_000);
        }
        $this->assertNotNull($m);
        $this->assertSame(['a' => ['b' => [1, 2.5, 'é']], 'c' => null], $m->json());
    }

    public function testJsonOfTheLiteralNullIsNullNotAnError(): void
    {
        $producer = $this->conn->producer();
        $producer->publish('null', $this->queue);
        $producer->publish('"just a string"', $this->queue);
        $producer->waitForConfirms();
        $this->assertNull($this->take()->json());
        $this->assertSame('just a string', $this->take()->json());
    }

    public function testJsonOfABodyThatIsNotJsonRaises(): void
    {
        $producer = $this->conn->producer();
        $producer->publish('{"unterminated": ', $this->queue);
        $producer->waitForConfirms();
        $m = $this->take();
        try {
            $m->json();
            $this->fail('expected AmqpRs\Exception');
        } catch (AmqpRs\Exception $e) {
            $this->assertStringContainsString('not valid JSON', $e->getMessage());
            $this->assertStringContainsString($this->queue, $e->getMessage());
        }
        // The body is untouched.
        $this->assertSame('{"unterminated": ', $m->getBody());
    }

    public function testPublishJsonSetsContentTypeApplicationJson(): void
    {
        $producer = $this->conn->producer();
        $producer->publishJson(['x' => 1], $this->queue, '', ['headers' => ['h' => 'v'], 'type' => 'task']);
        $producer->waitForConfirms();
        $m = $this->take();
        $this->assertSame('application/json', $m->getContentType());
        $this->assertSame('task', $m->getType());
        $this->assertSame(['h' => 'v'], $m->getHeaders());
        $this->assertSame('{"x":1}', $m->getBody());
    }

    public function testPublishJsonKeepsAGivenContentType(): void
    {
        $producer = $this->conn->producer();
        $producer->publishJson(['x' => 1], $this->queue, '', ['content_type' => 'application/vnd.tasks+json']);
        $producer->waitForConfirms();
        $this->assertSame('application/vnd.tasks+json', $this->take()->getContentType());
    }

    public function testPublishJsonOfNanRaisesAndPublishesNothing(): void
    {
        $producer = $this->conn->producer();
        try {
            $producer->publishJson(['ratio' => NAN], $this->queue);
            $this->fail('expected InvalidArgumentException');
        } catch (InvalidArgumentException $e) {
            $this->assertStringContainsString('NaN', $e->getMessage());
        }
        $producer->waitForConfirms();
        $this->assertSame(0, $producer->pendingConfirms());
        $this->assertNull($this->conn->get($this->queue, true));
    }

    public function testPublishJsonOfInvalidUtf8Raises(): void
    {
        $producer = $this->conn->producer();
        $this->expectException(InvalidArgumentException::class);
        $this->expectExceptionMessage('UTF-8');
        $producer->publishJson(['name' => "caf\xe9"], $this->queue);
    }

    // --- stamp_message_id ---

    public function testStampMessageIdGivesEachMessageADistinctUuidV4(): void
    {
        $producer = $this->conn->producer(['stamp_message_id' => true]);
        for ($i = 0; $i < 100; $i++) {
            $producer->publish("m$i", $this->queue);
        }
        $producer->publishJson(['json' => true], $this->queue);
        $producer->waitForConfirms();
        $ids = [];
        for ($i = 0; $i < 101; $i++) {
            $id = (string) $this->take()->getMessageId();
            $this->assertSame(36, strlen($id));
            $this->assertMatchesRegularExpression(self::UUID_V4, $id);
            $ids[] = $id;
        }
        $this->assertCount(101, array_unique($ids));
    }

    public function testStampMessageIdKeepsAGivenMessageId(): void
    {
        $producer = $this->conn->producer(['stamp_message_id' => true]);
        $producer->publish('mine', $this->queue, '', ['message_id' => 'order-7']);
        $producer->publish('stamped', $this->queue);
        $producer->waitForConfirms();
        $this->assertSame('order-7', $this->take()->getMessageId());
        $this->assertMatchesRegularExpression(self::UUID_V4, (string) $this->take()->getMessageId());
    }

    public function testMessageIdIsNotStampedByDefault(): void
    {
        $producer = $this->conn->producer();
        $producer->publish('plain', $this->queue);
        $producer->publishJson([1], $this->queue);
        $producer->waitForConfirms();
        $this->assertNull($this->take()->getMessageId());
        $this->assertNull($this->take()->getMessageId());
    }

    public function testAFailedPublishIsReportedWithItsStampedId(): void
    {
        $producer = $this->conn->producer(['stamp_message_id' => true, 'mandatory' => true]);
        $producer->publish('nowhere', Broker::unique('no-such-queue'));
        try {
            $producer->waitForConfirms(5);
            $this->fail('expected PublishException');
        } catch (PublishException $e) {
            // What lets the caller republish it under the same id, for consumers to deduplicate.
            $this->assertMatchesRegularExpression(self::UUID_V4, (string) $e->getFailures()[0]['message_id']);
        }
    }
}
