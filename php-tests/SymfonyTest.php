<?php

declare(strict_types=1);

use AmqpRs\ChannelException;
use AmqpRs\Connection;
use AmqpRs\Tests\Support\Broker;
use AmqpRs\Tests\Support\SymfonyApp;
use AmqpRs\Tests\Support\SymfonyWorkers;
use PHPUnit\Framework\TestCase;

require_once __DIR__ . '/Support/SymfonyApp.php';
require_once __DIR__ . '/Support/SymfonyWorkers.php';

/**
 * The amqp-rs Messenger transport (symfony/) in a real Symfony application (Debian's Symfony
 * packages: 5.4 on Debian 12, 7.4 on sid) built in a temporary directory: messages dispatched
 * by one PHP process through the bus and handled by real `bin/console messenger:consume`
 * processes, against the real broker. The transport factory is registered by the package's
 * bundle, listed in config/bundles.php, so every test also checks that.
 */
final class SymfonyTest extends TestCase
{
    use SymfonyWorkers;

    private static ?SymfonyApp $app = null;

    private Connection $conn;
    private string $queue;
    private string $work;
    /** @var resource|null a worker started in the background */
    private $proc = null;
    /** @var resource|null Support/proxy.php in tls mode, and its stdin (closing it ends the proxy) */
    private $tlsProxy = null;
    /** @var resource|null */
    private $tlsProxyStdin = null;
    /** @var array<string, string> query options added to the DSN of the "async" transport */
    private array $dsnOptions = [];
    /** @var list<string> exchanges to delete after the test */
    private array $exchanges = [];

    public static function tearDownAfterClass(): void
    {
        self::$app?->remove();
        self::$app = null;
    }

    protected function setUp(): void
    {
        if (($missing = SymfonyApp::missing()) !== null) {
            $this->fail($missing);
        }
        self::$app ??= new SymfonyApp(Broker::extensionPath());
        $this->conn = new Connection(self::brokerUri());
        $this->queue = Broker::unique('symfony');
        $this->work = self::$app->dir . '/work/' . $this->queue;
        mkdir($this->work, 0777, true);
        $this->dsnOptions = ['connection_name' => "symfony-test-{$this->queue}"];
    }

    protected function tearDown(): void
    {
        if (is_resource($this->tlsProxy)) {
            fclose($this->tlsProxyStdin);   // the proxy serves until its stdin closes
            proc_close($this->tlsProxy);
        }
        if (is_resource($this->proc)) {
            $status = proc_get_status($this->proc);
            if ($status['running']) {
                posix_kill($status['pid'], SIGKILL);
            }
            proc_close($this->proc);
        }
        // Delay queues are named by their delay, which Symfony 7.1+ jitters: found by listing.
        $delays = array_filter(
            explode("\n", Broker::ctl('list_queues', '-q', 'name')),
            fn (string $name) => str_starts_with($name, 'amq_rs.delay.') && str_ends_with($name, ".(default).{$this->queue}")
        );
        foreach ([$this->queue, "{$this->queue}.failed", "{$this->queue}.other", "{$this->queue}.low", ...$delays] as $queue) {
            $this->conn->deleteQueue($queue);
        }
        foreach ($this->exchanges as $exchange) {
            $this->conn->deleteExchange($exchange);
        }
        $this->conn->close();
    }

    public function testADispatchedMessageIsHandledByMessengerConsume(): void
    {
        $this->dispatch('WriteLine', 1, 0, "$this->work/out.txt", 'hello {i}');

        [$code, $out, $err] = $this->console('messenger:consume', 'async', '--limit=1', '--time-limit=20');

        $this->assertSame(0, $code, $out . $err);
        $this->assertMatchesRegularExpression('/^hello 0 at=/', (string) file_get_contents("$this->work/out.txt"));
        $this->assertSame(['messages' => 0, 'consumers' => 0], $this->conn->queueStatus($this->queue));
    }

    public function testADispatchedMessageIsPersistentWithAMessageIdInADurableQueueAndCounted(): void
    {
        $this->dispatch('WriteLine', 2, 0, "$this->work/out.txt", 'x');

        [, $out, $err] = $this->console('messenger:stats');
        if (!str_contains($out . $err, 'not defined')) {
            // messenger:stats (Symfony 6.2+) reads getMessageCount().
            $this->assertMatchesRegularExpression('/async\s+2/', $out);
        }
        $this->assertSame(2, $this->conn->queueStatus($this->queue)['messages']);
        $message = $this->conn->get($this->queue, true);
        $this->assertSame(2, $message->getDeliveryMode());
        $this->assertMatchesRegularExpression('/^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/', (string) $message->getMessageId());
        $this->assertEqualsWithDelta(time(), $message->getTimestamp(), 30);
        try {
            $this->conn->declareQueue($this->queue, ['durable' => false]);
            $this->fail('the queue should have been declared durable');
        } catch (ChannelException $e) {
            $this->assertSame(406, $e->getCode());
        }
    }

    public function testAStampSetsTheRoutingKeyAndPropertiesOnANamedExchange(): void
    {
        $exchange = $this->exchanges[] = "{$this->queue}.x";
        $this->dsnOptions += [
            'exchange[name]' => $exchange, 'exchange[type]' => 'direct',
            "queues[{$this->queue}][binding_keys][0]" => 'orders', "queues[{$this->queue}.other][binding_keys][0]" => 'other',
        ];

        $this->dispatchWith(['DISPATCH_ROUTING_KEY' => 'orders'], 0, 'WriteLine', 1, 0, "$this->work/out.txt", 'x');

        $this->assertSame(0, $this->conn->queueStatus("{$this->queue}.other")['messages'], 'routed by the key');
        $message = $this->conn->get($this->queue, true);
        $this->assertNotNull($message);
        $this->assertSame('orders', $message->getRoutingKey());
        $this->assertSame($exchange, $message->getExchange());
        $this->assertSame(3, $message->getPriority());
        $this->assertSame('acme', $message->getHeader('x-tenant'));
    }

    public function testAFailingMessageIsRetriedWithDelaysThenSentToTheFailureTransport(): void
    {
        $this->dispatch('Flaky', 1, 0, "$this->work/log", "$this->work/ok", '0', 'm1');

        [$code, $out, $err] = $this->console('messenger:consume', 'async', '--limit=3', '--time-limit=20', '-vv');

        $this->assertSame(0, $code, $out . $err);
        $starts = array_column($this->times('start'), 1);
        $this->assertCount(3, $starts, 'the first attempt and max_retries: 2');
        foreach ([1 => 1.0, 2 => 2.0] as $n => $delay) {
            $gap = $starts[$n] - $starts[$n - 1];
            // The broker's TTL runs on its own clock: on a loaded machine it was seen to release
            // a 2 s delay 105 ms early. What matters here is that the retry waited.
            $this->assertGreaterThanOrEqual(0.9 * $delay, $gap, "retry $n waits its delay");
            $this->assertLessThan($delay + 1.5, $gap, "retry $n waits its delay");
        }
        $this->assertSame(0, $this->conn->queueStatus($this->queue)['messages']);
        $this->assertSame(1, $this->conn->queueStatus("{$this->queue}.failed")['messages']);
        [$code, $out, $err] = $this->console('messenger:failed:show');
        $list = $out . $err;
        $this->assertSame(0, $code, $list);
        $this->assertStringContainsString('App\Message\Flaky', $list);
        $this->assertStringContainsString('flaky failure of m1', $list);
        $this->assertSame(1, $this->conn->queueStatus("{$this->queue}.failed")['messages'], 'listing leaves it there');
    }

    public function testFailedRetryHandlesTheFailedMessageAgainAndRemovesIt(): void
    {
        $this->dispatch('Flaky', 2, 0, "$this->work/log", "$this->work/ok", '0', 'm{i}');
        $this->withRetries(0);
        [$code, $out, $err] = $this->console('messenger:consume', 'async', '--limit=2', '--time-limit=20');
        $this->assertSame(0, $code, $out . $err);
        [, $out, $err] = $this->console('messenger:failed:show');
        $list = $out . $err;
        preg_match_all('/([0-9a-f]{8}-[0-9a-f-]{27})\s+App\\\\Message\\\\Flaky\s.*flaky failure of (m\d)/', $list, $m, PREG_SET_ORDER);
        $this->assertCount(2, $m, $list);
        [, $id, $which] = $m[1];

        [$code, $out, $err] = $this->console('messenger:failed:show', $id);
        $shown = $out . $err;
        $this->assertSame(0, $code, $shown);
        $this->assertStringContainsString('RuntimeException', $shown);
        touch("$this->work/ok");
        [$code, $out, $err] = $this->console('messenger:failed:retry', $id, '--force', '--no-interaction');

        $this->assertSame(0, $code, $out . $err);
        $this->assertSame([$which], array_keys($this->lines('done')), 'the message asked for ran');
        $this->assertSame(1, $this->conn->queueStatus("{$this->queue}.failed")['messages'], 'the other one is still there');
        [, $out, $err] = $this->console('messenger:failed:show');
        $this->assertStringNotContainsString($id, $out . $err);
    }

    public function testSigtermLetsTheMessageInHandFinishThenTheWorkerExits(): void
    {
        touch("$this->work/ok");
        $this->dispatch('Flaky', 2, 0, "$this->work/log", "$this->work/ok", '1.5', 'm{i}');
        $pid = $this->startWorker('--time-limit=30');
        $this->waitFor(fn () => $this->times('start') !== [], 15.0, 'the first message starts');

        posix_kill($pid, SIGTERM);
        $sent = microtime(true);
        $code = $this->waitForExit(10.0);

        $this->assertSame(0, $code, 'a clean exit');
        $this->assertLessThan(3.0, microtime(true) - $sent, 'within the message in hand (1.5 s)');
        $this->assertSame(['m0'], array_keys($this->lines('done')), 'the message in hand finished');
        $this->assertCount(1, $this->lines('start'), 'the next one was not started');
        $this->assertSame(['messages' => 1, 'consumers' => 0], $this->conn->queueStatus($this->queue), 'the finished one acked, the other back in the queue');
    }

    /**
     * @dataProvider idleSleeps
     */
    #[\PHPUnit\Framework\Attributes\DataProvider('idleSleeps')]
    public function testSigtermStopsAnIdleWorkerPromptly(string $sleep, float $within): void
    {
        $pid = $this->startWorker('--time-limit=30', "--sleep=$sleep");
        $this->waitFor(fn () => $this->consumers() === 1, 15.0, 'the worker consumes');
        usleep(300_000);

        posix_kill($pid, SIGTERM);
        $sent = microtime(true);
        $code = $this->waitForExit(10.0);

        $this->assertSame(0, $code);
        $this->assertLessThan($within, microtime(true) - $sent);
    }

    /** --sleep, and how soon the worker must exit: what is left of --sleep after the wait ends. */
    public static function idleSleeps(): array
    {
        return ['default --sleep=1' => ['1', 1.5], '--sleep=0' => ['0', 0.5]];
    }

    public function testAFiveSecondHandlerKeepsItsConnectionWithOneSecondHeartbeats(): void
    {
        touch("$this->work/ok");
        $this->dsnOptions['heartbeat'] = '1';
        $this->dispatch('Flaky', 2, 0, "$this->work/log", "$this->work/ok", '5', 'm{i}');
        $pid = $this->startWorker('--limit=2', '--time-limit=40');
        $this->waitFor(fn () => $this->times('start') !== [], 15.0, 'the first message starts');
        $before = $this->connectionPids();
        $this->assertCount(1, $before, 'the worker\'s connection, by its name');
        $this->assertStringContainsString("(pid $pid)", Broker::ctl('list_connections', '-q', 'client_properties'), 'persistent by default: the name carries the pid');

        $code = $this->waitForExit(30.0);
        $this->assertSame(0, $code, (string) @file_get_contents("$this->work/worker.err"));
        $this->assertSame(['m0', 'm1'], array_keys($this->lines('done')));
        $this->assertCount(2, $this->lines('start'), 'each ran once: no redelivery after a lost connection');
        $this->assertSame(['messages' => 0, 'consumers' => 0], $this->conn->queueStatus($this->queue));
    }

    public function testTheWorkerCarriesOnWhenTheBrokerClosesItsConnection(): void
    {
        touch("$this->work/ok");
        $this->dispatch('Flaky', 4, 0, "$this->work/log", "$this->work/ok", '0.5', 'm{i}');
        $pid = $this->startWorker('--time-limit=60');
        $this->waitFor(fn () => $this->times('done') !== [], 15.0, 'a first message done');

        $pids = $this->connectionPids();
        $this->assertCount(1, $pids, 'the worker\'s connection, by its name');
        Broker::ctl('close_connection', $pids[0], 'closed by SymfonyTest');
        $done = fn () => array_values(array_unique(array_column($this->times('done'), 0)));
        // Done, and none left unacked: the one in hand when the connection went comes back
        // (its ack was lost with the channel) and is handled again before the queue is empty.
        $this->waitFor(fn () => count($done()) === 4 && $this->messagesWithUnacked() === 0, 30.0, 'every message handled and acked');
        $this->assertNotSame([], $this->connectionPids(), 'connected again');
        posix_kill($pid, SIGTERM);
        $code = $this->waitForExit(10.0);

        $this->assertSame(0, $code, (string) @file_get_contents("$this->work/worker.err"));
        $this->assertSame(['m0', 'm1', 'm2', 'm3'], $done(), 'every message handled (the one in hand may run again)');
        // At least once: the connection is closed the moment the first message is logged done,
        // so its ack may not have reached the broker yet, and the next one is in hand. Those two
        // may run again; no other can.
        $this->assertLessThanOrEqual(6, count($this->times('done')));
        $this->assertSame(['messages' => 0, 'consumers' => 0], $this->conn->queueStatus($this->queue));
    }

    public function testAWorkerOfTwoTransportsTakesTheFirstsMessagesFirstAndDoesNotWaitOnItWhenEmpty(): void
    {
        $this->dispatch('LowLine', 20, 0, "$this->work/out.txt", 'low {i}');
        $this->dispatch('WriteLine', 2, 0, "$this->work/out.txt", 'high {i}');

        // An empty "async" must not hold up "low" for its wait (1 s) every round: 20 messages
        // at one a second would outlast --time-limit.
        [$code, $out, $err] = $this->console('messenger:consume', 'async', 'low', '--limit=22', '--time-limit=12');

        $this->assertSame(0, $code, $out . $err);
        $lines = array_map(fn ($l) => explode(' at=', $l)[0], file("$this->work/out.txt", FILE_IGNORE_NEW_LINES));
        $this->assertSame(['high 0', 'high 1', ...array_map(fn ($i) => "low $i", range(0, 19))], $lines);
        $this->assertSame(0, $this->conn->queueStatus("{$this->queue}.low")['messages']);
    }

    public function testAWorkerOfAnAmqpRsAndADoctrineTransportIsNotHeldUpByTheEmptyAmqpRsOne(): void
    {
        if (!SymfonyApp::hasDoctrine()) {
            $this->fail('Doctrine DBAL and Persistence and php-symfony-doctrine-messenger are needed (scripts/setup.sh installs them)');
        }
        $lowDsn = ['MESSENGER_LOW_DSN' => 'doctrine://default?queue_name=low', 'MESSENGER_SQLITE' => "$this->work/db.sqlite"];
        $this->dispatchWith($lowDsn, 0, 'LowLine', 20, 0, "$this->work/out.txt", 'low {i}');

        // The bundle's listener sees a worker of two kinds: amqp-rs's get() does not wait then.
        [$code, $out, $err] = SymfonyApp::run(self::$app->console('messenger:consume', 'async', 'low', '--limit=20', '--time-limit=12'), $this->env($lowDsn), 60.0);

        $this->assertSame(0, $code, $out . $err);
        $this->assertCount(20, file("$this->work/out.txt"), 'at one a second, --time-limit would have stopped it first');
    }

    public function testAnUndecodableMessageIsRejectedNotRequeuedAndTheNextOneIsHandled(): void
    {
        $dead = $this->conn->declareQueue("{$this->queue}.other");
        $this->dsnOptions += ["queues[{$this->queue}][arguments][x-dead-letter-exchange]" => '', "queues[{$this->queue}][arguments][x-dead-letter-routing-key]" => $dead];
        $this->dispatch('WriteLine', 1, 0, "$this->work/out.txt", 'good');   // declares the queue
        $this->conn->purgeQueue($this->queue);
        $producer = $this->conn->producer();
        $producer->publish('not a serialized envelope', $this->queue);
        $producer->waitForConfirms();
        $this->dispatch('WriteLine', 1, 0, "$this->work/out.txt", 'good');

        // Messenger's worker stops on the decoding error (Symfony's AMQP transport does too);
        // run it until the good message is handled.
        $runs = [];
        for ($i = 0; $i < 3 && !is_file("$this->work/out.txt"); $i++) {
            $runs[] = $this->console('messenger:consume', 'async', '--limit=1', '--time-limit=10');
        }

        $this->assertFileExists("$this->work/out.txt", json_encode($runs));
        $this->assertLessThanOrEqual(2, count($runs), 'the bad one is met once');
        $this->assertSame(0, $this->conn->queueStatus($this->queue)['messages']);
        $this->assertSame('not a serialized envelope', $this->conn->get($dead, true)?->getBody(), 'dead-lettered');
    }

    public function testLimitStopsTheWorkerAndLeavesTheRestInTheQueue(): void
    {
        $this->dispatch('WriteLine', 3, 0, "$this->work/out.txt", 'm{i}');

        [$code, $out, $err] = $this->console('messenger:consume', 'async', '--limit=2', '--time-limit=20');

        $this->assertSame(0, $code, $out . $err);
        $this->assertCount(2, file("$this->work/out.txt"));
        $this->assertSame(1, $this->conn->queueStatus($this->queue)['messages'], 'the prefetched one went back');
    }

    public function testTimeLimitStopsAnIdleWorker(): void
    {
        [$code, $out, $err, $seconds] = $this->console('messenger:consume', 'async', '--time-limit=2');

        $this->assertSame(0, $code, $out . $err);
        $this->assertGreaterThanOrEqual(2.0, $seconds);
        $this->assertLessThan(6.0, $seconds);
    }

    public function testMemoryLimitStopsTheWorkerAfterTheMessageInHand(): void
    {
        $this->dispatch('WriteLine', 3, 0, "$this->work/out.txt", 'm{i}');

        [$code, $out, $err] = $this->console('messenger:consume', 'async', '--memory-limit=1M', '--time-limit=20', '-vv');

        $this->assertSame(0, $code, $out . $err);
        $this->assertStringContainsString('memory', $out . $err);
        $this->assertCount(1, file("$this->work/out.txt"));
        $this->assertSame(2, $this->conn->queueStatus($this->queue)['messages']);
    }

    public function testFailureLimitStopsTheWorkerAfterThatManyFailures(): void
    {
        $this->withRetries(0);
        $this->dispatch('Flaky', 3, 0, "$this->work/log", "$this->work/ok", '0', 'm{i}');

        [$code, $out, $err] = $this->console('messenger:consume', 'async', '--failure-limit=2', '--time-limit=20');

        $this->assertSame(0, $code, $out . $err);
        $this->assertSame(['m0', 'm1'], array_keys($this->lines('start')));
        $this->assertSame(1, $this->conn->queueStatus($this->queue)['messages']);
        $this->assertSame(2, $this->conn->queueStatus("{$this->queue}.failed")['messages']);
    }

    public function testSetupTransportsDeclaresTheExchangeQueuesArgumentsAndBindings(): void
    {
        $exchange = $this->exchanges[] = "{$this->queue}.topic";
        $this->dsnOptions += [
            'auto_setup' => 'false', 'exchange[name]' => $exchange, 'exchange[type]' => 'topic',
            "queues[{$this->queue}][binding_keys][0]" => 'order.*', "queues[{$this->queue}][arguments][x-max-priority]" => '5',
        ];

        [$code, $out, $err] = $this->console('messenger:setup-transports', 'async');

        $this->assertSame(0, $code, $out . $err);
        $producer = $this->conn->producer(['mandatory' => true]);
        $producer->publish('routed', 'order.created', $exchange);
        $producer->publish('not routed', 'invoice.created', $exchange);
        try {
            $producer->waitForConfirms(5.0);
            $this->fail('invoice.created matches no binding: returned');
        } catch (AmqpRs\PublishException $e) {
            $this->assertCount(1, $e->getFailures());
        }
        $this->assertSame('routed', $this->conn->get($this->queue, true)?->getBody());
        try {
            $this->conn->declareQueue($this->queue, ['arguments' => ['x-max-priority' => 6]]);
            $this->fail('declared with x-max-priority 5, an integer');
        } catch (ChannelException $e) {
            $this->assertSame(406, $e->getCode());
        }
    }

    /**
     * @dataProvider badDsns
     */
    #[\PHPUnit\Framework\Attributes\DataProvider('badDsns')]
    public function testABadDsnGivesAClearExceptionNamingTheProblemNeverThePassword(string $dsn, string $problem): void
    {
        [$code, $out, $err] = SymfonyApp::run(self::$app->console('messenger:consume', 'async', '--limit=1', '--time-limit=10'), $this->env(['MESSENGER_TRANSPORT_DSN' => $dsn]), 30.0);

        $this->assertNotSame(0, $code);
        $this->assertStringContainsString($problem, $out . $err);
        $this->assertStringNotContainsString('s3cret', $out . $err);
    }

    public static function badDsns(): array
    {
        return [
            'unknown option' => ['amqp-rs://guest:s3cret@127.0.0.1:5672/%2f/q?prefetchh=5', 'unknown option "prefetchh"'],
            'bad prefetch' => ['amqp-rs://guest:s3cret@127.0.0.1:5672/%2f/q?prefetch=zero', '"prefetch" must be an integer'],
            'bad port' => ['amqp-rs://guest:s3cret@127.0.0.1:99999/%2f/q', 'port 99999'],
            'not a dsn' => ['amqp-rs://guest:s3cret@127.0.0.1:5672/%2f/q/extra', 'more than /vhost/queue'],
            'tls option on plain' => ['amqp-rs://guest:s3cret@127.0.0.1:5672/%2f/q?cacert=/tmp/ca.pem', 'use amqps-rs://'],
            'wrong password' => ['amqp-rs://guest:s3cret@' . Broker::endpoint() . '/%2f/q', Broker::host()],
            'missing vhost' => ['amqp-rs://' . Broker::user() . ':' . rawurlencode(Broker::password()) . '@' . Broker::endpoint() . '/no-such-vhost/q', 'no-such-vhost'],
        ];
    }

    public function testAmqpsRsGoesThroughTlsWithTheBrokersCaAndRefusesAnotherCa(): void
    {
        [$dir, $port] = $this->tlsProxy();
        $dsn = fn (string $ca) => "amqps-rs://guest:guest@localhost:$port/%2f/" . rawurlencode($this->queue) . "?cacert=$dir/$ca.pem";

        $this->dispatchWith(['MESSENGER_TRANSPORT_DSN' => $dsn('ca')], 0, 'WriteLine', 1, 0, "$this->work/out.txt", 'over tls');
        [$code, $out, $err] = SymfonyApp::run(self::$app->console('messenger:consume', 'async', '--limit=1', '--time-limit=20'), $this->env(['MESSENGER_TRANSPORT_DSN' => $dsn('ca')]));
        $this->assertSame(0, $code, $out . $err);
        $this->assertStringStartsWith('over tls at=', (string) file_get_contents("$this->work/out.txt"));

        $refused = $this->dispatchWith(['MESSENGER_TRANSPORT_DSN' => $dsn('other-ca')], 3, 'WriteLine', 1, 0, "$this->work/out.txt", 'x');
        $this->assertMatchesRegularExpression('/certificate|TLS|tls/', $refused['message']);
        $this->assertStringContainsString("localhost:$port", $refused['message']);
    }

    public function testDispatchThrowsWhenTheBrokerReturnsTheMessage(): void
    {
        $exchange = $this->exchanges[] = "{$this->queue}.nowhere";
        $this->conn->declareExchange($exchange, 'fanout');
        $this->dsnOptions += ['auto_setup' => 'false', 'exchange[name]' => $exchange];

        $result = $this->dispatchWith([], 3, 'WriteLine', 1, 0, "$this->work/out.txt", 'x');

        $this->assertSame('Symfony\Component\Messenger\Exception\TransportException', $result['error']);
        $this->assertStringContainsString($exchange, $result['message']);
    }

    public function testDispatchThrowsWhenTheBrokerNacksTheMessage(): void
    {
        $this->conn->declareQueue($this->queue, ['arguments' => ['x-max-length' => 1, 'x-overflow' => 'reject-publish']]);
        $this->dsnOptions += ["queues[{$this->queue}][arguments][x-max-length]" => '1', "queues[{$this->queue}][arguments][x-overflow]" => 'reject-publish', 'nack_retries' => '0'];

        $result = $this->dispatchWith([], 3, 'WriteLine', 2, 0, "$this->work/out.txt", 'x');

        $this->assertSame(1, $result['dispatched'], 'the first was taken, the second nacked');
        $this->assertSame('Symfony\Component\Messenger\Exception\TransportException', $result['error']);
        $this->assertMatchesRegularExpression('/nack/i', $result['message']);
    }

    public function testADelayedMessageWaitsInADelayQueueAndAFailoverListSkipsADeadHost(): void
    {
        $u = parse_url(self::brokerUri());
        $this->dsnHosts = '127.0.0.1:1,' . ($u['host'] ?? '127.0.0.1') . ':' . ($u['port'] ?? 5672);
        $this->dispatch('WriteLine', 1, 1500, "$this->work/out.txt", 'later');
        $queuedAt = microtime(true);
        $this->assertSame(0, $this->conn->queueStatus($this->queue)['messages'], 'not ready before its delay');

        [$code, $out, $err] = $this->console('messenger:consume', 'async', '--limit=1', '--time-limit=20');

        $this->assertSame(0, $code, $out . $err);
        preg_match('/at=([\d.]+)/', (string) file_get_contents("$this->work/out.txt"), $m);
        $this->assertGreaterThanOrEqual(1.45, (float) $m[1] - $queuedAt);
        $this->assertLessThan(4.0, (float) $m[1] - $queuedAt);
    }
}
