//! Publishing with pipelined publisher confirms.
//!
//! Hot path: `publish()` builds lapin's publish future and polls it once on the PHP thread.
//! That first poll hands the frames to the io-loop thread and returns; nothing crosses back.
//! The future stays in an in-flight queue and resolves later to the broker's confirm, so a run
//! of publishes costs no round trip each; `wait_for_confirms()` then awaits them all in one
//! `block_on`. The queue is bounded (`MAX_IN_FLIGHT`): a publisher faster than the broker waits
//! for the oldest confirms instead of growing memory without limit.

use crate::core::connection::{Link, COMMAND_TIMEOUT};
use crate::core::error::{self, Error, Result};
use crate::core::frame_size::content_header_size;
use crate::core::ids;
use crate::core::runtime;
use crate::core::shortstr::shortstr;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Confirmation;
use lapin::{BasicProperties, Channel};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::mem::ManuallyDrop;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Most publishes awaiting their confirm (or, without confirms, their write) at once.
const MAX_IN_FLIGHT: usize = 2000;
/// Most body bytes in flight at once: with large bodies the count alone let a publisher hold
/// 2000 x 64 KiB (240 MB of RSS in the bench's P2-64K, against 20 MB for the other clients).
const MAX_IN_FLIGHT_BYTES: usize = 16 << 20;

/// How long a delay queue may sit unused (no declare) beyond its delay before the broker
/// deletes it, and how often a producer declares it again while using it.
const DELAY_QUEUE_IDLE: Duration = Duration::from_secs(3600);
const DELAY_QUEUE_REDECLARE: Duration = Duration::from_secs(300);

/// Name of the delay queue for messages to `exchange` with `routing_key`, held `ms`.
pub fn delay_queue_name(exchange: &str, routing_key: &str, ms: u64) -> String {
    let target = if exchange.is_empty() {
        "(default)"
    } else {
        exchange
    };
    let name = format!("amq_rs.delay.{ms}ms.{target}.{routing_key}");
    if name.len() <= 255 {
        return name;
    }
    // Too long for a queue name: a fixed hash of the target instead (same in every process).
    let mut hasher = std::hash::DefaultHasher::new();
    std::hash::Hash::hash(&(exchange, routing_key), &mut hasher);
    format!(
        "amq_rs.delay.{ms}ms.#{:016x}",
        std::hash::Hasher::finish(&hasher)
    )
}

/// Delay before the first republish of a nacked message; it doubles each time, up to the max.
const NACK_RETRY_DELAY: Duration = Duration::from_millis(250);
const NACK_RETRY_MAX_DELAY: Duration = Duration::from_secs(5);

/// Settings of a producer.
#[derive(Clone, Copy, Debug)]
pub struct ProducerOptions {
    /// Publisher confirms (default true).
    pub confirms: bool,
    /// Ask the broker to return unroutable messages (default false).
    pub mandatory: bool,
    /// How long `publish()` waits while the broker blocks the connection (default 30 s).
    pub blocked_timeout: Duration,
    /// How many times a nacked message is republished, on a new channel and after a growing
    /// delay, before it is reported as failed (default 6, about 13 s in all; 0: report at once).
    pub nack_retries: u32,
    /// Give each message without a `message_id` a random UUID one (default false), so that
    /// consumers can recognise a message published twice.
    pub stamp_message_id: bool,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        Self {
            confirms: true,
            mandatory: false,
            blocked_timeout: COMMAND_TIMEOUT,
            nack_retries: 6,
            stamp_message_id: false,
        }
    }
}

/// One message to publish.
pub struct Outgoing {
    /// Target exchange ("" is the default exchange).
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Body, any bytes.
    pub body: Vec<u8>,
    /// AMQP basic properties, headers included.
    pub properties: BasicProperties,
}

/// A message the broker did not take: nacked, returned as unroutable, or lost with its channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Its `message_id` property, if it had one.
    pub message_id: Option<String>,
    /// AMQP reply code when the broker gave one (312 NO_ROUTE, 404...), 0 for a nack.
    pub reply_code: u16,
    /// Why, in words.
    pub reason: String,
}

/// What a failure report needs to name a message.
struct Meta {
    /// Which of the producer's channels carried it (they are reopened after a channel error).
    channel: u64,
    exchange: String,
    routing_key: String,
    message_id: Option<String>,
}

type PublishFuture = Pin<Box<dyn Future<Output = lapin::Result<Confirmation>> + Send>>;

struct InFlight {
    future: PublishFuture,
    meta: Meta,
    /// The result, once the future gave it (it may resolve before older publishes).
    outcome: Option<lapin::Result<Confirmation>>,
    /// The message itself, kept (with confirms and nack retries on) to republish if nacked.
    copy: Option<Copy>,
    /// Size of its body, for the bound on bytes in flight.
    bytes: usize,
}

/// What republishing a nacked message needs.
struct Copy {
    body: Arc<Vec<u8>>,
    properties: BasicProperties,
    /// Times it was nacked so far.
    nacks: u32,
}

/// A nacked message waiting for its republish.
struct Retry {
    due: Instant,
    meta: Meta,
    copy: Copy,
}

impl InFlight {
    /// Polls unless already resolved; true once the outcome is in.
    fn resolved(&mut self, cx: &mut Context<'_>) -> bool {
        if self.outcome.is_none() {
            if let Poll::Ready(result) = self.future.as_mut().poll(cx) {
                self.outcome = Some(result);
            }
        }
        self.outcome.is_some()
    }
}

impl Meta {
    fn failure(&self, reply_code: u16, reason: String) -> Failure {
        Failure {
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
            message_id: self.message_id.clone(),
            reply_code,
            reason,
        }
    }
}

/// A publisher on its own channel of a connection.
pub struct Producer {
    link: Arc<Link>,
    // Leaked rather than dropped in a forked child, like the link.
    channel: ManuallyDrop<Option<Channel>>,
    options: ProducerOptions,
    in_flight: VecDeque<InFlight>,
    failures: Vec<(u64, Failure)>,
    /// The first channel-level error the caller has not heard of, and its channel.
    channel_error: Option<(u64, Error)>,
    /// Channels whose loss the caller has heard of: later failures from them are covered.
    reported_channel: u64,
    /// Number of the current channel.
    channel_number: u64,
    /// Body bytes of the publishes in `in_flight`.
    in_flight_bytes: usize,
    /// Nacked messages to republish, soonest first.
    retrying: VecDeque<Retry>,
    /// Queues this producer declared (delay and dead-letter queues), and when.
    declared: HashMap<String, Instant>,
    /// A nack came: the next publish goes on a new channel. After losing a quorum queue's
    /// leader, a channel can get nothing but nacks for 15 s and more while a new one works.
    renew_channel: bool,
}

impl Producer {
    pub(crate) fn new(link: Arc<Link>, options: ProducerOptions) -> Result<Self> {
        let mut producer = Self {
            link,
            channel: ManuallyDrop::new(None),
            options,
            in_flight: VecDeque::new(),
            failures: Vec::new(),
            channel_error: None,
            reported_channel: 0,
            channel_number: 0,
            in_flight_bytes: 0,
            retrying: VecDeque::new(),
            renew_channel: false,
            declared: HashMap::new(),
        };
        producer.channel()?;
        Ok(producer)
    }

    /// The producer's channel, reopened (in confirm mode when asked) after the broker closed it.
    fn channel(&mut self) -> Result<Channel> {
        if std::mem::take(&mut self.renew_channel) {
            // Publishes in flight on the old channel keep it open until they settle.
            *self.channel = None;
        }
        if let Some(channel) = self.channel.as_ref() {
            // Recovered by lapin after a lost connection: same channel, confirm mode restored.
            if self.link.channel_usable(channel) {
                return Ok(channel.clone());
            }
        }
        let channel = if self.options.confirms {
            self.link.open_confirm_channel("publish")?
        } else {
            self.link.open_channel("publish")?
        };
        *self.channel = Some(channel.clone());
        self.channel_number += 1;
        Ok(channel)
    }

    /// Hands the message to the connection without waiting for the broker.
    ///
    /// A channel error from an earlier publish (e.g. 404 for a missing exchange, which the
    /// broker reports after the fact) is raised here, once, before anything else is sent.
    pub fn publish(&mut self, message: Outgoing) -> Result<()> {
        self.reap();
        if let Some(err) = self.take_channel_error() {
            return Err(err);
        }
        self.link.ensure_usable("publish")?;
        self.wait_while_blocked(&message.exchange)?;
        if self.in_flight.len() >= MAX_IN_FLIGHT || self.in_flight_bytes >= MAX_IN_FLIGHT_BYTES {
            self.wait_for_room()?;
        }
        self.resend_due()?;
        let header_size = content_header_size(&message.properties);
        let frame_max = self.link.frame_max() as usize;
        if header_size > frame_max {
            // The broker would close the whole connection (501 FRAME_ERROR): refuse it here.
            return Err(Error::invalid_argument(format!(
                "publish to exchange '{}' with routing key '{}': the message's properties and \
                 headers take {header_size} bytes, more than the {frame_max} bytes of one frame \
                 (frame_max) on {}",
                message.exchange,
                message.routing_key,
                self.link.endpoint()
            )));
        }
        let Outgoing {
            exchange,
            routing_key,
            body,
            mut properties,
        } = message;
        if self.options.stamp_message_id && properties.message_id().is_none() {
            properties = properties.with_message_id(ids::uuid_v4()?.into());
        }
        let meta = Meta {
            channel: 0,
            exchange,
            routing_key,
            message_id: properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_string()),
        };
        self.send(meta, Arc::new(body), properties, 0)
    }

    /// Publishes on the current channel and puts the publish in flight.
    fn send(
        &mut self,
        mut meta: Meta,
        body: Arc<Vec<u8>>,
        properties: BasicProperties,
        nacks: u32,
    ) -> Result<()> {
        let exchange_name = shortstr(&meta.exchange, "exchange name")?;
        let routing_key = shortstr(&meta.routing_key, "routing key")?;
        let channel = self.channel()?;
        meta.channel = self.channel_number;
        let options = BasicPublishOptions {
            mandatory: self.options.mandatory,
            immediate: false,
        };
        let bytes = body.len();
        let copy = (self.options.confirms && self.options.nack_retries > 0).then(|| Copy {
            body: body.clone(),
            properties: properties.clone(),
            nacks,
        });
        let mut future: PublishFuture = Box::pin(async move {
            let confirm = channel
                .basic_publish(exchange_name, routing_key, options, &body, properties)
                .await?;
            confirm.await
        });
        // The first poll queues the frames for the io-loop; the rest happens there.
        let mut cx = Context::from_waker(Waker::noop());
        let outcome = match future.as_mut().poll(&mut cx) {
            Poll::Ready(result) => Some(result),
            Poll::Pending => None,
        };
        let publish = InFlight {
            future,
            meta,
            outcome,
            copy,
            bytes,
        };
        if publish.outcome.is_some() {
            self.settle(publish);
        } else {
            self.in_flight_bytes += bytes;
            self.in_flight.push_back(publish);
        }
        Ok(())
    }

    /// Republishes the nacked messages whose delay is over.
    fn resend_due(&mut self) -> Result<()> {
        let now = Instant::now();
        while self.retrying.front().is_some_and(|r| r.due <= now) {
            if let Some(Retry { meta, copy, .. }) = self.retrying.pop_front() {
                self.send(meta, copy.body, copy.properties, copy.nacks)?;
            }
        }
        Ok(())
    }

    /// Publishes `message` to be routed `delay` from now: it waits in a delay queue the
    /// producer declares (per exchange, routing key and delay: a per-queue TTL, so no message
    /// waits behind a longer one), whose dead-letter target is the message's own exchange and
    /// routing key. Confirmed means safely in the delay queue.
    pub fn publish_delayed(&mut self, message: Outgoing, delay: Duration) -> Result<()> {
        let ms = u64::try_from(delay.as_millis())
            .unwrap_or(u64::MAX)
            .clamp(1, u64::from(u32::MAX));
        let queue = delay_queue_name(&message.exchange, &message.routing_key, ms);
        self.declare_delay_queue(&queue, &message, ms)?;
        self.publish(Outgoing {
            exchange: String::new(),
            routing_key: queue,
            ..message
        })
    }

    /// Declares the delay queue unless this producer did so recently. Declaring it again
    /// keeps its `x-expires` clock from running out while messages wait in it.
    fn declare_delay_queue(&mut self, queue: &str, message: &Outgoing, ms: u64) -> Result<()> {
        let mut arguments = FieldTable::default();
        arguments.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ms as i64));
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(message.exchange.as_str().into()),
        );
        arguments.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(message.routing_key.as_str().into()),
        );
        // Unused for an hour past the delay: gone, so that one-off delays leave nothing
        // behind. Always longer than a message can wait in it (it is declared again first).
        let expires = ms.saturating_add(DELAY_QUEUE_IDLE.as_millis() as u64);
        arguments.insert("x-expires".into(), AMQPValue::LongLongInt(expires as i64));
        self.declare_queue(queue, arguments)
    }

    /// Declares a durable queue on the producer's channel (so that recovery declares it
    /// again), unless this producer did so less than `DELAY_QUEUE_REDECLARE` ago.
    pub(crate) fn declare_queue(&mut self, queue: &str, arguments: FieldTable) -> Result<()> {
        let now = Instant::now();
        if self
            .declared
            .get(queue)
            .is_some_and(|at| now.duration_since(*at) < DELAY_QUEUE_REDECLARE)
        {
            return Ok(());
        }
        self.link.ensure_usable("declare a queue")?;
        let channel = self.channel()?;
        let options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let context = format!("declare queue '{queue}' on {}", self.link.endpoint());
        let name = shortstr(queue, "queue name")?;
        runtime::block_on(
            channel.queue_declare(name, options, arguments),
            COMMAND_TIMEOUT,
            &context,
        )?
        .map_err(|e| Error::from_lapin(&e, &context))?;
        self.declared.insert(queue.to_string(), now);
        Ok(())
    }

    /// Publishing into a connection the broker blocked (a memory or disk alarm) would only
    /// pile messages up in memory: wait for it to unblock, up to `blocked_timeout`.
    fn wait_while_blocked(&self, exchange: &str) -> Result<()> {
        let deadline = Instant::now() + self.options.blocked_timeout;
        while self.link.blocked() {
            if Instant::now() >= deadline {
                return Err(Error::timeout(format!(
                    "publish to exchange '{exchange}' on {}: the broker has blocked this \
                     connection (connection.blocked: a memory or disk alarm) for {:.1} s \
                     (blocked_timeout); publishing resumes once it unblocks",
                    self.link.endpoint(),
                    self.options.blocked_timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Settles every in-flight publish that has resolved, oldest first, without blocking.
    fn reap(&mut self) {
        let mut done = Vec::new();
        let mut settled = 0;
        let _ = settle_front(
            &mut self.in_flight,
            0,
            &mut Context::from_waker(Waker::noop()),
            &mut done,
            &mut settled,
        );
        self.in_flight_bytes -= settled;
        for publish in done {
            self.settle(publish);
        }
    }

    /// Blocks until at most `keep` publishes are in flight (and, for 0, no nacked message is
    /// waiting for its republish), or `limit` runs out.
    ///
    /// One wait for the whole batch: the PHP thread parks and is woken as confirms arrive,
    /// instead of crossing threads once per message; the runtime's workers are not involved.
    fn wait_until(&mut self, keep: usize, limit: Duration) -> Result<()> {
        let context = format!("wait for publisher confirms on {}", self.link.endpoint());
        let deadline = Instant::now() + limit;
        loop {
            self.resend_due()?;
            let now = Instant::now();
            let until = match self.retrying.front() {
                Some(retry) if keep == 0 => retry.due.min(deadline),
                _ => deadline,
            };
            let mut done = Vec::new();
            let mut settled = 0;
            let in_flight = &mut self.in_flight;
            let waited = runtime::park_on(
                std::future::poll_fn(|cx| {
                    settle_front(in_flight, keep, cx, &mut done, &mut settled)
                }),
                until.saturating_duration_since(now),
                &context,
            );
            self.in_flight_bytes -= settled;
            for publish in done {
                self.settle(publish);
            }
            let retries_left = keep == 0 && !self.retrying.is_empty();
            match waited {
                Ok(()) if !retries_left => return Ok(()),
                Err(err) if Instant::now() >= deadline => {
                    return Err(Error::timeout(format!(
                        "{}: {} publishes still unconfirmed{}",
                        err.message(),
                        self.in_flight.len() + self.retrying.len(),
                        if self.link.blocked() {
                            " (the broker has blocked this connection: connection.blocked, a \
                             memory or disk alarm)"
                        } else {
                            ""
                        }
                    )))
                }
                Ok(()) => {
                    // Everything in flight settled; the next republish is not due yet.
                    if let Some(retry) = self.retrying.front() {
                        std::thread::sleep(
                            retry
                                .due
                                .min(deadline)
                                .saturating_duration_since(Instant::now()),
                        );
                    }
                }
                Err(_) => {} // a republish is due
            }
        }
    }

    fn settle(&mut self, publish: InFlight) {
        let InFlight {
            meta,
            outcome,
            copy,
            ..
        } = publish;
        let Some(result) = outcome else {
            return;
        };
        if let (Ok(Confirmation::Nack(None)), Some(copy)) = (&result, copy) {
            if copy.nacks < self.options.nack_retries {
                self.retry_nacked(meta, copy);
                return;
            }
        }
        let publish = &meta;
        match result {
            Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => {}
            Ok(Confirmation::Ack(Some(returned))) | Ok(Confirmation::Nack(Some(returned))) => {
                self.failures.push((
                    publish.channel,
                    publish.failure(
                        returned.reply_code,
                        format!(
                            "returned by the broker: {} {}",
                            returned.reply_code, returned.reply_text
                        ),
                    ),
                ));
            }
            Ok(Confirmation::Nack(None)) => self.failures.push((
                publish.channel,
                publish.failure(
                    0,
                    match self.options.nack_retries {
                        0 => "nacked by the broker".to_string(),
                        n => format!(
                            "nacked by the broker {} times (republished {n} times, each on a \
                             new channel)",
                            n + 1
                        ),
                    },
                ),
            )),
            Err(_) if publish.channel <= self.reported_channel => {
                // Lost with a channel whose closing the caller was already told of.
            }
            Err(err) if self.link.recovers() && error::lost_connection(&err) => {
                // The connection broke before the broker confirmed it: it may or may not have
                // arrived. Reported as a failure; the producer goes on once lapin recovers.
                self.failures.push((
                    publish.channel,
                    publish.failure(
                        0,
                        format!(
                            "connection to {} lost before the broker confirmed it (it may or \
                             may not have arrived): {err}",
                            self.link.endpoint()
                        ),
                    ),
                ));
            }
            Err(err) => {
                let context = format!(
                    "publish to exchange '{}' with routing key '{}' on {}",
                    publish.exchange,
                    publish.routing_key,
                    self.link.endpoint()
                );
                let error = Error::from_lapin(&err, &context);
                self.failures.push((
                    publish.channel,
                    publish.failure(error.code(), error.message().to_string()),
                ));
                if self.channel_error.is_none() {
                    self.channel_error = Some((publish.channel, error));
                }
            }
        }
    }

    /// Schedules a nacked message's republish, after a delay that doubles with each nack, on
    /// a new channel.
    fn retry_nacked(&mut self, meta: Meta, mut copy: Copy) {
        let delay = NACK_RETRY_DELAY
            .saturating_mul(1 << copy.nacks.min(16))
            .min(NACK_RETRY_MAX_DELAY);
        copy.nacks += 1;
        if meta.channel == self.channel_number {
            self.renew_channel = true;
        }
        self.retrying.push_back(Retry {
            due: Instant::now() + delay,
            meta,
            copy,
        });
        // Delays grow with the nack count, so a later nack can be due before an earlier one.
        self.retrying.make_contiguous().sort_by_key(|r| r.due);
    }

    /// The pending channel error, once: the failures of that channel are folded into it, and
    /// its messages still in flight will be lost without another report.
    fn take_channel_error(&mut self) -> Option<Error> {
        let (channel, err) = self.channel_error.take()?;
        let before = self.failures.len();
        self.failures.retain(|(c, _)| *c != channel);
        let lost = before - self.failures.len();
        self.reported_channel = self.reported_channel.max(channel);
        Some(Error::new(
            err.kind(),
            format!(
                "{} (the broker closed the channel: {lost} messages published on it failed, \
                 any still unconfirmed on it are lost too; the next publish opens a new channel)",
                err.message()
            ),
        ))
    }

    fn wait_for_room(&mut self) -> Result<()> {
        let keep = if self.in_flight_bytes >= MAX_IN_FLIGHT_BYTES {
            self.in_flight.len() / 2
        } else {
            MAX_IN_FLIGHT / 2
        };
        self.wait_until(keep, COMMAND_TIMEOUT)
    }

    /// Publishes not yet confirmed by the broker (or, without confirms, not yet written).
    pub fn pending(&mut self) -> usize {
        self.reap();
        self.in_flight.len() + self.retrying.len()
    }

    /// Waits up to `timeout` for every publish so far; returns the failures since the last
    /// call (nacked, returned, lost with a closed channel), oldest first.
    pub fn wait_for_confirms(&mut self, timeout: Duration) -> Result<Vec<Failure>> {
        self.wait_until(0, timeout)?;
        if let Some(err) = self.take_channel_error() {
            return Err(err);
        }
        Ok(self.failures.drain(..).map(|(_, f)| f).collect())
    }

    /// Whether failures or unconfirmed publishes are waiting to be reported.
    pub fn has_unreported(&mut self) -> bool {
        self.reap();
        !self.in_flight.is_empty() || !self.retrying.is_empty() || !self.failures.is_empty()
    }

    /// False in a forked child: this producer belongs to the parent's connection.
    pub fn is_own(&self) -> bool {
        self.link.is_own()
    }

    /// The endpoint, for messages.
    pub fn endpoint(&self) -> &str {
        self.link.endpoint()
    }

    /// Negotiated frame size of the connection.
    pub fn frame_max(&self) -> u32 {
        self.link.frame_max()
    }
}

/// Settles in-flight publishes from the front while they are resolved, until `keep` remain;
/// Pending as soon as the oldest is not. Resolved ones that failed go to `done` in order.
///
/// Confirms normally arrive in publish order, so the waker goes to the last publish the caller
/// waits for: the PHP thread is woken once for the batch, not once per confirm frame. Should
/// that one resolve first (out of order), the waker goes to the oldest instead.
fn settle_front(
    in_flight: &mut VecDeque<InFlight>,
    keep: usize,
    cx: &mut Context<'_>,
    done: &mut Vec<InFlight>,
    settled_bytes: &mut usize,
) -> Poll<()> {
    let mut noop = Context::from_waker(Waker::noop());
    while in_flight.len() > keep {
        let target = in_flight.len() - keep - 1;
        let front_resolved = match in_flight.front_mut() {
            Some(front) => front.resolved(&mut noop),
            None => break,
        };
        if front_resolved {
            *settled_bytes += in_flight.front().map_or(0, |f| f.bytes);
            match in_flight.pop_front() {
                // Most publishes: nothing to report. Only failures are collected, or `done`
                // would grow to thousands of large entries per call, fresh pages each time.
                Some(InFlight {
                    outcome: Some(Ok(Confirmation::Ack(None) | Confirmation::NotRequested)),
                    ..
                }) => {}
                Some(publish) => done.push(publish),
                None => {}
            }
            continue;
        }
        let target_waits = match in_flight.get_mut(target) {
            Some(last) if target != 0 => !last.resolved(cx),
            _ => false,
        };
        // Otherwise the oldest gets the waker; resolved meanwhile, it is settled next round.
        if target_waits || !in_flight.front_mut().is_some_and(|f| f.resolved(cx)) {
            return Poll::Pending;
        }
    }
    Poll::Ready(())
}

impl Drop for Producer {
    fn drop(&mut self) {
        if self.link.is_own() {
            if let Some(channel) = self.channel.as_ref() {
                self.link.close_channel(channel, "producer");
            }
            // SAFETY: dropped exactly once, here, and never used again.
            unsafe { ManuallyDrop::drop(&mut self.channel) };
        } else {
            // Parent's futures reference the parent's channel: leak them with it.
            std::mem::forget(std::mem::take(&mut self.in_flight));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::connection::tests::connect;
    use crate::core::error::ErrorKind;
    use crate::core::topology::QueueSpec;

    fn message(exchange: &str, routing_key: &str, body: &[u8]) -> Outgoing {
        Outgoing {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            body: body.to_vec(),
            properties: BasicProperties::default().with_message_id("id-1".into()),
        }
    }

    fn temp_queue(conn: &mut crate::core::connection::Connection) -> String {
        let spec = QueueSpec {
            exclusive: true,
            durable: false,
            ..QueueSpec::default()
        };
        conn.declare_queue("", spec).expect("queue").name
    }

    /// A publish whose confirm the test releases by hand.
    #[derive(Clone, Default)]
    struct Gate(Arc<std::sync::Mutex<(bool, Option<Waker>)>>);

    impl Gate {
        fn open(&self) {
            let mut state = self.0.lock().expect("gate");
            state.0 = true;
            if let Some(waker) = state.1.take() {
                waker.wake();
            }
        }

        /// A publish the broker will nack once the gate opens (failures are what settle_front
        /// hands back, so the tests can see their order).
        fn in_flight(&self, id: &str) -> InFlight {
            self.resolving_to(id, Confirmation::Nack(None))
        }

        fn resolving_to(&self, id: &str, confirmation: Confirmation) -> InFlight {
            let gate = self.clone();
            let mut confirmation = Some(confirmation);
            InFlight {
                future: Box::pin(std::future::poll_fn(move |cx| {
                    let mut state = gate.0.lock().expect("gate");
                    if state.0 {
                        Poll::Ready(Ok(confirmation.take().expect("polled once ready")))
                    } else {
                        state.1 = Some(cx.waker().clone());
                        Poll::Pending
                    }
                })),
                meta: Meta {
                    channel: 1,
                    exchange: String::new(),
                    routing_key: String::new(),
                    message_id: Some(id.to_string()),
                },
                outcome: None,
                copy: None,
                bytes: 0,
            }
        }
    }

    /// Counts wake-ups of the waiting (PHP) thread.
    struct CountingWaker(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_batch_wait_is_woken_by_its_last_confirm_and_settles_in_publish_order() {
        let gates: Vec<Gate> = (0..3).map(|_| Gate::default()).collect();
        let mut in_flight: VecDeque<InFlight> = gates
            .iter()
            .enumerate()
            .map(|(i, g)| g.in_flight(&i.to_string()))
            .collect();
        let counter = Arc::new(CountingWaker(Default::default()));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let mut done = Vec::new();
        let woken = || counter.0.load(std::sync::atomic::Ordering::SeqCst);

        assert!(settle_front(&mut in_flight, 0, &mut cx, &mut done, &mut 0).is_pending());
        gates[0].open();
        gates[1].open();
        assert_eq!(woken(), 0, "earlier confirms do not wake a wait for all");
        gates[2].open();
        assert_eq!(woken(), 1);
        assert!(settle_front(&mut in_flight, 0, &mut cx, &mut done, &mut 0).is_ready());
        let ids: Vec<_> = done.iter().map(|p| p.meta.message_id.clone()).collect();
        assert_eq!(ids, ["0", "1", "2"].map(|s| Some(s.to_string())));
    }

    #[test]
    fn a_confirm_out_of_order_moves_the_wait_to_the_oldest() {
        let gates: Vec<Gate> = (0..2).map(|_| Gate::default()).collect();
        let mut in_flight: VecDeque<InFlight> = gates.iter().map(|g| g.in_flight("x")).collect();
        let counter = Arc::new(CountingWaker(Default::default()));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let mut done = Vec::new();

        assert!(settle_front(&mut in_flight, 0, &mut cx, &mut done, &mut 0).is_pending());
        gates[1].open();
        assert!(settle_front(&mut in_flight, 0, &mut cx, &mut done, &mut 0).is_pending());
        assert!(done.is_empty(), "nothing settles before the oldest");
        gates[0].open();
        assert_eq!(counter.0.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert!(settle_front(&mut in_flight, 0, &mut cx, &mut done, &mut 0).is_ready());
        assert_eq!(done.len(), 2);
    }

    #[test]
    fn acked_publishes_are_settled_without_being_collected() {
        let gate = Gate::default();
        let mut in_flight: VecDeque<InFlight> = (0..3)
            .map(|i| gate.resolving_to(&i.to_string(), Confirmation::Ack(None)))
            .chain([gate.in_flight("nacked")])
            .collect();
        let mut done = Vec::new();
        gate.open();
        let mut cx = Context::from_waker(Waker::noop());
        assert!(settle_front(&mut in_flight, 0, &mut cx, &mut done, &mut 0).is_ready());
        assert!(in_flight.is_empty());
        let ids: Vec<_> = done.iter().map(|p| p.meta.message_id.clone()).collect();
        assert_eq!(ids, [Some("nacked".to_string())]);
    }

    #[test]
    fn pipelined_publishes_are_all_confirmed_and_land() {
        let mut conn = connect();
        let queue = temp_queue(&mut conn);
        let producer = conn.producer(ProducerOptions::default()).expect("producer");
        let mut producer = producer.lock().expect("lock");
        for i in 0..1000u32 {
            producer
                .publish(message("", &queue, &i.to_be_bytes()))
                .expect("publish");
        }
        let failures = producer
            .wait_for_confirms(Duration::from_secs(10))
            .expect("confirms");
        assert!(failures.is_empty());
        assert_eq!(producer.pending(), 0);
        drop(producer);
        assert_eq!(conn.queue_status(&queue).expect("status").messages, 1000);
    }

    #[test]
    fn large_bodies_in_flight_stay_under_the_byte_bound() {
        let mut conn = connect();
        // Durable, so that the broker's confirms lag (fsync) and publishes pile up.
        let queue = conn
            .declare_queue("amqp_rs.core.byte-bound", QueueSpec::default())
            .expect("queue")
            .name;
        conn.purge_queue(&queue).expect("purge");
        let producer = conn.producer(ProducerOptions::default()).expect("producer");
        let mut producer = producer.lock().expect("lock");
        let body = vec![7u8; 64 << 10];
        let mut most = 0;
        for _ in 0..400 {
            producer
                .publish(message("", &queue, &body))
                .expect("publish");
            most = most.max(producer.in_flight_bytes);
        }
        assert!(most <= MAX_IN_FLIGHT_BYTES, "{most} bytes in flight");
        assert!(producer
            .wait_for_confirms(Duration::from_secs(30))
            .expect("confirms")
            .is_empty());
        assert_eq!(producer.in_flight_bytes, 0);
        drop(producer);
        assert_eq!(conn.queue_status(&queue).expect("status").messages, 400);
        conn.delete_queue(&queue, false, false).expect("delete");
        assert!(
            most > MAX_IN_FLIGHT_BYTES / 2,
            "the bound was reached: {most}"
        );
    }

    #[test]
    fn missing_exchange_is_a_404_channel_error_and_the_next_publish_works() {
        let mut conn = connect();
        let queue = temp_queue(&mut conn);
        let producer = conn.producer(ProducerOptions::default()).expect("producer");
        let mut producer = producer.lock().expect("lock");
        producer
            .publish(message("amqp_rs.core.no-such-exchange", "k", b"x"))
            .expect("pipelined");
        let err = producer
            .wait_for_confirms(Duration::from_secs(5))
            .expect_err("404");
        assert_eq!(err.kind(), ErrorKind::Channel(404));
        producer
            .publish(message("", &queue, b"ok"))
            .expect("reopened");
        assert!(producer
            .wait_for_confirms(Duration::from_secs(5))
            .expect("confirmed")
            .is_empty());
    }

    #[test]
    fn unroutable_mandatory_message_is_one_named_failure() {
        let mut conn = connect();
        let options = ProducerOptions {
            mandatory: true,
            ..ProducerOptions::default()
        };
        let producer = conn.producer(options).expect("producer");
        let mut producer = producer.lock().expect("lock");
        producer
            .publish(message("amq.direct", "amqp_rs.core.nobody", b"x"))
            .expect("publish");
        let failures = producer
            .wait_for_confirms(Duration::from_secs(5))
            .expect("confirms");
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].reply_code, 312);
        assert_eq!(failures[0].routing_key, "amqp_rs.core.nobody");
        assert_eq!(failures[0].message_id.as_deref(), Some("id-1"));
    }

    #[test]
    fn close_reports_failures_the_caller_never_collected() {
        let mut conn = connect();
        let options = ProducerOptions {
            mandatory: true,
            ..ProducerOptions::default()
        };
        let producer = conn.producer(options).expect("producer");
        producer
            .lock()
            .expect("lock")
            .publish(message("amq.direct", "amqp_rs.core.nobody", b"x"))
            .expect("publish");
        let err = conn.close().expect_err("failure reported");
        assert_eq!(err.kind(), ErrorKind::Publish);
        assert_eq!(err.failures().len(), 1);
        assert!(!conn.is_connected());
    }
}
