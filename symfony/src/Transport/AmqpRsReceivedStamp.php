<?php

declare(strict_types=1);

namespace AmqpRs\Symfony\Messenger\Transport;

use AmqpRs\Message;
use Symfony\Component\Messenger\Stamp\NonSendableStampInterface;

/**
 * The delivery a received envelope came from: the AmqpRs\Message (routing key, exchange,
 * properties, headers, redelivered flag, delivery tag) and the queue it was consumed from.
 */
final class AmqpRsReceivedStamp implements NonSendableStampInterface
{
    public function __construct(private readonly Message $message, private readonly string $queueName)
    {
    }

    public function getAmqpMessage(): Message
    {
        return $this->message;
    }

    public function getQueueName(): string
    {
        return $this->queueName;
    }
}
