<?php

declare(strict_types=1);

namespace AmqpRs\Tests\Support;

use PhpAmqpLib\Connection\AMQPStreamConnection;
use PhpAmqpLib\Message\AMQPMessage;

/**
 * The test broker, and independent clients to check what amqp_rs did.
 *
 * One setting says which broker: AMQP_RS_TEST_URI (default the host's RabbitMQ on
 * 127.0.0.1:5672), and AMQP_RS_TEST_NODE the node that rabbitmqctl must talk to (default
 * rabbitmqctl's own). `make matrix` sets both for the sid root's RabbitMQ 4.3 node.
 */
final class Broker
{
    public const DEFAULT_URI = 'amqp://guest:guest@127.0.0.1:5672/%2f';

    /** The broker's URI (with its credentials). */
    public static function uri(): string
    {
        $uri = getenv('AMQP_RS_TEST_URI');
        return is_string($uri) && $uri !== '' ? $uri : self::DEFAULT_URI;
    }

    /** The broker's URI with another user, password or vhost (raw, not encoded). */
    public static function uriWith(?string $user = null, ?string $password = null, ?string $vhost = null): string
    {
        return sprintf(
            'amqp://%s:%s@%s:%d/%s',
            rawurlencode($user ?? self::user()),
            rawurlencode($password ?? self::password()),
            self::host(),
            self::port(),
            rawurlencode($vhost ?? self::vhost()),
        );
    }

    public static function host(): string
    {
        return (string) (parse_url(self::uri(), PHP_URL_HOST) ?? '127.0.0.1');
    }

    public static function port(): int
    {
        return (int) (parse_url(self::uri(), PHP_URL_PORT) ?? 5672);
    }

    /** host:port, as error messages show the endpoint. */
    public static function endpoint(): string
    {
        return self::host() . ':' . self::port();
    }

    public static function user(): string
    {
        return rawurldecode((string) (parse_url(self::uri(), PHP_URL_USER) ?? 'guest'));
    }

    public static function password(): string
    {
        return rawurldecode((string) (parse_url(self::uri(), PHP_URL_PASS) ?? 'guest'));
    }

    public static function vhost(): string
    {
        $path = (string) (parse_url(self::uri(), PHP_URL_PATH) ?? '');
        return $path === '' || $path === '/' ? '/' : rawurldecode(substr($path, 1));
    }

    /** A php-amqplib connection to the broker. */
    public static function amqplib(): AMQPStreamConnection
    {
        return new AMQPStreamConnection(self::host(), self::port(), self::user(), self::password(), self::vhost());
    }

    /** php-amqp's (AMQPConnection) credentials array for the broker. */
    public static function phpAmqpCredentials(): array
    {
        return ['host' => self::host(), 'port' => self::port(), 'login' => self::user(), 'password' => self::password(), 'vhost' => self::vhost()];
    }

    /** The broker's major version (3 or 4), from the server properties it sends. */
    public static function majorVersion(): int
    {
        static $major = null;
        if ($major === null) {
            $conn = self::amqplib();
            $major = (int) explode('.', (string) ($conn->getServerProperties()['version'][1] ?? '0'))[0];
            $conn->close();
        }
        return $major;
    }

    /** The node rabbitmqctl must talk to (AMQP_RS_TEST_NODE), or null for its default. */
    public static function node(): ?string
    {
        $node = getenv('AMQP_RS_TEST_NODE');
        return is_string($node) && $node !== '' ? $node : null;
    }

    /** The argv of `rabbitmqctl [-n NODE] ...$args` for the test broker. */
    public static function ctlArgv(string ...$args): array
    {
        $node = self::node();
        return array_merge(['rabbitmqctl'], $node === null ? [] : ['-n', $node], $args);
    }

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
        $conn = self::amqplib();
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
        $conn = self::amqplib();
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
        $cmd = implode(' ', array_map('escapeshellarg', self::ctlArgv(...$args))) . ' 2>&1';
        exec($cmd, $out, $code);
        if ($code !== 0) {
            throw new \RuntimeException("$cmd failed ($code): " . implode("\n", $out));
        }
        return implode("\n", $out);
    }
}
