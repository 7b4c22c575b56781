<?php
// What the bench scripts share: running a measured process to its end, and the median.

declare(strict_types=1);

/**
 * Reads a started process's stdout and stderr to their end, giving up after $timeout seconds
 * (the process is then ended and RuntimeException names $what), and reaps it with wait4() for
 * its own rusage: proc_close() would lose it. ru_maxrss is its peak RSS, exact whatever the
 * program (PHP or Rust).
 *
 * @param array{1: resource, 2: resource} $pipes
 * @return array{int, string, string, float, ?int} exit code, stdout, stderr, CPU s (user +
 *     system), peak RSS KiB (null where pcntl is missing)
 */
function collect($proc, array $pipes, int $pid, string $what, float $timeout): array
{
    $deadline = microtime(true) + $timeout;
    $buf = [1 => '', 2 => ''];
    $open = [1 => $pipes[1], 2 => $pipes[2]];
    while ($open) {
        $left = $deadline - microtime(true);
        if ($left <= 0) {
            proc_terminate($proc);
            usleep(500_000);
            proc_terminate($proc, 9);
            proc_close($proc);
            throw new RuntimeException("$what timed out after $timeout s: $buf[1] $buf[2]");
        }
        $ready = array_values($open);
        $none = null;
        if (!stream_select($ready, $none, $none, (int) min(1, ceil($left)), 0)) {
            continue;
        }
        foreach ($open as $i => $pipe) {
            if (in_array($pipe, $ready, true)) {
                $chunk = (string) fread($pipe, 65536);
                $buf[$i] .= $chunk;
                if ($chunk === '' && feof($pipe)) {
                    unset($open[$i]);
                }
            }
        }
    }
    if (!function_exists('pcntl_waitpid') || pcntl_waitpid($pid, $status, 0, $usage) !== $pid) {
        return [proc_close($proc), $buf[1], $buf[2], 0.0, null];
    }
    proc_close($proc);
    $code = pcntl_wifexited($status) ? pcntl_wexitstatus($status) : 128 + pcntl_wtermsig($status);
    $cpu = $usage['ru_utime.tv_sec'] + $usage['ru_utime.tv_usec'] / 1e6
        + $usage['ru_stime.tv_sec'] + $usage['ru_stime.tv_usec'] / 1e6;
    return [$code, $buf[1], $buf[2], $cpu, $usage['ru_maxrss'] ?? null];
}

function median(array $values): float
{
    sort($values);
    $n = count($values);
    return $n % 2 ? $values[intdiv($n, 2)] : ($values[$n / 2 - 1] + $values[$n / 2]) / 2;
}
