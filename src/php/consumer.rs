//! `AmqpRs\Consumer`: the PHP face of the worker loop (`core::worker`). Here: the options
//! array, the callback call, PHP's signal handlers and memory use; the policy is the core's.

use crate::core::consumer::{Consumer as CoreConsumer, Incoming};
use crate::core::delivery::Delivery;
use crate::core::retry::RetryPolicy;
use crate::core::stop_signals::StopSignals;
use crate::core::worker::{self, Control, Host, Limits, OnError, WorkerOptions, TICK};
use crate::php::convert::{Options, PhpArray};
use crate::php::exceptions::{amqp_exception, guard, invalid_argument, type_error, warn};
use crate::php::message::Message;
use ext_php_rs::convert::IntoZval;
use ext_php_rs::exception::{PhpException, PhpResult};
use ext_php_rs::prelude::*;
use ext_php_rs::types::{ZendCallable, ZendClassObject, ZendObject};
use ext_php_rs::zend::ExecutorGlobals;
use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Consumes one or more queues; made by `Connection::consumer()`.
#[php_class]
#[php(name = "AmqpRs\\Consumer")]
#[php(flags = ext_php_rs::flags::ClassFlags::Final)]
pub struct Consumer {
    // RefCell: the callback may call next() or cancel() on this very object while consume()
    // runs; the worker borrows it only between deliveries.
    inner: RefCell<CoreConsumer>,
    /// stop() and cancel() from a callback, read by the worker loop.
    control: Control,
    /// Whether consume() runs (cancel() then waits for the callback to return).
    running: Cell<bool>,
}

impl Consumer {
    /// Wraps a core consumer made by `Connection::consumer()`.
    pub(crate) fn new(inner: CoreConsumer) -> Self {
        Self {
            inner: RefCell::new(inner),
            control: Control::default(),
            running: Cell::new(false),
        }
    }
}

/// Marks consume() as running until dropped, a panic included.
struct Running<'a>(&'a Cell<bool>);

impl<'a> Running<'a> {
    fn start(flag: &'a Cell<bool>) -> Self {
        flag.set(true);
        Self(flag)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

/// The worker's host: calls the PHP callable on the PHP thread.
struct PhpHost<'a, 'b> {
    callback: &'a ZendCallable<'b>,
}

impl Host for PhpHost<'_, '_> {
    type Error = PhpException;

    fn handle(&mut self, delivery: Arc<Delivery>) -> PhpResult<()> {
        let mut object = ZendClassObject::new(Message::new(delivery));
        let zval = (&mut *object).into_zval(false)?;
        match self.callback.try_call(vec![&zval]) {
            Ok(_) => Ok(()),
            // The callback's exception is pending in the engine and wins over this one (see
            // PhpException::throw), so consume() lets it leave unchanged.
            Err(_) => Err(amqp_exception("the consume() callback threw")),
        }
    }

    fn take_failure(&mut self, _failure: PhpException) -> String {
        match ExecutorGlobals::take_exception() {
            Some(mut thrown) => describe_exception(&mut thrown),
            None => "the callback failed".to_string(),
        }
    }

    fn warn(&mut self, warning: &str) -> PhpResult<()> {
        warn(warning)
    }

    fn idle(&mut self) {
        dispatch_php_signals();
    }

    fn memory_usage(&mut self) -> u64 {
        php_memory_usage()
    }
}

/// The consume() options array, as the worker takes it.
fn worker_options(options: &PhpArray<'_>) -> PhpResult<WorkerOptions> {
    let ctx = "consume() options";
    let opts = Options::new(
        options.table(),
        &[
            "max_messages",
            "max_time",
            "idle_timeout",
            "memory_limit",
            "stop_signals",
            "on_error",
            "max_retries",
            "retry_delay",
            "dead_letter",
        ],
        ctx,
    )?;
    let limits = Limits {
        max_messages: opts.int_in("max_messages", 0, 0..=i64::MAX)? as u64,
        max_time: seconds(&opts, "max_time")?,
        idle_timeout: seconds(&opts, "idle_timeout")?,
        memory_limit: opts.int_in("memory_limit", 0, 0..=i64::MAX / (1024 * 1024))? as u64
            * 1024
            * 1024,
    };
    let on_error = match opts.string("on_error")?.as_deref() {
        None | Some("requeue") => OnError::Requeue,
        Some("reject") => OnError::Reject,
        Some("retry") => {
            let defaults = RetryPolicy::default();
            let max = i64::from(defaults.max_retries);
            OnError::Retry(RetryPolicy {
                max_retries: opts.int_in("max_retries", max, 0..=100)? as u32,
                delay: opts.duration("retry_delay", defaults.delay)?,
                dead_letter: opts.string("dead_letter")?,
            })
        }
        Some(other) => {
            return Err(invalid_argument(format!(
                "{ctx}: option 'on_error' must be 'requeue', 'reject' or 'retry', got '{other}'"
            )))
        }
    };
    let signals = match opts.array("stop_signals")? {
        None => vec![i64::from(libc::SIGTERM), i64::from(libc::SIGINT)],
        Some(list) => list
            .values()
            .map(|v| {
                v.dereference().long().ok_or_else(|| {
                    type_error(format!(
                        "{ctx}: 'stop_signals' must be a list of signal numbers"
                    ))
                })
            })
            .collect::<PhpResult<Vec<i64>>>()?,
    };
    Ok(WorkerOptions {
        limits,
        on_error,
        stop_signals: signals
            .iter()
            .map(|&sig| (sig, has_pcntl_handler(sig)))
            .collect(),
    })
}

/// `Class: message` of a thrown exception, for the dead-letter reason header.
fn describe_exception(thrown: &mut ZendObject) -> String {
    let class = thrown
        .get_class_name()
        .unwrap_or_else(|_| "exception".to_string());
    let message = thrown
        .try_call_method("getMessage", vec![])
        .ok()
        .and_then(|m| m.string())
        .unwrap_or_default();
    format!("{class}: {message}")
}

fn seconds(opts: &Options<'_>, key: &str) -> PhpResult<Option<Duration>> {
    let value = opts.duration(key, Duration::ZERO)?;
    Ok((!value.is_zero()).then_some(value))
}

/// Lets PHP run the pcntl handlers of signals that arrived while we waited in Rust.
fn dispatch_php_signals() {
    if let Ok(dispatch) = ZendCallable::try_from_name("pcntl_signal_dispatch") {
        let _ = dispatch.try_call(vec![]);
    }
}

/// Whether the user installed a pcntl handler (a callable) for `sig`.
fn has_pcntl_handler(sig: i64) -> bool {
    ZendCallable::try_from_name("pcntl_signal_get_handler")
        .ok()
        .and_then(|f| f.try_call(vec![&sig]).ok())
        .is_some_and(|handler| !handler.is_long() && !handler.is_null())
}

/// PHP's own memory use in bytes, as `memory_get_usage()` reports it.
fn php_memory_usage() -> u64 {
    ZendCallable::try_from_name("memory_get_usage")
        .ok()
        .and_then(|f| f.try_call(vec![]).ok())
        .and_then(|z| z.long())
        .map_or(0, |n| u64::try_from(n).unwrap_or(0))
}

#[php_impl]
impl Consumer {
    /// Calls `$callback(Message $m)` for each delivery until a limit, stop() or a signal;
    /// returns how many messages were handled. When it returns, the deliveries it had not
    /// handed to the callback yet go back to the queue.
    #[php(defaults(options = PhpArray::EMPTY))]
    pub fn consume(&self, callback: ZendCallable<'_>, options: PhpArray<'_>) -> PhpResult<i64> {
        guard("AmqpRs\\Consumer::consume()", || {
            if self.running.get() || self.inner.try_borrow_mut().is_err() {
                return Err(invalid_argument(
                    "consume() is already running on this consumer",
                ));
            }
            let options = worker_options(&options)?;
            let mut host = PhpHost {
                callback: &callback,
            };
            let _running = Running::start(&self.running);
            let handled = worker::run(&self.inner, &self.control, &options, &mut host)?;
            Ok(i64::try_from(handled).unwrap_or(i64::MAX))
        })
    }

    /// The next delivery from the consumer's prefetch buffer, waiting up to `timeout` seconds
    /// (0: only what has arrived); null when none came. Pull-style use of a push consumer:
    /// unlike consume(), nothing is settled for you — ack(), nack() or reject() the message
    /// (its ack is sent at once, not batched).
    #[php(defaults(timeout = 0.0))]
    pub fn next(&self, timeout: f64) -> PhpResult<Option<Message>> {
        guard("AmqpRs\\Consumer::next()", || {
            if !(timeout.is_finite() && timeout >= 0.0) {
                return Err(invalid_argument(format!(
                    "next(): timeout must be a number of seconds >= 0, got {timeout}"
                )));
            }
            let deadline = Instant::now() + Duration::from_secs_f64(timeout);
            // A SIGTERM/SIGINT the script handles (pcntl_signal) ends the wait early (null)
            // and its handler runs: a worker blocked here must not stop only when its timeout
            // runs out. Signals it does not handle keep their default effect.
            let with_chain: Vec<(i64, bool)> = [libc::SIGTERM, libc::SIGINT]
                .into_iter()
                .map(i64::from)
                .filter(|&sig| has_pcntl_handler(sig))
                .map(|sig| (sig, true))
                .collect();
            let stop_signals = StopSignals::install(&with_chain)?;
            loop {
                if stop_signals.triggered() {
                    drop(stop_signals);
                    dispatch_php_signals();
                    return Ok(None);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                let Ok(mut inner) = self.inner.try_borrow_mut() else {
                    return Err(invalid_argument("next() cannot run while consume() waits"));
                };
                let next = inner.next(left.min(TICK), false)?;
                drop(inner);
                match next {
                    Some(Incoming::Message(delivery)) => return Ok(Some(Message::new(delivery))),
                    // Settled already; the application never sees a message with `?` bytes.
                    Some(Incoming::Poisoned(warning)) => warn(&warning)?,
                    None => {
                        dispatch_php_signals();
                        if left <= TICK {
                            return Ok(None);
                        }
                    }
                }
            }
        })
    }

    /// Makes consume() return after the message in hand.
    pub fn stop(&self) {
        self.control.stop();
    }

    /// Cancels the subscription (basic.cancel) and gives the deliveries not handed out yet
    /// back to the queue; from inside a callback it takes effect when the callback returns.
    pub fn cancel(&self) -> PhpResult<()> {
        guard("AmqpRs\\Consumer::cancel()", || {
            if self.running.get() {
                self.control.request_cancel();
                return Ok(());
            }
            match self.inner.try_borrow_mut() {
                Ok(mut inner) => Ok(inner.cancel()?),
                Err(_) => {
                    self.control.request_cancel();
                    Ok(())
                }
            }
        })
    }
}
