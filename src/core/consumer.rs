//! Consuming: one channel, one `basic.consume` per queue, deliveries handed to the PHP thread.
//!
//! The PHP thread itself polls lapin's consumer streams (`next()`), parking between polls, so a
//! delivery reaches the callback without a runtime task in between. Settlements are sent
//! without waiting for anything: the first poll of lapin's ack future queues the frame.

use crate::core::ack_batch::AckBatch;
use crate::core::delivery::Delivery;
use crate::core::error::{self, Error, ErrorKind, Result};
use crate::core::link::{Link, COMMAND_TIMEOUT};
use crate::core::readiness::{AfterReady, Source};
use crate::core::runtime;
use crate::core::settlements::Settlement;
use crate::core::shortstr::shortstr;
use futures_core::Stream;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::Channel;
use std::mem::ManuallyDrop;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// Settings of a consumer, as `Connection::consumer()` options give them.
#[derive(Clone, Debug)]
pub struct ConsumerOptions {
    /// Unacknowledged deliveries the broker may send ahead (basic.qos), default 100.
    pub prefetch: u16,
    /// The broker considers a message handled as soon as it is sent.
    pub auto_ack: bool,
    /// Be the queue's only consumer.
    pub exclusive: bool,
    /// Consumer tag; the broker makes one when absent.
    pub consumer_tag: Option<String>,
    /// `basic.consume` arguments (`x-stream-offset`, ...).
    pub arguments: FieldTable,
    /// Consumer priority (`x-priority`).
    pub priority: Option<i32>,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        Self {
            prefetch: 100,
            auto_ack: false,
            exclusive: false,
            consumer_tag: None,
            arguments: FieldTable::default(),
            priority: None,
        }
    }
}

/// What `Consumer::next` hands out.
pub enum Incoming {
    /// A delivery for the application (shared with the worker that hands it out).
    Message(Arc<Delivery>),
    /// A delivery whose short strings were not UTF-8: settled already, it must not reach the
    /// application; the warning to give instead.
    Poisoned(String),
}

/// The fate of a poisoned delivery that was not auto-acked.
pub(crate) const DEAD_LETTERED: &str =
    "rejected without requeue, so the broker dead-letters it if the \
                             queue has a dead-letter exchange (and drops it if not)";

/// What to tell the user about a delivery whose short strings were not UTF-8.
pub(crate) fn poison_warning(
    fields: &[&str],
    tag: u64,
    queue: &str,
    endpoint: &str,
    fate: &str,
) -> String {
    format!(
        "delivery {tag} from queue '{queue}' on {endpoint} not handed to the application: its {} \
         not valid UTF-8, which AMQP requires of short strings; {fate}",
        match fields {
            [one] => format!("{one} is"),
            _ => format!("{} are", fields.join(", ")),
        }
    )
}

/// Consumers of one or more queues on one channel.
pub struct Consumer {
    link: Arc<Link>,
    // Leaked rather than dropped in a forked child, like the link.
    channel: ManuallyDrop<Option<Channel>>,
    streams: ManuallyDrop<Vec<(String, lapin::Consumer)>>,
    queues: Vec<String>,
    next_stream: usize,
    /// What `basic.consume` asked, to subscribe again after a pause.
    subscription: Subscription,
    state: State,
    /// Held acks of the channel's deliveries (None with auto_ack).
    batch: Option<Arc<AckBatch>>,
    /// Its share of the connection's readiness fd, from the first non-blocking take.
    source: Option<Source>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Subscribed,
    /// Unsubscribed by `pause()`; the next `next()` subscribes again.
    Paused,
    /// Unsubscribed by `cancel()`, for good.
    Cancelled,
}

struct Subscription {
    names: Vec<ShortString>,
    options: BasicConsumeOptions,
    arguments: FieldTable,
}

impl Consumer {
    pub(crate) fn new(
        link: Arc<Link>,
        queues: &[String],
        options: &ConsumerOptions,
    ) -> Result<Self> {
        if queues.is_empty() {
            return Err(Error::invalid_argument("consumer: no queue given"));
        }
        let names = queues
            .iter()
            .map(|q| shortstr(q, "queue name"))
            .collect::<Result<Vec<_>>>()?;
        let channel = link.open_channel("consume")?;
        let endpoint = link.endpoint().to_string();
        let mut arguments = options.arguments.clone();
        if let Some(priority) = options.priority {
            arguments.insert(
                ShortString::from("x-priority"),
                AMQPValue::LongInt(priority),
            );
        }
        let mut consumer = Self {
            // A quarter of the prefetch window: the broker keeps sending while acks are held.
            batch: (!options.auto_ack).then(|| {
                let limit = usize::from(options.prefetch) / 4;
                Arc::new(AckBatch::new(limit, link.settlements().clone()))
            }),
            link,
            channel: ManuallyDrop::new(Some(channel.clone())),
            streams: ManuallyDrop::new(Vec::new()),
            queues: queues.to_vec(),
            next_stream: 0,
            subscription: Subscription {
                names: names.clone(),
                options: BasicConsumeOptions {
                    no_local: false,
                    no_ack: options.auto_ack,
                    exclusive: options.exclusive,
                    nowait: false,
                },
                arguments,
            },
            state: State::Subscribed,
            source: None,
        };
        if !options.auto_ack {
            let context = format!("set prefetch {} on {endpoint}", options.prefetch);
            runtime::command(
                channel.basic_qos(options.prefetch, BasicQosOptions::default()),
                COMMAND_TIMEOUT,
                &context,
            )?;
        }
        for name in &names {
            if let Some((declare, args)) = consumer.link.transient_queue(name.as_str()) {
                // Declared on this channel too, so that its recovery re-creates the queue
                // before it consumes from it (see Link::transient_queue).
                let context = format!("declare queue '{}' on {endpoint}", name.as_str());
                runtime::command(
                    channel.queue_declare(name.clone(), declare, args),
                    COMMAND_TIMEOUT,
                    &context,
                )?;
            }
        }
        let tags = (0..names.len())
            .map(|i| match (&options.consumer_tag, queues.len()) {
                (None, _) => String::new(),
                (Some(tag), 1) => tag.clone(),
                (Some(tag), _) => format!("{tag}-{i}"),
            })
            .collect::<Vec<_>>();
        consumer.subscribe(&tags)?;
        Ok(consumer)
    }

    /// `basic.consume` on each queue, with `tags` (empty: the broker makes one).
    fn subscribe(&mut self, tags: &[String]) -> Result<()> {
        let Some(channel) = self.channel.as_ref().cloned() else {
            return Ok(());
        };
        let mut streams = Vec::with_capacity(tags.len());
        for (name, tag) in self.subscription.names.iter().zip(tags) {
            let tag = shortstr(tag, "consumer tag")?;
            let context = format!(
                "consume from queue '{}' on {}",
                name.as_str(),
                self.link.endpoint()
            );
            let stream = runtime::command(
                channel.basic_consume(
                    name.clone(),
                    tag,
                    self.subscription.options,
                    self.subscription.arguments.clone(),
                ),
                COMMAND_TIMEOUT,
                &context,
            )?;
            streams.push((stream.tag().as_str().to_string(), stream));
        }
        *self.streams = streams;
        self.state = State::Subscribed;
        Ok(())
    }

    /// The consumer tags, one per queue.
    pub fn tags(&self) -> Vec<String> {
        self.streams.iter().map(|(tag, _)| tag.clone()).collect()
    }

    /// The next delivery, waiting at most `limit`; `None` when nothing came in time. With
    /// `batched`, its ack is held back and sent with others (see `AckBatch`).
    ///
    /// A consumer the broker cancelled (its queue was deleted) or whose channel or connection
    /// closed ends with an error naming the queue, never with a silent hang.
    pub fn next(&mut self, limit: Duration, batched: bool) -> Result<Option<Incoming>> {
        if self.state == State::Cancelled {
            return Err(Error::new(
                ErrorKind::Other,
                format!(
                    "consume from {}: the consumer was cancelled",
                    self.describe()
                ),
            ));
        }
        // A take that must not wait takes nothing while lapin recovers the connection.
        if limit.is_zero() && !self.usable_now()? {
            return Ok(None);
        }
        match self.state {
            State::Cancelled => {}
            State::Paused => {
                self.link.ensure_usable("consume")?;
                self.subscribe(&self.tags())?;
            }
            State::Subscribed => self.link.ensure_usable("consume")?,
        }
        if !limit.is_zero() {
            // A blocking take leaves the readiness stream (until the next take that does not
            // wait): a source raised before would keep the fd readable with no one to lower it.
            self.source = None;
        }
        let start = self.next_stream;
        let mut ready = Some(if limit.is_zero() {
            // A non-blocking take: lapin raises the readiness fd when the next one arrives.
            let streams = &mut *self.streams;
            let source = self.source.as_ref();
            source.map_or(Poll::Pending, |source| {
                source.take(AfterReady::More, |cx| poll_streams(streams, start, cx))
            })
        } else {
            poll_streams(
                &mut self.streams,
                start,
                &mut Context::from_waker(Waker::noop()),
            )
        });
        if ready.as_ref().is_some_and(Poll::is_pending) {
            // The burst is over: send what is held before waiting for more.
            self.flush_acks()?;
            if limit.is_zero() {
                return Ok(None);
            }
        }
        let streams = &mut *self.streams;
        let polled = runtime::park_on(
            std::future::poll_fn(|cx| match ready.take() {
                Some(Poll::Ready(polled)) => Poll::Ready(polled),
                _ => poll_streams(streams, start, cx),
            }),
            limit,
            "wait for a delivery",
        );
        match polled {
            Err(e) if e.kind() == ErrorKind::Timeout => Ok(None),
            Err(e) => Err(e),
            Ok((index, Ok(delivery))) => {
                self.next_stream = index + 1;
                if let Some(warning) = self.dead_letter_poisoned(index, &delivery)? {
                    return Ok(Some(Incoming::Poisoned(warning)));
                }
                let auto_ack = self.batch.is_none();
                let batch = self.batch.clone().filter(|_| batched);
                let mut delivery = Delivery::new(delivery, self.link.clone(), auto_ack, batch);
                delivery.consumer_tag = Some(self.streams[index].0.clone());
                delivery.queue = self.queues.get(index).cloned();
                Ok(Some(Incoming::Message(Arc::new(delivery))))
            }
            Ok((_, Err(Some(e)))) if self.link.recovers() && error::lost_connection(&e) => {
                // lapin reconnects and re-subscribes this consumer on the same channel. The
                // deliveries handed out before are the broker's to redeliver: their acks are
                // dropped quietly (their ackers are dead), and the held ones with them.
                if limit.is_zero() {
                    self.renew_batch();
                    if let Some(source) = &self.source {
                        source.recheck_soon()?;
                    }
                    return Ok(None);
                }
                let recovered = self
                    .channel
                    .as_ref()
                    .is_some_and(|channel| self.link.channel_usable(channel));
                if !recovered {
                    let context = format!("consume from {}", self.describe());
                    return Err(Error::from_lapin(&e, &context));
                }
                self.renew_batch();
                self.next(limit, batched)
            }
            Ok((index, Err(ended))) => Err(self.ended(index, ended)),
        }
    }

    /// Joins the readiness fd if not yet; whether the connection serves now (false while it
    /// is recovered: the source is raised again shortly to look again).
    fn usable_now(&mut self) -> Result<bool> {
        let source = match self.source.take() {
            Some(source) => source,
            None => self.link.readiness("consume")?.source(),
        };
        let usable = self.link.usable_now("consume");
        if let Ok(false) = usable {
            source.recheck_soon()?;
        }
        self.source = Some(source);
        usable
    }

    /// After a lost connection: the held acks belong to dead deliveries, dropped with them.
    fn renew_batch(&mut self) {
        if let Some(batch) = &self.batch {
            let unwritten = self.link.settlements().clone();
            self.batch = Some(Arc::new(AckBatch::new(batch.limit, unwritten)));
        }
    }

    /// The error for a stream that ended: the broker cancelled it, or it failed.
    fn ended(&self, index: usize, ended: Option<lapin::Error>) -> Error {
        let queue = self.queues.get(index).cloned().unwrap_or_default();
        let context = format!("consume from queue '{queue}' on {}", self.link.endpoint());
        match ended {
            Some(e) => Error::from_lapin(&e, &context),
            None => Error::new(
                ErrorKind::Channel(0),
                format!("{context}: the broker cancelled the consumer (was the queue deleted?)"),
            ),
        }
    }

    /// A delivery whose short strings were not UTF-8 reached us with `?` in their place: it
    /// is rejected without requeue, so the broker dead-letters its intact copy (or drops it,
    /// if the queue has no dead-letter exchange). Returns what to warn about.
    fn dead_letter_poisoned(
        &self,
        index: usize,
        delivery: &lapin::message::Delivery,
    ) -> Result<Option<String>> {
        let Some(channel) = self.channel.as_ref() else {
            return Ok(None);
        };
        let tag = delivery.delivery_tag;
        let Some(fields) = self.link.poisoned(channel.id(), tag) else {
            return Ok(None);
        };
        let queue = self.queues.get(index).map_or("", String::as_str);
        let fate = match &self.batch {
            Some(batch) => {
                batch.settle(&delivery.acker, tag, Settlement::Reject { requeue: false })?;
                DEAD_LETTERED
            }
            None => "already acknowledged (auto_ack): it is lost",
        };
        Ok(Some(poison_warning(
            &fields,
            tag,
            queue,
            self.link.endpoint(),
            fate,
        )))
    }

    fn describe(&self) -> String {
        let queues: Vec<String> = self.queues.iter().map(|q| format!("'{q}'")).collect();
        format!("queue {} on {}", queues.join(", "), self.link.endpoint())
    }

    /// Sends every held ack (before the worker stops or waits).
    pub fn flush_acks(&self) -> Result<()> {
        match &self.batch {
            Some(batch) => batch.flush(true),
            None => Ok(()),
        }
    }

    /// Waits (bounded) until every settlement of this connection is written.
    pub fn flush_settlements(&self) -> Result<()> {
        self.flush_acks()?;
        self.link.settlements().flush(COMMAND_TIMEOUT)
    }

    /// Gives back what the consumer holds when a worker stops: the subscription is
    /// cancelled and the deliveries in the prefetch buffer, which the application never saw,
    /// go back to the queue at once, so other consumers get them. The next `next()`
    /// subscribes again. With auto_ack nothing is held: the broker settled them already.
    pub fn pause(&mut self) -> Result<()> {
        if self.state != State::Subscribed || self.batch.is_none() {
            return self.flush_settlements();
        }
        if self.unsubscribe()? {
            self.state = State::Paused;
        }
        Ok(())
    }

    /// Stops the deliveries (basic.cancel) for good, and gives the ones in the prefetch
    /// buffer back to the queue; messages already handed out can still be settled.
    pub fn cancel(&mut self) -> Result<()> {
        if self.state == State::Cancelled {
            return Ok(());
        }
        if self.state == State::Subscribed {
            self.unsubscribe()?;
        }
        self.state = State::Cancelled;
        // Nothing will arrive: it must not keep the readiness fd readable.
        self.source = None;
        Ok(())
    }

    /// `basic.cancel` on every queue, then the prefetched deliveries back to the queue; false
    /// when the channel is down (being recovered: lapin subscribes it again by itself, and
    /// its unacked deliveries are the broker's to redeliver).
    fn unsubscribe(&mut self) -> Result<bool> {
        self.flush_acks()?;
        let Some(channel) = self.channel.as_ref().cloned() else {
            return Ok(false);
        };
        if !channel.status().connected() || !self.link.is_own() {
            return Ok(false);
        }
        for (tag, _) in self.streams.iter() {
            let context = format!("cancel consumer '{tag}' on {}", self.link.endpoint());
            runtime::command(
                channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
                COMMAND_TIMEOUT,
                &context,
            )?;
        }
        self.requeue_prefetched()?;
        self.flush_settlements()?;
        Ok(true)
    }

    /// Rejects with requeue what the broker sent before its cancel-ok: lapin has it all
    /// buffered by then, ahead of the end of each stream.
    fn requeue_prefetched(&mut self) -> Result<()> {
        let Some(batch) = self.batch.clone() else {
            return Ok(());
        };
        let mut cx = Context::from_waker(Waker::noop());
        for (_, stream) in self.streams.iter_mut() {
            while let Poll::Ready(Some(Ok(delivery))) = Pin::new(&mut *stream).poll_next(&mut cx) {
                let how = Settlement::Reject { requeue: true };
                batch.settle(&delivery.acker, delivery.delivery_tag, how)?;
            }
        }
        Ok(())
    }

    /// False in a forked child: this consumer belongs to the parent's connection.
    pub fn is_own(&self) -> bool {
        self.link.is_own()
    }

    /// The connection, for replies to the messages it delivers.
    pub(crate) fn link(&self) -> Arc<Link> {
        self.link.clone()
    }
}

type Polled = (
    usize,
    std::result::Result<lapin::message::Delivery, Option<lapin::Error>>,
);

/// Polls every stream once, starting at `start` so no queue starves the others.
fn poll_streams(
    streams: &mut [(String, lapin::Consumer)],
    start: usize,
    cx: &mut Context<'_>,
) -> Poll<Polled> {
    let n = streams.len();
    for k in 0..n {
        let index = (start + k) % n;
        match Pin::new(&mut streams[index].1).poll_next(cx) {
            Poll::Ready(Some(Ok(delivery))) => return Poll::Ready((index, Ok(delivery))),
            Poll::Ready(Some(Err(e))) => return Poll::Ready((index, Err(Some(e)))),
            Poll::Ready(None) => return Poll::Ready((index, Err(None))),
            Poll::Pending => {}
        }
    }
    Poll::Pending
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if self.link.is_own() {
            let _ = self.flush_acks();
            // Its prefetched messages go back to the queue now, too.
            if let Some(channel) = self.channel.as_ref() {
                self.link.close_channel(channel, "consumer");
            }
            // SAFETY: dropped exactly once, here, and never used again.
            unsafe {
                ManuallyDrop::drop(&mut self.streams);
                ManuallyDrop::drop(&mut self.channel);
            }
        }
    }
}

#[cfg(test)]
#[path = "consumer_tests.rs"]
mod tests;
