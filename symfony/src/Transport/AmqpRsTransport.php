<?php

declare(strict_types=1);

namespace AmqpRs\Symfony\Messenger\Transport;

use Symfony\Component\Messenger\Envelope;
use Symfony\Component\Messenger\Transport\Receiver\ListableReceiverInterface;
use Symfony\Component\Messenger\Transport\Receiver\MessageCountAwareInterface;
use Symfony\Component\Messenger\Transport\Receiver\QueueReceiverInterface;
use Symfony\Component\Messenger\Transport\Serialization\PhpSerializer;
use Symfony\Component\Messenger\Transport\Serialization\SerializerInterface;
use Symfony\Component\Messenger\Transport\SetupableTransportInterface;
use Symfony\Component\Messenger\Transport\TransportInterface;

/**
 * The amqp-rs transport: what Symfony's AMQP transport is (sender, receiver with queues,
 * setup, message count, closeable on Messenger 7.3+), on the amqp_rs extension, and listable
 * so that it can serve as the failure transport too.
 */
final class AmqpRsTransport implements QueueReceiverInterface, TransportInterface, SetupableTransportInterface, CloseableTransport, MessageCountAwareInterface, ListableReceiverInterface
{
    private readonly SerializerInterface $serializer;
    private ?AmqpRsReceiver $receiver = null;
    private ?AmqpRsSender $sender = null;

    public function __construct(private readonly Connection $connection, ?SerializerInterface $serializer = null)
    {
        $this->serializer = $serializer ?? new PhpSerializer();
    }

    public function get(): iterable
    {
        return $this->receiver()->get();
    }

    public function getFromQueues(array $queueNames): iterable
    {
        return $this->receiver()->getFromQueues($queueNames);
    }

    public function ack(Envelope $envelope): void
    {
        $this->receiver()->ack($envelope);
    }

    public function reject(Envelope $envelope): void
    {
        $this->receiver()->reject($envelope);
    }

    public function send(Envelope $envelope): Envelope
    {
        return ($this->sender ??= new AmqpRsSender($this->connection, $this->serializer))->send($envelope);
    }

    public function setup(): void
    {
        $this->connection->setup();
    }

    public function getMessageCount(): int
    {
        return $this->receiver()->getMessageCount();
    }

    public function all(?int $limit = null): iterable
    {
        return $this->receiver()->all($limit);
    }

    public function find(mixed $id): ?Envelope
    {
        return $this->receiver()->find($id);
    }

    /** Closes the connection (reopened on next use). */
    public function close(): void
    {
        $this->connection->close();
    }

    private function receiver(): AmqpRsReceiver
    {
        return $this->receiver ??= new AmqpRsReceiver($this->connection, $this->serializer);
    }
}
