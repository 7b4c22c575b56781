<?php

declare(strict_types=1);

use AmqpRs\Connection;
use AmqpRs\ConnectionException;
use AmqpRs\Tests\Support\Broker;
use AmqpRs\Tests\Support\Node;
use PHPUnit\Framework\Attributes\DataProvider;
use PHPUnit\Framework\TestCase;

require_once __DIR__ . '/Support/Node.php';

/**
 * amqps:// against a RabbitMQ node of the test's own with a TLS listener that demands a client
 * certificate (verify_peer, fail_if_no_peer_cert), with a CA made with openssl; and no password
 * in any exception, warning, dump of a Connection, or `--ri amqp_rs` output.
 *
 * Exceptions are checked whole ((string) $e: message, previous exceptions, trace) with
 * zend.exception_ignore_args = 1: with trace arguments on, PHP itself would print the URI the
 * caller passed to the constructor, which says nothing about the extension.
 */
final class TlsNodeTest extends TestCase
{
    private const USER = 'amqprs-tls-user';
    private const PASSWORD = 's3cr3t-Pa55word-xyz';
    private const WRONG_PASSWORD = 'wr0ng-Pa55word-abc';
    /** In every password used here: a leak of part of one is caught too. */
    private const MARK = 'Pa55word';

    private static string $dir;
    private static ?Node $node = null;
    private static int $tlsPort;
    private ?string $ignoreArgs = null;

    public static function setUpBeforeClass(): void
    {
        self::$dir = sys_get_temp_dir() . '/amqp_rs_tlsnode_' . getmypid();
        @mkdir(self::$dir);
        $d = escapeshellarg(self::$dir);
        $ec = '-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes';
        $script = <<<SH
            set -e; cd $d
            for ca in ca other-ca; do
              openssl req -x509 $ec -days 2 -subj "/CN=amqp_rs test \$ca" -keyout \$ca.key -out \$ca.pem
            done
            openssl req $ec -subj /CN=localhost -keyout server.key -out server.csr
            printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n' > server.ext
            openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile server.ext -out server.pem
            openssl req $ec -subj /CN=amqp_rs-client -keyout client.key -out client.csr
            printf 'extendedKeyUsage=clientAuth\n' > client.ext
            openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile client.ext -out client.pem
            chown -R rabbitmq:rabbitmq .
            SH;
        exec('bash -c ' . escapeshellarg($script) . ' 2>&1', $out, $code);
        if ($code !== 0) {
            throw new RuntimeException("openssl failed:\n" . implode("\n", $out));
        }

        $port = Node::freePort(2);
        self::$tlsPort = $port + 1;
        $dir = self::$dir;
        $tlsPort = self::$tlsPort;
        self::$node = Node::start('amqprs-tls-' . getmypid(), $port, <<<CONF
            listeners.ssl.1 = 127.0.0.1:$tlsPort
            ssl_options.cacertfile = $dir/ca.pem
            ssl_options.certfile = $dir/server.pem
            ssl_options.keyfile = $dir/server.key
            ssl_options.verify = verify_peer
            ssl_options.fail_if_no_peer_cert = true
            CONF);
        self::$node->ctl('add_user', self::USER, self::PASSWORD);
        self::$node->ctl('set_permissions', '-p', '/', self::USER, '.*', '.*', '.*');
    }

    public static function tearDownAfterClass(): void
    {
        self::$node?->stop();
        self::$node = null;
        exec('rm -rf ' . escapeshellarg(self::$dir));
    }

    protected function setUp(): void
    {
        $this->ignoreArgs = (string) ini_get('zend.exception_ignore_args');
        ini_set('zend.exception_ignore_args', '1');
    }

    protected function tearDown(): void
    {
        ini_set('zend.exception_ignore_args', (string) $this->ignoreArgs);
    }

    private function uri(string $host = 'localhost', string $password = self::PASSWORD): string
    {
        return sprintf('amqps://%s:%s@%s:%d/%%2f', self::USER, $password, $host, self::$tlsPort);
    }

    /** Connection options: the test CA, the client certificate unless told, and $extra. */
    private function options(array $tls = [], array $extra = [], bool $clientCert = true): array
    {
        $tls += ['cafile' => self::$dir . '/ca.pem'];
        if ($clientCert) {
            $tls += ['certfile' => self::$dir . '/client.pem', 'keyfile' => self::$dir . '/client.key'];
        }
        return $extra + ['connect_timeout' => 3, 'reconnect' => false, 'tls' => $tls];
    }

    private function assertNoSecret(string $text, string $where): void
    {
        foreach ([self::PASSWORD, self::WRONG_PASSWORD, self::MARK, rawurlencode(self::PASSWORD), base64_encode(self::PASSWORD)] as $needle) {
            $this->assertStringNotContainsString($needle, $text, "a password in $where:\n$text");
        }
    }

    /** The broker's view of our connection named $name: user, ssl, ssl_protocol, peer_cert_subject. */
    private function brokerSide(string $name): array
    {
        $deadline = microtime(true) + 5;
        do {
            $out = self::$node->ctl('list_connections', 'user', 'ssl', 'ssl_protocol', 'peer_cert_subject', 'pid', 'client_properties', '-q', '--no-table-headers');
            foreach (explode("\n", $out) as $line) {
                if (str_contains($line, $name)) {
                    return array_slice(explode("\t", $line), 0, 5);
                }
            }
            usleep(100_000);
        } while (microtime(true) < $deadline);
        $this->fail("the node lists no connection named $name:\n$out");
    }

    private function connectFails(string $uri, array $options): ConnectionException
    {
        try {
            new Connection($uri, $options);
        } catch (ConnectionException $e) {
            $this->assertNoSecret((string) $e, 'the exception');
            return $e;
        }
        $this->fail('expected a ConnectionException');
    }

    public function testVerifiedRoundTripOverAmqps(): void
    {
        $name = 'amqp_rs-tls-roundtrip-' . bin2hex(random_bytes(4));
        $conn = new Connection($this->uri(), $this->options([], ['name' => $name]));
        $queue = $conn->declareQueue('', ['exclusive' => true]);
        $producer = $conn->producer();
        $producer->publish("over TLS \0 binary", $queue);
        $producer->waitForConfirms(5);
        $message = $conn->get($queue);
        $this->assertNotNull($message);
        $this->assertSame("over TLS \0 binary", $message->getBody());
        $message->ack();

        [$user, $ssl, $protocol] = $this->brokerSide($name);
        $this->assertSame([self::USER, 'true'], [$user, $ssl], 'the broker sees a TLS connection');
        $this->assertMatchesRegularExpression('/^tlsv1\.[23]$/', $protocol);
        $conn->close();
    }

    public function testUnknownCaFailsNamingHostPortAndCertificate(): void
    {
        $e = $this->connectFails($this->uri(), $this->options(['cafile' => self::$dir . '/other-ca.pem']));
        $this->assertStringContainsString('localhost:' . self::$tlsPort, $e->getMessage());
        $this->assertMatchesRegularExpression('/certificate.*UnknownIssuer/i', $e->getMessage());
    }

    public function testHostNameNotInTheCertificateFails(): void
    {
        // The server certificate names localhost only.
        $e = $this->connectFails($this->uri('127.0.0.1'), $this->options());
        $this->assertStringContainsString('127.0.0.1:' . self::$tlsPort, $e->getMessage());
        $this->assertMatchesRegularExpression('/certificate not valid for name "127\.0\.0\.1"|NotValidForName/i', $e->getMessage());
    }

    public function testMutualTlsWithoutAClientCertificateIsRefused(): void
    {
        $e = $this->connectFails($this->uri(), $this->options([], [], false));
        $this->assertStringContainsString('localhost:' . self::$tlsPort, $e->getMessage());
        // Under TLS 1.3 the client's handshake is done before the server checks for a client
        // certificate: the server's refusal arrives as its certificate_required alert, or, when
        // it closes first, as a reset (seen in CI runs, under load). Either way it refused.
        $this->assertMatchesRegularExpression('/CertificateRequired|certificate|Connection reset by peer/i', $e->getMessage());
    }

    public function testMutualTlsWithAClientCertificateWorks(): void
    {
        $name = 'amqp_rs-tls-mutual-' . bin2hex(random_bytes(4));
        $conn = new Connection($this->uri(), $this->options([], ['name' => $name]));
        $this->assertTrue($conn->isConnected());
        [, $ssl, , $peerSubject] = $this->brokerSide($name);
        $this->assertSame('true', $ssl);
        $this->assertSame('CN=amqp_rs-client', $peerSubject, 'the broker saw our client certificate');
        $conn->close();
    }

    public function testWrongPasswordIsRefusedWithoutEchoingIt(): void
    {
        $e = $this->connectFails($this->uri('localhost', self::WRONG_PASSWORD), $this->options());
        $this->assertStringContainsString(self::USER . '@localhost:' . self::$tlsPort, $e->getMessage());
        $this->assertMatchesRegularExpression('/access refused|ACCESS_REFUSED/', $e->getMessage());
    }

    public static function badInput(): array
    {
        $p = self::PASSWORD;
        $u = self::USER;
        return [
            'unknown option key' => ["amqps://$u:$p@localhost:5671/%2f", ['no_such_option' => 1]],
            'tls verify false' => ["amqps://$u:$p@localhost:5671/%2f", ['tls' => ['verify' => false]]],
            'missing cafile' => ["amqps://$u:$p@localhost:5671/%2f", ['connect_timeout' => 2, 'tls' => ['cafile' => '/nonexistent/ca.pem']]],
            'closed port' => ["amqps://$u:$p@127.0.0.1:1/%2f", ['connect_timeout' => 2, 'reconnect' => false]],
            'failover list, all down' => [["amqp://$u:$p@127.0.0.1:1/%2f", "amqps://$u:$p@127.0.0.1:2/%2f"], ['connect_timeout' => 2, 'reconnect' => false]],
            'port not a number' => ["amqps://$u:$p@localhost:notaport/%2f", []],
            'other scheme' => ["https://$u:$p@localhost/", []],
            'no host' => ["amqps://$u:$p@/%2f", []],
            'password not UTF-8' => ["amqps://$u:$p%FF@localhost/%2f", []],
            'bad query parameter' => ["amqps://$u:$p@localhost/%2f?heartbeat=soon", []],
            // Characters a password may well contain (base64 has '/'), left unencoded by
            // mistake: the URI does not parse, and the error must still mask the password.
            'unencoded / in the password' => ["amqps://$u:s3cr3t/Pa55word@localhost:5671/%2f", []],
            'unencoded # in the password' => ["amqps://$u:s3cr3t#Pa55word@localhost:5671/%2f", []],
            'unencoded ? in the password' => ["amqps://$u:s3cr3t?Pa55word@localhost:5671/%2f", []],
        ];
    }

    /** @dataProvider badInput */
    #[DataProvider('badInput')]
    public function testNoPasswordInTheErrorsAboutBadInputOrUnreachableBrokers(string|array $uri, array $options): void
    {
        try {
            new Connection($uri, $options);
            $this->fail('expected an exception');
        } catch (AmqpRs\Exception|InvalidArgumentException $e) {
            $this->assertNoSecret((string) $e, get_class($e));
        }
    }

    public function testNoPasswordInWarningsOrDumpsOfAConnection(): void
    {
        $warnings = [];
        set_error_handler(function (int $no, string $str, string $file, int $line) use (&$warnings): bool {
            $warnings[] = "[$no] $str at $file:$line";
            return true;
        });
        try {
            $name = 'amqp_rs-tls-secrets-' . bin2hex(random_bytes(4));
            $conn = new Connection($this->uri(), $this->options([], ['name' => $name]));
            $producer = $conn->producer();
            $queue = $conn->declareQueue('', ['exclusive' => true]);
            $producer->publish('x', $queue);

            ob_start();
            var_dump($conn, $producer);
            print_r($conn);
            var_export($conn);
            debug_zval_dump($conn);
            var_dump((array) $conn, get_object_vars($conn), json_encode($conn));
            $dumps = (string) ob_get_clean();
            $this->assertStringContainsString('AmqpRs\Connection', $dumps);
            $this->assertNoSecret($dumps, 'a dump of a Connection');

            // The broker ends the connection: what the extension says about it, now and later.
            [, , , , $pid] = $this->brokerSide($name);
            self::$node->ctl('close_connection', $pid, 'closed by TlsNodeTest');
            try {
                for ($i = 0; $i < 50; $i++) {
                    $conn->declareQueue('', ['exclusive' => true]);
                    usleep(100_000);
                }
                $this->fail('the connection the broker closed still works');
            } catch (AmqpRs\Exception $e) {
                $this->assertNoSecret((string) $e, 'the exception after the broker closed the connection');
            }
            try {
                $conn->close();
            } catch (AmqpRs\Exception $e) {
                $this->assertNoSecret((string) $e, 'the exception of close()');
            }
            unset($conn, $producer);

            // A publish to a missing exchange, and the connection left unclosed: the
            // producer's destructor warns, naming the connection.
            $conn = new Connection($this->uri(), $this->options());
            $conn->producer()->publish('y', 'rk', 'amq_rs.no-such-exchange');
            unset($conn);
        } finally {
            restore_error_handler();
        }
        $this->assertStringContainsString(self::USER . '@localhost:' . self::$tlsPort, implode("\n", $warnings), 'the destructor warned');
        $this->assertNoSecret(implode("\n", $warnings), 'a warning');
    }

    public function testNoPasswordInTheModuleInfoOfAProcessWithAConnection(): void
    {
        $script = self::$dir . '/child.php';
        file_put_contents($script, <<<'PHP'
            <?php
            $in = json_decode(stream_get_contents(STDIN), true);
            $conn = new AmqpRs\Connection($in['uri'], $in['options']);
            $conn->declareQueue('', ['exclusive' => true]);
            echo "connected\n";
            (new ReflectionExtension('amqp_rs'))->info(); // what php --ri amqp_rs prints
            phpinfo(INFO_MODULES);
            var_dump($conn);
            try {
                new AmqpRs\Connection($in['wrong'], $in['options']);
            } catch (AmqpRs\Exception $e) {
                echo $e, "\n";
            }
            $conn->producer()->publish('z', 'rk', 'amq_rs.no-such-exchange'); // its destructor warns
            echo "done\n";
            // exit without close(): the destructors run and may warn
            PHP);
        $args = [PHP_BINARY, '-n', '-d', 'display_errors=stderr', '-d', 'error_reporting=-1', '-d', 'zend.exception_ignore_args=1'];
        $args[] = '-d';
        $args[] = 'extension=' . Broker::extensionPath();
        $args[] = $script;
        $proc = proc_open($args, [0 => ['pipe', 'r'], 1 => ['pipe', 'w'], 2 => ['redirect', 1]], $pipes);
        $this->assertIsResource($proc);
        fwrite($pipes[0], json_encode([
            'uri' => $this->uri(),
            'wrong' => $this->uri('localhost', self::WRONG_PASSWORD),
            'options' => $this->options(),
        ], JSON_THROW_ON_ERROR));
        fclose($pipes[0]);
        $out = (string) stream_get_contents($pipes[1]);
        fclose($pipes[1]);
        $code = proc_close($proc);

        $this->assertSame(0, $code, $out);
        $this->assertStringContainsString("connected\n", $out);
        $this->assertMatchesRegularExpression('/^runtime => running \(pid \d+/m', $out, 'the info was taken with a live connection');
        $this->assertStringContainsString('access refused', $out, 'the wrong password was tried');
        $this->assertStringContainsString("done\n", $out);
        $this->assertMatchesRegularExpression('/Warning: .*no-such-exchange.* on amqps:\/\/' . self::USER . '@localhost/', $out, 'the destructor warned');
        $this->assertNoSecret($out, 'the output of a child with a connection');
    }
}
