//! The socket under lapin: tokio's TCP (or TLS) stream behind a check of what the broker sends
//! before lapin parses it (see `poison.rs` for why), and the async-rs kit that hands lapin
//! that stream for the first connection and every recovery.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use async_rs::traits::{Executor, Reactor, RuntimeKit};
use async_rs::util::Task;
use async_rs::Tokio;
use futures_core::Stream;
use futures_io::{AsyncRead, AsyncWrite};
use lapin::tcp::AsyncTcpStream;

use crate::core::poison::{PoisonLog, Scanner};
use crate::core::resolve::ConnectKit;

/// A stream whose incoming frames go through a [`Scanner`] before the reader sees them.
#[derive(Debug)]
pub struct Checked<S> {
    inner: S,
    scanner: Scanner,
    buf: Vec<u8>,
    /// `buf[start..ready]` is checked and waits for the reader; `buf[ready..]` waits for the
    /// rest of its frame.
    start: usize,
    ready: usize,
    eof: bool,
    /// The socket is gone (end of stream, or a hard error): writes are discarded.
    write_dead: bool,
    /// A write error, reported by the next read (see `write_failed`).
    read_err: Option<(io::ErrorKind, String)>,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
}

/// An error that ends the socket, unlike a would-block or an interrupted call.
fn fatal(err: &io::Error) -> bool {
    !matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Keeps the waker of the latest poll, to wake that side when the other one fails.
fn remember(slot: &mut Option<Waker>, cx: &Context<'_>) {
    if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        *slot = Some(cx.waker().clone());
    }
}

/// How much is asked of the socket at a time.
const READ_CHUNK: usize = 64 * 1024;

impl<S> Checked<S> {
    fn new(inner: S, log: Arc<PoisonLog>) -> Self {
        Self {
            inner,
            scanner: Scanner::new(log),
            buf: Vec::new(),
            start: 0,
            ready: 0,
            eof: false,
            write_dead: false,
            read_err: None,
            read_waker: None,
            write_waker: None,
        }
    }

    fn hand_out(&mut self, out: &mut [u8], end: usize) -> usize {
        let n = (end - self.start).min(out.len());
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        n
    }

    /// The read side saw the end or an error: lapin stops polling writes then (the same
    /// wedge as in `write_failed`), so it is woken to write once more, into the void, which
    /// releases the frames it serialized and still counts as in flight.
    fn read_side_dead(&mut self) {
        if !self.write_dead {
            self.write_dead = true;
            if let Some(w) = self.write_waker.take() {
                w.wake();
            }
        }
    }

    /// lapin 4.12 wedges on a write error (seen when a broker restarts under publishes):
    /// its io-loop then stops polling the socket either way, but keeps the frames it had
    /// serialized as in flight, and goes on waiting while any is, for an event that no poll
    /// is left to bring; it never reconnects. So the write is reported done (the bytes go
    /// nowhere, the connection is dead) and the error is handed to the next read, whose
    /// waker is woken so that the read comes.
    fn write_failed(&mut self, err: &io::Error) {
        self.write_dead = true;
        if self.read_err.is_none() {
            self.read_err = Some((err.kind(), err.to_string()));
            if let Some(w) = self.read_waker.take() {
                w.wake();
            }
        }
    }

    fn write_result(
        &mut self,
        res: Poll<io::Result<usize>>,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        match res {
            Poll::Ready(Err(err)) if fatal(&err) => {
                self.write_failed(&err);
                Poll::Ready(Ok(len))
            }
            other => other,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Checked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        remember(&mut this.read_waker, cx);
        let res = this.poll_read_inner(cx, out);
        match &res {
            Poll::Ready(Ok(0)) if !out.is_empty() => this.read_side_dead(),
            Poll::Ready(Err(err)) if fatal(err) => this.read_side_dead(),
            _ => {}
        }
        res
    }
}

impl<S: AsyncRead + Unpin> Checked<S> {
    /// The read itself: checked bytes first, then a pending write error, then the socket.
    fn poll_read_inner(&mut self, cx: &mut Context<'_>, out: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            if self.start < self.ready {
                let ready = self.ready;
                return Poll::Ready(Ok(self.hand_out(out, ready)));
            }
            if let Some((kind, msg)) = &self.read_err {
                return Poll::Ready(Err(io::Error::new(*kind, msg.clone())));
            }
            if self.eof {
                // What is left is an incomplete frame: let lapin see it and the end of stream.
                let end = self.buf.len();
                return Poll::Ready(Ok(self.hand_out(out, end)));
            }
            if self.buf.len() == self.ready {
                // Nothing held: read straight into the reader's buffer and check it there.
                self.buf.clear();
                self.start = 0;
                self.ready = 0;
                match Pin::new(&mut self.inner).poll_read(cx, out) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Ok(0)),
                    Poll::Ready(Ok(n)) => {
                        let checked = self.scanner.scan(&mut out[..n]);
                        // An incomplete frame at the end waits here for the rest.
                        self.buf.extend_from_slice(&out[checked..n]);
                        if checked > 0 {
                            return Poll::Ready(Ok(checked));
                        }
                        continue;
                    }
                    other => return other,
                }
            }
            // Everything before `ready` is handed out: keep only the incomplete frame.
            self.buf.drain(..self.ready);
            self.start = 0;
            self.ready = 0;
            let held = self.buf.len();
            self.buf.resize(held + READ_CHUNK, 0);
            let read = Pin::new(&mut self.inner).poll_read(cx, &mut self.buf[held..]);
            let got = match &read {
                Poll::Ready(Ok(n)) => *n,
                _ => 0,
            };
            self.buf.truncate(held + got);
            match read {
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(_)) => {
                    // The held bytes were scanned before, up to their incomplete frame, which
                    // the scanner starts from again now that more of it is here.
                    self.ready = self.scanner.scan(&mut self.buf);
                }
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Checked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        remember(&mut this.write_waker, cx);
        if this.write_dead {
            return Poll::Ready(Ok(buf.len()));
        }
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.write_result(res, buf.len())
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        remember(&mut this.write_waker, cx);
        let len = bufs.iter().map(|b| b.len()).sum();
        if this.write_dead {
            return Poll::Ready(Ok(len));
        }
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.write_result(res, len)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        remember(&mut this.write_waker, cx);
        if this.write_dead {
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(Err(err)) if fatal(&err) => {
                this.write_failed(&err);
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

/// The socket type lapin gets: tokio's (plain or TLS) behind the check.
pub type CheckedStream = Checked<AsyncTcpStream<<Tokio as Reactor>::TcpStream>>;

/// async-rs's tokio kit, but handing lapin a [`CheckedStream`].
#[derive(Clone, Debug)]
pub struct CheckedKit {
    tokio: Tokio,
    log: Arc<PoisonLog>,
}

impl CheckedKit {
    /// A kit on the extension's runtime, logging poisoned deliveries to `log`.
    pub(crate) fn new(handle: tokio::runtime::Handle, log: Arc<PoisonLog>) -> Self {
        Self {
            tokio: Tokio::default().with_handle(handle),
            log,
        }
    }

    /// The plain tokio kit (but for lookups, see `resolve.rs`), to open the socket to `host`
    /// (and TLS) with.
    pub(crate) fn connector(&self, host: &str) -> async_rs::Runtime<ConnectKit> {
        ConnectKit::runtime(self.tokio.clone(), host)
    }

    /// Puts the check in front of an open socket.
    pub(crate) fn check(
        &self,
        stream: AsyncTcpStream<<Tokio as Reactor>::TcpStream>,
    ) -> AsyncTcpStream<CheckedStream> {
        AsyncTcpStream::Plain(Checked::new(stream, self.log.clone()))
    }
}

impl RuntimeKit for CheckedKit {}

impl Executor for CheckedKit {
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
        self.tokio.spawn_blocking(f)
    }
}

impl Reactor for CheckedKit {
    type TcpStream = CheckedStream;
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
        let log = self.log.clone();
        let connect = self.tokio.tcp_connect_addr(addr);
        async move { Ok(Checked::new(AsyncTcpStream::Plain(connect.await?), log)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::poison::tests::{deliver, frame, header};
    use crate::core::poison::Scanner;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A socket that gives its bytes `chunk` at a time.
    struct Trickle {
        bytes: Vec<u8>,
        chunk: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            out: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let n = self.chunk.min(out.len()).min(self.bytes.len());
            out[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes.drain(..n);
            Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn the_stream_gives_the_same_checked_bytes_however_the_socket_splits_them() {
        let wire = [
            deliver(1, b"rk\xff"),
            header(b"\xfe", b"ok"),
            frame(3, 1, &[0xff; 300]),
            deliver(2, b"fine"),
            header(b"id", b"\xc3\x28"),
            frame(3, 1, b"body"),
        ]
        .concat();
        let mut expected = wire.clone();
        Scanner::new(Arc::new(PoisonLog::default())).scan(&mut expected);
        for chunk in [1, 5, 7, 30, 31, 100, 1000] {
            for out_size in [3, 64, 65536] {
                let log = Arc::new(PoisonLog::default());
                let inner = Trickle {
                    bytes: wire.clone(),
                    chunk,
                };
                let mut stream = Checked::new(inner, log.clone());
                let mut got = Vec::new();
                let mut out = vec![0; out_size];
                let mut cx = Context::from_waker(std::task::Waker::noop());
                loop {
                    match Pin::new(&mut stream).poll_read(&mut cx, &mut out) {
                        Poll::Ready(Ok(0)) => break,
                        Poll::Ready(Ok(n)) => got.extend_from_slice(&out[..n]),
                        other => panic!("{other:?}"),
                    }
                }
                assert_eq!(
                    got, expected,
                    "socket chunks of {chunk}, reads of {out_size}"
                );
                assert_eq!(log.take(1, 1), Some(vec!["routing key", "message_id"]));
                assert_eq!(log.take(1, 2), Some(vec!["header key"]));
            }
        }
    }

    /// A socket the peer has reset: reads wait, writes fail.
    struct Reset;

    impl AsyncRead for Reset {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Reset {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn a_failed_write_is_reported_by_the_next_read_and_wakes_the_reader() {
        let mut stream = Checked::new(Reset, Arc::new(PoisonLog::default()));
        let reader = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let read_waker = Waker::from(reader.clone());
        let mut read_cx = Context::from_waker(&read_waker);
        let mut write_cx = Context::from_waker(Waker::noop());
        let mut out = [0; 16];
        assert!(Pin::new(&mut stream)
            .poll_read(&mut read_cx, &mut out)
            .is_pending());
        // lapin must see its frames written, or it waits for them forever.
        match Pin::new(&mut stream).poll_write(&mut write_cx, b"frame") {
            Poll::Ready(Ok(5)) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(reader.0.load(Ordering::SeqCst), 1, "the reader is woken");
        match Pin::new(&mut stream).poll_read(&mut read_cx, &mut out) {
            Poll::Ready(Err(err)) => assert_eq!(err.kind(), io::ErrorKind::ConnectionReset),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Pin::new(&mut stream).poll_write(&mut write_cx, b"more"),
            Poll::Ready(Ok(4))
        ));
    }

    struct CountingWaker(AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}
