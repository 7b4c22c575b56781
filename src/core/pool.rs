//! Persistent connections, PDO-style: a connection opened with `persistent` stays in this
//! process's pool when the request that opened it ends, and the next `Connection` asked for
//! with the same key gets it back without a handshake. php-fpm serves request after request
//! from one worker process, so a worker opens one connection for its life instead of one per
//! request, which is what RabbitMQ's docs ask of clients.
//!
//! The key is everything that changes the connection: the brokers (with their credentials
//! and vhost) and every connect option. It holds the password, so it is never shown.
//! Entries are checked before use: a connection lost between requests (broker restart, an
//! idle timeout somewhere on the path) is dropped and a new one opened, so the request that
//! finds it sees no error. Heartbeats keep idle entries alive: lapin's threads run while the
//! worker waits for its next request. A forked child never uses its parent's entries (they
//! belong to another runtime generation) and leaks them without touching their sockets.

use crate::core::connect_options::ConnectOptions;
use crate::core::error::Result;
use crate::core::link::Link;
use crate::core::rpc::RpcClient;
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long closing the pool at process end waits for each connection's close-ok.
const SHUTDOWN_CLOSE: Duration = Duration::from_secs(1);

struct Entry {
    /// Brokers, credentials and options, as one string; secret.
    key: String,
    link: Arc<Link>,
    opened: Instant,
    /// How many `Connection` objects it was handed to, the first included.
    served: u64,
    /// The RPC channel of the last request, kept with its reply consumer. Leaked with the
    /// link in a forked child.
    rpc: ManuallyDrop<Option<RpcClient>>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        if self.link.is_own() {
            // SAFETY: dropped exactly once, here, and never used again.
            unsafe { ManuallyDrop::drop(&mut self.rpc) };
        }
    }
}

static POOL: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

fn pool() -> std::sync::MutexGuard<'static, Vec<Entry>> {
    POOL.lock().unwrap_or_else(|p| p.into_inner())
}

fn key_of(uris: &[String], options: &ConnectOptions) -> String {
    format!(
        "{uris:?}|{}|{:?}|{:?}|{}|{:?}",
        options.heartbeat, options.connect_timeout, options.name, options.reconnect, options.tls
    )
}

/// Takes out the entries a forked child inherited: they belong to the parent's runtime and
/// sockets, so they are forgotten, not dropped.
fn forget_inherited(entries: &mut Vec<Entry>) {
    let mut kept = Vec::with_capacity(entries.len());
    for entry in entries.drain(..) {
        if entry.link.is_own() {
            kept.push(entry);
        } else {
            std::mem::forget(entry);
        }
    }
    *entries = kept;
}

/// The pooled connection for `uris` and `options`, or a new one put in the pool.
pub(crate) fn checkout(uris: &[String], options: &ConnectOptions) -> Result<Arc<Link>> {
    let key = key_of(uris, options);
    let dead = {
        let mut entries = pool();
        forget_inherited(&mut entries);
        match entries.iter().position(|e| e.key == key) {
            Some(i) if entries[i].link.is_connected() => {
                entries[i].served += 1;
                return Ok(entries[i].link.clone());
            }
            Some(i) => Some(entries.swap_remove(i)),
            None => None,
        }
    };
    // Lost since the last request: dropped (its recovery abandoned), then a new one opened.
    drop(dead);
    let link = Link::open(uris, options)?;
    pool().push(Entry {
        key,
        link: link.clone(),
        opened: Instant::now(),
        served: 1,
        rpc: ManuallyDrop::new(None),
    });
    Ok(link)
}

/// Takes `link` out of the pool, so that it closes once its last user lets go.
pub(crate) fn discard(link: &Arc<Link>) {
    let removed = {
        let mut entries = pool();
        entries
            .iter()
            .position(|e| Arc::ptr_eq(&e.link, link))
            .map(|i| entries.swap_remove(i))
    };
    drop(removed);
}

/// The RPC channel the last request on this pooled link left, if any.
pub(crate) fn take_rpc(link: &Arc<Link>) -> Option<RpcClient> {
    let mut entries = pool();
    let entry = entries.iter_mut().find(|e| Arc::ptr_eq(&e.link, link))?;
    entry.rpc.take()
}

/// Keeps an RPC channel for the next request on this pooled link; gives it back when the
/// link is no longer pooled or a channel is already kept (the caller then drops it).
pub(crate) fn keep_rpc(link: &Arc<Link>, client: RpcClient) -> Option<RpcClient> {
    let mut entries = pool();
    match entries.iter_mut().find(|e| Arc::ptr_eq(&e.link, link)) {
        Some(entry) if entry.rpc.is_none() => {
            *entry.rpc = Some(client);
            None
        }
        _ => Some(client),
    }
}

/// Request end, once every object of the request is gone: what the request left on pooled
/// connections that the next one must not see is removed (see `Link::end_request`).
pub fn end_request() {
    let links: Vec<Arc<Link>> = {
        let mut entries = pool();
        forget_inherited(&mut entries);
        entries.iter().map(|e| e.link.clone()).collect()
    };
    for link in links {
        link.end_request();
    }
}

/// Process end: every pooled connection is closed, each waiting briefly for the broker.
pub fn close_all() {
    let entries: Vec<Entry> = {
        let mut entries = pool();
        forget_inherited(&mut entries);
        entries.drain(..).collect()
    };
    for entry in entries {
        let _ = entry.link.close_within(SHUTDOWN_CLOSE);
    }
}

/// One pooled connection as `php --ri amqp_rs` shows it: nothing secret.
#[derive(Clone, Debug)]
pub struct PooledInfo {
    /// `amqp://user@host:port/vhost`, no password.
    pub endpoint: String,
    /// Seconds since it was opened.
    pub age: u64,
    /// Channels it keeps open between requests.
    pub idle_channels: usize,
    /// Requests (`Connection` objects) it served.
    pub served: u64,
    /// Whether it is connected now.
    pub connected: bool,
}

/// The pooled connections of this process.
pub fn info() -> Vec<PooledInfo> {
    let entries = pool();
    entries
        .iter()
        .filter(|e| e.link.is_own())
        .map(|e| PooledInfo {
            endpoint: e.link.endpoint().to_string(),
            age: e.opened.elapsed().as_secs(),
            idle_channels: e.link.idle().count() + usize::from(e.rpc.is_some()),
            served: e.served,
            connected: e.link.is_connected(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::connection::Connection;
    use crate::core::producer::ProducerOptions;
    use crate::core::testing;

    fn options(name: &str) -> ConnectOptions {
        ConnectOptions {
            persistent: true,
            name: Some(name.to_string()),
            ..ConnectOptions::default()
        }
    }

    fn served(link: &Arc<Link>) -> u64 {
        pool()
            .iter()
            .find(|e| Arc::ptr_eq(&e.link, link))
            .map_or(0, |e| e.served)
    }

    #[test]
    fn a_second_connection_with_the_same_key_gets_the_pooled_link_and_its_channels() {
        let uris = [testing::broker()];
        let same = options("amqp_rs.core.pool-same-key");
        let mut first = Connection::open(&uris, &same).expect("connect");
        let link = first.link_arc();
        let producer = first
            .producer(ProducerOptions::default())
            .expect("producer");
        let channel_id = producer.lock().expect("lock").channel_id();
        drop(producer);
        first.close().expect("release");
        assert!(!first.is_connected(), "the object is done");
        assert!(link.is_connected(), "the connection is not");
        drop(first);

        let mut second = Connection::open(&uris, &same).expect("from the pool");
        assert!(Arc::ptr_eq(&second.link_arc(), &link));
        assert_eq!(served(&link), 2);
        let producer = second
            .producer(ProducerOptions::default())
            .expect("producer");
        assert_eq!(
            producer.lock().expect("lock").channel_id(),
            channel_id,
            "the clean confirm channel is used again"
        );
        drop(producer);

        let other =
            Connection::open(&uris, &options("amqp_rs.core.pool-other-key")).expect("another key");
        assert!(!Arc::ptr_eq(&other.link_arc(), &link));
        second.close_persistent().expect("close for good");
        assert!(!link.is_connected());
        let third = Connection::open(&uris, &same).expect("a new one");
        assert!(!Arc::ptr_eq(&third.link_arc(), &link));
        discard(&third.link_arc());
        discard(&other.link_arc());
    }
}
