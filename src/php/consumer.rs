//! `AmqpRs\Consumer`: the worker loop that calls a PHP callable for each delivery.

use crate::core::consumer::{flush_settlements, Consumer as CoreConsumer, Settlement};
use crate::core::error::ErrorKind;
use crate::core::link::COMMAND_TIMEOUT;
use crate::core::retry::{Retrier, RetryPolicy};
use crate::core::stop_signals::StopSignals;
use crate::php::convert::{Options, PhpArray};
use crate::php::exceptions::{guard, invalid_argument, type_error, warn, ExceptionClass};
use crate::php::message::Message;
use ext_php_rs::convert::IntoZval;
use ext_php_rs::exception::{PhpException, PhpResult};
use ext_php_rs::prelude::*;
use ext_php_rs::types::ZendCallable;
use ext_php_rs::types::{ZendClassObject, ZendObject};
use ext_php_rs::zend::ExecutorGlobals;
use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

/// How long the loop waits for a delivery before it looks at its limits and lets PHP run its
/// pending signal handlers.
const TICK: Duration = Duration::from_millis(200);

/// Consumes one or more queues; made by `Connection::consumer()`.
#[php_class]
#[php(name = "AmqpRs\\Consumer")]
#[php(flags = ext_php_rs::flags::ClassFlags::Final)]
pub struct Consumer {
    // RefCell/Cell: the callback may call stop() or cancel() on this very object while
    // consume() runs.
    inner: RefCell<CoreConsumer>,
    auto_ack: bool,
    stop: Cell<bool>,
    cancel_requested: Cell<bool>,
    /// Republishes failed messages (`on_error` 'retry'); made on the first failure.
    retrier: RefCell<Option<Retrier>>,
}

/// What a callback that throws does to its message.
#[derive(Clone)]
enum OnError {
    Requeue,
    Reject,
    /// Back to its queue after a delay, then to a dead-letter queue; consume() goes on.
    Retry(RetryPolicy),
}

impl Consumer {
    /// Wraps a core consumer made by `Connection::consumer()`.
    pub(crate) fn new(inner: CoreConsumer, auto_ack: bool) -> Self {
        Self {
            inner: RefCell::new(inner),
            auto_ack,
            stop: Cell::new(false),
            cancel_requested: Cell::new(false),
            retrier: RefCell::new(None),
        }
    }

    /// Retries a message whose callback threw, or dead-letters it; acks it once the broker
    /// has the copy. The callback's exception is consumed: the failure is handled.
    fn retry(&self, message: &mut Message, queue: &str, policy: &RetryPolicy) -> PhpResult<()> {
        let reason = match ExecutorGlobals::take_exception() {
            Some(mut thrown) => describe_exception(&mut thrown),
            None => "the callback failed".to_string(),
        };
        if !message.needs_settling() {
            return Ok(());
        }
        let mut slot = self.retrier.borrow_mut();
        if slot.is_none() {
            *slot = Some(Retrier::new(self.inner.borrow().link())?);
        }
        let Some(retrier) = slot.as_mut() else {
            return Ok(());
        };
        let (body, properties) = message.content();
        let (exchange, routing_key) = message.delivered_as();
        match retrier.handle(
            queue,
            exchange,
            routing_key,
            body,
            properties,
            &reason,
            policy,
        ) {
            Ok(_) => message.settle_once(Settlement::Ack, "ack after passing the message on"),
            Err(err) => {
                // Not passed on: back to its queue, nothing lost.
                let _ = message.settle_once(Settlement::Nack { requeue: true }, "requeue");
                Err(err.into())
            }
        }
    }

    fn run(&self, callback: &ZendCallable<'_>, options: &PhpArray<'_>) -> PhpResult<i64> {
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
        let max_messages = opts.int_in("max_messages", 0, 0..=i64::MAX)?;
        let max_time = seconds(&opts, "max_time")?;
        let idle_timeout = seconds(&opts, "idle_timeout")?;
        let memory_limit =
            opts.int_in("memory_limit", 0, 0..=i64::MAX / (1024 * 1024))? * 1024 * 1024;
        let on_error = match opts.string("on_error")?.as_deref() {
            None | Some("requeue") => OnError::Requeue,
            Some("reject") => OnError::Reject,
            Some("retry") => {
                let defaults = RetryPolicy::default();
                OnError::Retry(RetryPolicy {
                    max_retries: opts.int_in(
                        "max_retries",
                        i64::from(defaults.max_retries),
                        0..=100,
                    )? as u32,
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
        let with_chain: Vec<(i64, bool)> = signals
            .iter()
            .map(|&sig| (sig, has_pcntl_handler(sig)))
            .collect();
        let stop_signals = StopSignals::install(&with_chain)?;
        let started = Instant::now();
        let mut last_activity = started;
        let mut handled: i64 = 0;
        self.stop.set(false);
        loop {
            if self.cancel_requested.take() {
                self.inner.borrow_mut().cancel()?;
            }
            if self.stop.get() || stop_signals.triggered() {
                break;
            }
            if max_messages > 0 && handled >= max_messages {
                break;
            }
            let now = Instant::now();
            let mut wait = TICK;
            if let Some(limit) = max_time {
                let Some(left) = limit.checked_sub(now - started) else {
                    break;
                };
                wait = wait.min(left);
            }
            if let Some(limit) = idle_timeout {
                let Some(left) = limit.checked_sub(now - last_activity) else {
                    break;
                };
                wait = wait.min(left);
            }
            let next = self.inner.borrow_mut().next(wait);
            let incoming = match next {
                Ok(Some(incoming)) => incoming,
                Ok(None) => {
                    dispatch_php_signals();
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::Other && self.cancel_requested.get() => break,
                Err(e) => return Err(e.into()),
            };
            last_activity = Instant::now();
            if let Some(warning) = incoming.poisoned {
                // Settled already; the application never sees a message with `?` for bytes.
                if let Err(thrown) = warn(&warning) {
                    let _ = self.inner.borrow().flush_acks();
                    return Err(thrown);
                }
                continue;
            }
            let message = Message::new(
                incoming.delivery,
                Some(incoming.consumer_tag),
                incoming.batch,
                self.auto_ack,
                Some(self.inner.borrow().link()),
            );
            let queue = incoming.queue;
            let mut object = ZendClassObject::new(message);
            let result = {
                let zval = (&mut *object).into_zval(false)?;
                callback.try_call(vec![&zval])
            };
            handled += 1;
            match result {
                Ok(_) => {
                    if object.needs_settling() {
                        object.settle_once(Settlement::Ack, "settle after the callback")?;
                    }
                }
                Err(_) if !self.auto_ack && matches!(on_error, OnError::Retry(_)) => {
                    if let OnError::Retry(policy) = &on_error {
                        if let Err(err) = self.retry(&mut object, &queue, policy) {
                            let _ = self.inner.borrow().flush_acks();
                            return Err(err);
                        }
                    }
                }
                Err(_) => {
                    // The callback threw: settle per on_error, then let its exception leave
                    // consume() unchanged (it is still pending in the engine).
                    if object.needs_settling() {
                        let how = match on_error {
                            OnError::Requeue | OnError::Retry(_) => {
                                Settlement::Nack { requeue: true }
                            }
                            OnError::Reject => Settlement::Reject { requeue: false },
                        };
                        let _ = object.settle_once(how, "settle after the callback threw");
                    }
                    let _ = self.inner.borrow().flush_acks();
                    let _ = flush_settlements(COMMAND_TIMEOUT);
                    // The pending exception wins over this one (see PhpException::throw).
                    return Err(PhpException::new(
                        "the consume() callback threw".to_string(),
                        0,
                        ExceptionClass::Base.ce(),
                    ));
                }
            }
            if memory_limit > 0 && php_memory_usage() >= memory_limit {
                break;
            }
        }
        self.inner.borrow().flush_acks()?;
        flush_settlements(COMMAND_TIMEOUT)?;
        Ok(handled)
    }
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
fn php_memory_usage() -> i64 {
    ZendCallable::try_from_name("memory_get_usage")
        .ok()
        .and_then(|f| f.try_call(vec![]).ok())
        .and_then(|z| z.long())
        .unwrap_or(0)
}

#[php_impl]
impl Consumer {
    /// Calls `$callback(Message $m)` for each delivery until a limit, stop() or a signal;
    /// returns how many messages were handled.
    #[php(defaults(options = PhpArray::EMPTY))]
    pub fn consume(&self, callback: ZendCallable<'_>, options: PhpArray<'_>) -> PhpResult<i64> {
        guard("AmqpRs\\Consumer::consume()", || {
            if self.inner.try_borrow_mut().is_err() {
                return Err(invalid_argument(
                    "consume() is already running on this consumer",
                ));
            }
            self.run(&callback, &options)
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
                let Some(incoming) = inner.next(left.min(TICK))? else {
                    drop(inner);
                    dispatch_php_signals();
                    if left <= TICK {
                        return Ok(None);
                    }
                    continue;
                };
                let link = inner.link();
                drop(inner);
                if let Some(warning) = incoming.poisoned {
                    // Settled already; the application never sees a message with `?` bytes.
                    warn(&warning)?;
                    continue;
                }
                return Ok(Some(Message::new(
                    incoming.delivery,
                    Some(incoming.consumer_tag),
                    None,
                    self.auto_ack,
                    Some(link),
                )));
            }
        })
    }

    /// Makes consume() return after the message in hand.
    pub fn stop(&self) {
        self.stop.set(true);
    }

    /// Cancels the subscription (basic.cancel); from inside a callback it takes effect when the
    /// callback returns.
    pub fn cancel(&self) -> PhpResult<()> {
        guard("AmqpRs\\Consumer::cancel()", || {
            match self.inner.try_borrow_mut() {
                Ok(mut inner) => Ok(inner.cancel()?),
                Err(_) => {
                    self.cancel_requested.set(true);
                    self.stop.set(true);
                    Ok(())
                }
            }
        })
    }
}
