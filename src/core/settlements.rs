//! Settlements (ack, nack, reject) and the ones a connection has handed to lapin whose frame
//! may not be written yet.
//!
//! AMQP has no answer to a settlement, so none is awaited: the first poll of lapin's future
//! queues the frame. lapin routes some through its internal RPC queue, though, so a settlement
//! can still be unwritten when a worker stops or the connection closes; the connection keeps
//! those futures and waits for them then. The list is per connection: closing one connection
//! waits only for its own, one consumer's multiple ack is not held back by another
//! connection's, and a forked child leaves its parent's list alone (those futures belong to
//! the parent's runtime, which has no threads in the child).

use crate::core::error::{Error, Result};
use crate::core::runtime;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::Acker;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// How to settle a delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// Handled.
    Ack,
    /// Not handled: back to the queue (`requeue`) or to the dead-letter exchange.
    Nack {
        /// Put it back in the queue.
        requeue: bool,
    },
    /// Refused: back to the queue (`requeue`) or to the dead-letter exchange.
    Reject {
        /// Put it back in the queue.
        requeue: bool,
    },
}

type SettleFuture = Pin<Box<dyn Future<Output = lapin::Result<bool>> + Send>>;

/// The settlements of one connection that lapin may not have written yet.
pub(crate) struct Unwritten {
    /// The runtime generation of the connection: another one means a forked child.
    generation: u64,
    futures: Mutex<Vec<SettleFuture>>,
}

impl Unwritten {
    pub(crate) fn new(generation: u64) -> Self {
        Self {
            generation,
            futures: Mutex::new(Vec::new()),
        }
    }

    fn own(&self) -> bool {
        runtime::is_current_generation(self.generation)
    }

    fn futures(&self) -> std::sync::MutexGuard<'_, Vec<SettleFuture>> {
        self.futures.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends a settlement without waiting for the broker; `multiple` makes an ack cover
    /// every older unacked delivery of the channel too.
    ///
    /// An acker from a channel that was closed since the delivery refuses quietly
    /// (`Ok(false)`): the broker redelivers such a message, so acking it elsewhere would be
    /// wrong.
    pub(crate) fn send(&self, acker: &Acker, how: Settlement, multiple: bool) -> Result<bool> {
        if !acker.usable() || !self.own() {
            return Ok(false);
        }
        let acker = acker.clone();
        let mut future: SettleFuture = match how {
            Settlement::Ack => {
                Box::pin(async move { acker.ack(BasicAckOptions { multiple }).await })
            }
            Settlement::Nack { requeue } => Box::pin(async move {
                acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue,
                    })
                    .await
            }),
            Settlement::Reject { requeue } => {
                Box::pin(async move { acker.reject(BasicRejectOptions { requeue }).await })
            }
        };
        let mut cx = Context::from_waker(Waker::noop());
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(Err(e)) => Err(Error::from_lapin(&e, "settle a delivery")),
            Poll::Ready(Ok(done)) => Ok(done),
            Poll::Pending => {
                let mut futures = self.futures();
                drop_written(&mut futures, &mut cx);
                futures.push(future);
                Ok(true)
            }
        }
    }

    /// Whether a settlement of this connection may not be written yet.
    pub(crate) fn any(&self) -> bool {
        self.own() && !drop_written(&mut self.futures(), &mut Context::from_waker(Waker::noop()))
    }

    /// Waits (at most `limit`) until every settlement sent so far on this connection was
    /// handed to the socket. In a forked child it returns at once: the list is the parent's.
    pub(crate) fn flush(&self, limit: Duration) -> Result<()> {
        if !self.own() {
            return Ok(());
        }
        let mut unflushed = std::mem::take(&mut *self.futures());
        if unflushed.is_empty() {
            return Ok(());
        }
        runtime::park_on(
            std::future::poll_fn(|cx| {
                if drop_written(&mut unflushed, cx) {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            }),
            limit,
            "send the last acknowledgements",
        )
    }
}

impl Drop for Unwritten {
    fn drop(&mut self) {
        if !self.own() {
            // The parent's futures: leaked, never polled or dropped in the child.
            std::mem::forget(std::mem::take(&mut *self.futures()));
        }
    }
}

/// Forgets the settlements whose frame lapin has written; true if none is left.
fn drop_written(unflushed: &mut Vec<SettleFuture>, cx: &mut Context<'_>) -> bool {
    unflushed.retain_mut(|f| f.as_mut().poll(cx).is_pending());
    unflushed.is_empty()
}
