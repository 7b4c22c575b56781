//! The worker loop: deliveries handed to the application one by one until a limit, a stop or
//! a signal, each settled by the rule the application chose.
//!
//! The policy lives here, where cargo tests reach it; the host (the PHP binding) only calls
//! the application, runs PHP's signal handlers while the loop idles, and reports memory.
//! The order of settlements is part of the contract: a delivery the application left
//! unsettled is acked after it returns; a failure settles by `on_error`; whatever the reason
//! the loop ends, held acks are sent, the subscription is paused and the prefetch buffer
//! goes back to the queue (see `Consumer::pause`) before `run` returns.

use crate::core::consumer::{Consumer, Incoming};
use crate::core::delivery::Delivery;
use crate::core::error::{Error, Result};
use crate::core::retry::{Retrier, RetryPolicy};
use crate::core::settlements::Settlement;
use crate::core::stop_signals::StopSignals;
use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the loop waits for a delivery before it looks at its limits and lets the host
/// run (PHP's pending signal handlers).
pub const TICK: Duration = Duration::from_millis(200);

/// When the loop ends by itself; zero or None: no limit.
#[derive(Clone, Debug, Default)]
pub struct Limits {
    /// Deliveries handed to the application.
    pub max_messages: u64,
    /// Time since the loop started.
    pub max_time: Option<Duration>,
    /// Time since the last delivery (or the start).
    pub idle_timeout: Option<Duration>,
    /// Bytes of memory the host reports in use, checked after each delivery.
    pub memory_limit: u64,
}

/// What a failed delivery becomes.
#[derive(Clone, Debug, Default)]
pub enum OnError {
    /// Back to its queue (nack with requeue); the loop ends with the failure.
    #[default]
    Requeue,
    /// Rejected without requeue (dead-lettered if the queue says so); the loop ends.
    Reject,
    /// Back to its queue after a delay, then to a dead-letter queue; the loop goes on.
    /// With auto_ack there is nothing to retry: it ends as `Requeue` does.
    Retry(RetryPolicy),
}

/// How the loop runs.
#[derive(Clone, Debug, Default)]
pub struct WorkerOptions {
    pub limits: Limits,
    pub on_error: OnError,
    /// Signals that stop the loop after the delivery in hand, each with whether a handler
    /// installed before must still run (see `StopSignals`).
    pub stop_signals: Vec<(i64, bool)>,
}

/// Requests from the application while the loop runs (it may call them from a callback).
#[derive(Default)]
pub struct Control {
    stop: Cell<bool>,
    cancel: Cell<bool>,
    /// Republishes failed deliveries (`OnError::Retry`); made on the first failure.
    retrier: RefCell<Option<Retrier>>,
}

impl Control {
    /// Ends the loop after the delivery in hand.
    pub fn stop(&self) {
        self.stop.set(true);
    }

    /// Cancels the subscription once the delivery in hand is done, and ends the loop.
    pub fn request_cancel(&self) {
        self.cancel.set(true);
        self.stop.set(true);
    }
}

/// What the loop needs from the side that runs the application.
pub trait Host {
    /// What a failed delivery reports; core errors turn into it.
    type Error: From<Error>;
    /// Hands one delivery to the application; `Err` when it failed.
    fn handle(&mut self, delivery: Arc<Delivery>) -> std::result::Result<(), Self::Error>;
    /// Why a delivery failed, for the dead-letter header: the failure is dealt with (retried).
    fn take_failure(&mut self, failure: Self::Error) -> String;
    /// A delivery was passed over (not UTF-8 short strings); `Err` ends the loop.
    fn warn(&mut self, warning: &str) -> std::result::Result<(), Self::Error>;
    /// The loop waited a tick without a delivery, or a stop signal ends it.
    fn idle(&mut self) {}
    /// Memory in use, in bytes, for `Limits::memory_limit`.
    fn memory_usage(&mut self) -> u64 {
        0
    }
}

/// Runs the loop on `consumer` until a limit, a stop or a signal; returns how many
/// deliveries were handed to the application. The consumer is borrowed only between
/// deliveries, so the application may call `Control` (or try the consumer) meanwhile.
pub fn run<H: Host>(
    consumer: &RefCell<Consumer>,
    control: &Control,
    options: &WorkerOptions,
    host: &mut H,
) -> std::result::Result<u64, H::Error> {
    let signals = StopSignals::install(&options.stop_signals)?;
    control.stop.set(false);
    let outcome = serve(consumer, control, options, host, &signals);
    drop(signals);
    // Whatever ended the loop, nothing stays held: acks out, prefetch buffer back.
    let released = consumer.borrow_mut().pause();
    let handled = outcome?;
    released?;
    Ok(handled)
}

fn serve<H: Host>(
    consumer: &RefCell<Consumer>,
    control: &Control,
    options: &WorkerOptions,
    host: &mut H,
    signals: &StopSignals,
) -> std::result::Result<u64, H::Error> {
    let limits = &options.limits;
    let started = Instant::now();
    let mut last_activity = started;
    let mut handled: u64 = 0;
    loop {
        if control.cancel.take() {
            consumer.borrow_mut().cancel()?;
        }
        if signals.triggered() {
            // The application's own handler of the signal (chained) runs before the loop
            // ends, wherever the signal came: during a wait or during the callback.
            host.idle();
            return Ok(handled);
        }
        if control.stop.get() {
            return Ok(handled);
        }
        if limits.max_messages > 0 && handled >= limits.max_messages {
            return Ok(handled);
        }
        let Some(wait) = wait_before_limits(limits, started, last_activity) else {
            return Ok(handled);
        };
        let next = consumer.borrow_mut().next(wait, true)?;
        let delivery = match next {
            None => {
                host.idle();
                continue;
            }
            Some(Incoming::Poisoned(warning)) => {
                // Settled already; the application never sees a message with `?` for bytes.
                last_activity = Instant::now();
                host.warn(&warning)?;
                continue;
            }
            Some(Incoming::Message(delivery)) => delivery,
        };
        last_activity = Instant::now();
        handled += 1;
        match host.handle(delivery.clone()) {
            Ok(()) if delivery.needs_settling() => {
                delivery.settle(Settlement::Ack, "settle after the callback")?;
            }
            Ok(()) => {}
            Err(failure) => failed(consumer, control, options, host, &delivery, failure)?,
        }
        if limits.memory_limit > 0 && host.memory_usage() >= limits.memory_limit {
            return Ok(handled);
        }
    }
}

/// How long the next wait may be, or None once `max_time` or `idle_timeout` has run out.
fn wait_before_limits(limits: &Limits, started: Instant, last: Instant) -> Option<Duration> {
    let now = Instant::now();
    let mut wait = TICK;
    if let Some(limit) = limits.max_time {
        wait = wait.min(limit.checked_sub(now - started)?);
    }
    if let Some(limit) = limits.idle_timeout {
        wait = wait.min(limit.checked_sub(now - last)?);
    }
    Some(wait)
}

/// Settles a delivery the application failed on; `Ok` when the loop goes on (it was retried).
fn failed<H: Host>(
    consumer: &RefCell<Consumer>,
    control: &Control,
    options: &WorkerOptions,
    host: &mut H,
    delivery: &Delivery,
    failure: H::Error,
) -> std::result::Result<(), H::Error> {
    let how = match &options.on_error {
        OnError::Retry(policy) if !delivery.is_auto_acked() => {
            let reason = host.take_failure(failure);
            return Ok(retry(consumer, control, delivery, &reason, policy)?);
        }
        OnError::Requeue | OnError::Retry(_) => Settlement::Nack { requeue: true },
        OnError::Reject => Settlement::Reject { requeue: false },
    };
    if delivery.needs_settling() {
        // The failure is what the caller must see, not a settlement's error.
        let _ = delivery.settle(how, "settle after the callback threw");
    }
    Err(failure)
}

/// Passes a failed delivery on to a retry or its dead-letter queue, then acks it once the
/// broker has the copy; if it could not be passed on, it goes back to its queue.
fn retry(
    consumer: &RefCell<Consumer>,
    control: &Control,
    delivery: &Delivery,
    reason: &str,
    policy: &RetryPolicy,
) -> Result<()> {
    if !delivery.needs_settling() {
        return Ok(());
    }
    let mut slot = control.retrier.borrow_mut();
    let retrier = match slot.as_mut() {
        Some(retrier) => retrier,
        None => slot.insert(Retrier::new(consumer.borrow().link())?),
    };
    let passed = retrier.handle(
        delivery.queue.as_deref().unwrap_or_default(),
        &delivery.exchange,
        &delivery.routing_key,
        &delivery.body,
        &delivery.properties,
        reason,
        policy,
    );
    match passed {
        Ok(_) => delivery.settle(Settlement::Ack, "ack after passing the message on"),
        Err(err) => {
            let _ = delivery.settle(Settlement::Nack { requeue: true }, "requeue");
            Err(err)
        }
    }
}

#[cfg(test)]
#[path = "worker_tests.rs"]
mod tests;
