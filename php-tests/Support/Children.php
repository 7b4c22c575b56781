<?php

declare(strict_types=1);

namespace AmqpRs\Tests\Support;

/** The child processes a test starts (workers, servers, examples), ended the same way everywhere. */
final class Children
{
    /**
     * Ends $proc: sends $signal if it still runs, waits up to $grace seconds for it to exit
     * (a worker given SIGTERM finishes the message in hand), then SIGKILLs it. Returns what it
     * wrote to the pipes 1 and 2 of $pipes, if given, and closes it.
     *
     * @param resource $proc
     * @param array<int, resource> $pipes
     */
    public static function end($proc, array $pipes = [], int $signal = SIGKILL, float $grace = 0.0): string
    {
        if (!is_resource($proc)) {
            return '';
        }
        $status = proc_get_status($proc);
        if ($status['running']) {
            posix_kill($status['pid'], $signal);
            $deadline = microtime(true) + $grace;
            while (proc_get_status($proc)['running'] && microtime(true) < $deadline) {
                usleep(20_000);
            }
            if (proc_get_status($proc)['running']) {
                posix_kill($status['pid'], SIGKILL);
            }
        }
        $out = '';
        foreach ([1, 2] as $i) {
            if (isset($pipes[$i]) && is_resource($pipes[$i])) {
                $out .= stream_get_contents($pipes[$i]);
            }
        }
        proc_close($proc);
        return $out;
    }
}
