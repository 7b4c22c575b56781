<?php

declare(strict_types=1);

namespace AmqpRs\Revolt;

use AmqpRs\Connection;
use AmqpRs\ConnectionException;
use AmqpRs\Consumer;
use AmqpRs\Exception;
use AmqpRs\Message;
use AmqpRs\Producer;
use AmqpRs\RpcCall;
use AmqpRs\Revolt\Internal\ConsumeOptions;
use AmqpRs\Revolt\Internal\ConsumeRun;
use AmqpRs\Revolt\Internal\Waiter;
use AmqpRs\TimeoutException;
use Revolt\EventLoop;

/**
 * The calls of an amqp_rs Connection that wait, made to suspend the current fiber instead of
 * the thread (as AMPHP v3 libraries do), on Revolt's event loop.
 *
 * The Client watches the connection's readiness() stream. Each suspended call is a waiter
 * holding a take that does not wait (Consumer::next(0.0), Producer::pollConfirms(),
 * RpcCall::poll()); whenever the stream turns readable every waiter takes, and those that got
 * something (or an exception) are resumed. A take that finds nothing lowers its own part of
 * the stream, so the stream goes quiet once every waiter has looked.
 *
 * Called outside a fiber, a call runs the loop until it is resumed (EventLoop::getSuspension()
 * on {main}), so the same code works in a script and in a fiber.
 *
 * One Client per Connection: drive every consumer, producer and RPC call of the connection that
 * joined its readiness stream through it (see README.md).
 */
final class Client
{
    /** Longest stretch consume() works through a burst before it lets the loop run (timers, I/O). */
    private const SLICE = 0.005;
    /** How often a Client with waiters checks that it still runs in the process that made it. */
    private const FORK_CHECK = 0.25;

    /** @var resource the connection's readiness stream */
    private $stream;
    private string $watcher;
    private string $forkCheck;
    private int $pid;
    private bool $closed = false;
    /** @var array<int, Waiter> */
    private array $waiters = [];
    private int $lastWaiter = 0;
    /** @var array<int, ConsumeRun> by spl_object_id of the consumer */
    private array $runs = [];

    /**
     * @throws ConnectionException when the connection is closed, lost, or inherited through fork()
     */
    public function __construct(private readonly Connection $connection)
    {
        $this->stream = $connection->readiness();
        $this->pid = getmypid();
        // Enabled only while a call waits: a disabled watcher lets the loop end, and a stream
        // left readable by an object nobody waits on (a consumer whose consume() returned with
        // deliveries still buffered) cannot make the loop spin.
        $this->watcher = EventLoop::disable(EventLoop::onReadable($this->stream, fn () => $this->takeAll()));
        $this->forkCheck = EventLoop::disable(EventLoop::unreference(
            EventLoop::repeat(self::FORK_CHECK, function (): void {
                $this->forked();
            }),
        ));
    }

    public function getConnection(): Connection
    {
        return $this->connection;
    }

    /**
     * Connection::rpc() that suspends the fiber until the reply: rpcAsync(), then the reply
     * taken by awaitReply(). Throws what rpc() would (TimeoutException after $timeout,
     * PublishException when no queue took the request, ConnectionException...).
     */
    public function rpc(string $body, string $routingKey = '', string $exchange = '', array $properties = [], float $timeout = 30.0): Message
    {
        $this->ensureUsable();
        return $this->awaitReply($this->connection->rpcAsync($body, $routingKey, $exchange, $properties, $timeout));
    }

    /**
     * The reply to a call made with Connection::rpcAsync(), suspending the fiber until it has
     * come or the call's timeout has passed (TimeoutException). A reply is given once: waiting
     * again on the same call, or in two fibers at once, throws AmqpRs\Exception in all but one.
     */
    public function awaitReply(RpcCall $call): Message
    {
        $this->ensureUsable();
        return $call->poll() ?? $this->suspend(static fn (): ?Message => $call->poll());
    }

    /**
     * Producer::waitForConfirms() that suspends the fiber: returns once every publish so far is
     * confirmed. Failures are thrown as soon as they are settled (the PublishException or
     * ChannelException Producer::pollConfirms() throws: it lists the failures settled since the
     * last call, and publishes still unconfirmed stay pending: call again to wait for them).
     *
     * @throws TimeoutException when confirms are still missing after $timeout seconds
     */
    public function waitForConfirms(Producer $producer, float $timeout = 30.0): void
    {
        $this->ensureUsable();
        if ($producer->pollConfirms() === 0) {
            return;
        }
        $this->suspend(
            static fn (): ?bool => $producer->pollConfirms() === 0 ? true : null,
            $timeout,
            static fn () => throw new TimeoutException(sprintf(
                'AmqpRs\Revolt\Client::waitForConfirms(): %d publishes still unconfirmed after %.1f s',
                $producer->pendingConfirms(),
                $timeout,
            )),
        );
    }

    /**
     * Consumer::next() that suspends the fiber: the next delivery, waiting up to $timeout
     * seconds; null when none came. Nothing is settled for you: ack(), nack() or reject() it.
     */
    public function next(Consumer $consumer, float $timeout = 0.0): ?Message
    {
        $this->ensureUsable();
        $message = $consumer->next(0.0);
        if ($message !== null || $timeout <= 0.0) {
            return $message;
        }
        $got = $this->suspend(static fn (): ?Message => $consumer->next(0.0), $timeout, static fn () => false);
        return $got instanceof Message ? $got : null;
    }

    /**
     * Consumer::consume() that suspends the fiber while no delivery is there: calls
     * $callback(Message $m) for each delivery until a limit, stop() or a stop signal; returns
     * how many were handled. During a burst it lets the loop run every few milliseconds, so
     * timers and other fibers keep their pace; the callback may itself suspend (await I/O).
     *
     * Settlement: a callback that returns without settling its message has it acked; one that
     * throws has it settled per on_error ('requeue', the default, or 'reject' to dead-letter
     * it), and its exception leaves consume() unchanged.
     *
     * Deliveries still in the prefetch buffer when it returns stay there for the next consume()
     * or next() on the consumer (Consumer::cancel() gives them back to the queue).
     *
     * @param callable(Message): mixed $callback
     * @param array{max_messages?: int, max_time?: float, idle_timeout?: float,
     *     on_error?: 'requeue'|'reject', stop_signals?: list<int>} $options stop_signals
     *     (default SIGTERM and SIGINT, through EventLoop::onSignal, which needs ext-pcntl;
     *     [] for none): they make consume() return after the message in hand is settled
     * @throws \InvalidArgumentException for an unknown option or a bad value
     */
    public function consume(Consumer $consumer, callable $callback, array $options = []): int
    {
        $this->ensureUsable();
        $limits = ConsumeOptions::parse($options);
        $key = spl_object_id($consumer);
        if (isset($this->runs[$key])) {
            throw new Exception('AmqpRs\Revolt\Client::consume() is already running on this consumer');
        }
        $run = $this->runs[$key] = new ConsumeRun();
        $signals = [];
        try {
            foreach ($limits->stopSignals as $signal) {
                // Unreferenced: a signal handler alone must not keep the loop alive.
                $signals[] = EventLoop::unreference(EventLoop::onSignal($signal, fn () => $this->stopRun($run)));
            }
            return $this->serve($consumer, \Closure::fromCallable($callback), $limits, $run);
        } finally {
            array_map(EventLoop::cancel(...), $signals);
            unset($this->runs[$key]);
        }
    }

    /**
     * Makes consume() on $consumer (or every consume() of this Client, without one) return
     * after the message in hand; from the callback, a signal handler or another fiber.
     */
    public function stop(?Consumer $consumer = null): void
    {
        $runs = $consumer === null ? $this->runs : array_filter([$this->runs[spl_object_id($consumer)] ?? null]);
        foreach ($runs as $run) {
            $this->stopRun($run);
        }
    }

    /**
     * Stops watching the connection: calls still suspended get a ConnectionException, and so
     * does every later call. The Connection itself stays open (close it yourself). Idempotent.
     */
    public function close(): void
    {
        if ($this->closed) {
            return;
        }
        $this->closed = true;
        EventLoop::cancel($this->watcher);
        EventLoop::cancel($this->forkCheck);
        $this->failAll(new ConnectionException('AmqpRs\Revolt\Client was closed while this call waited'));
        if (is_resource($this->stream)) {
            fclose($this->stream);
        }
    }

    private function serve(Consumer $consumer, \Closure $callback, ConsumeOptions $limits, ConsumeRun $run): int
    {
        $handled = 0;
        $started = $last = $slice = hrtime(true) / 1e9;
        while (!$run->stopped && ($limits->maxMessages === 0 || $handled < $limits->maxMessages)) {
            $message = $consumer->next(0.0);
            if ($message === null) {
                $wait = $limits->waitLeft($started, $last);
                if ($wait !== null && $wait <= 0.0) {
                    break;
                }
                $message = $this->suspend(static fn (): ?Message => $consumer->next(0.0), $wait, static fn () => false, $run);
                $slice = hrtime(true) / 1e9;
                if (!$message instanceof Message) {
                    continue; // a limit or a stop: checked at the top
                }
            }
            $last = hrtime(true) / 1e9;
            $handled++;
            self::handle($message, $callback, $limits->onError);
            if ($limits->maxTime !== null && hrtime(true) / 1e9 - $started >= $limits->maxTime) {
                break;
            }
            if (hrtime(true) / 1e9 - $slice >= self::SLICE) {
                self::yieldToLoop();
                $slice = hrtime(true) / 1e9;
            }
        }
        return $handled;
    }

    private static function handle(Message $message, \Closure $callback, string $onError): void
    {
        try {
            $callback($message);
        } catch (\Throwable $e) {
            if (!$message->isSettled()) {
                $onError === 'reject' ? $message->reject(false) : $message->nack(true);
            }
            throw $e;
        }
        if (!$message->isSettled()) {
            $message->ack();
        }
    }

    /** Lets the loop run one tick (timers, I/O, other fibers) before the caller goes on. */
    private static function yieldToLoop(): void
    {
        $suspension = EventLoop::getSuspension();
        EventLoop::defer(static fn () => $suspension->resume());
        $suspension->suspend();
    }

    private function stopRun(ConsumeRun $run): void
    {
        $run->stopped = true;
        $waiter = $run->waiter !== null ? ($this->waiters[$run->waiter] ?? null) : null;
        if ($waiter !== null) {
            $this->forget($run->waiter);
            $waiter->suspension->resume(false);
        }
    }

    /**
     * Suspends the fiber until $take gives something other than null (what it returns is
     * returned), throws (thrown here), or $timeout seconds pass ($onTimeout's value or throw).
     */
    private function suspend(\Closure $take, ?float $timeout = null, ?\Closure $onTimeout = null, ?ConsumeRun $run = null): mixed
    {
        $this->ensureUsable();
        $id = ++$this->lastWaiter;
        $waiter = $this->waiters[$id] = new Waiter($take, EventLoop::getSuspension());
        if ($timeout !== null) {
            $waiter->timer = EventLoop::delay(max(0.0, $timeout), function () use ($id, $onTimeout): void {
                $waiter = $this->waiters[$id] ?? null;
                if ($waiter === null) {
                    return;
                }
                $this->forget($id);
                try {
                    $waiter->suspension->resume($onTimeout === null ? null : $onTimeout());
                } catch (\Throwable $e) {
                    $waiter->suspension->throw($e);
                }
            });
        }
        if ($run !== null) {
            $run->waiter = $id;
        }
        if (count($this->waiters) === 1) {
            EventLoop::enable($this->watcher);
            EventLoop::enable($this->forkCheck);
        }
        try {
            return $waiter->suspension->suspend();
        } finally {
            if ($run !== null) {
                $run->waiter = null;
            }
        }
    }

    /** The stream is readable: every waiter takes; those that got something are resumed. */
    private function takeAll(): void
    {
        if ($this->forked()) {
            return;
        }
        foreach ($this->waiters as $id => $waiter) {
            if (!isset($this->waiters[$id])) {
                continue; // resumed by an earlier take's side effect (a stop)
            }
            try {
                $got = ($waiter->take)();
            } catch (\Throwable $e) {
                $this->forget($id);
                $waiter->suspension->throw($e);
                continue;
            }
            if ($got !== null) {
                $this->forget($id);
                $waiter->suspension->resume($got);
            }
        }
    }

    private function forget(int $id): void
    {
        $timer = $this->waiters[$id]->timer ?? null;
        unset($this->waiters[$id]);
        if ($timer !== null) {
            EventLoop::cancel($timer);
        }
        if ($this->waiters === [] && !$this->closed) {
            EventLoop::disable($this->watcher);
            EventLoop::disable($this->forkCheck);
        }
    }

    private function failAll(\Throwable $e): void
    {
        foreach (array_keys($this->waiters) as $id) {
            $waiter = $this->waiters[$id];
            $this->forget($id);
            $waiter->suspension->throw($e);
        }
    }

    /**
     * Whether this runs in a child forked after the Client was made. The child's copy of the
     * loop still holds the parent's waiters, whose stream the parent drains: they would never
     * be resumed, so they get the ConnectionException the extension gives a child.
     */
    private function forked(): bool
    {
        if (getmypid() === $this->pid) {
            return false;
        }
        if (!$this->closed) {
            $this->closed = true;
            EventLoop::cancel($this->watcher);
            EventLoop::cancel($this->forkCheck);
            $this->failAll(self::forkError());
        }
        return true;
    }

    private function ensureUsable(): void
    {
        if ($this->forked()) {
            throw self::forkError();
        }
        if ($this->closed) {
            throw new ConnectionException('AmqpRs\Revolt\Client is closed');
        }
    }

    private static function forkError(): ConnectionException
    {
        return new ConnectionException('AmqpRs\Revolt\Client: the connection was opened by the parent process before fork(); open a new Connection and Client in the child');
    }
}
