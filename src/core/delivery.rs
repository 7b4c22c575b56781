//! A delivered message and its settlement: the acker, where its ack is held back, and
//! whether it is settled. The PHP `Message` and the worker share one, so the worker sees a
//! settlement the application made and settles what the application left.

use crate::core::ack_batch::AckBatch;
use crate::core::error::{Error, ErrorKind, Result};
use crate::core::link::Link;
use crate::core::settlements::Settlement;
use lapin::{Acker, BasicProperties};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A message delivered by a consumer, fetched by `basic.get`, or an RPC reply.
pub struct Delivery {
    /// The body, any bytes.
    pub body: Vec<u8>,
    /// The exchange it was delivered through.
    pub exchange: String,
    /// The routing key it was delivered with.
    pub routing_key: String,
    /// Its tag on the channel.
    pub delivery_tag: u64,
    /// Whether the broker delivered it before.
    pub redelivered: bool,
    /// Its properties and headers.
    pub properties: BasicProperties,
    /// Tag of the consumer it came through (None for `basic.get` and replies).
    pub consumer_tag: Option<String>,
    /// The queue it came from, when a consumer got it.
    pub queue: Option<String>,
    /// The connection it came on: replies go out on it, settlements through it.
    pub(crate) link: Arc<Link>,
    /// None when the broker considers it settled already (auto_ack).
    acker: Option<Acker>,
    /// Where its ack is held back; None: sent at once.
    batch: Option<Arc<AckBatch>>,
    settled: AtomicBool,
}

impl Delivery {
    /// Wraps lapin's delivery; `auto_ack` means the broker settled it already.
    pub(crate) fn new(
        delivery: lapin::message::Delivery,
        link: Arc<Link>,
        auto_ack: bool,
        batch: Option<Arc<AckBatch>>,
    ) -> Self {
        Self {
            body: delivery.data,
            exchange: delivery.exchange.as_str().to_string(),
            routing_key: delivery.routing_key.as_str().to_string(),
            delivery_tag: delivery.delivery_tag,
            redelivered: delivery.redelivered,
            properties: delivery.properties,
            consumer_tag: None,
            queue: None,
            link,
            acker: (!auto_ack).then_some(delivery.acker),
            batch,
            settled: AtomicBool::new(auto_ack),
        }
    }

    /// Whether it still waits for ack, nack or reject.
    pub fn needs_settling(&self) -> bool {
        self.acker.is_some() && !self.settled.load(Ordering::Acquire)
    }

    /// Whether it was acked, nacked or rejected (always true with auto_ack).
    pub fn is_settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }

    /// Whether the broker settled it on delivery (auto_ack, replies).
    pub fn is_auto_acked(&self) -> bool {
        self.acker.is_none()
    }

    /// The connection it came on.
    pub(crate) fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// Settles it once: a second settlement, or one of an auto-acked delivery, is an error
    /// whose message starts with `what`. An ack may be held back and sent with others.
    pub fn settle(&self, how: Settlement, what: &str) -> Result<()> {
        let Some(acker) = self.acker.as_ref() else {
            return Err(Error::new(
                ErrorKind::Other,
                format!("{what}: the message was delivered with auto_ack, the broker settled it already"),
            ));
        };
        if !self.link.is_own() {
            return Err(Error::connection(format!(
                "{what}: message {} came on a connection of the parent process (before fork()); \
                 the parent settles it",
                self.delivery_tag
            )));
        }
        if self.settled.swap(true, Ordering::AcqRel) {
            return Err(Error::new(
                ErrorKind::Other,
                format!("{what}: message {} is settled already", self.delivery_tag),
            ));
        }
        match &self.batch {
            Some(batch) => batch.settle(acker, self.delivery_tag, how)?,
            None => self.link.settlements().send(acker, how, false)?,
        };
        Ok(())
    }
}
