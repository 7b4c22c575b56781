<?php
// A TLS-terminating proxy in front of the plain broker, so amqps:// is tested end to end without
// reconfiguring RabbitMQ. Usage: php tls_proxy.php CERT KEY [CLIENT_CA]; prints its port, then
// serves until its stdin closes (the test that started it ends it that way).

declare(strict_types=1);

[$script, $cert, $key] = $argv;
$clientCa = $argv[3] ?? null;
$ssl = ['local_cert' => $cert, 'local_pk' => $key, 'verify_peer' => false, 'verify_peer_name' => false];
if ($clientCa !== null) {
    // Mutual TLS: a client without a certificate signed by this CA is refused.
    $ssl = ['verify_peer' => true, 'cafile' => $clientCa, 'capture_peer_cert' => true] + $ssl;
}
$ctx = stream_context_create(['ssl' => $ssl]);
$server = stream_socket_server('tls://127.0.0.1:0', $errno, $errstr, STREAM_SERVER_BIND | STREAM_SERVER_LISTEN, $ctx);
if ($server === false) {
    fwrite(STDERR, "proxy: $errstr\n");
    exit(1);
}
echo substr(strrchr(stream_socket_get_name($server, false), ':'), 1), "\n";
fflush(STDOUT);

$pairs = [];   // id => [client, upstream]
$deadline = time() + 120;
while (time() < $deadline) {
    $read = [$server, STDIN];
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
            if (feof(STDIN) || fread(STDIN, 1) === '') {
                exit(0);
            }
            continue;
        }
        if ($stream === $server) {
            $client = @stream_socket_accept($server, 5);
            if ($client === false) {
                continue; // a handshake the proxy refused (wrong or missing client certificate)
            }
            $upstream = stream_socket_client('tcp://127.0.0.1:5672', $errno, $errstr, 5);
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
            $to = $stream === $client ? $upstream : $client;
            $data = fread($stream, 65536);
            if ($data === '' || $data === false) {
                fclose($client);
                fclose($upstream);
                unset($pairs[$id]);
                break;
            }
            fwrite($to, $data);
        }
    }
}
