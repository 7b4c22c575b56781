<?php

declare(strict_types=1);

namespace AmqpRs\Tests\Support;

use Revolt\EventLoop;

/**
 * Loads Revolt (Debian's php-revolt-event-loop, in the sid root only) and the amqp-rs/revolt
 * package (revolt/src, PSR-4 as its composer.json says) without Composer, for RevoltTest and
 * the child scripts it starts. AMQP_RS_REVOLT_AUTOLOAD points elsewhere (a Revolt checkout).
 */
final class Revolt
{
    private const AUTOLOAD = '/usr/share/php/Revolt/EventLoop/autoload.php';

    /** Why Revolt cannot be loaded here, or null once it and the package are. */
    public static function load(): ?string
    {
        $autoload = getenv('AMQP_RS_REVOLT_AUTOLOAD') ?: self::AUTOLOAD;
        if (!is_file($autoload)) {
            return "Revolt is not installed ($autoload missing: Debian's php-revolt-event-loop, in the sid root that `make matrix` runs)";
        }
        if (!extension_loaded('pcntl')) {
            return 'the pcntl extension is missing (Revolt signal handling)';
        }
        require_once $autoload;
        static $registered = false;
        if (!$registered) {
            $registered = true;
            $package = json_decode((string) file_get_contents(__DIR__ . '/../../revolt/composer.json'), true);
            foreach ($package['autoload']['psr-4'] as $prefix => $path) {
                $dir = __DIR__ . '/../../revolt/' . $path;
                spl_autoload_register(static function (string $class) use ($prefix, $dir): void {
                    if (str_starts_with($class, $prefix)) {
                        $file = $dir . str_replace('\\', '/', substr($class, strlen($prefix))) . '.php';
                        if (is_file($file)) {
                            require $file;
                        }
                    }
                });
            }
        }
        return null;
    }

    /**
     * Runs each task in a fiber of its own on the loop and waits for all of them; returns
     * what each returned or threw, by key. A task still running after $timeout fails the test.
     *
     * @param array<string, \Closure(): mixed> $tasks
     * @return array<string, mixed>
     */
    public static function all(array $tasks, float $timeout = 30.0): array
    {
        $results = [];
        $main = EventLoop::getSuspension();
        foreach ($tasks as $key => $task) {
            EventLoop::queue(static function () use ($key, $task, &$results, $tasks, $main): void {
                try {
                    $results[$key] = $task();
                } catch (\Throwable $e) {
                    $results[$key] = $e;
                }
                if (count($results) === count($tasks)) {
                    $main->resume();
                }
            });
        }
        $guard = EventLoop::delay($timeout, static function () use ($main, $tasks, &$results): void {
            $left = implode(', ', array_diff(array_keys($tasks), array_keys($results)));
            $main->throw(new \PHPUnit\Framework\AssertionFailedError("not done within {$timeout} s (a hang): $left"));
        });
        try {
            $main->suspend();
        } finally {
            EventLoop::cancel($guard);
        }
        return $results;
    }

    /** Suspends the current fiber for $seconds (the loop runs meanwhile). */
    public static function sleep(float $seconds): void
    {
        $suspension = EventLoop::getSuspension();
        EventLoop::delay($seconds, static fn () => $suspension->resume());
        $suspension->suspend();
    }

    /**
     * Runs $work with a 10 ms timer beside it; returns [worst lag in s, ticks, seconds]. The
     * lag is each gap between ticks beyond 10 ms, counting from the start and to the end.
     */
    public static function withTimer(\Closure $work): array
    {
        $start = $last = hrtime(true) / 1e9;
        $worst = 0.0;
        $ticks = 0;
        $timer = EventLoop::repeat(0.01, static function () use (&$last, &$worst, &$ticks): void {
            $now = hrtime(true) / 1e9;
            $worst = max($worst, $now - $last - 0.01);
            $last = $now;
            $ticks++;
        });
        try {
            $work();
        } finally {
            EventLoop::cancel($timer);
        }
        $end = hrtime(true) / 1e9;
        $worst = max($worst, $end - $last - 0.01);
        return [$worst, $ticks, $end - $start];
    }
}
