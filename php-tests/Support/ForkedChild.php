<?php

declare(strict_types=1);

namespace AmqpRs\Tests\Support;

/** Runs a callable in a pcntl_fork() child, for tests of what a child may do with its parent's objects. */
trait ForkedChild
{
    /** Runs $child in a forked process; returns its exit status (0 = it returned true). */
    private function inChild(callable $child): int
    {
        $pid = pcntl_fork();
        $this->assertNotSame(-1, $pid, 'fork failed');
        if ($pid === 0) {
            $code = 70;
            try {
                $code = $child() ? 0 : 1;
            } catch (\Throwable $e) {
                fwrite(STDERR, 'child: ' . get_class($e) . ': ' . $e->getMessage() . "\n");
                $code = 2;
            }
            // End without PHPUnit's shutdown handlers, which belong to the parent: SIGUSR1 says
            // success, SIGKILL failure.
            posix_kill(getmypid(), $code === 0 ? SIGUSR1 : SIGKILL);
            exit($code);
        }
        $alarm = time() + 30;
        while (pcntl_waitpid($pid, $status, WNOHANG) === 0) {
            if (time() > $alarm) {
                posix_kill($pid, SIGKILL);
                $this->fail('child hung');
            }
            usleep(20_000);
        }
        if (pcntl_wifsignaled($status)) {
            return pcntl_wtermsig($status) === SIGUSR1 ? 0 : 100 + pcntl_wtermsig($status);
        }
        return pcntl_wexitstatus($status);
    }
}
