<?php
// AMQP 0-9-1 written by hand on a plain socket, for the "raw" bench clients: the broker's
// ceiling, what any client could reach on this broker with no overhead of its own.

final class RawAmqp
{
    public $sock;
    private string $buffer = '';

    public function __construct()
    {
        $this->sock = stream_socket_client('tcp://127.0.0.1:5672', $errno, $errstr, 5);
        if (!$this->sock) {
            throw new RuntimeException("connect: $errstr");
        }
        stream_set_write_buffer($this->sock, 0);
        fwrite($this->sock, "AMQP\x00\x00\x09\x01");
        $this->expect(10, 10);
        $this->method(0, 10, 11, pack('N', 0) . self::short('PLAIN') . pack('N', 12) . "\0guest\0guest" . self::short('en_US'));
        ['cm' => $channelMax, 'fm' => $frameMax] = unpack('ncm/Nfm', $this->expect(10, 30));
        $this->method(0, 10, 31, pack('nNn', $channelMax, $frameMax, 0));
        $this->method(0, 10, 40, self::short('/') . self::short('') . "\0");
        $this->expect(10, 41);
        $this->method(1, 20, 10, self::short(''));
        $this->expect(20, 11);
    }

    public static function short(string $s): string
    {
        return chr(strlen($s)) . $s;
    }

    public static function frame(int $type, int $channel, string $payload): string
    {
        return pack('CnN', $type, $channel, strlen($payload)) . $payload . "\xCE";
    }

    public static function methodFrame(int $channel, int $class, int $id, string $args): string
    {
        return self::frame(1, $channel, pack('nn', $class, $id) . $args);
    }

    public function method(int $channel, int $class, int $id, string $args): void
    {
        fwrite($this->sock, self::methodFrame($channel, $class, $id, $args));
    }

    /** The next frame: [type, channel, class, method, args] (class and method 0 if not a method). */
    public function read(): array
    {
        while (true) {
            if (strlen($this->buffer) >= 7) {
                ['t' => $type, 'c' => $channel, 's' => $size] = unpack('Ct/nc/Ns', $this->buffer);
                if (strlen($this->buffer) >= 8 + $size) {
                    $payload = substr($this->buffer, 7, $size);
                    $this->buffer = substr($this->buffer, 8 + $size);
                    if ($type !== 1) {
                        return [$type, $channel, 0, 0, $payload];
                    }
                    ['k' => $class, 'm' => $id] = unpack('nk/nm', $payload);
                    return [$type, $channel, $class, $id, substr($payload, 4)];
                }
            }
            $chunk = fread($this->sock, 65536);
            if ($chunk === '' || $chunk === false) {
                throw new RuntimeException('connection closed by the broker');
            }
            $this->buffer .= $chunk;
        }
    }

    public function expect(int $class, int $id): string
    {
        [$type, , $k, $m, $args] = $this->read();
        if ($type !== 1 || $k !== $class || $m !== $id) {
            throw new RuntimeException("expected $class.$id, got $type $k.$m: " . bin2hex(substr($args, 0, 64)));
        }
        return $args;
    }

    public function close(): void
    {
        $this->method(0, 10, 50, pack('n', 200) . self::short('bye') . pack('nn', 0, 0));
        fclose($this->sock);
    }
}
