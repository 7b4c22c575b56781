<?php

declare(strict_types=1);

require_once __DIR__ . '/Support/EventLoopFixtures.php';
require_once __DIR__ . '/Support/Select.php';

use AmqpRs\Connection;
use AmqpRs\PublishException;
use AmqpRs\RpcCall;
use AmqpRs\TimeoutException;
use AmqpRs\Tests\Support\Broker;
use AmqpRs\Tests\Support\EventLoopFixtures;
use AmqpRs\Tests\Support\Select;
use PHPUnit\Framework\TestCase;

/** Connection::rpcAsync() and RpcCall in plain stream_select() loops (issue 19). */
final class EventLoopRpcTest extends TestCase
{
    use EventLoopFixtures;

    // --- RPC calls in flight ---

    public function testManyCallsInFlightEachGetTheirOwnReplyAndACallersCorrelationIdIsKept(): void
    {
        $conn = new Connection(Broker::uri());
        $stream = $conn->readiness();
        $server = new Connection(Broker::uri());
        $serverStream = $server->readiness();
        $q = $this->exclusiveQueue($server);
        $serving = $server->consumer($q, ['auto_ack' => true, 'prefetch' => 500]);
        $serving->next(0.0);
        $mine = 'mine-' . bin2hex(random_bytes(4));
        $calls = [$conn->rpcAsync('call 0', $q, '', ['correlation_id' => $mine], 10.0)];
        for ($i = 1; $i < 200; $i++) {
            $calls[$i] = $conn->rpcAsync("call $i", $q, '', [], 10.0);
        }
        $this->assertSame($mine, $calls[0]->getCorrelationId());
        $this->assertCount(200, array_unique(array_map(fn (RpcCall $c) => $c->getCorrelationId(), $calls)));

        $requests = [];
        $replies = [];
        $deadline = microtime(true) + 15;
        while (count($replies) < 200) {
            $this->assertLessThan($deadline, microtime(true), sprintf('%d requests, %d replies', count($requests), count($replies)));
            $read = [$stream, $serverStream];
            $w = $e = null;
            stream_select($read, $w, $e, 1);
            while (($request = $serving->next(0.0)) !== null) {
                $requests[] = $request;
            }
            if (count($requests) === 200) {
                // All in flight at once, answered in the reverse order.
                foreach (array_reverse($requests) as $request) {
                    $request->reply('re: ' . $request->getBody());
                }
                $this->assertSame($mine, $requests[0]->getCorrelationId(), 'the request carried the caller\'s id');
                $requests = [];
            }
            foreach ($calls as $i => $call) {
                if (!$call->isDone() && ($reply = $call->poll()) !== null) {
                    $replies[$i] = $reply;
                }
            }
        }
        foreach ($calls as $i => $call) {
            $this->assertSame("re: call $i", $replies[$i]->getBody());
            $this->assertSame($call->getCorrelationId(), $replies[$i]->getCorrelationId());
        }
        $this->assertFalse(Select::readable($stream), 'every reply taken');
        $conn->close();
        $server->close();
    }

    public function testAnUnroutableRequestFailsFromPollWith312SoonNotAtItsTimeout(): void
    {
        $conn = new Connection(Broker::uri());
        $stream = $conn->readiness();
        $started = microtime(true);
        $call = $conn->rpcAsync('anyone?', Broker::unique('rawloop-nobody'), '', [], 20.0);
        try {
            $this->awaitReply($call, $stream, 5.0);
            $this->fail('an unroutable request got a reply');
        } catch (PublishException $e) {
            $this->assertSame(312, $e->getFailures()[0]['reply_code'], $e->getMessage());
        }
        $this->assertLessThan(5.0, microtime(true) - $started);
        $this->assertTrue($call->isDone());
        $this->assertFalse(Select::readable($stream));
        $this->assertAlreadyTaken(fn () => $call->poll(), 'poll() after the failure');
        $conn->close();
    }

    public function testATimedOutCallThrowsFromPollOnceTheStreamTurnedReadableAndItsOutcomeIsTakenOnce(): void
    {
        $conn = new Connection(Broker::uri());
        $stream = $conn->readiness();
        $q = $this->exclusiveQueue($conn);
        $started = microtime(true);
        $call = $conn->rpcAsync('nobody serves this', $q, '', [], 0.3);
        try {
            // poll() only runs when the stream is readable: a timeout seen here made it so.
            $this->awaitReply($call, $stream, 5.0);
            $this->fail('no server, yet a reply');
        } catch (TimeoutException $e) {
            $this->assertStringContainsString($call->getCorrelationId(), $e->getMessage());
        }
        $this->assertGreaterThanOrEqual(0.3, microtime(true) - $started);
        $this->assertFalse(Select::readable($stream));
        $this->assertAlreadyTaken(fn () => $call->poll(), 'poll() after the timeout');
        $this->assertAlreadyTaken(fn () => $call->wait(), 'wait() after the timeout');
        $conn->close();
    }

    public function testAReplyIsTakenOnceByPollOrWait(): void
    {
        $queue = $this->slowServer(20);
        $conn = new Connection(Broker::uri());
        $stream = $conn->readiness();
        $polled = $conn->rpcAsync('polled', $queue, '', [], 10.0);
        $this->assertSame('polled', $this->awaitReply($polled, $stream)->getBody());
        $this->assertAlreadyTaken(fn () => $polled->poll(), 'poll() twice');
        $this->assertAlreadyTaken(fn () => $polled->wait(), 'wait() after poll()');
        $waited = $conn->rpcAsync('waited', $queue, '', [], 10.0);
        $this->assertSame('waited', $waited->wait()->getBody());
        $this->assertTrue($waited->isDone());
        $this->assertAlreadyTaken(fn () => $waited->wait(), 'wait() twice');
        $this->assertAlreadyTaken(fn () => $waited->poll(), 'poll() after wait()');
        $this->assertFalse(Select::readable($stream));
        $conn->close();
    }

    public function testWaitReturnsWhenTheReplyComesNotAtTheCallsTimeout(): void
    {
        $queue = $this->slowServer(200);
        $conn = new Connection(Broker::uri());
        $stream = $conn->readiness();
        $other = $conn->rpcAsync('other', $queue, '', [], 20.0);
        $call = $conn->rpcAsync('waited', $queue, '', [], 20.0);
        $started = microtime(true);
        $this->assertSame('waited', $call->wait()->getBody());
        // A reply 200 ms away; its timeout (20 s) is not what ended the wait.
        $this->assertLessThan(10.0, microtime(true) - $started, 'wait() woke for the reply');
        $this->assertSame('other', $this->awaitReply($other, $stream)->getBody());
        $this->assertFalse(Select::readable($stream));
        $conn->close();
    }

    /**
     * A request's confirm may already be in when rpcAsync() (or rpc()) first polls it, right
     * after the publish: many calls one after the other make that happen at least once.
     */
    public function testCallsOneAfterAnotherEachGetTheirReplyHoweverSoonTheirRequestIsConfirmed(): void
    {
        $queue = $this->slowServer(0);
        $conn = new Connection(Broker::uri());
        $stream = $conn->readiness();
        for ($i = 0; $i < 300; $i++) {
            // A wait() that missed its reply would sleep to the call's timeout: fail at the first.
            $started = microtime(true);
            $this->assertSame("waited $i", $conn->rpcAsync("waited $i", $queue, '', [], 3.0)->wait()->getBody());
            $this->assertLessThan(1.5, microtime(true) - $started, "wait() of call $i woke for its reply");
            $this->assertSame("polled $i", $this->awaitReply($conn->rpcAsync("polled $i", $queue, '', [], 10.0), $stream)->getBody());
            $this->assertSame("blocking $i", $conn->rpc("blocking $i", $queue, '', [], 10.0)->getBody());
        }
        $this->assertFalse(Select::readable($stream));
        $conn->close();
    }

    public function testABlockingRpcWhileCallsAreInFlightLeavesTheirWakeUpAndReplies(): void
    {
        $queue = $this->slowServer(100);
        $conn = new Connection(Broker::uri());
        $stream = $conn->readiness();
        $calls = [];
        for ($i = 0; $i < 5; $i++) {
            $calls[$i] = $conn->rpcAsync("async $i", $queue, '', [], 10.0);
        }
        // Their replies (after 100 ms) all come while rpc() waits for its own (after 400 ms).
        $this->assertSame('sync', $conn->rpc('sync', $queue, '', ['headers' => ['delay_ms' => 400]], 10.0)->getBody());
        $this->assertTrue(Select::readable($stream), 'the replies that came during rpc() left the stream readable');
        foreach ($calls as $i => $call) {
            $this->assertSame("async $i", $call->poll()?->getBody(), "call $i's reply is there at once");
        }
        $this->assertFalse(Select::readable($stream));
        $conn->close();
    }

    public function testALateReplyToATimedOutCallIsDroppedWithoutDisturbingLaterCallsOrTheStream(): void
    {
        $queue = $this->slowServer(200);
        $conn = new Connection(Broker::uri());
        $stream = $conn->readiness();
        $late = $conn->rpcAsync('late', $queue, '', ['headers' => ['delay_ms' => 500]], 0.2);
        try {
            $this->awaitReply($late, $stream);
            $this->fail('the late call got its reply in time');
        } catch (TimeoutException) {
        }
        // The late reply (at 500 ms) arrives while this call (reply at 200 + 600 ms) waits.
        $next = $conn->rpcAsync('next', $queue, '', ['headers' => ['delay_ms' => 600]], 10.0);
        $reply = $this->awaitReply($next, $stream);
        $this->assertSame('next', $reply->getBody());
        $this->assertSame($next->getCorrelationId(), $reply->getCorrelationId());
        $this->assertFalse(Select::readable($stream));

        // With no call in flight, a late reply must not leave the stream readable for good.
        $alone = $conn->rpcAsync('alone', $queue, '', ['headers' => ['delay_ms' => 400]], 0.2);
        try {
            $this->awaitReply($alone, $stream);
            $this->fail('the lone call got its reply in time');
        } catch (TimeoutException) {
        }
        $this->awaitServed($alone->getCorrelationId());
        $this->assertStaysUnreadable($stream, 'a late reply with no call in flight');
        $this->assertSame('after', $this->awaitReply($conn->rpcAsync('after', $queue, '', [], 10.0), $stream)->getBody());
        $conn->close();
    }

    public function testADroppedCallDoesNotKeepTheStreamReadable(): void
    {
        $queue = $this->slowServer(100);
        $conn = new Connection(Broker::uri());
        $stream = $conn->readiness();
        $call = $conn->rpcAsync('dropped', $queue, '', [], 10.0);
        $id = $call->getCorrelationId();
        unset($call);
        $this->awaitServed($id);
        $this->assertStaysUnreadable($stream, 'the reply of a dropped call');
        $conn->close();
    }
}
