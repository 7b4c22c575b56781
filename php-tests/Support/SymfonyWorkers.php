<?php

declare(strict_types=1);

namespace AmqpRs\Tests\Support;

use AmqpRs\ChannelException;
use AmqpRs\Connection;

/**
 * What SymfonyTest does with the application's processes: dispatch scripts, console commands
 * and a background `messenger:consume`, their environment (the DSNs of the test's queues), and
 * what the handlers and the broker say afterwards. The test class provides self::$app, $proc,
 * $work, $queue and $dsnOptions.
 */
trait SymfonyWorkers
{
    use BackgroundWorker;

    /** Hosts of the DSN, when not the test broker alone. */
    private ?string $dsnHosts = null;
    private ?int $retries = null;

    private function withRetries(int $max): void
    {
        $this->retries = $max;
    }

    private function dispatch(string $message, int $count, int $delayMs, string ...$args): array
    {
        return $this->dispatchWith([], 0, $message, $count, $delayMs, ...$args);
    }

    /** Runs bin/dispatch.php; returns its report (exit code $expect: 0, or 3 with the exception). */
    private function dispatchWith(array $env, int $expect, string $message, int $count, int $delayMs, string ...$args): array
    {
        [$code, $out, $err] = SymfonyApp::run(self::$app->dispatch($message, $count, $delayMs, ...$args), $this->env($env));
        $this->assertSame($expect, $code, "dispatch.php: $out $err");
        return json_decode($out, true, 512, JSON_THROW_ON_ERROR);
    }

    /** @return array{int, string, string, float} exit code, stdout, stderr, seconds */
    private function console(string ...$args): array
    {
        return SymfonyApp::run(self::$app->console(...$args), $this->env(), 60.0);
    }

    /** Starts `messenger:consume async` in the background; returns its pid. */
    private function startWorker(string ...$options): int
    {
        return $this->startBackground(self::$app->console('messenger:consume', 'async', ...$options));
    }

    /**
     * A CA, a certificate for localhost signed by it, another CA, and Support/proxy.php (tls mode)
     * serving TLS in front of the broker with that certificate; ended with the test.
     *
     * @return array{string, int} the directory of the PEM files (ca.pem, other-ca.pem), the port
     */
    private function tlsProxy(): array
    {
        $dir = "$this->work/tls";
        mkdir($dir);
        $d = escapeshellarg($dir);
        exec('bash -c ' . escapeshellarg(<<<SH
            set -e; cd $d
            for ca in ca other-ca; do
              openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=amqp_rs symfony \$ca" -keyout \$ca.key -out \$ca.pem
            done
            printf 'subjectAltName=DNS:localhost\n' > server.ext
            openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server.key -out server.csr
            openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile server.ext -out server.pem
            SH) . ' 2>&1', $out, $code);
        $this->assertSame(0, $code, implode("\n", $out));
        $this->tlsProxy = proc_open([PHP_BINARY, dirname(__DIR__) . '/Support/proxy.php', 'tls', "$dir/server.pem", "$dir/server.key"], [0 => ['pipe', 'r'], 1 => ['pipe', 'w'], 2 => STDERR], $pipes);
        $this->tlsProxyStdin = $pipes[0];
        $port = (int) trim((string) fgets($pipes[1]));
        $this->assertGreaterThan(0, $port, 'the TLS proxy did not start');
        return [$dir, $port];
    }

    /** @return array<string, float> from the Flaky log: message id => time of its "$what" line (each at most once) */
    private function lines(string $what): array
    {
        $lines = [];
        foreach ($this->times($what) as [$id, $at]) {
            $this->assertArrayNotHasKey($id, $lines, "$what $id twice");
            $lines[$id] = $at;
        }
        return $lines;
    }

    /** @return list<array{string, float}> from the Flaky log: [message id, time] of each "$what" line */
    private function times(string $what): array
    {
        preg_match_all("/^$what (\\S+) at=([\\d.]+)$/m", (string) @file_get_contents("$this->work/log"), $m, PREG_SET_ORDER);
        return array_map(fn ($l) => [$l[1], (float) $l[2]], $m);
    }

    /** Messages of the test's queue, ready and unacked (rabbitmqctl's count; queueStatus() has only the ready ones). */
    private function messagesWithUnacked(): int
    {
        foreach (explode("\n", Broker::ctl('list_queues', '-q', 'name', 'messages')) as $line) {
            $fields = explode("\t", trim($line));
            if ($fields[0] === $this->queue) {
                return (int) ($fields[1] ?? 0);
            }
        }
        return -1;
    }

    /** @return list<string> broker pids of the connections named after this test */
    private function connectionPids(): array
    {
        $pids = [];
        foreach (explode("\n", Broker::ctl('list_connections', '-q', 'pid', 'client_properties')) as $line) {
            if (str_contains($line, $this->dsnOptions['connection_name'])) {
                $pids[] = explode("\t", $line)[0];
            }
        }
        return $pids;
    }

    private function consumers(): int
    {
        try {
            return (new Connection(self::brokerUri()))->queueStatus($this->queue)['consumers'];
        } catch (ChannelException) {
            return 0;
        }
    }

    /**
     * The test broker's URI: Broker::uri() where the suite has it (AMQP_RS_TEST_URI, for a run
     * against another node), else the host's broker.
     */
    private static function brokerUri(): string
    {
        return Broker::uri();
    }

    /** An amqp-rs:// DSN for $queue on the test broker (its host:port, or $this->dsnHosts). */
    private function dsn(string $queue, array $options): string
    {
        $u = parse_url(self::brokerUri());
        $hosts = $this->dsnHosts ?? ($u['host'] ?? '127.0.0.1') . ':' . ($u['port'] ?? 5672);
        $vhost = ltrim($u['path'] ?? '', '/');
        return sprintf('amqp-rs://%s:%s@%s/%s/%s', $u['user'] ?? 'guest', $u['pass'] ?? 'guest', $hosts, $vhost === '' ? '%2f' : $vhost, rawurlencode($queue))
            . ($options === [] ? '' : '?' . http_build_query($options));
    }

    private function env(array $extra = []): array
    {
        $env = $extra + [
            'MESSENGER_TRANSPORT_DSN' => $this->dsn($this->queue, $this->dsnOptions),
            'MESSENGER_FAILED_DSN' => $this->dsn("{$this->queue}.failed", ['connection_name' => "symfony-test-failed-{$this->queue}"]),
            'MESSENGER_LOW_DSN' => $this->dsn("{$this->queue}.low", ['connection_name' => "symfony-test-low-{$this->queue}"]),
        ];
        if ($this->retries !== null) {
            $env['MESSENGER_MAX_RETRIES'] = (string) $this->retries;
        }
        return $env;
    }
}
