//! The one background Tokio runtime of a process, created lazily and rebuilt after `fork()`.
//!
//! Nothing starts at module load: php-fpm forks its workers after MINIT and a Tokio runtime
//! (its threads, its epoll fd) does not survive a fork. The runtime remembers the pid that
//! built it; a caller in another pid is a forked child, which gets a fresh runtime and a new
//! *generation*. Objects from an older generation belong to the parent: they must neither be
//! used nor dropped in the child (dropping would try to close the parent's sockets).

use crate::core::error::{Error, Result};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};
use std::time::Duration;
use tokio::runtime::{Builder, Handle, Runtime};

/// Worker threads of the runtime: lapin runs one io-loop OS thread per connection besides,
/// so the runtime only drives the sockets' readiness, heartbeats, lapin's RPC bookkeeping and
/// our own tasks. One is enough for that, and a php-fpm pool multiplies every thread.
const WORKER_THREADS: usize = 1;

struct State {
    pid: u32,
    generation: u64,
    runtime: Runtime,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

/// What `php --ri amqp_rs` reports about the runtime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeInfo {
    /// Whether a runtime exists for this process.
    pub started: bool,
    /// How many times a runtime was built in this lineage (1 + forks that used it).
    pub generation: u64,
    /// Worker threads of the runtime.
    pub workers: usize,
}

fn build(pid: u32) -> Result<Runtime> {
    pin_library_in_memory();
    Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .thread_name(format!("amqp-rs-{pid}"))
        .enable_all()
        .build()
        .map_err(|e| Error::other(format!("cannot start the amqp_rs runtime: {e}")))
}

/// The handle of this process's runtime and its generation, building it on first use and
/// again in a forked child.
pub fn current() -> Result<(Handle, u64)> {
    let mut state = STATE.lock().unwrap_or_else(|p| p.into_inner());
    match state.as_ref() {
        // The fork counter, not getpid(): this runs on every call that waits.
        Some(s) if is_current_generation(s.generation) => {
            return Ok((s.runtime.handle().clone(), s.generation))
        }
        _ => {}
    }
    let pid = std::process::id();
    let generation = match state.take() {
        Some(parent) => {
            // The parent's runtime has no threads here; dropping it would block on them.
            let generation = parent.generation + 1;
            std::mem::forget(parent);
            generation
        }
        None => 1,
    };
    let runtime = build(pid)?;
    let handle = runtime.handle().clone();
    ATFORK.call_once(|| {
        // SAFETY: registers a handler that only increments an atomic, which is async-signal-safe.
        unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
    });
    CURRENT_FORKS.store(FORKS.load(Ordering::Acquire), Ordering::Release);
    CURRENT.store(generation, Ordering::Release);
    *state = Some(State {
        pid,
        generation,
        runtime,
    });
    Ok((handle, generation))
}

/// Forks seen by this process lineage, counted by a `pthread_atfork` child handler so the hot
/// path can tell "same process" with one atomic load instead of a lock and a getpid().
static FORKS: AtomicU64 = AtomicU64::new(0);
static ATFORK: Once = Once::new();
/// The generation current when `FORKS` last matched, 0 before any runtime.
static CURRENT: AtomicU64 = AtomicU64::new(0);
static CURRENT_FORKS: AtomicU64 = AtomicU64::new(0);

extern "C" fn after_fork_in_child() {
    FORKS.fetch_add(1, Ordering::SeqCst);
}

/// Whether objects of `generation` belong to this process, without starting anything.
pub fn is_current_generation(generation: u64) -> bool {
    generation != 0
        && CURRENT.load(Ordering::Acquire) == generation
        && CURRENT_FORKS.load(Ordering::Acquire) == FORKS.load(Ordering::Acquire)
}

/// Runs `fut` on the runtime from the (non-runtime) PHP thread, waiting at most `limit`;
/// `what` names the operation in the timeout error.
pub fn block_on<F: Future>(fut: F, limit: Duration, what: &str) -> Result<F::Output> {
    let (handle, _) = current()?;
    handle.block_on(async {
        tokio::time::timeout(limit, fut).await.map_err(|_| {
            Error::timeout(format!(
                "{what}: no answer within {:.1} s",
                limit.as_secs_f64()
            ))
        })
    })
}

/// Runs one lapin command from the PHP thread, bounded by `limit`; a lapin error becomes a
/// core error whose message starts with `context` (what was done, on which broker).
///
/// The PHP thread polls the command itself and parks between polls: lapin's io-loop thread
/// resolves it, so neither a runtime worker nor the runtime's timer wheel is involved (a
/// `block_on` with a timeout registers a timer and wakes through the runtime's park).
pub fn command<T>(
    fut: impl Future<Output = lapin::Result<T>>,
    limit: Duration,
    context: &str,
) -> Result<T> {
    let (handle, _) = current()?;
    // lapin may spawn on the runtime from inside a command; it finds the runtime this way.
    let _runtime = handle.enter();
    park_on(fut, limit, context)?.map_err(|e| Error::from_lapin(&e, context))
}

/// Wakes the PHP thread parked in `park_on`.
struct ThreadWaker(std::thread::Thread);

impl std::task::Wake for ThreadWaker {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &std::sync::Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs `fut` on the calling (PHP) thread, parking it between polls, for at most `limit`.
///
/// For futures that lapin's io-loop thread resolves (publisher confirms): unlike `block_on`,
/// nothing here involves the runtime's workers or its timer wheel, so a wait costs one
/// park/unpark and no wake-up of other threads.
pub fn park_on<F: Future>(fut: F, limit: Duration, what: &str) -> Result<F::Output> {
    let waker = std::task::Waker::from(std::sync::Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let std::task::Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return Ok(out);
        }
        let now = std::time::Instant::now();
        if now >= deadline {
            return Err(Error::timeout(format!(
                "{what}: no answer within {:.1} s",
                limit.as_secs_f64()
            )));
        }
        std::thread::park_timeout(deadline - now);
    }
}

/// A snapshot for phpinfo; does not start the runtime.
pub fn info() -> RuntimeInfo {
    let state = STATE.lock().unwrap_or_else(|p| p.into_inner());
    match state.as_ref() {
        Some(s) if s.pid == std::process::id() => RuntimeInfo {
            started: true,
            generation: s.generation,
            workers: WORKER_THREADS,
        },
        Some(s) => RuntimeInfo {
            started: false,
            generation: s.generation,
            workers: 0,
        },
        None => RuntimeInfo {
            started: false,
            generation: 0,
            workers: 0,
        },
    }
}

/// Keeps this shared library mapped until the process exits.
///
/// PHP unloads extensions at shutdown while the runtime's and lapin's threads may still wake
/// up inside our code; pinning the library (RTLD_NODELETE) turns that crash into nothing.
fn pin_library_in_memory() {
    // SAFETY: dladdr reads the loader's tables for an address inside this library; dlopen with
    // RTLD_NOLOAD only takes a reference on an already loaded object.
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        let addr = pin_library_in_memory as *const libc::c_void;
        if libc::dladdr(addr, &mut info) != 0 && !info.dli_fname.is_null() {
            libc::dlopen(
                info.dli_fname,
                libc::RTLD_NOW | libc::RTLD_NOLOAD | libc::RTLD_NODELETE,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_is_built_once_per_process_and_runs_futures() {
        let (_, first) = current().expect("runtime");
        let (_, again) = current().expect("runtime");
        assert_eq!(first, again);
        assert!(is_current_generation(first));
        let out = block_on(async { 41 + 1 }, Duration::from_secs(1), "add").expect("ran");
        assert_eq!(out, 42);
        assert!(info().started);
    }

    #[test]
    fn block_on_times_out_with_the_operation_named() {
        let err = block_on(
            async { tokio::time::sleep(Duration::from_secs(5)).await },
            Duration::from_millis(50),
            "wait for nothing",
        )
        .expect_err("must time out");
        assert_eq!(err.kind(), crate::core::error::ErrorKind::Timeout);
        assert!(err.message().starts_with("wait for nothing"));
    }
}
