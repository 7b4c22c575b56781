<?php

/**
 * IDE stubs for the amqp_rs extension. A PHPUnit test (php-tests/StubsTest.php) compares this
 * file with the loaded extension through Reflection, so it cannot drift from the code.
 *
 * @generate-class-entries
 */

namespace AmqpRs;

/** Base of everything the extension throws. */
class Exception extends \RuntimeException {}

/** Cannot connect, authentication refused, vhost missing, connection lost for good. */
class ConnectionException extends Exception {}

/** The broker closed a channel; getCode() is the AMQP reply code (404, 406, 403, ...). */
class ChannelException extends Exception {}

/** A bounded wait ran out. */
class TimeoutException extends Exception {}

/** Nacked or returned (unroutable) messages. */
class PublishException extends Exception
{
    /**
     * The messages the broker did not take, oldest first.
     *
     * @return list<array{exchange: string, routing_key: string, message_id: ?string,
     *     reply_code: int, reason: string}> reply_code is 312 (NO_ROUTE) for a returned message,
     *     0 for a nack
     */
    public function getFailures(): array {}
}

/**
 * A connection to RabbitMQ, opened by the constructor (fail fast).
 */
final class Connection
{
    /**
     * @param string|list<string> $uri one amqp:// or amqps:// URI, or a list tried in order;
     *     a URI may not set ?heartbeat= or ?connection_timeout= (\InvalidArgumentException):
     *     the options below set them for every broker of the list
     * @param array{heartbeat?: int, connect_timeout?: float, name?: string, reconnect?: bool,
     *     tls?: array{cafile?: string, certfile?: string, keyfile?: string, verify?: bool},
     *     persistent?: bool} $options
     * Options: heartbeat (s, default 30; 0 accepts the broker's interval: heartbeats are kept by a
     * background thread even while PHP works, so there is no reason to turn them off),
     * connect_timeout (s, default 5, per broker tried), name (shown in the management UI),
     * reconnect (default true: a lost connection is recovered by itself, walking the URI list,
     * with its channels, topology, qos and consumers; ConnectionException once 10 attempts
     * failed; see docs/recovery.md), tls (cafile: extra trusted CAs in PEM; certfile +
     * keyfile: PEM client certificate and PKCS#8 key for mutual TLS; verify: only true is
     * supported, give the broker's CA with cafile instead of turning verification off),
     * persistent (default false; see docs/persistent.md): as PDO's persistent connections and
     * php-amqp's pconnect(), the connection stays in this process's pool when the request ends
     * and the next new Connection() in the same process with the same URIs, credentials, vhost
     * and options gets it back without a handshake, with a clean publisher-confirm channel.
     * Nothing of one request reaches the next: a producer's unconfirmed messages are waited for
     * (or reported as an E_WARNING) when it is destroyed, consumers are cancelled and their
     * unsettled messages go back to their queue, and the exclusive queues a request declared are
     * deleted when it ends. Two persistent Connections with the same settings in one request
     * share the one broker connection. A pooled connection found lost (a broker restart, an idle
     * timeout) is replaced by a new one without an error; a forked child never uses its
     * parent's. The name the broker shows gets " (pid N)" appended, so that each php-fpm worker's
     * connection can be told apart.
     *
     * @throws ConnectionException when no broker of the list accepts the connection
     * @throws \InvalidArgumentException on a malformed URI or an unknown option
     */
    public function __construct(string|array $uri = 'amqp://guest:guest@127.0.0.1:5672/%2f', array $options = []) {}

    /** Whether the connection is open and usable. */
    public function isConnected(): bool {}

    /**
     * Waits (at most 30 s) for the confirms of every producer of this connection, then closes
     * it; calling it again does nothing. A persistent connection is released instead: this
     * object is closed, while the broker connection stays in the pool for the next request
     * (closePersistent() closes it for good).
     *
     * @throws PublishException when messages were nacked, returned or left unconfirmed
     * @throws ChannelException when the broker closed a producer's channel (e.g. 404 for a
     *     missing exchange)
     */
    public function close(): void {}

    /** Whether this connection was opened with 'persistent' => true and lives in the pool. */
    public function isPersistent(): bool {}

    /**
     * Closes a persistent connection for good and takes it out of the pool (as php-amqp's
     * pdisconnect()), after waiting for confirms as close() does; the next persistent
     * new Connection() opens a new one. On a connection that is not persistent: close().
     *
     * @throws PublishException when messages were nacked, returned or left unconfirmed
     */
    public function closePersistent(): void {}

    /**
     * @param string $type direct, fanout, topic, headers or a plugin's type
     * @param array{durable?: bool, auto_delete?: bool, internal?: bool, passive?: bool, arguments?: array} $options
     * @throws ChannelException e.g. 406 when it exists with other settings, 404 with passive
     */
    public function declareExchange(string $name, string $type = 'direct', array $options = []): void {}

    /**
     * @param string $name '' for a generated name: amq_rs.gen-... (made by the client, so
     *     that recovery can declare the queue again), or amq.gen-... with reconnect off
     * @param array{durable?: bool, exclusive?: bool, auto_delete?: bool, passive?: bool, arguments?: array} $options
     * @return string the queue's name
     * @throws ChannelException e.g. 406 when it exists with other arguments, 404 with passive
     */
    public function declareQueue(string $name = '', array $options = []): string {}

    public function bindQueue(string $queue, string $exchange, string $routingKey = '', array $arguments = []): void {}

    public function unbindQueue(string $queue, string $exchange, string $routingKey = '', array $arguments = []): void {}

    /**
     * @param array{if_unused?: bool, if_empty?: bool} $options
     * @return int how many messages were deleted with the queue
     */
    public function deleteQueue(string $name, array $options = []): int {}

    /** @param array{if_unused?: bool} $options */
    public function deleteExchange(string $name, array $options = []): void {}

    /** @return int how many messages were removed */
    public function purgeQueue(string $name): int {}

    /**
     * A producer on its own channel of this connection; it keeps the connection open while
     * it lives.
     *
     * @param array{confirms?: bool, mandatory?: bool, blocked_timeout?: float,
     *     nack_retries?: int, stamp_message_id?: bool} $options confirms (default true): publisher confirms, pipelined;
     *     mandatory (default false): unroutable messages come back as failures;
     *     blocked_timeout (seconds, default 30): how long publish() waits while the broker
     *     blocks the connection (a memory or disk alarm) before it throws TimeoutException;
     *     nack_retries (0 to 20, default 6): how many times a nacked message is republished,
     *     on a new channel after a delay doubling from 0.25 s, before it is reported;
     *     stamp_message_id (default false): give each message without a message_id a random
     *     UUID one, so that consumers can recognise duplicates
     */
    public function producer(array $options = []): Producer {}

    /**
     * A consumer of one queue or a list of queues, on its own channel.
     *
     * @param string|list<string> $queues
     * @param array{prefetch?: int, auto_ack?: bool, exclusive?: bool, consumer_tag?: string,
     *     arguments?: array, priority?: int} $options prefetch defaults to 100
     */
    public function consumer(string|array $queues, array $options = []): Consumer {}

    /** One message by basic.get, or null when the queue is empty. */
    public function get(string $queue, bool $autoAck = false): ?Message {}

    /**
     * Request/reply over direct reply-to (amq.rabbitmq.reply-to): publishes the request with
     * reply_to and a correlation_id set (yours, if $properties has one) and waits for the
     * reply carrying it. Late replies to calls that timed out are dropped. Requests are
     * transient (delivery_mode 1) unless $properties says otherwise.
     *
     * @throws \InvalidArgumentException when $properties sets reply_to, or an empty correlation_id
     * @throws TimeoutException when no reply comes within $timeout seconds
     * @throws PublishException when no queue takes the request (returned, 312 NO_ROUTE)
     */
    public function rpc(string $body, string $routingKey = '', string $exchange = '', array $properties = [], float $timeout = 30.0): Message {}

    /**
     * Publishes a request as rpc() does and returns at once, without waiting for the reply:
     * take it from the RpcCall (poll() when readiness() is readable, or wait()). Many calls
     * may be in flight on one connection. $timeout still bounds each call: once it passes,
     * the stream turns readable and poll() throws TimeoutException.
     *
     * @throws \InvalidArgumentException when $properties sets reply_to, or an empty correlation_id
     * @throws ConnectionException when the connection is closed, lost, or inherited through fork()
     */
    public function rpcAsync(string $body, string $routingKey = '', string $exchange = '', array $properties = [], float $timeout = 30.0): RpcCall {}

    /**
     * The connection's readiness stream, for event loops (stream_select, Revolt's onReadable,
     * Swoole\Event::add, ReactPHP's addReadStream). It is readable while some consumer,
     * producer or RPC call of this connection may have something to take, and turns
     * unreadable once a take on each of them came back empty:
     * Consumer::next(0.0) returned null, Producer::pollConfirms() returned 0 (or the
     * remaining ones are still unconfirmed), RpcCall::poll() returned null.
     *
     * An object joins the stream with its first take that does not wait (an rpcAsync() call
     * at once); a blocking call on it leaves the stream until its next take that does not
     * wait. Never read from or write to the stream. After close() it stays readable: every
     * take then throws ConnectionException. See docs/event-loops.md.
     *
     * @return resource a read-only stream; fclose() it when done (the connection keeps its own)
     * @throws ConnectionException when the connection is closed, lost, or inherited through fork()
     */
    public function readiness(): mixed {}

    /**
     * @return array{messages: int, consumers: int}
     * @throws ChannelException 404 when the queue does not exist
     */
    public function queueStatus(string $name): array {}
}

/**
 * Publishes messages on its own channel. With confirms (the default) publish() does not wait
 * for the broker: waitForConfirms() collects the outcome of everything published so far.
 * Nothing is dropped silently: a failure is reported by waitForConfirms(), or at the latest by
 * Connection::close(), or as an E_WARNING when the producer is destroyed with failures pending.
 */
final class Producer
{
    /** Producers are made by Connection::producer(). */
    private function __construct() {}

    /**
     * @param string $body any bytes
     * @param array{content_type?: string, content_encoding?: string, headers?: array,
     *     delivery_mode?: int, priority?: int, correlation_id?: string, reply_to?: string,
     *     expiration?: string|int, message_id?: string, timestamp?: int, type?: string,
     *     user_id?: string, app_id?: string, delay?: int} $properties delivery_mode defaults
     *     to 2 (persistent); headers may nest lists and tables of strings, ints, floats, bools
     *     and null; delay (not sent): milliseconds the message waits, in a delay queue the
     *     producer declares (amq_rs.delay.*, TTL + dead-letter), before it is routed
     * @throws ChannelException when the broker closed the channel after an earlier publish
     *     (raised once; the next publish opens a new channel)
     * @throws \InvalidArgumentException for an unknown property or a header AMQP cannot carry
     */
    public function publish(string $body, string $routingKey = '', string $exchange = '', array $properties = []): void {}

    /**
     * Publishes a PHP value as a JSON body (json_encode with unescaped slashes and unicode,
     * floats keep their .0); content_type is application/json unless $properties sets it.
     *
     * @throws \InvalidArgumentException when the value cannot be encoded (invalid UTF-8, NAN...)
     */
    public function publishJson(mixed $value, string $routingKey = '', string $exchange = '', array $properties = []): void {}

    /**
     * Waits until every publish so far is confirmed.
     *
     * @throws PublishException listing the nacked and returned messages
     * @throws ChannelException when the broker closed the channel (e.g. 404, missing exchange)
     * @throws TimeoutException when confirms are still missing after $timeout seconds
     */
    public function waitForConfirms(float $timeout = 30.0): void {}

    /**
     * Settles what the broker has confirmed so far, without waiting, and returns how many
     * publishes are still unconfirmed. Until that is 0, the connection's readiness() stream
     * turns readable once they all are settled (or a nacked message is due for its republish);
     * it may turn readable once before, when the last publish is written, with nothing new.
     *
     * @throws PublishException once none is unconfirmed, listing every message nacked or returned
     *     since the last report (all together, as waitForConfirms() does)
     * @throws ChannelException when the broker closed the channel (e.g. 404, missing exchange)
     * @throws ConnectionException when the connection is closed, lost, or inherited through fork()
     */
    public function pollConfirms(): int {}

    /** Publishes the broker has not confirmed yet. */
    public function pendingConfirms(): int {}
}

/**
 * Calls a PHP callable for each delivery, on the PHP thread; heartbeats are kept by a
 * background thread while the callable runs.
 */
final class Consumer
{
    /** Consumers are made by Connection::consumer(). */
    private function __construct() {}

    /**
     * Blocks, calling $callback(Message $m) for each delivery; returns how many were handled.
     *
     * Settlement (without auto_ack): a callback that returns without settling its message has
     * it acked; one that throws has it settled per on_error ('requeue', the default, or
     * 'reject' to dead-letter it), and its exception leaves consume() unchanged. With
     * 'retry', the message goes back to its queue after retry_delay seconds (default 1,
     * doubling each time; Message::getAttempt() counts), up to max_retries times (default 3),
     * then to the dead_letter queue (default "<queue>.dead", with headers x-failure-reason,
     * x-failed-queue, x-attempt); the exception is consumed and consume() goes on.
     *
     * When consume() returns (a limit, stop(), a stop signal, an exception), the deliveries
     * already in the prefetch buffer that the callback never saw go back to the queue at
     * once (the subscription is cancelled, then they are rejected with requeue), so other
     * consumers get them; the next consume() or next() subscribes again.
     *
     * @param callable(Message): mixed $callback
     * Stop signals (default SIGTERM and SIGINT): while consume() runs they make it return
     * after the message in hand is settled, within a fraction of a second when idle; a pcntl
     * handler you installed for them still runs, before consume() returns (or at once with
     * pcntl_async_signals(true)).
     *
     * @param array{max_messages?: int, max_time?: float, idle_timeout?: float,
     *     memory_limit?: int, stop_signals?: list<int>, on_error?: 'requeue'|'reject'|'retry',
     *     max_retries?: int, retry_delay?: float, dead_letter?: string} $options
     *     max_time and idle_timeout in seconds, memory_limit in MiB of PHP memory
     * @throws ChannelException when the broker cancels the consumer (e.g. its queue was deleted)
     */
    public function consume(callable $callback, array $options = []): int {}

    /**
     * The next delivery from the consumer's prefetch buffer, waiting up to $timeout seconds
     * (0: only what has arrived); null when none came. Pull-style use of a push consumer:
     * nothing is settled for you — ack(), nack() or reject() the message (not batched: sent
     * at once, though like any AMQP ack not confirmed by the broker; a process killed with
     * SIGKILL right after may lose it, and the message is delivered again). Messages left
     * unsettled go back to the queue when the consumer or its connection closes. A SIGTERM or SIGINT that your script
     * handles (pcntl_signal) ends the wait at once: null is returned and your handler runs.
     *
     * next(0.0) never waits, and joins the consumer to the connection's readiness() stream:
     * take until it returns null, and the stream tells you when more has come.
     */
    public function next(float $timeout = 0.0): ?Message {}

    /** Makes consume() return after the message in hand (from the callback or a signal handler). */
    public function stop(): void {}

    /**
     * Cancels the subscription (basic.cancel), for good; the deliveries in the prefetch buffer
     * that were not handed out go back to the queue at once. From a callback it takes effect
     * when the callback returns.
     */
    public function cancel(): void {}
}

/**
 * An RPC call in flight, made by Connection::rpcAsync(). Its reply is taken once, by poll()
 * or wait(); taking it again throws.
 */
final class RpcCall
{
    private function __construct() {}

    /**
     * The reply if it has come, else null, without waiting.
     *
     * @throws TimeoutException once the call's timeout has passed without a reply
     * @throws PublishException when no queue took the request (returned, 312 NO_ROUTE)
     * @throws ConnectionException when the connection was lost during the call
     * @throws Exception when the reply (or the error that ended the call) was already taken
     */
    public function poll(): ?Message {}

    /**
     * Waits for the reply, up to what is left of the call's timeout; blocks the thread.
     *
     * @throws TimeoutException when no reply comes within the call's timeout
     * @throws PublishException when no queue took the request (returned, 312 NO_ROUTE)
     * @throws Exception when the reply (or the error that ended the call) was already taken
     */
    public function wait(): Message {}

    /** The correlation_id the reply carries: yours, or the one made for the call. */
    public function getCorrelationId(): string {}

    /** Whether the reply, or the error that ended the call, was handed out. */
    public function isDone(): bool {}
}

/** A delivered message. Settle it once: ack(), nack() or reject(); a second time raises. */
final class Message
{
    /** Messages are made by consumers and Connection::get(). */
    private function __construct() {}

    public function getBody(): string {}

    /**
     * The body decoded as JSON, objects as arrays.
     *
     * @throws Exception when the body is not valid JSON
     */
    public function json(): mixed {}

    /**
     * Publishes $body to this message's reply_to with its correlation_id copied (unless
     * $properties sets one), and waits for the broker to take it. Not mandatory: a reply to a
     * caller that has gone away is dropped by the broker, without an error.
     *
     * @throws Exception when the message has no reply_to
     */
    public function reply(string $body, array $properties = []): void {}

    public function getRoutingKey(): string {}

    public function getExchange(): string {}

    public function getDeliveryTag(): int {}

    public function isRedelivered(): bool {}

    /** Which attempt at handling it this is: 1, then 2 on its first retry (on_error 'retry'). */
    public function getAttempt(): int {}

    /** Null for a message from Connection::get(). */
    public function getConsumerTag(): ?string {}

    /** The properties that are set, keyed as in Producer::publish(). */
    public function getProperties(): array {}

    public function getHeaders(): array {}

    public function getHeader(string $name, mixed $default = null): mixed {}

    public function getContentType(): ?string {}

    public function getMessageId(): ?string {}

    public function getCorrelationId(): ?string {}

    public function getReplyTo(): ?string {}

    public function getPriority(): ?int {}

    public function getTimestamp(): ?int {}

    public function getType(): ?string {}

    public function getAppId(): ?string {}

    public function getExpiration(): ?string {}

    public function getDeliveryMode(): ?int {}

    /** @throws Exception when settled already, or delivered with auto_ack */
    public function ack(): void {}

    /** @throws Exception when settled already, or delivered with auto_ack */
    public function nack(bool $requeue = true): void {}

    /** @throws Exception when settled already, or delivered with auto_ack */
    public function reject(bool $requeue = false): void {}

    public function isSettled(): bool {}
}
