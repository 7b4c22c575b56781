//! The readiness signal, alone and against the real broker: what raises the fd and what
//! lowers it, for a consumer, a producer and RPC calls.

use super::*;
use crate::core::connection::Connection;
use crate::core::consumer::{ConsumerOptions, Incoming};
use crate::core::error::ErrorKind;
use crate::core::producer::{Outgoing, ProducerOptions};
use crate::core::testing::{connect, eventually};
use crate::core::topology::QueueSpec;
use lapin::BasicProperties;
use std::time::Duration;

fn readable(fd: RawFd) -> bool {
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd on the stack, zero timeout.
    unsafe { libc::poll(&mut poll, 1, 0) == 1 }
}

#[test]
fn the_fd_is_readable_while_a_source_is_raised() {
    let readiness = Readiness::new().expect("eventfd");
    let fd = readiness.dup_fd().expect("dup");
    let (a, b) = (readiness.source(), readiness.source());
    assert!(!readable(fd));
    a.waker().wake_by_ref();
    b.waker().wake_by_ref();
    assert!(readable(fd));
    // A take that finds nothing lowers its own source only.
    assert!(a
        .take(AfterReady::More, |_| Poll::<()>::Pending)
        .is_pending());
    assert!(readable(fd), "b is still raised");
    // A take that found something and may find more stays raised.
    assert!(b.take(AfterReady::More, |_| Poll::Ready(())).is_ready());
    assert!(readable(fd));
    assert!(b.take(AfterReady::Done, |_| Poll::Ready(())).is_ready());
    assert!(!readable(fd), "every source lowered: drained");
    // SAFETY: the dup made above, closed once.
    unsafe { libc::close(fd) };
}

#[test]
fn a_wake_during_a_take_is_not_lost_and_a_dropped_source_lets_go() {
    let readiness = Readiness::new().expect("eventfd");
    let source = readiness.source();
    let polled = source.take(AfterReady::More, |cx| {
        // lapin's io-loop wakes it between the poll and the take's end.
        cx.waker().wake_by_ref();
        Poll::<()>::Pending
    });
    assert!(polled.is_pending());
    assert!(readiness.is_readable(), "the wake during the poll counts");
    let waker = source.waker();
    drop(source);
    assert!(!readiness.is_readable());
    waker.wake();
    assert!(!readiness.is_readable(), "a retired source stays down");
    readiness.close();
    assert!(readiness.is_readable(), "closed: readable for good");
}

fn exclusive_queue(conn: &mut Connection) -> String {
    let spec = QueueSpec {
        exclusive: true,
        durable: false,
        ..QueueSpec::default()
    };
    conn.declare_queue("", spec).expect("queue").name
}

fn outgoing(queue: &str, body: &[u8]) -> Outgoing {
    Outgoing {
        exchange: String::new(),
        routing_key: queue.to_string(),
        body: body.to_vec(),
        properties: BasicProperties::default(),
    }
}

#[test]
fn a_consumer_raises_the_fd_when_a_delivery_comes_after_a_take_found_none() {
    let mut conn = connect();
    let readiness = conn.link().readiness("test").expect("readiness");
    let queue = exclusive_queue(&mut conn);
    let mut consumer = conn
        .consumer(std::slice::from_ref(&queue), &ConsumerOptions::default())
        .expect("consumer");
    assert!(consumer
        .next(Duration::ZERO, false)
        .expect("take")
        .is_none());
    assert!(!readiness.is_readable());
    let producer = conn.producer(ProducerOptions::default()).expect("producer");
    for body in [b"a", b"b"] {
        producer
            .lock()
            .expect("lock")
            .publish(outgoing(&queue, body))
            .expect("publish");
    }
    eventually("the delivery raises the fd", || readiness.is_readable());
    let mut taken = 0;
    eventually("both taken", || {
        while let Some(Incoming::Message(delivery)) =
            consumer.next(Duration::ZERO, false).expect("take")
        {
            taken += 1;
            // Taking one leaves it raised: more may be buffered.
            assert!(readiness.is_readable());
            delivery
                .settle(crate::core::settlements::Settlement::Ack, "ack")
                .expect("ack");
        }
        taken == 2
    });
    assert!(!readiness.is_readable(), "a take that found none lowers it");
    consumer.cancel().expect("cancel");
}

#[test]
fn pending_confirms_raise_the_fd_once_all_are_settled() {
    let mut conn = connect();
    let readiness = conn.link().readiness("test").expect("readiness");
    let queue = exclusive_queue(&mut conn);
    let producer = conn.producer(ProducerOptions::default()).expect("producer");
    let mut producer = producer.lock().expect("lock");
    for i in 0..500u32 {
        producer
            .publish(outgoing(&queue, &i.to_be_bytes()))
            .expect("publish");
    }
    let (failures, mut pending) = producer.poll_confirms().expect("poll");
    assert!(failures.is_empty());
    while pending > 0 {
        eventually("the last confirm raises the fd", || readiness.is_readable());
        pending = producer.poll_confirms().expect("poll").1;
    }
    assert!(!readiness.is_readable(), "all settled: lowered");
    drop(producer);
    assert_eq!(conn.queue_status(&queue).expect("status").messages, 500);
}

#[test]
fn rpc_calls_in_flight_get_their_own_replies_and_time_out_on_their_own() {
    let mut server = connect();
    let queue = exclusive_queue(&mut server);
    let mut requests = server
        .consumer(std::slice::from_ref(&queue), &ConsumerOptions::default())
        .expect("consumer");
    let mut client = connect();
    let readiness = client.link().readiness("test").expect("readiness");
    let mut calls: Vec<_> = (0..20u8)
        .map(|i| {
            client
                .rpc_start(outgoing(&queue, &[i]), Duration::from_secs(10))
                .expect("start")
        })
        .collect();
    let mut late = client
        .rpc_start(outgoing(&queue, b"late"), Duration::from_millis(300))
        .expect("start");
    // Served in reverse order: each reply must still reach its own call.
    let mut served = Vec::new();
    eventually("21 requests in", || {
        while let Some(Incoming::Message(d)) = requests.next(Duration::ZERO, false).expect("next") {
            served.push(d);
        }
        served.len() == 21
    });
    for delivery in served.iter().rev().filter(|d| d.body != b"late") {
        let reply_to = delivery.properties.reply_to().clone().expect("reply_to");
        let id = delivery.properties.correlation_id().clone();
        let body = [delivery.body[0], 100];
        crate::core::rpc::reply(
            delivery.link(),
            reply_to.as_str(),
            id,
            &body,
            BasicProperties::default(),
        )
        .expect("reply");
    }
    let mut replies = vec![None; calls.len()];
    eventually("every reply taken", || {
        for (i, call) in calls.iter_mut().enumerate() {
            if replies[i].is_none() {
                replies[i] = call.poll().expect("poll").map(|d| d.data);
            }
        }
        replies.iter().all(Option::is_some)
    });
    for (i, reply) in replies.into_iter().enumerate() {
        assert_eq!(reply, Some(vec![i as u8, 100]));
    }
    let again = calls[0].poll().expect_err("taken twice");
    assert!(
        again.message().contains("already taken"),
        "{}",
        again.message()
    );
    // Its confirm may have raised the fd before: a take then finds nothing yet.
    let mut timed_out = None;
    eventually("the timeout raises the fd and the take gives it", || {
        if readiness.is_readable() {
            timed_out = late.poll().err();
        }
        timed_out.is_some()
    });
    let err = timed_out.expect("timed out");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{}", err.message());
    drop(calls);
    drop(late);
    assert!(!readiness.is_readable(), "nothing left to take");
}

#[test]
fn close_leaves_the_fd_readable_and_takes_fail() {
    let mut conn = connect();
    let readiness = conn.link().readiness("test").expect("readiness");
    let queue = exclusive_queue(&mut conn);
    let mut consumer = conn
        .consumer(std::slice::from_ref(&queue), &ConsumerOptions::default())
        .expect("consumer");
    assert!(consumer
        .next(Duration::ZERO, false)
        .expect("take")
        .is_none());
    conn.close().expect("close");
    assert!(readiness.is_readable());
    let err = consumer.next(Duration::ZERO, false).err().expect("closed");
    assert!(err.message().contains("closed"), "{}", err.message());
    let err = conn.readiness_fd().expect_err("closed");
    assert_eq!(err.kind(), ErrorKind::Connection);
}
