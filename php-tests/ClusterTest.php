<?php

declare(strict_types=1);

use AmqpRs\Connection;
use AmqpRs\Message;
use AmqpRs\PublishException;
use AmqpRs\Tests\Support\Broker;
use AmqpRs\Tests\Support\Node;
use PHPUnit\Framework\TestCase;

require_once __DIR__ . '/Support/Node.php';

/**
 * Cluster failover against a real 3-node RabbitMQ cluster of the test's own and a quorum
 * queue: the node a producer or a worker is on stops (stop_app) or dies (SIGKILL); the
 * client moves to another node of its URI list by itself, and no confirmed message is lost.
 */
final class ClusterTest extends TestCase
{
    /** @var list<Node> */
    private static array $nodes = [];
    private string $queue;
    private string $name;

    public static function setUpBeforeClass(): void
    {
        $specs = [];
        foreach ([1, 2, 3] as $i) {
            $specs[] = ["amqprs-c$i-" . getmypid(), Node::freePort()];
        }
        self::$nodes = Node::startMany($specs);
        self::$nodes[1]->joinCluster(self::$nodes[0]);
        self::$nodes[2]->joinCluster(self::$nodes[0]);
    }

    public static function tearDownAfterClass(): void
    {
        Node::stopMany(self::$nodes);
    }

    protected function setUp(): void
    {
        $this->queue = 'amqp_rs.test.cluster.' . bin2hex(random_bytes(4));
        $this->name = 'amqp_rs.test.cluster-client.' . bin2hex(random_bytes(4));
    }

    protected function tearDown(): void
    {
        // Every node back up for the next test.
        foreach (self::$nodes as $node) {
            if (!$node->isRunning()) {
                $node->restart();
            } elseif (!$this->answers($node)) {
                $node->startApp();
            }
        }
        $conn = new Connection($this->uris(), ['reconnect' => false]);
        $conn->deleteQueue($this->queue);
        $conn->close();
    }

    private function answers(Node $node): bool
    {
        $socket = @stream_socket_client("tcp://127.0.0.1:{$node->port}", $errno, $errstr, 1);
        if ($socket === false) {
            return false;
        }
        fclose($socket);
        return true;
    }

    /** @return list<string> the cluster's URIs, the first node first */
    private function uris(): array
    {
        return array_map(fn (Node $n) => $n->uri(), self::$nodes);
    }

    /** The node our connection (named $this->name) is on, or null. */
    private function nodeOfClient(): ?Node
    {
        foreach (self::$nodes as $asked) {
            if (!$this->answers($asked)) {
                continue;
            }
            // Any node lists the whole cluster's connections; a connection's pid names its node.
            foreach (explode("\n", $asked->ctl('list_connections', 'pid', 'client_properties', '-q', '--no-table-headers')) as $line) {
                if (str_contains($line, $this->name)) {
                    $pid = (string) strtok($line, "\t");
                    foreach (self::$nodes as $node) {
                        if (str_contains($pid, "<{$node->name}.")) {
                            return $node;
                        }
                    }
                }
            }
            return null;
        }
        return null;
    }

    /** A quorum queue whose leader is on the first node (declared through it). */
    private function declareQuorumQueue(): void
    {
        $arguments = ['x-queue-type' => 'quorum'];
        if (Broker::majorVersion() >= 4) {
            // RabbitMQ 4.x keeps the messages a consumer on a lost node holds for that long
            // (default 60 s) before it hands them to other consumers (see docs/recovery.md).
            $arguments['x-consumer-disconnected-timeout'] = 2_000;
        }
        $conn = new Connection(self::$nodes[0]->uri(), ['reconnect' => false]);
        $conn->declareQueue($this->queue, ['durable' => true, 'auto_delete' => false, 'arguments' => $arguments]);
        $conn->close();
    }

    /** Message ids in the queue, consumed through the first node of the list that answers. */
    private function drain(): array
    {
        $conn = new Connection($this->uris(), ['reconnect' => false]);
        $ids = [];
        $conn->consumer($this->queue, ['prefetch' => 200])->consume(
            function (Message $m) use (&$ids) {
                $ids[] = $m->getMessageId();
            },
            ['idle_timeout' => 2, 'max_time' => 60],
        );
        $conn->close();
        return $ids;
    }

    public function testAPublisherMovesToAnotherNodeWhenItsNodeStopsThenWhenItIsKilled(): void
    {
        $this->declareQuorumQueue();
        $conn = new Connection($this->uris(), ['name' => $this->name, 'heartbeat' => 5]);
        $producer = $conn->producer();
        $this->assertSame(self::$nodes[0], $this->nodeOfClient());
        $failed = [];
        $collect = function () use ($producer, &$failed): void {
            try {
                $producer->waitForConfirms(60);
            } catch (PublishException $e) {
                foreach ($e->getFailures() as $f) {
                    $this->assertStringContainsString('lost before the broker confirmed it', $f['reason']);
                    $failed[$f['message_id']] = true;
                }
            }
        };
        $moves = [];
        $fault = null;
        for ($i = 0; $i < 6_000; $i++) {
            if ($i === 1_500) {
                // Its node stops cleanly, while publishes are in flight.
                $fault = proc_open(['rabbitmqctl', '-n', self::$nodes[0]->name, 'stop_app'], [1 => ['file', '/dev/null', 'w'], 2 => ['file', '/dev/null', 'w']], $pipes);
            }
            if ($i === 3_000) {
                $this->assertSame(0, proc_close($fault), 'rabbitmqctl stop_app');
                // Back, so that two of the quorum queue's three members survive what follows.
                self::$nodes[0]->startApp();
            }
            if ($i === 4_000) {
                // Then the node it moved to dies, with no goodbye.
                $moves[] = $node = $this->nodeOfClient();
                $this->assertNotNull($node);
                $this->assertNotSame(self::$nodes[0], $node, 'moved off the stopped node');
                $node->kill();
            }
            $producer->publish("body $i", $this->queue, '', ['message_id' => "m$i"]);
            usleep(300);
            if ($i % 200 === 199) {
                $collect();
            }
        }
        $collect();
        $moves[] = $this->nodeOfClient();
        $this->assertNotNull($moves[1], 'the connection is up on a node');
        $this->assertNotSame($moves[0], $moves[1], 'moved off the killed node');
        $conn->close();

        $inQueue = array_flip($this->drain());
        $missing = [];
        for ($i = 0; $i < 6_000; $i++) {
            if (!isset($inQueue["m$i"]) && !isset($failed["m$i"])) {
                $missing[] = "m$i";
            }
        }
        $this->assertSame([], $missing, 'confirmed (never reported) but not in the queue');
        $this->assertLessThan(1_000, count($failed), 'only publishes in flight at the faults fail');
    }

    public function testAWorkerMovesToAnotherNodeWhenItsNodeIsKilled(): void
    {
        $this->declareQuorumQueue();
        $setup = new Connection(self::$nodes[2]->uri(), ['reconnect' => false]);
        $producer = $setup->producer();
        for ($i = 0; $i < 2_000; $i++) {
            $producer->publish("body $i", $this->queue, '', ['message_id' => "m$i"]);
        }
        $producer->waitForConfirms(30);
        $setup->close();

        $conn = new Connection($this->uris(), ['name' => $this->name, 'heartbeat' => 5]);
        $this->assertSame(self::$nodes[0], $this->nodeOfClient());
        $seen = [];
        $conn->consumer($this->queue, ['prefetch' => 50])->consume(
            function (Message $m) use (&$seen) {
                if (count($seen) === 500) {
                    // The worker's node, the queue's leader, dies mid-stream.
                    self::$nodes[0]->kill();
                }
                $seen[$m->getMessageId()] = ($seen[$m->getMessageId()] ?? 0) + 1;
                usleep(300);
            },
            ['idle_timeout' => 5, 'max_time' => 120],
        );
        $node = $this->nodeOfClient();
        $conn->close();

        $this->assertNotNull($node, 'the worker is connected to a node');
        $this->assertNotSame(self::$nodes[0], $node, 'moved off the killed node');
        $this->assertCount(2_000, $seen, 'every message handled at least once');
        $this->assertSame([], $this->drain(), 'every message acked in the end');
    }
}
