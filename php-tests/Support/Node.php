<?php

declare(strict_types=1);

namespace AmqpRs\Tests\Support;

/**
 * An extra RabbitMQ node of the test's own on this machine, next to the shared broker
 * (rabbit@localhost on 5672), which it never touches.
 *
 * Each node has its own name (NAME@localhost), AMQP port (plain listener on 127.0.0.1), Erlang
 * distribution port (AMQP port + 20000 unless told), and its own config, enabled-plugins
 * (none), mnesia, log and pid files in a temp dir owned by the rabbitmq user. It runs as the
 * rabbitmq user with the shared Erlang cookie (HOME=/var/lib/rabbitmq), so it can cluster with
 * other nodes of the test's own. /etc/rabbitmq/rabbitmq-env.conf is not read
 * (RABBITMQ_CONF_ENV_FILE points to a file of the node's own), so its NODENAME cannot win.
 *
 * A start costs 5-7 s of wall time and ~4 s of CPU (most of it loading ~950 modules), so
 * start several nodes with startMany(), which boots them side by side, and prefer
 * joinCluster() (one rabbitmqctl run) to separate ctl() calls: each rabbitmqctl run costs
 * ~0.5 s of CPU.
 *
 * Every node started is stopped and its dir removed at the latest when PHP shuts down.
 */
final class Node
{
    private const SERVER = '/usr/lib/rabbitmq/bin/rabbitmq-server';
    private const CTL = '/usr/lib/rabbitmq/bin/rabbitmqctl';
    private const HOME = '/var/lib/rabbitmq';
    private const USER = 'rabbitmq';

    /** @var array<string, Node> nodes not stopped yet, by name */
    private static array $live = [];
    private static bool $shutdownRegistered = false;
    /** @var list<int> ports freePort() gave out in this process */
    private static array $handedOut = [];

    /** Full node name, e.g. amqprs-x1@localhost. */
    public readonly string $name;
    public readonly int $port;
    public readonly int $distPort;
    /** The node's temp dir (owned by rabbitmq); config, data and logs live here. */
    public readonly string $dir;

    /** The OS pid of the node's beam.smp, known once it is up. */
    private ?int $pid = null;
    /** The OS pid of the rabbitmq-server shell that runs the beam (its parent). */
    private ?int $launcher = null;
    private bool $stopped = false;

    private function __construct(string $name, int $port, int $distPort, string $dir)
    {
        $this->name = $name;
        $this->port = $port;
        $this->distPort = $distPort;
        $this->dir = $dir;
    }

    /**
     * Starts a node and waits until it is up (its AMQP port answers and `rabbitmqctl
     * await_startup` returns). $extraConfig: rabbitmq.conf lines (sysctl format) appended to
     * the node's config, e.g. `listeners.ssl.default = 5799` and `ssl_options.*`; files it
     * names must be readable by the rabbitmq user.
     */
    public static function start(string $name, int $amqpPort, string $extraConfig = '', ?int $distPort = null, float $timeout = 60.0): self
    {
        return self::startMany([[$name, $amqpPort, $extraConfig, $distPort]], $timeout)[0];
    }

    /**
     * Starts several nodes side by side (on 2 cores, 3 nodes take 7-11 s instead of 16-20 s)
     * and waits until all are up.
     *
     * @param list<array{0: string, 1: int, 2?: string, 3?: ?int}> $specs [name, amqpPort, extraConfig, distPort]
     * @return list<Node>
     */
    public static function startMany(array $specs, float $timeout = 60.0): array
    {
        $nodes = [];
        try {
            foreach ($specs as $spec) {
                $node = self::prepare($spec[0], $spec[1], $spec[2] ?? '', $spec[3] ?? null);
                $nodes[] = $node;
                $node->launch();
            }
            foreach ($nodes as $node) {
                $node->awaitUp($timeout);
            }
        } catch (\Throwable $e) {
            foreach ($nodes as $node) {
                $node->stop();
            }
            throw $e;
        }
        return $nodes;
    }

    /**
     * A port P in 5700..5999 such that P .. P+$span-1 and the default dist port P+20000 are
     * free on 127.0.0.1 (for a node's AMQP port, and e.g. its TLS port at P+1).
     */
    public static function freePort(int $span = 1): int
    {
        for ($try = 0; $try < 200; $try++) {
            $base = random_int(5700, 6000 - $span);
            $ports = array_merge(range($base, $base + $span - 1), [$base + 20000]);
            if (!array_intersect($ports, self::$handedOut) && !array_filter($ports, [self::class, 'portAnswers'])) {
                array_push(self::$handedOut, ...$ports);
                return $base;
            }
        }
        throw new \RuntimeException('no free port in 5700..5999');
    }

    public function uri(string $user = 'guest', string $password = 'guest', string $vhost = '%2f'): string
    {
        return sprintf('amqp://%s:%s@127.0.0.1:%d/%s', rawurlencode($user), rawurlencode($password), $this->port, $vhost);
    }

    /** The OS pid of the node's beam.smp (null while it is not running). */
    public function pid(): ?int
    {
        return $this->pid;
    }

    /** Whether the node's beam process is alive (says nothing about the rabbit app). */
    public function isRunning(): bool
    {
        return $this->pid !== null && self::isOurBeam($this->pid, $this->name);
    }

    /** Runs `rabbitmqctl -n NODE ...args` (no shell involved); returns its output; throws on failure. */
    public function ctl(string ...$args): string
    {
        return $this->ctlTimed(60, ...$args);
    }

    /**
     * Leaves its own cluster and joins $seed's: stop_app, reset, join_cluster, start_app, then
     * waits for its AMQP port. The four steps run in one `rabbitmqctl eval` of the functions the
     * four CLI commands call (each rabbitmqctl run costs ~0.5 s of CPU on its own).
     */
    public function joinCluster(Node $seed, bool $ramNode = false, float $timeout = 60.0): void
    {
        $expr = sprintf(
            // (the node's own console gets what the steps log, not our output)
            // RabbitMQ 3.13+ (Khepri or Mnesia) has rabbit_db / rabbit_db_cluster; 4.x has no
            // rabbit_mnesia:reset/0 any more; 3.12 and older have only rabbit_mnesia.
            'group_leader(whereis(user), self()), '
            . '{Reset, Join} = case code:ensure_loaded(rabbit_db_cluster) of '
            . '{module, _} -> {fun rabbit_db:reset/0, fun rabbit_db_cluster:join/2}; '
            . '_ -> {fun rabbit_mnesia:reset/0, fun rabbit_mnesia:join_cluster/2} end, '
            . 'ok = rabbit:stop(), ok = Reset(), '
            . "case Join('%s', %s) of ok -> ok; {ok, already_member} -> ok; E -> exit({join_cluster, E}) end, "
            . 'ok = rabbit:start().',
            $seed->name,
            $ramNode ? 'ram' : 'disc',
        );
        $out = $this->ctlTimed((int) ceil($timeout) + 10, 'eval', $expr);
        if ($out !== 'ok') {
            throw new \RuntimeException("{$this->name} could not join {$seed->name}: $out\n" . $this->logTail());
        }
        $this->waitForPort($timeout);
    }

    /** Stops the rabbit app (the Erlang node stays up, so it can be reset, joined, started again). */
    public function stopApp(): void
    {
        $this->ctl('stop_app');
    }

    /** Starts the rabbit app again (start_app returns once it has booted) and waits for its AMQP port. */
    public function startApp(float $timeout = 60.0): void
    {
        $this->ctlTimed((int) ceil($timeout) + 10, 'start_app');
        $this->waitForPort($timeout);
    }

    /**
     * SIGKILL of the node's beam: a crash, no goodbye to its peers or clients. Waits until the
     * process is gone. restart() brings it back on the same data dir.
     */
    public function kill(): void
    {
        if ($this->pid !== null && self::isOurBeam($this->pid, $this->name)) {
            posix_kill($this->pid, SIGKILL);
        }
        $this->waitGone(10.0);
        $this->pid = null;
    }

    /** Starts the node again on its data dir (after kill() or an external stop) and waits until it is up. */
    public function restart(float $timeout = 60.0): void
    {
        if ($this->stopped) {
            throw new \LogicException("node {$this->name} was stopped and its dir removed; it cannot restart");
        }
        if ($this->isRunning()) {
            throw new \LogicException("node {$this->name} is still running (pid {$this->pid}); kill() it first");
        }
        $this->waitGone(10.0); // the old launcher shell and a port in TIME_WAIT do not matter, the beam does
        $this->launch();
        try {
            $this->awaitUp($timeout);
        } catch (\Throwable $e) {
            $this->stop();
            throw $e;
        }
    }

    /**
     * Graceful `rabbitmqctl stop`, then SIGKILL if the beam is still alive after $grace
     * seconds; removes the node's dir. Idempotent; never throws.
     */
    public function stop(float $grace = 15.0): void
    {
        if ($this->stopped) {
            return;
        }
        $this->stopped = true;
        unset(self::$live[$this->name]);
        $pid = $this->pid ?? $this->readPidFile();
        if ($pid !== null && self::isOurBeam($pid, $this->name)) {
            $this->pid = $pid;
            try {
                // rabbitmqctl stop returns once the node has halted
                $this->ctlTimed((int) ceil($grace), 'stop');
            } catch (\Throwable) {
                // killed below
            }
            $deadline = microtime(true) + $grace;
            while (self::isOurBeam($pid, $this->name) && microtime(true) < $deadline) {
                usleep(50_000);
            }
            if (self::isOurBeam($pid, $this->name)) {
                posix_kill($pid, SIGKILL);
            }
        }
        try {
            $this->waitGone(10.0);
        } catch (\Throwable) {
            // nothing more we may do: never kill what is not provably ours
        }
        $this->pid = null;
        exec('rm -rf ' . escapeshellarg($this->dir));
    }

    /** The last $lines lines of the node's log and of its console output. */
    public function logTail(int $lines = 40): string
    {
        $out = '';
        foreach (["{$this->dir}/log/node.log", "{$this->dir}/console.log"] as $file) {
            if (is_file($file)) {
                $all = file($file, FILE_IGNORE_NEW_LINES) ?: [];
                $out .= "==> $file <==\n" . implode("\n", array_slice($all, -$lines)) . "\n";
            }
        }
        return $out === '' ? "(no log in {$this->dir})\n" : $out;
    }

    /** Stops these nodes side by side (graceful stops in parallel, then as stop()). */
    public static function stopMany(array $nodes): void
    {
        $procs = [];
        foreach ($nodes as $node) {
            if (!$node->stopped && $node->isRunning()) {
                $procs[] = proc_open($node->ctlCommand(15, 'stop'), [0 => ['file', '/dev/null', 'r'], 1 => ['file', '/dev/null', 'w'], 2 => ['file', '/dev/null', 'w']], $pipes, self::HOME);
            }
        }
        foreach ($procs as $proc) {
            if (is_resource($proc)) {
                proc_close($proc);
            }
        }
        foreach ($nodes as $node) {
            $node->stop();
        }
    }

    /** Stops every node this process started and has not stopped yet (also run at shutdown). */
    public static function stopAll(): void
    {
        self::stopMany(array_values(self::$live));
    }

    // ---------------------------------------------------------------------------------------

    /**
     * Kills the nodes that Node started in processes that are gone without stopping them
     * (killed by SIGKILL or Ctrl-C: no shutdown function ran), and removes their dirs.
     * A node is recognised by the AMQP_RS_TEST_NODE_OWNER its environment carries.
     */
    public static function reapOrphans(): void
    {
        foreach (glob('/proc/[0-9]*/environ') ?: [] as $file) {
            $environ = @file_get_contents($file);
            if ($environ === false || !str_contains($environ, 'AMQP_RS_TEST_NODE_OWNER=')) {
                continue;
            }
            $env = [];
            foreach (explode("\0", $environ) as $kv) {
                [$k, $v] = explode('=', $kv, 2) + [1 => ''];
                $env[$k] = $v;
            }
            $owner = (int) ($env['AMQP_RS_TEST_NODE_OWNER'] ?? 0);
            $pid = (int) basename(dirname($file));
            $name = $env['RABBITMQ_NODENAME'] ?? '';
            if ($owner <= 0 || file_exists("/proc/$owner") || !self::isOurBeam($pid, $name)) {
                continue;
            }
            posix_kill($pid, SIGKILL);
            $dir = dirname($env['RABBITMQ_MNESIA_BASE'] ?? '');
            if (preg_match('#^' . preg_quote(sys_get_temp_dir(), '#') . '/amqp_rs_node_[A-Za-z0-9_-]+$#', $dir)) {
                exec('rm -rf ' . escapeshellarg($dir));
            }
        }
    }

    private static function prepare(string $name, int $port, string $extraConfig, ?int $distPort): self
    {
        if (posix_geteuid() !== 0) {
            throw new \RuntimeException('Node needs root: it runs rabbitmq-server and rabbitmqctl as the rabbitmq user');
        }
        if (!self::$shutdownRegistered) {
            self::reapOrphans();
        }
        if (!str_contains($name, '@')) {
            $name .= '@localhost';
        }
        if (!preg_match('/^[A-Za-z0-9_-]+@localhost$/', $name)) {
            throw new \InvalidArgumentException("node name '$name': use letters, digits, - and _ (@localhost is added)");
        }
        if ($name === 'rabbit@localhost') {
            throw new \InvalidArgumentException('rabbit@localhost is the shared broker');
        }
        if (isset(self::$live[$name])) {
            throw new \LogicException("node $name is already running in this process");
        }
        $distPort ??= $port + 20000;
        foreach ([$port, $distPort] as $p) {
            if (self::portAnswers($p)) {
                throw new \RuntimeException("cannot start node $name: port $p on 127.0.0.1 is in use (a node left over?)");
            }
        }
        $short = strstr($name, '@', true);
        $dir = sprintf('%s/amqp_rs_node_%s_%d_%s', sys_get_temp_dir(), $short, getmypid(), bin2hex(random_bytes(3)));
        foreach (['', '/mnesia', '/log'] as $sub) {
            if (!mkdir($dir . $sub, 0755)) {
                throw new \RuntimeException("cannot create $dir$sub");
            }
        }
        $config = "# node $name of the amqp_rs tests\n"
            . "listeners.tcp.1 = 127.0.0.1:$port\n"
            . "log.console = false\n"
            . "log.file.level = info\n"
            . "loopback_users.guest = true\n"
            . trim($extraConfig) . "\n";
        file_put_contents("$dir/rabbitmq.conf", $config);
        file_put_contents("$dir/enabled_plugins", "[].\n");
        // Our own rabbitmq-env.conf, instead of /etc/rabbitmq/rabbitmq-env.conf (whose NODENAME
        // would otherwise be read), with the same distribution settings as the shared broker.
        file_put_contents("$dir/rabbitmq-env.conf", "ERL_EPMD_ADDRESS=127.0.0.1\n"
            . "export ERL_FLAGS=\"-kernel inet_dist_use_interface {127,0,0,1}\"\n");
        exec('chown -R ' . self::USER . ':' . self::USER . ' ' . escapeshellarg($dir), $out, $code);
        if ($code !== 0) {
            throw new \RuntimeException("chown $dir failed: " . implode("\n", $out));
        }

        $node = new self($name, $port, $distPort, $dir);
        self::$live[$name] = $node;
        if (!self::$shutdownRegistered) {
            self::$shutdownRegistered = true;
            $owner = getmypid();
            register_shutdown_function(static function () use ($owner): void {
                // Only the process that started the nodes stops them (not a forked child), and
                // with no test running PHPUnit's error handler has no test to report to.
                if (getmypid() === $owner) {
                    set_error_handler(static fn (): bool => true);
                    self::stopAll();
                }
            });
        }
        return $node;
    }

    /** @return array<string, string> */
    private function env(): array
    {
        $d = $this->dir;
        return [
            'HOME' => self::HOME, // the shared Erlang cookie
            'PATH' => '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
            'LANG' => 'C.UTF-8',
            'RABBITMQ_CONF_ENV_FILE' => "$d/rabbitmq-env.conf",
            'RABBITMQ_NODENAME' => $this->name,
            'RABBITMQ_USE_LONGNAME' => 'false',
            'RABBITMQ_NODE_IP_ADDRESS' => '127.0.0.1',
            'RABBITMQ_NODE_PORT' => (string) $this->port,
            'RABBITMQ_DIST_PORT' => (string) $this->distPort,
            'RABBITMQ_CONFIG_FILE' => "$d/rabbitmq.conf",
            'RABBITMQ_ADVANCED_CONFIG_FILE' => "$d/advanced.config", // absent on purpose
            'RABBITMQ_ENABLED_PLUGINS_FILE' => "$d/enabled_plugins",
            'RABBITMQ_PLUGINS_EXPAND_DIR' => "$d/plugins-expand",
            'RABBITMQ_MNESIA_BASE' => "$d/mnesia",
            'RABBITMQ_MNESIA_DIR' => "$d/mnesia/{$this->name}",
            'RABBITMQ_FEATURE_FLAGS_FILE' => "$d/mnesia/{$this->name}-feature_flags",
            'RABBITMQ_LOG_BASE' => "$d/log",
            'RABBITMQ_LOGS' => "$d/log/node.log",
            'RABBITMQ_PID_FILE' => "$d/pid",
            'AMQP_RS_TEST_NODE_OWNER' => (string) getmypid(), // for reapOrphans()
            // Unbound schedulers: several nodes share 2 cores with the shared broker.
            'RABBITMQ_SCHEDULER_BIND_TYPE' => 'u',
        ];
    }

    /** Runs rabbitmq-server detached from us (own session), as the rabbitmq user. */
    private function launch(): void
    {
        @unlink("{$this->dir}/pid");
        $env = '';
        foreach ($this->env() as $k => $v) {
            $env .= ' ' . escapeshellarg("$k=$v");
        }
        // setpriv execs env, which execs the rabbitmq-server shell: $! is that shell, the
        // beam's parent.
        $cmd = 'cd ' . self::HOME . '; setsid setpriv --reuid=' . self::USER . ' --regid=' . self::USER
            . ' --init-groups env -i' . $env . ' ' . self::SERVER
            . ' >>' . escapeshellarg("{$this->dir}/console.log") . ' 2>&1 </dev/null & echo $!';
        $launcher = (int) trim((string) shell_exec($cmd));
        if ($launcher <= 0) {
            throw new \RuntimeException("cannot launch node {$this->name}");
        }
        $this->launcher = $launcher;
        $this->pid = null;
    }

    private function awaitUp(float $timeout): void
    {
        $this->waitForPort($timeout);
        $this->pid = $this->readPidFile();
        if ($this->pid === null || !self::isOurBeam($this->pid, $this->name)) {
            throw $this->failure('its pid file names no beam of its own');
        }
        try {
            $this->ctlTimed((int) ceil($timeout) + 10, 'await_startup', '--timeout', (string) (int) ceil($timeout));
        } catch (\RuntimeException $e) {
            throw $this->failure($e->getMessage());
        }
    }

    private function waitForPort(float $timeout): void
    {
        $deadline = microtime(true) + $timeout;
        while (!self::portAnswers($this->port)) {
            if ($this->launcher !== null && !file_exists("/proc/{$this->launcher}")) {
                throw $this->failure('it exited while starting');
            }
            if (microtime(true) > $deadline) {
                throw $this->failure(sprintf('its AMQP port %d did not answer within %.0f s', $this->port, $timeout));
            }
            usleep(50_000);
        }
    }

    /** Waits until neither the beam nor its launcher shell is alive. */
    private function waitGone(float $timeout): void
    {
        $deadline = microtime(true) + $timeout;
        while (($this->pid !== null && self::isOurBeam($this->pid, $this->name))
            || ($this->launcher !== null && file_exists("/proc/{$this->launcher}") && !self::isZombie($this->launcher))) {
            if (microtime(true) > $deadline) {
                throw new \RuntimeException("node {$this->name} (pid {$this->pid}) still alive after {$timeout} s");
            }
            usleep(20_000);
        }
        $this->launcher = null;
    }

    private function failure(string $why): \RuntimeException
    {
        return new \RuntimeException("node {$this->name} (AMQP port {$this->port}, dist port {$this->distPort}) did not start: $why\n"
            . $this->logTail());
    }

    private function readPidFile(): ?int
    {
        $pid = @file_get_contents("{$this->dir}/pid");
        return $pid !== false && ctype_digit(trim($pid)) ? (int) trim($pid) : null;
    }

    /** @return list<string> */
    private function ctlCommand(int $timeout, string ...$args): array
    {
        return array_merge(
            ['timeout', '-k', '5', (string) $timeout, 'setpriv', '--reuid=' . self::USER, '--regid=' . self::USER, '--init-groups',
             'env', 'HOME=' . self::HOME, 'LANG=C.UTF-8', self::CTL, '-n', $this->name],
            $args,
        );
    }

    private function ctlTimed(int $timeout, string ...$args): string
    {
        $proc = proc_open($this->ctlCommand($timeout, ...$args), [0 => ['file', '/dev/null', 'r'], 1 => ['pipe', 'w'], 2 => ['redirect', 1]], $pipes, self::HOME);
        if (!is_resource($proc)) {
            throw new \RuntimeException('cannot run rabbitmqctl');
        }
        $out = stream_get_contents($pipes[1]);
        fclose($pipes[1]);
        $code = proc_close($proc);
        if ($code !== 0) {
            throw new \RuntimeException(sprintf("rabbitmqctl -n %s %s failed (%d): %s", $this->name, implode(' ', $args), $code, trim((string) $out)));
        }
        return trim((string) $out);
    }

    private static function portAnswers(int $port): bool
    {
        $sock = @stream_socket_client("tcp://127.0.0.1:$port", $errno, $errstr, 0.2);
        if ($sock === false) {
            return false;
        }
        fclose($sock);
        return true;
    }

    /** Whether $pid is a beam of node $name (its environment says so): we never kill anything else. */
    private static function isOurBeam(int $pid, string $name): bool
    {
        $exe = @readlink("/proc/$pid/exe");
        if ($exe === false || !str_ends_with($exe, '/beam.smp') || self::isZombie($pid)) {
            return false;
        }
        $environ = @file_get_contents("/proc/$pid/environ");
        return $environ !== false && in_array("RABBITMQ_NODENAME=$name", explode("\0", $environ), true);
    }

    private static function isZombie(int $pid): bool
    {
        $stat = @file_get_contents("/proc/$pid/stat");
        return $stat === false || preg_match('/\) Z /', $stat) === 1;
    }
}
