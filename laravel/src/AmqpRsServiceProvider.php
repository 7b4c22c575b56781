<?php

declare(strict_types=1);

namespace AmqpRs\Laravel;

use Illuminate\Queue\QueueManager;
use Illuminate\Support\ServiceProvider;

/**
 * Registers the `amqp-rs` queue driver. Found by Laravel's package discovery
 * (composer.json, extra.laravel.providers), or listed in config/app.php's providers.
 */
class AmqpRsServiceProvider extends ServiceProvider
{
    /** The driver name to put in config/queue.php. */
    public const DRIVER = 'amqp-rs';

    public function register()
    {
        // Lazily: the queue manager is made when something first queues or works a job.
        $this->app->afterResolving('queue', function (QueueManager $manager): void {
            $this->addConnector($manager);
        });
        if ($this->app->resolved('queue')) {
            $this->addConnector($this->app->make('queue'));
        }
    }

    private function addConnector(QueueManager $manager): void
    {
        $manager->addConnector(self::DRIVER, function () {
            return new AmqpRsConnector(
                $this->app->bound('events') ? $this->app->make('events') : null
            );
        });
    }
}
