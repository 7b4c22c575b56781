<?php

declare(strict_types=1);

use AmqpRs\Connection;
use AmqpRs\Tests\Support\Broker;
use PHPUnit\Framework\TestCase;

final class ConnectionTest extends TestCase
{
    public function testExtensionIsLoadedUnderItsContractName(): void
    {
        $this->assertTrue(extension_loaded('amqp_rs'));
        $this->assertTrue((new ReflectionClass(Connection::class))->isFinal());
    }

    public function testDefaultUriConnectsToTheLocalBroker(): void
    {
        $conn = new Connection();
        $this->assertTrue($conn->isConnected());
        $conn->close();
        $this->assertFalse($conn->isConnected());
    }

    public function testCloseIsIdempotent(): void
    {
        $conn = new Connection(Broker::uri());
        $conn->close();
        $conn->close();
        $this->assertFalse($conn->isConnected());
    }

    public function testUseAfterCloseRaisesConnectionException(): void
    {
        $conn = new Connection(Broker::uri());
        $conn->close();
        $this->expectException(AmqpRs\ConnectionException::class);
        $this->expectExceptionMessage('closed');
        $conn->declareQueue('', ['exclusive' => true]);
    }

    public function testUriListFallsThroughToTheFirstBrokerThatAnswers(): void
    {
        $conn = new Connection(['amqp://guest:guest@127.0.0.1:1/%2f', Broker::uri()]);
        $this->assertTrue($conn->isConnected());
        $this->assertNotSame('', $conn->declareQueue('', ['exclusive' => true]));
    }

    public function testAllBrokersOfTheListFailingNamesEachOfThem(): void
    {
        try {
            new Connection(['amqp://guest:pw1@127.0.0.1:1/%2f', 'amqp://guest:pw2@127.0.0.1:2/%2f']);
            $this->fail('expected ConnectionException');
        } catch (AmqpRs\ConnectionException $e) {
            $this->assertStringContainsString('any of 2 brokers', $e->getMessage());
            $this->assertStringContainsString('127.0.0.1:1', $e->getMessage());
            $this->assertStringContainsString('127.0.0.1:2', $e->getMessage());
            $this->assertStringNotContainsString('pw1', $e->getMessage());
            $this->assertStringNotContainsString('pw2', $e->getMessage());
        }
    }

    public function testNameAndHeartbeatOptionsReachTheBroker(): void
    {
        $name = Broker::unique('conn-name');
        $conn = new Connection(Broker::uri(), ['name' => $name, 'heartbeat' => 7, 'connect_timeout' => 2.5]);
        $rows = Broker::ctl('list_connections', 'timeout', 'client_properties', '-q', '--no-table-headers');
        $line = null;
        foreach (explode("\n", $rows) as $row) {
            if (str_contains($row, $name)) {
                $line = $row;
            }
        }
        $this->assertNotNull($line, "connection named $name not listed:\n$rows");
        $this->assertMatchesRegularExpression('/^7\s/', $line);
        $conn->close();
    }

    public function testReconnectAndTlsOptionsAreAccepted(): void
    {
        // TLS settings only matter for amqps:// URIs; plain ones ignore them.
        $conn = new Connection(Broker::uri(), ['reconnect' => false, 'tls' => ['verify' => true]]);
        $this->assertTrue($conn->isConnected());
    }

    public function testHeartbeatZeroAcceptsTheBrokersInterval(): void
    {
        // lapin follows the broker's proposal when the client asks for 0; since heartbeats are
        // kept by the background runtime even while PHP works, there is no reason to turn them off.
        $name = Broker::unique('broker-heartbeat');
        $conn = new Connection(Broker::uri(), ['name' => $name, 'heartbeat' => 0]);
        $rows = Broker::ctl('list_connections', 'timeout', 'client_properties', '-q', '--no-table-headers');
        $found = false;
        foreach (explode("\n", $rows) as $row) {
            if (str_contains($row, $name)) {
                $found = true;
                $this->assertMatchesRegularExpression('/^60\s/', $row);
            }
        }
        $this->assertTrue($found);
        $conn->close();
    }

    public function testAUriThatSetsHeartbeatOrTimeoutIsRefusedRatherThanOverwritten(): void
    {
        // The options set both for every broker of the list; a URI's own value would be
        // silently replaced, so it is refused with the option to use instead.
        foreach (['heartbeat=5' => "option 'heartbeat'", 'connection_timeout=500' => "option 'connect_timeout'"] as $query => $hint) {
            try {
                new Connection(Broker::uri() . '?' . $query);
                $this->fail("?$query was accepted");
            } catch (InvalidArgumentException $e) {
                $this->assertStringContainsString($hint, $e->getMessage());
                $this->assertStringNotContainsString('guest:guest', $e->getMessage());
            }
        }
    }

    public function testVarDumpOfAConnectionShowsNoPassword(): void
    {
        $conn = new Connection(Broker::uri());
        ob_start();
        var_dump($conn);
        print_r($conn);
        var_export($conn);
        $out = ob_get_clean();
        $this->assertStringNotContainsString(Broker::user() . ':' . Broker::password(), $out);
    }

    public function testPhpInfoShowsVersionsAndRuntimeState(): void
    {
        new Connection();
        ob_start();
        (new ReflectionExtension('amqp_rs'))->info();
        $info = ob_get_clean();
        $this->assertStringContainsString('version => 0.', $info);
        $this->assertMatchesRegularExpression('/lapin version => 4\.\d+\.\d+/', $info);
        $this->assertMatchesRegularExpression('/runtime => running \(pid ' . getmypid() . ', 1 worker thread, /', $info);
    }

    public function testAProcessWithOneConnectionRunsThreeThreadsAndOneMorePerConnection(): void
    {
        // Run in a fresh PHP: this one may hold other tests' connections and lapin threads.
        $script = <<<'PHP'
            $threads = fn () => (int) preg_replace('/.*^Threads:\s+(\d+).*/ms', '$1', file_get_contents('/proc/self/status'));
            $a = new AmqpRs\Connection($argv[1]);
            $one = $threads();
            $b = new AmqpRs\Connection($argv[1]);
            echo $one, ' ', $threads();
            PHP;
        exec(sprintf('%s -n -d extension=%s -r %s %s 2>&1', PHP_BINARY, escapeshellarg(Broker::extensionPath()),
            escapeshellarg($script), escapeshellarg(Broker::uri())), $out, $code);
        $this->assertSame(0, $code, implode("\n", $out));
        // The PHP thread, the runtime's one worker (no blocking-pool thread for a lookup of an
        // IP address), and lapin's io-loop thread per connection.
        $this->assertSame('3 4', implode("\n", $out));
    }

    public function testPhpInfoShowsThePhpApiAndCommitOfTheBuild(): void
    {
        ob_start();
        (new ReflectionExtension('amqp_rs'))->info();
        $info = ob_get_clean();
        ob_start();
        phpinfo(INFO_GENERAL);
        $general = ob_get_clean();
        $this->assertMatchesRegularExpression('/^PHP Extension => (\d{8})$/m', $general);
        preg_match('/^PHP Extension => (\d{8})$/m', $general, $api);
        // The module API it was built for is the one of the PHP running it, or PHP would refuse it.
        $this->assertStringContainsString("PHP API (built for) => {$api[1]}\n", $info);
        // A release build from a checkout names its commit; from a tarball, 'unknown'.
        $this->assertMatchesRegularExpression('/^git commit => ([0-9a-f]{12}|unknown)$/m', $info);
    }

    public function testPhpRiShowsTheRuntimeNotStartedBeforeAnyConnection(): void
    {
        $cmd = sprintf('%s -d extension=%s --ri amqp_rs 2>&1', PHP_BINARY, escapeshellarg(Broker::extensionPath()));
        exec($cmd, $out, $code);
        $text = implode("\n", $out);
        $this->assertSame(0, $code, $text);
        $this->assertStringContainsString('amqp_rs support => enabled', $text);
        $this->assertStringContainsString('runtime => not started', $text);
    }
}
