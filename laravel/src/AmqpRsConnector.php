<?php

declare(strict_types=1);

namespace AmqpRs\Laravel;

use Illuminate\Contracts\Events\Dispatcher;
use Illuminate\Queue\Connectors\ConnectorInterface;
use Illuminate\Queue\Events\WorkerStopping;

/** Makes an AmqpRsQueue from a connection of config/queue.php whose driver is 'amqp-rs'. */
class AmqpRsConnector implements ConnectorInterface
{
    public function __construct(private ?Dispatcher $events = null)
    {
    }

    /**
     * @param array{uri?: string|list<string>, queue?: string, exchange?: string,
     *     exchange_type?: string, options?: array, prefetch?: int, block_for?: float|int|null,
     *     queue_arguments?: array, failed_queue?: bool|string|null, after_commit?: bool,
     *     persistent?: bool} $config
     */
    public function connect(array $config)
    {
        $queue = new AmqpRsQueue($config);

        // The worker is leaving: settle what it holds and close the connection, so that the
        // last ack reaches the broker before the process ends (see AmqpRsQueue::workerStopping).
        $this->events?->listen(WorkerStopping::class, function (WorkerStopping $event) use ($queue): void {
            $queue->workerStopping((int) $event->status);
        });

        return $queue;
    }
}
