<?php

declare(strict_types=1);

use AmqpRs\ChannelException;
use AmqpRs\Connection;
use AmqpRs\Message;
use AmqpRs\Tests\Support\Broker;
use PhpAmqpLib\Message\AMQPMessage;
use PhpAmqpLib\Wire\AMQPTable;
use PHPUnit\Framework\TestCase;

/**
 * A delivery whose short strings (routing key, short-string properties, header-table keys)
 * are not UTF-8 cannot be parsed by lapin. Left alone it would fail the connection with the
 * message still queued, and a worker would loop on it forever; instead it is rejected to the
 * queue's dead-letter exchange, bytes intact, with a warning, and consuming goes on.
 */
final class PoisonInputTest extends TestCase
{
    private Connection $conn;
    private string $queue;
    private string $dlx;
    private string $dlq;
    private string $fanout;

    protected function setUp(): void
    {
        $this->conn = new Connection(Broker::uri());
        $this->queue = Broker::unique('poison');
        $this->dlx = Broker::unique('poison-dlx');
        $this->dlq = Broker::unique('poison-dlq');
        $this->fanout = Broker::unique('poison-fanout');
        $this->conn->declareExchange($this->dlx, 'fanout');
        $this->conn->declareQueue($this->dlq);
        $this->conn->bindQueue($this->dlq, $this->dlx);
        // No x-dead-letter-routing-key: the dead letter keeps its routing key, which is one of
        // the bytes under test.
        $this->conn->declareQueue($this->queue, ['arguments' => ['x-dead-letter-exchange' => $this->dlx]]);
        // RabbitMQ refuses a binding key that is not UTF-8 (FRAME_ERROR) but routes a publish
        // with one: a fanout delivers it to the queue under that routing key.
        $this->conn->declareExchange($this->fanout, 'fanout');
        $this->conn->bindQueue($this->queue, $this->fanout);
    }

    protected function tearDown(): void
    {
        // First, so that no channel of the test still holds messages of the queues that go.
        try {
            $this->conn->close();
        } catch (AmqpRs\Exception) {
        }
        $conn = new Connection(Broker::uri());
        foreach ([$this->queue, $this->dlq] as $queue) {
            try {
                $conn->deleteQueue($queue);
            } catch (ChannelException) {
            }
        }
        foreach ([$this->dlx, $this->fanout] as $exchange) {
            try {
                $conn->deleteExchange($exchange);
            } catch (ChannelException) {
            }
        }
        $conn->close();
    }

    /**
     * php-amqplib writes short strings as the bytes it is given, so it can send what amqp_rs
     * cannot parse.
     *
     * @param list<array{0: string, 1?: array, 2?: string, 3?: string}> $messages
     *        body, properties, exchange (default ''), routing key (default the queue)
     */
    private function publishRaw(array $messages): void
    {
        $conn = Broker::amqplib();
        $ch = $conn->channel();
        $ch->confirm_select();
        foreach ($messages as $m) {
            $ch->basic_publish(new AMQPMessage($m[0], $m[1] ?? []), $m[2] ?? '', $m[3] ?? $this->queue);
        }
        $ch->wait_for_pending_acks(5.0);
        $conn->close();
    }

    /** Takes (with php-amqplib, which reads any bytes) what the DLQ holds, by body. */
    private function takeDeadLetters(int $expected): array
    {
        $conn = Broker::amqplib();
        $ch = $conn->channel();
        $dead = [];
        // Dead-lettering is asynchronous to the reject that causes it.
        $deadline = microtime(true) + 5;
        while (count($dead) < $expected && microtime(true) < $deadline) {
            $m = $ch->basic_get($this->dlq, true);
            if ($m === null) {
                usleep(50_000);
                continue;
            }
            $dead[$m->getBody()] = $m;
        }
        $conn->close();
        return $dead;
    }

    /** Runs $fn collecting its E_WARNINGs; other errors go on to PHPUnit. */
    private static function warnings(callable $fn, mixed &$result = null): array
    {
        $warnings = [];
        set_error_handler(function (int $no, string $msg) use (&$warnings): bool {
            if ($no !== E_WARNING) {
                return false;
            }
            $warnings[] = $msg;
            return true;
        });
        try {
            $result = $fn();
        } finally {
            restore_error_handler();
        }
        return $warnings;
    }

    /** One warning per poisoned message, in delivery order, each naming its field and queue. */
    private function assertPoisonWarnings(array $fields, array $warnings): void
    {
        $this->assertCount(count($fields), $warnings, implode("\n", $warnings));
        foreach ($fields as $i => $field) {
            $this->assertStringContainsString('not valid UTF-8', $warnings[$i]);
            $this->assertStringContainsString($this->queue, $warnings[$i]);
            // Word-bounded so that 'type' is not found inside 'content_type'.
            $this->assertMatchesRegularExpression('/\b' . preg_quote($field, '/') . '\b/', $warnings[$i]);
        }
    }

    public function testConsumeDeadLettersEachPoisonedDeliveryAndGoesOn(): void
    {
        $this->publishRaw([
            ['ok-1'],
            ['bad-message-id', ['message_id' => "\xff\xfe"]],
            ['bad-header-key', ['application_headers' => new AMQPTable(["k\xff" => 'v'])]],
            ['bad-nested-key', ['application_headers' => new AMQPTable(['outer' => new AMQPTable(["\xc3\x28" => 'x'])])]],
            ['bad-routing-key', [], $this->fanout, "rk\xff"],
            ['bad-correlation-id', ['correlation_id' => "\x80"]],
            ['ok-2'],
        ]);

        $bodies = [];
        $warnings = self::warnings(function () use (&$bodies) {
            return $this->conn->consumer($this->queue, ['prefetch' => 10])->consume(
                function (Message $m) use (&$bodies) {
                    $bodies[] = $m->getBody();
                },
                // idle_timeout ends it once the queue is drained; max_time is a backstop.
                ['idle_timeout' => 1, 'max_time' => 10],
            );
        }, $handled);

        $this->assertSame(['ok-1', 'ok-2'], $bodies);
        $this->assertSame(2, $handled);
        $this->assertPoisonWarnings(['message_id', 'header key', 'header key', 'routing key', 'correlation_id'], $warnings);

        // Nothing was torn down: the worker goes on with the same connection.
        $this->assertTrue($this->conn->isConnected());
        $producer = $this->conn->producer();
        $producer->publish('after', $this->queue);
        $producer->waitForConfirms();
        $this->assertSame('after', $this->conn->get($this->queue, true)?->getBody());
        // Closed before counting: what a channel still holds unsettled is not counted as ready.
        $this->conn->close();
        $this->assertSame(0, Broker::countWithAmqplib($this->queue));

        $dead = $this->takeDeadLetters(5);
        $this->assertSame(
            ['bad-correlation-id', 'bad-header-key', 'bad-message-id', 'bad-nested-key', 'bad-routing-key'],
            self::sortedKeys($dead),
        );
        $this->assertSame("\xff\xfe", $dead['bad-message-id']->get('message_id'));
        $this->assertSame("\x80", $dead['bad-correlation-id']->get('correlation_id'));
        $this->assertSame('v', $dead['bad-header-key']->get('application_headers')->getNativeData()["k\xff"] ?? null);
        $outer = $dead['bad-nested-key']->get('application_headers')->getNativeData()['outer'] ?? null;
        $this->assertSame(["\xc3\x28" => 'x'], $outer);
        $this->assertSame("rk\xff", $dead['bad-routing-key']->getRoutingKey());
        $this->assertSame($this->dlx, $dead['bad-routing-key']->getExchange());
    }

    public function testGetDeadLettersAPoisonedMessageAndReturnsTheNextOne(): void
    {
        $this->publishRaw([['bad', ['message_id' => "\xff\xfe"]], ['good']]);

        $warnings = self::warnings(fn () => $this->conn->get($this->queue), $m);

        $this->assertSame('good', $m?->getBody());
        $m->ack();
        $this->assertPoisonWarnings(['message_id'], $warnings);
        $dead = $this->takeDeadLetters(1);
        $this->assertSame(['bad'], self::sortedKeys($dead));
        $this->assertSame("\xff\xfe", $dead['bad']->get('message_id'));
        // Closed before counting, as above.
        $this->conn->close();
        $this->assertSame(0, Broker::countWithAmqplib($this->queue));
    }

    public function testGetReturnsNullWhenOnlyAPoisonedMessageWasQueued(): void
    {
        $this->publishRaw([['bad', ['app_id' => "\xfe"]]]);

        $warnings = self::warnings(fn () => $this->conn->get($this->queue), $m);

        $this->assertNull($m);
        $this->assertPoisonWarnings(['app_id'], $warnings);
        $this->assertSame(['bad'], self::sortedKeys($this->takeDeadLetters(1)));
        $this->conn->close();
        $this->assertSame(0, Broker::countWithAmqplib($this->queue));
    }

    public function testRejectsOfPoisonedDeliveriesLeaveHeldAcksIntact(): void
    {
        // Good deliveries are acked in held batches (multiple) around the rejected poisoned
        // ones in between: a multiple ack over a rejected tag would close the channel (406),
        // and one sent short of the good tags would leave them in the queue.
        $fields = ['message_id', 'correlation_id', 'type', 'app_id', 'reply_to', 'content_type', 'header key'];
        $messages = [];
        $expected = [];
        for ($i = 0; $i < 50; $i++) {
            $field = $fields[$i % count($fields)];
            $props = $field === 'header key'
                ? ['application_headers' => new AMQPTable(["h\xff$i" => $i])]
                : [$field => "\xff$i"];
            $messages[] = ["good-$i"];
            $messages[] = ["bad-$i", $props];
            $expected[] = $field;
        }
        $this->publishRaw($messages);

        $bodies = [];
        $warnings = self::warnings(function () use (&$bodies) {
            return $this->conn->consumer($this->queue, ['prefetch' => 20])->consume(
                function (Message $m) use (&$bodies) {
                    $bodies[] = $m->getBody();
                },
                ['idle_timeout' => 1, 'max_time' => 30],
            );
        }, $handled);

        $this->assertSame(array_map(fn (int $i) => "good-$i", range(0, 49)), $bodies);
        $this->assertSame(50, $handled);
        $this->assertPoisonWarnings($expected, $warnings);
        $this->conn->close();
        $this->assertSame(0, Broker::countWithAmqplib($this->queue));
        $dead = self::sortedKeys($this->takeDeadLetters(50));
        $bad = array_map(fn (int $i) => "bad-$i", range(0, 49));
        sort($bad);
        $this->assertSame($bad, $dead);
    }

    private static function sortedKeys(array $a): array
    {
        $keys = array_keys($a);
        sort($keys);
        return $keys;
    }
}
