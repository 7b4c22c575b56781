<?php

declare(strict_types=1);

namespace AmqpRs\Symfony\Messenger;

use AmqpRs\Symfony\Messenger\EventListener\WorkerTransportsListener;
use AmqpRs\Symfony\Messenger\Transport\AmqpRsTransportFactory;
use Symfony\Component\DependencyInjection\ContainerBuilder;
use Symfony\Component\DependencyInjection\Definition;
use Symfony\Component\DependencyInjection\Reference;
use Symfony\Component\HttpKernel\Bundle\Bundle;

/**
 * Registers the amqp-rs transport factory with Messenger, so that a transport's DSN in
 * messenger.yaml can be `amqp-rs://...`, and WorkerTransportsListener, so that a worker mixing
 * amqp-rs with other transports is not held up by amqp-rs's waits. Add it to
 * config/bundles.php:
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
        $container->setDefinition('amqp_rs.messenger.worker_transports_listener', (new Definition(WorkerTransportsListener::class))
            ->setPublic(false)
            ->setArguments([new Reference('messenger.receiver_locator')])
            ->addTag('kernel.event_subscriber'));
    }
}
