<?php
// The tables of benches/web.php (W1-W3) and benches/micro.php, for their own output and for
// latest.md (benches/run.php): summaries of their JSON and its markdown.

declare(strict_types=1);

/**
 * Per client: median, min and max over the rounds of each numeric figure.
 *
 * @param array<string, list<array<string, mixed>>> $rounds client => rows
 */
function web_summary(array $rounds): array
{
    $sum = [];
    foreach ($rounds as $client => $rows) {
        foreach (array_keys($rows[0]) as $key) {
            $xs = array_values(array_filter(array_column($rows, $key), fn ($x) => is_int($x) || is_float($x)));
            if ($xs) {
                sort($xs);
                $n = count($xs);
                $median = $n % 2 ? $xs[intdiv($n, 2)] : ($xs[$n / 2 - 1] + $xs[$n / 2]) / 2;
                $sum[$client][$key] = ['median' => $median, 'min' => $xs[0], 'max' => $xs[$n - 1]];
            }
        }
        $sum[$client]['ok_rounds'] = count($rows);
    }
    return $sum;
}

/** A figure with 3 significant digits at most, thousands separated. */
function web_num(?float $x): string
{
    if ($x === null) {
        return '–';
    }
    if ($x == floor($x)) {
        return number_format($x);
    }
    $abs = abs($x);
    return $abs >= 100 ? number_format($x) : ($abs >= 10 ? sprintf('%.1f', $x) : sprintf('%.2f', $x));
}

/** @return list<string> markdown of a web-latest.json */
function web_markdown(array $web): array
{
    $c = $web['config'];
    $md = [sprintf('## W1–W3: one web request through php-fpm behind nginx (measured %s at `%s`)', substr($web['when'], 0, 16), $c['commit'] ?? '?'), ''];
    $md[] = sprintf('php-fpm (PHP %s) pm=%s with %d workers behind %s, both started by `benches/web.php` with configs of its own; '
        . 'load from %s at concurrency %d: %s requests per measurement (W3: %s) after %d untimed ones; each measurement a fresh '
        . 'pool that loads only its client (and opcache); medians of %d rounds, clients in alternating order. RSS and threads: '
        . 'per fpm worker after the run (median of the workers; threads: the most). CPU: user + system of the workers over the '
        . 'timed requests, per request. Connections and channels: opened on the broker during the measurement, warm-up '
        . 'included, from its churn counters; broker: %s. Check: one message (W2: one call served; W3 database: one row) per request. '
        . 'Load average %s before, %s after (2 cores, shared with other work: read the ratios).',
        $c['php'], $c['pm'], $c['workers'], str_replace('nginx version: ', '', $c['nginx']), $c['load'], $c['concurrency'],
        number_format($c['requests']), number_format($c['laravel_requests']), $c['warm_up'], $c['rounds'], $c['broker'] ?? '?',
        explode(' ', $web['load_average']['before'] ?? '?')[0], explode(' ', $web['load_average']['after'] ?? '?')[0]);
    $md[] = '';
    $md[] = '| scenario | client | req/s | min–max | p50 ms | p99 ms | p99 min–max | fpm CPU ms/req | RSS/worker MB | threads/worker | broker connections | channels | check |';
    $md[] = '|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|';
    $range = fn (?array $s) => $s ? web_num($s['min']) . '–' . web_num($s['max']) : '–';
    $med = fn (?array $s, float $div = 1) => $s ? web_num($s['median'] / $div) : '–';
    foreach ($web['scenarios'] as $name => $sc) {
        $first = true;
        foreach ($sc['summary'] as $client => $s) {
            $last = end($sc['rounds'][$client]);
            $md[] = sprintf('| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |', $first ? "**$name**" : '', str_starts_with($client, 'amqp') ? "**$client**" : $client,
                $med($s['rate']), $range($s['rate']), $med($s['p50_ms']), $med($s['p99_ms']), $range($s['p99_ms']),
                $med($s['cpu_ms_per_request'] ?? null), $med($s['worker_rss_kb'], 1024), $med($s['worker_threads']),
                $med($s['connections'] ?? null), $med($s['channels'] ?? null), sprintf('%d/%d rounds ok, last: %s', $s['ok_rounds'], $web['config']['rounds'], $last['checked']));
            $first = false;
        }
        foreach ($sc['unavailable'] as $client => $why) {
            $md[] = sprintf('| %s | %s | unavailable | | | | | | | | | | %s |', $first ? "**$name**" : '', $client, str_replace('|', '/', $why));
            $first = false;
        }
    }
    $md[] = '';
    $md[] = implode(' ', array_map(fn ($k, $sc) => "$k: {$sc['what']}" . (strtotime($sc['measured'] ?? $web['when']) < strtotime($web['when'])
        ? ' (measured ' . substr($sc['measured'], 0, 16) . " at `{$sc['commit']}`)" : '') . '.', array_keys($web['scenarios']), $web['scenarios']));
    $md[] = '';
    foreach ($web['failures'] ?? [] as $f) {
        $md[] = "- failed: {$f['scenario']} {$f['client']} round {$f['round']}: " . str_replace("\n", ' ', substr($f['error'], 0, 400));
    }
    return $md;
}

/** @return list<string> markdown of a micro-latest.json */
function micro_markdown(array $micro): array
{
    $md = [sprintf('## Micro figures: one PHP process, amqp_rs against php-amqp (measured %s at `%s`)', substr($micro['when'], 0, 16), $micro['commit'] ?? '?'), ''];
    $md[] = $micro['method'] . sprintf(' Load average %s before, %s after.', explode(' ', $micro['load_average']['before'] ?? '?')[0],
        explode(' ', $micro['load_average']['after'] ?? '?')[0]);
    $md[] = '';
    $clients = array_keys($micro['summary']);
    $md[] = '| figure | ' . implode(' | ', $clients) . ' | min–max | ratio ' . implode(' / ', array_slice($clients, 0, 2)) . ' |';
    $md[] = '|---|' . str_repeat('--:|', count($clients) + 2);
    foreach ($micro['figures'] as $key => $label) {
        $cells = [];
        $ranges = [];
        foreach ($clients as $client) {
            $s = $micro['summary'][$client][$key] ?? null;
            $cells[] = $s ? web_num($s['median']) : '–';
            $ranges[] = $s ? web_num($s['min']) . '–' . web_num($s['max']) : '–';
        }
        $a = $micro['summary'][$clients[0]][$key]['median'] ?? null;
        $b = $micro['summary'][$clients[1] ?? ''][$key]['median'] ?? null;
        $ratio = $a !== null && $b !== null && abs($b) > 1e-9 ? sprintf('%.2f×', $a / $b) : '–';
        $md[] = "| $label | " . implode(' | ', $cells) . ' | ' . implode(' / ', $ranges) . " | $ratio |";
    }
    $md[] = '';
    return $md;
}
