<?php

declare(strict_types=1);

use AmqpRs\ChannelException;
use AmqpRs\Connection;
use AmqpRs\ConnectionException;
use AmqpRs\Tests\Support\Broker;
use PHPUnit\Framework\Attributes\DataProvider;
use PHPUnit\Framework\TestCase;

/** Bad input gets a clear exception and the PHP process lives on. */
final class BadInputTest extends TestCase
{
    public function testExceptionHierarchyFollowsTheContract(): void
    {
        $this->assertTrue(is_subclass_of(AmqpRs\Exception::class, RuntimeException::class));
        foreach (['Connection', 'Channel', 'Timeout', 'Publish'] as $kind) {
            $class = "AmqpRs\\{$kind}Exception";
            $this->assertSame(AmqpRs\Exception::class, get_parent_class($class), $class);
        }
    }

    public function testMalformedUriIsRejectedWithoutItsPassword(): void
    {
        try {
            new Connection('amqp://guest:s3cret@127.0.0.1:99999999/');
            $this->fail('expected InvalidArgumentException');
        } catch (InvalidArgumentException $e) {
            $this->assertStringContainsString('invalid AMQP URI', $e->getMessage());
            $this->assertStringNotContainsString('s3cret', $e->getMessage());
        }
    }

    public function testGarbageUriIsRejected(): void
    {
        $this->expectException(InvalidArgumentException::class);
        $this->expectExceptionMessage("invalid AMQP URI 'not a uri'");
        new Connection('not a uri');
    }

    public function testWrongSchemeIsRejected(): void
    {
        $this->expectException(InvalidArgumentException::class);
        $this->expectExceptionMessage("unsupported scheme 'http', expected amqp:// or amqps://");
        new Connection('http://guest:guest@127.0.0.1:5672/');
    }

    public function testRefusedPortIsAConnectionException(): void
    {
        $this->expectException(ConnectionException::class);
        $this->expectExceptionMessageMatches('/cannot connect to amqp:\/\/guest@127\.0\.0\.1:1\/.*refused/i');
        new Connection('amqp://guest:guest@127.0.0.1:1/%2f');
    }

    public function testSilentListenerFailsWithinConnectTimeout(): void
    {
        // Accepts TCP (the kernel completes the handshake) but never speaks AMQP.
        $server = stream_socket_server('tcp://127.0.0.1:0', $errno, $errstr);
        $this->assertNotFalse($server, $errstr);
        $port = (int) substr(strrchr(stream_socket_get_name($server, false), ':'), 1);
        $started = microtime(true);
        try {
            new Connection("amqp://guest:guest@127.0.0.1:$port/%2f", ['connect_timeout' => 0.5]);
            $this->fail('expected ConnectionException');
        } catch (ConnectionException $e) {
            $this->assertStringContainsString('connect_timeout', $e->getMessage());
        }
        $elapsed = microtime(true) - $started;
        // Bounded by connect_timeout, not by the broker-side or TCP timeouts (minutes).
        $this->assertLessThan(2.0, $elapsed);
        fclose($server);
    }

    public function testWrongPasswordIsRefusedAndNeverShown(): void
    {
        try {
            new Connection(Broker::uriWith(password: 'Wr0ngPassw0rd'));
            $this->fail('expected ConnectionException');
        } catch (ConnectionException $e) {
            $this->assertStringContainsString('access refused', $e->getMessage());
            $this->assertStringContainsString('amqp://' . Broker::user() . '@' . Broker::endpoint(), $e->getMessage());
            $this->assertStringNotContainsString('Wr0ngPassw0rd', $e->getMessage());
            $this->assertStringNotContainsString('Wr0ngPassw0rd', $e->getTraceAsString());
        }
    }

    public function testMissingVhostIsAConnectionException(): void
    {
        $this->expectException(ConnectionException::class);
        $this->expectExceptionMessageMatches('/vhost.*no-such-vhost|no-such-vhost.*vhost/i');
        new Connection(Broker::uriWith(vhost: 'no-such-vhost'));
    }

    public function testRedeclareWithOtherArgumentsRaises406AndConnectionStaysUsable(): void
    {
        $conn = new Connection(Broker::uri());
        $q = Broker::unique('redeclare');
        $conn->declareQueue($q, ['arguments' => ['x-max-length' => 5]]);
        try {
            $conn->declareQueue($q, ['arguments' => ['x-max-length' => 6]]);
            $this->fail('expected ChannelException');
        } catch (ChannelException $e) {
            $this->assertSame(406, $e->getCode());
            $this->assertStringContainsString($q, $e->getMessage());
            $this->assertStringContainsString('PRECONDITION_FAILED', $e->getMessage());
        }
        $this->assertTrue($conn->isConnected());
        $this->assertSame(['messages' => 0, 'consumers' => 0], $conn->queueStatus($q));
        $this->assertSame(0, $conn->deleteQueue($q));
    }

    public function testPassiveDeclareOfAMissingQueueRaises404(): void
    {
        $conn = new Connection(Broker::uri());
        $q = Broker::unique('missing');
        try {
            $conn->declareQueue($q, ['passive' => true]);
            $this->fail('expected ChannelException');
        } catch (ChannelException $e) {
            $this->assertSame(404, $e->getCode());
            $this->assertStringContainsString("no queue '$q'", $e->getMessage());
        }
        $this->assertNotSame('', $conn->declareQueue('', ['exclusive' => true]));
    }

    /** @return iterable<string, array{callable(Connection): mixed, string}> */
    public static function unknownOptionKeys(): iterable
    {
        yield 'declareQueue' => [fn (Connection $c) => $c->declareQueue('q', ['durabel' => true]), "unknown option 'durabel'"];
        yield 'declareExchange' => [fn (Connection $c) => $c->declareExchange('x', 'direct', ['nope' => 1]), "unknown option 'nope'"];
        yield 'deleteQueue' => [fn (Connection $c) => $c->deleteQueue('q', ['force' => true]), "unknown option 'force'"];
        yield 'deleteExchange' => [fn (Connection $c) => $c->deleteExchange('x', ['if_empty' => true]), "unknown option 'if_empty'"];
    }

    /** @dataProvider unknownOptionKeys */
    #[DataProvider('unknownOptionKeys')]
    public function testUnknownOptionKeyRaisesInvalidArgumentException(callable $call, string $message): void
    {
        $conn = new Connection(Broker::uri());
        try {
            $call($conn);
            $this->fail('expected InvalidArgumentException');
        } catch (InvalidArgumentException $e) {
            $this->assertStringContainsString($message, $e->getMessage());
        }
        $this->assertTrue($conn->isConnected());
    }

    public function testUnknownConnectionOptionRaisesInvalidArgumentException(): void
    {
        $this->expectException(InvalidArgumentException::class);
        $this->expectExceptionMessage("unknown option 'hearbeat'");
        new Connection(Broker::uri(), ['hearbeat' => 10]);
    }

    public function testUnknownTlsOptionRaisesInvalidArgumentException(): void
    {
        $this->expectException(InvalidArgumentException::class);
        $this->expectExceptionMessage("unknown option 'ca'");
        new Connection(Broker::uri(), ['tls' => ['ca' => '/tmp/ca.pem']]);
    }

    public function testOutOfRangeHeartbeatRaisesInvalidArgumentException(): void
    {
        $this->expectException(InvalidArgumentException::class);
        $this->expectExceptionMessage("option 'heartbeat' must be between 0 and 65535");
        new Connection(Broker::uri(), ['heartbeat' => -1]);
    }

    /** @return iterable<string, array{callable(): mixed}> */
    public static function wrongTypes(): iterable
    {
        yield 'uri as int' => [fn () => new Connection(42)];
        yield 'uri list with an int' => [fn () => new Connection([Broker::uri(), 7])];
        yield 'options as string' => [fn () => new Connection(Broker::uri(), 'heartbeat=5')];
        yield 'heartbeat as string' => [fn () => new Connection(Broker::uri(), ['heartbeat' => 'five'])];
        yield 'queue name as array' => [fn () => (new Connection(Broker::uri()))->declareQueue([])];
        yield 'durable as string' => [fn () => (new Connection(Broker::uri()))->declareQueue('q', ['durable' => 'yes'])];
        yield 'arguments as string' => [fn () => (new Connection(Broker::uri()))->declareQueue('q', ['arguments' => 'x'])];
        yield 'routing key as array' => [fn () => (new Connection(Broker::uri()))->bindQueue('q', 'x', [])];
    }

    /** @dataProvider wrongTypes */
    #[DataProvider('wrongTypes')]
    public function testWrongPhpTypesRaiseTypeError(callable $call): void
    {
        $this->expectException(TypeError::class);
        $call();
    }

    public function testArgumentValuesAmqpCannotCarryRaiseInvalidArgumentException(): void
    {
        $conn = new Connection(Broker::uri());
        try {
            $conn->declareQueue(Broker::unique('obj'), ['arguments' => ['x-thing' => ['deep' => new stdClass()]]]);
            $this->fail('expected InvalidArgumentException');
        } catch (InvalidArgumentException $e) {
            $this->assertStringContainsString("[x-thing][deep]", $e->getMessage());
            $this->assertStringContainsString('object', $e->getMessage());
        }
        $this->assertTrue($conn->isConnected());
    }

    public function testNameLongerThan255BytesIsRejectedLocally(): void
    {
        $conn = new Connection(Broker::uri());
        try {
            $conn->declareQueue(str_repeat('q', 256));
            $this->fail('expected InvalidArgumentException');
        } catch (InvalidArgumentException $e) {
            $this->assertStringContainsString('at most 255', $e->getMessage());
        }
        $this->assertTrue($conn->isConnected());
    }

    public function testEmptyUriListIsRejected(): void
    {
        $this->expectException(InvalidArgumentException::class);
        $this->expectExceptionMessage('Argument #1 ($uri): the list is empty');
        new Connection([]);
    }

    public function testUnreadableTlsCaFileIsNamedInTheError(): void
    {
        $this->expectException(InvalidArgumentException::class);
        $this->expectExceptionMessage("cannot read TLS cafile '/nonexistent/ca.pem'");
        new Connection('amqps://guest:guest@127.0.0.1:5671/%2f', ['tls' => ['cafile' => '/nonexistent/ca.pem']]);
    }

    public function testClientCertificateWithoutItsKeyIsRejected(): void
    {
        $this->expectException(InvalidArgumentException::class);
        $this->expectExceptionMessage("'certfile' and 'keyfile' go together");
        new Connection('amqps://guest:guest@127.0.0.1:5671/%2f', ['tls' => ['certfile' => __FILE__]]);
    }

    public function testTlsAgainstAPlainListenerFailsWithAConnectionException(): void
    {
        // The broker's port speaks plain AMQP: the TLS handshake cannot succeed.
        $this->expectException(ConnectionException::class);
        $this->expectExceptionMessage('cannot connect to amqps://' . Broker::user() . '@' . Broker::endpoint() . '/');
        new Connection('amqps://' . substr(Broker::uri(), strlen('amqp://')), ['connect_timeout' => 2]);
    }
}
