<?php

declare(strict_types=1);

namespace AmqpRs\Symfony\Messenger\Transport;

use Symfony\Component\Messenger\Exception\LogicException;
use Symfony\Component\Messenger\Transport\Serialization\SerializerInterface;
use Symfony\Component\Messenger\Transport\TransportFactoryInterface;
use Symfony\Component\Messenger\Transport\TransportInterface;

/**
 * Makes amqp-rs transports from `amqp-rs://` and `amqps-rs://` DSNs (see Dsn). Registered by
 * AmqpRsMessengerBundle, or by hand as a service tagged `messenger.transport_factory`.
 */
final class AmqpRsTransportFactory implements TransportFactoryInterface
{
    public function createTransport(#[\SensitiveParameter] string $dsn, array $options, SerializerInterface $serializer): TransportInterface
    {
        if (!extension_loaded('amqp_rs')) {
            throw new LogicException('The amqp-rs transport needs the amqp_rs extension: load it in php.ini (extension=amqp_rs.so; php --ri amqp_rs checks it).');
        }
        return new AmqpRsTransport(Connection::fromDsn($dsn, $options), $serializer);
    }

    public function supports(#[\SensitiveParameter] string $dsn, array $options): bool
    {
        return Dsn::supports($dsn);
    }
}
