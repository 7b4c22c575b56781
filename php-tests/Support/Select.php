<?php

declare(strict_types=1);

namespace AmqpRs\Tests\Support;

use PHPUnit\Framework\AssertionFailedError;

/** Plain stream_select() loops over readiness streams (Connection::readiness()), no event loop library. */
final class Select
{
    /** Whether $stream is readable now (a select with a zero timeout). */
    public static function readable($stream): bool
    {
        $read = [$stream];
        $w = $e = null;
        return stream_select($read, $w, $e, 0) === 1;
    }

    /** Waits until $stream is readable; fails naming $what after $timeout seconds. */
    public static function awaitReadable($stream, string $what, float $timeout = 10.0): void
    {
        $deadline = microtime(true) + $timeout;
        while (($left = $deadline - microtime(true)) > 0) {
            $read = [$stream];
            $w = $e = null;
            if (stream_select($read, $w, $e, 0, (int) ceil($left * 1_000_000)) === 1) {
                return;
            }
        }
        throw new AssertionFailedError("not readable within {$timeout} s: $what");
    }

    /**
     * Runs a 10 ms timer and $work in one select loop until $done() is true: the select's
     * timeout schedules the ticks, and $work (which must not block) runs whenever one of
     * $streams is readable, and once at the start. Returns the worst lag of a tick behind its
     * due time (seconds), and the ticks seen; fails once $limit seconds have passed.
     *
     * @param list<resource> $streams
     * @return array{worst: float, ticks: int, wakes: int, elapsed: float}
     */
    public static function withTimer(array $streams, callable $work, callable $done, float $limit, float $interval = 0.01): array
    {
        $start = microtime(true);
        $due = $start + $interval;
        $worst = 0.0;
        $ticks = $wakes = 0;
        $work();
        while (!$done()) {
            $now = microtime(true);
            if ($now - $start > $limit) {
                throw new AssertionFailedError(sprintf('not done within %.0f s (%d ticks, worst lag %.1f ms)', $limit, $ticks, $worst * 1000));
            }
            if ($now >= $due) {
                $worst = max($worst, $now - $due);
                $ticks++;
                // A tick missed by more than one interval is not made up for: its lag counts.
                $due = max($due + $interval, $now);
                continue;
            }
            $read = $streams;
            $w = $e = null;
            if (stream_select($read, $w, $e, 0, (int) ceil(($due - $now) * 1_000_000)) > 0) {
                $wakes++;
                $work();
            }
        }
        return ['worst' => $worst, 'ticks' => $ticks, 'wakes' => $wakes, 'elapsed' => microtime(true) - $start];
    }
}
