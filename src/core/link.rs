//! The AMQP connection itself, shared by a `Connection` and every producer, consumer and
//! message made from it: the connect walk over the list of brokers, lapin's recovery hooked
//! to our failover walk, the socket check, and what every channel user needs (open, await
//! recovery, close).

use crate::core::connect::connect_one;
use crate::core::connect_options::{tls_config, ConnectOptions};
use crate::core::error::{Error, Failure, Result};
use crate::core::idle_channels::IdleChannels;
use crate::core::poison::PoisonLog;
use crate::core::readiness::Readiness;
use crate::core::recovery::{Attempts, RECOVERY_ATTEMPTS, RECOVERY_WAIT};
use crate::core::runtime;
use crate::core::settlements::Unwritten;
use crate::core::uri::{self, Endpoint};
use lapin::options::QueueDeclareOptions;
use lapin::tcp::OwnedTLSConfig;
use lapin::types::FieldTable;
use lapin::Channel;
use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

/// How long a single broker command (declare, bind, delete...) may take before the caller
/// gets a `TimeoutException` instead of a hang.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `close()` waits for confirms and for the broker's close-ok: a broker still
/// working through a burst of persistent messages answers only after them.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest a wait for the connection's state goes without rechecking it.
const STATE_RECHECK: Duration = Duration::from_millis(100);
/// How often a channel that lapin is reopening after a recovery is looked at again.
const CHANNEL_RECOVERY_SLICE: Duration = Duration::from_millis(5);

/// A publisher whose confirms `close()` waits for. A trait, so that the link need not know
/// the producer, which is built on the link.
pub(crate) trait Confirming: Send {
    /// Waits up to `timeout` for every publish so far; the failures not yet reported.
    fn wait_for_confirms(&mut self, timeout: Duration) -> Result<Vec<Failure>>;
    /// Publishes not yet confirmed.
    fn pending(&mut self) -> usize;
}

/// The AMQP connection itself, shared by a `Connection` and the producers made from it, so
/// that a producer outliving its PHP `Connection` object keeps working.
pub(crate) struct Link {
    /// Producers made from this connection, so `close()` can wait for their confirms.
    producers: Mutex<Vec<Weak<Mutex<dyn Confirming>>>>,
    // ManuallyDrop: in a forked child this belongs to the parent and must be leaked, not
    // dropped (a drop would queue a connection.close for the parent's socket).
    inner: ManuallyDrop<lapin::Connection>,
    /// The brokers given; `attempts.current` says which one the connection is on.
    endpoints: Arc<Vec<Endpoint>>,
    generation: u64,
    closed: AtomicBool,
    /// Deliveries whose short strings were not UTF-8, found by the socket's check.
    poison: Arc<PoisonLog>,
    /// Whether lapin recovers a lost connection (the `reconnect` option).
    pub(crate) reconnect: bool,
    /// lapin's connection attempts, to stop recovery once the user closed.
    attempts: Arc<Attempts>,
    /// Queues declared through this connection that a lost connection (or a broker restart)
    /// takes away: exclusive, auto-delete or not durable. See `Link::transient_queue`.
    transient: Mutex<HashMap<String, (QueueDeclareOptions, FieldTable)>>,
    /// The channel `Message::reply()` publishes on, opened on first use. Leaked in a forked
    /// child, like `inner`.
    reply_channel: ManuallyDrop<Mutex<Option<Channel>>>,
    /// Clean channels left for the next producer or command; leaked in a forked child too.
    idle: ManuallyDrop<IdleChannels>,
    /// Kept in the process's pool between requests (the `persistent` option).
    persistent: bool,
    /// Settlements handed to lapin and maybe not written yet (tagged with `generation`).
    settlements: Arc<Unwritten>,
    /// The eventfd event loops watch (see `readiness.rs`), made by the first non-blocking take.
    readiness: OnceLock<Arc<Readiness>>,
}

impl Link {
    /// Connects to the first URI of `uris` that accepts us, in order.
    pub(crate) fn open(uris: &[String], options: &ConnectOptions) -> Result<Arc<Link>> {
        if uris.is_empty() {
            return Err(Error::invalid_argument("no broker URI given"));
        }
        let endpoints = uris
            .iter()
            .map(|u| uri::parse(u))
            .collect::<Result<Vec<_>>>()?;
        let tls = if endpoints
            .iter()
            .any(|e| e.uri.scheme == lapin::uri::AMQPScheme::AMQPS)
        {
            tls_config(&options.tls)?
        } else {
            OwnedTLSConfig::default()
        };
        let (handle, generation) = runtime::current()?;
        let endpoints = Arc::new(endpoints);
        let mut failures = Vec::new();
        for (index, endpoint) in endpoints.iter().enumerate() {
            let poison = Arc::new(PoisonLog::default());
            let attempts = Arc::new(Attempts::default());
            attempts.current.store(index, Ordering::Release);
            // Driven by the PHP thread itself, no hand-off to a runtime worker and back.
            let attempt = connect_one(
                endpoints.clone(),
                options.clone(),
                tls.clone(),
                handle.clone(),
                poison.clone(),
                attempts.clone(),
            );
            // The inner timeout bounds the attempt; this outer one only guards against a
            // runtime that stopped answering.
            let limit = options.connect_timeout + Duration::from_secs(1);
            match runtime::block_on(attempt, limit, &format!("connect to {}", endpoint.display))
                .and_then(|attempt| attempt)
            {
                Ok(inner) => {
                    let events = Box::pin(inner.events_listener());
                    handle.spawn(attempts.changes.clone().forward(events));
                    return Ok(Arc::new(Link {
                        producers: Mutex::new(Vec::new()),
                        inner: ManuallyDrop::new(inner),
                        endpoints: endpoints.clone(),
                        generation,
                        closed: AtomicBool::new(false),
                        poison,
                        reconnect: options.reconnect,
                        attempts,
                        transient: Mutex::new(HashMap::new()),
                        reply_channel: ManuallyDrop::new(Mutex::new(None)),
                        idle: ManuallyDrop::new(IdleChannels::default()),
                        persistent: options.persistent,
                        settlements: Arc::new(Unwritten::new(generation)),
                        readiness: OnceLock::new(),
                    }));
                }
                Err(e) => failures.push(e),
            }
        }
        if failures.len() == 1 {
            return Err(failures.remove(0));
        }
        let all: Vec<&str> = failures.iter().map(Error::message).collect();
        Err(Error::connection(format!(
            "cannot connect to any of {} brokers: {}",
            failures.len(),
            all.join("; ")
        )))
    }

    /// `amqp://user@host:port/vhost` of the broker the connection is on (it changes when
    /// recovery fails over to another one), safe to print.
    pub(crate) fn endpoint(&self) -> &str {
        let current = self.attempts.current.load(Ordering::Acquire);
        self.endpoints
            .get(current)
            .or_else(|| self.endpoints.first())
            .map_or("", |e| e.display.as_str())
    }

    /// Keeps `producer` on the list `close()` waits for, while it lives.
    pub(crate) fn track(&self, producer: Weak<Mutex<dyn Confirming>>) {
        let mut producers = self.producers.lock().unwrap_or_else(|p| p.into_inner());
        producers.retain(|p| p.strong_count() > 0);
        producers.push(producer);
    }

    /// The producers made from this connection that still live.
    pub(crate) fn tracked(&self) -> Vec<Arc<Mutex<dyn Confirming>>> {
        let producers = self.producers.lock().unwrap_or_else(|p| p.into_inner());
        producers.iter().filter_map(Weak::upgrade).collect()
    }

    /// Clean channels kept open for the next producer or command.
    pub(crate) fn idle(&self) -> &IdleChannels {
        &self.idle
    }

    /// Whether this connection lives in the process's pool (the `persistent` option).
    pub(crate) fn is_persistent(&self) -> bool {
        self.persistent
    }

    /// Whether this object was made in this process (not inherited through `fork()`).
    pub(crate) fn is_own(&self) -> bool {
        runtime::is_current_generation(self.generation)
    }

    pub(crate) fn is_connected(&self) -> bool {
        !self.closed.load(Ordering::Acquire) && self.is_own() && self.inner.status().connected()
    }

    /// The error to give for any use of a connection that cannot serve.
    pub(crate) fn ensure_usable(&self, what: &str) -> Result<()> {
        self.ensure_open(what)?;
        if !self.inner.status().connected() && !self.await_recovery() {
            return Err(self.lost(what));
        }
        Ok(())
    }

    /// For takes that must not wait: true when the connection serves now, false while lapin
    /// recovers it (nothing to take yet); the error `ensure_usable` gives otherwise.
    pub(crate) fn usable_now(&self, what: &str) -> Result<bool> {
        self.ensure_open(what)?;
        let status = self.inner.status();
        if status.connected() {
            return Ok(true);
        }
        if self.recovers()
            && (status.reconnecting() || status.connecting())
            && !self.attempts.spent()
        {
            return Ok(false);
        }
        Err(self.lost(what))
    }

    /// The error for a connection closed by the user or inherited through `fork()`.
    pub(crate) fn ensure_open(&self, what: &str) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::connection(format!(
                "{what} on {}: the connection is closed",
                self.endpoint()
            )));
        }
        if !self.is_own() {
            return Err(Error::connection(format!(
                "{what} on {}: this connection was opened by the parent process before fork(); \
                 open a new Connection in the child",
                self.endpoint()
            )));
        }
        Ok(())
    }

    fn lost(&self, what: &str) -> Error {
        Error::connection(format!(
            "{what} on {}: the connection is lost{}",
            self.endpoint(),
            if self.reconnect {
                format!(" and could not be recovered ({RECOVERY_ATTEMPTS} attempts)")
            } else {
                " (reconnect is off)".to_string()
            }
        ))
    }

    /// Whether a lost connection is being recovered, or already is.
    pub(crate) fn recovers(&self) -> bool {
        self.reconnect && self.is_own() && !self.closed.load(Ordering::Acquire)
    }

    /// Whether `channel` can be used, after waiting for its recovery if one is under way
    /// (lapin reopens it under the same number once the connection is back).
    pub(crate) fn channel_usable(&self, channel: &Channel) -> bool {
        let deadline = std::time::Instant::now() + RECOVERY_WAIT;
        while !channel.status().connected() {
            let seen = self.attempts.changes.seen();
            // Once the connection is back, a channel lapin is not reopening is closed for
            // good: the broker closed it (404...), and lapin does not reopen those.
            if !self.await_recovery()
                || !channel.status().reconnecting()
                || std::time::Instant::now() >= deadline
            {
                return false;
            }
            // lapin announces no channel's return: a short slice, cut short by any event.
            self.attempts.changes.wait(seen, CHANNEL_RECOVERY_SLICE);
        }
        true
    }

    /// Waits while lapin re-establishes a lost connection; true once it is back.
    pub(crate) fn await_recovery(&self) -> bool {
        if !self.recovers() {
            return false;
        }
        let deadline = std::time::Instant::now() + RECOVERY_WAIT;
        loop {
            let seen = self.attempts.changes.seen();
            let status = self.inner.status();
            if status.connected() {
                return true;
            }
            let under_way =
                (status.reconnecting() || status.connecting()) && !self.attempts.spent();
            let now = std::time::Instant::now();
            if !under_way || now >= deadline {
                return false;
            }
            // Woken by lapin's Connected event or a failed attempt; the slice only guards
            // against a change that came without one.
            self.attempts
                .changes
                .wait(seen, (deadline - now).min(STATE_RECHECK));
        }
    }

    /// Opens a new channel; `what` names the purpose in errors.
    pub(crate) fn open_channel(&self, what: &str) -> Result<Channel> {
        self.ensure_usable(what)?;
        let context = format!("open a channel to {what} on {}", self.endpoint());
        runtime::command(self.inner.create_channel(), COMMAND_TIMEOUT, &context)
    }

    /// Opens a new channel in publisher-confirm mode; `what` names the purpose in errors.
    pub(crate) fn open_confirm_channel(&self, what: &str) -> Result<Channel> {
        let channel = self.open_channel(what)?;
        let context = format!("enable publisher confirms on {}", self.endpoint());
        runtime::command(
            channel.confirm_select(lapin::options::ConfirmSelectOptions::default()),
            COMMAND_TIMEOUT,
            &context,
        )?;
        Ok(channel)
    }

    /// The fields of a delivery that were not UTF-8 (now `?`), if any; once per delivery.
    pub(crate) fn poisoned(&self, channel: u16, delivery_tag: u64) -> Option<Vec<&'static str>> {
        self.poison.take(channel, delivery_tag)
    }

    /// Closes a producer's or consumer's channel now, rather than leaving it to lapin in the
    /// background: a channel still closing when the connection closes right after makes that
    /// close fail ("channel is Closing").
    pub(crate) fn close_channel(&self, channel: &Channel, what: &str) {
        if channel.status().connected() && self.is_connected() {
            let context = format!("close the {what} channel on {}", self.endpoint());
            let _ = runtime::block_on(channel.close(200, "bye".into()), COMMAND_TIMEOUT, &context);
        }
    }

    /// Records a queue declared through this connection, if losing the connection (or a
    /// broker restart) can take it away.
    pub(crate) fn remember_queue(
        &self,
        name: &str,
        options: QueueDeclareOptions,
        args: FieldTable,
    ) {
        if options.passive || (options.durable && !options.exclusive && !options.auto_delete) {
            return;
        }
        let mut transient = self.transient.lock().unwrap_or_else(|p| p.into_inner());
        transient.insert(name.to_string(), (options, args));
    }

    /// Forgets a queue deleted through this connection.
    pub(crate) fn forget_queue(&self, name: &str) {
        let mut transient = self.transient.lock().unwrap_or_else(|p| p.into_inner());
        transient.remove(name);
    }

    /// How a queue that a lost connection takes away was declared, if it was, through this
    /// connection. A consumer declares it again on its own channel before consuming: lapin
    /// recovers channels one by one in no set order, so the consumer's channel may come back
    /// before the channel the queue was declared on, and its consume would fail (404) and stop
    /// the recovery of every other channel.
    pub(crate) fn transient_queue(&self, name: &str) -> Option<(QueueDeclareOptions, FieldTable)> {
        let transient = self.transient.lock().unwrap_or_else(|p| p.into_inner());
        transient.get(name).cloned()
    }

    /// The channel replies are published on (confirm mode), opened or reopened as needed.
    pub(crate) fn reply_channel(&self) -> Result<Channel> {
        self.ensure_usable("reply")?;
        let mut slot = self.reply_channel.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(channel) = slot.as_ref() {
            if self.channel_usable(channel) {
                return Ok(channel.clone());
            }
        }
        let channel = self.open_confirm_channel("publish replies")?;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    /// Waits for the connection's state to change (see `state_changes.rs`), at most `limit`
    /// and never longer than a short slice: a change just before the call goes unseen here,
    /// so the caller rechecks the state after each wait.
    pub(crate) fn wait_for_change(&self, limit: Duration) {
        let seen = self.attempts.changes.seen();
        self.attempts.changes.wait(seen, limit.min(STATE_RECHECK));
    }

    /// The settlements of this connection that may not be written yet.
    pub(crate) fn settlements(&self) -> &Arc<Unwritten> {
        &self.settlements
    }

    /// The connection's readiness signal, made on first use: `what` names the caller's purpose
    /// in the error a closed, lost or inherited connection gives.
    pub(crate) fn readiness(&self, what: &str) -> Result<Arc<Readiness>> {
        self.ensure_open(what)?;
        if let Some(readiness) = self.readiness.get() {
            return Ok(readiness.clone());
        }
        let made = Readiness::new()?;
        Ok(self.readiness.get_or_init(|| made).clone())
    }

    /// Whether the broker has blocked this connection (connection.blocked, a resource alarm).
    pub(crate) fn blocked(&self) -> bool {
        self.inner.status().blocked()
    }

    /// Negotiated maximum frame size.
    pub(crate) fn frame_max(&self) -> u32 {
        self.inner.configuration().frame_max()
    }

    pub(crate) fn close(&self) -> Result<()> {
        self.close_within(CLOSE_TIMEOUT)
    }

    /// Request end on a pooled connection: its unwritten acks are flushed, and the exclusive
    /// queues the request declared are deleted. They belong to the connection, not the request, so each request would
    /// otherwise leave one more behind on a connection that lives as long as the worker.
    pub(crate) fn end_request(&self) {
        // The request's last acks (Connection::get) are written before the next one starts.
        if self.settlements.any() && self.is_connected() {
            let _ = self.settlements.flush(COMMAND_TIMEOUT);
        }
        let exclusive: Vec<String> = {
            let transient = self.transient.lock().unwrap_or_else(|p| p.into_inner());
            transient
                .iter()
                .filter(|(_, (options, _))| options.exclusive)
                .map(|(name, _)| name.clone())
                .collect()
        };
        if exclusive.is_empty() || !self.is_connected() {
            return;
        }
        let channel = match self.idle.take_command() {
            Some(channel) => channel,
            None => match self.open_channel("delete the request's exclusive queues") {
                Ok(channel) => channel,
                Err(_) => return,
            },
        };
        for name in exclusive {
            let context = format!("delete exclusive queue '{name}' on {}", self.endpoint());
            let options = lapin::options::QueueDeleteOptions::default();
            let deleted = runtime::command(
                channel.queue_delete(name.as_str().into(), options),
                COMMAND_TIMEOUT,
                &context,
            );
            if deleted.is_ok() {
                self.forget_queue(&name);
            }
        }
        if let Some(channel) = self.idle.keep_command(channel) {
            self.close_channel(&channel, "command");
        }
    }

    /// Closes the connection, waiting at most `limit` for the broker's close-ok.
    pub(crate) fn close_within(&self, limit: Duration) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if let Some(readiness) = self.readiness.get() {
            readiness.close();
        }
        if !self.is_own() {
            return Ok(());
        }
        // A recovery under way gives up: its next attempt fails at once.
        self.attempts.abandon();
        if !self.inner.status().connected() {
            return Ok(());
        }
        let context = format!("close the connection to {}", self.endpoint());
        runtime::command(self.inner.close(200, "bye".into()), limit, &context)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if !self.is_own() {
            // Inherited through fork(): the parent still uses this socket.
            return;
        }
        let _ = self.close();
        // SAFETY: dropped exactly once, here, and never used again.
        unsafe {
            ManuallyDrop::drop(&mut self.reply_channel);
            ManuallyDrop::drop(&mut self.idle);
            ManuallyDrop::drop(&mut self.inner);
        }
    }
}
