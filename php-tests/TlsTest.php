<?php

declare(strict_types=1);

use AmqpRs\Connection;
use AmqpRs\ConnectionException;
use PHPUnit\Framework\TestCase;

/** amqps:// end to end, through a TLS proxy of the test's own in front of the broker. */
final class TlsTest extends TestCase
{
    private static string $dir;
    /** @var list<array{resource, resource}> */
    private array $proxies = [];

    public static function setUpBeforeClass(): void
    {
        self::$dir = sys_get_temp_dir() . '/amqp_rs_tls_' . getmypid();
        @mkdir(self::$dir);
        $d = escapeshellarg(self::$dir);
        $script = <<<SH
            set -e; cd $d
            for ca in ca other-ca; do
              openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=amqp_rs test \$ca" -keyout \$ca.key -out \$ca.pem
            done
            printf 'subjectAltName=DNS:localhost\n' > server.ext
            openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server.key -out server.csr
            openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile server.ext -out server.pem
            openssl req -newkey rsa:2048 -nodes -subj /CN=amqp_rs-client -keyout client.key -out client.csr
            printf 'extendedKeyUsage=clientAuth\n' > client.ext
            openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile client.ext -out client.pem
            SH;
        exec('bash -c ' . escapeshellarg($script) . ' 2>&1', $out, $code);
        if ($code !== 0) {
            throw new RuntimeException("openssl failed:\n" . implode("\n", $out));
        }
    }

    public static function tearDownAfterClass(): void
    {
        exec('rm -rf ' . escapeshellarg(self::$dir));
    }

    protected function tearDown(): void
    {
        foreach ($this->proxies as [$proc, $stdin]) {
            fclose($stdin);
            proc_close($proc);
        }
    }

    private function proxy(bool $mutual = false): int
    {
        $args = [PHP_BINARY, __DIR__ . '/Support/proxy.php', 'tls', self::$dir . '/server.pem', self::$dir . '/server.key'];
        if ($mutual) {
            $args[] = self::$dir . '/ca.pem';
        }
        $proc = proc_open($args, [0 => ['pipe', 'r'], 1 => ['pipe', 'w'], 2 => STDERR], $pipes);
        $this->assertIsResource($proc);
        $port = (int) trim((string) fgets($pipes[1]));
        $this->assertGreaterThan(0, $port, 'proxy did not start');
        $this->proxies[] = [$proc, $pipes[0]];
        return $port;
    }

    private function tls(array $extra = []): array
    {
        return ['connect_timeout' => 3, 'tls' => $extra + ['cafile' => self::$dir . '/ca.pem']];
    }

    public function testVerifiedConnectionWithTheBrokersCaWorks(): void
    {
        $port = $this->proxy();
        $conn = new Connection("amqps://guest:guest@localhost:$port/%2f", $this->tls());
        $this->assertTrue($conn->isConnected());
        $this->assertStringStartsWith('amq_rs.gen-', $conn->declareQueue('', ['exclusive' => true]));
        $conn->close();
    }

    public function testUnknownCaFailsWithAConnectionException(): void
    {
        $port = $this->proxy();
        try {
            new Connection("amqps://guest:guest@localhost:$port/%2f", $this->tls(['cafile' => self::$dir . '/other-ca.pem']));
            $this->fail('expected ConnectionException');
        } catch (ConnectionException $e) {
            $this->assertStringContainsString("cannot connect to amqps://guest@localhost:$port/", $e->getMessage());
            $this->assertMatchesRegularExpression('/certificate|UnknownIssuer/i', $e->getMessage());
        }
    }

    public function testHostNameNotInTheCertificateFails(): void
    {
        $port = $this->proxy();
        try {
            // The certificate names localhost only.
            new Connection("amqps://guest:guest@127.0.0.1:$port/%2f", $this->tls());
            $this->fail('expected ConnectionException');
        } catch (ConnectionException $e) {
            $this->assertMatchesRegularExpression('/certificate|NotValidForName/i', $e->getMessage());
        }
    }

    public function testMutualTlsWithAClientCertificateWorks(): void
    {
        $port = $this->proxy(true);
        $conn = new Connection("amqps://guest:guest@localhost:$port/%2f", $this->tls([
            'certfile' => self::$dir . '/client.pem',
            'keyfile' => self::$dir . '/client.key',
        ]));
        $this->assertTrue($conn->isConnected());
        $conn->close();
    }

    public function testMutualTlsWithoutAClientCertificateIsRefused(): void
    {
        $port = $this->proxy(true);
        $this->expectException(ConnectionException::class);
        new Connection("amqps://guest:guest@localhost:$port/%2f", $this->tls());
    }

    public function testVerifyFalseIsRefusedWithAClearMessage(): void
    {
        $this->expectException(InvalidArgumentException::class);
        $this->expectExceptionMessage("'verify' => false is not supported");
        new Connection('amqps://guest:guest@localhost:5671/%2f', $this->tls(['verify' => false]));
    }
}
