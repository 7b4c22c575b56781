//! The readiness signal of a connection, for event loops: one eventfd that is readable while
//! some consumer, producer or RPC call of the connection may have something to take.
//!
//! Each of those is a `Source`. A non-blocking take polls lapin with the source's waker, so
//! lapin's io-loop thread raises the source when a delivery, a confirm or a reply arrives.
//! The fd stays readable while any source is raised; a take that finds nothing lowers its
//! source, and once none is raised the fd is drained. A take that found something leaves its
//! source raised (more may be there): the loop is told again until a take comes back empty.
//!
//! A wake that comes while a take is polling is never lost: a take lowers its source only if
//! no wake came since it started (`wakes`), all under one lock with the fd's count.

use crate::core::error::{Error, Result};
use crate::core::runtime;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Instant;
use tokio::task::AbortHandle;

/// How soon a take during a recovery is told to look again.
const RECOVERY_RECHECK: std::time::Duration = std::time::Duration::from_millis(20);

/// One connection's eventfd and how many of its sources are raised.
pub(crate) struct Readiness {
    fd: OwnedFd,
    state: Mutex<State>,
}

struct State {
    raised: usize,
    /// The connection is closed: the fd stays readable for good, so a loop wakes and learns
    /// of it from its next take.
    closed: bool,
}

/// What a take that found something means for its source.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterReady {
    /// More may follow at once (a consumer's buffer): stay raised.
    More,
    /// Nothing more will come (an RPC reply, every confirm settled): lower it.
    Done,
}

impl Readiness {
    /// A new, unreadable eventfd (non-blocking, closed on exec).
    pub(crate) fn new() -> Result<Arc<Self>> {
        // SAFETY: eventfd takes no pointers; a negative return is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            return Err(Error::connection(format!(
                "create the connection's readiness eventfd: {err}"
            )));
        }
        Ok(Arc::new(Self {
            // SAFETY: `fd` was just created and nothing else owns it.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            state: Mutex::new(State {
                raised: 0,
                closed: false,
            }),
        }))
    }

    /// A duplicate of the fd for a PHP stream, which closes it with the stream.
    pub(crate) fn dup_fd(&self) -> Result<RawFd> {
        // SAFETY: dup of an fd this object owns; a negative return is checked.
        let fd = unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            return Err(Error::connection(format!(
                "duplicate the readiness fd: {err}"
            )));
        }
        Ok(fd)
    }

    /// A new source of this connection, lowered.
    pub(crate) fn source(self: &Arc<Self>) -> Source {
        Source(Arc::new(SourceState {
            readiness: self.clone(),
            raised: AtomicBool::new(false),
            wakes: AtomicU64::new(0),
            retired: AtomicBool::new(false),
        }))
    }

    /// The connection closed: readable for good.
    pub(crate) fn close(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !std::mem::replace(&mut state.closed, true) && state.raised == 0 {
            self.signal();
        }
    }

    /// Whether the fd is readable now.
    #[cfg(test)]
    pub(crate) fn is_readable(&self) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.closed || state.raised > 0
    }

    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local to an fd this object owns. EAGAIN (the counter
        // is full) cannot happen at one write per raise and leaves it readable anyway.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn drain(&self) {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into a local; EAGAIN (already empty) is fine.
        unsafe { libc::read(self.fd.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
    }
}

/// One consumer's, producer's or RPC call's share of the readiness signal; lowered for good
/// when dropped, so nothing gone keeps the fd readable.
pub(crate) struct Source(Arc<SourceState>);

struct SourceState {
    readiness: Arc<Readiness>,
    raised: AtomicBool,
    /// Wakes so far, so a take can tell whether one came while it polled.
    wakes: AtomicU64,
    /// Dropped: wakes from lapin that still hold its waker change nothing.
    retired: AtomicBool,
}

impl SourceState {
    fn raise(&self) {
        let readiness = &self.readiness;
        let mut state = readiness.state.lock().unwrap_or_else(|p| p.into_inner());
        self.wakes.fetch_add(1, Ordering::AcqRel);
        if self.retired.load(Ordering::Acquire) || self.raised.swap(true, Ordering::AcqRel) {
            return;
        }
        state.raised += 1;
        if state.raised == 1 && !state.closed {
            readiness.signal();
        }
    }

    /// Lowers the source unless it was woken since `wakes` was read (or `force`).
    fn lower(&self, seen: Option<u64>) {
        let readiness = &self.readiness;
        let mut state = readiness.state.lock().unwrap_or_else(|p| p.into_inner());
        if seen.is_some_and(|seen| self.wakes.load(Ordering::Acquire) != seen) {
            return;
        }
        if self.raised.swap(false, Ordering::AcqRel) {
            state.raised -= 1;
            if state.raised == 0 && !state.closed {
                readiness.drain();
            }
        }
    }
}

impl Wake for SourceState {
    fn wake(self: Arc<Self>) {
        self.raise();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.raise();
    }
}

impl Source {
    /// The waker that raises this source.
    pub(crate) fn waker(&self) -> Waker {
        Waker::from(self.0.clone())
    }

    /// One non-blocking take: `poll` runs with this source's waker; the source is then left
    /// raised or lowered as `after` and the outcome say.
    pub(crate) fn take<T>(
        &self,
        after: AfterReady,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        let seen = self.0.wakes.load(Ordering::Acquire);
        let waker = self.waker();
        let outcome = poll(&mut Context::from_waker(&waker));
        match (&outcome, after) {
            (Poll::Pending, _) => self.0.lower(Some(seen)),
            (Poll::Ready(_), AfterReady::More) => self.0.raise(),
            (Poll::Ready(_), AfterReady::Done) => self.0.lower(None),
        }
        outcome
    }

    /// Raises the source at `at` (a timeout, a republish that is due), from the runtime's
    /// timer; a source dropped by then stays down.
    pub(crate) fn raise_at(&self, at: Instant) -> Result<AbortHandle> {
        let (handle, _) = runtime::current()?;
        let waker = self.waker();
        let timer = handle.spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            waker.wake();
        });
        Ok(timer.abort_handle())
    }

    /// While lapin recovers the connection there is nothing to take, and not every step of a
    /// recovery has an event: the source is raised again shortly, to look again.
    pub(crate) fn recheck_soon(&self) -> Result<()> {
        self.raise_at(Instant::now() + RECOVERY_RECHECK).map(drop)
    }

    /// Lowers the source now, whatever woke it.
    pub(crate) fn lower(&self) {
        self.0.lower(None);
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.0.lower(None);
        self.0.retired.store(true, Ordering::Release);
    }
}

#[cfg(test)]
#[path = "readiness_tests.rs"]
mod tests;
