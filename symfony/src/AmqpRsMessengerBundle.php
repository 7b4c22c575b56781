<?php

declare(strict_types=1);

namespace AmqpRs\Symfony\Messenger;

use AmqpRs\Symfony\Messenger\Transport\AmqpRsTransportFactory;
use Symfony\Component\DependencyInjection\ContainerBuilder;
use Symfony\Component\DependencyInjection\Definition;
use Symfony\Component\HttpKernel\Bundle\Bundle;

/**
 * Registers the amqp-rs transport factory with Messenger, so that a transport's DSN in
 * messenger.yaml can be `amqp-rs://...`. Add it to config/bundles.php:
 *
 *     AmqpRs\Symfony\Messenger\AmqpRsMessengerBundle::class => ['all' => true],
 */
final class AmqpRsMessengerBundle extends Bundle
{
    public function build(ContainerBuilder $container): void
    {
        $container->setDefinition('amqp_rs.messenger.transport_factory', (new Definition(AmqpRsTransportFactory::class))
            ->setPublic(false)
            ->addTag('messenger.transport_factory'));
    }
}
