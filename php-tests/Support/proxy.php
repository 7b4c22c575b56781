<?php
// A TCP proxy in front of the test broker, in one of two modes:
//   php proxy.php fault TARGET_PORT       plain TCP to TARGET_PORT, and it can fail the way
//                                         networks do, for recovery tests;
//   php proxy.php tls CERT KEY [CLIENT_CA] TLS-terminating, to the plain test broker (the port
//                                         AMQP_RS_TEST_URI names, default 5672), so
//                                         amqps:// is tested end to end without reconfiguring
//                                         RabbitMQ; with CLIENT_CA, mutual TLS.
// It prints its own port, then reads commands on stdin, answering "ok" to each:
//   freeze  the flows open now go silent both ways, sockets left open: a black hole, as when a
//           firewall or NAT drops a flow's state. New connections are still forwarded.
//   down    everything is closed and the port refuses connections from now on.
// It exits when its stdin closes (the test that started it ends it that way).

declare(strict_types=1);

$mode = $argv[1] ?? '';
if ($mode === 'fault') {
    $target = (int) ($argv[2] ?? 5672);
    $server = stream_socket_server('tcp://127.0.0.1:0', $errno, $errstr);
} elseif ($mode === 'tls' && isset($argv[2], $argv[3])) {
    $target = (int) (parse_url(getenv('AMQP_RS_TEST_URI') ?: 'amqp://127.0.0.1:5672', PHP_URL_PORT) ?? 5672);
    $ssl = ['local_cert' => $argv[2], 'local_pk' => $argv[3], 'verify_peer' => false, 'verify_peer_name' => false];
    if (isset($argv[4])) {
        // Mutual TLS: a client without a certificate signed by this CA is refused.
        $ssl = ['verify_peer' => true, 'cafile' => $argv[4], 'capture_peer_cert' => true] + $ssl;
    }
    $ctx = stream_context_create(['ssl' => $ssl]);
    $server = stream_socket_server('tls://127.0.0.1:0', $errno, $errstr, STREAM_SERVER_BIND | STREAM_SERVER_LISTEN, $ctx);
} else {
    fwrite(STDERR, "usage: proxy.php fault TARGET_PORT | proxy.php tls CERT KEY [CLIENT_CA]\n");
    exit(2);
}
if ($server === false) {
    fwrite(STDERR, "proxy: $errstr\n");
    exit(1);
}
echo substr(strrchr(stream_socket_get_name($server, false), ':'), 1), "\n";
fflush(STDOUT);

$pairs = [];   // id => [client, upstream]
$frozen = [];  // flows that stay open and silent
$deadline = time() + 300;
while (time() < $deadline) {
    $read = [STDIN];
    if ($server !== null) {
        $read[] = $server;
    }
    foreach ($pairs as [$a, $b]) {
        $read[] = $a;
        $read[] = $b;
    }
    $write = $except = null;
    if (@stream_select($read, $write, $except, 1) === false) {
        break;
    }
    foreach ($read as $stream) {
        if ($stream === STDIN) {
            $command = fgets(STDIN);
            if ($command === false) {
                exit(0);
            }
            if (trim($command) === 'freeze') {
                $frozen = array_merge($frozen, array_values($pairs));
                $pairs = [];
            } elseif (trim($command) === 'down') {
                foreach (array_merge($frozen, array_values($pairs)) as [$a, $b]) {
                    fclose($a);
                    fclose($b);
                }
                $frozen = $pairs = [];
                fclose($server);
                $server = null;
            }
            echo "ok\n";
            fflush(STDOUT);
            continue 2; // the select set may hold closed streams now
        }
        if ($stream === $server) {
            $client = @stream_socket_accept($server, 5);
            if ($client === false) {
                continue; // a TLS handshake the proxy refused (wrong or missing client certificate)
            }
            $upstream = @stream_socket_client("tcp://127.0.0.1:$target", $errno, $errstr, 5);
            if ($upstream === false) {
                fclose($client);
                continue;
            }
            $pairs[(int) $client] = [$client, $upstream];
            continue;
        }
        foreach ($pairs as $id => [$client, $upstream]) {
            if ($stream !== $client && $stream !== $upstream) {
                continue;
            }
            $data = fread($stream, 65536);
            if ($data === '' || $data === false) {
                fclose($client);
                fclose($upstream);
                unset($pairs[$id]);
                break;
            }
            fwrite($stream === $client ? $upstream : $client, $data);
        }
    }
}
