<?php

declare(strict_types=1);

namespace AmqpRs\Symfony\Messenger\Transport;

use Symfony\Component\Messenger\Envelope;
use Symfony\Component\Messenger\Stamp\DelayStamp;
use Symfony\Component\Messenger\Stamp\RedeliveryStamp;
use Symfony\Component\Messenger\Stamp\TransportMessageIdStamp;
use Symfony\Component\Messenger\Transport\Sender\SenderInterface;
use Symfony\Component\Messenger\Transport\Serialization\PhpSerializer;
use Symfony\Component\Messenger\Transport\Serialization\SerializerInterface;

/**
 * Sends envelopes as persistent messages and returns once the broker has confirmed them.
 *
 * A message gets a message_id (kept from the message it was received as, else a new one; its
 * TransportMessageIdStamp, and what messenger:failed:show lists), a timestamp, and the
 * serializer's headers. A retry (a RedeliveryStamp on an envelope received from one of this
 * transport's queues) goes back to that queue only, after its delay; a message sent with a
 * DelayStamp waits in a delay queue of the extension (TTL + dead-letter), not in the worker.
 */
final class AmqpRsSender implements SenderInterface
{
    /** Symfony's own stamp, honoured when present (without requiring its package). */
    private const SYMFONY_AMQP_STAMP = 'Symfony\Component\Messenger\Bridge\Amqp\Transport\AmqpStamp';
    /** Headers the broker adds when it dead-letters, not carried over to a new message. */
    private const BROKER_HEADERS = '/^x-(death|first-death-|last-death-)/';

    private readonly SerializerInterface $serializer;

    public function __construct(private readonly Connection $connection, ?SerializerInterface $serializer = null)
    {
        $this->serializer = $serializer ?? new PhpSerializer();
    }

    public function send(Envelope $envelope): Envelope
    {
        $encoded = $this->serializer->encode($envelope);
        $headers = $encoded['headers'] ?? [];
        $delay = $envelope->last(DelayStamp::class)?->getDelay() ?? 0;

        $stamp = $envelope->last(AmqpRsStamp::class) ?? $envelope->last(self::SYMFONY_AMQP_STAMP);
        $routingKey = $stamp?->getRoutingKey();
        $properties = $stamp?->getAttributes() ?? [];
        $properties['headers'] = (array) ($properties['headers'] ?? []);
        if (isset($headers['Content-Type'])) {
            $properties['content_type'] ??= $headers['Content-Type'];
            unset($headers['Content-Type']);
        }

        $retryQueue = null;
        $received = $envelope->last(AmqpRsReceivedStamp::class);
        if ($received instanceof AmqpRsReceivedStamp) {
            // Keep what the message was received with (ids, priority, the user's headers).
            $message = $received->getAmqpMessage();
            $previous = $message->getProperties();
            $previousHeaders = array_filter($message->getHeaders(), fn ($k) => !preg_match(self::BROKER_HEADERS, (string) $k), ARRAY_FILTER_USE_KEY);
            // user_id must be the publishing connection's user (else 406): not carried over.
            unset($previous['headers'], $previous['user_id']);
            $properties += $previous;
            $properties['headers'] += $previousHeaders;
            if ($envelope->last(RedeliveryStamp::class) !== null && in_array($received->getQueueName(), $this->connection->getQueueNames(), true)) {
                $retryQueue = $received->getQueueName();
            }
        }
        $properties['headers'] = array_merge($properties['headers'], $headers);
        if ($properties['headers'] === []) {
            unset($properties['headers']);
        }
        $properties['delivery_mode'] ??= 2;
        $properties['timestamp'] ??= time();
        $properties['message_id'] ??= self::newId();
        $properties = array_filter($properties, fn ($v) => $v !== null);

        $this->connection->publish($encoded['body'], $properties, $routingKey, max(0, (int) $delay), $retryQueue);

        return $envelope->with(new TransportMessageIdStamp($properties['message_id']));
    }

    /** A random UUID (version 4). */
    private static function newId(): string
    {
        $b = random_bytes(16);
        $b[6] = chr(ord($b[6]) & 0x0f | 0x40);
        $b[8] = chr(ord($b[8]) & 0x3f | 0x80);
        return vsprintf('%s%s-%s-%s-%s-%s%s%s', str_split(bin2hex($b), 4));
    }
}
