//! Wake-ups for threads that wait on a connection's state: recovered, blocked or unblocked
//! by the broker, failed for good. lapin announces these on its events stream; a task of the
//! runtime forwards each one here, so that a waiting PHP thread wakes the moment it happens
//! instead of polling the status every few milliseconds.
//!
//! Not everything has an event (a channel reopened after a recovery has none), so waits are
//! still bounded by a short slice and recheck the state after it.

use futures_core::Stream;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// A counter of changes and the threads waiting for the next one.
#[derive(Debug, Default)]
pub(crate) struct StateChanges {
    count: Mutex<u64>,
    changed: Condvar,
}

impl StateChanges {
    /// How many changes were seen so far; a later `wait(seen, ..)` returns at the next one.
    pub(crate) fn seen(&self) -> u64 {
        *self.count.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a change and wakes every waiter.
    pub(crate) fn changed(&self) {
        *self.count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.changed.notify_all();
    }

    /// Waits until a change after `seen`, or `limit`.
    pub(crate) fn wait(&self, seen: u64, limit: Duration) {
        let count = self.count.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self
            .changed
            .wait_timeout_while(count, limit, |count| *count == seen);
    }

    /// Forwards lapin's events for one connection until that stream ends.
    pub(crate) fn forward<S>(self: Arc<Self>, events: S) -> impl std::future::Future<Output = ()>
    where
        S: Stream + Send + Unpin + 'static,
    {
        let mut events = events;
        async move {
            while std::future::poll_fn(|cx| Pin::new(&mut events).poll_next(cx))
                .await
                .is_some()
            {
                self.changed();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_waiter_wakes_at_the_change_not_at_its_limit() {
        let changes = Arc::new(StateChanges::default());
        let seen = changes.seen();
        let notifier = changes.clone();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            notifier.changed();
        });
        let started = Instant::now();
        changes.wait(seen, Duration::from_secs(10));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(changes.seen(), seen + 1);
        thread.join().expect("notifier");
        let started = Instant::now();
        changes.wait(changes.seen(), Duration::from_millis(30));
        assert!(
            started.elapsed() >= Duration::from_millis(30),
            "no change: the limit"
        );
    }
}
