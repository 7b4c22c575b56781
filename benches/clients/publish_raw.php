<?php
// The broker's ceiling for P1-P3: AMQP 0-9-1 written by hand on a plain socket, every frame
// built before the clock starts and written in large chunks, confirms read without any client
// machinery. No client can publish faster than this to the same broker; a ratio against
// php-amqp that this one cannot reach is a target the broker, not the client, rules out.
// Args: scenario count size queue.
require __DIR__ . '/common.php';
[$_, $scenario, $count, $size, $queue] = $argv;
$count = (int) $count;
$body = str_repeat('x', (int) $size);

$sock = stream_socket_client('tcp://127.0.0.1:5672', $errno, $errstr, 5);
if (!$sock) {
    fwrite(STDERR, "connect: $errstr\n");
    exit(1);
}
stream_set_write_buffer($sock, 0);
$short = fn (string $s) => chr(strlen($s)) . $s;
$frame = fn (int $type, int $channel, string $payload) => pack('CnN', $type, $channel, strlen($payload)) . $payload . "\xCE";
$method = fn (int $channel, int $class, int $id, string $args) => $frame(1, $channel, pack('nn', $class, $id) . $args);
$buffer = '';
/** Reads the next frame: [type, channel, class, method, args]. */
$read = function () use ($sock, &$buffer): array {
    while (true) {
        if (strlen($buffer) >= 7) {
            ['t' => $type, 'c' => $channel, 's' => $size] = unpack('Ct/nc/Ns', $buffer);
            if (strlen($buffer) >= 8 + $size) {
                $payload = substr($buffer, 7, $size);
                $buffer = substr($buffer, 8 + $size);
                if ($type !== 1) {
                    return [$type, $channel, 0, 0, $payload];
                }
                ['k' => $class, 'm' => $id] = unpack('nk/nm', $payload);
                return [$type, $channel, $class, $id, substr($payload, 4)];
            }
        }
        $chunk = fread($sock, 65536);
        if ($chunk === '' || $chunk === false) {
            throw new RuntimeException('connection closed by the broker');
        }
        $buffer .= $chunk;
    }
};
$expect = function (int $class, int $id) use ($read): string {
    [$type, , $k, $m, $args] = $read();
    if ($type !== 1 || $k !== $class || $m !== $id) {
        throw new RuntimeException("expected $class.$id, got $type $k.$m: " . bin2hex(substr($args, 0, 64)));
    }
    return $args;
};

fwrite($sock, "AMQP\x00\x00\x09\x01");
$expect(10, 10);
fwrite($sock, $method(0, 10, 11, pack('N', 0) . $short('PLAIN') . pack('N', 12) . "\0guest\0guest" . $short('en_US')));
['cm' => $channelMax, 'fm' => $frameMax] = unpack('ncm/Nfm', $expect(10, 30));
fwrite($sock, $method(0, 10, 31, pack('nNn', $channelMax, $frameMax, 0)));
fwrite($sock, $method(0, 10, 40, $short('/') . $short('') . "\0"));
$expect(10, 41);
fwrite($sock, $method(1, 20, 10, $short('')));
$expect(20, 11);
if ($scenario !== 'P1') {
    fwrite($sock, $method(1, 85, 10, "\0"));
    $expect(85, 11);
}

// publish + header (delivery_mode 2) + body, the same for every message.
$one = $method(1, 60, 40, pack('n', 0) . $short('') . $short($queue) . "\0")
    . $frame(2, 1, pack('nnJn', 60, 0, strlen($body), 0x1000) . "\x02")
    . $frame(3, 1, $body);
$perChunk = max(1, intdiv(256 * 1024, strlen($one)));
$chunk = str_repeat($one, $perChunk);
$confirmed = 0;
$awaitConfirms = function (int $upTo) use ($read, &$confirmed): void {
    while ($confirmed < $upTo) {
        [$type, , $k, $m, $args] = $read();
        if ($type === 1 && $k === 60 && $m === 80) {
            $confirmed = unpack('Jtag', $args)['tag'];
        } elseif ($type === 1 && $k === 60 && $m === 120) {
            throw new RuntimeException('nack');
        } elseif ($type === 1) {
            throw new RuntimeException("unexpected $k.$m");
        }
    }
};

$start = hrtime(true);
$r0 = getrusage();
if ($scenario === 'P3') {
    for ($i = 1; $i <= $count; $i++) {
        fwrite($sock, $one);
        $awaitConfirms($i);
    }
} else {
    for ($sent = 0; $sent < $count; $sent += $n) {
        $n = min($perChunk, $count - $sent);
        fwrite($sock, $n === $perChunk ? $chunk : str_repeat($one, $n));
    }
    if ($scenario === 'P2') {
        $awaitConfirms($count);
    } else {
        // Without confirms, "published" means the broker has read it all: a round trip on the
        // same connection (channel.flow is not it; a second channel's open-ok is) proves that.
        fwrite($sock, $method(2, 20, 10, $short('')));
        $expect(20, 11);
    }
}
$elapsed = (hrtime(true) - $start) / 1e9;
$r1 = getrusage();
fwrite($sock, $method(0, 10, 50, pack('n', 200) . $short('bye') . pack('nn', 0, 0)));
fclose($sock);
echo json_encode(['elapsed' => $elapsed, 'cpu_us' => cpu_us($r0, $r1)]), "\n";
