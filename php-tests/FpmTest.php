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

    private function startPool(int $workers): Fpm
    {
        $this->fpm = new Fpm($this->docroot, $workers, ['extension=' . Broker::extensionPath()], ['AMQP_URI' => Broker::URI]);
        $this->fpm->start();
        return $this->fpm;
    }

    public function testRequestPublishesThroughAmqpRsInAnFpmWorker(): void
    {
        $queue = Broker::unique('fpm');
        $conn = new AmqpRs\Connection(Broker::URI);
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
