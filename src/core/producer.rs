//! Publishing with pipelined publisher confirms.
//!
//! Hot path: `publish()` builds lapin's publish future and polls it once on the PHP thread.
//! That first poll hands the frames to the io-loop thread and returns; nothing crosses back.
//! The future stays in the in-flight window (`confirms.rs`) and resolves later to the broker's
//! confirm, so a run of publishes costs no round trip each; `wait_for_confirms()` then awaits
//! them all in one park. The window is bounded (`MAX_IN_FLIGHT`, `MAX_IN_FLIGHT_BYTES`): a
//! publisher faster than the broker waits for the oldest confirms instead of growing memory
//! without limit. Delayed publishing is in `delay.rs`.

use crate::core::confirms::{Confirms, Copy, InFlight, Meta, PublishFuture, Retry};
use crate::core::error::{Error, Failure, Result};
use crate::core::frame_size::content_header_size;
use crate::core::ids;
use crate::core::link::{Confirming, Link, COMMAND_TIMEOUT};
use crate::core::readiness::{AfterReady, Source};
use crate::core::runtime;
use crate::core::shortstr::shortstr;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::task::AbortHandle;

/// How often a producer declares again a queue it uses (delay and dead-letter queues), so
/// that their `x-expires` clock never runs out while messages wait in them.
const REDECLARE_AFTER: Duration = Duration::from_secs(300);

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

/// A publisher on its own channel of a connection.
pub struct Producer {
    link: Arc<Link>,
    // Leaked rather than dropped in a forked child, like the link.
    channel: ManuallyDrop<Option<Channel>>,
    options: ProducerOptions,
    confirms: Confirms,
    /// Queues this producer declared (delay and dead-letter queues), and when.
    declared: HashMap<String, Instant>,
    /// Its share of the connection's readiness fd, from the first `poll_confirms()`.
    source: Option<Source>,
    /// The timer that raises it when the next republish is due, and when that is.
    retry_timer: Option<(Instant, AbortHandle)>,
}

impl Producer {
    pub(crate) fn new(link: Arc<Link>, options: ProducerOptions) -> Result<Self> {
        let mut producer = Self {
            link,
            channel: ManuallyDrop::new(None),
            options,
            confirms: Confirms::new(options.nack_retries),
            declared: HashMap::new(),
            source: None,
            retry_timer: None,
        };
        producer.channel()?;
        Ok(producer)
    }

    /// The producer's channel, reopened (in confirm mode when asked) after the broker closed it.
    fn channel(&mut self) -> Result<Channel> {
        if std::mem::take(&mut self.confirms.renew_channel) {
            // Publishes in flight on the old channel keep it open until they settle.
            *self.channel = None;
        }
        if let Some(channel) = self.channel.as_ref() {
            // Recovered by lapin after a lost connection: same channel, confirm mode restored.
            if self.link.channel_usable(channel) {
                return Ok(channel.clone());
            }
        }
        let idle = self
            .options
            .confirms
            .then(|| self.link.idle().take_confirm())
            .flatten();
        let channel = match idle {
            Some(channel) => channel,
            None if self.options.confirms => self.link.open_confirm_channel("publish")?,
            None => self.link.open_channel("publish")?,
        };
        *self.channel = Some(channel.clone());
        self.confirms.channel_number += 1;
        Ok(channel)
    }

    /// Hands the message to the connection without waiting for the broker.
    ///
    /// A channel error from an earlier publish (e.g. 404 for a missing exchange, which the
    /// broker reports after the fact) is raised here, once, before anything else is sent.
    pub fn publish(&mut self, message: Outgoing) -> Result<()> {
        self.confirms.reap(&self.link);
        if let Some(err) = self.confirms.take_channel_error() {
            return Err(err);
        }
        self.link.ensure_usable("publish")?;
        self.wait_while_blocked(&message.exchange)?;
        if self.confirms.is_full() {
            let keep = self.confirms.room_target();
            self.wait_until(keep, COMMAND_TIMEOUT)?;
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
        meta.channel = self.confirms.channel_number;
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
        self.confirms.track(publish, &self.link);
        Ok(())
    }

    /// Republishes the nacked messages whose delay is over.
    fn resend_due(&mut self) -> Result<()> {
        let now = Instant::now();
        while let Some(Retry { meta, copy, .. }) = self.confirms.take_due(now) {
            self.send(meta, copy.body, copy.properties, copy.nacks)?;
        }
        Ok(())
    }

    /// Declares a durable queue on the producer's channel (so that recovery declares it
    /// again), unless this producer did so less than `DELAY_QUEUE_REDECLARE` ago.
    pub(crate) fn declare_queue(&mut self, queue: &str, arguments: FieldTable) -> Result<()> {
        let now = Instant::now();
        if self
            .declared
            .get(queue)
            .is_some_and(|at| now.duration_since(*at) < REDECLARE_AFTER)
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
        runtime::command(
            channel.queue_declare(name, options, arguments),
            COMMAND_TIMEOUT,
            &context,
        )?;
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
            // Woken by lapin's connection.unblocked event.
            self.link
                .wait_for_change(deadline.saturating_duration_since(Instant::now()));
        }
        Ok(())
    }

    /// Blocks until at most `keep` publishes are in flight (and, for 0, no nacked message is
    /// waiting for its republish), or `limit` runs out.
    ///
    /// One wait for the whole batch: the PHP thread parks and is woken as confirms arrive,
    /// instead of crossing threads once per message; the runtime's workers are not involved.
    fn wait_until(&mut self, keep: usize, limit: Duration) -> Result<()> {
        // A blocking wait leaves the readiness stream until the next pollConfirms(): the
        // confirms it settles would leave the source raised with no one to lower it.
        self.source = None;
        let context = format!("wait for publisher confirms on {}", self.link.endpoint());
        let deadline = Instant::now() + limit;
        loop {
            self.resend_due()?;
            let now = Instant::now();
            let next_due = self.confirms.next_due();
            let until = match next_due {
                Some(due) if keep == 0 => due.min(deadline),
                _ => deadline,
            };
            let waited = self.confirms.wait(
                keep,
                until.saturating_duration_since(now),
                &context,
                &self.link,
            );
            let retries_left = keep == 0 && self.confirms.next_due().is_some();
            match waited {
                Ok(()) if !retries_left => return Ok(()),
                Err(err) if Instant::now() >= deadline => {
                    return Err(Error::timeout(format!(
                        "{}: {} publishes still unconfirmed{}",
                        err.message(),
                        self.confirms.pending(),
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
                    if let Some(due) = self.confirms.next_due() {
                        std::thread::sleep(
                            due.min(deadline).saturating_duration_since(Instant::now()),
                        );
                    }
                }
                Err(_) => {} // a republish is due
            }
        }
    }

    /// Publishes not yet confirmed by the broker (or, without confirms, not yet written).
    pub fn pending(&mut self) -> usize {
        self.confirms.reap(&self.link);
        self.confirms.pending()
    }

    /// Waits up to `timeout` for every publish so far; returns the failures since the last
    /// call (nacked, returned, lost with a closed channel), oldest first.
    pub fn wait_for_confirms(&mut self, timeout: Duration) -> Result<Vec<Failure>> {
        self.wait_until(0, timeout)?;
        if let Some(err) = self.confirms.take_channel_error() {
            return Err(err);
        }
        Ok(self.confirms.take_failures())
    }

    /// Settles what the broker confirmed so far, without waiting: the failures since the last
    /// call and how many publishes are still unconfirmed. Until none is, the connection's
    /// readiness fd is raised when they all are, or when a nacked message's republish is due.
    pub fn poll_confirms(&mut self) -> Result<(Vec<Failure>, usize)> {
        if self.source.is_none() {
            let readiness = self.link.readiness("take publisher confirms")?;
            self.source = Some(readiness.source());
        }
        // Republishing waits for the channel: not while lapin recovers the connection.
        if self.link.usable_now("take publisher confirms")? {
            self.resend_due()?;
        } else if let Some(source) = &self.source {
            source.recheck_soon()?;
        }
        if let Some(source) = &self.source {
            let (confirms, link) = (&mut self.confirms, &self.link);
            let _ = source.take(AfterReady::Done, |cx| confirms.poll_settled(cx, link));
            let due = self.confirms.next_due();
            if due != self.retry_timer.as_ref().map(|(at, _)| *at) {
                if let Some((_, timer)) = self.retry_timer.take() {
                    timer.abort();
                }
                if let Some(due) = due {
                    self.retry_timer = Some((due, source.raise_at(due)?));
                }
            }
        }
        if let Some(err) = self.confirms.take_channel_error() {
            return Err(err);
        }
        Ok((self.confirms.take_failures(), self.confirms.pending()))
    }

    /// Whether failures or unconfirmed publishes are waiting to be reported.
    pub fn has_unreported(&mut self) -> bool {
        self.confirms.reap(&self.link);
        self.confirms.has_unreported()
    }

    /// The number of the producer's channel on its connection, 0 before one is open.
    pub fn channel_id(&self) -> u16 {
        self.channel.as_ref().map_or(0, |c| c.id())
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

impl Confirming for Producer {
    fn wait_for_confirms(&mut self, timeout: Duration) -> Result<Vec<Failure>> {
        Producer::wait_for_confirms(self, timeout)
    }

    fn pending(&mut self) -> usize {
        Producer::pending(self)
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        if let Some((_, timer)) = self.retry_timer.take() {
            timer.abort();
        }
        if self.link.is_own() {
            self.confirms.reap(&self.link);
            if let Some(channel) = self.channel.take() {
                // A clean confirm channel is kept for the next producer: nothing of this one
                // (a publish awaiting its confirm, a channel error, a nack) can reach it.
                let clean = self.options.confirms
                    && !self.confirms.has_unreported()
                    && !self.confirms.has_channel_error()
                    && !self.confirms.renew_channel;
                let unkept = if clean {
                    self.link.idle().keep_confirm(channel)
                } else {
                    Some(channel)
                };
                if let Some(channel) = unkept {
                    self.link.close_channel(&channel, "producer");
                }
            }
            // SAFETY: dropped exactly once, here, and never used again.
            unsafe { ManuallyDrop::drop(&mut self.channel) };
        } else {
            // Parent's futures reference the parent's channel: leak them with it.
            std::mem::forget(std::mem::replace(&mut self.confirms, Confirms::new(0)));
        }
    }
}

#[cfg(test)]
#[path = "producer_tests.rs"]
mod tests;
