<?php
// Measurement helpers shared by the bench clients (each client runs in its own PHP process).

/** Resident set size of this process, in KiB. */
function rss_kb(): int
{
    preg_match('/^VmRSS:\s+(\d+)/m', (string) file_get_contents('/proc/self/status'), $m);
    return (int) ($m[1] ?? 0);
}

/** CPU time (user + system, every thread of the process) between two getrusage() calls, µs. */
function cpu_us(array $a, array $b): float
{
    $t = fn ($r) => $r['ru_utime.tv_sec'] * 1e6 + $r['ru_utime.tv_usec'] + $r['ru_stime.tv_sec'] * 1e6 + $r['ru_stime.tv_usec'];
    return $t($b) - $t($a);
}
