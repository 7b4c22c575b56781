<?php

declare(strict_types=1);

namespace AmqpRs\Symfony\Messenger\Transport;

use AmqpRs\ChannelException;
use AmqpRs\Connection as AmqpConnection;
use AmqpRs\ConnectionException;
use AmqpRs\Consumer;
use AmqpRs\Exception as AmqpException;
use AmqpRs\Message;
use AmqpRs\Producer;
use Symfony\Component\Messenger\Exception\TransportException;

/**
 * The transport's link to RabbitMQ: one AmqpRs\Connection (opened on first use), a producer
 * with publisher confirms, and one push consumer per queue whose prefetch buffer receive()
 * serves from.
 *
 * Why a consumer and not basic.get: the broker pushes up to `prefetch` messages ahead of the
 * worker's acks, so taking the next message costs no round trip, and an idle worker waits in
 * Consumer::next() (woken by a delivery or a handled signal) instead of polling.
 *
 * Errors of the extension become Messenger's TransportException, its message naming what was
 * done; a connection lost for good is dropped, and the next call connects afresh.
 */
final class Connection
{
    private ?AmqpConnection $connection = null;
    private ?Producer $producer = null;
    /** @var array<string, Consumer> by queue name */
    private array $consumers = [];
    private bool $setUp = false;
    /** @var array{string, Message}|null a delivery taken aside while another transport waited */
    private ?array $aside = null;
    /** @var array<int, \WeakReference<self>> the connections of this process that receive */
    private static array $receiving = [];

    /** Whether receive() may wait (false in a worker that also consumes other kinds of transport). */
    private static bool $mayWait = true;

    /** How long a wait looks at one buffer before it looks at the others (seconds). */
    private const SLICE = 0.05;

    public function __construct(private readonly Dsn $dsn)
    {
    }

    public static function fromDsn(#[\SensitiveParameter] string $dsn, array $options = []): self
    {
        return new self(new Dsn($dsn, $options));
    }

    /** @return list<string> */
    public function getQueueNames(): array
    {
        return array_keys($this->dsn->queues);
    }

    /**
     * Publishes and waits for the broker's confirm: a nack, a return (no queue bound for the
     * routing key: the producer is mandatory) or a timeout is a TransportException.
     *
     * @param ?string $retryQueue set for a retry: the message goes back to that queue only
     *     (through the default exchange), not to every queue bound to the exchange
     */
    public function publish(string $body, array $properties, ?string $routingKey, int $delayMs, ?string $retryQueue = null): void
    {
        if ($retryQueue !== null) {
            [$exchange, $routingKey] = ['', $retryQueue];
        } else {
            $exchange = $this->dsn->exchange['name'];
            $routingKey ??= $this->dsn->exchange['default_publish_routing_key']
                ?? ($exchange === '' ? $this->getQueueNames()[0] : '');
        }
        if ($delayMs > 0) {
            // The extension holds it in a delay queue (TTL + dead-letter to $exchange/$routingKey).
            $properties['delay'] = self::delayQueueMs($delayMs);
        }
        $this->call(function () use ($body, $properties, $routingKey, $exchange): void {
            $this->setupOnce();
            $producer = $this->producer();
            $producer->publish($body, $routingKey, $exchange, $properties);
            $producer->waitForConfirms($this->dsn->confirmTimeout);
        }, sprintf('publishing to exchange "%s" with routing key "%s"', $exchange, $routingKey));
    }

    /**
     * $ms rounded up to two significant digits (942 -> 950, 2136 -> 2200, 61234 -> 62000).
     *
     * Each distinct delay is a delay queue of its own, kept an hour after its last use. Symfony
     * 7.1+ retries with 10 % jitter by default, so unrounded every retry would declare another
     * queue; rounded, a decade of delays holds at most 90, and no delay is cut short.
     */
    public static function delayQueueMs(int $ms): int
    {
        if ($ms < 100) {
            return $ms;
        }
        $step = 10 ** ((int) floor(log10($ms)) - 1);
        return (int) (ceil($ms / $step) * $step);
    }

    /**
     * The next message of the first of $queues that has one, from the consumers' prefetch
     * buffers; waits up to `wait_time` seconds when none is buffered, and less when a signal
     * the worker handles (SIGTERM) comes in, or when a delivery arrives for another amqp-rs
     * transport of this process.
     *
     * The last is for a worker of several transports (`messenger:consume high low`): Messenger
     * asks each receiver in turn, so a wait on an empty "high" would hold up "low" for the
     * whole wait, every round. While it waits, this connection looks into the other
     * connections' buffers; a delivery found there is kept aside for that connection's next
     * receive(), and this one returns null so that the worker moves on to it.
     *
     * @param list<string> $queues
     * @return array{string, Message}|null the queue and the message
     */
    public function receive(array $queues): ?array
    {
        return $this->call(function () use ($queues): ?array {
            $this->setupOnce();
            if ((self::$receiving[spl_object_id($this)] ?? null)?->get() !== $this) {
                self::$receiving[spl_object_id($this)] = \WeakReference::create($this);
            }
            if ($this->aside !== null && in_array($this->aside[0], $queues, true)) {
                [$received, $this->aside] = [$this->aside, null];
                return $received;
            }
            foreach ($queues as $queue) {
                if (($message = $this->consumer($queue)->next(0.0)) !== null) {
                    return [$queue, $message];
                }
            }
            if (!self::$mayWait) {
                return null;
            }
            $others = $this->otherReceivers();
            $slice = $others === [] && count($queues) === 1 ? $this->dsn->waitTime : self::SLICE;
            $deadline = microtime(true) + $this->dsn->waitTime;
            do {
                foreach ($queues as $queue) {
                    $wait = min($slice, max(0.0, $deadline - microtime(true)));
                    $start = hrtime(true);
                    if (($message = $this->consumer($queue)->next($wait)) !== null) {
                        return [$queue, $message];
                    }
                    if ((hrtime(true) - $start) / 1e9 < 0.9 * $wait) {
                        return null;   // woken by a signal: let the worker see it at once
                    }
                }
                foreach ($others as $other) {
                    if ($other->setAside()) {
                        return null;
                    }
                }
            } while (microtime(true) < $deadline);
            return null;
        }, 'receiving from queue "' . implode('", "', $queues) . '"');
    }

    /**
     * Whether receive() may wait for deliveries: not in a worker that also consumes transports
     * of another kind, which a wait would hold up (set by WorkerTransportsListener).
     */
    public static function waitForDeliveries(bool $wait): void
    {
        self::$mayWait = $wait;
    }

    /** Takes a delivery that has arrived for one of this connection's consumers aside; whether one is. */
    private function setAside(): bool
    {
        if ($this->aside !== null) {
            return true;
        }
        foreach ($this->consumers as $queue => $consumer) {
            try {
                $message = $consumer->next(0.0);
            } catch (AmqpException) {
                return false;   // its own receive() reports it
            }
            if ($message !== null) {
                $this->aside = [$queue, $message];
                return true;
            }
        }
        return false;
    }

    /** @return list<self> the other connections of the process that receive */
    private function otherReceivers(): array
    {
        $others = [];
        foreach (self::$receiving as $id => $ref) {
            $other = $ref->get();
            if ($other === null) {
                unset(self::$receiving[$id]);
            } elseif ($other !== $this) {
                $others[] = $other;
            }
        }
        return $others;
    }

    public function ack(Message $message, string $queue): void
    {
        $this->settle(fn () => $message->ack(), $message, "acknowledging a message of queue \"$queue\"");
    }

    /** Rejects without requeue: the broker dead-letters it if the queue has a dead-letter exchange. */
    public function reject(Message $message, string $queue): void
    {
        $this->settle(fn () => $message->reject(false), $message, "rejecting a message of queue \"$queue\"");
    }

    /** Puts a message taken with peek() back, unchanged. */
    public function release(Message $message): void
    {
        if (!$message->isSettled()) {
            $this->settle(fn () => $message->nack(true), $message, 'putting a listed message back');
        }
    }

    /**
     * Takes up to $limit ready messages of $queue with basic.get, unsettled: they stay out of
     * the queue until acked, rejected or released (or the connection closes). For listing the
     * failure transport (messenger:failed:show), not for consuming.
     *
     * @return list<Message>
     */
    public function peek(string $queue, int $limit): array
    {
        return $this->call(function () use ($queue, $limit): array {
            $this->setupOnce();
            $connection = $this->connection();
            $limit = min($limit, $connection->queueStatus($queue)['messages']);
            $messages = [];
            while (count($messages) < $limit && ($message = $connection->get($queue)) !== null) {
                $messages[] = $message;
            }
            return $messages;
        }, "listing queue \"$queue\"");
    }

    /** Declares the exchange (when named), the queues and their bindings. */
    public function setup(): void
    {
        $this->call(function (): void {
            $connection = $this->connection();
            $exchange = $this->dsn->exchange;
            if ($exchange['name'] !== '') {
                $options = ['durable' => true];
                if ($exchange['arguments'] !== []) {
                    $options['arguments'] = $exchange['arguments'];
                }
                $connection->declareExchange($exchange['name'], $exchange['type'], $options);
            }
            foreach ($this->dsn->queues as $name => $queue) {
                $options = ['durable' => true];
                if ($queue['arguments'] !== []) {
                    $options['arguments'] = $queue['arguments'];
                }
                $connection->declareQueue($name, $options);
                if ($exchange['name'] === '') {
                    continue;
                }
                foreach ($queue['binding_keys'] ?: [''] as $key) {
                    $connection->bindQueue($name, $exchange['name'], $key, $queue['binding_arguments']);
                }
            }
            $this->setUp = true;
        }, 'setting up exchange "' . $this->dsn->exchange['name'] . '" and queues "' . implode('", "', $this->getQueueNames()) . '"');
    }

    /** Ready messages in the transport's queues (not those prefetched by workers, nor delayed ones). */
    public function countMessagesInQueues(): int
    {
        return $this->call(function (): int {
            $this->setupOnce();
            $count = 0;
            foreach ($this->getQueueNames() as $queue) {
                $count += $this->connection()->queueStatus($queue)['messages'];
            }
            return $count;
        }, 'counting messages of queue "' . implode('", "', $this->getQueueNames()) . '"');
    }

    /** Closes the connection (waiting, bounded, for outstanding acks and confirms); reopened on next use. */
    public function close(): void
    {
        $connection = $this->connection;
        $this->forget();
        $connection?->close();
    }

    public function __destruct()
    {
        try {
            $this->close();
        } catch (\Throwable) {
            // Nothing left to tell at destruction: every publish was confirmed already.
        }
    }

    private function setupOnce(): void
    {
        if ($this->dsn->autoSetup && !$this->setUp) {
            $this->setup();
        }
    }

    private function connection(): AmqpConnection
    {
        return $this->connection ??= new AmqpConnection($this->dsn->uris, $this->dsn->connectionOptions);
    }

    private function producer(): Producer
    {
        return $this->producer ??= $this->connection()->producer(['mandatory' => true, 'nack_retries' => $this->dsn->nackRetries]);
    }

    private function consumer(string $queue): Consumer
    {
        return $this->consumers[$queue] ??= $this->connection()->consumer($queue, ['prefetch' => $this->dsn->prefetch]);
    }

    private function settle(callable $how, Message $message, string $what): void
    {
        try {
            $how();
        } catch (AmqpException $e) {
            if ($e instanceof ConnectionException || ($this->connection !== null && !$this->connection->isConnected())) {
                // Delivered on a channel lost since: the broker has put it back already and
                // delivers it again; settling it now is neither possible nor needed.
                return;
            }
            throw new TransportException(sprintf('amqp-rs transport: %s: %s', $what, $e->getMessage()), 0, $e);
        }
    }

    /**
     * Runs $fn, turning the extension's exceptions into TransportException ("<what>: <why>").
     * A connection lost for good is dropped (the extension's own recovery gave up); a consumer
     * cancelled by the broker (its queue deleted) is dropped, with the declarations made.
     */
    private function call(callable $fn, string $what): mixed
    {
        try {
            return $fn();
        } catch (ConnectionException $e) {
            $this->forget();
            throw new TransportException(sprintf('amqp-rs transport (%s): %s: %s', $this->dsn->redacted, $what, $e->getMessage()), 0, $e);
        } catch (ChannelException $e) {
            $this->consumers = [];
            $this->aside = null;
            $this->setUp = false;
            throw new TransportException(sprintf('amqp-rs transport: %s: %s', $what, $e->getMessage()), $e->getCode(), $e);
        } catch (AmqpException $e) {
            throw new TransportException(sprintf('amqp-rs transport: %s: %s', $what, $e->getMessage()), 0, $e);
        }
    }

    private function forget(): void
    {
        $this->connection = $this->producer = $this->aside = null;
        $this->consumers = [];
        $this->setUp = false;
    }
}
