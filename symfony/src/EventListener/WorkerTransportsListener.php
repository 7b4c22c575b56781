<?php

declare(strict_types=1);

namespace AmqpRs\Symfony\Messenger\EventListener;

use AmqpRs\Symfony\Messenger\Transport\AmqpRsTransport;
use AmqpRs\Symfony\Messenger\Transport\Connection;
use Psr\Container\ContainerInterface;
use Symfony\Component\EventDispatcher\EventSubscriberInterface;
use Symfony\Component\Messenger\Event\WorkerStartedEvent;

/**
 * Tells the amqp-rs transports whether they may wait for deliveries in get().
 *
 * Messenger's worker asks its receivers in turn. An amqp-rs receiver that waits up to
 * `wait_time` for a delivery would hold up, every round, a transport of another kind consumed
 * by the same worker (`messenger:consume amqp_high doctrine_low`); amqp-rs transports among
 * themselves look into each other's buffers while they wait (see Connection::receive()). So in
 * a worker whose transports are not all amqp-rs, get() does not wait: it serves what is
 * buffered, and the worker's --sleep paces an idle worker, as with the other transports.
 */
final class WorkerTransportsListener implements EventSubscriberInterface
{
    public function __construct(private readonly ContainerInterface $receivers)
    {
    }

    public static function getSubscribedEvents(): array
    {
        return [WorkerStartedEvent::class => 'onWorkerStarted'];
    }

    public function onWorkerStarted(WorkerStartedEvent $event): void
    {
        $onlyOurs = true;
        foreach ($event->getWorker()->getMetadata()->getTransportNames() as $name) {
            if ($this->receivers->has($name) && !$this->receivers->get($name) instanceof AmqpRsTransport) {
                $onlyOurs = false;
            }
        }
        Connection::waitForDeliveries($onlyOurs);
    }
}
