//! The socket under lapin, with a check of what the broker sends before lapin parses it.
//!
//! lapin refuses any AMQP short string that is not UTF-8 — a routing key, an exchange name, a
//! `message_id`, a header's key — and fails the whole connection over it, with the message
//! still in the queue: a worker would reconnect straight back into it, forever. php-amqplib
//! publishes such messages without complaint. Here each such byte is replaced by `?` in place
//! (same length, so the frame is untouched otherwise) and the delivery is logged as poisoned;
//! the consumer then dead-letters it (the broker's copy still has the original bytes) instead
//! of handing a mangled message to the application.
//!
//! Only method and content-header frames are held until complete and checked; bodies pass
//! straight through.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use async_rs::traits::{Executor, Reactor, RuntimeKit};
use async_rs::util::Task;
use async_rs::Tokio;
use futures_core::Stream;
use futures_io::{AsyncRead, AsyncWrite};
use lapin::tcp::AsyncTcpStream;

/// Deliveries whose short strings were not UTF-8, by (channel, delivery tag).
#[derive(Debug, Default)]
pub(crate) struct PoisonLog {
    /// Entries in `entries`: lets the common case skip the lock.
    count: AtomicUsize,
    entries: Mutex<HashMap<(u16, u64), Vec<&'static str>>>,
}

impl PoisonLog {
    fn record(&self, channel: u16, tag: u64, fields: &[&'static str]) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        let known = entries.entry((channel, tag)).or_default();
        for field in fields {
            if !known.contains(field) {
                known.push(field);
            }
        }
        self.count.store(entries.len(), Ordering::Release);
    }

    /// The fields of this delivery that were not UTF-8 (replaced by `?`), if any; once.
    pub(crate) fn take(&self, channel: u16, tag: u64) -> Option<Vec<&'static str>> {
        if self.count.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut entries = self.entries.lock().ok()?;
        let fields = entries.remove(&(channel, tag));
        self.count.store(entries.len(), Ordering::Release);
        fields
    }

    /// A reopened channel starts its delivery tags at 1 again.
    fn forget_channel(&self, channel: u16) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        if let Ok(mut entries) = self.entries.lock() {
            entries.retain(|(c, _), _| *c != channel);
            self.count.store(entries.len(), Ordering::Release);
        }
    }
}

/// Frames above this are passed on unchecked rather than buffered whole (no broker sends
/// method or header frames anywhere near it; frame_max is 128 KiB by default).
const MAX_HELD_FRAME: usize = 4 << 20;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;

/// Basic properties that are short strings, by flag bit (the table is bit 13).
const SHORTSTR_PROPERTIES: [(u16, &str); 10] = [
    (15, "content_type"),
    (14, "content_encoding"),
    (10, "correlation_id"),
    (9, "reply_to"),
    (8, "expiration"),
    (7, "message_id"),
    (5, "type"),
    (4, "user_id"),
    (3, "app_id"),
    (2, "cluster_id"),
];

/// Walks the frames the broker sends, repairing short strings in deliveries.
#[derive(Debug)]
struct Scanner {
    log: Arc<PoisonLog>,
    /// Bytes of the current frame still to pass unchecked.
    pass: usize,
    /// Per channel, the delivery tag of the last deliver/get-ok (None after a return): the
    /// content header that follows belongs to it.
    delivery: HashMap<u16, Option<u64>>,
}

impl Scanner {
    fn new(log: Arc<PoisonLog>) -> Self {
        Self {
            log,
            pass: 0,
            delivery: HashMap::new(),
        }
    }

    /// Checks the frames at the start of `buf`; returns how many bytes may go on to lapin (an
    /// incomplete method or header frame at the end waits for the rest).
    fn scan(&mut self, buf: &mut [u8]) -> usize {
        let mut pos = 0;
        loop {
            if self.pass > 0 {
                let n = self.pass.min(buf.len() - pos);
                pos += n;
                self.pass -= n;
                if self.pass > 0 {
                    return pos;
                }
            }
            let Some(head) = buf.get(pos..pos + 7) else {
                return pos;
            };
            let kind = head[0];
            let channel = u16::from_be_bytes([head[1], head[2]]);
            let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
            let total = size.saturating_add(8);
            if !matches!(kind, FRAME_METHOD | FRAME_HEADER) || size > MAX_HELD_FRAME {
                // A body, a heartbeat, or not a frame at all (a protocol header): not ours.
                self.pass = total;
                continue;
            }
            if buf.len() - pos < total {
                return pos;
            }
            let payload = &mut buf[pos + 7..pos + 7 + size];
            // A frame we cannot make sense of is left alone: lapin will say what is wrong.
            let _ = if kind == FRAME_METHOD {
                self.method(channel, payload)
            } else {
                self.header(channel, payload)
            };
            pos += total;
        }
    }

    fn method(&mut self, channel: u16, payload: &mut [u8]) -> Option<()> {
        let mut c = Cursor::new(payload);
        let ids = (c.u16()?, c.u16()?);
        let mut bad = Vec::new();
        match ids {
            // basic.deliver: consumer tag, delivery tag, redelivered, exchange, routing key.
            (60, 60) => {
                c.shortstr("consumer tag", &mut bad)?;
                let tag = c.u64()?;
                c.skip(1)?;
                c.shortstr("exchange", &mut bad)?;
                c.shortstr("routing key", &mut bad)?;
                self.delivered(channel, Some(tag), &bad);
            }
            // basic.get-ok: delivery tag, redelivered, exchange, routing key, message count.
            (60, 71) => {
                let tag = c.u64()?;
                c.skip(1)?;
                c.shortstr("exchange", &mut bad)?;
                c.shortstr("routing key", &mut bad)?;
                self.delivered(channel, Some(tag), &bad);
            }
            // basic.return: reply code, reply text, exchange, routing key. Only reported back
            // to the publisher as a failure, so `?` in its names is all that is needed.
            (60, 50) => {
                c.skip(2)?;
                c.shortstr("reply text", &mut bad)?;
                c.shortstr("exchange", &mut bad)?;
                c.shortstr("routing key", &mut bad)?;
                self.delivered(channel, None, &bad);
            }
            // channel.open-ok: a new channel under a number that may have been used before.
            (20, 11) => {
                self.delivery.remove(&channel);
                self.log.forget_channel(channel);
            }
            _ => {}
        }
        Some(())
    }

    fn delivered(&mut self, channel: u16, tag: Option<u64>, bad: &[&'static str]) {
        self.delivery.insert(channel, tag);
        if let (Some(tag), false) = (tag, bad.is_empty()) {
            self.log.record(channel, tag, bad);
        }
    }

    fn header(&mut self, channel: u16, payload: &mut [u8]) -> Option<()> {
        let mut c = Cursor::new(payload);
        // class, weight, body size
        c.skip(12)?;
        let flags = c.u16()?;
        if flags & 1 != 0 {
            return None; // continued flags: not basic's
        }
        let mut bad = Vec::new();
        for bit in (2..=15).rev() {
            if flags & (1 << bit) == 0 {
                continue;
            }
            match bit {
                13 => c.table(&mut bad)?,
                12 | 11 => c.skip(1)?,
                6 => c.skip(8)?,
                _ => {
                    let name = SHORTSTR_PROPERTIES
                        .iter()
                        .find(|(b, _)| *b == bit)
                        .map_or("property", |(_, name)| name);
                    c.shortstr(name, &mut bad)?;
                }
            }
        }
        if let (Some(Some(tag)), false) = (self.delivery.get(&channel), bad.is_empty()) {
            self.log.record(channel, *tag, &bad);
        }
        Some(())
    }
}

/// Reads AMQP fields in place; `None` once past the end.
struct Cursor<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Option<&mut [u8]> {
        let end = self.pos.checked_add(n)?;
        let bytes = self.buf.get_mut(self.pos..end)?;
        self.pos = end;
        Some(bytes)
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<usize> {
        let b = self.take(4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        let mut bytes = [0; 8];
        bytes.copy_from_slice(b);
        Some(u64::from_be_bytes(bytes))
    }

    /// A short string, repaired in place; its name goes to `bad` if it needed it.
    fn shortstr(&mut self, name: &'static str, bad: &mut Vec<&'static str>) -> Option<()> {
        let len = usize::from(self.u8()?);
        if repair_utf8(self.take(len)?) && !bad.contains(&name) {
            bad.push(name);
        }
        Some(())
    }

    /// A field table: its keys are short strings, at any depth.
    fn table(&mut self, bad: &mut Vec<&'static str>) -> Option<()> {
        let len = self.u32()?;
        let end = self.pos.checked_add(len)?;
        while self.pos < end {
            self.shortstr("header key", bad)?;
            self.value(bad)?;
        }
        (self.pos == end).then_some(())
    }

    /// One typed field value, as RabbitMQ writes them (and lapin reads them).
    fn value(&mut self, bad: &mut Vec<&'static str>) -> Option<()> {
        match self.u8()? {
            b'V' => Some(()),
            b't' | b'b' | b'B' => self.skip(1),
            b's' | b'U' | b'u' => self.skip(2),
            b'I' | b'i' | b'f' => self.skip(4),
            b'D' => self.skip(5),
            b'L' | b'l' | b'd' | b'T' => self.skip(8),
            b'S' | b'x' => {
                let len = self.u32()?;
                self.skip(len)
            }
            b'A' => {
                let len = self.u32()?;
                let end = self.pos.checked_add(len)?;
                while self.pos < end {
                    self.value(bad)?;
                }
                (self.pos == end).then_some(())
            }
            b'F' => self.table(bad),
            _ => None,
        }
    }
}

/// Replaces every byte of each invalid UTF-8 sequence by `?`; true if there was one.
fn repair_utf8(bytes: &mut [u8]) -> bool {
    let mut from = 0;
    let mut repaired = false;
    while let Err(err) = std::str::from_utf8(&bytes[from..]) {
        let start = from + err.valid_up_to();
        let end = err.error_len().map_or(bytes.len(), |n| start + n);
        bytes[start..end].fill(b'?');
        repaired = true;
        from = end;
    }
    repaired
}

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

    /// The plain tokio kit, to open the socket (and TLS) with.
    pub(crate) fn tokio(&self) -> async_rs::Runtime<Tokio> {
        async_rs::Runtime::new(self.tokio.clone())
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

    fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![kind];
        f.extend_from_slice(&channel.to_be_bytes());
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f.push(0xCE);
        f
    }

    fn short(s: &[u8]) -> Vec<u8> {
        let mut v = vec![s.len() as u8];
        v.extend_from_slice(s);
        v
    }

    fn deliver(tag: u64, routing_key: &[u8]) -> Vec<u8> {
        let mut p = vec![0, 60, 0, 60];
        p.extend(short(b"ctag"));
        p.extend_from_slice(&tag.to_be_bytes());
        p.push(0);
        p.extend(short(b"ex"));
        p.extend(short(routing_key));
        frame(FRAME_METHOD, 1, &p)
    }

    /// A header with message_id and a table { "k": { <inner>: "v" } }.
    fn header(message_id: &[u8], inner_key: &[u8]) -> Vec<u8> {
        let mut inner = short(inner_key);
        inner.push(b'S');
        inner.extend_from_slice(&1u32.to_be_bytes());
        inner.push(b'v');
        let mut table = short(b"k");
        table.push(b'F');
        table.extend_from_slice(&(inner.len() as u32).to_be_bytes());
        table.extend(inner);
        let mut p = vec![0, 60, 0, 0];
        p.extend_from_slice(&3u64.to_be_bytes());
        p.extend_from_slice(&((1u16 << 13) | (1 << 7)).to_be_bytes());
        p.extend_from_slice(&(table.len() as u32).to_be_bytes());
        p.extend(table);
        p.extend(short(message_id));
        frame(FRAME_HEADER, 1, &p)
    }

    #[test]
    fn invalid_utf8_is_replaced_in_place_and_the_delivery_logged() {
        let log = Arc::new(PoisonLog::default());
        let mut scanner = Scanner::new(log.clone());
        let mut wire = [
            deliver(7, b"rk\xff"),
            header(b"\xff\xfeid", b"\xc3\x28"),
            frame(3, 1, b"abc"),
            deliver(8, b"fine"),
            header(b"id", b"ok"),
        ]
        .concat();
        let len = wire.len();
        assert_eq!(scanner.scan(&mut wire), len);
        assert!(
            std::str::from_utf8(&wire).is_err(),
            "only short strings are touched"
        );
        let text = String::from_utf8_lossy(&wire);
        for repaired in ["rk?", "??id", "?("] {
            assert!(text.contains(repaired), "{repaired} in {text:?}");
        }
        assert_eq!(
            log.take(1, 7),
            Some(vec!["routing key", "header key", "message_id"])
        );
        assert_eq!(log.take(1, 7), None, "taken once");
        assert_eq!(log.take(1, 8), None);
    }

    #[test]
    fn an_incomplete_frame_waits_and_bodies_pass_in_pieces() {
        let log = Arc::new(PoisonLog::default());
        let mut scanner = Scanner::new(log.clone());
        let body = frame(3, 1, &[0xff; 100]);
        let mut wire = [deliver(1, b"\xff"), body.clone()].concat();
        let first = deliver(1, b"\xff").len();
        // A method frame cut short is held back whole.
        assert_eq!(scanner.scan(&mut wire[..first - 1]), 0);
        // A body is let through as it comes.
        assert_eq!(scanner.scan(&mut wire[..first + 10]), first + 10);
        let rest = &mut wire[first + 10..];
        assert_eq!(scanner.scan(rest), rest.len());
        assert_eq!(&wire[first..], &body[..], "bodies are never changed");
        assert_eq!(log.take(1, 1), Some(vec!["routing key"]));
    }

    #[test]
    fn a_reopened_channel_forgets_its_old_tags() {
        let log = Arc::new(PoisonLog::default());
        let mut scanner = Scanner::new(log.clone());
        let mut wire = [
            deliver(1, b"\xff"),
            frame(FRAME_METHOD, 1, &[0, 20, 0, 11, 0, 0, 0, 0]),
        ]
        .concat();
        let len = wire.len();
        assert_eq!(scanner.scan(&mut wire), len);
        assert_eq!(log.take(1, 1), None);
    }

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

    #[test]
    fn repair_keeps_valid_characters() {
        let mut s = "é\u{1F600}".as_bytes().to_vec();
        s.insert(2, 0x80);
        s.push(0xf0);
        assert!(repair_utf8(&mut s));
        assert_eq!(std::str::from_utf8(&s).ok(), Some("é?\u{1F600}?"));
        let mut fine = b"plain".to_vec();
        assert!(!repair_utf8(&mut fine));
    }
}
