//! One AMQP connection to the first broker of a list that answers, and the channel that
//! carries its topology commands. Recovery walks the same list (cluster failover).

use crate::core::consumer::{Consumer, ConsumerOptions};
use crate::core::error::{Error, ErrorKind, Result};
use crate::core::producer::{Producer, ProducerOptions};
use crate::core::rpc::RpcClient;
use crate::core::runtime;
use crate::core::transport::{CheckedKit, CheckedStream, PoisonLog};
use crate::core::uri::{self, Endpoint};
use lapin::options::QueueDeclareOptions;
use lapin::tcp::{AMQPUriTcpExt, AsyncTcpStream, OwnedIdentity, OwnedTLSConfig};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{Channel, ConnectionProperties};
use std::collections::HashMap;
use std::io;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// How long a single broker command (declare, bind, delete...) may take before the caller
/// gets a `TimeoutException` instead of a hang.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Recovery: reconnection attempts, each after an exponential, jittered delay between these.
const RECOVERY_ATTEMPTS: usize = 10;
const RECOVERY_MIN_DELAY: Duration = Duration::from_millis(200);
const RECOVERY_MAX_DELAY: Duration = Duration::from_secs(5);
/// Longest wait for a recovery under way: the attempts' delays (31 s, up to twice that with
/// jitter) plus their connect timeouts. Only a guard: lapin gives up first.
const RECOVERY_WAIT: Duration = Duration::from_secs(90);

/// How long `close()` waits for confirms and for the broker's close-ok: a broker still
/// working through a burst of persistent messages answers only after them.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// TLS settings for `amqps://` URIs.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// PEM file of CA certificates trusted besides the system's.
    pub cafile: Option<String>,
    /// PEM client certificate for mutual TLS.
    pub certfile: Option<String>,
    /// PEM (PKCS#8) private key of the client certificate.
    pub keyfile: Option<String>,
    /// Verify the broker's certificate and host name.
    pub verify: bool,
}

/// Settings of a connection, as the PHP `Connection` options give them.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Heartbeat interval asked of the broker, in seconds; 0 turns heartbeats off.
    pub heartbeat: u16,
    /// Bound on TCP connect + TLS + AMQP handshake, per broker tried.
    pub connect_timeout: Duration,
    /// Connection name shown in the management UI.
    pub name: Option<String>,
    /// Automatic recovery after a lost connection.
    pub reconnect: bool,
    /// TLS settings, used for `amqps://` URIs.
    pub tls: TlsOptions,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            heartbeat: 30,
            connect_timeout: Duration::from_secs(5),
            name: None,
            reconnect: true,
            tls: TlsOptions {
                verify: true,
                ..TlsOptions::default()
            },
        }
    }
}

/// The AMQP connection itself, shared by a `Connection` and the producers made from it, so
/// that a producer outliving its PHP `Connection` object keeps working.
pub(crate) struct Link {
    /// Producers made from this connection, so `close()` can wait for their confirms.
    producers: Mutex<Vec<Weak<Mutex<Producer>>>>,
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
    reconnect: bool,
    /// lapin's connection attempts, to stop recovery once the user closed.
    attempts: Arc<Attempts>,
    /// Queues declared through this connection that a lost connection (or a broker restart)
    /// takes away: exclusive, auto-delete or not durable. See `Link::transient_queue`.
    transient: Mutex<HashMap<String, (QueueDeclareOptions, FieldTable)>>,
    /// The channel `Message::reply()` publishes on, opened on first use. Leaked in a forked
    /// child, like `inner`.
    reply_channel: ManuallyDrop<Mutex<Option<Channel>>>,
}

impl Link {
    /// `amqp://user@host:port/vhost` of the broker the connection is on (it changes when
    /// recovery fails over to another one), safe to print.
    pub(crate) fn endpoint(&self) -> &str {
        let current = self.attempts.current.load(Ordering::Acquire);
        self.endpoints
            .get(current)
            .or_else(|| self.endpoints.first())
            .map_or("", |e| e.display.as_str())
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
        if !self.inner.status().connected() && !self.await_recovery() {
            return Err(Error::connection(format!(
                "{what} on {}: the connection is lost{}",
                self.endpoint(),
                if self.reconnect {
                    format!(" and could not be recovered ({RECOVERY_ATTEMPTS} attempts)")
                } else {
                    " (reconnect is off)".to_string()
                }
            )));
        }
        Ok(())
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
            // Once the connection is back, a channel lapin is not reopening is closed for
            // good: the broker closed it (404...), and lapin does not reopen those.
            if !self.await_recovery()
                || !channel.status().reconnecting()
                || std::time::Instant::now() >= deadline
            {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
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
            let status = self.inner.status();
            if status.connected() {
                return true;
            }
            let under_way =
                (status.reconnecting() || status.connecting()) && !self.attempts.spent();
            if !under_way || std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Opens a new channel; `what` names the purpose in errors.
    pub(crate) fn open_channel(&self, what: &str) -> Result<Channel> {
        self.ensure_usable(what)?;
        let context = format!("open a channel to {what} on {}", self.endpoint());
        runtime::block_on(self.inner.create_channel(), COMMAND_TIMEOUT, &context)?
            .map_err(|e| Error::from_lapin(&e, &context))
    }

    /// Opens a new channel in publisher-confirm mode; `what` names the purpose in errors.
    pub(crate) fn open_confirm_channel(&self, what: &str) -> Result<Channel> {
        let channel = self.open_channel(what)?;
        let context = format!("enable publisher confirms on {}", self.endpoint());
        runtime::block_on(
            channel.confirm_select(lapin::options::ConfirmSelectOptions::default()),
            COMMAND_TIMEOUT,
            &context,
        )?
        .map_err(|e| Error::from_lapin(&e, &context))?;
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

    /// Whether the broker has blocked this connection (connection.blocked, a resource alarm).
    pub(crate) fn blocked(&self) -> bool {
        self.inner.status().blocked()
    }

    /// Negotiated maximum frame size.
    pub(crate) fn frame_max(&self) -> u32 {
        self.inner.configuration().frame_max()
    }

    fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
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
        runtime::block_on(self.inner.close(200, "bye".into()), CLOSE_TIMEOUT, &context)?
            .map_err(|e| Error::from_lapin(&e, &context))
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
            ManuallyDrop::drop(&mut self.inner);
        }
    }
}

/// A live connection owned by the PHP thread.
pub struct Connection {
    link: Arc<Link>,
    // Leaked rather than dropped in a forked child, like the link.
    channel: ManuallyDrop<Option<Channel>>,
    /// The RPC channel, opened by the first `rpc()`; leaked in a forked child too.
    rpc: ManuallyDrop<Option<RpcClient>>,
}

fn read_file(path: &str, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::invalid_argument(format!("cannot read TLS {what} '{path}': {e}")))
}

fn tls_config(tls: &TlsOptions) -> Result<OwnedTLSConfig> {
    if !tls.verify {
        return Err(Error::invalid_argument(
            "tls option 'verify' => false is not supported: give the broker's CA with 'cafile' instead",
        ));
    }
    let cert_chain = match &tls.cafile {
        Some(path) => Some(
            String::from_utf8(read_file(path, "cafile")?)
                .map_err(|_| Error::invalid_argument(format!("TLS cafile '{path}' is not PEM")))?,
        ),
        None => None,
    };
    let identity = match (&tls.certfile, &tls.keyfile) {
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: read_file(cert, "certfile")?,
            key: read_file(key, "keyfile")?,
        }),
        (None, None) => None,
        _ => {
            return Err(Error::invalid_argument(
                "tls options 'certfile' and 'keyfile' go together: give both or neither",
            ))
        }
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

/// The URI lapin connects to for `endpoint`, with the options that travel in its query.
fn prepared(endpoint: &Endpoint, options: &ConnectOptions) -> AMQPUri {
    let mut uri = endpoint.uri.clone();
    uri.query.heartbeat = Some(options.heartbeat);
    uri.query.connection_timeout = Some(options.connect_timeout.as_millis() as u64);
    uri
}

/// Whether a recovery may move the connection from `from` to `to`: lapin logs in again with
/// the first broker's user, password and vhost, so only brokers given with the same qualify.
fn same_login(from: &AMQPUri, to: &AMQPUri) -> bool {
    from.authority.userinfo.username == to.authority.userinfo.username
        && from.authority.userinfo.password == to.authority.userinfo.password
        && from.vhost == to.vhost
}

/// Opens the socket of one recovery attempt: the brokers of the list in turn, starting with
/// the one after the broker last used (it is the likeliest to be down), until one answers.
async fn reconnect_socket(
    endpoints: &[Endpoint],
    options: &ConnectOptions,
    tls: &OwnedTLSConfig,
    kit: &CheckedKit,
    attempts: &Attempts,
) -> lapin::Result<AsyncTcpStream<CheckedStream>> {
    let outcome = walk_endpoints(endpoints, options, tls, kit, attempts).await;
    if outcome.is_ok() {
        attempts.recovery_failures.store(0, Ordering::Release);
    } else {
        attempts.recovery_failures.fetch_add(1, Ordering::AcqRel);
    }
    outcome
}

async fn walk_endpoints(
    endpoints: &[Endpoint],
    options: &ConnectOptions,
    tls: &OwnedTLSConfig,
    kit: &CheckedKit,
    attempts: &Attempts,
) -> lapin::Result<AsyncTcpStream<CheckedStream>> {
    let last = attempts.current.load(Ordering::Acquire);
    let base = prepared(&endpoints[last.min(endpoints.len() - 1)], options);
    let mut failure = io::Error::other("no broker of the list shares the first one's login");
    for step in 1..=endpoints.len() {
        let index = (last + step) % endpoints.len();
        let uri = prepared(&endpoints[index], options);
        if !same_login(&base, &uri) {
            continue;
        }
        let reactor = kit.tokio();
        let connect = uri.connect_with_config_async(tls.as_ref(), &reactor);
        match tokio::time::timeout(options.connect_timeout, connect).await {
            Ok(Ok(stream)) => {
                attempts.current.store(index, Ordering::Release);
                return Ok(kit.check(stream));
            }
            Ok(Err(err)) => failure = err,
            Err(_) => {
                failure = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer from {} in time", endpoints[index].display),
                )
            }
        }
    }
    Err(failure.into())
}

async fn connect_one(
    endpoints: Arc<Vec<Endpoint>>,
    options: ConnectOptions,
    tls: OwnedTLSConfig,
    handle: tokio::runtime::Handle,
    poison: Arc<PoisonLog>,
    attempts: Arc<Attempts>,
) -> Result<lapin::Connection> {
    let index = attempts.current.load(Ordering::Acquire);
    let display = endpoints[index].display.clone();
    let uri = prepared(&endpoints[index], &options);
    let mut props = ConnectionProperties::default()
        .with_client_property("product".into(), "amqp_rs".into())
        .with_client_property("version".into(), env!("CARGO_PKG_VERSION").into());
    if let Some(name) = &options.name {
        props = props.with_connection_name(name.as_str().into());
    }
    if options.reconnect {
        // lapin reconnects, then reopens channels and replays what was declared through them
        // (queues, exchanges, bindings, qos, confirm mode, consumers).
        props = props.enable_auto_recover().configure_backoff(|backoff| {
            backoff
                .with_jitter()
                .with_min_delay(RECOVERY_MIN_DELAY)
                .with_max_delay(RECOVERY_MAX_DELAY)
                .with_max_times(RECOVERY_ATTEMPTS)
        });
    }
    let kit = CheckedKit::new(handle, poison);
    let runtime = async_rs::Runtime::new(kit.clone());
    let first = attempts.clone();
    let connect_timeout = options.connect_timeout;
    // lapin calls this again for each reconnection, so the check is on every socket it uses.
    let open = async move |uri: AMQPUri, _| {
        if attempts.abandoned.load(Ordering::Acquire) {
            return Err(io::Error::other("connection attempt abandoned").into());
        }
        if attempts.established.load(Ordering::Acquire) {
            return reconnect_socket(&endpoints, &options, &tls, &kit, &attempts).await;
        }
        match uri
            .connect_with_config_async(tls.as_ref(), &kit.tokio())
            .await
        {
            // Closed by the user while this attempt was under way: no ghost connection.
            Ok(_) if attempts.abandoned.load(Ordering::Acquire) => {
                Err(io::Error::other("connection attempt abandoned").into())
            }
            Ok(stream) => Ok(kit.check(stream)),
            Err(err) => {
                attempts.failed(&err);
                Err(err.into())
            }
        }
    };
    let attempt = lapin::Connection::connector(uri, runtime, open, props);
    let outcome = tokio::select! {
        attempt = tokio::time::timeout(connect_timeout, attempt) => match attempt {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(describe_connect_error(&e, &display)),
            // A connect that times out is still a failure to connect: ConnectionException.
            Err(_) => Err(Error::connection(format!(
                "cannot connect to {display}: no AMQP handshake within {:.1} s (connect_timeout)",
                connect_timeout.as_secs_f64()
            ))),
        },
        err = first.first_failure() => Err(Error::connection(format!(
            "cannot connect to {display}: {err}"
        ))),
    };
    match outcome {
        Ok(conn) => {
            first.established.store(true, Ordering::Release);
            Ok(conn)
        }
        Err(err) => {
            first.abandon();
            Err(err)
        }
    }
}

/// The socket connections lapin makes for one `Connection`, the first and its recoveries.
///
/// The first must fail at once, not be retried: with recovery on, lapin retries every failed
/// attempt, the first one too (a refused port or a bad certificate would take the whole
/// backoff to be reported). Its first failure is reported right away. Once abandoned (that
/// first failure, or a close by the user), every attempt lapin still makes fails at once, so
/// that a connection closed during an outage does not come back by itself.
#[derive(Default)]
pub(crate) struct Attempts {
    /// Index in the list of the broker the connection is on (or is being opened to).
    current: AtomicUsize,
    /// Recovery attempts in a row that found no broker to connect to.
    recovery_failures: AtomicUsize,
    established: AtomicBool,
    abandoned: AtomicBool,
    failure: Mutex<Option<String>>,
    notify: tokio::sync::Notify,
}

impl Attempts {
    /// Whether lapin has spent its attempts: it then stops, but leaves the connection's
    /// status at "reconnecting" for good.
    fn spent(&self) -> bool {
        // The first attempt, then one per retry.
        self.recovery_failures.load(Ordering::Acquire) > RECOVERY_ATTEMPTS
    }

    fn abandon(&self) {
        self.abandoned.store(true, Ordering::Release);
    }

    fn failed(&self, err: &io::Error) {
        if self.established.load(Ordering::Acquire) {
            return;
        }
        if let Ok(mut failure) = self.failure.lock() {
            failure.get_or_insert_with(|| err.to_string());
        }
        self.notify.notify_one();
    }

    async fn first_failure(&self) -> String {
        loop {
            let notified = self.notify.notified();
            if let Some(failure) = self.failure.lock().ok().and_then(|f| f.clone()) {
                return failure;
            }
            notified.await;
        }
    }
}

fn describe_connect_error(err: &lapin::Error, display: &str) -> Error {
    if let lapin::ErrorKind::ProtocolError(amqp) = err.kind() {
        let text = amqp.get_message().as_str();
        let why = match amqp.get_id() {
            403 => "access refused (check user name and password)",
            530 => "not allowed (does the vhost exist, may this user use it?)",
            _ => "refused by the broker",
        };
        return Error::connection(format!(
            "cannot connect to {display}: {why}: {} {text}",
            amqp.get_id()
        ));
    }
    Error::connection(format!("cannot connect to {display}: {err}"))
}

impl Connection {
    /// Connects to the first URI of `uris` that accepts us, in order.
    pub fn open(uris: &[String], options: &ConnectOptions) -> Result<Connection> {
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
            // Spawned, so lapin's io-loop thread is started from (and inherits the scheduling
            // policy of) a runtime worker, not the PHP thread.
            let poison = Arc::new(PoisonLog::default());
            let attempts = Arc::new(Attempts::default());
            attempts.current.store(index, Ordering::Release);
            let attempt = handle.spawn(connect_one(
                endpoints.clone(),
                options.clone(),
                tls.clone(),
                handle.clone(),
                poison.clone(),
                attempts.clone(),
            ));
            // The inner timeout bounds the attempt; this outer one only guards against a
            // runtime that stopped answering.
            let limit = options.connect_timeout + Duration::from_secs(1);
            match runtime::block_on(attempt, limit, &format!("connect to {}", endpoint.display))
                .and_then(|joined| {
                    joined.unwrap_or_else(|e| {
                        Err(Error::connection(format!(
                            "cannot connect to {}: {e}",
                            endpoint.display
                        )))
                    })
                }) {
                Ok(inner) => {
                    let link = Link {
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
                    };
                    return Ok(Connection {
                        link: Arc::new(link),
                        channel: ManuallyDrop::new(None),
                        rpc: ManuallyDrop::new(None),
                    });
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
        self.link.is_connected()
    }

    /// The error to give for any use of a connection that cannot serve.
    pub fn ensure_usable(&self, what: &str) -> Result<()> {
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
        let channel = self.link.open_channel("send commands")?;
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
        let context = format!("{what} on {}", self.endpoint());
        let channel = self.command_channel(&context)?;
        runtime::block_on(f(channel), COMMAND_TIMEOUT, &context)?
            .map_err(|e| Error::from_lapin(&e, &context))
    }

    /// A producer on its own channel; it shares this connection and keeps it open.
    pub fn producer(&mut self, options: ProducerOptions) -> Result<Arc<Mutex<Producer>>> {
        let producer = Arc::new(Mutex::new(Producer::new(self.link.clone(), options)?));
        let mut producers = self
            .link
            .producers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        producers.retain(|p| p.strong_count() > 0);
        producers.push(Arc::downgrade(&producer));
        Ok(producer)
    }

    /// A consumer of `queues` on its own channel; it shares this connection and keeps it open.
    pub fn consumer(&mut self, queues: &[String], options: &ConsumerOptions) -> Result<Consumer> {
        Consumer::new(self.link.clone(), queues, options)
    }

    /// Waits (bounded) for the confirms of every producer made from this connection, then
    /// closes it for all of them; idempotent. Messages that were nacked, returned or never
    /// confirmed come back as one `Publish` error, after the connection is closed.
    pub fn close(&mut self) -> Result<()> {
        let producers: Vec<_> = {
            let list = self
                .link
                .producers
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            list.iter().filter_map(Weak::upgrade).collect()
        };
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
        let _ = crate::core::consumer::flush_settlements(CLOSE_TIMEOUT);
        self.link.close()?;
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

    pub(crate) const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

    pub(crate) fn connect() -> Connection {
        Connection::open(&[BROKER.to_string()], &ConnectOptions::default()).expect("broker up")
    }

    #[test]
    fn connects_reports_and_closes_idempotently() {
        let mut conn = connect();
        assert!(conn.is_connected());
        assert_eq!(conn.endpoint(), "amqp://guest@127.0.0.1:5672/%2F");
        assert!(conn.frame_max() > 4096);
        conn.close().expect("close");
        assert!(!conn.is_connected());
        conn.close().expect("second close is a no-op");
        let err = conn.ensure_usable("declare").expect_err("closed");
        assert_eq!(err.kind(), ErrorKind::Connection);
    }

    #[test]
    fn io_loop_threads_run_as_batch_and_do_not_preempt_the_php_thread() {
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
            assert_eq!(policy, libc::SCHED_BATCH, "io-loop thread {tid}");
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
            BROKER.to_string(),
        ];
        let conn = Connection::open(&uris, &ConnectOptions::default()).expect("second works");
        assert!(conn.endpoint().contains(":5672"));
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
        let uris = ["amqp://guest:not-the-password@127.0.0.1:5672/%2f".to_string()];
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

    #[test]
    fn recovery_walks_the_list_from_the_broker_after_the_last_one() {
        let endpoints: Vec<Endpoint> = [
            BROKER,
            "amqp://guest:guest@127.0.0.1:1/%2f",
            "amqp://someone-else:pw@127.0.0.1:5672/%2f",
        ]
        .iter()
        .map(|u| uri::parse(u).expect("valid"))
        .collect();
        let (handle, _) = runtime::current().expect("runtime");
        let kit = CheckedKit::new(handle.clone(), Arc::new(PoisonLog::default()));
        let options = ConnectOptions::default();
        let tls = OwnedTLSConfig::default();
        let attempts = Attempts::default();
        // Last on the broker: the refused port is tried next, the other login is skipped,
        // and the walk comes round to the broker again.
        let reconnect = || {
            handle
                .block_on(reconnect_socket(
                    &endpoints, &options, &tls, &kit, &attempts,
                ))
                .is_ok()
        };
        assert!(reconnect());
        assert_eq!(attempts.current.load(Ordering::Acquire), 0);
        let down = [endpoints[1].clone()];
        let failed = handle.block_on(reconnect_socket(&down, &options, &tls, &kit, &attempts));
        assert!(
            failed.is_err(),
            "a list with no broker up fails the attempt"
        );
    }
}
