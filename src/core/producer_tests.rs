//! The producer against the real broker: pipelined confirms, the byte bound, channel errors,
//! returns, and what close() reports.

use super::*;
use crate::core::connection::tests::connect;
use crate::core::error::ErrorKind;
use crate::core::topology::QueueSpec;

fn message(exchange: &str, routing_key: &str, body: &[u8]) -> Outgoing {
    Outgoing {
        exchange: exchange.to_string(),
        routing_key: routing_key.to_string(),
        body: body.to_vec(),
        properties: BasicProperties::default().with_message_id("id-1".into()),
    }
}

fn temp_queue(conn: &mut crate::core::connection::Connection) -> String {
    let spec = QueueSpec {
        exclusive: true,
        durable: false,
        ..QueueSpec::default()
    };
    conn.declare_queue("", spec).expect("queue").name
}

#[test]
fn pipelined_publishes_are_all_confirmed_and_land() {
    let mut conn = connect();
    let queue = temp_queue(&mut conn);
    let producer = conn.producer(ProducerOptions::default()).expect("producer");
    let mut producer = producer.lock().expect("lock");
    for i in 0..1000u32 {
        producer
            .publish(message("", &queue, &i.to_be_bytes()))
            .expect("publish");
    }
    let failures = producer
        .wait_for_confirms(Duration::from_secs(10))
        .expect("confirms");
    assert!(failures.is_empty());
    assert_eq!(producer.pending(), 0);
    drop(producer);
    assert_eq!(conn.queue_status(&queue).expect("status").messages, 1000);
}

#[test]
fn large_bodies_in_flight_stay_under_the_byte_bound() {
    let mut conn = connect();
    // Durable, so that the broker's confirms lag (fsync) and publishes pile up.
    // A name of this run only: concurrent runs shared one queue and counted each other's.
    let queue = crate::core::testing::unique("byte-bound");
    conn.declare_queue(&queue, QueueSpec::default())
        .expect("queue");
    let producer = conn.producer(ProducerOptions::default()).expect("producer");
    let mut producer = producer.lock().expect("lock");
    let body = vec![7u8; 64 << 10];
    let mut most = 0;
    for _ in 0..1000 {
        producer
            .publish(message("", &queue, &body))
            .expect("publish");
        most = most.max(producer.confirms.in_flight_bytes());
    }
    assert!(
        most <= crate::core::confirms::MAX_IN_FLIGHT_BYTES,
        "{most} bytes in flight"
    );
    assert!(producer
        .wait_for_confirms(Duration::from_secs(30))
        .expect("confirms")
        .is_empty());
    assert_eq!(producer.confirms.in_flight_bytes(), 0);
    drop(producer);
    assert_eq!(conn.queue_status(&queue).expect("status").messages, 1000);
    conn.delete_queue(&queue, false, false).expect("delete");
    assert!(
        most > crate::core::confirms::MAX_IN_FLIGHT_BYTES / 2,
        "the bound was reached: {most}"
    );
}

#[test]
fn missing_exchange_is_a_404_channel_error_and_the_next_publish_works() {
    let mut conn = connect();
    let queue = temp_queue(&mut conn);
    let producer = conn.producer(ProducerOptions::default()).expect("producer");
    let mut producer = producer.lock().expect("lock");
    producer
        .publish(message("amqp_rs.core.no-such-exchange", "k", b"x"))
        .expect("pipelined");
    let err = producer
        .wait_for_confirms(Duration::from_secs(5))
        .expect_err("404");
    assert_eq!(err.kind(), ErrorKind::Channel(404));
    producer
        .publish(message("", &queue, b"ok"))
        .expect("reopened");
    assert!(producer
        .wait_for_confirms(Duration::from_secs(5))
        .expect("confirmed")
        .is_empty());
}

#[test]
fn unroutable_mandatory_message_is_one_named_failure() {
    let mut conn = connect();
    let options = ProducerOptions {
        mandatory: true,
        ..ProducerOptions::default()
    };
    let producer = conn.producer(options).expect("producer");
    let mut producer = producer.lock().expect("lock");
    producer
        .publish(message("amq.direct", "amqp_rs.core.nobody", b"x"))
        .expect("publish");
    let failures = producer
        .wait_for_confirms(Duration::from_secs(5))
        .expect("confirms");
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].reply_code, 312);
    assert_eq!(failures[0].routing_key, "amqp_rs.core.nobody");
    assert_eq!(failures[0].message_id.as_deref(), Some("id-1"));
}

#[test]
fn close_reports_failures_the_caller_never_collected() {
    let mut conn = connect();
    let options = ProducerOptions {
        mandatory: true,
        ..ProducerOptions::default()
    };
    let producer = conn.producer(options).expect("producer");
    producer
        .lock()
        .expect("lock")
        .publish(message("amq.direct", "amqp_rs.core.nobody", b"x"))
        .expect("publish");
    let err = conn.close().expect_err("failure reported");
    assert_eq!(err.kind(), ErrorKind::Publish);
    assert_eq!(err.failures().len(), 1);
    assert!(!conn.is_connected());
}

#[test]
fn a_blocking_wait_for_confirms_leaves_the_readiness_stream() {
    let mut conn = connect();
    let queue = temp_queue(&mut conn);
    let producer = conn.producer(ProducerOptions::default()).expect("producer");
    let mut producer = producer.lock().expect("lock");
    let readiness = producer.link.readiness("test").expect("readiness");
    for i in 0..200u32 {
        producer
            .publish(message("", &queue, &i.to_be_bytes()))
            .expect("publish");
    }
    // Joins the stream with confirms outstanding: their arrival would raise it.
    let (_, pending) = producer.poll_confirms().expect("poll");
    assert!(pending > 0, "confirms still to come");
    crate::core::testing::eventually("the confirms raise the stream", || readiness.is_readable());
    // Then settled by a blocking wait instead of pollConfirms().
    producer
        .wait_for_confirms(Duration::from_secs(10))
        .expect("confirms");
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !readiness.is_readable(),
        "the blocking wait left the stream: its settled confirms do not keep it readable"
    );
}
