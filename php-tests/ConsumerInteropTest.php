<?php

declare(strict_types=1);

use AmqpRs\Connection;
use AmqpRs\Message;
use AmqpRs\Tests\Support\Broker;
use PhpAmqpLib\Message\AMQPMessage;
use PhpAmqpLib\Wire\AMQPTable;
use PHPUnit\Framework\TestCase;

/**
 * What the other PHP clients publish, amqp_rs consumes intact; and acks held back for a
 * burst (sent as multiple acks) settle exactly what the callbacks settled.
 */
final class ConsumerInteropTest extends TestCase
{
    private Connection $conn;
    private string $queue;

    protected function setUp(): void
    {
        $this->conn = new Connection(Broker::uri());
        $this->queue = $this->conn->declareQueue(Broker::unique('interop'), ['auto_delete' => false]);
    }

    protected function tearDown(): void
    {
        $conn = new Connection(Broker::uri());
        $conn->deleteQueue($this->queue);
        $conn->close();
    }

    private function consumeOne(): Message
    {
        $got = null;
        $this->conn->consumer($this->queue)->consume(function (Message $m) use (&$got) {
            $got = $m;
        }, ['max_messages' => 1, 'max_time' => 5]);
        $this->assertInstanceOf(Message::class, $got, 'nothing was delivered');
        return $got;
    }

    private const PROPERTIES = [
        'content_type' => 'text/plain', 'content_encoding' => 'gzip', 'delivery_mode' => 2,
        'priority' => 3, 'correlation_id' => 'c1', 'reply_to' => 'r1', 'expiration' => '60000',
        'message_id' => 'id1', 'timestamp' => 1234567890, 'type' => 't1', 'user_id' => 'guest',
        'app_id' => 'a1',
    ];

    private function assertProperties(Message $m): void
    {
        $props = $m->getProperties();
        foreach (self::PROPERTIES as $key => $value) {
            $this->assertSame($value, $props[$key] ?? null, $key);
        }
        $this->assertSame('text/plain', $m->getContentType());
        $this->assertSame('id1', $m->getMessageId());
        $this->assertSame('c1', $m->getCorrelationId());
        $this->assertSame('r1', $m->getReplyTo());
        $this->assertSame(3, $m->getPriority());
        $this->assertSame(1234567890, $m->getTimestamp());
        $this->assertSame('t1', $m->getType());
        $this->assertSame('a1', $m->getAppId());
        $this->assertSame('60000', $m->getExpiration());
        $this->assertSame(2, $m->getDeliveryMode());
    }

    public function testMessagePublishedByPhpAmqpArrivesWithEveryPropertyAndHeader(): void
    {
        // php-amqp encodes lists of strings only (see ProducerTest), so its list is of strings.
        $headers = ['s' => 'text', 'i' => -42, 'big' => PHP_INT_MAX, 'f' => 2.5, 'b' => true,
            'words' => ['x', 'y'], 'table' => ['k' => 'v', 'deep' => ['n' => 7]]];
        $conn = new AMQPConnection(Broker::phpAmqpCredentials());
        $conn->connect();
        $ex = new AMQPExchange(new AMQPChannel($conn));
        $ex->setName('');
        $ex->publish("body\x00\xff", $this->queue, AMQP_NOPARAM, self::PROPERTIES + ['headers' => $headers]);
        $conn->disconnect();

        $m = $this->consumeOne();
        $this->assertSame("body\x00\xff", $m->getBody());
        $this->assertSame($this->queue, $m->getRoutingKey());
        $this->assertSame('', $m->getExchange());
        $this->assertProperties($m);
        $this->assertSame(self::sorted($headers), self::sorted($m->getHeaders()));
    }

    /** Tables by key: AMQP tables carry no order that clients agree on (lapin sorts them). */
    private static function sorted(array $table): array
    {
        if (!array_is_list($table)) {
            ksort($table);
        }
        return array_map(fn ($v) => is_array($v) ? self::sorted($v) : $v, $table);
    }

    public function testMessagePublishedByPhpAmqplibArrivesWithEveryPropertyAndHeaderType(): void
    {
        $headers = ['s' => 'text', 'i' => -42, 'big' => PHP_INT_MAX, 'f' => 2.5, 'b' => false,
            'n' => null, 'ints' => [1, 2, 3], 'mixed' => ['a', 1, true],
            'table' => ['k' => 'v', 'deep' => ['n' => 7, 'list' => ['z']]]];
        $conn = Broker::amqplib();
        $ch = $conn->channel();
        $props = self::PROPERTIES;
        $props['application_headers'] = new AMQPTable($headers);
        $ch->basic_publish(new AMQPMessage("body\x00\xff", $props), '', $this->queue);
        $ch->close();
        $conn->close();

        $m = $this->consumeOne();
        $this->assertSame("body\x00\xff", $m->getBody());
        $this->assertProperties($m);
        // php-amqplib writes a PHP float as the string of its digits: that string is what
        // travelled, and what arrives.
        $headers['f'] = '2.5';
        $this->assertSame(self::sorted($headers), self::sorted($m->getHeaders()));
    }

    public function testHeldAcksSettleExactlyWhatTheCallbacksSettled(): void
    {
        // 600 messages with prefetch 40: acks are held and sent as multiple acks while every
        // fifth message is rejected (dropped) and every seventh nacked back into the queue
        // once, in between. A multiple ack that covered a rejected tag, or overtook a nack,
        // would close the channel (406) or ack a requeued message.
        $producer = $this->conn->producer();
        for ($i = 0; $i < 600; $i++) {
            $producer->publish((string) $i, $this->queue);
        }
        $producer->waitForConfirms();
        $acked = [];
        $rejected = [];
        $seen = 0;
        $this->conn->consumer($this->queue, ['prefetch' => 40])->consume(
            function (Message $m) use (&$acked, &$rejected, &$seen) {
                $seen++;
                $i = (int) $m->getBody();
                if ($i % 5 === 0) {
                    $m->reject();
                    $rejected[$i] = true;
                } elseif ($i % 7 === 0 && !$m->isRedelivered()) {
                    $m->nack(true);
                } else {
                    $acked[$i] = true;
                }
            },
            ['idle_timeout' => 1, 'max_time' => 30],
        );
        $this->assertCount(120, $rejected);
        $this->assertCount(480, $acked);
        $nacked = count(array_filter(range(0, 599), fn (int $i) => $i % 7 === 0 && $i % 5 !== 0));
        $this->assertSame(600 + $nacked, $seen, 'each nacked message came back once');
        $this->conn->close();
        $check = new Connection(Broker::uri());
        $this->assertSame(0, $check->queueStatus($this->queue)['messages']);
        $check->close();
    }
}
