<?php

declare(strict_types=1);

require_once __DIR__ . '/Support/Fpm.php';

use AmqpRs\Tests\Support\Broker;
use AmqpRs\Tests\Support\Fpm;
use PHPUnit\Framework\TestCase;

/**
 * php-fpm behind nginx (Support/Fpm.php), the way most PHP code that publishes runs: requests
 * served by a pool of workers that load the same amqp_rs .so as this PHP.
 */
final class FpmTest extends TestCase
{
    private ?Fpm $fpm = null;
    private string $docroot;

    protected function setUp(): void
    {
        if (($missing = Fpm::missing()) !== null) {
            $this->fail($missing);
        }
        $this->docroot = sys_get_temp_dir() . '/amqp_rs_fpm_docroot_' . getmypid() . '_' . bin2hex(random_bytes(4));
        mkdir($this->docroot);
        // Publishes ?body=... to ?queue=..., waits for the confirm, answers with the worker's pid.
        file_put_contents($this->docroot . '/publish.php', <<<'PHP'
            <?php
            $conn = new AmqpRs\Connection(getenv('AMQP_URI'));
            $producer = $conn->producer();
            $producer->publish($_GET['body'], $_GET['queue']);
            $producer->waitForConfirms(5.0);
            $conn->close();
            echo 'published by ', getmypid(), ' with ', (new ReflectionExtension('amqp_rs'))->getVersion();
            PHP);
    }

    protected function tearDown(): void
    {
        $this->fpm?->stop();
        exec('rm -rf ' . escapeshellarg($this->docroot));
    }

    private function startPool(int $workers, ?array $phpArgs = null): Fpm
    {
        $this->fpm = new Fpm($this->docroot, $workers, $phpArgs ?? ['extension=' . Broker::extensionPath()], ['AMQP_URI' => Broker::uri()]);
        $this->fpm->start();
        return $this->fpm;
    }

    public function testRequestPublishesThroughAmqpRsInAnFpmWorker(): void
    {
        $queue = Broker::unique('fpm');
        $conn = new AmqpRs\Connection(Broker::uri());
        $conn->declareQueue($queue, ['auto_delete' => false]);
        try {
            $fpm = $this->startPool(2);
            $workers = $fpm->workerPids();
            $this->assertCount(2, $workers);
            for ($i = 0; $i < 4; $i++) {
                [$status, $body] = $fpm->get('/publish.php?' . http_build_query(['queue' => $queue, 'body' => "request $i"]));
                $this->assertSame(200, $status, $body . $fpm->logs());
                $this->assertMatchesRegularExpression('/^published by (\d+) with /', $body);
                $this->assertContains((int) explode(' ', $body)[2], $workers, 'served by a process that is not one of the pool\'s workers');
            }
            // Checked by php-amqplib, an independent client: the four bodies, in order.
            $this->assertSame(4, Broker::countWithAmqplib($queue));
            for ($i = 0; $i < 4; $i++) {
                $this->assertSame("request $i", $conn->get($queue, true)?->getBody());
            }
        } finally {
            $conn->deleteQueue($queue);
            $conn->close();
        }
    }

    /**
     * What the persistent-connection tests check, shown with a client that keeps its connection
     * today (php-amqp's pconnect()): the worker's socket to the broker is the same one across
     * requests, and it is the kernel's view (tcpConnections()), not the client's, that says so.
     */
    public function testTcpConnectionsSeesAWorkersBrokerConnectionOutliveItsRequest(): void
    {
        $credentials = var_export(Broker::phpAmqpCredentials(), true);
        file_put_contents($this->docroot . '/pconnect.php', <<<PHP
            <?php
            \$conn = new AMQPConnection($credentials);
            \$conn->pconnect();
            echo getmypid();
            PHP);
        $fpm = $this->startPool(1, ['extension=amqp.so']);
        [$worker] = $fpm->workerPids();
        $this->assertSame([], Fpm::tcpConnections($worker, Broker::port()));
        $seen = [];
        for ($i = 0; $i < 3; $i++) {
            [$status, $body] = $fpm->get('/pconnect.php');
            $this->assertSame([200, (string) $worker], [$status, $body], $fpm->logs());
            $seen[] = Fpm::tcpConnections($worker, Broker::port());
        }
        $this->assertCount(1, $seen[0], 'one connection to the broker after the first request');
        $this->assertSame([$seen[0], $seen[0], $seen[0]], $seen, 'the same connection (local port) after each request');
    }

    public function testStopEndsEveryProcessItStarted(): void
    {
        $fpm = $this->startPool(3);
        $workers = $fpm->workerPids();
        $this->assertCount(3, $workers);
        foreach ($workers as $pid) {
            $this->assertGreaterThan(0, Fpm::processStatus($pid)['rss_kb']);
        }
        $fpm->stop();
        clearstatcache();
        foreach ($workers as $pid) {
            $this->assertFileDoesNotExist("/proc/$pid", "worker $pid still runs after stop()");
        }
        $this->assertDirectoryDoesNotExist($fpm->dir);
        $this->expectException(RuntimeException::class);
        $fpm->get('/publish.php');
    }
}
