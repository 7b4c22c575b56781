<?php

declare(strict_types=1);

namespace AmqpRs\Tests\Support;

require_once __DIR__ . '/LaravelApp.php';

/**
 * A minimal Symfony application in a temporary directory, on Debian's Symfony packages
 * (/usr/share/php/Symfony, no Composer): a MicroKernelTrait kernel with FrameworkBundle and
 * the amqp-rs bundle (symfony/src, listed in config/bundles.php as a user would), bin/console,
 * config/packages/messenger.yaml whose transports come from the environment, and messages with
 * their handlers (#[AsMessageHandler], known to Symfony 5.4 to 7.x). Used by
 * php-tests/SymfonyTest.php and benches/symfony.php.
 *
 * Environment of each process: MESSENGER_TRANSPORT_DSN (transport "async", where the
 * messages are routed), MESSENGER_FAILED_DSN (the failure transport "failed"),
 * MESSENGER_LOW_DSN (transport "low", where App\Message\LowLine goes), MESSENGER_MAX_RETRIES,
 * MESSENGER_SQLITE (the database file of a doctrine:// transport, for the bench).
 */
final class SymfonyApp
{
    public const SYMFONY = '/usr/share/php/Symfony';

    public readonly string $dir;

    /** Why the application cannot be built here, or null. */
    public static function missing(): ?string
    {
        foreach (['Bundle/FrameworkBundle', 'Component/Messenger', 'Component/Console', 'Component/Yaml'] as $part) {
            if (!is_file(self::SYMFONY . "/$part/autoload.php")) {
                return "Symfony's $part is not installed (Debian packages php-symfony-messenger, php-symfony-framework-bundle, php-symfony-console, php-symfony-yaml; scripts/setup.sh installs them)";
            }
        }
        if (!extension_loaded('pcntl') || !extension_loaded('posix')) {
            return 'pcntl and posix are needed for messenger:consume';
        }
        return null;
    }

    /** Whether Debian's Doctrine DBAL, Persistence and Messenger's Doctrine bridge are installed. */
    public static function hasDoctrine(): bool
    {
        return is_file(self::SYMFONY . '/Component/Messenger/Bridge/Doctrine/autoload.php')
            && is_file('/usr/share/php/Doctrine/DBAL/autoload.php') && is_file('/usr/share/php/Doctrine/Persistence/autoload.php');
    }

    /** The Symfony version the application runs on. */
    public static function version(): string
    {
        $source = (string) @file_get_contents(self::SYMFONY . '/Component/HttpKernel/Kernel.php');
        return preg_match("/const VERSION = '([^']+)'/", $source, $m) ? $m[1] : 'unknown';
    }

    /** @param string $extension the amqp_rs shared object child processes load */
    public function __construct(public readonly string $extension, private readonly array $phpArgs = [])
    {
        $this->dir = sys_get_temp_dir() . '/amqp_rs_symfony_' . getmypid() . '_' . bin2hex(random_bytes(4));
        $this->build();
    }

    /** The command line of `php bin/console ...` with the extension loaded. */
    public function console(string ...$args): array
    {
        return [PHP_BINARY, '-d', 'extension=' . $this->extension, ...$this->phpArgs, $this->dir . '/bin/console', ...$args];
    }

    /** The command line of bin/dispatch.php: php dispatch.php <Message> <count> [delay ms] [args...] ({i} = index). */
    public function dispatch(string $message, int $count, int $delayMs, string ...$args): array
    {
        return [PHP_BINARY, '-d', 'extension=' . $this->extension, ...$this->phpArgs, $this->dir . '/bin/dispatch.php', $message, (string) $count, (string) $delayMs, ...$args];
    }

    /** Runs a command to its end; returns [exit code, stdout, stderr, seconds]. */
    public static function run(array $cmd, array $env = [], float $timeout = 60.0): array
    {
        return LaravelApp::run($cmd, $env, $timeout);
    }

    public function remove(): void
    {
        if (is_dir($this->dir)) {
            exec('rm -rf ' . escapeshellarg($this->dir));
        }
    }

    private function build(): void
    {
        foreach (['bin', 'config/packages', 'src/Message', 'src/MessageHandler', 'src/Doctrine', 'vendor', 'var'] as $sub) {
            mkdir($this->dir . '/' . $sub, 0777, true);
        }
        $package = dirname(__DIR__, 2) . '/symfony';
        $composer = json_decode((string) file_get_contents("$package/composer.json"), true, 512, JSON_THROW_ON_ERROR);
        $psr4 = ['App\\' => $this->dir . '/src/'];
        foreach ($composer['autoload']['psr-4'] as $prefix => $path) {
            $psr4[$prefix] = "$package/$path";
        }
        $files = self::files() + self::messages();
        if (self::hasDoctrine()) {
            // Only for the bench's doctrine:// transport (DoctrineBundle is not in Debian 12):
            // a registry of one sqlite connection, and Messenger's Doctrine transport factory.
            $files['config/services.yaml'] .= "\n" . <<<'YAML'
                    App\Doctrine\Registry:
                        arguments: ['%env(default::MESSENGER_SQLITE)%']
                    Symfony\Component\Messenger\Bridge\Doctrine\Transport\DoctrineTransportFactory:
                        arguments: ['@App\Doctrine\Registry']
                        tags: [messenger.transport_factory]
                YAML;
        } else {
            unset($files['src/Doctrine/Registry.php']);
        }
        foreach ($files as $path => $content) {
            $content = str_replace('PSR4', var_export($psr4, true), $content);
            file_put_contents($this->dir . '/' . $path, $content . "\n");
        }
        chmod($this->dir . '/bin/console', 0755);
    }

    /** @return array<string, string> the application's skeleton */
    private static function files(): array
    {
        return [
            'vendor/autoload.php' => <<<'PHP'
                <?php
                // Debian's Symfony packages: each component's autoloader from /usr/share/php.
                foreach (['Bundle/FrameworkBundle', 'Component/Messenger', 'Component/Console', 'Component/Yaml',
                          'Component/Messenger/Bridge/Amqp', 'Component/Messenger/Bridge/Doctrine'] as $part) {
                    if (is_file("/usr/share/php/Symfony/$part/autoload.php")) {
                        require_once "/usr/share/php/Symfony/$part/autoload.php";
                    }
                }
                // Symfony 6+ asks Composer's InstalledVersions which packages are there (Debian's
                // composer package has it); without it FrameworkBundle refuses to build.
                foreach (['Composer/InstalledVersions.php', 'Doctrine/DBAL/autoload.php', 'Doctrine/Persistence/autoload.php'] as $file) {
                    if (is_file("/usr/share/php/$file")) {
                        require_once "/usr/share/php/$file";
                    }
                }
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
            'src/Kernel.php' => <<<'PHP'
                <?php
                namespace App;

                use Symfony\Bundle\FrameworkBundle\Kernel\MicroKernelTrait;
                use Symfony\Component\HttpKernel\Kernel as BaseKernel;

                class Kernel extends BaseKernel
                {
                    use MicroKernelTrait;

                    public function getProjectDir(): string
                    {
                        return \dirname(__DIR__);
                    }
                }
                PHP,
            'bin/console' => <<<'PHP'
                #!/usr/bin/env php
                <?php
                require dirname(__DIR__) . '/vendor/autoload.php';
                $kernel = new App\Kernel('prod', false);
                $application = new Symfony\Bundle\FrameworkBundle\Console\Application($kernel);
                exit($application->run(new Symfony\Component\Console\Input\ArgvInput()));
                PHP,
            // php bin/dispatch.php <Message> <count> [delay ms] [args...]: dispatches through the
            // bus (routed to "async"); prints how long it took, or the exception it got.
            'bin/dispatch.php' => <<<'PHP'
                <?php
                require dirname(__DIR__) . '/vendor/autoload.php';
                $kernel = new App\Kernel('prod', false);
                $kernel->boot();
                $bus = $kernel->getContainer()->get('app.bus');
                [, $message, $count, $delay] = $argv + [3 => '0'];
                $class = 'App\\Message\\' . $message;
                $args = array_slice($argv, 4);
                $start = microtime(true);
                try {
                    for ($i = 0; $i < (int) $count; $i++) {
                        $stamps = (int) $delay > 0 ? [new Symfony\Component\Messenger\Stamp\DelayStamp((int) $delay)] : [];
                        if (getenv('DISPATCH_ROUTING_KEY')) {
                            $stamps[] = new AmqpRs\Symfony\Messenger\Transport\AmqpRsStamp(getenv('DISPATCH_ROUTING_KEY'), ['priority' => 3, 'headers' => ['x-tenant' => 'acme']]);
                        }
                        $bus->dispatch(new $class(...str_replace('{i}', (string) $i, $args)), $stamps);
                    }
                } catch (Throwable $e) {
                    fwrite(STDOUT, json_encode(['error' => get_class($e), 'message' => $e->getMessage(), 'dispatched' => $i]) . "\n");
                    exit(3);
                }
                fwrite(STDOUT, json_encode(['seconds' => microtime(true) - $start, 'dispatched' => $i]) . "\n");
                PHP,
            'config/bundles.php' => <<<'PHP'
                <?php
                return [
                    Symfony\Bundle\FrameworkBundle\FrameworkBundle::class => ['all' => true],
                    AmqpRs\Symfony\Messenger\AmqpRsMessengerBundle::class => ['all' => true],
                ];
                PHP,
            'config/services.yaml' => <<<'YAML'
                parameters:
                    env(MESSENGER_MAX_RETRIES): '2'
                    env(MESSENGER_LOW_DSN): 'in-memory://'
                services:
                    _defaults:
                        autowire: true
                        autoconfigure: true
                    App\:
                        resource: '../src/'
                        exclude: '../src/{Kernel.php,Message,Doctrine}'
                    app.bus:
                        alias: messenger.default_bus
                        public: true
                YAML,
            'config/packages/framework.yaml' => <<<'YAML'
                framework:
                    secret: amqp-rs-test
                    http_method_override: false
                    php_errors:
                        log: false
                YAML,
            'config/packages/messenger.yaml' => <<<'YAML'
                framework:
                    messenger:
                        failure_transport: failed
                        transports:
                            # The one line that puts Messenger on amqp_rs: an amqp-rs:// DSN.
                            async:
                                dsn: '%env(MESSENGER_TRANSPORT_DSN)%'
                                retry_strategy:
                                    max_retries: '%env(int:MESSENGER_MAX_RETRIES)%'
                                    delay: 1000
                                    multiplier: 2
                            failed: '%env(MESSENGER_FAILED_DSN)%'
                            # A second transport, for workers of two (messenger:consume async low).
                            low: '%env(MESSENGER_LOW_DSN)%'
                        routing:
                            'App\Message\WriteLine': async
                            'App\Message\LowLine': low
                            'App\Message\Flaky': async
                            'App\Message\Noop': async
                YAML,
        ];
    }

    /** @return array<string, string> the messages, their handlers, the bench's Doctrine registry */
    private static function messages(): array
    {
        return [
            'src/Message/WriteLine.php' => <<<'PHP'
                <?php
                namespace App\Message;

                /** Appends "<text> at=<time>" to a file. */
                class WriteLine
                {
                    public function __construct(public string $file, public string $text)
                    {
                    }
                }
                PHP,
            'src/Message/LowLine.php' => <<<'PHP'
                <?php
                namespace App\Message;

                /** As WriteLine, routed to the "low" transport. */
                class LowLine
                {
                    public function __construct(public string $file, public string $text)
                    {
                    }
                }
                PHP,
            'src/Message/Flaky.php' => <<<'PHP'
                <?php
                namespace App\Message;

                /** Logs "start <id>", works $seconds, then fails unless $okFile exists, else logs "done <id>". */
                class Flaky
                {
                    public function __construct(public string $log, public string $okFile, public string $seconds = '0', public string $id = '0')
                    {
                    }
                }
                PHP,
            'src/Message/Noop.php' => <<<'PHP'
                <?php
                namespace App\Message;

                /** Appends its number and when it was handled to $file (the bench counts them). */
                class Noop
                {
                    public function __construct(public string $file = '', public string $n = '')
                    {
                    }
                }
                PHP,
            'src/MessageHandler/WriteLineHandler.php' => <<<'PHP'
                <?php
                namespace App\MessageHandler;

                use App\Message\WriteLine;
                use Symfony\Component\Messenger\Attribute\AsMessageHandler;

                #[AsMessageHandler]
                class WriteLineHandler
                {
                    public function __invoke(WriteLine $m): void
                    {
                        file_put_contents($m->file, sprintf("%s at=%.3f pid=%d\n", $m->text, microtime(true), getmypid()), FILE_APPEND);
                    }
                }
                PHP,
            'src/MessageHandler/LowLineHandler.php' => <<<'PHP'
                <?php
                namespace App\MessageHandler;

                use App\Message\LowLine;
                use Symfony\Component\Messenger\Attribute\AsMessageHandler;

                #[AsMessageHandler]
                class LowLineHandler
                {
                    public function __invoke(LowLine $m): void
                    {
                        file_put_contents($m->file, sprintf("%s at=%.3f pid=%d\n", $m->text, microtime(true), getmypid()), FILE_APPEND);
                    }
                }
                PHP,
            'src/MessageHandler/FlakyHandler.php' => <<<'PHP'
                <?php
                namespace App\MessageHandler;

                use App\Message\Flaky;
                use Symfony\Component\Messenger\Attribute\AsMessageHandler;

                #[AsMessageHandler]
                class FlakyHandler
                {
                    public function __invoke(Flaky $m): void
                    {
                        file_put_contents($m->log, sprintf("start %s at=%.3f\n", $m->id, microtime(true)), FILE_APPEND);
                        // Works for $seconds, whatever signals interrupt usleep().
                        $until = microtime(true) + (float) $m->seconds;
                        while (($left = $until - microtime(true)) > 0) {
                            usleep((int) min($left * 1e6, 20_000));
                        }
                        if (!file_exists($m->okFile)) {
                            throw new \RuntimeException("flaky failure of {$m->id}");
                        }
                        file_put_contents($m->log, sprintf("done %s at=%.3f\n", $m->id, microtime(true)), FILE_APPEND);
                    }
                }
                PHP,
            'src/MessageHandler/NoopHandler.php' => <<<'PHP'
                <?php
                namespace App\MessageHandler;

                use App\Message\Noop;
                use Symfony\Component\Messenger\Attribute\AsMessageHandler;

                #[AsMessageHandler]
                class NoopHandler
                {
                    /** @var resource|null */
                    private $out = null;

                    public function __invoke(Noop $m): void
                    {
                        if ($m->file !== '') {
                            $this->out ??= fopen($m->file, 'a');
                            fwrite($this->out, $m->n . ' ' . microtime(true) . "\n");
                        }
                    }
                }
                PHP,
            'src/Doctrine/Registry.php' => <<<'PHP'
                <?php
                namespace App\Doctrine;

                use Doctrine\DBAL\DriverManager;

                /** One DBAL connection to an sqlite file, as DoctrineBundle's registry would give it. */
                class Registry implements \Doctrine\Persistence\ConnectionRegistry
                {
                    private $connection;

                    public function __construct(private string $path = '')
                    {
                    }

                    public function getDefaultConnectionName(): string { return 'default'; }
                    public function getConnection(?string $name = null): object
                    {
                        return $this->connection ??= DriverManager::getConnection(['driver' => 'pdo_sqlite', 'path' => $this->path]);
                    }
                    public function getConnections(): array { return ['default' => $this->getConnection()]; }
                    public function getConnectionNames(): array { return ['default' => 'default']; }
                }
                PHP,
        ];
    }
}
