<?php

declare(strict_types=1);

namespace AmqpRs\Symfony\Messenger\Transport;

use Symfony\Component\Messenger\Stamp\NonSendableStampInterface;

/**
 * How to publish a message: its routing key and AMQP properties (keys as in
 * AmqpRs\Producer::publish(): content_type, headers, priority, correlation_id, reply_to,
 * expiration, message_id, type, app_id, ...).
 *
 *     $bus->dispatch($message, [new AmqpRsStamp('orders.created', ['priority' => 5])]);
 *
 * Symfony's own AmqpStamp is read as well (its routing key and attributes; flags are ignored),
 * so that code written for the AMQP transport keeps working.
 */
final class AmqpRsStamp implements NonSendableStampInterface
{
    public function __construct(private readonly ?string $routingKey = null, private readonly array $attributes = [])
    {
    }

    public function getRoutingKey(): ?string
    {
        return $this->routingKey;
    }

    public function getAttributes(): array
    {
        return $this->attributes;
    }

    /** A stamp with $attributes added to (and replacing) those of $previous. */
    public static function createWithAttributes(array $attributes, ?self $previous = null): self
    {
        return new self($previous?->routingKey, array_merge($previous?->attributes ?? [], $attributes));
    }
}
