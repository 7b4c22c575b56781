<?php

declare(strict_types=1);

namespace AmqpRs\Revolt\Internal;

use Revolt\EventLoop\Suspension;

/**
 * One suspended call of a Client: what to take when the readiness stream says something may
 * have come, and the fiber to resume with it.
 *
 * @internal
 */
final class Waiter
{
    /** The callback id of its timeout (EventLoop::delay), if it has one. */
    public ?string $timer = null;

    /**
     * @param \Closure(): mixed $take a take that does not wait: null for "not yet", anything
     *     else is what the suspended call returns; what it throws is thrown into the fiber
     */
    public function __construct(
        public readonly \Closure $take,
        public readonly Suspension $suspension,
    ) {
    }
}
