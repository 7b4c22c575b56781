<?php

declare(strict_types=1);

namespace AmqpRs\Tests\Support;

/**
 * A queue worker of a framework's test app (queue:work, messenger:consume) run in the
 * background by a test, its output in $this->work/worker.out and .err. The using test has a
 * `$proc` property (the worker's proc handle, ended in its tearDown), a `$work` directory and
 * an `env()` method giving the worker's environment.
 */
trait BackgroundWorker
{
    /** Starts $command in the background; returns its pid. */
    private function startBackground(array $command): int
    {
        $this->proc = proc_open(
            $command,
            [1 => ['file', "$this->work/worker.out", 'w'], 2 => ['file', "$this->work/worker.err", 'w']],
            $pipes,
            null,
            $this->env()
        );
        $this->assertIsResource($this->proc);
        return proc_get_status($this->proc)['pid'];
    }

    /** The exit code of the background worker, once it exits within $timeout seconds. */
    private function waitForExit(float $timeout): int
    {
        $deadline = microtime(true) + $timeout;
        while (microtime(true) < $deadline) {
            $status = proc_get_status($this->proc);
            if (!$status['running']) {
                return $status['signaled'] ? 128 + $status['termsig'] : $status['exitcode'];
            }
            usleep(20_000);
        }
        $this->fail(sprintf("the worker still runs after %.1f s\n%s", $timeout, $this->workerOutput()));
    }

    /** Polls $condition to a deadline; fails naming $what, with the worker's output. */
    private function waitFor(callable $condition, float $timeout, string $what): void
    {
        $deadline = microtime(true) + $timeout;
        while (!$condition()) {
            if (microtime(true) > $deadline) {
                $this->fail("waited $timeout s for: $what\n" . $this->workerOutput());
            }
            usleep(20_000);
        }
    }

    private function workerOutput(): string
    {
        return @file_get_contents("$this->work/worker.out") . @file_get_contents("$this->work/worker.err");
    }
}
