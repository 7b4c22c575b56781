<?php

declare(strict_types=1);

namespace AmqpRs\Tests\Support;

/**
 * A php-fpm pool behind nginx, both of our own: Debian's php-fpmX.Y (this PHP's) and nginx binaries, run
 * with configs written to a temp dir (pid files, logs, the FastCGI socket, nginx's temp paths),
 * listening on 127.0.0.1 at a free high port. /etc/php and the system nginx are never read or
 * touched: php-fpm runs with -n (no php.ini) and loads exactly the extensions it is given, and
 * nginx gets its config with -c, its prefix with -p and its first error log with -e.
 *
 * The pool is pm=static with a fixed number of workers, so that a test knows which processes
 * serve its requests (workerPids()) and a bench can read their RSS after a run.
 *
 * Used by php-tests/FpmTest.php (and the tests of persistent connections) and by
 * benches/web.php. stop() ends what start() started, by pid (the fpm master, its workers, the
 * nginx master and its worker), and nothing else; it runs at the latest when PHP shuts down.
 */
final class Fpm
{
    /** Debian's php-fpm of the PHP version running the tests (8.2 on the host, 8.4 in make matrix). */
    public const FPM = '/usr/sbin/php-fpm' . PHP_MAJOR_VERSION . '.' . PHP_MINOR_VERSION;
    public const NGINX = '/usr/sbin/nginx';

    /** The temp dir with the configs, logs, socket and pid files. */
    public readonly string $dir;
    public readonly int $port;

    /** @var array{0: resource, 1: int}|null the fpm master's proc handle and pid */
    private ?array $fpm = null;
    /** @var array{0: resource, 1: int}|null the nginx master's proc handle and pid */
    private ?array $nginx = null;
    /** @var array<int, string> every child seen (pid => start time), to end any left behind by its master */
    private array $children = [];

    /** Why the pool cannot run here, or null. */
    public static function missing(): ?string
    {
        foreach ([self::FPM => 'php' . PHP_MAJOR_VERSION . '.' . PHP_MINOR_VERSION . '-fpm', self::NGINX => 'nginx'] as $bin => $package) {
            if (!is_executable($bin)) {
                return "$bin not found (Debian package $package, scripts/setup.sh installs it)";
            }
        }
        return null;
    }

    /**
     * @param string $docroot PHP scripts served at /NAME.php; any other path goes to /index.php
     * @param int $workers fpm workers (pm=static)
     * @param list<string> $phpArgs php-fpm -d settings, e.g. ['extension=/path/libamqp_rs.so']
     * @param array<string, string> $env environment of the workers (getenv() in the scripts)
     */
    public function __construct(
        public readonly string $docroot,
        public readonly int $workers = 2,
        public readonly array $phpArgs = [],
        public readonly array $env = [],
    ) {
        if (($why = self::missing()) !== null) {
            throw new \RuntimeException($why);
        }
        $this->dir = sys_get_temp_dir() . '/amqp_rs_fpm_' . getmypid() . '_' . bin2hex(random_bytes(4));
        mkdir($this->dir . '/nginx-tmp', 0777, true);
        $this->port = self::freePort();
        register_shutdown_function(fn () => $this->stop());
    }

    /** Starts php-fpm, then nginx; returns once both answer. */
    public function start(float $timeout = 20.0): void
    {
        $deadline = microtime(true) + $timeout;
        file_put_contents("$this->dir/fpm.conf", $this->fpmConf());
        file_put_contents("$this->dir/nginx.conf", $this->nginxConf());
        $args = [];
        foreach ($this->phpArgs as $setting) {
            array_push($args, '-d', $setting);
        }
        // -R: the pool may run as root (CI and this machine run as root); as another user it is
        // a no-op and the workers run as that user.
        $this->fpm = $this->spawn([self::FPM, '-F', '-n', '-R', '-y', "$this->dir/fpm.conf",
            '-d', "error_log=$this->dir/php-errors.log", '-d', 'log_errors=1', '-d', 'display_errors=0', ...$args], 'fpm');
        while (count($this->workerPids()) < $this->workers || !file_exists("$this->dir/fpm.sock")) {
            $this->waitStep($deadline, $this->fpm, 'php-fpm');
        }
        $this->nginx = $this->spawn([self::NGINX, '-c', "$this->dir/nginx.conf", '-p', "$this->dir/", '-e', "$this->dir/nginx-error.log"], 'nginx');
        while (!self::answers($this->port)) {
            $this->waitStep($deadline, $this->nginx, 'nginx');
        }
    }

    public function url(string $path): string
    {
        return "http://127.0.0.1:$this->port/" . ltrim($path, '/');
    }

    /**
     * One GET request through nginx; returns [HTTP status, body].
     */
    public function get(string $path, float $timeout = 30.0): array
    {
        $context = stream_context_create(['http' => ['ignore_errors' => true, 'timeout' => $timeout,
            'header' => "Connection: close\r\n"]]);
        $body = @file_get_contents($this->url($path), false, $context);
        if ($body === false) {
            throw new \RuntimeException("GET {$this->url($path)} failed: " . (error_get_last()['message'] ?? '?') . $this->logs());
        }
        // $http_response_header is set by file_get_contents() in this scope.
        preg_match('#^HTTP/\S+ (\d{3})#', $http_response_header[0] ?? '', $m);
        return [(int) ($m[1] ?? 0), $body];
    }

    /** @return list<int> the pids of the fpm workers, oldest first */
    public function workerPids(): array
    {
        $pids = $this->fpm ? self::childrenOf($this->fpm[1]) : [];
        $this->remember($pids);
        return $pids;
    }

    /** @return array{rss_kb: int, threads: int} of a process, from /proc/PID/status */
    public static function processStatus(int $pid): array
    {
        $status = (string) @file_get_contents("/proc/$pid/status");
        preg_match('/^VmRSS:\s+(\d+)/m', $status, $rss);
        preg_match('/^Threads:\s+(\d+)/m', $status, $threads);
        return ['rss_kb' => (int) ($rss[1] ?? 0), 'threads' => (int) ($threads[1] ?? 0)];
    }

    /**
     * The local ports of the established TCP connections that process $pid holds to
     * 127.0.0.1:$remotePort (e.g. a worker's connections to the broker), read from /proc: what
     * the kernel sees, not what any AMQP client says. Two requests on one worker that show the
     * same port used the same connection.
     *
     * @return list<int>
     */
    public static function tcpConnections(int $pid, int $remotePort): array
    {
        $inodes = [];
        foreach (glob("/proc/$pid/fd/*") ?: [] as $fd) {
            if (preg_match('/^socket:\[(\d+)\]$/', (string) @readlink($fd), $m)) {
                $inodes[$m[1]] = true;
            }
        }
        $ports = [];
        // Fields: sl local_address rem_address st ... inode (10th); addresses are hex IP:port.
        foreach (array_slice(file("/proc/$pid/net/tcp", FILE_IGNORE_NEW_LINES) ?: [], 1) as $line) {
            $f = preg_split('/\s+/', trim($line));
            if (count($f) > 9 && $f[3] === '01' && $f[2] === sprintf('0100007F:%04X', $remotePort) && isset($inodes[$f[9]])) {
                $ports[] = hexdec(substr($f[1], -4));
            }
        }
        sort($ports);
        return $ports;
    }

    /** The tails of the fpm, PHP and nginx logs, for failure messages. */
    public function logs(int $lines = 20): string
    {
        $out = '';
        foreach (['fpm.out', 'php-errors.log', 'nginx-error.log', 'nginx.out'] as $log) {
            $text = trim((string) @file_get_contents("$this->dir/$log"));
            if ($text !== '') {
                $out .= "\n--- $log\n" . implode("\n", array_slice(explode("\n", $text), -$lines));
            }
        }
        return $out;
    }

    /** Ends nginx and php-fpm (masters, then any worker left), removes the dir. Idempotent. */
    public function stop(): void
    {
        foreach (['nginx', 'fpm'] as $what) {
            if ($this->$what === null) {
                continue;
            }
            [$proc, $pid] = $this->$what;
            $this->remember(self::childrenOf($pid));
            if (proc_get_status($proc)['running']) {
                posix_kill($pid, SIGTERM);
            }
            $deadline = microtime(true) + 5.0;
            while (proc_get_status($proc)['running'] && microtime(true) < $deadline) {
                usleep(10_000);
            }
            if (proc_get_status($proc)['running']) {
                posix_kill($pid, SIGKILL);
            }
            proc_close($proc);
            $this->$what = null;
        }
        // A worker outlives its master only if the master was killed: end those still ours (the
        // same pid with the same start time: never a process that got a recycled pid).
        foreach ($this->children as $pid => $started) {
            if (self::startTime($pid) === $started) {
                posix_kill($pid, SIGKILL);
            }
        }
        $this->children = [];
        if (is_dir($this->dir)) {
            exec('rm -rf ' . escapeshellarg($this->dir));
        }
    }

    private function fpmConf(): string
    {
        $env = '';
        foreach ($this->env as $name => $value) {
            $env .= sprintf("env[%s] = %s\n", $name, $value === '' ? '""' : '"' . addcslashes($value, '"\\') . '"');
        }
        return <<<CONF
            [global]
            pid = $this->dir/fpm.pid
            error_log = $this->dir/fpm.log
            daemonize = no
            [pool]
            listen = $this->dir/fpm.sock
            listen.mode = 0666
            pm = static
            pm.max_children = $this->workers
            catch_workers_output = yes
            clear_env = yes
            $env
            CONF;
    }

    private function nginxConf(): string
    {
        $user = posix_getuid() === 0 ? 'user root root;' : '';
        $tmp = "$this->dir/nginx-tmp";
        return <<<CONF
            $user
            daemon off;
            master_process on;
            worker_processes 1;
            pid $this->dir/nginx.pid;
            error_log $this->dir/nginx-error.log warn;
            events { worker_connections 1024; }
            http {
                access_log off;
                client_body_temp_path $tmp/body;
                fastcgi_temp_path $tmp/fastcgi;
                proxy_temp_path $tmp/proxy;
                uwsgi_temp_path $tmp/uwsgi;
                scgi_temp_path $tmp/scgi;
                default_type text/plain;
                keepalive_requests 100000;
                server {
                    listen 127.0.0.1:$this->port;
                    root $this->docroot;
                    location / { try_files \$uri /index.php\$is_args\$args; }
                    location ~ \.php$ {
                        try_files \$uri =404;
                        fastcgi_pass unix:$this->dir/fpm.sock;
                        fastcgi_param SCRIPT_FILENAME \$document_root\$fastcgi_script_name;
                        fastcgi_param SCRIPT_NAME \$fastcgi_script_name;
                        fastcgi_param QUERY_STRING \$query_string;
                        fastcgi_param REQUEST_METHOD \$request_method;
                        fastcgi_param CONTENT_TYPE \$content_type;
                        fastcgi_param CONTENT_LENGTH \$content_length;
                        fastcgi_param REQUEST_URI \$request_uri;
                        fastcgi_param DOCUMENT_URI \$document_uri;
                        fastcgi_param DOCUMENT_ROOT \$document_root;
                        fastcgi_param SERVER_PROTOCOL \$server_protocol;
                        fastcgi_param GATEWAY_INTERFACE CGI/1.1;
                        fastcgi_param SERVER_SOFTWARE nginx;
                        fastcgi_param REMOTE_ADDR \$remote_addr;
                        fastcgi_param REMOTE_PORT \$remote_port;
                        fastcgi_param SERVER_ADDR \$server_addr;
                        fastcgi_param SERVER_PORT \$server_port;
                        fastcgi_param SERVER_NAME \$server_name;
                        fastcgi_param HTTP_HOST \$host;
                    }
                }
            }
            CONF;
    }

    /** @return array{0: resource, 1: int} */
    private function spawn(array $cmd, string $name): array
    {
        $out = "$this->dir/$name.out";
        $proc = proc_open($cmd, [0 => ['file', '/dev/null', 'r'], 1 => ['file', $out, 'a'], 2 => ['file', $out, 'a']], $pipes);
        if (!is_resource($proc)) {
            throw new \RuntimeException('cannot start ' . implode(' ', $cmd));
        }
        return [$proc, proc_get_status($proc)['pid']];
    }

    /** One poll step of start(): fails if the process exited or the deadline passed. */
    private function waitStep(float $deadline, array $spawned, string $what): void
    {
        if (!proc_get_status($spawned[0])['running']) {
            $this->stop();
            throw new \RuntimeException("$what exited while starting" . $this->logs());
        }
        if (microtime(true) > $deadline) {
            $logs = $this->logs();
            $this->stop();
            throw new \RuntimeException("$what did not come up in time" . $logs);
        }
        usleep(20_000);
    }

    /** @return list<int> the pids whose parent is $parent, in pid order */
    private static function childrenOf(int $parent): array
    {
        $pids = [];
        foreach (glob('/proc/[0-9]*/stat') ?: [] as $stat) {
            $line = (string) @file_get_contents($stat);
            // The command name (in parentheses) may hold spaces: read after its closing one.
            $fields = explode(' ', substr($line, (int) strrpos($line, ')') + 2));
            if (isset($fields[1]) && (int) $fields[1] === $parent) {
                $pids[] = (int) basename(dirname($stat));
            }
        }
        sort($pids);
        return $pids;
    }

    /** @param list<int> $pids */
    private function remember(array $pids): void
    {
        foreach ($pids as $pid) {
            $this->children[$pid] ??= self::startTime($pid);
        }
    }

    /** Field 22 of /proc/PID/stat (start time in clock ticks), or null when the pid is gone. */
    private static function startTime(int $pid): ?string
    {
        $line = (string) @file_get_contents("/proc/$pid/stat");
        if ($line === '') {
            return null;
        }
        // The command name (in parentheses) may hold spaces: count fields after its closing one.
        $fields = explode(' ', substr($line, (int) strrpos($line, ')') + 2));
        return $fields[19] ?? null;
    }

    private static function freePort(): int
    {
        $server = stream_socket_server('tcp://127.0.0.1:0', $errno, $error);
        if ($server === false) {
            throw new \RuntimeException("no free port: $error");
        }
        $name = (string) stream_socket_get_name($server, false);
        $port = (int) substr($name, (int) strrpos($name, ':') + 1);
        fclose($server);
        return $port;
    }

    private static function answers(int $port): bool
    {
        $socket = @stream_socket_client("tcp://127.0.0.1:$port", $errno, $error, 0.2);
        if ($socket === false) {
            return false;
        }
        fclose($socket);
        return true;
    }
}
