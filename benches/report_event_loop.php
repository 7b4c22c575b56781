<?php
// Bench E1 for benches/run.php: running benches/event_loop.php in the sid root (it needs Revolt,
// which only that root has) and the markdown of its JSON for latest.md.

declare(strict_types=1);

/** The sid root `make matrix` leaves behind (scripts/matrix.sh: $AMQP_RS_MATRIX_DIR/sid). */
function e1_root_dir(): string
{
    return (getenv('AMQP_RS_MATRIX_DIR') ?: '/var/cache/amqp-rs') . '/sid';
}

/** Why E1 cannot run on this machine, or null when it can. */
function e1_unavailable(string $clone, string $out): ?string
{
    if (!is_file(e1_root_dir() . '/.amqp-rs-root')) {
        return 'no Debian sid root at ' . e1_root_dir() . ' (made by `make matrix`), the only place with Revolt';
    }
    $uid = function_exists('posix_geteuid') ? posix_geteuid() : (int) shell_exec('id -u');
    if ($uid !== 0) {
        return 'scripts/matrix.sh needs root (chroot, mount)';
    }
    if (e1_relative($clone, $out) === null) {
        return "--out=$out is outside the clone, and the root sees only the clone";
    }
    return null;
}

/** $out as a path relative to the clone, or null when it is not inside it. */
function e1_relative(string $clone, string $out): ?string
{
    @mkdir($out, 0777, true);
    $clone = (string) realpath($clone);
    $real = (string) realpath($out);
    return $real !== '' && str_starts_with("$real/", "$clone/") ? ltrim(substr($real, strlen($clone)), '/') : null;
}

/**
 * Runs event_loop.php inside the root against its broker (matrix.sh builds the extension there
 * first and waits for its lock while another run holds it); its output goes to our stderr.
 * Returns the exit code.
 */
function e1_run(string $clone, string $out, int $rounds, ?int $calls): int
{
    $json = '$SRC/' . e1_relative($clone, $out) . '/event-loop-latest.json';
    $commit = trim((string) shell_exec('git -C ' . escapeshellarg($clone) . ' rev-parse --short=12 HEAD 2>/dev/null'));
    $dirty = trim((string) shell_exec('git -C ' . escapeshellarg($clone) . ' status --porcelain --untracked-files=no -- . :!benches/results 2>/dev/null')) !== '';
    $inner = 'exec php -d extension="$EXT" "$SRC/benches/event_loop.php" --so="$EXT" --rounds=' . $rounds
        . ' --json="' . $json . '"' . ($calls !== null ? " --calls=$calls" : '')
        . ' --commit=' . escapeshellarg(($commit ?: 'unknown') . ($dirty ? '+changes' : ''));
    $p = proc_open(["$clone/scripts/matrix.sh", '--run', 'sh', '-c', $inner], [1 => STDERR, 2 => STDERR], $pipes);
    return $p === false ? 127 : proc_close($p);
}

/** latest.md's section for E1: medians with min–max, the config, the load, any failed check. */
function e1_markdown(array $bench): array
{
    $num = fn (?float $x) => $x === null ? '–' : ($x >= 100 ? number_format($x) : (string) round($x, 3));
    $range = fn (array $rows, string $k) => count($rows) > 1
        ? $num(min(array_column($rows, $k))) . '–' . $num(max(array_column($rows, $k))) : '–';
    $md = [sprintf('## E1: RPC calls from one process, Revolt fibers against one after another (measured %s at `%s`, sid root)',
        substr($bench['when'], 0, 16), $bench['commit'] ?? '?'), ''];
    $md[] = sprintf('PHP %s, Revolt %s, php-amqplib %s, RabbitMQ %s; %s; load average %s before, %s after (%.0f s).', $bench['php'],
        $bench['revolt'], $bench['php-amqplib'], $bench['rabbitmq'], $bench['host'], explode(' ', $bench['load_average']['before'])[0],
        explode(' ', $bench['load_average']['after'])[0], $bench['duration_s']);
    $md[] = '';
    $md[] = implode('; ', array_map(fn ($k, $v) => "$k: $v", array_keys($bench['config']), $bench['config'])) . '.';
    $md[] = '';
    $md[] = '| server | client | calls/s | min–max | vs sequential | p50 ms | p50 min–max | p99 ms | p99 min–max | client CPU µs/call | server CPU µs/call | client peak RSS MB |';
    $md[] = '|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|';
    $lastServer = null;
    foreach ($bench['medians'] as $key => $s) {
        [$server, $client] = explode(': ', $key, 2);
        $rows = $bench['rounds'][$key];
        $md[] = sprintf('| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |', $server === $lastServer ? '' : "**$server**",
            str_starts_with($client, 'amqp_rs fibers') ? "**$client**" : $client, $num($s['calls_per_s']), $range($rows, 'calls_per_s'),
            $s['vs_sequential'] === null ? '–' : sprintf('%.2f×', $s['vs_sequential']), $num($s['p50_ms']), $range($rows, 'p50_ms'),
            $num($s['p99_ms']), $range($rows, 'p99_ms'), $num($s['client_cpu_us_per_call']), $num($s['server_cpu_us_per_call']),
            $num($s['client_peak_rss_mb']));
        $lastServer = $server;
    }
    $md[] = '';
    foreach ($bench['failures'] ?? [] as $f) {
        $md[] = "- E1 failed check, round {$f['round']} {$f['client']}: " . str_replace("\n", ' ', $f['error']);
    }
    if ($bench['failures'] ?? []) {
        $md[] = '';
    }
    return $md;
}
