<?php

declare(strict_types=1);

namespace AmqpRs\Tests\Support;

use PhpAmqpLib\Connection\AMQPStreamConnection;
use PhpAmqpLib\Message\AMQPMessage;

/** The test broker, and independent clients to check what amqp_rs did. */
final class Broker
{
    public const URI = 'amqp://guest:guest@127.0.0.1:5672/%2f';

    /** A name no other test or run uses. */
    public static function unique(string $what): string
    {
        return sprintf('amqp_rs.test.%s.%d.%s', $what, getmypid(), bin2hex(random_bytes(4)));
    }

    /**
     * Polls $condition until it returns true; fails the test naming $what once $timeout
     * seconds have passed. Tests wait on conditions like this, never on fixed sleeps.
     */
    public static function eventually(callable $condition, string $what, float $timeout = 10.0): void
    {
        $deadline = microtime(true) + $timeout;
        while (!$condition()) {
            if (microtime(true) >= $deadline) {
                throw new \PHPUnit\Framework\AssertionFailedError("not within {$timeout} s: $what");
            }
            usleep(10_000);
        }
    }

    /** Publishes with php-amqplib, an independent client, and waits for the confirms. */
    public static function publishWithAmqplib(string $exchange, string $routingKey, int $count): void
    {
        $conn = new AMQPStreamConnection('127.0.0.1', 5672, 'guest', 'guest');
        $ch = $conn->channel();
        $ch->confirm_select();
        for ($i = 0; $i < $count; $i++) {
            $ch->basic_publish(new AMQPMessage("m$i"), $exchange, $routingKey);
        }
        $ch->wait_for_pending_acks(5.0);
        $conn->close();
    }

    /** Ready messages of a queue, as php-amqplib sees them (passive declare). */
    public static function countWithAmqplib(string $queue): int
    {
        $conn = new AMQPStreamConnection('127.0.0.1', 5672, 'guest', 'guest');
        [, $messages] = $conn->channel()->queue_declare($queue, true);
        $conn->close();
        return (int) $messages;
    }

    /** The amqp_rs shared object this process runs with, to load it in child PHPs. */
    public static function extensionPath(): string
    {
        foreach (file('/proc/self/maps') as $line) {
            if (preg_match('#(/\S*amqp_rs\S*\.so)$#', trim($line), $m)) {
                return $m[1];
            }
        }
        throw new \RuntimeException('amqp_rs .so not found in /proc/self/maps');
    }

    /** Runs rabbitmqctl with its arguments; returns stdout. */
    public static function ctl(string ...$args): string
    {
        $cmd = 'rabbitmqctl ' . implode(' ', array_map('escapeshellarg', $args)) . ' 2>&1';
        exec($cmd, $out, $code);
        if ($code !== 0) {
            throw new \RuntimeException("$cmd failed ($code): " . implode("\n", $out));
        }
        return implode("\n", $out);
    }
}
