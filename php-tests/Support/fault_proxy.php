<?php
// A TCP proxy in front of a broker that can fail the way networks do, for recovery tests.
// Usage: php fault_proxy.php TARGET_PORT; prints its own port, then reads commands on stdin:
//   freeze  the flows open now go silent both ways, sockets left open: a black hole, as when a
//           firewall or NAT drops a flow's state. New connections are still forwarded.
//   down    everything is closed and the port refuses connections from now on.
// It exits when its stdin closes (the test that started it ends it that way).

declare(strict_types=1);

$target = (int) ($argv[1] ?? 5672);
$server = stream_socket_server('tcp://127.0.0.1:0', $errno, $errstr);
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
            $upstream = @stream_socket_client("tcp://127.0.0.1:$target", $errno, $errstr, 5);
            if ($client === false || $upstream === false) {
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
