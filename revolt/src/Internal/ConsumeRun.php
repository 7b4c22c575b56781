<?php

declare(strict_types=1);

namespace AmqpRs\Revolt\Internal;

/**
 * One Client::consume() in progress: whether it was asked to stop, and the waiter it is
 * suspended in while no delivery is there (so that a stop ends the wait at once).
 *
 * @internal
 */
final class ConsumeRun
{
    public bool $stopped = false;
    public ?int $waiter = null;
}
