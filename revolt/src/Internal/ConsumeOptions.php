<?php

declare(strict_types=1);

namespace AmqpRs\Revolt\Internal;

/**
 * Client::consume()'s options, checked as Consumer::consume() checks its own.
 *
 * @internal
 */
final class ConsumeOptions
{
    /**
     * @param list<int> $stopSignals
     */
    private function __construct(
        public readonly int $maxMessages,
        public readonly ?float $maxTime,
        public readonly ?float $idleTimeout,
        public readonly string $onError,
        public readonly array $stopSignals,
    ) {
    }

    /** @throws \InvalidArgumentException for an unknown option or a bad value */
    public static function parse(array $options): self
    {
        $known = ['max_messages', 'max_time', 'idle_timeout', 'on_error', 'stop_signals'];
        foreach (array_keys($options) as $key) {
            if (!in_array($key, $known, true)) {
                throw new \InvalidArgumentException(sprintf(
                    "AmqpRs\\Revolt\\Client::consume(): unknown option '%s' (known: %s)",
                    $key,
                    implode(', ', $known),
                ));
            }
        }
        $max = $options['max_messages'] ?? 0;
        if (!is_int($max) || $max < 0) {
            throw new \InvalidArgumentException('AmqpRs\Revolt\Client::consume(): max_messages must be an int >= 0');
        }
        $onError = $options['on_error'] ?? 'requeue';
        if ($onError !== 'requeue' && $onError !== 'reject') {
            throw new \InvalidArgumentException("AmqpRs\\Revolt\\Client::consume(): on_error must be 'requeue' or 'reject' ('retry' needs Consumer::consume())");
        }
        $default = defined('SIGTERM') ? [SIGTERM, SIGINT] : [];
        $signals = $options['stop_signals'] ?? $default;
        if (!is_array($signals) || !array_is_list($signals) || array_filter($signals, fn ($s) => !is_int($s) || $s <= 0)) {
            throw new \InvalidArgumentException('AmqpRs\Revolt\Client::consume(): stop_signals must be a list of signal numbers');
        }
        return new self($max, self::seconds($options, 'max_time'), self::seconds($options, 'idle_timeout'), $onError, $signals);
    }

    /** Seconds left before max_time or idle_timeout runs out, or null when neither is set. */
    public function waitLeft(float $started, float $lastActivity): ?float
    {
        $now = hrtime(true) / 1e9;
        $left = null;
        if ($this->maxTime !== null) {
            $left = $this->maxTime - ($now - $started);
        }
        if ($this->idleTimeout !== null) {
            $idle = $this->idleTimeout - ($now - $lastActivity);
            $left = $left === null ? $idle : min($left, $idle);
        }
        return $left;
    }

    private static function seconds(array $options, string $key): ?float
    {
        $value = $options[$key] ?? null;
        if ($value === null) {
            return null;
        }
        if (!is_int($value) && !is_float($value) || !is_finite((float) $value) || $value <= 0) {
            throw new \InvalidArgumentException("AmqpRs\\Revolt\\Client::consume(): $key must be a number of seconds > 0");
        }
        return (float) $value;
    }
}
