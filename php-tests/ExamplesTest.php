<?php

declare(strict_types=1);

use AmqpRs\Connection;
use AmqpRs\Tests\Support\Broker;
use AmqpRs\Tests\Support\Children;
use PHPUnit\Framework\TestCase;

/**
 * The pattern examples run as real processes, as a user would run them: examples/rpc
 * (server in the background, client in the foreground) and examples/dispatch (nodes in the
 * background, dispatcher in the foreground). Each gets a queue of its own.
 */
final class ExamplesTest extends TestCase
{
    private const EXAMPLES = __DIR__ . '/../examples';

    private string $queue;
    /** @var list<array{proc: resource, pipes: array<int, resource>}> */
    private array $background = [];

    protected function setUp(): void
    {
        $this->queue = Broker::unique('examples');
    }

    protected function tearDown(): void
    {
        foreach ($this->background as $i => $p) {
            $this->stop($i);
        }
        $conn = new Connection(Broker::uri());
        $conn->deleteQueue($this->queue);
        $conn->close();
    }

    /** php with the amqp_rs this test runs with, and the script. */
    private static function php(string $script, string ...$args): array
    {
        $so = Broker::extensionPath();
        return [PHP_BINARY, '-d', "extension=$so", self::EXAMPLES . "/$script", ...$args];
    }

    /** Starts a script in the background and waits for its first line ("... waiting for ..."). */
    private function start(string $script, string ...$args): int
    {
        $proc = proc_open(self::php($script, ...$args), [1 => ['pipe', 'w'], 2 => ['pipe', 'w']], $pipes);
        $this->background[] = ['proc' => $proc, 'pipes' => $pipes];
        $read = [$pipes[1]];
        $w = $e = null;
        $this->assertSame(1, stream_select($read, $w, $e, 10), "$script did not start");
        $this->assertStringContainsString('waiting for', (string) fgets($pipes[1]));
        return array_key_last($this->background);
    }

    /** SIGTERM to a background script (it finishes what it has in hand); returns its output. */
    private function stop(int $i): string
    {
        ['proc' => $proc, 'pipes' => $pipes] = $this->background[$i];
        unset($this->background[$i]);
        return Children::end($proc, $pipes, SIGTERM, 5.0);
    }

    /** Runs a script in the foreground: [exit code, stdout, stderr, seconds]. */
    private static function runScript(float $timeout, string $script, string ...$args): array
    {
        $started = microtime(true);
        $proc = proc_open(self::php($script, ...$args), [1 => ['pipe', 'w'], 2 => ['pipe', 'w']], $pipes);
        $out = ['', '', ''];
        $open = [1 => $pipes[1], 2 => $pipes[2]];
        while ($open && microtime(true) - $started < $timeout) {
            $read = array_values($open);
            $w = $e = null;
            if (stream_select($read, $w, $e, 0, 200_000)) {
                foreach ($open as $n => $pipe) {
                    if (in_array($pipe, $read, true)) {
                        $chunk = (string) fread($pipe, 65536);
                        $out[$n] .= $chunk;
                        if ($chunk === '' && feof($pipe)) {
                            unset($open[$n]);
                        }
                    }
                }
            }
        }
        if ($open) {
            proc_terminate($proc, SIGKILL);
        }
        $code = proc_close($proc);
        return [$open ? -1 : $code, $out[1], $out[2], microtime(true) - $started];
    }

    public function testRpcClientPrintsEveryAnswerOfTheServer(): void
    {
        $server = $this->start('rpc/server.php', $this->queue);
        [$code, $out, $err] = self::runScript(30, 'rpc/client.php', $this->queue);
        $this->assertSame(0, $code, $out . $err);
        $this->assertMatchesRegularExpression('/^client: add\(2, 3, 4\) = 9 /m', $out);
        $this->assertMatchesRegularExpression('/^client: mul\(1\.5, 4\) = 6 /m', $out);
        $this->assertMatchesRegularExpression('/^client: div\(1, 0\) = error: division by zero /m', $out);
        $this->assertMatchesRegularExpression('/^client: pow\(2, 8\) = error: unknown op "pow" /m', $out);
        // Bad requests are answered with an error too, and the server goes on.
        $conn = new Connection(Broker::uri());
        $notJson = $conn->rpc('add 2 3', $this->queue, '', [], 5.0)->json();
        $this->assertFalse($notJson['ok']);
        $this->assertStringContainsString('not valid JSON', $notJson['error']);
        $this->assertSame(['ok' => false, 'error' => 'expected {"op": ..., "args": [...]}'],
            $conn->rpc('[1, 2]', $this->queue, '', [], 5.0)->json());
        $this->assertSame(['ok' => true, 'result' => 0.5], $conn->rpc('{"op":"div","args":[1,2]}', $this->queue, '', [], 5.0)->json());
        $conn->close();
        $log = $this->stop($server);
        $this->assertStringContainsString('server: {"op":"add","args":[2,3,4]} -> {"ok":true,"result":9}', $log);
        $this->assertStringContainsString('server: handled 7 requests', $log);
    }

    public function testTheStreamSelectLoopDoesEverythingWithoutBlockingItsTicker(): void
    {
        [$code, $out, $err] = self::runScript(30, 'event-loop/select.php', $this->queue);
        $this->assertSame(0, $code, $out . $err);
        $this->assertSame('', $err);
        $this->assertStringContainsString('select: 2000 jobs published, confirmed and consumed', $out);
        $this->assertStringContainsString('select: 20 replies (CALL 0 ... CALL 19), each served 200 ms after it came', $out);
        // 20 calls served 200 ms after each came, all at once: about one delay, not twenty.
        $this->assertMatchesRegularExpression('/done in (\d+) ms; the 20 ms ticker fired (\d+) times/', $out);
        preg_match('/done in (\d+) ms; the 20 ms ticker fired (\d+) times/', $out, $m);
        $this->assertLessThan(2000, (int) $m[1], $out);
        $this->assertGreaterThanOrEqual(5, (int) $m[2], 'the ticker kept firing: ' . $out);
    }

    public function testRpcClientWithoutAServerSaysSoAndExits1(): void
    {
        [$code, $out, $err, $took] = self::runScript(30, 'rpc/client.php', $this->queue);
        $this->assertSame(1, $code, $out . $err);
        $this->assertStringContainsString("no server on '{$this->queue}'", $err);
        $this->assertLessThan(5.0, $took, 'an unroutable request fails at once, not after the timeout');
    }

    public function testDispatcherCollectsEveryResultFromTwoNodes(): void
    {
        $nodes = [
            $this->start('dispatch/node.php', '--name=node-a', "--queue={$this->queue}", '--idle=20'),
            $this->start('dispatch/node.php', '--name=node-b', "--queue={$this->queue}", '--idle=20'),
        ];
        [$code, $out, $err] = self::runScript(60, 'dispatch/dispatcher.php', '--tasks=12', '--timeout=30', "--queue={$this->queue}");
        $this->assertSame(0, $code, $out . $err);
        $this->assertStringContainsString('dispatcher: sent 12 tasks', $out);
        $this->assertStringContainsString('[12/12]', $out);
        $this->assertMatchesRegularExpression('/^dispatcher: 12 of 12 results collected \(10 done, 2 failed\)/m', $out);
        // The table: one row per task, with its type, status, node and result.
        // Columns are two spaces or more apart.
        preg_match_all('/^\w+-\d{3}  .*$/m', $out, $lines);
        $this->assertCount(12, $lines[0], $out);
        $byNumber = [];
        foreach ($lines[0] as $line) {
            [$id, $type, $status, $node, , $result] = preg_split('/ {2,}/', $line);
            $this->assertContains($node, ['node-a', 'node-b']);
            $byNumber[(int) substr($id, -3)] = [$type, $status, $result];
        }
        $this->assertSame(['divide', 'failed', 'division by zero'], $byNumber[3]);
        $this->assertSame(['divide', 'done', '3.5'], $byNumber[7]);
        $this->assertSame(['divide', 'failed', 'division by zero'], $byNumber[11]);
        $this->assertSame(['sum', 'done', '15'], $byNumber[4]);
        $this->assertSame(['resize', 'done', '{"width":100,"height":50}'], $byNumber[2]);
        $this->assertSame(['hash', 'done', json_encode(hash('sha256', 'document 1'))], $byNumber[1]);
        // Both nodes worked (prefetch 1: a free node takes the next task), 12 tasks in all.
        $handled = [];
        foreach ($nodes as $i) {
            $log = $this->stop($i);
            $this->assertMatchesRegularExpression('/handled (\d+) tasks/', $log);
            preg_match('/handled (\d+) tasks/', $log, $m);
            $handled[] = (int) $m[1];
        }
        $this->assertSame(12, array_sum($handled));
        $this->assertGreaterThan(0, min($handled), 'one node got no task');
    }

    public function testDispatcherWithoutNodesListsTheMissingTasksAndExits1(): void
    {
        [$code, $out, $err, $took] = self::runScript(30, 'dispatch/dispatcher.php', '--tasks=3', '--timeout=1', "--queue={$this->queue}");
        $this->assertSame(1, $code, $out . $err);
        $this->assertSame(3, preg_match_all('/^\w+-\d{3}\s+\w+\s+missing\s+-\s+.*no result in time$/m', $out));
        $this->assertStringContainsString('dispatcher: 0 of 3 results collected (none)', $out);
        $this->assertLessThan(10.0, $took);
    }

    public function testNodeStopsByItselfWhenIdle(): void
    {
        [$code, $out, $err, $took] = self::runScript(30, 'dispatch/node.php', '--name=idle', "--queue={$this->queue}", '--idle=1');
        $this->assertSame(0, $code, $out . $err);
        $this->assertStringContainsString('idle: handled 0 tasks, stopping', $out);
        $this->assertLessThan(10.0, $took);
    }

    public function testTheMakeDemoRunsTheTaskQueueAndTheDispatchCentreEndToEnd(): void
    {
        [$code, $out, $err] = self::runScript(120, 'demo.php');
        $this->assertSame(0, $code, $out . $err);
        $this->assertStringContainsString('all 12 tasks confirmed by the broker', $out);
        $this->assertSame(8, substr_count($out, 'done task '), 'the email and image tasks were done');
        $this->assertStringContainsString('4 report tasks were dead-lettered', $out);
        $this->assertStringContainsString('10 of 10 results collected', $out);
        $this->assertMatchesRegularExpression('/node-1: task \S+ \(\w+\) (done|failed)/', $out);
        $this->assertMatchesRegularExpression('/node-2: task \S+ \(\w+\) (done|failed)/', $out);
        $this->assertStringEndsWith("demo: done\n", $out);
    }
}
