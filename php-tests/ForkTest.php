<?php

declare(strict_types=1);

use AmqpRs\Connection;
use AmqpRs\ConnectionException;
use AmqpRs\Tests\Support\Broker;
use PHPUnit\Framework\TestCase;

/** A Tokio runtime does not survive fork(); the extension must rebuild its own in a child. */
final class ForkTest extends TestCase
{
    /** Runs $child in a forked process; returns its exit status (0 = ok). */
    private function inChild(callable $child): int
    {
        $pid = pcntl_fork();
        $this->assertNotSame(-1, $pid, 'fork failed');
        if ($pid === 0) {
            $code = 70;
            try {
                $code = $child() ? 0 : 1;
            } catch (Throwable $e) {
                fwrite(STDERR, 'child: ' . get_class($e) . ': ' . $e->getMessage() . "\n");
                $code = 2;
            }
            // End without PHPUnit's shutdown handlers, which belong to the parent: SIGUSR1 says
            // success, SIGKILL failure.
            posix_kill(getmypid(), $code === 0 ? SIGUSR1 : SIGKILL);
            exit($code);
        }
        $alarm = time() + 30;
        while (pcntl_waitpid($pid, $status, WNOHANG) === 0) {
            if (time() > $alarm) {
                posix_kill($pid, SIGKILL);
                $this->fail('child hung');
            }
            usleep(20_000);
        }
        if (pcntl_wifsignaled($status)) {
            return pcntl_wtermsig($status) === SIGUSR1 ? 0 : 100 + pcntl_wtermsig($status);
        }
        return pcntl_wexitstatus($status);
    }

    public function testChildOpensItsOwnConnectionAndParentKeepsWorking(): void
    {
        $parent = new Connection(Broker::URI);
        $q = $parent->declareQueue(Broker::unique('fork'), ['auto_delete' => false]);
        $status = $this->inChild(function () use ($q): bool {
            $own = new Connection(Broker::URI);
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
        $parent = new Connection(Broker::URI);
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
        $parent = new Connection(Broker::URI);
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
        $parent = new Connection(Broker::URI);
        $q = $parent->declareQueue(Broker::unique('fork-many'));
        $pids = [];
        for ($i = 0; $i < 5; $i++) {
            $pid = pcntl_fork();
            if ($pid === 0) {
                $ok = false;
                try {
                    $own = new Connection(Broker::URI);
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
}
