<?php

declare(strict_types=1);

namespace AmqpRs\Symfony\Messenger\Transport;

use AmqpRs\Message;
use Symfony\Component\Messenger\Envelope;
use Symfony\Component\Messenger\Exception\LogicException;
use Symfony\Component\Messenger\Exception\MessageDecodingFailedException;
use Symfony\Component\Messenger\Stamp\TransportMessageIdStamp;
use Symfony\Component\Messenger\Transport\Receiver\ListableReceiverInterface;
use Symfony\Component\Messenger\Transport\Receiver\MessageCountAwareInterface;
use Symfony\Component\Messenger\Transport\Receiver\QueueReceiverInterface;
use Symfony\Component\Messenger\Transport\Serialization\PhpSerializer;
use Symfony\Component\Messenger\Transport\Serialization\SerializerInterface;

/**
 * Receives envelopes from the transport's queues through push consumers (see Connection):
 * each get() hands the worker one envelope from the prefetch buffer, or waits up to
 * `wait_time` for one. ack() acks; reject() rejects without requeue (Messenger has already
 * sent a retry or a failure-transport copy when it rejects).
 *
 * Listing (messenger:failed:show, messenger:failed:retry <id>) takes the queue's messages with
 * basic.get, unsettled, and puts back all but the one asked for: meant for a failure queue of
 * modest size, each find() reads the queue up to the message.
 */
final class AmqpRsReceiver implements QueueReceiverInterface, MessageCountAwareInterface, ListableReceiverInterface
{
    private readonly SerializerInterface $serializer;

    public function __construct(private readonly Connection $connection, ?SerializerInterface $serializer = null)
    {
        $this->serializer = $serializer ?? new PhpSerializer();
    }

    public function get(): iterable
    {
        return $this->getFromQueues($this->connection->getQueueNames());
    }

    public function getFromQueues(array $queueNames): iterable
    {
        $received = $this->connection->receive(array_values($queueNames));
        if ($received === null) {
            return [];
        }
        [$queue, $message] = $received;
        return [$this->decode($message, $queue)];
    }

    public function ack(Envelope $envelope): void
    {
        $stamp = $this->stamp($envelope);
        $this->connection->ack($stamp->getAmqpMessage(), $stamp->getQueueName());
    }

    public function reject(Envelope $envelope): void
    {
        $stamp = $this->stamp($envelope);
        $this->connection->reject($stamp->getAmqpMessage(), $stamp->getQueueName());
    }

    public function getMessageCount(): int
    {
        return $this->connection->countMessagesInQueues();
    }

    public function all(?int $limit = null): iterable
    {
        $left = $limit ?? PHP_INT_MAX;
        foreach ($this->connection->getQueueNames() as $queue) {
            $messages = $left > 0 ? $this->connection->peek($queue, $left) : [];
            $left -= count($messages);
            try {
                foreach ($messages as $message) {
                    yield $this->decode($message, $queue, false);
                }
            } finally {
                foreach ($messages as $message) {
                    $this->connection->release($message);
                }
            }
        }
    }

    /** The message whose message_id is $id, taken from its queue until acked or rejected. */
    public function find(mixed $id): ?Envelope
    {
        foreach ($this->connection->getQueueNames() as $queue) {
            $found = null;
            foreach ($this->connection->peek($queue, PHP_INT_MAX) as $message) {
                if ($found === null && $message->getMessageId() === (string) $id) {
                    $found = $message;
                } else {
                    $this->connection->release($message);
                }
            }
            if ($found !== null) {
                return $this->decode($found, $queue, false);
            }
        }
        return null;
    }

    /** @param bool $consuming false when listing: an undecodable message is then left in place */
    private function decode(Message $message, string $queue, bool $consuming = true): Envelope
    {
        $headers = $message->getHeaders();
        if (($contentType = $message->getContentType()) !== null) {
            $headers['Content-Type'] ??= $contentType;
        }
        try {
            $envelope = $this->serializer->decode(['body' => $message->getBody(), 'headers' => $headers]);
        } catch (MessageDecodingFailedException $e) {
            // Undecodable: it would fail every time, so a worker rejects it (dead-lettered, if
            // the queue has a dead-letter exchange) rather than requeue it.
            if ($consuming) {
                $this->connection->reject($message, $queue);
            } else {
                $this->connection->release($message);
            }
            throw $e;
        }
        $envelope = $envelope->with(new AmqpRsReceivedStamp($message, $queue));
        if (($id = $message->getMessageId()) !== null) {
            $envelope = $envelope->with(new TransportMessageIdStamp($id));
        }
        return $envelope;
    }

    private function stamp(Envelope $envelope): AmqpRsReceivedStamp
    {
        return $envelope->last(AmqpRsReceivedStamp::class)
            ?? throw new LogicException('No "' . AmqpRsReceivedStamp::class . '" stamp found on the Envelope.');
    }
}
