<?php

declare(strict_types=1);

require_once __DIR__ . '/Support/Fpm.php';
require_once __DIR__ . '/Support/Node.php';

use AmqpRs\Tests\Support\Broker;
use AmqpRs\Tests\Support\Fpm;
use AmqpRs\Tests\Support\Node;
use PHPUnit\Framework\TestCase;

/**
 * Persistent connections (issue 14): requests served by real php-fpm workers behind nginx keep
 * one broker connection per worker, and nothing of one request reaches the next. What a worker
 * holds is read from the kernel (Fpm::tcpConnections), what the broker holds from the broker.
 */
final class PersistentTest extends TestCase
{
    private ?Fpm $fpm = null;
    private ?Node $node = null;
    private string $docroot;
    /** @var list<string> */
    private array $queues = [];

    protected function setUp(): void
    {
        if (($missing = Fpm::missing()) !== null) {
            $this->fail($missing);
        }
        $this->docroot = sys_get_temp_dir() . '/amqp_rs_persistent_' . getmypid() . '_' . bin2hex(random_bytes(4));
        mkdir($this->docroot);
        // Every script opens a persistent connection, named after the test, to AMQP_URI (or
        // ?uri=...), with the options in ?options=... (JSON), and answers with the worker's pid.
        $this->script('publish.php', <<<'PHP'
            $producer = $conn->producer(['nack_retries' => 0]);
            $producer->publish($_GET['body'] ?? 'x', $_GET['queue']);
            if (!isset($_GET['no_wait'])) {
                $producer->waitForConfirms(10.0);
            }
            for ($i = 1; $i < (int) ($_GET['count'] ?? 1); $i++) {
                $producer->publish($_GET['body'] ?? 'x', $_GET['queue']);
            }
            echo 'ok ', getmypid();
            PHP);
        $this->script('consume_one.php', <<<'PHP'
            $consumer = $conn->consumer($_GET['queue'], ['prefetch' => 10]);
            $message = $consumer->next(5.0);
            echo 'got ', $message?->getBody() ?? 'nothing', ' ', getmypid();
            PHP);
        $this->script('exclusive.php', <<<'PHP'
            $name = $conn->declareQueue('', ['exclusive' => true]);
            echo $name;
            PHP);
    }

    protected function tearDown(): void
    {
        $this->fpm?->stop();
        $this->node?->stop();
        if ($this->queues !== []) {
            $conn = new AmqpRs\Connection(Broker::uri());
            foreach ($this->queues as $queue) {
                $conn->deleteQueue($queue);
            }
            $conn->close();
        }
        exec('rm -rf ' . escapeshellarg($this->docroot));
    }

    private function script(string $name, string $body): void
    {
        file_put_contents("$this->docroot/$name", <<<PHP
            <?php
            ini_set('display_errors', '1');
            ini_set('html_errors', '0');
            \$options = json_decode(\$_GET['options'] ?? '{}', true) + ['persistent' => true, 'name' => \$_GET['name'] ?? 'amqp_rs.test.persistent'];
            \$conn = new AmqpRs\\Connection(\$_GET['uri'] ?? getenv('AMQP_URI'), \$options);
            $body
            PHP);
    }

    private function pool(int $workers = 1): Fpm
    {
        $this->fpm = new Fpm($this->docroot, $workers, ['extension=' . Broker::extensionPath()], ['AMQP_URI' => Broker::uri()]);
        $this->fpm->start();
        return $this->fpm;
    }

    private function request(string $script, array $query): string
    {
        [$status, $body] = $this->fpm->get("/$script?" . http_build_query($query));
        $this->assertSame(200, $status, $body . $this->fpm->logs());
        return $body;
    }

    private function queue(string $what): string
    {
        $queue = Broker::unique($what);
        $conn = new AmqpRs\Connection(Broker::uri());
        $conn->declareQueue($queue);
        $conn->close();
        $this->queues[] = $queue;
        return $queue;
    }

    /** Polls until $condition() holds; fails with $message after $timeout seconds. */
    private function eventually(callable $condition, string $message, float $timeout = 10.0): void
    {
        $deadline = microtime(true) + $timeout;
        while (!$condition()) {
            if (microtime(true) > $deadline) {
                $this->fail($message);
            }
            usleep(20_000);
        }
        $this->addToAssertionCount(1);
    }

    /** @return list<string> names of the broker's connections that start with $prefix */
    private static function brokerConnections(string $prefix): array
    {
        $names = [];
        foreach (explode("\n", Broker::ctl('list_connections', 'client_properties', '-q', '--no-table-headers')) as $line) {
            if (preg_match('/\{"connection_name","([^"]*)"\}/', $line, $m) && str_starts_with($m[1], $prefix)) {
                $names[] = $m[1];
            }
        }
        return $names;
    }

    public function testTwoRequestsServedByOneWorkerUseTheSameBrokerConnection(): void
    {
        $queue = $this->queue('persistent-same');
        $fpm = $this->pool(1);
        [$worker] = $fpm->workerPids();
        $this->request('publish.php', ['queue' => $queue, 'body' => 'first']);
        $first = Fpm::tcpConnections($worker, Broker::port());
        $this->assertCount(1, $first, 'the worker keeps its connection after the request');
        $this->request('publish.php', ['queue' => $queue, 'body' => 'second']);
        $this->assertSame($first, Fpm::tcpConnections($worker, Broker::port()), 'the second request used the same socket');
        $this->assertSame(["amqp_rs.test.persistent (pid $worker)"], self::brokerConnections('amqp_rs.test.persistent'));
        $this->assertSame(2, Broker::countWithAmqplib($queue));
    }

    public function testEachWorkerHasItsOwnConnectionNamedWithItsPid(): void
    {
        $queue = $this->queue('persistent-workers');
        $fpm = $this->pool(2);
        $served = [];
        for ($i = 0; $i < 8 && count($served) < 2; $i++) {
            $served[explode(' ', $this->request('publish.php', ['queue' => $queue, 'name' => 'amqp_rs.test.workers']))[1]] = true;
        }
        $this->assertCount(2, $served, 'nginx spread the requests over both workers');
        $expected = array_map(fn ($pid) => "amqp_rs.test.workers (pid $pid)", $fpm->workerPids());
        $names = self::brokerConnections('amqp_rs.test.workers');
        sort($names);
        sort($expected);
        $this->assertSame($expected, $names);
    }

    public function testAPooledConnectionClosedByTheBrokerBetweenRequestsIsReplacedWithoutAnError(): void
    {
        $queue = $this->queue('persistent-closed');
        $fpm = $this->pool(1);
        [$worker] = $fpm->workerPids();
        // Without recovery, only the check before use can save the next request.
        $query = ['queue' => $queue, 'name' => 'amqp_rs.test.closed', 'options' => json_encode(['reconnect' => false])];
        $this->request('publish.php', $query);
        [$before] = Fpm::tcpConnections($worker, Broker::port());
        foreach (explode("\n", Broker::ctl('list_connections', 'pid', 'client_properties', '-q', '--no-table-headers')) as $line) {
            if (str_contains($line, "amqp_rs.test.closed (pid $worker)")) {
                Broker::ctl('close_connection', strtok($line, "\t"), 'test: idle connection cut');
            }
        }
        $this->eventually(fn () => Fpm::tcpConnections($worker, Broker::port()) === [], 'the broker closed the connection');
        $this->assertStringStartsWith('ok', $this->request('publish.php', $query));
        $after = Fpm::tcpConnections($worker, Broker::port());
        $this->assertCount(1, $after);
        $this->assertNotSame([$before], $after, 'a new connection');
        $this->assertSame(2, Broker::countWithAmqplib($queue));
    }

    public function testAPooledConnectionWhoseBrokerRestartedIsReplacedAndTheRequestSucceeds(): void
    {
        $this->node = Node::start('amqp_rs_persist', Node::freePort());
        $uri = $this->node->uri();
        $setup = new AmqpRs\Connection($uri);
        $queue = $setup->declareQueue(Broker::unique('persistent-restart'));
        $setup->close();
        $fpm = $this->pool(1);
        $query = ['queue' => $queue, 'uri' => $uri, 'name' => 'amqp_rs.test.restart'];
        $this->request('publish.php', $query);
        $this->node->stopApp();
        $this->node->startApp();
        $this->assertStringStartsWith('ok', $this->request('publish.php', $query));
        $check = new AmqpRs\Connection($uri);
        $this->assertSame(2, $check->queueStatus($queue)['messages'], 'both messages are in the durable queue');
        $check->close();
    }

    public function testARequestThatEndsWithUnconfirmedPublishesHasThemWaitedForOrReported(): void
    {
        $queue = $this->queue('persistent-unconfirmed');
        $full = Broker::unique('persistent-full');
        $conn = new AmqpRs\Connection(Broker::uri());
        $conn->declareQueue($full, ['arguments' => ['x-max-length' => 1, 'x-overflow' => 'reject-publish']]);
        $this->queues[] = $full;
        $this->pool(1);
        // 500 publishes left unconfirmed at request end: the producer's destructor waits for them.
        $this->request('publish.php', ['queue' => $queue, 'count' => 500, 'no_wait' => 1]);
        $this->assertSame(500, Broker::countWithAmqplib($queue));
        // Three to a full queue: two are nacked, and the request's output says so.
        $body = $this->request('publish.php', ['queue' => $full, 'count' => 3, 'no_wait' => 1]);
        $this->assertStringContainsString('Warning', $body);
        $this->assertMatchesRegularExpression('/2 messages failed.*nacked/s', $body);
        $this->assertSame(1, Broker::countWithAmqplib($full));
        // The next request on the same connection starts clean.
        $this->assertStringStartsWith('ok', $this->request('publish.php', ['queue' => $queue]));
        $this->assertSame(501, Broker::countWithAmqplib($queue));
    }

    public function testARequestThatEndsWithAConsumerOpenGivesItsDeliveriesBackToTheQueue(): void
    {
        $queue = $this->queue('persistent-consumer');
        Broker::publishWithAmqplib('', $queue, 5);
        $fpm = $this->pool(1);
        $this->assertStringStartsWith('got m0', $this->request('consume_one.php', ['queue' => $queue]));
        // The other four were prefetched and the first was never settled: all five are back.
        $this->eventually(fn () => Broker::countWithAmqplib($queue) === 5, 'the deliveries went back to the queue');
        $conn = new AmqpRs\Connection(Broker::uri());
        $this->assertSame(0, $conn->queueStatus($queue)['consumers'], 'the consumer was cancelled');
        $conn->close();
        // The next request gets them again, on the same connection.
        [$worker] = $fpm->workerPids();
        $this->assertStringStartsWith('got m0', $this->request('consume_one.php', ['queue' => $queue]));
        $this->assertCount(1, Fpm::tcpConnections($worker, Broker::port()));
    }

    public function testExclusiveQueuesOfARequestDoNotPileUpOnThePooledConnection(): void
    {
        $this->pool(1);
        $first = $this->request('exclusive.php', ['name' => 'amqp_rs.test.exclusive']);
        $second = $this->request('exclusive.php', ['name' => 'amqp_rs.test.exclusive']);
        $this->assertNotSame($first, $second);
        $this->eventually(
            fn () => !str_contains(Broker::ctl('list_queues', 'name', '-q', '--no-table-headers'), $first),
            "the first request's exclusive queue $first was deleted when it ended"
        );
    }

    public function testAForkedChildNeverUsesItsParentsPooledConnection(): void
    {
        $queue = $this->queue('persistent-fork');
        $name = 'amqp_rs.test.fork.' . getmypid();
        $options = ['persistent' => true, 'name' => $name];
        $parent = new AmqpRs\Connection(Broker::uri(), $options);
        $parent->producer()->publish('parent', $queue);
        $pid = pcntl_fork();
        if ($pid === 0) {
            $code = 1;
            try {
                $child = new AmqpRs\Connection(Broker::uri(), $options);
                $producer = $child->producer();
                $producer->publish('child', $queue);
                $producer->waitForConfirms(5.0);
                $code = 0;
            } finally {
                posix_kill(getmypid(), SIGKILL); // no PHPUnit shutdown in the child
                exit($code);
            }
        }
        pcntl_waitpid($pid, $status);
        $this->assertSame(2, Broker::countWithAmqplib($queue), 'the child published on a connection of its own');
        unset($parent);
        $again = new AmqpRs\Connection(Broker::uri(), $options);
        $this->assertTrue($again->isConnected(), "the parent's pooled connection survived the child");
        $producer = $again->producer();
        $producer->publish('parent again', $queue);
        $producer->waitForConfirms(5.0);
        $this->assertSame([$name . ' (pid ' . getmypid() . ')'], self::brokerConnections($name));
        $again->closePersistent();
        $this->assertFalse($again->isConnected());
        $this->eventually(fn () => self::brokerConnections($name) === [], 'closePersistent() closed it for good');
    }

    public function testTwoPersistentConnectionsWithTheSameKeyInOneRequestShareTheBrokerConnection(): void
    {
        $name = 'amqp_rs.test.twice.' . getmypid();
        $a = new AmqpRs\Connection(Broker::uri(), ['persistent' => true, 'name' => $name]);
        $b = new AmqpRs\Connection(Broker::uri(), ['persistent' => true, 'name' => $name]);
        $this->assertTrue($a->isPersistent());
        $this->assertSame(1, count(self::brokerConnections($name)));
        $a->close();
        $this->assertFalse($a->isConnected());
        $this->assertTrue($b->isConnected(), 'closing one object releases only that object');
        $b->declareExchange('amq.direct', 'direct', ['passive' => true]);
        $b->closePersistent();
    }

    public function testThePersistentOptionMustBeABool(): void
    {
        // As for every option: a TypeError naming it, as PHP gives for a mistyped argument.
        $this->expectException(TypeError::class);
        $this->expectExceptionMessage("Connection options: option 'persistent' must be of type bool, string given");
        new AmqpRs\Connection(Broker::uri(), ['persistent' => 'yes']);
    }

    public function testThePoolIsListedByPhpinfoWithoutThePassword(): void
    {
        $conn = new AmqpRs\Connection(Broker::uri(), ['persistent' => true, 'name' => 'amqp_rs.test.info']);
        ob_start();
        phpinfo(INFO_MODULES);
        $info = ob_get_clean();
        $endpoint = preg_quote('amqp://' . Broker::user() . '@' . Broker::endpoint() . '/%2F', '#');
        $this->assertMatchesRegularExpression("#persistent \\#\\d+ => $endpoint \\(connected\\), open \\d+ s, \\d+ idle channels, \\d+ requests served#", $info);
        $this->assertStringNotContainsString('guest:guest', $info);
        $conn->closePersistent();
    }

    public function testANonPersistentConnectionIsNotPooled(): void
    {
        $conn = new AmqpRs\Connection(Broker::uri(), ['name' => 'amqp_rs.test.transient.' . getmypid()]);
        $this->assertFalse($conn->isPersistent());
        $conn->close();
        $this->eventually(fn () => self::brokerConnections('amqp_rs.test.transient.' . getmypid()) === [], 'closed for good');
    }
}
