<?php

declare(strict_types=1);

namespace AmqpRs\Symfony\Messenger\Transport;

use Symfony\Component\Messenger\Exception\InvalidArgumentException;

/**
 * An `amqp-rs://` DSN and the transport's options, checked once, when the transport is made.
 *
 *     amqp-rs://user:pass@host:port/vhost/queue?option=value
 *     amqps-rs://user:pass@host1:5671,host2:5671/vhost/queue   (TLS; hosts tried in order)
 *
 * The vhost is URL-encoded (`%2f` is `/`, the default); the queue defaults to `messages`.
 * Options come from the query string and from `options:` in messenger.yaml (the query wins, as
 * with Symfony's AMQP transport). Every error names the option or the part of the DSN at fault
 * and shows the DSN with its password replaced by `****`.
 */
final class Dsn
{
    /** Options and their defaults (null: unset). */
    private const DEFAULTS = [
        'queues' => null,
        'exchange' => [],
        'prefetch' => 50,
        'prefetch_count' => null,
        'heartbeat' => 30,
        'connect_timeout' => 5.0,
        'confirm_timeout' => 30.0,
        'wait_time' => 1.0,
        'connection_name' => 'symfony-messenger',
        'auto_setup' => true,
        'nack_retries' => 6,
        'reconnect' => true,
        'persistent' => true,
        'cacert' => null,
        'cert' => null,
        'key' => null,
        'verify' => null,
    ];
    private const QUEUE_OPTIONS = ['binding_keys', 'binding_arguments', 'arguments'];
    private const EXCHANGE_OPTIONS = ['name', 'type', 'default_publish_routing_key', 'arguments'];
    /** Arguments the broker wants as integers; a DSN's query makes every value a string. */
    private const INTEGER_ARGUMENTS = [
        'x-delay', 'x-expires', 'x-max-length', 'x-max-length-bytes', 'x-max-priority',
        'x-message-ttl', 'x-delivery-limit', 'x-priority',
    ];

    /** @var list<string> amqp:// or amqps:// URIs for AmqpRs\Connection, one per host */
    public readonly array $uris;
    /** Options for AmqpRs\Connection (heartbeat, connect_timeout, name, reconnect, tls). */
    public readonly array $connectionOptions;
    /** @var array{name: string, type: string, default_publish_routing_key: ?string, arguments: array} */
    public readonly array $exchange;
    /** @var array<string, array{binding_keys: list<string>, binding_arguments: array, arguments: array}> */
    public readonly array $queues;
    public readonly int $prefetch;
    public readonly float $waitTime;
    public readonly float $confirmTimeout;
    public readonly bool $autoSetup;
    public readonly int $nackRetries;
    /** The DSN with its password replaced by ****, for messages. */
    public readonly string $redacted;

    public function __construct(#[\SensitiveParameter] string $dsn, array $options = [])
    {
        $re = '~^(?<scheme>amqps?-rs)://(?:(?<user>[^:@/?]*)(?::(?<pass>[^@/?]*))?@)?(?<hosts>[^/?#@]*)(?<path>/[^?#]*)?(?:\?(?<query>[^#]*))?$~';
        if (!preg_match($re, $dsn, $m)) {
            throw new InvalidArgumentException(sprintf('The amqp-rs DSN "%s" is invalid: expected amqp-rs://user:pass@host:port/vhost/queue?options (or amqps-rs:// for TLS).', self::redact($dsn)));
        }
        $this->redacted = self::redact($dsn);
        $tls = $m['scheme'] === 'amqps-rs';
        parse_str($m['query'] ?? '', $query);
        $options = array_replace_recursive(self::DEFAULTS, $options, $query);
        unset($options['transport_name']);
        if ([] !== $unknown = array_diff(array_keys($options), array_keys(self::DEFAULTS))) {
            $this->fail(sprintf('unknown option "%s" (known: %s)', implode('", "', $unknown), implode(', ', array_keys(self::DEFAULTS))));
        }

        [$vhost, $queue] = $this->path($m['path'] ?? '');
        $this->uris = $this->uris($m['hosts'], $tls, $m['user'] ?? '', $m['pass'] ?? '', $vhost);
        $this->queues = $this->queues($options['queues'] ?? [$queue => []]);
        $this->exchange = $this->exchange($options['exchange']);
        $this->prefetch = $this->integer($options, $options['prefetch_count'] !== null ? 'prefetch_count' : 'prefetch', 1, 65535);
        $this->waitTime = $this->number($options, 'wait_time', 0.0);
        $this->confirmTimeout = $this->number($options, 'confirm_timeout', 0.001);
        $this->autoSetup = $this->boolean($options, 'auto_setup');
        $this->nackRetries = $this->integer($options, 'nack_retries', 0, 20);
        $this->connectionOptions = $this->connectionOptions($options, $tls);
    }

    /** $dsn with the password (if any) replaced by ****. */
    public static function redact(#[\SensitiveParameter] string $dsn): string
    {
        return (string) preg_replace('~^([a-z0-9+.-]+://[^:@/?]*:)[^@/?]*@~i', '$1****@', $dsn);
    }

    /** Whether $dsn is one of ours. */
    public static function supports(string $dsn): bool
    {
        return str_starts_with($dsn, 'amqp-rs://') || str_starts_with($dsn, 'amqps-rs://');
    }

    /** @return array{string, string} the vhost and the queue of the DSN's path */
    private function path(string $path): array
    {
        $parts = $path === '' || $path === '/' ? [] : explode('/', substr($path, 1));
        if (count($parts) > 2) {
            $this->fail('the path has more than /vhost/queue (encode a "/" in the vhost as %2f)');
        }
        $vhost = rawurldecode($parts[0] ?? '');
        $queue = rawurldecode($parts[1] ?? '');
        return [$vhost === '' ? '/' : $vhost, $queue === '' ? 'messages' : $queue];
    }

    /** @return list<string> */
    private function uris(string $hosts, bool $tls, string $user, string $pass, string $vhost): array
    {
        $uris = [];
        $credentials = $user === '' && $pass === '' ? '' : $user . ':' . $pass . '@';
        foreach (explode(',', $hosts === '' ? 'localhost' : $hosts) as $host) {
            if (!preg_match('~^(?<host>\[[0-9a-fA-F:.]+\]|[^:\[\]]+)(?::(?<port>\d*))?$~', $host, $h)) {
                $this->fail(sprintf('host "%s" is not host or host:port', $host));
            }
            $port = ($h['port'] ?? '') === '' ? ($tls ? 5671 : 5672) : (int) $h['port'];
            if ($port < 1 || $port > 65535) {
                $this->fail(sprintf('port %d of host "%s" is not 1 to 65535', $port, $h['host']));
            }
            $uris[] = sprintf('%s://%s%s:%d/%s', $tls ? 'amqps' : 'amqp', $credentials, $h['host'], $port, rawurlencode($vhost));
        }
        return $uris;
    }

    private function queues(mixed $queues): array
    {
        if (!is_array($queues) || $queues === []) {
            $this->fail('"queues" must map queue names to their options');
        }
        $normalized = [];
        foreach ($queues as $name => $queue) {
            $queue = is_array($queue) ? $queue : [];
            if ([] !== $unknown = array_diff(array_keys($queue), self::QUEUE_OPTIONS)) {
                $this->fail(sprintf('unknown option "%s" of queue "%s" (known: %s; queues are always durable)', implode('", "', $unknown), $name, implode(', ', self::QUEUE_OPTIONS)));
            }
            $normalized[(string) $name] = [
                'binding_keys' => array_values(array_map('strval', (array) ($queue['binding_keys'] ?? []))),
                'binding_arguments' => (array) ($queue['binding_arguments'] ?? []),
                'arguments' => $this->arguments((array) ($queue['arguments'] ?? []), "queue \"$name\""),
            ];
        }
        return $normalized;
    }

    private function exchange(mixed $exchange): array
    {
        if (!is_array($exchange)) {
            $this->fail('"exchange" must be a map (name, type, default_publish_routing_key, arguments)');
        }
        if ([] !== $unknown = array_diff(array_keys($exchange), self::EXCHANGE_OPTIONS)) {
            $this->fail(sprintf('unknown exchange option "%s" (known: %s)', implode('", "', $unknown), implode(', ', self::EXCHANGE_OPTIONS)));
        }
        $name = (string) ($exchange['name'] ?? '');
        return [
            'name' => $name,
            // Symfony's AMQP transport declares fanout exchanges unless told otherwise.
            'type' => (string) ($exchange['type'] ?? 'fanout'),
            'default_publish_routing_key' => isset($exchange['default_publish_routing_key']) ? (string) $exchange['default_publish_routing_key'] : null,
            'arguments' => $this->arguments((array) ($exchange['arguments'] ?? []), "exchange \"$name\""),
        ];
    }

    private function arguments(array $arguments, string $of): array
    {
        foreach (self::INTEGER_ARGUMENTS as $key) {
            if (!array_key_exists($key, $arguments)) {
                continue;
            }
            if (!is_numeric($arguments[$key])) {
                $this->fail(sprintf('argument "%s" of %s must be an integer, got %s', $key, $of, get_debug_type($arguments[$key])));
            }
            $arguments[$key] = (int) $arguments[$key];
        }
        return $arguments;
    }

    private function connectionOptions(array $options, bool $tls): array
    {
        $connection = [
            'heartbeat' => $this->integer($options, 'heartbeat', 0, 65535),
            'connect_timeout' => $this->number($options, 'connect_timeout', 0.001),
            'name' => (string) $options['connection_name'],
            'reconnect' => $this->boolean($options, 'reconnect'),
            // Persistent by default: under php-fpm each worker dispatches over one pooled
            // connection instead of a handshake per request (see docs/persistent.md).
            'persistent' => $this->boolean($options, 'persistent'),
        ];
        $files = array_filter(['cafile' => $options['cacert'], 'certfile' => $options['cert'], 'keyfile' => $options['key']], fn ($f) => $f !== null && $f !== '');
        if (!$tls && ($files !== [] || $options['verify'] !== null)) {
            $this->fail('cacert, cert, key and verify are for TLS: use amqps-rs://');
        }
        if ($options['verify'] !== null && !$this->boolean($options, 'verify')) {
            $this->fail('verify=false is not supported: give the broker\'s CA with cacert instead');
        }
        if ($tls && $files !== []) {
            $connection['tls'] = $files;
        }
        return $connection;
    }

    private function integer(array $options, string $key, int $min, int $max): int
    {
        $value = $options[$key];
        if (filter_var($value, FILTER_VALIDATE_INT) === false || $value < $min || $value > $max) {
            $this->fail(sprintf('"%s" must be an integer from %d to %d, got "%s"', $key, $min, $max, get_debug_type($value) === 'string' ? $value : get_debug_type($value)));
        }
        return (int) $value;
    }

    private function number(array $options, string $key, float $min): float
    {
        $value = $options[$key];
        if (!is_numeric($value) || (float) $value < $min) {
            $this->fail(sprintf('"%s" must be a number of seconds >= %s, got "%s"', $key, $min, is_scalar($value) ? $value : get_debug_type($value)));
        }
        return (float) $value;
    }

    private function boolean(array $options, string $key): bool
    {
        $value = filter_var($options[$key], FILTER_VALIDATE_BOOLEAN, FILTER_NULL_ON_FAILURE);
        if ($value === null) {
            $this->fail(sprintf('"%s" must be true or false', $key));
        }
        return $value;
    }

    private function fail(string $problem): never
    {
        throw new InvalidArgumentException(sprintf('The amqp-rs DSN "%s" is invalid: %s.', $this->redacted, $problem));
    }
}
