//! What the cargo tests share: a connection to the test broker, names no concurrent run
//! shares, and waiting on a condition instead of sleeping.

use crate::core::connect_options::ConnectOptions;
use crate::core::connection::Connection;
use crate::core::producer::{Outgoing, ProducerOptions};
use crate::core::topology::QueueSpec;
use lapin::BasicProperties;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The test broker when `AMQP_RS_TEST_URI` is not set: the host's RabbitMQ.
const DEFAULT_BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The test broker's URI, with its credentials: the one setting `AMQP_RS_TEST_URI` (which
/// `make matrix` points at the sid root's RabbitMQ 4.3 node; the PHP tests read it too), else
/// the host's RabbitMQ on 127.0.0.1:5672.
pub(crate) fn broker() -> String {
    std::env::var("AMQP_RS_TEST_URI")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| DEFAULT_BROKER.to_string())
}

/// `host:port` of the test broker, as endpoints and error messages show it.
pub(crate) fn broker_host_port() -> String {
    let uri = broker();
    let after_scheme = uri.split_once("://").map_or(uri.as_str(), |(_, rest)| rest);
    let authority = after_scheme.split('/').next().unwrap_or(after_scheme);
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host)
        .to_string()
}

/// The test broker's URI with another user and password.
pub(crate) fn broker_with_login(user: &str, password: &str) -> String {
    format!("amqp://{user}:{password}@{}/%2f", broker_host_port())
}

pub(crate) fn connect() -> Connection {
    Connection::open(&[broker()], &ConnectOptions::default()).expect("broker up")
}

/// `amqp_rs.core.<prefix>.<pid>.<n>`: unique between tests of a run and between runs.
pub(crate) fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("amqp_rs.core.{prefix}.{}.{n}", std::process::id())
}

/// Polls `condition` until it holds; panics naming `what` after 10 s.
pub(crate) fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "not within 10 s: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A fresh, empty, durable queue that outlives the connection (delete it after use).
pub(crate) fn temp_queue(conn: &mut Connection, prefix: &str) -> String {
    let queue = unique(prefix);
    // Durable (the tests delete it): RabbitMQ 4 deprecates transient queues that are not
    // exclusive, and these are used from a second connection, which an exclusive one refuses.
    let spec = QueueSpec {
        durable: true,
        auto_delete: false,
        ..QueueSpec::default()
    };
    conn.declare_queue(&queue, spec).expect("queue");
    queue
}

/// Publishes `n` messages (bodies 0, 1, ...) to `queue` and waits for their confirms.
pub(crate) fn publish(conn: &mut Connection, queue: &str, n: u8) {
    let producer = conn.producer(ProducerOptions::default()).expect("producer");
    let mut producer = producer.lock().expect("lock");
    for i in 0..n {
        producer
            .publish(Outgoing {
                exchange: String::new(),
                routing_key: queue.to_string(),
                body: vec![i],
                properties: BasicProperties::default(),
            })
            .expect("publish");
    }
    producer
        .wait_for_confirms(Duration::from_secs(5))
        .expect("confirms");
}

/// Messages ready in `queue` (not delivered to a consumer).
pub(crate) fn ready(conn: &mut Connection, queue: &str) -> u32 {
    conn.queue_status(queue).expect("status").messages
}
