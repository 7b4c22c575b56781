<?php

declare(strict_types=1);

namespace AmqpRs\Laravel;

use AmqpRs\ChannelException;
use AmqpRs\Connection;
use AmqpRs\ConnectionException;
use AmqpRs\Consumer;
use AmqpRs\Message;
use AmqpRs\Producer;
use DateInterval;
use DateTimeInterface;
use Illuminate\Contracts\Queue\ClearableQueue;
use Illuminate\Contracts\Queue\Queue as QueueContract;
use Illuminate\Queue\Queue;
use InvalidArgumentException;
use Throwable;

/**
 * Laravel's queue on RabbitMQ through the amqp_rs extension.
 *
 * A job is one persistent message (the JSON payload Laravel builds, content_type
 * application/json, message_id = the job's uuid) in a durable queue named as Laravel names
 * the queue. pop() serves jobs from a consumer's prefetch buffer (one consumer per queue,
 * kept open): the broker pushes up to `prefetch` messages ahead, so taking a job costs no
 * round trip. The job's message is settled when Laravel settles the job: deleted (done) is an
 * ack; released is a new message with attempts + 1 (through a delay queue when there is a
 * delay), confirmed by the broker before the original is acked; failed is a reject (or a
 * copy in the failed queue, see `failed_queue`).
 */
class AmqpRsQueue extends Queue implements QueueContract, ClearableQueue
{
    /** Header with the attempt a message is (what Message::getAttempt() reads). */
    public const ATTEMPT_HEADER = 'x-attempt';

    /** How long pop() waits for messages the broker says are ready but that have not arrived. */
    private const IN_FLIGHT_WAIT = 1.0;
    /** How long pop() waits for a message the broker may have sent on our last ack, first. */
    private const GRACE = 0.05;

    private ?Connection $connection = null;
    private ?Producer $producer = null;
    /** @var array<string, Consumer> by queue name */
    private array $consumers = [];
    /** @var array<string, true> queues declared by this process */
    private array $declared = [];
    private bool $exchangeDeclared = false;
    /** Publishes of a bulk() are confirmed together at its end. */
    private bool $deferConfirms = false;
    /** @var array<int, AmqpRsJob> jobs popped and not settled yet, by object id */
    private array $inHand = [];
    /**
     * @var array<string, true> queues whose consumer may have deliveries on the way: it was
     *     made, or settled a message (which lets the broker send the next), since a pop()
     *     last found it empty
     */
    private array $mayBeInFlight = [];

    /** @var string|list<string> */
    private string|array $uri;
    private array $options;
    private string $default;
    private string $exchange;
    private string $exchangeType;
    private int $prefetch;
    private float $blockFor;
    private array $queueArguments;
    private ?string $failedQueue;
    private float $confirmTimeout;

    public function __construct(array $config)
    {
        $this->uri = $config['uri'] ?? 'amqp://guest:guest@127.0.0.1:5672/%2f';
        if (!is_string($this->uri) && !(is_array($this->uri) && array_is_list($this->uri) && $this->uri !== [])) {
            throw new InvalidArgumentException("amqp-rs queue: 'uri' must be a URI or a list of URIs");
        }
        // Persistent by default: under php-fpm each worker keeps one connection for all the
        // requests it serves instead of a handshake per dispatch (see docs/persistent.md).
        $this->options = ($config['options'] ?? []) + [
            'name' => 'laravel-queue',
            'persistent' => (bool) ($config['persistent'] ?? true),
        ];
        $this->default = (string) ($config['queue'] ?? 'default');
        $this->exchange = (string) ($config['exchange'] ?? '');
        $this->exchangeType = (string) ($config['exchange_type'] ?? 'direct');
        $this->prefetch = (int) ($config['prefetch'] ?? 10);
        $this->blockFor = (float) ($config['block_for'] ?? 0.0);
        $this->queueArguments = (array) ($config['queue_arguments'] ?? []);
        $failed = $config['failed_queue'] ?? null;
        $this->failedQueue = $failed === true ? '{queue}.failed' : (is_string($failed) && $failed !== '' ? $failed : null);
        $this->confirmTimeout = (float) ($config['confirm_timeout'] ?? 30.0);
        $this->dispatchAfterCommit = $config['after_commit'] ?? null;
        if ($this->prefetch < 1) {
            throw new InvalidArgumentException("amqp-rs queue: 'prefetch' must be 1 or more, got {$this->prefetch}");
        }
        if ($this->blockFor < 0) {
            throw new InvalidArgumentException("amqp-rs queue: 'block_for' must be seconds >= 0");
        }
    }

    /** Ready messages of the queue (not those prefetched by workers, nor those still delayed). */
    public function size($queue = null)
    {
        $queue = $this->getQueue($queue);
        $this->declare($queue);
        return $this->getConnection()->queueStatus($queue)['messages'];
    }

    /** Queue contract of newer Laravel (13 has it): the ready messages, as size(). */
    public function pendingSize($queue = null)
    {
        return $this->size($queue);
    }

    /**
     * Queue contract of newer Laravel (13 has it): always 0. Delayed jobs wait in delay queues named per
     * delay, which AMQP 0-9-1 cannot list (RabbitMQ's management API can).
     */
    public function delayedSize($queue = null)
    {
        return 0;
    }

    /**
     * Queue contract of newer Laravel (13 has it): always 0. AMQP 0-9-1 does not report how many messages
     * other workers hold unacked (RabbitMQ's management API does).
     */
    public function reservedSize($queue = null)
    {
        return 0;
    }

    /** Queue contract of newer Laravel (13 has it): null, since AMQP cannot peek at a queue's head without taking it. */
    public function creationTimeOfOldestPendingJob($queue = null)
    {
        return null;
    }

    public function push($job, $data = '', $queue = null)
    {
        $queue = $this->getQueue($queue);
        return $this->enqueueUsing(
            $job,
            $this->createPayload($job, $queue, $data),
            $queue,
            null,
            fn ($payload, $queue) => $this->pushRaw($payload, $queue)
        );
    }

    /**
     * @param array{delay?: DateTimeInterface|DateInterval|int|float, headers?: array} $options
     *     delay in seconds (as later()), extra AMQP headers
     * @return string|null the job's uuid
     */
    public function pushRaw($payload, $queue = null, array $options = [])
    {
        $queue = $this->getQueue($queue);
        $decoded = json_decode($payload, true);
        $uuid = is_array($decoded) ? ($decoded['uuid'] ?? null) : null;
        $this->declare($queue);
        $properties = $this->properties(is_string($uuid) ? $uuid : null, $options['headers'] ?? []);
        $delay = isset($options['delay']) ? $this->delayMilliseconds($options['delay']) : 0;
        if ($delay > 0) {
            $properties['delay'] = $delay;
        }
        try {
            $this->producer()->publish($payload, $queue, $this->exchange, $properties);
            if (!$this->deferConfirms) {
                $this->producer()->waitForConfirms($this->confirmTimeout);
            }
        } catch (ConnectionException $e) {
            $this->forgetConnection();
            throw $e;
        }
        return $uuid;
    }

    public function later($delay, $job, $data = '', $queue = null)
    {
        $queue = $this->getQueue($queue);
        return $this->enqueueUsing(
            $job,
            $this->createPayload($job, $queue, $data),
            $queue,
            $delay,
            fn ($payload, $queue, $delay) => $this->pushRaw($payload, $queue, ['delay' => $delay])
        );
    }

    /** Publishes every job, then waits once for the broker's confirms. */
    public function bulk($jobs, $data = '', $queue = null)
    {
        $this->deferConfirms = true;
        try {
            parent::bulk($jobs, $data, $queue);
        } finally {
            $this->deferConfirms = false;
        }
        $this->producer()->waitForConfirms($this->confirmTimeout);
    }

    /**
     * The next job of the queue from its consumer's prefetch buffer; null when none.
     *
     * Waits up to `block_for` seconds for one. Then, so that null means the queue is empty
     * (`--stop-when-empty`), if deliveries may be on their way (the consumer is new, or
     * settled a message since it was last found empty), it waits for them and asks the
     * broker whether any are ready (see awaitInFlight()). A queue found empty and untouched
     * since costs no wait and no round trip, so the empty queues of `--queue=high,low` do not
     * slow the others down.
     */
    public function pop($queue = null)
    {
        $queue = $this->getQueue($queue);
        $consumer = $this->consumer($queue);
        try {
            $message = $consumer->next(0.0);
            if ($message === null && $this->blockFor > 0) {
                $message = $consumer->next($this->blockFor);
            }
            if ($message === null && isset($this->mayBeInFlight[$queue])) {
                $message = $this->awaitInFlight($consumer, $queue);
            }
        } catch (ChannelException $e) {
            // The broker cancelled the consumer (e.g. its queue was deleted): start afresh.
            unset($this->consumers[$queue], $this->declared[$queue]);
            throw $e;
        } catch (ConnectionException $e) {
            // Lost for good (the extension's own recovery gave up): the worker reports it,
            // sleeps a second and pops again, which connects afresh.
            $this->forgetConnection();
            throw $e;
        }
        if ($message === null) {
            unset($this->mayBeInFlight[$queue]);
            return null;
        }
        $job = new AmqpRsJob($this->container, $this, $message, $this->connectionName, $queue);
        $this->inHand[spl_object_id($job)] = $job;
        return $job;
    }

    /**
     * With no job buffered although deliveries may be on their way: a message the broker sent
     * on our last ack (or to a new consumer) has left the queue's ready count but not arrived
     * yet. Waits a short grace (50 ms) for one; then asks the broker how many are ready: if
     * some are (a burst faster than the broker refills the buffer), waits for them, up to a
     * second; if none, waits three times the round trip just measured, for a far broker.
     */
    private function awaitInFlight(Consumer $consumer, string $queue): ?Message
    {
        $message = $consumer->next(self::GRACE);
        if ($message !== null) {
            return $message;
        }
        $asked = hrtime(true);
        if ($this->getConnection()->queueStatus($queue)['messages'] > 0) {
            return $consumer->next(self::IN_FLIGHT_WAIT);
        }
        $roundTrip = (hrtime(true) - $asked) / 1e9;
        return $consumer->next(min(self::IN_FLIGHT_WAIT, 3 * $roundTrip));
    }

    /** Removes the queue's ready messages; returns how many. */
    public function clear($queue)
    {
        $queue = $this->getQueue($queue);
        $this->declare($queue);
        return $this->getConnection()->purgeQueue($queue);
    }

    /** The queue name to use: the given one (a string, or an enum as newer Laravel allows), or the default. */
    public function getQueue($queue)
    {
        if ($queue instanceof \UnitEnum) {
            $queue = $queue instanceof \BackedEnum ? $queue->value : $queue->name;
        }
        return $queue === null || $queue === '' ? $this->default : (string) $queue;
    }

    /** The extension's connection, opened on first use (and again after the worker stopped). */
    public function getConnection(): Connection
    {
        return $this->connection ??= new Connection($this->uri, $this->options);
    }

    /** A job is done: ack its message. */
    public function ack(AmqpRsJob $job): void
    {
        $this->settle($job, fn (Message $m) => $m->ack());
    }

    /**
     * Puts the job back after $delay seconds as a new message with attempts + 1, confirmed
     * by the broker before the original is acked (a crash in between delivers it twice
     * rather than never).
     */
    public function release(AmqpRsJob $job, mixed $delay = 0): void
    {
        $this->settle($job, function (Message $m) use ($job, $delay): void {
            $attempts = $job->attempts();
            $payload = $job->payload();
            $payload['attempts'] = $attempts;
            $properties = $this->properties($job->getJobId(), [self::ATTEMPT_HEADER => $attempts + 1] + $m->getHeaders());
            $ms = $this->delayMilliseconds($delay);
            if ($ms > 0) {
                $properties['delay'] = $ms;
            }
            $this->declare($job->getQueue());
            $this->producer()->publish($this->encode($payload), $job->getQueue(), '', $properties);
            $this->producer()->waitForConfirms($this->confirmTimeout);
            $m->ack();
        });
    }

    /**
     * Laravel gave up on the job (failed(), its tries spent, a timeout): rejected without
     * requeue, so the broker dead-letters it if the queue has a dead-letter exchange, or, with
     * `failed_queue`, copied there (headers x-failure-reason, x-failed-queue, x-attempt) and
     * acked. Laravel's own record of it is the failed-jobs table (queue:failed, queue:retry).
     */
    public function fail(AmqpRsJob $job, ?Throwable $e): void
    {
        $this->settle($job, function (Message $m) use ($job, $e): void {
            if ($this->failedQueue === null) {
                $m->reject(false);
                return;
            }
            $target = str_replace('{queue}', $job->getQueue(), $this->failedQueue);
            $reason = $e === null ? 'marked as failed' : get_class($e) . ': ' . $e->getMessage();
            $headers = [
                'x-failure-reason' => mb_strcut($reason, 0, 2000, 'UTF-8'),
                'x-failed-queue' => $job->getQueue(),
                self::ATTEMPT_HEADER => $job->attempts(),
            ] + $m->getHeaders();
            $this->declare($target, false);
            $this->producer()->publish($m->getBody(), $target, '', $this->properties($job->getJobId(), $headers));
            $this->producer()->waitForConfirms($this->confirmTimeout);
            $m->ack();
        });
    }

    /**
     * The worker is stopping. A job still in hand was interrupted (Laravel's --timeout kills
     * the worker right after this event): it goes back with attempts + 1, as Laravel's other
     * drivers count an attempt when a job is reserved. Then the connection is closed, which
     * makes sure the last acks are written before the process ends; the next use reconnects.
     */
    public function workerStopping(int $status): void
    {
        try {
            foreach ($this->inHand as $job) {
                if (!$job->isSettling()) {
                    $job->release(0);
                }
            }
        } finally {
            $this->disconnect();
        }
    }

    /** Closes the connection (waiting for outstanding confirms and acks); reopened on next use. */
    public function disconnect(): void
    {
        $connection = $this->connection;
        $this->forgetConnection();
        $connection?->close();
    }

    /** Drops the connection and what lives on it; the next use connects afresh. */
    private function forgetConnection(): void
    {
        $this->connection = $this->producer = null;
        $this->consumers = $this->declared = $this->inHand = $this->mayBeInFlight = [];
        $this->exchangeDeclared = false;
    }

    private function settle(AmqpRsJob $job, callable $how): void
    {
        $message = $job->getAmqpMessage();
        if (!$job->startSettling() || $message->isSettled()) {
            return;
        }
        try {
            $how($message);
        } finally {
            unset($this->inHand[spl_object_id($job)]);
            $this->mayBeInFlight[$job->getQueue()] = true;
        }
    }

    /** Declares the queue (durable, `queue_arguments`) once per process; binds it to `exchange`. */
    private function declare(string $queue, bool $bind = true): void
    {
        if (isset($this->declared[$queue])) {
            return;
        }
        $connection = $this->getConnection();
        $options = ['durable' => true];
        if ($this->queueArguments !== []) {
            $options['arguments'] = $this->queueArguments;
        }
        $connection->declareQueue($queue, $bind ? $options : ['durable' => true]);
        if ($bind && $this->exchange !== '') {
            if (!$this->exchangeDeclared) {
                $connection->declareExchange($this->exchange, $this->exchangeType, ['durable' => true]);
                $this->exchangeDeclared = true;
            }
            $connection->bindQueue($queue, $this->exchange, $queue);
        }
        $this->declared[$queue] = true;
    }

    private function consumer(string $queue): Consumer
    {
        if (!isset($this->consumers[$queue])) {
            $this->declare($queue);
            $this->consumers[$queue] = $this->getConnection()->consumer($queue, ['prefetch' => $this->prefetch]);
            $this->mayBeInFlight[$queue] = true;
        }
        return $this->consumers[$queue];
    }

    private function producer(): Producer
    {
        // mandatory: a job no queue is bound for (a custom exchange) is an error, not lost.
        return $this->producer ??= $this->getConnection()->producer(['mandatory' => true]);
    }

    private function properties(?string $messageId, array $headers): array
    {
        $properties = ['content_type' => 'application/json', 'delivery_mode' => 2];
        if ($messageId !== null && $messageId !== '') {
            $properties['message_id'] = $messageId;
        }
        if ($headers !== []) {
            $properties['headers'] = $headers;
        }
        return $properties;
    }

    /**
     * A delay as Laravel gives it (seconds, or a date) in milliseconds. Dates are rounded to
     * whole seconds, like Laravel's own drivers: each distinct delay is a delay queue of its own.
     */
    private function delayMilliseconds(mixed $delay): int
    {
        if ($delay instanceof DateTimeInterface || $delay instanceof DateInterval) {
            return 1000 * $this->secondsUntil($delay);
        }
        if ($delay === null || is_numeric($delay)) {
            return max(0, (int) round((float) $delay * 1000));
        }
        throw new InvalidArgumentException('amqp-rs queue: a delay is seconds or a date, got ' . get_debug_type($delay));
    }

    private function encode(array $payload): string
    {
        return json_encode($payload, \JSON_UNESCAPED_UNICODE | \JSON_THROW_ON_ERROR);
    }

    protected function createPayloadArray($job, $queue, $data = '')
    {
        // As Laravel's Redis driver: the attempts made so far travel in the payload, which
        // queue:retry resets to 0.
        return array_merge(parent::createPayloadArray($job, $queue, $data), ['attempts' => 0]);
    }
}
