<?php

declare(strict_types=1);

require_once __DIR__ . '/Support/ForkedChild.php';

use AmqpRs\Connection;
use AmqpRs\ConnectionException;
use AmqpRs\Tests\Support\Broker;
use AmqpRs\Tests\Support\ForkedChild;
use PHPUnit\Framework\TestCase;

/** A Tokio runtime does not survive fork(); the extension must rebuild its own in a child. */
final class ForkTest extends TestCase
{
    use ForkedChild;

    public function testChildOpensItsOwnConnectionAndParentKeepsWorking(): void
    {
        $parent = new Connection(Broker::uri());
        $q = $parent->declareQueue(Broker::unique('fork'), ['auto_delete' => false]);
        $status = $this->inChild(function () use ($q): bool {
            $own = new Connection(Broker::uri());
            $own->purgeQueue($q);
            $own->bindQueue($q, 'amq.direct', $q);
            $own->close();
            return true;
        });
        $this->assertSame(0, $status);
        $this->assertTrue($parent->isConnected());
        Broker::publishWithAmqplib('amq.direct', $q, 2);
        $this->assertSame(2, $parent->queueStatus($q)['messages']);
        $this->assertSame(2, $parent->deleteQueue($q));
    }

    public function testChildUsingTheParentsConnectionGetsAnExceptionNotAHang(): void
    {
        $parent = new Connection(Broker::uri());
        $status = $this->inChild(function () use ($parent): bool {
            if ($parent->isConnected()) {
                return false;
            }
            try {
                $parent->declareQueue('', ['exclusive' => true]);
                return false;
            } catch (ConnectionException $e) {
                return str_contains($e->getMessage(), 'before fork()');
            }
        });
        $this->assertSame(0, $status);
        $this->assertNotSame('', $parent->declareQueue('', ['exclusive' => true]));
    }

    public function testChildThatExitsNormallyLeavesTheParentsSocketAlone(): void
    {
        $parent = new Connection(Broker::uri());
        $q = $parent->declareQueue('', ['exclusive' => true]);
        $pid = pcntl_fork();
        if ($pid === 0) {
            // A full, normal exit: destructors and module shutdown run in the child.
            exit(0);
        }
        pcntl_waitpid($pid, $status);
        $this->assertSame(0, pcntl_wexitstatus($status));
        usleep(200_000);
        $this->assertTrue($parent->isConnected());
        $this->assertSame(['messages' => 0, 'consumers' => 0], $parent->queueStatus($q));
    }

    public function testManyChildrenEachWorkWhileTheParentWorks(): void
    {
        $parent = new Connection(Broker::uri());
        $q = $parent->declareQueue(Broker::unique('fork-many'));
        $pids = [];
        for ($i = 0; $i < 5; $i++) {
            $pid = pcntl_fork();
            if ($pid === 0) {
                $ok = false;
                try {
                    $own = new Connection(Broker::uri());
                    $own->bindQueue($q, 'amq.topic', "child.$i");
                    $ok = true;
                } catch (Throwable $e) {
                    fwrite(STDERR, $e->getMessage() . "\n");
                }
                posix_kill(getmypid(), $ok ? SIGUSR1 : SIGKILL);
            }
            $pids[] = $pid;
        }
        foreach ($pids as $pid) {
            pcntl_waitpid($pid, $status);
            $this->assertTrue(pcntl_wifsignaled($status));
            $this->assertSame(SIGUSR1, pcntl_wtermsig($status));
        }
        Broker::publishWithAmqplib('amq.topic', 'child.3', 1);
        $this->assertSame(1, $parent->queueStatus($q)['messages']);
        $parent->deleteQueue($q);
    }

    public function testTwentyChildrenPublishAndConsumeWhileTheParentKeepsItsOwnSocket(): void
    {
        // php-fpm style: a parent with a live connection, producer and consumer forks workers.
        $name = Broker::unique('fork-parent');
        $parent = new Connection(Broker::uri(), ['name' => $name]);
        $q = $parent->declareQueue(Broker::unique('fork-parent-q'), ['auto_delete' => false]);
        $producer = $parent->producer();
        $producer->publish('before', $q);
        $producer->waitForConfirms(5);
        $consumer = $parent->consumer($q, ['prefetch' => 10]);
        $brokerSide = fn () => array_values(array_filter(
            explode("\n", Broker::ctl('list_connections', 'pid', 'client_properties', '-q', '--no-table-headers')),
            fn ($line) => str_contains($line, $name),
        ));
        $before = $brokerSide();
        $this->assertCount(1, $before);

        $children = [];
        for ($i = 0; $i < 20; $i++) {
            $pid = pcntl_fork();
            $this->assertNotSame(-1, $pid, 'fork failed');
            if ($pid === 0) {
                // Each child works on its own connection, then exits normally: destructors of
                // the parent's objects it inherited run too, and must leave the socket alone.
                $code = 1;
                try {
                    $own = new Connection(Broker::uri());
                    $mine = $own->declareQueue('', ['exclusive' => true]);
                    $p = $own->producer();
                    for ($n = 0; $n < 10; $n++) {
                        $p->publish("child $i message $n", $mine);
                    }
                    $p->waitForConfirms(10);
                    $got = 0;
                    $own->consumer($mine)->consume(function () use (&$got) {
                        $got++;
                    }, ['max_messages' => 10, 'max_time' => 10]);
                    $own->close();
                    $code = $got === 10 ? 0 : 1;
                } catch (Throwable $e) {
                    fwrite(STDERR, "child $i: " . $e->getMessage() . "\n");
                }
                exit($code);
            }
            $children[] = $pid;
        }
        foreach ($children as $i => $pid) {
            pcntl_waitpid($pid, $status);
            $this->assertTrue(pcntl_wifexited($status), "child $i ended by a signal");
            $this->assertSame(0, pcntl_wexitstatus($status), "child $i published and consumed its 10");
        }

        // The parent's connection is the same one on the broker, and all of it still works.
        $this->assertSame($before, $brokerSide());
        $producer->publish('after', $q);
        $producer->waitForConfirms(5);
        $bodies = [];
        $consumer->consume(function ($m) use (&$bodies) {
            $bodies[] = $m->getBody();
        }, ['max_messages' => 2, 'max_time' => 10]);
        $this->assertSame(['before', 'after'], $bodies);
        $parent->deleteQueue($q);
        $parent->close();
    }

    /**
     * Settlements lapin has not written yet belong to their connection: a child forked while
     * the parent has some neither waits for them (closing its own connection, or dropping the
     * parent's, is quick) nor sends them, and the parent's acks still all reach the broker.
     */
    public function testAForkWithUnwrittenSettlementsNeitherHangsTheChildNorLosesTheParentsAcks(): void
    {
        $parent = new Connection(Broker::uri());
        $q = $parent->declareQueue(Broker::unique('fork-acks'), ['auto_delete' => false]);
        Broker::publishWithAmqplib('', $q, 300);
        $consumer = $parent->consumer($q, ['prefetch' => 300]);
        // next() sends each ack at once, without waiting: right after this loop some of them
        // are usually still on their way through lapin.
        $acked = 0;
        while ($acked < 300 && ($m = $consumer->next(5.0)) !== null) {
            $m->ack();
            $acked++;
        }
        $this->assertSame(300, $acked);
        $status = $this->inChild(function () use ($parent, $q): bool {
            $started = microtime(true);
            $own = new Connection(Broker::uri());
            $own->queueStatus($q);
            $own->close();
            // The parent's connection is left alone: close() does nothing in the child.
            $parent->close();
            return microtime(true) - $started < 10.0;
        });
        $this->assertSame(0, $status, 'the child finished without waiting on the parent');
        $consumer->cancel();
        $parent->close();
        // Unacked messages would be back in the queue once the parent's connection is closed.
        $this->assertSame(0, Broker::countWithAmqplib($q));
        $check = new Connection(Broker::uri());
        $check->deleteQueue($q);
        $check->close();
    }
}
