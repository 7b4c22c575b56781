//! Consuming: one channel, one `basic.consume` per queue, deliveries handed to the PHP thread.
//!
//! The PHP thread itself polls lapin's consumer streams (`next()`), parking between polls, so a
//! delivery reaches the callback without a runtime task in between. Settlements are sent
//! without waiting for anything: the first poll of lapin's ack future queues the frame.

use crate::core::error::{self, Error, ErrorKind, Result};
use crate::core::link::{Link, COMMAND_TIMEOUT};
use crate::core::runtime;
use crate::core::shortstr::shortstr;
use futures_core::Stream;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Acker, Channel};
use std::future::Future;
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

/// Settlements handed to lapin whose frame may not be written yet. lapin routes them through
/// its internal RPC queue; `flush_settlements()` waits for them so that a worker that stops
/// (or a connection that closes) never leaves an ack behind.
static UNFLUSHED: std::sync::Mutex<Vec<SettleFuture>> = std::sync::Mutex::new(Vec::new());

/// Sends a settlement without waiting for the broker (AMQP has no answer to it).
///
/// An acker from a channel that was closed since the delivery refuses quietly (`Ok(false)`):
/// the broker redelivers such a message, so acking it elsewhere would be wrong.
pub fn settle(acker: &Acker, how: Settlement) -> Result<bool> {
    send(acker, how, false)
}

/// `settle()`, with `multiple` for an ack that also covers every older unacked delivery.
fn send(acker: &Acker, how: Settlement, multiple: bool) -> Result<bool> {
    if !acker.usable() {
        return Ok(false);
    }
    let acker = acker.clone();
    let mut future: SettleFuture = match how {
        Settlement::Ack => Box::pin(async move { acker.ack(BasicAckOptions { multiple }).await }),
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
            let mut unflushed = UNFLUSHED.lock().unwrap_or_else(|p| p.into_inner());
            drop_written(&mut unflushed, &mut cx);
            unflushed.push(future);
            Ok(true)
        }
    }
}

/// Acks of one consumer channel held back and sent as one `basic.ack` with `multiple`.
///
/// Each ack costs lapin a trip through its RPC task and the io-loop; a burst of deliveries
/// acked one by one was the consumer's bottleneck. What is acked does not change: a multiple
/// ack goes out only up to a tag below which every delivery of the channel is settled (held
/// here, or already sent), so it can never cover a message the callback has not seen yet
/// (with several queues, deliveries of one may wait while another's are handled).
pub struct AckBatch {
    state: std::sync::Mutex<BatchState>,
    /// Held acks that trigger a send without waiting for the burst to end.
    limit: usize,
}

#[derive(Default)]
struct BatchState {
    /// Every delivery tag up to this one is settled (held or sent).
    watermark: u64,
    /// Settled tags above the watermark.
    settled_above: std::collections::BTreeSet<u64>,
    /// Acks not sent yet, oldest first.
    held: std::collections::VecDeque<(u64, Acker)>,
}

impl AckBatch {
    /// A batch sending after `limit` held acks at the latest.
    pub fn new(limit: usize) -> Self {
        Self {
            state: std::sync::Mutex::new(BatchState::default()),
            limit: limit.max(1),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BatchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Settles delivery `tag`: an ack is held, a nack or reject goes out at once.
    pub fn settle(&self, acker: &Acker, tag: u64, how: Settlement) -> Result<bool> {
        if !acker.usable() {
            return Ok(false);
        }
        if how != Settlement::Ack {
            let sent = send(acker, how, false)?;
            self.state().mark_settled(tag);
            return Ok(sent);
        }
        let full = {
            let mut state = self.state();
            state.mark_settled(tag);
            state.held.push_back((tag, acker.clone()));
            state.held.len() >= self.limit
        };
        if full {
            self.flush(false)?;
        }
        Ok(true)
    }

    /// Sends the held acks: one multiple ack up to the watermark, and with `all` the rest
    /// one by one (before going idle, so nothing stays held while no delivery comes).
    pub fn flush(&self, all: bool) -> Result<()> {
        // lapin may write settlements out of order (each runs as its own task): a multiple
        // ack overtaking an earlier nack or single ack of a tag it covers would make the
        // broker close the channel (406 unknown delivery tag). So it waits for them.
        if has_unwritten_settlements() {
            if !all {
                return Ok(());
            }
            flush_settlements(COMMAND_TIMEOUT)?;
        }
        let (multiple, single) = {
            let mut state = self.state();
            let watermark = state.watermark;
            let mut top: Option<(u64, Acker)> = None;
            let mut above = std::collections::VecDeque::new();
            for (tag, acker) in state.held.drain(..) {
                if tag > watermark {
                    above.push_back((tag, acker));
                } else if top.as_ref().is_none_or(|(t, _)| tag > *t) {
                    top = Some((tag, acker));
                }
            }
            let single: Vec<_> = if all {
                above.into_iter().collect()
            } else {
                state.held = above;
                Vec::new()
            };
            (top, single)
        };
        if let Some((_, acker)) = multiple {
            send(&acker, Settlement::Ack, true)?;
        }
        for (_, acker) in single {
            send(&acker, Settlement::Ack, false)?;
        }
        Ok(())
    }
}

impl BatchState {
    fn mark_settled(&mut self, tag: u64) {
        if tag <= self.watermark {
            return;
        }
        self.settled_above.insert(tag);
        while self.settled_above.remove(&(self.watermark + 1)) {
            self.watermark += 1;
        }
    }
}

/// Forgets the settlements whose frame lapin has written; true if none is left.
fn drop_written(unflushed: &mut Vec<SettleFuture>, cx: &mut Context<'_>) -> bool {
    unflushed.retain_mut(|f| f.as_mut().poll(cx).is_pending());
    unflushed.is_empty()
}

/// Whether a settlement handed to lapin may not be written yet.
fn has_unwritten_settlements() -> bool {
    let mut unflushed = UNFLUSHED.lock().unwrap_or_else(|p| p.into_inner());
    !drop_written(&mut unflushed, &mut Context::from_waker(Waker::noop()))
}

/// Waits (at most `limit`) until every settlement sent so far was handed to the socket.
pub fn flush_settlements(limit: Duration) -> Result<()> {
    let mut unflushed = std::mem::take(&mut *UNFLUSHED.lock().unwrap_or_else(|p| p.into_inner()));
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

/// A delivery and the tag of the consumer that got it.
pub struct Incoming {
    /// The message, its properties and its acker.
    pub delivery: Delivery,
    /// Tag of the consumer it came through.
    pub consumer_tag: String,
    /// The queue it came from.
    pub queue: String,
    /// Where its ack is held back (None with auto_ack).
    pub batch: Option<Arc<AckBatch>>,
    /// Set when its short strings were not UTF-8: the warning to give. It is settled already
    /// and must not reach the application.
    pub poisoned: Option<String>,
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
    cancelled: bool,
    /// Held acks of the channel's deliveries (None with auto_ack).
    batch: Option<Arc<AckBatch>>,
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
        let mut consumer = Self {
            link,
            channel: ManuallyDrop::new(Some(channel.clone())),
            streams: ManuallyDrop::new(Vec::new()),
            queues: queues.to_vec(),
            next_stream: 0,
            cancelled: false,
            // A quarter of the prefetch window: the broker keeps sending while acks are held.
            batch: (!options.auto_ack)
                .then(|| Arc::new(AckBatch::new(usize::from(options.prefetch) / 4))),
        };
        if !options.auto_ack {
            let context = format!("set prefetch {} on {endpoint}", options.prefetch);
            runtime::command(
                channel.basic_qos(options.prefetch, BasicQosOptions::default()),
                COMMAND_TIMEOUT,
                &context,
            )?;
        }
        let mut arguments = options.arguments.clone();
        if let Some(priority) = options.priority {
            arguments.insert(
                ShortString::from("x-priority"),
                AMQPValue::LongInt(priority),
            );
        }
        for (i, name) in names.into_iter().enumerate() {
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
            let tag = match (&options.consumer_tag, queues.len()) {
                (None, _) => String::new(),
                (Some(tag), 1) => tag.clone(),
                (Some(tag), _) => format!("{tag}-{i}"),
            };
            let tag = shortstr(&tag, "consumer tag")?;
            let context = format!("consume from queue '{}' on {endpoint}", name.as_str());
            let consume_options = BasicConsumeOptions {
                no_local: false,
                no_ack: options.auto_ack,
                exclusive: options.exclusive,
                nowait: false,
            };
            let stream = runtime::command(
                channel.basic_consume(name, tag, consume_options, arguments.clone()),
                COMMAND_TIMEOUT,
                &context,
            )?;
            consumer
                .streams
                .push((stream.tag().as_str().to_string(), stream));
        }
        Ok(consumer)
    }

    /// The consumer tags, one per queue.
    pub fn tags(&self) -> Vec<String> {
        self.streams.iter().map(|(tag, _)| tag.clone()).collect()
    }

    /// The next delivery, waiting at most `limit`; `None` when nothing came in time.
    ///
    /// A consumer the broker cancelled (its queue was deleted) or whose channel or connection
    /// closed ends with an error naming the queue, never with a silent hang.
    pub fn next(&mut self, limit: Duration) -> Result<Option<Incoming>> {
        if self.cancelled {
            return Err(Error::new(
                ErrorKind::Other,
                format!(
                    "consume from {}: the consumer was cancelled",
                    self.describe()
                ),
            ));
        }
        self.link.ensure_usable("consume")?;
        let start = self.next_stream;
        let mut ready = Some(poll_streams(
            &mut self.streams,
            start,
            &mut Context::from_waker(Waker::noop()),
        ));
        if ready.as_ref().is_some_and(Poll::is_pending) {
            // The burst is over: send what is held before waiting for more.
            self.flush_acks()?;
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
                let consumer_tag = self.streams[index].0.clone();
                let poisoned = self.dead_letter_poisoned(index, &delivery)?;
                Ok(Some(Incoming {
                    delivery,
                    consumer_tag,
                    queue: self.queues.get(index).cloned().unwrap_or_default(),
                    batch: self.batch.clone(),
                    poisoned,
                }))
            }
            Ok((_, Err(Some(e)))) if self.link.recovers() && error::lost_connection(&e) => {
                // lapin reconnects and re-subscribes this consumer on the same channel. The
                // deliveries handed out before are the broker's to redeliver: their acks are
                // dropped quietly (their ackers are dead), and the held ones with them.
                let recovered = self
                    .channel
                    .as_ref()
                    .is_some_and(|channel| self.link.channel_usable(channel));
                if !recovered {
                    let context = format!("consume from {}", self.describe());
                    return Err(Error::from_lapin(&e, &context));
                }
                if let Some(batch) = &self.batch {
                    self.batch = Some(Arc::new(AckBatch::new(batch.limit)));
                }
                self.next(limit)
            }
            Ok((index, Err(ended))) => {
                let queue = self.queues.get(index).cloned().unwrap_or_default();
                let context = format!("consume from queue '{queue}' on {}", self.link.endpoint());
                Err(match ended {
                    Some(e) => Error::from_lapin(&e, &context),
                    None => Error::new(
                        ErrorKind::Channel(0),
                        format!(
                            "{context}: the broker cancelled the consumer (was the queue deleted?)"
                        ),
                    ),
                })
            }
        }
    }

    /// A delivery whose short strings were not UTF-8 reached us with `?` in their place: it
    /// is rejected without requeue, so the broker dead-letters its intact copy (or drops it,
    /// if the queue has no dead-letter exchange). Returns what to warn about.
    fn dead_letter_poisoned(&self, index: usize, delivery: &Delivery) -> Result<Option<String>> {
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

    /// Stops the deliveries (basic.cancel); messages already delivered can still be settled.
    pub fn cancel(&mut self) -> Result<()> {
        if self.cancelled {
            return Ok(());
        }
        self.flush_acks()?;
        self.cancelled = true;
        let Some(channel) = self.channel.as_ref().cloned() else {
            return Ok(());
        };
        if !channel.status().connected() {
            return Ok(());
        }
        for (tag, _) in self.streams.iter() {
            let context = format!("cancel consumer '{tag}' on {}", self.link.endpoint());
            runtime::command(
                channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
                COMMAND_TIMEOUT,
                &context,
            )?;
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

type Polled = (usize, std::result::Result<Delivery, Option<lapin::Error>>);

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
mod tests {
    use super::*;
    use crate::core::connection::tests::connect;
    use crate::core::producer::{Outgoing, ProducerOptions};
    use crate::core::topology::QueueSpec;
    use lapin::BasicProperties;

    #[test]
    fn delivers_what_was_published_and_acks_it() {
        let mut conn = connect();
        let spec = QueueSpec {
            exclusive: true,
            durable: false,
            ..QueueSpec::default()
        };
        let queue = conn.declare_queue("", spec).expect("queue").name;
        let producer = conn.producer(ProducerOptions::default()).expect("producer");
        for i in 0..3u8 {
            producer
                .lock()
                .expect("lock")
                .publish(Outgoing {
                    exchange: String::new(),
                    routing_key: queue.clone(),
                    body: vec![i],
                    properties: BasicProperties::default(),
                })
                .expect("publish");
        }
        let mut consumer = conn
            .consumer(std::slice::from_ref(&queue), &ConsumerOptions::default())
            .expect("consumer");
        for i in 0..3u8 {
            let incoming = consumer
                .next(Duration::from_secs(5))
                .expect("ok")
                .expect("delivery");
            assert_eq!(incoming.delivery.data, vec![i]);
            assert!(settle(&incoming.delivery.acker, Settlement::Ack).expect("ack"));
        }
        assert!(consumer
            .next(Duration::from_millis(100))
            .expect("ok")
            .is_none());
        consumer.cancel().expect("cancel");
    }

    #[test]
    fn the_watermark_only_passes_tags_settled_without_gaps() {
        let mut state = BatchState::default();
        state.mark_settled(2);
        state.mark_settled(3);
        assert_eq!(state.watermark, 0, "tag 1 is still with the callback");
        state.mark_settled(1);
        assert_eq!(state.watermark, 3);
        state.mark_settled(5);
        assert_eq!(state.watermark, 3);
        state.mark_settled(4);
        assert_eq!(state.watermark, 5);
        assert!(state.settled_above.is_empty());
    }

    fn temp_queue(conn: &mut crate::core::connection::Connection, name: &str) -> String {
        let queue = format!("amqp_rs.core.{name}.{}", std::process::id());
        let spec = QueueSpec {
            durable: false,
            auto_delete: false,
            ..QueueSpec::default()
        };
        conn.declare_queue(&queue, spec).expect("queue");
        conn.purge_queue(&queue).expect("purge");
        queue
    }

    fn publish(conn: &mut crate::core::connection::Connection, queue: &str, n: u8) {
        let producer = conn.producer(ProducerOptions::default()).expect("producer");
        let mut producer = producer.lock().expect("lock");
        for i in 0..n {
            producer
                .publish(Outgoing {
                    exchange: String::new(),
                    routing_key: queue.to_string(),
                    body: vec![i],
                    properties: BasicProperties::default(),
                })
                .expect("publish");
        }
        producer
            .wait_for_confirms(Duration::from_secs(5))
            .expect("confirms");
    }

    #[test]
    fn acks_are_held_during_a_burst_and_all_land_as_multiple_acks() {
        let mut conn = connect();
        let queue = temp_queue(&mut conn, "acks.batched");
        publish(&mut conn, &queue, 50);
        let options = ConsumerOptions {
            prefetch: 100,
            ..ConsumerOptions::default()
        };
        let mut consumer = conn
            .consumer(std::slice::from_ref(&queue), &options)
            .expect("consumer");
        // All 50 arrive first: then only the limit (25) or the end of the burst sends.
        std::thread::sleep(Duration::from_millis(300));
        let mut handled = 0;
        while let Some(incoming) = consumer.next(Duration::from_millis(300)).expect("next") {
            let batch = incoming.batch.clone().expect("batch");
            let tag = incoming.delivery.delivery_tag;
            assert!(batch
                .settle(&incoming.delivery.acker, tag, Settlement::Ack)
                .expect("ack"));
            handled += 1;
            if handled == 10 {
                assert_eq!(batch.state().held.len(), 10, "held, not sent one by one");
            }
        }
        assert_eq!(handled, 50);
        assert!(consumer
            .batch
            .as_ref()
            .expect("batch")
            .state()
            .held
            .is_empty());
        drop(consumer);
        conn.close().expect("close");
        let mut check = connect();
        assert_eq!(check.queue_status(&queue).expect("status").messages, 0);
        check.delete_queue(&queue, false, false).expect("delete");
    }

    #[test]
    fn a_multiple_ack_never_covers_a_delivery_not_handed_out() {
        let mut conn = connect();
        let first = temp_queue(&mut conn, "acks.first");
        let second = temp_queue(&mut conn, "acks.second");
        publish(&mut conn, &first, 5);
        publish(&mut conn, &second, 5);
        let mut consumer = conn
            .consumer(
                &[first.clone(), second.clone()],
                &ConsumerOptions::default(),
            )
            .expect("consumer");
        // Let both queues' deliveries arrive, then handle only those of the second.
        std::thread::sleep(Duration::from_millis(300));
        let mut acked = 0;
        let mut kept = Vec::new();
        while acked < 5 {
            let incoming = consumer
                .next(Duration::from_secs(5))
                .expect("next")
                .expect("delivery");
            if incoming.delivery.routing_key.as_str() == second {
                let batch = incoming.batch.clone().expect("batch");
                let tag = incoming.delivery.delivery_tag;
                batch
                    .settle(&incoming.delivery.acker, tag, Settlement::Ack)
                    .expect("ack");
                acked += 1;
            } else {
                kept.push(incoming);
            }
        }
        consumer.flush_acks().expect("flush");
        flush_settlements(Duration::from_secs(5)).expect("flushed");
        drop(kept);
        drop(consumer);
        conn.close().expect("close");
        let mut check = connect();
        assert_eq!(check.queue_status(&first).expect("status").messages, 5);
        assert_eq!(check.queue_status(&second).expect("status").messages, 0);
        check.delete_queue(&first, false, false).expect("delete");
        check.delete_queue(&second, false, false).expect("delete");
    }

    #[test]
    fn deleting_the_queue_ends_consumption_with_an_error() {
        let mut conn = connect();
        let queue = format!("amqp_rs.core.cancelled.{}", std::process::id());
        conn.declare_queue(&queue, QueueSpec::default())
            .expect("queue");
        let mut consumer = conn
            .consumer(std::slice::from_ref(&queue), &ConsumerOptions::default())
            .expect("consumer");
        conn.delete_queue(&queue, false, false).expect("delete");
        let err = consumer
            .next(Duration::from_secs(5))
            .err()
            .expect("cancelled");
        assert!(err.message().contains(&queue), "{}", err.message());
    }
}
