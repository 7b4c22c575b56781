//! The kit a connect runs on: tokio's, but for name resolution. amq-protocol-tcp resolves
//! every broker's host through the kit's `spawn_blocking`, which on tokio starts a
//! blocking-pool thread (kept for 10 s) and hands the lookup over to it, an IP address
//! included: one more thread in every PHP process and one more hand-off per connect. An IP
//! address needs no lookup, so for one that work runs as an ordinary task instead; a host
//! name still gets its thread, as a DNS query may take seconds.

use async_rs::traits::{Executor, Reactor, RuntimeKit};
use async_rs::util::Task;
use async_rs::Tokio;
use futures_core::Stream;
use futures_io::{AsyncRead, AsyncWrite};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

/// Tokio's kit, with lookups of IP addresses run in place.
#[derive(Clone, Debug)]
pub(crate) struct ConnectKit {
    tokio: Tokio,
    /// The host is an IP address: resolving it cannot block.
    literal: bool,
}

impl ConnectKit {
    /// The kit to connect to `host` with.
    pub(crate) fn runtime(tokio: Tokio, host: &str) -> async_rs::Runtime<Self> {
        async_rs::Runtime::new(Self {
            tokio,
            literal: is_ip_address(host),
        })
    }
}

/// Whether `host` (as a URI gives it: IPv6 in brackets) is an IP address, not a name.
fn is_ip_address(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().is_ok()
}

impl RuntimeKit for ConnectKit {}

impl Executor for ConnectKit {
    type Task<T: Send + 'static> = <Tokio as Executor>::Task<T>;

    fn block_on<T, F: Future<Output = T>>(&self, f: F) -> T {
        self.tokio.block_on(f)
    }

    fn spawn<T: Send + 'static, F: Future<Output = T> + Send + 'static>(
        &self,
        f: F,
    ) -> Task<Self::Task<T>> {
        self.tokio.spawn(f)
    }

    fn spawn_blocking<T: Send + 'static, F: FnOnce() -> T + Send + 'static>(
        &self,
        f: F,
    ) -> Task<Self::Task<T>> {
        if self.literal {
            self.tokio.spawn(async move { f() })
        } else {
            self.tokio.spawn_blocking(f)
        }
    }
}

impl Reactor for ConnectKit {
    type TcpStream = <Tokio as Reactor>::TcpStream;
    type Sleep = <Tokio as Reactor>::Sleep;

    // async-rs's AsSysFd is AsFd + AsRawFd under a name it does not export.
    fn register<H: io::Read + io::Write + AsFd + AsRawFd + Send + 'static>(
        &self,
        socket: H,
    ) -> io::Result<impl AsyncRead + AsyncWrite + Send + Unpin + 'static> {
        self.tokio.register(socket)
    }

    fn sleep(&self, dur: Duration) -> Self::Sleep {
        self.tokio.sleep(dur)
    }

    fn interval(&self, dur: Duration) -> impl Stream<Item = Instant> + Send + 'static {
        self.tokio.interval(dur)
    }

    fn tcp_connect_addr(
        &self,
        addr: SocketAddr,
    ) -> impl Future<Output = io::Result<Self::TcpStream>> + Send + 'static {
        self.tokio.tcp_connect_addr(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ip_addresses_skip_the_blocking_pool() {
        assert!(is_ip_address("127.0.0.1"));
        assert!(is_ip_address("[::1]"));
        assert!(!is_ip_address("localhost"));
        assert!(!is_ip_address("rabbit.example"));
    }
}
