<?php
// Benchmark L1 (not part of `make test`): Laravel jobs through `php artisan queue:work`, with
// the amqp-rs driver (laravel/) against Laravel's own `database` driver on sqlite, in the same
// minimal Laravel 8 application (Debian's php-laravel-framework, built by
// php-tests/Support/LaravelApp.php) and the same job (App\Jobs\Noop: does nothing).
//
//   php benches/laravel.php [--jobs=2000] [--rounds=3] [--so=PATH] [--json=PATH]
//
// Each round, per driver: a plain PHP script dispatches --jobs jobs (Noop::dispatch() in a
// loop: the dispatch rate is timed inside that script, from the first dispatch to the last,
// booting excluded), then ONE `php artisan queue:work <connection> --stop-when-empty --sleep=0`
// process runs them all: timed from its start to its exit (PHP and Laravel booting included,
// as a real worker pays them once), with its CPU time (user + system, from getrusage of the
// reaped child). Every job must be reported "Processed" and the queue left empty. The
// amqp-rs driver runs with its default prefetch (10) and with prefetch 1 (the broker sends
// the next job only after the ack of the previous: one round trip per job). Then, outside
// the worker's timing, the same number of jobs is dispatched with one Queue::bulk() (timed)
// and cleared with Queue::clear(). Prints medians
// of --rounds rounds; writes them and every round to benches/results/laravel-latest.json.

declare(strict_types=1);

require_once __DIR__ . '/../php-tests/Support/LaravelApp.php';
require_once __DIR__ . '/process.php';

use AmqpRs\Tests\Support\LaravelApp;

$opts = getopt('', ['jobs:', 'rounds:', 'so:', 'json:']);
$jobs = (int) ($opts['jobs'] ?? 2000);
$rounds = (int) ($opts['rounds'] ?? 3);
$so = realpath($opts['so'] ?? __DIR__ . '/../target/release/libamqp_rs.so') ?: '';
$jsonPath = $opts['json'] ?? __DIR__ . '/results/laravel-latest.json';
if ($so === '' || !is_file($so)) {
    fwrite(STDERR, "no amqp_rs extension (build it, or pass --so=PATH)\n");
    exit(2);
}
if (($missing = LaravelApp::missing()) !== null) {
    fwrite(STDERR, "$missing\n");
    exit(2);
}

$drivers = [
    'amqp-rs' => ['connection' => 'amqp-rs', 'env' => ['AMQP_PREFETCH' => '10']],
    'amqp-rs prefetch=1' => ['connection' => 'amqp-rs', 'env' => ['AMQP_PREFETCH' => '1']],
    'database (sqlite)' => ['connection' => 'database', 'env' => []],
];

$app = new LaravelApp($so);
$uri = 'amqp://guest:guest@127.0.0.1:5672/%2f';

/** CPU seconds (user + system) of the reaped children so far. */
function childrenCpu(): float
{
    $r = getrusage(1);   // RUSAGE_CHILDREN
    return $r['ru_utime.tv_sec'] + $r['ru_utime.tv_usec'] / 1e6 + $r['ru_stime.tv_sec'] + $r['ru_stime.tv_usec'] / 1e6;
}

$results = [];
try {
    for ($round = 1; $round <= $rounds; $round++) {
        foreach ($drivers as $name => $driver) {
            $queue = sprintf('amqp_rs.bench.laravel.%d.%d', getmypid(), $round);
            $env = $driver['env'] + ['AMQP_URI' => $uri, 'AMQP_QUEUE' => $queue, 'QUEUE_CONNECTION' => $driver['connection']];

            [$code, $out, $err] = LaravelApp::run($app->script('dispatch.php', 'Noop', (string) $jobs, '0', '{i}'), $env, 600);
            $dispatched = json_decode($out, true);
            if ($code !== 0 || !is_array($dispatched) || $dispatched['size'] !== $jobs) {
                throw new RuntimeException("$name: dispatch failed ($code): $out $err");
            }

            $cpu = childrenCpu();
            [$code, $out, $err, $seconds] = LaravelApp::run($app->artisan('queue:work', $driver['connection'], '--stop-when-empty', '--sleep=0'), $env, 600);
            $cpu = childrenCpu() - $cpu;
            $processed = substr_count($out, 'Processed:');
            if ($code !== 0 || $processed !== $jobs) {
                throw new RuntimeException("$name: queue:work exited $code having processed $processed of $jobs: $err");
            }
            [$code, $sizeOut] = LaravelApp::run([PHP_BINARY, '-d', "extension=$so", '-r', '
                require $argv[1] . "/vendor/autoload.php";
                $app = require $argv[1] . "/bootstrap/app.php";
                $app->make(Illuminate\Contracts\Console\Kernel::class)->bootstrap();
                echo Illuminate\Support\Facades\Queue::size();', $app->dir], $env);
            if (trim($sizeOut) !== '0') {
                throw new RuntimeException("$name: $sizeOut jobs left in the queue after queue:work");
            }

            // Queue::bulk() of as many jobs, then queue:clear.
            [$code, $out, $err] = LaravelApp::run($app->script('dispatch.php', 'Noop', (string) $jobs, '0', '{i}'), $env + ['DISPATCH_BULK' => '1'], 600);
            $bulk = json_decode($out, true);
            if ($code !== 0 || !is_array($bulk) || $bulk['size'] !== $jobs) {
                throw new RuntimeException("$name: bulk dispatch failed ($code): $out $err");
            }

            $results[$name][] = [
                'dispatch_jobs_per_s' => round($jobs / $dispatched['seconds'], 1),
                'bulk_jobs_per_s' => round($jobs / $bulk['seconds'], 1),
                'work_s' => round($seconds, 3),
                'work_jobs_per_s' => round($jobs / $seconds, 1),
                'worker_cpu_ms_per_job' => round($cpu * 1000 / $jobs, 3),
            ];
            [$code, $out, $err] = LaravelApp::run([PHP_BINARY, '-d', "extension=$so", '-r', '
                require $argv[1] . "/vendor/autoload.php";
                $app = require $argv[1] . "/bootstrap/app.php";
                $app->make(Illuminate\Contracts\Console\Kernel::class)->bootstrap();
                Illuminate\Support\Facades\Queue::clear(getenv("AMQP_QUEUE"));
                if (getenv("QUEUE_CONNECTION") === "amqp-rs") {
                    Illuminate\Support\Facades\Queue::connection()->getConnection()->deleteQueue(getenv("AMQP_QUEUE"));
                }', $app->dir], $env);
            if ($code !== 0) {
                throw new RuntimeException("$name: cannot clear the queue: $out $err");
            }
            fprintf(STDERR, "round %d %-20s dispatch %7.0f jobs/s, bulk %7.0f jobs/s, work %6.3f s (%6.0f jobs/s)\n", $round, $name, $jobs / $dispatched['seconds'], $jobs / $bulk['seconds'], $seconds, $jobs / $seconds);
        }
    }
} finally {
    $app->remove();
}

$summary = [];
foreach ($results as $name => $runs) {
    foreach (array_keys($runs[0]) as $key) {
        $summary[$name][$key] = round(median(array_column($runs, $key)), 3);
    }
}

printf("\nL1: %d trivial jobs, dispatched from a script, then one `queue:work --stop-when-empty` (boot included)\n", $jobs);
printf("%-20s %16s %16s %14s %12s %18s\n", 'driver', 'dispatch jobs/s', 'bulk() jobs/s', 'queue:work s', 'work jobs/s', 'worker CPU ms/job');
foreach ($summary as $name => $s) {
    printf("%-20s %16.0f %16.0f %14.3f %12.0f %18.3f\n", $name, $s['dispatch_jobs_per_s'], $s['bulk_jobs_per_s'], $s['work_s'], $s['work_jobs_per_s'], $s['worker_cpu_ms_per_job']);
}
$host = php_uname('n') . ', ' . trim((string) shell_exec('nproc')) . ' cores';
printf("(medians of %d rounds; Laravel %s, PHP %s; %s)\n", $rounds, LaravelApp::version(), PHP_VERSION, $host);

@mkdir(dirname($jsonPath), 0777, true);
file_put_contents($jsonPath, json_encode([
    'when' => date('c'),
    'host' => $host,
    'php' => PHP_VERSION,
    'laravel' => LaravelApp::version(),
    'extension' => $so,
    'config' => [
        'jobs' => $jobs,
        'rounds' => $rounds,
        'job' => 'App\Jobs\Noop (empty handle())',
        'worker' => 'php artisan queue:work <connection> --stop-when-empty --sleep=0, timed from start to exit',
        'dispatch' => 'Noop::dispatch() in a loop in a booted script, timed from first to last (each waits for the broker\'s confirm, or the sqlite commit)',
        'bulk' => 'Queue::bulk() of as many Noop jobs (amqp-rs: publishes all, one confirm wait; database: one INSERT)',
        'database' => 'Laravel database driver, sqlite file',
    ],
    'medians' => $summary,
    'rounds' => $results,
], JSON_PRETTY_PRINT | JSON_UNESCAPED_SLASHES) . "\n");
echo "wrote ", realpath($jsonPath), "\n";
