//! The facade a PHP `Connection` wraps: one shared link (see `link.rs`), the channel its
//! topology commands go on, and what it makes: producers, consumers, `basic.get`, RPC calls.

use crate::core::connect_options::ConnectOptions;
use crate::core::consumer::{Consumer, ConsumerOptions};
use crate::core::error::{Error, ErrorKind, Result};
use crate::core::link::{Confirming, Link, CLOSE_TIMEOUT, COMMAND_TIMEOUT};
use crate::core::poison::{poison_warning, DEAD_LETTERED};
use crate::core::pool;
use crate::core::producer::{Outgoing, Producer, ProducerOptions};
use crate::core::rpc::RpcClient;
use crate::core::rpc_call::RpcCall;
use crate::core::runtime;
use crate::core::settlements::Settlement;
use crate::core::shortstr::shortstr;
use lapin::message::Delivery;
use lapin::Channel;
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A live connection owned by the PHP thread.
pub struct Connection {
    link: Arc<Link>,
    // Leaked rather than dropped in a forked child, like the link.
    channel: ManuallyDrop<Option<Channel>>,
    /// The RPC channel, opened by the first `rpc()`; leaked in a forked child too.
    rpc: ManuallyDrop<Option<RpcClient>>,
    /// `close()` was called on a persistent connection: this object is done, while the
    /// connection itself stays in the pool.
    released: bool,
    /// A `basic.get` without auto-ack ran on the command channel: the message may still be
    /// unsettled there, so the channel is closed (the message goes back to its queue) rather
    /// than kept for the next request.
    got_unsettled: bool,
}

impl Connection {
    /// Connects to the first URI of `uris` that accepts us, in order; with `persistent`, the
    /// pooled connection of the same key is used when it is still alive.
    pub fn open(uris: &[String], options: &ConnectOptions) -> Result<Connection> {
        let (link, rpc) = if options.persistent {
            let link = pool::checkout(uris, options)?;
            let rpc = pool::take_rpc(&link);
            (link, rpc)
        } else {
            (Link::open(uris, options)?, None)
        };
        Ok(Connection {
            link,
            channel: ManuallyDrop::new(None),
            rpc: ManuallyDrop::new(rpc),
            released: false,
            got_unsettled: false,
        })
    }

    /// Whether this connection is kept in the process's pool (the `persistent` option).
    pub fn is_persistent(&self) -> bool {
        self.link.is_persistent()
    }

    /// `amqp://user@host:port/vhost` of the broker we are connected to.
    pub fn endpoint(&self) -> &str {
        self.link.endpoint()
    }

    /// The shared connection, for the topology commands that keep track of what they made.
    pub(crate) fn link(&self) -> &Link {
        &self.link
    }

    /// The shared connection itself, for objects that outlive this one (messages).
    pub(crate) fn link_arc(&self) -> Arc<Link> {
        self.link.clone()
    }

    /// The RPC channel, if one is open.
    pub(crate) fn rpc_client(&mut self) -> Option<&mut RpcClient> {
        self.rpc.as_mut()
    }

    /// Keeps `client` as the RPC channel (replacing a dead one) and returns it.
    pub(crate) fn set_rpc_client(&mut self, client: RpcClient) -> &mut RpcClient {
        self.rpc.insert(client)
    }

    /// Whether a lost connection is recovered (the `reconnect` option).
    pub(crate) fn reconnects(&self) -> bool {
        self.link.reconnect
    }

    /// True while the connection is open and usable from this process.
    pub fn is_connected(&self) -> bool {
        !self.released && self.link.is_connected()
    }

    /// The error to give for any use of a connection that cannot serve.
    pub fn ensure_usable(&self, what: &str) -> Result<()> {
        if self.released {
            return Err(Error::connection(format!(
                "{what} on {}: the connection is closed (it stays in the pool for the next \
                 new Connection() with the same settings)",
                self.endpoint()
            )));
        }
        self.link.ensure_usable(what)
    }

    /// Negotiated maximum frame size, for callers that must refuse oversized headers locally.
    pub fn frame_max(&self) -> u32 {
        self.link.frame_max()
    }

    /// The channel for topology commands, reopened when the broker closed the last one.
    pub(crate) fn command_channel(&mut self, what: &str) -> Result<Channel> {
        self.ensure_usable(what)?;
        if let Some(channel) = self.channel.as_ref() {
            if self.link.channel_usable(channel) {
                return Ok(channel.clone());
            }
        }
        let channel = match self.link.idle().take_command() {
            Some(channel) => channel,
            None => self.link.open_channel("send commands")?,
        };
        *self.channel = Some(channel.clone());
        Ok(channel)
    }

    /// The fields of a delivery on `channel` that were not UTF-8, if any; once per delivery.
    pub(crate) fn poisoned(
        &self,
        channel: &Channel,
        delivery_tag: u64,
    ) -> Option<Vec<&'static str>> {
        self.link.poisoned(channel.id(), delivery_tag)
    }

    /// Runs one broker command on the command channel with the standard bound and context.
    pub(crate) fn command<T, F, Fut>(&mut self, what: &str, f: F) -> Result<T>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: std::future::Future<Output = lapin::Result<T>>,
    {
        let channel = self.command_channel(what)?;
        let context = format!("{what} on {}", self.endpoint());
        runtime::command(f(channel), COMMAND_TIMEOUT, &context)
    }

    /// A producer on its own channel; it shares this connection and keeps it open.
    pub fn producer(&mut self, options: ProducerOptions) -> Result<Arc<Mutex<Producer>>> {
        let producer = Arc::new(Mutex::new(Producer::new(self.link.clone(), options)?));
        let tracked: Arc<Mutex<dyn Confirming>> = producer.clone();
        self.link.track(Arc::downgrade(&tracked));
        Ok(producer)
    }

    /// A consumer of `queues` on its own channel; it shares this connection and keeps it open.
    pub fn consumer(&mut self, queues: &[String], options: &ConsumerOptions) -> Result<Consumer> {
        Consumer::new(self.link.clone(), queues, options)
    }

    /// One message by `basic.get`, or `None` when the queue is empty; and a warning for each
    /// message passed over because its short strings were not UTF-8 (dead-lettered, as by
    /// [`Consumer::next`]).
    pub fn get(&mut self, queue: &str, auto_ack: bool) -> Result<(Option<Delivery>, Vec<String>)> {
        let name = shortstr(queue, "queue name")?;
        let what = format!("get a message from queue '{queue}'");
        self.got_unsettled |= !auto_ack;
        let mut warnings = Vec::new();
        loop {
            let name = name.clone();
            let got = self.command(&what, |ch| async move {
                ch.basic_get(name, lapin::options::BasicGetOptions { no_ack: auto_ack })
                    .await
            })?;
            let Some(delivery) = got.map(|m| m.delivery) else {
                return Ok((None, warnings));
            };
            let channel = self.command_channel(&what)?;
            let tag = delivery.delivery_tag;
            let Some(fields) = self.poisoned(&channel, tag) else {
                return Ok((Some(delivery), warnings));
            };
            let fate = if auto_ack {
                "already acknowledged (autoAck): it is lost"
            } else {
                let how = Settlement::Reject { requeue: false };
                self.link.settlements().send(&delivery.acker, how, false)?;
                DEAD_LETTERED
            };
            warnings.push(poison_warning(&fields, tag, queue, self.endpoint(), fate));
        }
    }

    /// Sends `request` and waits up to `timeout` for its reply (direct reply-to).
    pub fn rpc(&mut self, request: Outgoing, timeout: Duration) -> Result<Delivery> {
        let link = self.link_arc();
        self.usable_rpc_client()?.call(&link, request, timeout)
    }

    /// The RPC channel, opened (or reopened, if it died) as needed.
    fn usable_rpc_client(&mut self) -> Result<&mut RpcClient> {
        self.ensure_usable("RPC")?;
        let link = self.link_arc();
        if !self.rpc.as_ref().is_some_and(|client| client.usable(&link)) {
            return Ok(self.set_rpc_client(RpcClient::open(&link)?));
        }
        self.rpc_client()
            .ok_or_else(|| Error::other("RPC: the RPC channel is gone"))
    }

    /// Sends `request` and returns at once; the reply is taken from the call, which raises
    /// the connection's readiness fd when it is there (or the call failed or timed out).
    pub fn rpc_start(&mut self, request: Outgoing, timeout: Duration) -> Result<RpcCall> {
        let link = self.link_arc();
        RpcCall::start(self.usable_rpc_client()?, link, request, timeout)
    }

    /// The connection's readiness fd, duplicated for the caller to own (see `readiness.rs`).
    pub fn readiness_fd(&self) -> Result<std::os::fd::RawFd> {
        self.ensure_usable("watch the connection")?;
        self.link.readiness("watch the connection")?.dup_fd()
    }

    /// Waits (bounded) for the confirms of every producer made from this connection, then
    /// closes it for all of them; idempotent. Messages that were nacked, returned or never
    /// confirmed come back as one `Publish` error, after the connection is closed.
    ///
    /// A persistent connection is not closed but released: this object is done, and the
    /// connection waits in the pool for the next request (see `close_persistent`).
    pub fn close(&mut self) -> Result<()> {
        if self.released {
            return Ok(());
        }
        let outcome = self.wait_for_producers();
        if self.link.is_persistent() {
            self.release();
        } else {
            self.link.close()?;
        }
        outcome
    }

    /// Closes a persistent connection for good and takes it out of the pool (after waiting
    /// for confirms as `close()` does); the next `new Connection()` opens a new one.
    pub fn close_persistent(&mut self) -> Result<()> {
        pool::discard(&self.link);
        let outcome = self.wait_for_producers();
        self.release();
        self.link.close()?;
        outcome
    }

    /// Hands what this object holds back to the pooled connection, if clean: the command
    /// channel and the RPC channel wait there for the next request.
    fn release(&mut self) {
        if std::mem::replace(&mut self.released, true) || !self.link.is_own() {
            return;
        }
        if let Some(channel) = self.channel.take() {
            let unclean = self.got_unsettled.then_some(channel.clone());
            if let Some(channel) = unclean.or_else(|| self.link.idle().keep_command(channel)) {
                self.link.close_channel(&channel, "command");
            }
        }
        if let Some(client) = self.rpc.take() {
            if client.usable(&self.link) {
                // No room (another object of this request kept one): dropped here.
                drop(pool::keep_rpc(&self.link, client));
            }
        }
    }

    /// Waits for every producer made from this connection; their failures as one error.
    fn wait_for_producers(&mut self) -> Result<()> {
        let producers = self.link.tracked();
        let mut failures = Vec::new();
        let mut unconfirmed = 0;
        let mut channel_error = None;
        if self.link.is_connected() {
            for producer in producers {
                let mut producer = producer.lock().unwrap_or_else(|p| p.into_inner());
                match producer.wait_for_confirms(CLOSE_TIMEOUT) {
                    Ok(mut failed) => failures.append(&mut failed),
                    Err(e) if e.kind() == ErrorKind::Timeout => unconfirmed += producer.pending(),
                    Err(e) => channel_error = channel_error.or(Some(e)),
                }
            }
        }
        // Acks of messages settled outside consume() (Connection::get) go out before the close.
        let _ = self.link.settlements().flush(CLOSE_TIMEOUT);
        if let Some(err) = channel_error {
            return Err(err);
        }
        let what = format!("close the connection to {}", self.endpoint());
        if unconfirmed > 0 {
            let what = format!(
                "{what}: {unconfirmed} publishes were still unconfirmed after {} s",
                CLOSE_TIMEOUT.as_secs()
            );
            return Err(Error::publish(&what, failures));
        }
        if !failures.is_empty() {
            return Err(Error::publish(&what, failures));
        }
        Ok(())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if self.link.is_persistent() {
            self.release();
        }
        if self.link.is_own() {
            // SAFETY: dropped exactly once, here, and never used again.
            unsafe {
                ManuallyDrop::drop(&mut self.channel);
                ManuallyDrop::drop(&mut self.rpc);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::core::error::ErrorKind;

    use crate::core::testing;

    pub(crate) fn connect() -> Connection {
        Connection::open(&[testing::broker()], &ConnectOptions::default()).expect("broker up")
    }

    #[test]
    fn connects_reports_and_closes_idempotently() {
        let mut conn = connect();
        assert!(conn.is_connected());
        assert_eq!(
            conn.endpoint(),
            format!("amqp://guest@{}/%2F", testing::broker_host_port())
        );
        assert!(conn.frame_max() > 4096);
        conn.close().expect("close");
        assert!(!conn.is_connected());
        conn.close().expect("second close is a no-op");
        let err = conn.ensure_usable("declare").expect_err("closed");
        assert_eq!(err.kind(), ErrorKind::Connection);
    }

    #[test]
    fn io_loop_threads_keep_the_normal_policy_so_their_wakeups_are_prompt() {
        // SCHED_BATCH here once made bursts of publishes cheaper, but a woken batch thread
        // waits for the next tick on a busy machine: round trips of 2-11 ms at p99 under
        // load where the normal policy gave 0.1-0.2 ms, for the same publish throughput.
        let _conn = connect();
        let mut io_loops = 0;
        for task in std::fs::read_dir("/proc/self/task").expect("proc") {
            let path = task.expect("task").path();
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            if comm.trim() != "lapin-io-loop" {
                continue;
            }
            let tid: i32 = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse().ok())
                .expect("tid");
            // SAFETY: reads the policy of a thread of this process.
            let policy = unsafe { libc::sched_getscheduler(tid) };
            assert_eq!(policy, libc::SCHED_OTHER, "io-loop thread {tid}");
            io_loops += 1;
        }
        assert!(io_loops >= 1);
    }

    #[test]
    fn refused_port_is_a_connection_error_naming_the_host() {
        let uris = ["amqp://guest:guest@127.0.0.1:1/%2f".to_string()];
        let err = Connection::open(&uris, &ConnectOptions::default())
            .err()
            .expect("refused");
        assert_eq!(err.kind(), ErrorKind::Connection);
        assert!(err.message().contains("127.0.0.1:1"), "{}", err.message());
        assert!(!err.message().contains("guest:guest"));
    }

    #[test]
    fn a_list_falls_through_to_the_first_broker_that_answers() {
        let uris = [
            "amqp://guest:guest@127.0.0.1:1/%2f".to_string(),
            testing::broker(),
        ];
        let conn = Connection::open(&uris, &ConnectOptions::default()).expect("second works");
        assert!(conn.endpoint().contains(&testing::broker_host_port()));
    }

    #[test]
    fn silent_listener_times_out_within_connect_timeout() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let options = ConnectOptions {
            connect_timeout: Duration::from_millis(500),
            ..ConnectOptions::default()
        };
        let started = std::time::Instant::now();
        let err = Connection::open(&[format!("amqp://127.0.0.1:{port}")], &options)
            .err()
            .expect("silent");
        assert_eq!(err.kind(), ErrorKind::Connection);
        assert!(
            err.message().contains("connect_timeout"),
            "{}",
            err.message()
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        drop(listener);
    }

    #[test]
    fn wrong_password_is_refused_without_echoing_it() {
        let uris = [testing::broker_with_login("guest", "not-the-password")];
        let err = Connection::open(&uris, &ConnectOptions::default())
            .err()
            .expect("refused");
        assert_eq!(err.kind(), ErrorKind::Connection);
        assert!(
            err.message().contains("access refused"),
            "{}",
            err.message()
        );
        assert!(!err.message().contains("not-the-password"));
    }
}
