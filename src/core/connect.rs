//! The first connection to a broker: lapin's connector, handed a socket hook that puts our
//! check (`transport.rs`) on every socket, reports the first attempt's failure at once instead
//! of through lapin's retries, and walks the broker list on each recovery (`recovery.rs`).

use crate::core::connect_options::{prepared, ConnectOptions};
use crate::core::error::{Error, Result};
use crate::core::poison::PoisonLog;
use crate::core::recovery::{
    reconnect_socket, Attempts, RECOVERY_ATTEMPTS, RECOVERY_MAX_DELAY, RECOVERY_MIN_DELAY,
};
use crate::core::transport::CheckedKit;
use crate::core::uri::Endpoint;
use lapin::tcp::{AMQPUriTcpExt, OwnedTLSConfig};
use lapin::uri::AMQPUri;
use lapin::ConnectionProperties;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub(crate) async fn connect_one(
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
    if let Some(name) = connection_name(&options) {
        props = props.with_connection_name(name.into());
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
            .connect_with_config_async(tls.as_ref(), &kit.connector(&uri.authority.host))
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

/// The name the broker shows. A persistent connection's carries the pid, so that the
/// connections of a php-fpm pool's workers can be told apart.
fn connection_name(options: &ConnectOptions) -> Option<String> {
    match (&options.name, options.persistent) {
        (name, false) => name.clone(),
        (Some(name), true) => Some(format!("{name} (pid {})", std::process::id())),
        (None, true) => Some(format!("amqp_rs persistent (pid {})", std::process::id())),
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
