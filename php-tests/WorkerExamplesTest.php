<?php

declare(strict_types=1);

use AmqpRs\Connection;
use AmqpRs\Tests\Support\Broker;
use AmqpRs\Tests\Support\Children;
use PHPUnit\Framework\TestCase;

/**
 * The worker examples run as real processes, as a user would run them: the task queue
 * (examples/tasks), events with consumer groups (examples/events), data sync between servers
 * (examples/sync) and the supervised worker (examples/worker-supervised.php). Each test gives
 * the scripts a name prefix of its own (AMQP_PREFIX) and checks what they print and what is
 * left in the broker.
 */
final class WorkerExamplesTest extends TestCase
{
    private const EXAMPLES = __DIR__ . '/../examples';

    private Connection $conn;
    private string $prefix;
    private string $store;
    /** @var list<array{proc: resource, out: resource, in: ?resource, pid: int, buf: string, lines: list<string>, exit: ?int}> */
    private array $procs = [];

    protected function setUp(): void
    {
        $this->conn = new Connection(Broker::uri());
        $this->prefix = Broker::unique('examples');
        $this->store = sys_get_temp_dir() . '/' . $this->prefix;
    }

    protected function tearDown(): void
    {
        foreach ($this->procs as $p) {
            Children::end($p['proc']);
        }
        $conn = new Connection(Broker::uri());
        $queues = ["{$this->prefix}.jobs"];
        foreach (['tasks.email', 'tasks.image', 'tasks.report', 'events.audit', 'events.billing'] as $q) {
            $queues[] = "{$this->prefix}.$q";
            $queues[] = "{$this->prefix}.$q.dead";
            foreach ([100, 200, 400, 800] as $ms) {          // the retries' delay queues
                $queues[] = "amq_rs.delay.{$ms}ms.(default).{$this->prefix}.$q";
            }
        }
        foreach ($queues as $queue) {
            $conn->deleteQueue($queue);
        }
        foreach (['tasks', 'events', 'sync'] as $exchange) {
            $conn->deleteExchange("{$this->prefix}.$exchange");
        }
        $conn->close();
        exec('rm -rf ' . escapeshellarg($this->store));
    }

    // ---- the task queue ------------------------------------------------------------------

    public function testTwoWorkersDoEveryTaskOnceAndTheFailingTypeIsDeadLetteredAfterItsRetries(): void
    {
        $workers = [
            $this->start('tasks/worker.php', '--work-ms=50', '--fail=report', '--retry-delay=0.1', '--idle=1.5'),
            $this->start('tasks/worker.php', '--work-ms=50', '--fail=report', '--retry-delay=0.1', '--idle=1.5'),
        ];
        foreach ($workers as $w) {
            $this->waitForLine($w, '/waiting for tasks/');
        }
        $producer = $this->runToEnd('tasks/producer.php', '--count=12');
        $this->assertContains('all 12 tasks confirmed by the broker', $this->procs[$producer]['lines']);
        foreach ($workers as $w) {
            $this->assertSame(0, $this->waitForExit($w, 15));
        }

        $done = $this->linesMatching('/^worker (\d+): done task (\d+) /', ...$workers);
        $ids = array_column($done, 2);
        sort($ids);
        $this->assertSame(['1', '2', '4', '5', '7', '8', '10', '11'], $ids, 'every email and image task done once');
        $this->assertCount(2, array_unique(array_column($done, 1)), 'both workers did some');
        $failed = array_column($this->linesMatching('/^worker \d+: task (\d+) failed: the report service is down$/', ...$workers), 1);
        $this->assertSame(['3' => 3, '6' => 3, '9' => 3, '12' => 3], $this->tally($failed), 'each report task: first attempt and 2 retries');

        foreach (['email', 'image', 'report'] as $type) {
            $this->assertSame(0, $this->conn->queueStatus("{$this->prefix}.tasks.$type")['messages']);
        }
        $dead = [];
        while ($m = $this->conn->get("{$this->prefix}.tasks.report.dead", true)) {
            $dead[] = $m->json()['id'];
            $this->assertSame('RuntimeException: the report service is down', $m->getHeader('x-failure-reason'));
            $this->assertSame(3, $m->getHeader('x-attempt'));
        }
        sort($dead);
        $this->assertSame([3, 6, 9, 12], $dead);
    }

    public function testTheTaskOfAWorkerKilledMidTaskIsDoneByTheOtherWorker(): void
    {
        $workers = [
            $this->start('tasks/worker.php', '--work-ms=700', '--idle=1.5'),
            $this->start('tasks/worker.php', '--work-ms=700', '--idle=1.5'),
        ];
        foreach ($workers as $w) {
            $this->waitForLine($w, '/waiting for tasks/');
        }
        $this->runToEnd('tasks/producer.php', '--count=3');

        // Whichever worker starts a task first is killed in the middle of it.
        [$victim, $line] = $this->waitForAnyLine($workers, '/: start task (\d+) /');
        preg_match('/: start task (\d+) /', $line, $m);
        $task = $m[1];
        posix_kill($this->procs[$victim]['pid'], SIGKILL);
        $survivor = $victim === $workers[0] ? $workers[1] : $workers[0];
        $this->assertNotSame(0, $this->waitForExit($victim, 5));
        $this->assertSame(0, $this->waitForExit($survivor, 20));

        $this->assertEmpty($this->linesMatching("/: done task $task /", $victim), 'killed before it finished');
        $this->assertMatchesRegularExpression("/^worker \d+: start task $task \(\w+\), attempt 1, redelivered$/m", implode("\n", $this->procs[$survivor]['lines']));
        $done = array_column($this->linesMatching('/^worker \d+: done task (\d+) /', $survivor), 1);
        sort($done);
        $this->assertSame(['1', '2', '3'], $done, 'the survivor did every task, the killed one\'s too, each once');
        foreach (['email', 'image', 'report'] as $type) {
            $this->assertSame(0, $this->conn->queueStatus("{$this->prefix}.tasks.$type")['messages']);
        }
    }

    // ---- events ----------------------------------------------------------------------------

    public function testEveryGroupGetsEveryEventItIsBoundForAndTheProcessesOfAGroupShareThem(): void
    {
        $audit = $this->start('events/subscriber.php', '--group=audit', '--idle=1.5', "--store={$this->store}");
        $billing = [
            $this->start('events/subscriber.php', '--group=billing', '--bind=order.*', '--idle=1.5', "--store={$this->store}"),
            $this->start('events/subscriber.php', '--group=billing', '--bind=order.*', '--idle=1.5', "--store={$this->store}"),
        ];
        foreach ([$audit, ...$billing] as $s) {
            $this->waitForLine($s, '/listening on/');
        }
        $this->runToEnd('events/publisher.php', '--count=12');
        foreach ([$audit, ...$billing] as $s) {
            $this->assertSame(0, $this->waitForExit($s, 15));
        }

        $handled = fn (int ...$procs) => $this->tally(array_map(
            fn ($m) => "$m[1] $m[2]",
            $this->linesMatching('/^\w+\/\d+: handled ([\w.]+) (\d+) /', ...$procs),
        ));
        $every = [];
        for ($n = 1; $n <= 12; $n++) {
            $every[[1 => 'order.created', 2 => 'order.paid', 0 => 'user.signed_up'][$n % 3] . " $n"] = 1;
        }
        $orders = array_filter($every, fn ($k) => str_starts_with($k, 'order.'), ARRAY_FILTER_USE_KEY);
        $this->assertEquals($every, $handled($audit), 'audit (#) handled each event once');
        $this->assertEquals($orders, $handled(...$billing), 'billing (order.*) handled each order event once, in all');
        $this->assertNotEmpty($handled($billing[0]), 'both billing processes took a share');
        $this->assertNotEmpty($handled($billing[1]), 'both billing processes took a share');
        $this->assertSame(0, $this->conn->queueStatus("{$this->prefix}.events.billing")['messages']);
    }

    public function testADuplicateEventIsHandledOnceAndAFailingOneIsDeadLetteredAfterItsRetries(): void
    {
        $group = [
            $this->start('events/subscriber.php', '--group=audit', '--retry-delay=0.1', '--idle=1.5', "--store={$this->store}"),
            $this->start('events/subscriber.php', '--group=audit', '--retry-delay=0.1', '--idle=1.5', "--store={$this->store}"),
        ];
        foreach ($group as $s) {
            $this->waitForLine($s, '/listening on/');
        }
        $this->runToEnd('events/publisher.php', '--count=3', '--duplicate', '--bad=1');
        foreach ($group as $s) {
            $this->assertSame(0, $this->waitForExit($s, 15));
        }

        $handled = array_column($this->linesMatching('/: handled [\w.]+ (\w+) /', ...$group), 1);
        sort($handled);
        $this->assertSame(['1', '2', '3', 'dup'], $handled, 'the duplicate handled once, the bad one never');
        $this->assertCount(1, $this->linesMatching('/: skipped duplicate order.paid dup /', ...$group));
        $this->assertCount(4, $this->linesMatching('/: failed order.created bad1 \(attempt [1-4]\): order 901 has a negative amount$/', ...$group), 'the first attempt and 3 retries');

        $dead = $this->conn->get("{$this->prefix}.events.audit.dead", true);
        $this->assertNotNull($dead, 'the failing event is dead-lettered');
        $this->assertSame('bad1', $dead->json()['n']);
        $this->assertSame('DomainException: order 901 has a negative amount', $dead->getHeader('x-failure-reason'));
        $this->assertSame(4, $dead->getHeader('x-attempt'));
        $this->assertNull($this->conn->get("{$this->prefix}.events.audit.dead", true), 'only that one');
        $this->assertSame(0, $this->conn->queueStatus("{$this->prefix}.events.audit")['messages']);
    }

    // ---- data sync -------------------------------------------------------------------------

    public function testTwoServersThatChangeTheSameRecordsEndWithTheSameRecordsTheLatestVersionOfEach(): void
    {
        $a = $this->start('sync/server.php', '--name=a', '--idle=1.5');
        $b = $this->start('sync/server.php', '--name=b', '--idle=1.5');
        foreach ([$a, $b] as $s) {
            $this->waitForLine($s, '/ready, queue amq_rs\.gen-/');
        }
        // Both change user:1 and user:2 at once, four times each; a alone changes order:1..8.
        [$changesOfA, $changesOfB] = ['', ''];
        for ($i = 1; $i <= 8; $i++) {
            $changesOfA .= 'set user ' . ($i % 2 + 1) . " {\"by\":\"a\",\"i\":$i}\nset order $i {\"total\":$i}\n";
            $changesOfB .= 'set user ' . ($i % 2 + 1) . " {\"by\":\"b\",\"i\":$i}\n";
        }
        fwrite($this->procs[$a]['in'], $changesOfA);
        fwrite($this->procs[$b]['in'], $changesOfB);
        $this->waitForLine($a, '/^a: set order:8 v1$/');
        $this->waitForLine($b, '/^b: set user:1 v\d+$/');
        $this->waitForLine($b, '/^b: set user:2 v[4-9]$/');

        // A third server's changes: an old one of user:1, which both must ignore, and user:3.
        $producer = $this->conn->producer();
        foreach ([['1', 2, 'stale'], ['3', 1, 'new']] as [$id, $version, $what]) {
            $change = ['entity' => 'user', 'id' => $id, 'version' => $version, 'origin' => 'z', 'data' => ['by' => 'z', 'what' => $what]];
            $producer->publishJson($change, '', "{$this->prefix}.sync", ['app_id' => 'z']);
        }
        $producer->waitForConfirms();
        fwrite($this->procs[$a]['in'], "set user 2 {\"by\":\"a\",\"i\":\"last\"}\n");   // a later change wins
        fclose($this->procs[$a]['in']);
        fclose($this->procs[$b]['in']);
        $this->assertSame(0, $this->waitForExit($a, 15));
        $this->assertSame(0, $this->waitForExit($b, 15));

        $state = fn (int $s) => json_decode(substr(current(preg_grep('/^state /', $this->procs[$s]['lines'])) ?: 'state null', 6), true);
        $this->assertNotNull($state($a));
        $this->assertSame($state($a), $state($b), 'both servers hold the same records');
        $records = $state($a);
        $this->assertCount(11, $records, 'user:1..3 and order:1..8');
        $this->assertNotSame('z', $records['user:1']['origin'], 'the old change of user:1 was ignored');
        $this->assertGreaterThanOrEqual(4, $records['user:1']['version']);
        $this->assertSame(['by' => 'a', 'i' => 'last'], $records['user:2']['data']);
        $this->assertSame(['by' => 'z', 'what' => 'new'], $records['user:3']['data']);
        $this->assertSame(['total' => 8], $records['order:8']['data']);
        $this->assertNotEmpty($this->linesMatching('/^b: applied user:2 v\d+ from a$/', $b), 'b applied changes of a');
        $this->assertNotEmpty($this->linesMatching('/^a: ignored user:1 v2 from z \(older\)$/', $a));
    }

    public function testAServerWhoseConnectionIsLostGetsItsQueueBackUnderItsNameAndGoesOnSyncing(): void
    {
        $a = $this->start('sync/server.php', '--name=a', '--idle=1.5');
        $b = $this->start('sync/server.php', '--name=b', '--idle=1.5');
        preg_match('/queue (\S+)$/', $this->waitForLine($a, '/ready, queue amq_rs\.gen-/'), $m);
        $queue = $m[1];
        $this->waitForLine($b, '/ready/');

        $connectionOfA = function (): ?string {
            $lines = explode("\n", Broker::ctl('list_connections', 'pid', 'client_properties', '-q', '--no-table-headers'));
            $ours = preg_grep('/sync server a on ' . preg_quote("{$this->prefix}.sync", '/') . '/', $lines);
            return $ours ? strtok(current($ours), "\t") : null;
        };
        $before = $connectionOfA();
        $this->assertNotNull($before);
        Broker::ctl('close_connection', $before, 'WorkerExamplesTest');
        $deadline = microtime(true) + 20;
        do {
            $this->poll(0.2);
            $queues = Broker::ctl('list_queues', 'name', 'consumers', '-q', '--no-table-headers');
            $back = preg_match('/^' . preg_quote($queue, '/') . '\s+1$/m', $queues) && ($now = $connectionOfA()) !== null && $now !== $before;
        } while (!$back && microtime(true) < $deadline);
        $this->assertTrue($back, "queue $queue is consumed again on a new connection");

        fwrite($this->procs[$b]['in'], "set user 1 {\"by\":\"b\"}\n");
        $this->waitForLine($a, '/^a: applied user:1 v1 from b$/');
        fwrite($this->procs[$a]['in'], "set user 2 {\"by\":\"a\"}\n");
        $this->waitForLine($b, '/^b: applied user:2 v1 from a$/');
        fclose($this->procs[$a]['in']);
        fclose($this->procs[$b]['in']);
        $this->assertSame(0, $this->waitForExit($a, 15));
        $this->assertSame(0, $this->waitForExit($b, 15));
    }

    // ---- the supervised worker -------------------------------------------------------------

    public function testTheSupervisedWorkerFinishesTheJobInHandOnSigtermExitsZeroAndLosesNothing(): void
    {
        $queue = $this->conn->declareQueue("{$this->prefix}.jobs");
        $producer = $this->conn->producer();
        for ($i = 1; $i <= 10; $i++) {
            $producer->publishJson(['job' => $i], $queue);
        }
        $producer->waitForConfirms();

        $first = $this->start('worker-supervised.php', '--work-ms=400');
        $line = $this->waitForLine($first, '/ job 2 started$/');
        posix_kill($this->procs[$first]['pid'], SIGTERM);
        $this->assertSame(0, $this->waitForExit($first, 5));
        $lines = array_map(fn ($l) => preg_replace('/^\S+ worker\[\d+\] /', '', $l), $this->procs[$first]['lines']);
        $this->assertSame(['started, consuming ' . $queue, 'job 1 started', 'job 1 done', 'job 2 started', 'job 2 done', 'stopping (got SIGTERM) after 2 jobs'], $lines, 'job 2 was finished, no job 3 begun');
        $this->assertSame(8, $this->conn->queueStatus($queue)['messages'], 'the prefetched jobs went back');

        $second = $this->start('worker-supervised.php', '--work-ms=0', '--idle=1');
        $this->assertSame(0, $this->waitForExit($second, 10));
        $this->assertContains('stopping (idle) after 8 jobs', array_map(fn ($l) => preg_replace('/^\S+ worker\[\d+\] /', '', $l), $this->procs[$second]['lines']));
        $done = array_column($this->linesMatching('/ job (\d+) done$/', $first, $second), 1);
        sort($done, SORT_NUMERIC);
        $this->assertSame(array_map('strval', range(1, 10)), $done, 'every job done once');
        $this->assertSame(0, $this->conn->queueStatus($queue)['messages']);
    }

    // ---- processes -------------------------------------------------------------------------

    /** Starts examples/$script with our prefix; returns its index in $this->procs. */
    private function start(string $script, string ...$args): int
    {
        $so = Broker::extensionPath();
        $env = ['AMQP_URI' => Broker::uri(), 'AMQP_PREFIX' => $this->prefix, 'PATH' => getenv('PATH')];
        $proc = proc_open(
            [PHP_BINARY, '-d', "extension=$so", self::EXAMPLES . "/$script", ...$args],
            [0 => ['pipe', 'r'], 1 => ['pipe', 'w'], 2 => ['redirect', 1]],
            $pipes,
            null,
            $env,
        );
        stream_set_blocking($pipes[1], false);
        $this->procs[] = ['proc' => $proc, 'out' => $pipes[1], 'in' => $pipes[0], 'pid' => proc_get_status($proc)['pid'], 'buf' => '', 'lines' => [], 'exit' => null];
        return array_key_last($this->procs);
    }

    /** Runs examples/$script to its end, which must be exit code 0; returns its index. */
    private function runToEnd(string $script, string ...$args): int
    {
        $i = $this->start($script, ...$args);
        fclose($this->procs[$i]['in']);
        $this->assertSame(0, $this->waitForExit($i, 15), "$script failed:\n" . $this->outputOf($i));
        return $i;
    }

    /** Reads what every running process printed so far, waiting up to $timeout for some. */
    private function poll(float $timeout): void
    {
        $read = [];
        foreach ($this->procs as $p) {
            if (!feof($p['out'])) {
                $read[] = $p['out'];
            }
        }
        $w = $e = null;
        if ($read && stream_select($read, $w, $e, 0, (int) ($timeout * 1e6)) > 0) {
            foreach ($this->procs as $i => $p) {
                if (in_array($p['out'], $read, true)) {
                    $this->procs[$i]['buf'] .= stream_get_contents($p['out']);
                    while (($nl = strpos($this->procs[$i]['buf'], "\n")) !== false) {
                        $this->procs[$i]['lines'][] = substr($this->procs[$i]['buf'], 0, $nl);
                        $this->procs[$i]['buf'] = substr($this->procs[$i]['buf'], $nl + 1);
                    }
                }
            }
        } elseif (!$read) {
            usleep((int) ($timeout * 1e6));
        }
    }

    /** Waits for a line of any of $procs matching $regex; returns [index, line]. */
    private function waitForAnyLine(array $procs, string $regex, float $timeout = 10): array
    {
        $seen = array_fill_keys($procs, 0);
        $deadline = microtime(true) + $timeout;
        while (microtime(true) < $deadline) {
            foreach ($procs as $i) {
                $lines = $this->procs[$i]['lines'];
                for (; $seen[$i] < count($lines); $seen[$i]++) {
                    if (preg_match($regex, $lines[$seen[$i]])) {
                        return [$i, $lines[$seen[$i]]];
                    }
                }
            }
            $this->poll(0.05);
        }
        $this->fail("no line matching $regex within {$timeout}s; output:\n" . $this->outputOf(...$procs));
    }

    private function waitForLine(int $proc, string $regex, float $timeout = 10): string
    {
        return $this->waitForAnyLine([$proc], $regex, $timeout)[1];
    }

    /** Waits for the process to end, reading its output; returns its exit code (-1: killed by a signal). */
    private function waitForExit(int $i, float $timeout): int
    {
        $deadline = microtime(true) + $timeout;
        while ($this->procs[$i]['exit'] === null) {
            $status = proc_get_status($this->procs[$i]['proc']);
            if (!$status['running']) {
                $this->procs[$i]['exit'] = $status['signaled'] ? -1 : $status['exitcode'];
                break;
            }
            if (microtime(true) > $deadline) {
                $this->fail("{$this->procs[$i]['pid']} did not exit within {$timeout}s; output:\n" . $this->outputOf($i));
            }
            $this->poll(0.05);
        }
        while (!feof($this->procs[$i]['out'])) {
            $this->poll(0.05);
        }
        foreach ($this->procs[$i]['lines'] as $line) {
            $this->assertDoesNotMatchRegularExpression('/(Warning|Fatal error|Deprecated|Notice):/', $line, "output of pid {$this->procs[$i]['pid']}");
        }
        return $this->procs[$i]['exit'];
    }

    /** Every match of $regex in the lines of $procs, as preg_match gives it. */
    private function linesMatching(string $regex, int ...$procs): array
    {
        $found = [];
        foreach ($procs as $i) {
            foreach ($this->procs[$i]['lines'] as $line) {
                if (preg_match($regex, $line, $m)) {
                    $found[] = $m;
                }
            }
        }
        return $found;
    }

    /** @return array<string, int> how many times each value occurs, keys sorted */
    private function tally(array $values): array
    {
        $counts = array_count_values($values);
        ksort($counts, SORT_NATURAL);
        return $counts;
    }

    private function outputOf(int ...$procs): string
    {
        return implode("\n", array_map(fn ($i) => implode("\n", $this->procs[$i]['lines']) . $this->procs[$i]['buf'], $procs));
    }
}
