<?php

declare(strict_types=1);

namespace AmqpRs\Tests\Support;

/**
 * A minimal Laravel application in a temporary directory, on Debian's php-laravel-framework
 * (/usr/share/php/Illuminate, no Composer): bootstrap/app.php, config/, an artisan script,
 * an autoloader for Illuminate, App\ and the amqp-rs driver (laravel/src), a vendor/composer/
 * installed.json naming the driver's package so that Laravel's package discovery registers
 * its service provider from laravel/composer.json, an sqlite database with failed_jobs and
 * jobs, job classes, and public/index.php with one route (GET /dispatch). Used by
 * php-tests/LaravelTest.php, benches/laravel.php and benches/web.php (W3, under php-fpm).
 *
 * Settings come from the environment of each process: AMQP_URI, AMQP_QUEUE (the queue of the
 * amqp-rs and database connections), AMQP_PREFETCH, AMQP_BLOCK_FOR, AMQP_FAILED_QUEUE, and
 * AMQP_DEAD_LETTER (a queue the default exchange dead-letters rejected jobs to),
 * AMQP_CONNECTION_NAME, AMQP_PERSISTENT (0: the driver's persistent setting off) and QUEUE_CONNECTION.
 */
final class LaravelApp
{
    public const ILLUMINATE = '/usr/share/php/Illuminate';

    public readonly string $dir;
    public readonly string $database;

    /** Why the application cannot be built here, or null. */
    public static function missing(): ?string
    {
        if (!is_file(self::ILLUMINATE . '/Foundation/Application.php')) {
            return 'Debian package php-laravel-framework is not installed (scripts/setup.sh installs it)';
        }
        if (!extension_loaded('pdo_sqlite')) {
            return 'pdo_sqlite is not loaded (Debian package php8.2-sqlite3, scripts/setup.sh installs it)';
        }
        if (!extension_loaded('pcntl') || !extension_loaded('posix')) {
            return 'pcntl and posix are needed for queue:work';
        }
        return null;
    }

    /** @param string $extension the amqp_rs shared object child processes load */
    public function __construct(public readonly string $extension)
    {
        $this->dir = sys_get_temp_dir() . '/amqp_rs_laravel_' . getmypid() . '_' . bin2hex(random_bytes(4));
        $this->database = $this->dir . '/storage/database.sqlite';
        $this->build();
    }

    /** The Laravel version the application runs on. */
    public static function version(): string
    {
        $source = (string) file_get_contents(self::ILLUMINATE . '/Foundation/Application.php');
        return preg_match("/const VERSION = '([^']+)'/", $source, $m) ? $m[1] : 'unknown';
    }

    /** The command line of `php artisan ...` with the extension loaded. */
    public function artisan(string ...$args): array
    {
        return [PHP_BINARY, '-d', 'extension=' . $this->extension, $this->dir . '/artisan', ...$args];
    }

    /** The command line of a PHP script of the application (dispatch.php...). */
    public function script(string $script, string ...$args): array
    {
        return [PHP_BINARY, '-d', 'extension=' . $this->extension, $this->dir . '/' . $script, ...$args];
    }

    /**
     * Runs a command to its end; returns [exit code, stdout, stderr, seconds].
     *
     * @param array<string, string> $env added to this process's environment
     */
    public static function run(array $cmd, array $env = [], float $timeout = 60.0): array
    {
        $start = microtime(true);
        $proc = proc_open($cmd, [1 => ['pipe', 'w'], 2 => ['pipe', 'w']], $pipes, null, $env + getenv());
        if (!is_resource($proc)) {
            throw new \RuntimeException('cannot start ' . implode(' ', $cmd));
        }
        $out = $err = '';
        stream_set_blocking($pipes[1], false);
        stream_set_blocking($pipes[2], false);
        while (true) {
            $read = [$pipes[1], $pipes[2]];
            $w = $e = null;
            if (@stream_select($read, $w, $e, 0, 100_000) > 0) {
                $out .= (string) stream_get_contents($pipes[1]);
                $err .= (string) stream_get_contents($pipes[2]);
            }
            $status = proc_get_status($proc);
            if (!$status['running']) {
                $out .= (string) stream_get_contents($pipes[1]);
                $err .= (string) stream_get_contents($pipes[2]);
                $code = $status['signaled'] ? 128 + $status['termsig'] : $status['exitcode'];
                proc_close($proc);
                return [$code, $out, $err, microtime(true) - $start];
            }
            if (microtime(true) - $start > $timeout) {
                posix_kill($status['pid'], SIGKILL);
                proc_close($proc);
                throw new \RuntimeException(sprintf("%s still running after %.0f s\nstdout: %s\nstderr: %s", implode(' ', $cmd), $timeout, $out, $err));
            }
        }
    }

    public function pdo(): \PDO
    {
        $pdo = new \PDO('sqlite:' . $this->database);
        $pdo->setAttribute(\PDO::ATTR_ERRMODE, \PDO::ERRMODE_EXCEPTION);
        return $pdo;
    }

    public function remove(): void
    {
        if (is_dir($this->dir)) {
            exec('rm -rf ' . escapeshellarg($this->dir));
        }
    }

    private function build(): void
    {
        $driver = dirname(__DIR__, 2) . '/laravel';
        $package = json_decode((string) file_get_contents($driver . '/composer.json'), true, 512, JSON_THROW_ON_ERROR);
        foreach (['bootstrap/cache', 'public', 'config', 'app/Jobs', 'vendor/composer', 'storage/logs', 'storage/framework/cache/data'] as $sub) {
            mkdir($this->dir . '/' . $sub, 0777, true);
        }
        $psr4 = [];
        foreach ($package['autoload']['psr-4'] as $prefix => $path) {
            $psr4[$prefix] = $driver . '/' . $path;
        }
        $psr4['App\\'] = $this->dir . '/app/';
        $files = [
            'vendor/autoload.php' => <<<'PHP'
                <?php
                // Debian's php-laravel-framework: Illuminate and its dependencies from /usr/share/php.
                require_once '/usr/share/php/Illuminate/autoload.php';
                spl_autoload_register(static function (string $class): void {
                    foreach (PSR4 as $prefix => $dir) {
                        if (str_starts_with($class, $prefix)) {
                            $file = $dir . str_replace('\\', '/', substr($class, strlen($prefix))) . '.php';
                            if (is_file($file)) {
                                require $file;
                            }
                            return;
                        }
                    }
                });
                PHP,
            // What Composer would write for the installed driver package: package discovery
            // reads extra.laravel.providers from it.
            'vendor/composer/installed.json' => json_encode(['packages' => [$package + ['version' => 'dev-main']]], JSON_PRETTY_PRINT | JSON_UNESCAPED_SLASHES),
            'bootstrap/app.php' => <<<'PHP'
                <?php
                $app = new Illuminate\Foundation\Application(dirname(__DIR__));
                // Laravel 11+ merges the framework's default config files from
                // Illuminate/../../config, a path Debian's layout does not have (it ships them in
                // Illuminate/config); this app's config/ is complete without them.
                if (method_exists($app, 'dontMergeFrameworkConfiguration')) {
                    $app->dontMergeFrameworkConfiguration();
                }
                $app->singleton(Illuminate\Contracts\Console\Kernel::class, Illuminate\Foundation\Console\Kernel::class);
                $app->singleton(Illuminate\Contracts\Debug\ExceptionHandler::class, Illuminate\Foundation\Exceptions\Handler::class);
                return $app;
                PHP,
            'artisan' => <<<'PHP'
                #!/usr/bin/env php
                <?php
                define('LARAVEL_START', microtime(true));
                require __DIR__ . '/vendor/autoload.php';
                $app = require_once __DIR__ . '/bootstrap/app.php';
                $kernel = $app->make(Illuminate\Contracts\Console\Kernel::class);
                $status = $kernel->handle($input = new Symfony\Component\Console\Input\ArgvInput(), new Symfony\Component\Console\Output\ConsoleOutput());
                $kernel->terminate($input, $status);
                exit($status);
                PHP,
            // php dispatch.php <job> <count> [delay s] [args...]: dispatches from a plain script
            // (with DISPATCH_BULK=1: all in one Queue::bulk()); prints the time it took,
            // Queue::size() after, and whether the driver's connection is persistent.
            'dispatch.php' => <<<'PHP'
                <?php
                require __DIR__ . '/vendor/autoload.php';
                $app = require __DIR__ . '/bootstrap/app.php';
                $app->make(Illuminate\Contracts\Console\Kernel::class)->bootstrap();
                [, $job, $count, $delay] = $argv + [3 => '0'];
                $class = 'App\\Jobs\\' . $job;
                $args = array_slice($argv, 4);
                $start = microtime(true);
                if (getenv('DISPATCH_BULK')) {
                    $jobs = [];
                    for ($i = 0; $i < (int) $count; $i++) {
                        $jobs[] = new $class(...str_replace('{i}', (string) $i, $args));
                    }
                    Illuminate\Support\Facades\Queue::bulk($jobs);
                }
                for ($i = 0; !getenv('DISPATCH_BULK') && $i < (int) $count; $i++) {
                    $pending = $class::dispatch(...str_replace('{i}', (string) $i, $args));
                    if ((float) $delay > 0) {
                        $pending->delay((int) $delay);
                    }
                    unset($pending);  // PendingDispatch queues the job when destroyed
                }
                $queue = Illuminate\Support\Facades\Queue::connection();
                // The Queue contract's counts of newer Laravel (13 has them), where it has them.
                $sizes = method_exists($queue, 'pendingSize')
                    ? ['pending' => $queue->pendingSize(), 'delayed' => $queue->delayedSize(), 'reserved' => $queue->reservedSize(), 'oldest' => $queue->creationTimeOfOldestPendingJob()]
                    : [];
                fwrite(STDOUT, json_encode(['seconds' => microtime(true) - $start, 'size' => $queue->size(),
                    // Only the amqp-rs driver has an extension connection (benches/laravel.php
                    // dispatches through the database driver too).
                    'persistent' => $queue instanceof AmqpRs\Laravel\AmqpRsQueue ? $queue->getConnection()->isPersistent() : null,
                ] + $sizes) . "\n");
                PHP,
            // The web entry point (served by php-fpm in benches/web.php, W3), with one route:
            // GET /dispatch dispatches one Noop job and answers "ok".
            'public/index.php' => <<<'PHP'
                <?php
                require __DIR__ . '/../vendor/autoload.php';
                $app = require __DIR__ . '/../bootstrap/app.php';
                $app->singleton(Illuminate\Contracts\Http\Kernel::class, Illuminate\Foundation\Http\Kernel::class);
                $app->booted(function ($app) {
                    $app['router']->get('/dispatch', function () {
                        App\Jobs\Noop::dispatch('web');
                        return 'ok';
                    });
                });
                $kernel = $app->make(Illuminate\Contracts\Http\Kernel::class);
                $response = $kernel->handle($request = Illuminate\Http\Request::capture());
                $response->send();
                $kernel->terminate($request, $response);
                PHP,
            'config/app.php' => <<<'PHP'
                <?php
                return [
                    'name' => 'amqp-rs-test',
                    'env' => 'local',
                    'debug' => true,
                    'key' => 'base64:' . base64_encode(str_repeat('k', 32)),
                    'cipher' => 'AES-256-CBC',
                    'timezone' => 'UTC',
                    'locale' => 'en',
                    'providers' => [
                        // The amqp-rs driver's provider is not listed: package discovery finds it.
                        Illuminate\Bus\BusServiceProvider::class,
                        Illuminate\Cache\CacheServiceProvider::class,
                        Illuminate\Database\DatabaseServiceProvider::class,
                        Illuminate\Encryption\EncryptionServiceProvider::class,
                        Illuminate\Filesystem\FilesystemServiceProvider::class,
                        Illuminate\Foundation\Providers\ConsoleSupportServiceProvider::class,
                        Illuminate\Queue\QueueServiceProvider::class,
                        // Laravel 10+: queue:work asks for the maintenance mode, which this binds.
                        ...(interface_exists(Illuminate\Contracts\Foundation\MaintenanceMode::class)
                            ? [Illuminate\Foundation\Providers\FoundationServiceProvider::class] : []),
                    ],
                    'aliases' => [],
                ];
                PHP,
            'config/queue.php' => <<<'PHP'
                <?php
                return [
                    'default' => env('QUEUE_CONNECTION', 'amqp-rs'),
                    'connections' => [
                        'amqp-rs' => [
                            'driver' => 'amqp-rs',
                            'uri' => env('AMQP_URI', 'amqp://guest:guest@127.0.0.1:5672/%2f'),
                            'queue' => env('AMQP_QUEUE', 'default'),
                            'options' => ['name' => env('AMQP_CONNECTION_NAME', 'laravel-test'), 'heartbeat' => 30],
                            'prefetch' => (int) env('AMQP_PREFETCH', 10),
                            'persistent' => (bool) env('AMQP_PERSISTENT', true),
                            'block_for' => (float) env('AMQP_BLOCK_FOR', 0),
                            'failed_queue' => env('AMQP_FAILED_QUEUE') ?: null,
                            'queue_arguments' => env('AMQP_DEAD_LETTER')
                                ? ['x-dead-letter-exchange' => '', 'x-dead-letter-routing-key' => env('AMQP_DEAD_LETTER')]
                                : [],
                        ],
                        'database' => [
                            'driver' => 'database',
                            'connection' => 'sqlite',
                            'table' => 'jobs',
                            'queue' => env('AMQP_QUEUE', 'default'),
                            'retry_after' => 90,
                        ],
                    ],
                    'failed' => [
                        'driver' => 'database-uuids',
                        'database' => 'sqlite',
                        'table' => 'failed_jobs',
                    ],
                ];
                PHP,
            'config/database.php' => <<<'PHP'
                <?php
                return [
                    'default' => 'sqlite',
                    'connections' => [
                        'sqlite' => [
                            'driver' => 'sqlite',
                            'database' => storage_path('database.sqlite'),
                            'prefix' => '',
                            'foreign_key_constraints' => true,
                        ],
                    ],
                    'migrations' => 'migrations',
                ];
                PHP,
            'config/cache.php' => <<<'PHP'
                <?php
                return [
                    'default' => 'file',
                    'stores' => ['file' => ['driver' => 'file', 'path' => storage_path('framework/cache/data')]],
                    'prefix' => 'amqp_rs_test',
                ];
                PHP,
            'config/logging.php' => <<<'PHP'
                <?php
                return [
                    'default' => 'single',
                    'channels' => ['single' => ['driver' => 'single', 'path' => storage_path('logs/laravel.log'), 'level' => 'debug']],
                ];
                PHP,
            // Appends "<text> attempt=<n>" to a file.
            'app/Jobs/WriteLine.php' => <<<'PHP'
                <?php
                namespace App\Jobs;

                use Illuminate\Bus\Queueable;
                use Illuminate\Contracts\Queue\ShouldQueue;
                use Illuminate\Foundation\Bus\Dispatchable;
                use Illuminate\Queue\InteractsWithQueue;

                class WriteLine implements ShouldQueue
                {
                    use Dispatchable, InteractsWithQueue, Queueable;

                    public function __construct(public string $file, public string $text)
                    {
                    }

                    public function handle(): void
                    {
                        file_put_contents($this->file, sprintf("%s attempt=%d at=%.3f\n", $this->text, $this->attempts(), microtime(true)), FILE_APPEND);
                    }
                }
                PHP,
            // Logs each attempt to $log, then fails unless $okFile exists; sleeps $seconds first.
            'app/Jobs/Flaky.php' => <<<'PHP'
                <?php
                namespace App\Jobs;

                use Illuminate\Bus\Queueable;
                use Illuminate\Contracts\Queue\ShouldQueue;
                use Illuminate\Foundation\Bus\Dispatchable;
                use Illuminate\Queue\InteractsWithQueue;

                class Flaky implements ShouldQueue
                {
                    use Dispatchable, InteractsWithQueue, Queueable;

                    public function __construct(public string $log, public string $okFile, public string $seconds = '0')
                    {
                    }

                    public function handle(): void
                    {
                        file_put_contents($this->log, sprintf("start attempt=%d at=%.3f\n", $this->attempts(), microtime(true)), FILE_APPEND);
                        // Works for $seconds, whatever signals interrupt usleep().
                        $until = microtime(true) + (float) $this->seconds;
                        while (($left = $until - microtime(true)) > 0) {
                            usleep((int) min($left * 1e6, 20_000));
                        }
                        if (!file_exists($this->okFile)) {
                            throw new \RuntimeException('flaky failure on attempt ' . $this->attempts());
                        }
                        file_put_contents($this->log, sprintf("done attempt=%d at=%.3f\n", $this->attempts(), microtime(true)), FILE_APPEND);
                    }
                }
                PHP,
            // Does nothing: for the benchmark.
            'app/Jobs/Noop.php' => <<<'PHP'
                <?php
                namespace App\Jobs;

                use Illuminate\Bus\Queueable;
                use Illuminate\Contracts\Queue\ShouldQueue;
                use Illuminate\Foundation\Bus\Dispatchable;
                use Illuminate\Queue\InteractsWithQueue;

                class Noop implements ShouldQueue
                {
                    use Dispatchable, InteractsWithQueue, Queueable;

                    public function __construct(public string $n = '')
                    {
                    }

                    public function handle(): void
                    {
                    }
                }
                PHP,
        ];
        foreach ($files as $path => $content) {
            if ($path === 'vendor/autoload.php') {
                $content = str_replace('PSR4', var_export($psr4, true), $content);
            }
            file_put_contents($this->dir . '/' . $path, $content . "\n");
        }
        $pdo = $this->pdo();
        // The tables of Laravel 8's queue:failed-table and queue:table migrations.
        $pdo->exec('CREATE TABLE failed_jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, uuid VARCHAR UNIQUE NOT NULL,
            connection TEXT NOT NULL, queue TEXT NOT NULL, payload TEXT NOT NULL, exception TEXT NOT NULL,
            failed_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP)');
        $pdo->exec('CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, queue VARCHAR NOT NULL, payload TEXT NOT NULL,
            attempts INTEGER NOT NULL, reserved_at INTEGER, available_at INTEGER NOT NULL, created_at INTEGER NOT NULL)');
        $pdo->exec('CREATE INDEX jobs_queue_index ON jobs (queue)');
    }
}
