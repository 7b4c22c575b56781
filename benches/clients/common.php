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

/**
 * R1: times $count calls of $call, one after the other, after 200 untimed ones (connection and
 * reply-consumer set-up, first allocations); prints the JSON line the orchestrator reads.
 */
function rpc_measure(callable $call, int $count): void
{
    for ($i = 0; $i < 200; $i++) {
        $call();
    }
    $lat = [];
    $start = hrtime(true);
    $r0 = getrusage();
    for ($i = 0; $i < $count; $i++) {
        $t = hrtime(true);
        $call();
        $lat[] = hrtime(true) - $t;
    }
    $elapsed = (hrtime(true) - $start) / 1e9;
    $r1 = getrusage();
    sort($lat);
    $pct = fn (float $p) => $lat[min($count - 1, (int) ceil($p * $count) - 1)] / 1e3;
    echo json_encode([
        'elapsed' => $elapsed, 'cpu_us' => cpu_us($r0, $r1), 'timed' => $count, 'calls' => $count + 200,
        'p50_us' => $pct(0.50), 'p99_us' => $pct(0.99), 'max_us' => $lat[$count - 1] / 1e3,
        'mean_us' => array_sum($lat) / $count / 1e3,
    ]), "\n";
}

/** Threads of this process, from /proc/self/status. */
function threads(): int
{
    preg_match('/^Threads:\s+(\d+)/m', (string) file_get_contents('/proc/self/status'), $m);
    return (int) ($m[1] ?? 0);
}

/** The median wall time of $count calls of $call, in µs, after $warm untimed ones. */
function median_us(callable $call, int $count, int $warm): float
{
    for ($i = 0; $i < $warm; $i++) {
        $call();
    }
    $lat = [];
    for ($i = 0; $i < $count; $i++) {
        $t = hrtime(true);
        $call();
        $lat[] = hrtime(true) - $t;
    }
    sort($lat);
    return $lat[intdiv($count, 2)] / 1e3;
}
