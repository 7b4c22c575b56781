//! Recovery across a list of brokers (cluster failover): lapin reconnects and replays the
//! topology, but to one URI only; each of its attempts here walks the list instead, from the
//! broker after the one last used, and counts what lapin does not report (spent attempts).

use crate::core::connect_options::{prepared, ConnectOptions};
use crate::core::state_changes::StateChanges;
use crate::core::transport::{CheckedKit, CheckedStream};
use crate::core::uri::Endpoint;
use lapin::tcp::{AMQPUriTcpExt, AsyncTcpStream, OwnedTLSConfig};
use lapin::uri::AMQPUri;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Recovery: reconnection attempts, each after an exponential, jittered delay between these.
pub(crate) const RECOVERY_ATTEMPTS: usize = 10;
pub(crate) const RECOVERY_MIN_DELAY: Duration = Duration::from_millis(200);
pub(crate) const RECOVERY_MAX_DELAY: Duration = Duration::from_secs(5);
/// Longest wait for a recovery under way: the attempts' delays (31 s, up to twice that with
/// jitter) plus their connect timeouts. Only a guard: lapin gives up first.
pub(crate) const RECOVERY_WAIT: Duration = Duration::from_secs(90);

/// Whether a recovery may move the connection from `from` to `to`: lapin logs in again with
/// the first broker's user, password and vhost, so only brokers given with the same qualify.
fn same_login(from: &AMQPUri, to: &AMQPUri) -> bool {
    from.authority.userinfo.username == to.authority.userinfo.username
        && from.authority.userinfo.password == to.authority.userinfo.password
        && from.vhost == to.vhost
}

/// Opens the socket of one recovery attempt: the brokers of the list in turn, starting with
/// the one after the broker last used (it is the likeliest to be down), until one answers.
pub(crate) async fn reconnect_socket(
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
        // A waiter rechecks whether lapin has spent its attempts.
        attempts.changes.changed();
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
        let reactor = kit.connector(&uri.authority.host);
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
    pub(crate) current: AtomicUsize,
    /// Recovery attempts in a row that found no broker to connect to.
    pub(crate) recovery_failures: AtomicUsize,
    pub(crate) established: AtomicBool,
    pub(crate) abandoned: AtomicBool,
    pub(crate) failure: Mutex<Option<String>>,
    pub(crate) notify: tokio::sync::Notify,
    /// Wakes the threads waiting for the connection to come back (or for recovery to fail).
    pub(crate) changes: Arc<StateChanges>,
}

impl Attempts {
    /// Whether lapin has spent its attempts: it then stops, but leaves the connection's
    /// status at "reconnecting" for good.
    pub(crate) fn spent(&self) -> bool {
        // The first attempt, then one per retry.
        self.recovery_failures.load(Ordering::Acquire) > RECOVERY_ATTEMPTS
    }

    pub(crate) fn abandon(&self) {
        self.abandoned.store(true, Ordering::Release);
    }

    pub(crate) fn failed(&self, err: &io::Error) {
        if self.established.load(Ordering::Acquire) {
            return;
        }
        if let Ok(mut failure) = self.failure.lock() {
            failure.get_or_insert_with(|| err.to_string());
        }
        self.notify.notify_one();
    }

    pub(crate) async fn first_failure(&self) -> String {
        loop {
            let notified = self.notify.notified();
            if let Some(failure) = self.failure.lock().ok().and_then(|f| f.clone()) {
                return failure;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::poison::PoisonLog;
    use crate::core::runtime;
    use crate::core::testing;
    use crate::core::uri;
    use std::sync::Arc;

    #[test]
    fn recovery_walks_the_list_from_the_broker_after_the_last_one() {
        let endpoints: Vec<Endpoint> = [
            testing::broker(),
            "amqp://guest:guest@127.0.0.1:1/%2f".to_string(),
            testing::broker_with_login("someone-else", "pw"),
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
