<?php

declare(strict_types=1);

use AmqpRs\ChannelException;
use AmqpRs\Connection;
use AmqpRs\Tests\Support\BackgroundWorker;
use AmqpRs\Tests\Support\Broker;
use AmqpRs\Tests\Support\Children;
use AmqpRs\Tests\Support\LaravelApp;
use PHPUnit\Framework\TestCase;

require_once __DIR__ . '/Support/LaravelApp.php';

/**
 * The amqp-rs Laravel queue driver (laravel/) in a real Laravel 8 application (Debian's
 * php-laravel-framework) built in a temporary directory: jobs dispatched by one PHP process
 * and run by a real `php artisan queue:work amqp-rs` process, against the real broker. The
 * driver's service provider is registered by Laravel's package discovery from
 * laravel/composer.json, so every test also checks that.
 */
final class LaravelTest extends TestCase
{
    use BackgroundWorker;

    private static ?LaravelApp $app = null;

    private Connection $conn;
    private string $queue;
    private string $work;
    /** @var resource|null a worker started in the background */
    private $proc = null;
    /** @var array<string, string> environment of this test's Laravel processes */
    private array $env = [];

    public static function tearDownAfterClass(): void
    {
        self::$app?->remove();
        self::$app = null;
    }

    protected function setUp(): void
    {
        if (($missing = LaravelApp::missing()) !== null) {
            $this->fail($missing);
        }
        self::$app ??= new LaravelApp(Broker::extensionPath());
        $this->conn = new Connection(Broker::uri());
        $this->queue = Broker::unique('laravel');
        $this->work = self::$app->dir . '/work/' . (method_exists($this, 'name') ? $this->name() : $this->getName(false));
        mkdir($this->work, 0777, true);
        self::$app->pdo()->exec('DELETE FROM failed_jobs');
    }

    protected function tearDown(): void
    {
        Children::end($this->proc);
        foreach ([$this->queue, "{$this->queue}.failed", "{$this->queue}.dlq", "{$this->queue}.high", ...array_map(
            fn (int $ms) => "amq_rs.delay.{$ms}ms.(default).{$this->queue}",
            [1000, 2000]
        )] as $queue) {
            $this->conn->deleteQueue($queue);
        }
        $this->conn->close();
    }

    public function testJobDispatchedFromAPlainScriptIsRunByQueueWork(): void
    {
        $this->dispatch('WriteLine', 1, 0, "$this->work/out.txt", 'hello {i}');

        [$code, $out, $err] = $this->artisan('queue:work', 'amqp-rs', '--stop-when-empty', '--sleep=0');

        $this->assertSame(0, $code, $out . $err);
        $this->assertMatchesRegularExpression(self::workerSaid('done', 'App\\\\Jobs\\\\WriteLine'), $out);
        $this->assertMatchesRegularExpression('/^hello 0 attempt=1 /', (string) file_get_contents("$this->work/out.txt"));
        $this->assertSame(['messages' => 0, 'consumers' => 0], $this->conn->queueStatus($this->queue));
    }

    public function testADispatchedJobIsAPersistentJsonMessageWithItsUuidAsMessageIdInADurableQueue(): void
    {
        $dispatched = $this->dispatch('WriteLine', 2, 0, "$this->work/out.txt", 'x');

        $this->assertSame(2, $dispatched['size'], 'Queue::size() after two dispatches');
        $this->assertTrue($dispatched['persistent'], 'the driver dispatches over a persistent connection by default');
        if (isset($dispatched['pending'])) {
            // Laravel 13's contract: ready jobs are pending; AMQP counts no delayed or reserved ones.
            $this->assertSame(['pending' => 2, 'delayed' => 0, 'reserved' => 0, 'oldest' => null],
                array_intersect_key($dispatched, ['pending' => 0, 'delayed' => 0, 'reserved' => 0, 'oldest' => 0]));
        }
        $message = $this->conn->get($this->queue, true);
        $this->assertNotNull($message);
        $payload = $message->json();
        $this->assertSame(2, $message->getDeliveryMode());
        $this->assertSame('application/json', $message->getContentType());
        $this->assertSame($payload['uuid'], $message->getMessageId());
        $this->assertSame('App\Jobs\WriteLine', $payload['displayName']);
        $this->assertSame(0, $payload['attempts']);
        try {
            $this->conn->declareQueue($this->queue, ['durable' => false]);
            $this->fail('the queue should have been declared durable');
        } catch (ChannelException $e) {
            $this->assertSame(406, $e->getCode());
        }
    }

    public function testAFailingJobIsRetriedWithBackoffThenRecordedInFailedJobsAndRejected(): void
    {
        $this->env['AMQP_DEAD_LETTER'] = $this->conn->declareQueue("{$this->queue}.dlq");
        $this->dispatch('Flaky', 1, 0, "$this->work/log", "$this->work/ok");

        [$code, $out, $err] = $this->artisan('queue:work', 'amqp-rs', '--tries=3', '--backoff=1', '--max-jobs=3', '--sleep=0.1', '--max-time=20');

        $this->assertSame(0, $code, $out . $err);
        $starts = $this->attempts("$this->work/log", 'start');
        $this->assertSame([1, 2, 3], array_keys($starts), 'attempts 1, 2 and 3, each counted');
        foreach ([2, 3] as $n) {
            $gap = $starts[$n] - $starts[$n - 1];
            $this->assertGreaterThanOrEqual(0.95, $gap, "--backoff=1 before attempt $n");
            $this->assertLessThan(2.5, $gap, "--backoff=1 before attempt $n");
        }
        $failed = self::$app->pdo()->query('SELECT * FROM failed_jobs')->fetchAll(PDO::FETCH_ASSOC);
        $this->assertCount(1, $failed);
        $this->assertSame('amqp-rs', $failed[0]['connection']);
        $this->assertSame($this->queue, $failed[0]['queue']);
        $this->assertStringContainsString('flaky failure on attempt 3', $failed[0]['exception']);
        [, $list] = $this->artisan('queue:failed');
        $this->assertStringContainsString($failed[0]['uuid'], $list);
        $this->assertSame(['messages' => 0, 'consumers' => 0], $this->conn->queueStatus($this->queue), 'rejected, not requeued');
        $dead = $this->conn->get("{$this->queue}.dlq", true);
        $this->assertNotNull($dead, "dead-lettered by the broker to the queue's dead-letter exchange");
        $this->assertSame($failed[0]['uuid'], $dead->getMessageId());
        $this->assertSame('rejected', $dead->getHeader('x-death')[0]['reason'] ?? null);
    }

    public function testQueueRetryAllBringsAFailedJobBackAndItRuns(): void
    {
        $this->dispatch('Flaky', 1, 0, "$this->work/log", "$this->work/ok");
        [$code, $out, $err] = $this->artisan('queue:work', 'amqp-rs', '--tries=1', '--stop-when-empty', '--sleep=0');
        $this->assertSame(0, $code, $out . $err);
        $this->assertMatchesRegularExpression(self::workerSaid('failed', 'App\\\\Jobs\\\\Flaky'), $out);
        $this->assertSame(1, (int) self::$app->pdo()->query('SELECT COUNT(*) FROM failed_jobs')->fetchColumn());

        touch("$this->work/ok");
        [$code, $out] = $this->artisan('queue:retry', 'all');
        $this->assertSame(0, $code, $out);
        $this->assertSame(1, $this->conn->queueStatus($this->queue)['messages'], 'pushed back onto the queue');
        [$code, $out, $err] = $this->artisan('queue:work', 'amqp-rs', '--tries=1', '--stop-when-empty', '--sleep=0');

        $this->assertSame(0, $code, $out . $err);
        $this->assertArrayHasKey(1, $this->attempts("$this->work/log", 'done'), 'ran to the end as attempt 1 (attempts reset)');
        $this->assertSame(0, (int) self::$app->pdo()->query('SELECT COUNT(*) FROM failed_jobs')->fetchColumn());
        [, $list] = $this->artisan('queue:failed');
        $this->assertStringContainsString('No failed jobs', $list);
    }

    public function testADelayedJobRunsAfterItsDelay(): void
    {
        $dispatched = $this->dispatch('WriteLine', 1, 2, "$this->work/out.txt", 'later');
        $queuedAt = microtime(true);

        $this->assertSame(0, $dispatched['size'], 'not ready before its delay');
        [$code, $out, $err] = $this->artisan('queue:work', 'amqp-rs', '--max-jobs=1', '--max-time=10', '--sleep=0.1');

        $this->assertSame(0, $code, $out . $err);
        $this->assertMatchesRegularExpression('/^later attempt=1 at=([\d.]+)/', (string) file_get_contents("$this->work/out.txt"));
        preg_match('/at=([\d.]+)/', (string) file_get_contents("$this->work/out.txt"), $m);
        $waited = (float) $m[1] - $queuedAt;
        $this->assertGreaterThanOrEqual(1.9, $waited);
        $this->assertLessThan(4.0, $waited);
    }

    public function testSigtermLetsTheJobInHandFinishThenTheWorkerExits(): void
    {
        touch("$this->work/ok");
        $this->dispatch('Flaky', 2, 0, "$this->work/log", "$this->work/ok", '1.5');
        $pid = $this->startWorker('--sleep=1');
        $this->waitFor(fn () => str_contains((string) @file_get_contents("$this->work/log"), 'start'), 10.0, 'the first job starts');

        posix_kill($pid, SIGTERM);
        $sent = microtime(true);
        $code = $this->waitForExit(5.0);

        $this->assertSame(0, $code, 'a clean exit');
        $this->assertLessThan(2.5, microtime(true) - $sent, 'within the job in hand (1.5 s)');
        $this->assertSame([1], array_keys($this->attempts("$this->work/log", 'done')), 'the job in hand finished');
        $this->assertCount(1, $this->attempts("$this->work/log", 'start'), 'the next job was not started');
        $this->assertSame(['messages' => 1, 'consumers' => 0], $this->conn->queueStatus($this->queue), 'the finished job acked, the other back in the queue');
    }

    public function testSigtermStopsAnIdleWorkerPromptly(): void
    {
        $this->startWorker();   // --sleep=3 between empty polls, Laravel's default
        $this->waitFor(fn () => $this->consumers() === 1, 10.0, 'the worker consumes');
        usleep(200_000);

        posix_kill(proc_get_status($this->proc)['pid'], SIGTERM);
        $sent = microtime(true);
        $code = $this->waitForExit(5.0);

        $this->assertSame(0, $code);
        $this->assertLessThan(1.0, microtime(true) - $sent);
    }

    public function testTimeoutKillsTheWorkerCountsTheAttemptAndFailsTheJobWhenTriesAreSpent(): void
    {
        touch("$this->work/ok");
        $this->dispatch('Flaky', 1, 0, "$this->work/log", "$this->work/ok", '10');
        $worker = ['queue:work', 'amqp-rs', '--timeout=1', '--tries=2', '--stop-when-empty', '--sleep=0'];

        [$code, , , $seconds] = $this->artisan(...$worker);
        $this->assertSame(128 + SIGKILL, $code, 'Laravel kills a worker whose job runs past --timeout');
        $this->assertLessThan(4.0, $seconds);
        $this->assertSame(1, $this->conn->queueStatus($this->queue)['messages']);
        $message = $this->conn->get($this->queue);
        $this->assertSame(1, $message->json()['attempts'], 'the interrupted attempt is counted');
        $this->assertSame(2, $message->getAttempt());
        $message->nack(true);

        [$code] = $this->artisan(...$worker);
        $this->assertSame(128 + SIGKILL, $code);
        $failed = self::$app->pdo()->query('SELECT exception FROM failed_jobs')->fetchAll(PDO::FETCH_COLUMN);
        $this->assertCount(1, $failed);
        // Laravel 8 records that the tries are spent; 13 that the last one timed out.
        $this->assertMatchesRegularExpression('/MaxAttemptsExceededException|TimeoutExceededException/', $failed[0]);
        $this->assertSame(0, $this->conn->queueStatus($this->queue)['messages']);
        $this->assertSame([1, 2], array_keys($this->attempts("$this->work/log", 'start')));
    }

    public function testMaxJobsAndMemoryLimitsStopTheWorkerAndLeaveTheRestInTheQueue(): void
    {
        $this->dispatch('WriteLine', 3, 0, "$this->work/out.txt", 'job {i}');

        [$code, $out, $err] = $this->artisan('queue:work', 'amqp-rs', '--max-jobs=1', '--sleep=0');
        $this->assertSame(0, $code, $out . $err);
        $this->assertSame(2, $this->conn->queueStatus($this->queue)['messages'], 'prefetched jobs go back');

        [$code] = $this->artisan('queue:work', 'amqp-rs', '--memory=1', '--sleep=0');
        $this->assertSame(12, $code, "Worker::EXIT_MEMORY_LIMIT");
        $this->assertSame(1, $this->conn->queueStatus($this->queue)['messages']);
        $this->assertCount(2, file("$this->work/out.txt"));
    }

    public function testTheWorkerCarriesOnWhenTheBrokerClosesItsConnection(): void
    {
        touch("$this->work/ok");
        $name = "laravel-test-{$this->queue}";
        $this->env['AMQP_CONNECTION_NAME'] = $name;
        $this->dispatch('Flaky', 4, 0, "$this->work/log", "$this->work/ok", '0.5');
        // -v: Laravel 9+ shows the job id only when verbose.
        $this->startWorker('--stop-when-empty', '--sleep=0.1', '-v');
        $this->waitFor(fn () => count($this->attempts("$this->work/log", 'done')) >= 1, 10.0, 'a first job done');

        $closed = 0;
        foreach (explode("\n", Broker::ctl('list_connections', '-q', 'pid', 'client_properties')) as $line) {
            if (str_contains($line, $name)) {
                Broker::ctl('close_connection', explode("\t", $line)[0], 'closed by LaravelTest');
                $closed++;
            }
        }
        $this->assertSame(1, $closed, "the worker's connection, by its name");
        $code = $this->waitForExit(20.0);

        $this->assertSame(0, $code, (string) @file_get_contents("$this->work/worker.err"));
        preg_match_all(self::workerSaid('done', '.*', '([0-9a-f-]{36})'), (string) file_get_contents("$this->work/worker.out"), $m);
        $this->assertCount(4, array_unique($m[1]), 'every job ran (at least once: one in hand may run again)');
        $this->assertSame(['messages' => 0, 'consumers' => 0], $this->conn->queueStatus($this->queue));
    }

    public function testWithBlockForAnIdleWorkerWaitsInTheBufferAndTakesAJobTheMomentItArrives(): void
    {
        $this->env['AMQP_BLOCK_FOR'] = '1';
        $cpu = self::childrenCpu();
        $this->startWorker('--sleep=0', '--max-jobs=1', '--max-time=20');
        $this->waitFor(fn () => $this->consumers() === 1, 10.0, 'the worker consumes');
        usleep(2_000_000);   // idle, with --sleep=0: it must wait in next(), not spin

        $dispatchCpu = self::childrenCpu();
        $sent = microtime(true);
        $this->dispatch('WriteLine', 1, 0, "$this->work/out.txt", 'prompt');
        $dispatchCpu = self::childrenCpu() - $dispatchCpu;
        $code = $this->waitForExit(10.0);
        $workerCpu = self::childrenCpu() - $cpu - $dispatchCpu;

        $this->assertSame(0, $code);
        preg_match('/at=([\d.]+)/', (string) file_get_contents("$this->work/out.txt"), $m);
        $this->assertLessThan(1.0, (float) $m[1] - $sent, 'taken as soon as dispatched');
        $this->assertLessThan(0.45, $workerCpu, 'CPU seconds of the worker: it booted and waited, it did not poll');
    }

    public function testMaxTimeStopsAnIdleWorker(): void
    {
        [$code, $out, $err, $seconds] = $this->artisan('queue:work', 'amqp-rs', '--max-time=1', '--sleep=0.1');

        $this->assertSame(0, $code, $out . $err);
        $this->assertGreaterThanOrEqual(1.0, $seconds);
        $this->assertLessThan(3.0, $seconds);
    }

    public function testAWorkerOfSeveralQueuesTakesThemInTheOrderGiven(): void
    {
        $this->dispatch('WriteLine', 3, 0, "$this->work/out.txt", 'low {i}');
        $this->env['AMQP_QUEUE'] = "{$this->queue}.high";
        $this->dispatch('WriteLine', 3, 0, "$this->work/out.txt", 'high {i}');

        [$code, $out, $err, $seconds] = $this->artisan('queue:work', 'amqp-rs', "--queue={$this->queue}.high,{$this->queue}", '--stop-when-empty', '--sleep=0');

        $this->assertSame(0, $code, $out . $err);
        $lines = array_map(fn ($l) => explode(' attempt', $l)[0], file("$this->work/out.txt", FILE_IGNORE_NEW_LINES));
        $this->assertSame(['high 0', 'high 1', 'high 2', 'low 0', 'low 1', 'low 2'], $lines);
        $this->assertLessThan(3.0, $seconds);
    }

    public function testWithFailedQueueAFailedJobIsKeptInTheFailedQueueWithItsReason(): void
    {
        $env = ['AMQP_FAILED_QUEUE' => '{queue}.failed'];
        $this->dispatch('Flaky', 1, 0, "$this->work/log", "$this->work/ok");

        [$code, $out, $err] = $this->artisanWith($env, 'queue:work', 'amqp-rs', '--tries=1', '--stop-when-empty', '--sleep=0');

        $this->assertSame(0, $code, $out . $err);
        $this->assertSame(0, $this->conn->queueStatus($this->queue)['messages']);
        $message = $this->conn->get("{$this->queue}.failed", true);
        $this->assertNotNull($message, 'in <queue>.failed');
        $this->assertSame('RuntimeException: flaky failure on attempt 1', $message->getHeader('x-failure-reason'));
        $this->assertSame($this->queue, $message->getHeader('x-failed-queue'));
        $this->assertSame(1, $message->getHeader('x-attempt'));
        $this->assertSame('App\Jobs\Flaky', $message->json()['displayName']);
        $this->assertSame(1, (int) self::$app->pdo()->query('SELECT COUNT(*) FROM failed_jobs')->fetchColumn(), 'and in failed_jobs');
    }

    public function testQueueClearEmptiesTheQueue(): void
    {
        $this->dispatch('WriteLine', 3, 0, "$this->work/out.txt", 'x');

        [$code, $out] = $this->artisan('queue:clear', 'amqp-rs');

        $this->assertSame(0, $code, $out);
        $this->assertStringContainsString('Cleared 3 jobs', $out);
        $this->assertSame(0, $this->conn->queueStatus($this->queue)['messages']);
    }

    /** Runs dispatch.php: $count jobs of App\Jobs\$job, delayed $delay s; returns its report. */
    private function dispatch(string $job, int $count, int $delay, string ...$args): array
    {
        [$code, $out, $err] = LaravelApp::run(self::$app->script('dispatch.php', $job, (string) $count, (string) $delay, ...$args), $this->env());
        $this->assertSame(0, $code, "dispatch.php: $out $err");
        return json_decode($out, true, 512, JSON_THROW_ON_ERROR);
    }

    /** @return array{int, string, string, float} exit code, stdout, stderr, seconds */
    private function artisan(string ...$args): array
    {
        return $this->artisanWith([], ...$args);
    }

    /** As artisan(), with more environment variables. */
    private function artisanWith(array $env, string ...$args): array
    {
        return LaravelApp::run(self::$app->artisan(...$args), $this->env($env), 30.0);
    }

    /** Starts `queue:work amqp-rs` in the background; returns its pid. */
    /**
     * A pattern for queue:work's line saying that a job ('done' or 'failed') of class $job
     * (a regex) ran, in Laravel 8's format ("[date][id] Processed:  Class") or in 9+'s ("date
     * Class id connection queue .... 8ms DONE", the id shown only with -v). $id: a regex for
     * the job id, captured as group 1 (Laravel 9+ without -v prints none: then leave it null).
     */
    private static function workerSaid(string $status, string $job, ?string $id = null): string
    {
        [$old, $new] = $status === 'done' ? ['Processed:', 'DONE'] : ['Failed:', 'FAIL'];
        $idPart = $id ?? '[^]]*';
        return $id === null
            ? "/(\\]\\[$idPart\\] $old\\s+$job\\b|$job\\b.* $new\\b)/"
            : "/(?|\\]\\[$id\\] $old\\s+$job\\b|$job $id .* $new\\b)/";
    }

    private function startWorker(string ...$options): int
    {
        return $this->startBackground(self::$app->artisan('queue:work', 'amqp-rs', ...$options));
    }

    /** @return array<int, float> from a Flaky log: attempt => time of its "$what" line */
    private function attempts(string $log, string $what): array
    {
        preg_match_all("/^$what attempt=(\\d+) at=([\\d.]+)$/m", (string) @file_get_contents($log), $m, PREG_SET_ORDER);
        $attempts = [];
        foreach ($m as [, $n, $at]) {
            $this->assertArrayNotHasKey((int) $n, $attempts, "attempt $n ran twice");
            $attempts[(int) $n] = (float) $at;
        }
        return $attempts;
    }

    /** CPU seconds (user + system) of the children reaped so far. */
    private static function childrenCpu(): float
    {
        $r = getrusage(1);   // RUSAGE_CHILDREN
        return $r['ru_utime.tv_sec'] + $r['ru_utime.tv_usec'] / 1e6 + $r['ru_stime.tv_sec'] + $r['ru_stime.tv_usec'] / 1e6;
    }

    /** Consumers of the test's queue (0 before the worker declared it). */
    private function consumers(): int
    {
        try {
            return (new Connection(Broker::uri()))->queueStatus($this->queue)['consumers'];
        } catch (ChannelException) {
            return 0;
        }
    }

    private function env(array $extra = []): array
    {
        return $extra + $this->env + ['AMQP_URI' => Broker::uri(), 'AMQP_QUEUE' => $this->queue, 'AMQP_FAILED_QUEUE' => '', 'AMQP_DEAD_LETTER' => ''];
    }
}
