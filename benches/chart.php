<?php
// Draws the bench's charts from its results, with PHP's GD (run.php calls it after each run):
//
//   php benches/chart.php [benches/results/latest.json] [OUT_DIR]
//
// throughput.png  msgs/s per client, one panel per P/C scenario (longer is better)
// cpu.png         client CPU µs/msg per client, one panel per P/C scenario (shorter is better)
// latency.png     R1: p50 and p99 round-trip latency and client CPU per call (shorter is better)
//
// Each bar is the median over the rounds, with a thin line from the min to the max. Each panel
// has its own scale (P3's rate is a hundredth of P1's): compare bars within a panel.

declare(strict_types=1);

if (!extension_loaded('gd')) {
    fwrite(STDERR, "chart.php needs PHP's GD extension (apt-get install php8.2-gd)\n");
    exit(2);
}
$in = $argv[1] ?? __DIR__ . '/results/latest.json';
$outDir = rtrim($argv[2] ?? dirname($in), '/');
$report = json_decode((string) file_get_contents($in), true);
if (!is_array($report) || !isset($report['machine'])) {
    fwrite(STDERR, "$in: not a bench report\n");
    exit(2);
}

const COLORS = [
    'amqp_rs' => [0xd9, 0x48, 0x0f],
    'php-amqp' => [0x1c, 0x7e, 0xd6],
    'php-amqplib' => [0x70, 0x48, 0xe8],
    'raw' => [0x86, 0x8e, 0x96],
    'lapin' => [0x2b, 0x8a, 0x3e],
];

final class Canvas
{
    public \GdImage $img;
    private ?string $font;
    private ?string $bold;
    private array $colors = [];

    public function __construct(public int $w, public int $h)
    {
        $this->img = imagecreatetruecolor($w, $h);
        imageantialias($this->img, true);
        imagefilledrectangle($this->img, 0, 0, $w, $h, $this->color([255, 255, 255]));
        $dirs = ['/usr/share/fonts/truetype/dejavu', '/usr/share/fonts/dejavu', '/usr/share/fonts/TTF'];
        $this->font = $this->find($dirs, 'DejaVuSans.ttf');
        $this->bold = $this->find($dirs, 'DejaVuSans-Bold.ttf') ?? $this->font;
    }

    private function find(array $dirs, string $file): ?string
    {
        foreach ($dirs as $d) {
            if (is_file("$d/$file")) {
                return "$d/$file";
            }
        }
        return null;
    }

    public function color(array $rgb): int
    {
        return $this->colors[implode(',', $rgb)] ??= imagecolorallocate($this->img, ...$rgb);
    }

    /** Text with its top-left corner at x,y ('r': right-aligned at x, 'c': centred). */
    public function text(int $x, int $y, string $s, float $size = 11, array $rgb = [33, 37, 41], bool $bold = false, string $align = 'l'): int
    {
        $font = $bold ? $this->bold : $this->font;
        if ($font === null) {           // GD's built-in font: ASCII only
            $s = strtr($s, ['µ' => 'u', '–' => '-', '×' => 'x', '·' => '-']);
            $f = $size >= 13 ? 5 : 3;
            $w = imagefontwidth($f) * strlen($s);
            $x = $align === 'r' ? $x - $w : ($align === 'c' ? $x - intdiv($w, 2) : $x);
            imagestring($this->img, $f, $x, $y, $s, $this->color($rgb));
            return $w;
        }
        $box = imagettfbbox($size, 0, $font, $s);
        $w = $box[2] - $box[0];
        $x = $align === 'r' ? $x - $w : ($align === 'c' ? $x - intdiv($w, 2) : $x);
        imagettftext($this->img, $size, 0, $x, $y + (int) round($size * 1.05), $this->color($rgb), $font, $s);
        return $w;
    }

    public function rect(int $x1, int $y1, int $x2, int $y2, array $rgb, bool $fill = true): void
    {
        ($fill ? 'imagefilledrectangle' : 'imagerectangle')($this->img, $x1, $y1, $x2, $y2, $this->color($rgb));
    }

    public function line(int $x1, int $y1, int $x2, int $y2, array $rgb, int $thick = 1): void
    {
        imagesetthickness($this->img, $thick);
        imageline($this->img, $x1, $y1, $x2, $y2, $this->color($rgb));
        imagesetthickness($this->img, 1);
    }

    public function save(string $path): void
    {
        imagepng($this->img, $path, 9);
    }
}

function fmt(float $x): string
{
    if ($x == 0) {
        return '0';
    }
    return $x >= 1000 ? number_format($x) : ($x >= 100 ? sprintf('%.0f', $x) : ($x >= 10 ? sprintf('%.1f', $x) : sprintf('%.2f', $x)));
}

/** An axis label: no needless decimals (15, not 15.0). */
function tick(float $x): string
{
    return $x >= 1000 ? number_format($x) : rtrim(rtrim(sprintf('%.2f', $x), '0'), '.');
}

/** A round upper bound for an axis: 1, 2 or 5 times a power of ten, at least $x. */
function niceMax(float $x): float
{
    if ($x <= 0) {
        return 1;
    }
    $p = 10 ** floor(log10($x));
    foreach ([1, 2, 4, 6, 8, 10] as $m) {
        if ($m * $p >= $x) {
            return $m * $p;
        }
    }
    return 10 * $p;
}

/**
 * One panel: a horizontal bar per client (median), a min–max line on it, the value after it.
 * $rows: client => ['median', 'min', 'max']; $mark: client => a short note after the value.
 */
function panel(Canvas $c, int $x, int $y, int $w, int $h, string $title, string $subtitle, array $rows, string $unit, array $mark = []): void
{
    $c->rect($x, $y, $x + $w, $y + $h, [222, 226, 230], false);
    $c->text($x + 10, $y + 8, $title, 12.5, [33, 37, 41], true);
    $c->text($x + 10, $y + 28, $subtitle, 9.5, [108, 117, 125]);
    $labelW = 96;
    $valueW = 118;
    $top = $y + 52;
    $plotX = $x + 10 + $labelW;
    $plotW = $w - 20 - $labelW - $valueW;
    $bottom = $y + $h - 22;
    $max = niceMax(max(array_map(fn ($s) => max($s['max'], $s['median']), $rows) ?: [1]));
    // Grid: quarters of the axis, labelled below.
    for ($i = 0; $i <= 4; $i++) {
        $gx = $plotX + (int) round($plotW * $i / 4);
        $c->line($gx, $top - 4, $gx, $bottom, $i === 0 ? [173, 181, 189] : [236, 239, 241]);
        $c->text($gx, $bottom + 4, tick($max * $i / 4), 8, [134, 142, 150], false, $i === 0 ? 'l' : 'c');
    }
    $c->text($x + $w - 10, $bottom + 4, $unit, 8, [134, 142, 150], false, 'r');
    $n = max(1, count($rows));
    $slot = ($bottom - $top - 4) / $n;
    $barH = (int) max(8, min(26, $slot * 0.68));
    $i = 0;
    foreach ($rows as $client => $s) {
        $cy = (int) round($top + $slot * $i + $slot / 2);
        $rgb = COLORS[$client] ?? [73, 80, 87];
        $len = (int) round($plotW * $s['median'] / $max);
        $c->text($plotX - 8, $cy - 8, $client, 10, [33, 37, 41], $client === 'amqp_rs', 'r');
        $c->rect($plotX, $cy - intdiv($barH, 2), $plotX + max(1, $len), $cy + intdiv($barH, 2), $rgb);
        if ($s['max'] > $s['min']) {
            $x1 = $plotX + (int) round($plotW * $s['min'] / $max);
            $x2 = $plotX + (int) round($plotW * $s['max'] / $max);
            $c->line($x1, $cy, $x2, $cy, [33, 37, 41], 2);
            $c->line($x1, $cy - 4, $x1, $cy + 4, [33, 37, 41], 2);
            $c->line($x2, $cy - 4, $x2, $cy + 4, [33, 37, 41], 2);
        }
        $vx = $plotX + max($len, (int) round($plotW * $s['max'] / $max)) + 6;
        $c->text($vx, $cy - 8, fmt($s['median']) . ($mark[$client] ?? ''), 9.5, [33, 37, 41], $client === 'amqp_rs');
        $i++;
    }
}

function drawHeader(Canvas $c, string $title, array $report, array $clients): int
{
    $m = $report['machine'];
    $c->text(20, 14, $title, 17, [33, 37, 41], true);
    $c->text(20, 42, sprintf('%s, %d cores, %s GB RAM, %s; PHP %s, RabbitMQ %s; commit %s; %s; median of %d rounds, line = min–max',
        $m['cpu'], $m['cores'], $m['ram_gb'], $m['host'], $m['php'], $m['rabbitmq'], $m['commit'], substr($report['when'], 0, 10),
        $report['rounds']), 9.5, [108, 117, 125]);
    $x = 20;
    foreach ($clients as $client) {
        $c->rect($x, 66, $x + 14, 80, COLORS[$client] ?? [73, 80, 87]);
        $x += 20 + $c->text($x + 20, 65, $client, 10.5, [33, 37, 41], $client === 'amqp_rs') + 22;
    }
    return 96;
}

function size(int $bytes): string
{
    return $bytes >= 1024 ? ($bytes / 1024) . ' KB' : "$bytes B";
}

$scenarios = $report['scenarios'] ?? [];
$flow = array_filter($scenarios, fn ($k) => $k !== 'R1', ARRAY_FILTER_USE_KEY);
$written = [];
$clientsOf = function (array $scs): array {
    $seen = [];
    foreach ($scs as $sc) {
        $seen += array_flip(array_keys($sc['summary']));
    }
    return array_values(array_filter(array_keys(COLORS) + [], fn ($c) => isset($seen[$c])));
};

foreach ([
    'throughput' => ['rate', 'msgs/s', 'Throughput per scenario: messages per second (longer is better)'],
    'cpu' => ['cpu_us', 'µs/msg', 'Client CPU per message, user + system, µs (shorter is better)'],
] as $file => [$key, $unit, $title]) {
    if (!$flow) {
        break;
    }
    $cols = min(3, count($flow));
    $panelW = 500;
    $panelH = 232;
    $gap = 14;
    $rowsN = (int) ceil(count($flow) / $cols);
    $c = new Canvas(20 * 2 + $cols * $panelW + ($cols - 1) * $gap, 96 + $rowsN * ($panelH + $gap) + 10);
    $top = drawHeader($c, "amqp_rs bench · $title", $report, $clientsOf($flow));
    $i = 0;
    foreach ($flow as $name => $sc) {
        $rows = array_map(fn ($s) => $s[$key], $sc['summary']);
        $mark = [];
        if (isset($sc['summary']['php-amqp'])) {
            foreach ($sc['summary'] as $client => $s) {
                $r = $s['vs_php_amqp'][$key] ?? null;
                if ($client !== 'php-amqp' && $r !== null) {
                    $mark[$client] = sprintf('  %.2f×', $r);
                }
            }
        }
        $px = 20 + ($i % $cols) * ($panelW + $gap);
        $py = $top + intdiv($i, $cols) * ($panelH + $gap);
        panel($c, $px, $py, $panelW, $panelH, sprintf('%s · %s × %s', $name, number_format($sc['count']), size($sc['size'])),
            $sc['what'] . ($mark ? ' · ratio: vs php-amqp' : ''), $rows, $unit, $mark);
        $i++;
    }
    $c->save("$outDir/$file.png");
    $written[] = "$outDir/$file.png";
}

if (isset($scenarios['R1'])) {
    $sc = $scenarios['R1'];
    $panels = [
        ['p50_us', 'p50 latency, µs', 'half of the calls took less'],
        ['p99_us', 'p99 latency, µs', '1 % of the calls took longer'],
        ['cpu_us', 'client CPU per call, µs', 'user + system of the client process'],
    ];
    $panelW = 500;
    $panelH = 210;
    $c = new Canvas(40 + 3 * $panelW + 2 * 14, 96 + $panelH + 24);
    $top = drawHeader($c, sprintf('amqp_rs bench · R1: %s sequential RPC round trips, %s each way (shorter is better)',
        number_format($sc['count']), size($sc['size'])), $report, $clientsOf(['R1' => $sc]));
    foreach ($panels as $i => [$key, $title, $sub]) {
        $rows = array_map(fn ($s) => $s[$key], $sc['summary']);
        $mark = [];
        foreach ($sc['summary'] as $client => $s) {
            if ($client !== 'php-amqp' && isset($sc['summary']['php-amqp'])) {
                $mark[$client] = sprintf('  %.2f×', $s[$key]['median'] / $sc['summary']['php-amqp'][$key]['median']);
            }
        }
        panel($c, 20 + $i * ($panelW + 14), $top, $panelW, $panelH, $title, "$sub · ratio: vs php-amqp", $rows, 'µs', $mark);
    }
    $c->save("$outDir/latency.png");
    $written[] = "$outDir/latency.png";
}
echo $written ? 'charts: ' . implode(', ', $written) . "\n" : "charts: nothing to draw\n";
