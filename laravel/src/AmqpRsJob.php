<?php

declare(strict_types=1);

namespace AmqpRs\Laravel;

use AmqpRs\Message;
use Illuminate\Container\Container;
use Illuminate\Contracts\Queue\Job as JobContract;
use Illuminate\Queue\Jobs\Job;

/** A job popped from RabbitMQ: its message stays unsettled until Laravel settles the job. */
class AmqpRsJob extends Job implements JobContract
{
    private array $decoded;
    private ?\Throwable $failure = null;
    private bool $settling = false;

    public function __construct(
        Container $container,
        private AmqpRsQueue $amqp,
        private Message $message,
        ?string $connectionName,
        string $queue
    ) {
        $this->container = $container;
        $this->connectionName = $connectionName;
        $this->queue = $queue;
        $decoded = json_decode($message->getBody(), true);
        $this->decoded = is_array($decoded) ? $decoded : [];
    }

    public function getRawBody()
    {
        return $this->message->getBody();
    }

    /** The decoded payload (decoded once). */
    public function payload()
    {
        return $this->decoded;
    }

    /** The message_id (the job's uuid), else the payload's uuid or id. */
    public function getJobId()
    {
        return $this->message->getMessageId() ?? $this->decoded['uuid'] ?? $this->decoded['id'] ?? null;
    }

    /**
     * Which attempt this is: the payload's attempts (those made before) + 1, or, for a message
     * not made by this driver, its x-attempt header (1 when absent).
     */
    public function attempts()
    {
        if (isset($this->decoded['attempts']) && is_numeric($this->decoded['attempts'])) {
            return (int) $this->decoded['attempts'] + 1;
        }
        return $this->message->getAttempt();
    }

    /** Done, or given up on (fail() deletes the job): acked, or handled as a failure. */
    public function delete()
    {
        parent::delete();
        if ($this->hasFailed()) {
            $this->amqp->fail($this, $this->failure);
        } else {
            $this->amqp->ack($this);
        }
    }

    /** @param int $delay seconds */
    public function release($delay = 0)
    {
        parent::release($delay);
        $this->amqp->release($this, $delay);
    }

    public function fail($e = null)
    {
        $this->failure = $e;
        parent::fail($e);
    }

    /** The delivery this job came in. */
    public function getAmqpMessage(): Message
    {
        return $this->message;
    }

    public function getAmqpRsQueue(): AmqpRsQueue
    {
        return $this->amqp;
    }

    /** @internal marks the job as being settled; false when it was already. */
    public function startSettling(): bool
    {
        if ($this->settling) {
            return false;
        }
        return $this->settling = true;
    }

    /** @internal */
    public function isSettling(): bool
    {
        return $this->settling;
    }
}
