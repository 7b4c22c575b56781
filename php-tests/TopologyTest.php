<?php

declare(strict_types=1);

use AmqpRs\ChannelException;
use AmqpRs\Connection;
use AmqpRs\Tests\Support\Broker;
use PHPUnit\Framework\TestCase;

final class TopologyTest extends TestCase
{
    private Connection $conn;
    /** @var list<array{string,string}> */
    private array $cleanup = [];

    protected function setUp(): void
    {
        $this->conn = new Connection(Broker::uri());
    }

    protected function tearDown(): void
    {
        $conn = new Connection(Broker::uri());
        foreach ($this->cleanup as [$kind, $name]) {
            try {
                $kind === 'queue' ? $conn->deleteQueue($name) : $conn->deleteExchange($name);
            } catch (ChannelException) {
            }
        }
        $conn->close();
    }

    private function queue(array $options = []): string
    {
        $name = Broker::unique('q');
        $this->cleanup[] = ['queue', $name];
        $this->assertSame($name, $this->conn->declareQueue($name, $options));
        return $name;
    }

    private function exchange(string $type = 'direct', array $options = []): string
    {
        $name = Broker::unique('x');
        $this->cleanup[] = ['exchange', $name];
        $this->conn->declareExchange($name, $type, $options);
        return $name;
    }

    public function testAQueueDeclaredWithoutANameGetsAGeneratedOne(): void
    {
        // With recovery on (the default) the client makes the name, so that recovery can
        // declare the queue again; without, the broker does.
        $name = $this->conn->declareQueue('', ['exclusive' => true, 'durable' => false]);
        $this->assertMatchesRegularExpression('/^amq_rs\.gen-[A-Za-z0-9_-]{22}$/', $name);
        $this->assertNotSame($name, $this->conn->declareQueue('', ['exclusive' => true, 'durable' => false]));
        $plain = new Connection(Broker::uri(), ['reconnect' => false]);
        $this->assertStringStartsWith('amq.gen-', $plain->declareQueue('', ['exclusive' => true]));
        $plain->close();
    }

    public function testBoundQueueReceivesWhatTheExchangeRoutes(): void
    {
        $x = $this->exchange('topic');
        $q = $this->queue();
        $this->conn->bindQueue($q, $x, 'orders.*');
        Broker::publishWithAmqplib($x, 'orders.created', 3);
        Broker::publishWithAmqplib($x, 'users.created', 2);
        $this->assertSame(['messages' => 3, 'consumers' => 0], $this->conn->queueStatus($q));
    }

    public function testUnboundQueueNoLongerReceives(): void
    {
        $x = $this->exchange('direct');
        $q = $this->queue();
        $this->conn->bindQueue($q, $x, 'k');
        $this->conn->unbindQueue($q, $x, 'k');
        Broker::publishWithAmqplib($x, 'k', 2);
        $this->assertSame(0, $this->conn->queueStatus($q)['messages']);
    }

    public function testHeadersBindingUsesNestedArguments(): void
    {
        $x = $this->exchange('headers');
        $q = $this->queue();
        $this->conn->bindQueue($q, $x, '', ['x-match' => 'all', 'kind' => 'report']);
        $conn = Broker::amqplib();
        $ch = $conn->channel();
        $match = new PhpAmqpLib\Message\AMQPMessage('a', ['application_headers' => new PhpAmqpLib\Wire\AMQPTable(['kind' => 'report'])]);
        $miss = new PhpAmqpLib\Message\AMQPMessage('b', ['application_headers' => new PhpAmqpLib\Wire\AMQPTable(['kind' => 'other'])]);
        $ch->basic_publish($match, $x);
        $ch->basic_publish($miss, $x);
        $conn->close();
        Broker::eventually(fn () => $this->conn->queueStatus($q)['messages'] === 1, 'the matching message routed');
        $this->assertSame(1, Broker::countWithAmqplib($q), 'and only that one');
    }

    public function testPurgeReturnsHowManyMessagesWentAway(): void
    {
        $q = $this->queue();
        Broker::publishWithAmqplib('', $q, 4);
        $this->assertSame(4, $this->conn->purgeQueue($q));
        $this->assertSame(0, Broker::countWithAmqplib($q));
    }

    public function testDeleteQueueReturnsTheMessagesDeletedWithIt(): void
    {
        $q = $this->queue();
        Broker::publishWithAmqplib('', $q, 5);
        $this->assertSame(5, $this->conn->deleteQueue($q));
        $this->expectException(ChannelException::class);
        $this->expectExceptionCode(404);
        $this->conn->queueStatus($q);
    }

    public function testDeleteQueueIfEmptyRefusesANonEmptyQueue(): void
    {
        $q = $this->queue();
        Broker::publishWithAmqplib('', $q, 1);
        try {
            $this->conn->deleteQueue($q, ['if_empty' => true]);
            $this->fail('expected 406');
        } catch (ChannelException $e) {
            $this->assertSame(406, $e->getCode());
        }
        $this->assertSame(1, $this->conn->queueStatus($q)['messages']);
    }

    public function testDeleteQueueIfUnusedDeletesAnUnusedQueue(): void
    {
        $q = $this->queue();
        $this->assertSame(0, $this->conn->deleteQueue($q, ['if_unused' => true]));
    }

    public function testDeleteExchangeIfUnusedRefusesABoundExchange(): void
    {
        $x = $this->exchange('fanout');
        $q = $this->queue();
        $this->conn->bindQueue($q, $x);
        try {
            $this->conn->deleteExchange($x, ['if_unused' => true]);
            $this->fail('expected 406');
        } catch (ChannelException $e) {
            $this->assertSame(406, $e->getCode());
        }
        $this->conn->deleteExchange($x);
        $this->expectException(ChannelException::class);
        $this->expectExceptionCode(404);
        $this->conn->declareExchange($x, 'fanout', ['passive' => true]);
    }

    public function testExchangeOptionsAreSentAsGiven(): void
    {
        $x = $this->exchange('fanout', ['durable' => false, 'auto_delete' => true, 'internal' => true]);
        $rows = Broker::ctl('list_exchanges', 'name', 'type', 'durable', 'auto_delete', 'internal', '-q', '--no-table-headers');
        $this->assertMatchesRegularExpression('/^' . preg_quote($x, '/') . '\s+fanout\s+false\s+true\s+true$/m', $rows);
    }

    public function testPassiveExchangeDeclareSucceedsForAnExistingOne(): void
    {
        $x = $this->exchange('topic');
        $this->conn->declareExchange($x, 'topic', ['passive' => true]);
        $this->assertTrue($this->conn->isConnected());
    }

    public function testQueueOptionsAndNestedArgumentsReachTheBroker(): void
    {
        $q = $this->queue([
            // exclusive: RabbitMQ 4.x deprecates transient queues that are not
            'durable' => false,
            'exclusive' => true,
            'auto_delete' => true,
            'arguments' => [
                'x-max-length' => 10,
                'x-dead-letter-exchange' => 'amq.fanout',
                'x-custom' => ['a' => [1, 2.5, true, null, 'text'], 'b' => ['nested' => 'yes']],
            ],
        ]);
        $rows = Broker::ctl('list_queues', 'name', 'durable', 'auto_delete', 'arguments', '-q', '--no-table-headers');
        $line = '';
        foreach (explode("\n", $rows) as $row) {
            if (str_starts_with($row, $q)) {
                $line = $row;
            }
        }
        $this->assertStringContainsString('false', $line);
        $this->assertStringContainsString('{"x-max-length",10}', $line);
        $this->assertStringContainsString('{"x-dead-letter-exchange","amq.fanout"}', $line);
        $this->assertStringContainsString('{"b",[{"nested","yes"}]}', $line);
        $this->assertStringContainsString('{"a",[1,2.5,true,undefined,"text"]}', $line);
        // x-max-length is live: an 11th message pushes the oldest out.
        Broker::publishWithAmqplib('', $q, 11);
        $this->assertSame(10, $this->conn->queueStatus($q)['messages']);
    }

    public function testQueueTypeArgumentDeclaresAQuorumQueue(): void
    {
        $q = $this->queue(['arguments' => ['x-queue-type' => 'quorum']]);
        $rows = Broker::ctl('list_queues', 'name', 'type', '-q', '--no-table-headers');
        $this->assertMatchesRegularExpression('/^' . preg_quote($q, '/') . '\s+quorum$/m', $rows);
    }

    public function testExclusiveQueueIsDeletedWithItsConnection(): void
    {
        $other = new Connection(Broker::uri());
        $q = $other->declareQueue(Broker::unique('excl'), ['exclusive' => true]);
        try {
            $this->conn->queueStatus($q);
            $this->fail('another connection may not use an exclusive queue');
        } catch (ChannelException $e) {
            $this->assertSame(405, $e->getCode());
        }
        $other->close();
        Broker::eventually(function () use ($q) {
            try {
                (new Connection(Broker::uri()))->queueStatus($q);
                return false;
            } catch (ChannelException $e) {
                return $e->getCode() === 404;
            }
        }, 'the exclusive queue gone');
        $this->expectException(ChannelException::class);
        $this->expectExceptionCode(404);
        $this->conn->queueStatus($q);
    }
}
