//! `AmqpRs\Message`: a delivered message, its properties and its settlement.

use crate::core::delivery::Delivery;
use crate::core::rpc;
use crate::core::settlements::Settlement;
use crate::php::convert::{from_amqp_value, from_field_table, to_properties, PhpArray};
use crate::php::exceptions::{amqp_exception, guard};
use ext_php_rs::binary::Binary;
use ext_php_rs::binary_slice::BinarySlice;
use ext_php_rs::boxed::ZBox;
use ext_php_rs::exception::PhpResult;
use ext_php_rs::prelude::*;
use ext_php_rs::types::{ZendHashTable, Zval};
use lapin::types::ShortString;
use std::sync::Arc;

/// A message delivered by a consumer, fetched with `Connection::get()`, or an RPC reply.
/// The worker loop shares its delivery, to settle what the callback left.
#[php_class]
#[php(name = "AmqpRs\\Message")]
#[php(flags = ext_php_rs::flags::ClassFlags::Final)]
pub struct Message {
    delivery: Arc<Delivery>,
}

fn short(value: &Option<ShortString>) -> Option<String> {
    value.as_ref().map(|s| s.as_str().to_string())
}

impl Message {
    pub(crate) fn new(delivery: Arc<Delivery>) -> Self {
        Self { delivery }
    }

    /// A message from `basic.get` or an RPC reply: its ack, if any, goes out at once.
    pub(crate) fn received(
        delivery: lapin::message::Delivery,
        link: Arc<crate::core::link::Link>,
        auto_ack: bool,
    ) -> Self {
        Self::new(Arc::new(Delivery::new(delivery, link, auto_ack, None)))
    }

    /// A header kept by a retry (`x-original-exchange`, `x-original-routing-key`), if any.
    fn original(&self, header: &str) -> Option<String> {
        match self
            .delivery
            .properties
            .headers()
            .as_ref()?
            .inner()
            .get(header)?
        {
            lapin::types::AMQPValue::LongString(s) => {
                Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            _ => None,
        }
    }

    fn settle(&self, how: Settlement, what: &str) -> PhpResult<()> {
        guard(what, || Ok(self.delivery.settle(how, what)?))
    }
}

#[php_impl]
impl Message {
    /// The body, any bytes.
    pub fn get_body(&self) -> Binary<u8> {
        Binary::from(self.delivery.body.clone())
    }

    /// The body decoded as JSON (objects as arrays); `AmqpRs\Exception` when it is not JSON.
    pub fn json(&self) -> PhpResult<Zval> {
        let d = &self.delivery;
        let what = format!(
            "AmqpRs\\Message::json() of message {} (routing key '{}')",
            d.delivery_tag, d.routing_key
        );
        crate::php::json::decode(&d.body, &what)
    }

    /// Publishes `body` to this message's `reply_to` with its `correlation_id` copied, and
    /// waits for the broker to take it.
    #[php(defaults(properties = PhpArray::EMPTY))]
    pub fn reply(&self, body: BinarySlice<'_, u8>, properties: PhpArray<'_>) -> PhpResult<()> {
        guard("AmqpRs\\Message::reply()", || {
            let d = &self.delivery;
            let Some(reply_to) = d.properties.reply_to().as_ref() else {
                return Err(amqp_exception(format!(
                    "AmqpRs\\Message::reply(): message {} (routing key '{}') has no reply_to",
                    d.delivery_tag, d.routing_key
                )));
            };
            let properties = to_properties(properties.table())?;
            rpc::reply(
                d.link(),
                reply_to.as_str(),
                d.properties.correlation_id().clone(),
                &body,
                properties,
            )?;
            Ok(())
        })
    }

    /// Which attempt at handling this is: 1, then 2 on its first retry (consume() option
    /// `on_error` 'retry'), and so on.
    pub fn get_attempt(&self) -> i64 {
        i64::from(crate::core::retry::attempt(&self.delivery.properties))
    }

    /// The routing key it was published with (a retried message's original one).
    pub fn get_routing_key(&self) -> String {
        self.original(crate::core::retry::ROUTING_KEY_HEADER)
            .unwrap_or_else(|| self.delivery.routing_key.clone())
    }

    /// The exchange it was published to ('' for the default exchange; a retried message's
    /// original one).
    pub fn get_exchange(&self) -> String {
        self.original(crate::core::retry::EXCHANGE_HEADER)
            .unwrap_or_else(|| self.delivery.exchange.clone())
    }

    /// The delivery tag on its channel.
    pub fn get_delivery_tag(&self) -> i64 {
        i64::try_from(self.delivery.delivery_tag).unwrap_or(i64::MAX)
    }

    /// Whether the broker delivered it before (to this or another consumer).
    pub fn is_redelivered(&self) -> bool {
        self.delivery.redelivered
    }

    /// Tag of the consumer that received it; null for `Connection::get()`.
    pub fn get_consumer_tag(&self) -> Option<String> {
        self.delivery.consumer_tag.clone()
    }

    /// The properties that are set, keyed as in `Producer::publish()`.
    pub fn get_properties(&self) -> PhpResult<ZBox<ZendHashTable>> {
        guard("AmqpRs\\Message::getProperties()", || {
            let p = &self.delivery.properties;
            let mut out = ZendHashTable::new();
            let strings = [
                ("content_type", p.content_type()),
                ("content_encoding", p.content_encoding()),
                ("correlation_id", p.correlation_id()),
                ("reply_to", p.reply_to()),
                ("expiration", p.expiration()),
                ("message_id", p.message_id()),
                ("type", p.kind()),
                ("user_id", p.user_id()),
                ("app_id", p.app_id()),
            ];
            for (key, value) in strings {
                if let Some(v) = value {
                    out.insert(key, v.as_str())?;
                }
            }
            if let Some(headers) = p.headers() {
                out.insert("headers", from_field_table(headers)?)?;
            }
            if let Some(v) = p.delivery_mode() {
                out.insert("delivery_mode", i64::from(*v))?;
            }
            if let Some(v) = p.priority() {
                out.insert("priority", i64::from(*v))?;
            }
            if let Some(v) = p.timestamp() {
                out.insert("timestamp", i64::try_from(*v).unwrap_or(i64::MAX))?;
            }
            Ok(out)
        })
    }

    /// The headers table as a PHP array ([] when none).
    pub fn get_headers(&self) -> PhpResult<ZBox<ZendHashTable>> {
        match self.delivery.properties.headers() {
            Some(headers) => from_field_table(headers),
            None => Ok(ZendHashTable::new()),
        }
    }

    /// One header, or `$default` when absent.
    pub fn get_header(&self, name: &str, default: Option<&Zval>) -> PhpResult<Zval> {
        let found = self
            .delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(name));
        match found {
            Some(value) => from_amqp_value(value),
            None => Ok(default.map(Zval::shallow_clone).unwrap_or_else(|| {
                let mut null = Zval::new();
                null.set_null();
                null
            })),
        }
    }

    /// `content_type` property.
    pub fn get_content_type(&self) -> Option<String> {
        short(self.delivery.properties.content_type())
    }

    /// `message_id` property.
    pub fn get_message_id(&self) -> Option<String> {
        short(self.delivery.properties.message_id())
    }

    /// `correlation_id` property.
    pub fn get_correlation_id(&self) -> Option<String> {
        short(self.delivery.properties.correlation_id())
    }

    /// `reply_to` property.
    pub fn get_reply_to(&self) -> Option<String> {
        short(self.delivery.properties.reply_to())
    }

    /// `priority` property.
    pub fn get_priority(&self) -> Option<i64> {
        self.delivery.properties.priority().map(i64::from)
    }

    /// `timestamp` property (seconds).
    pub fn get_timestamp(&self) -> Option<i64> {
        self.delivery
            .properties
            .timestamp()
            .map(|t| i64::try_from(t).unwrap_or(i64::MAX))
    }

    /// `type` property.
    pub fn get_type(&self) -> Option<String> {
        short(self.delivery.properties.kind())
    }

    /// `app_id` property.
    pub fn get_app_id(&self) -> Option<String> {
        short(self.delivery.properties.app_id())
    }

    /// `expiration` property (milliseconds, as the string AMQP carries).
    pub fn get_expiration(&self) -> Option<String> {
        short(self.delivery.properties.expiration())
    }

    /// `delivery_mode` property: 1 transient, 2 persistent.
    pub fn get_delivery_mode(&self) -> Option<i64> {
        self.delivery.properties.delivery_mode().map(i64::from)
    }

    /// Acknowledges it: handled.
    pub fn ack(&self) -> PhpResult<()> {
        self.settle(Settlement::Ack, "AmqpRs\\Message::ack()")
    }

    /// Not handled: requeued, or dead-lettered with `$requeue = false`.
    #[php(defaults(requeue = true))]
    pub fn nack(&self, requeue: bool) -> PhpResult<()> {
        self.settle(Settlement::Nack { requeue }, "AmqpRs\\Message::nack()")
    }

    /// Refused: dead-lettered, or requeued with `$requeue = true`.
    #[php(defaults(requeue = false))]
    pub fn reject(&self, requeue: bool) -> PhpResult<()> {
        self.settle(Settlement::Reject { requeue }, "AmqpRs\\Message::reject()")
    }

    /// Whether it was acked, nacked or rejected (always true with auto_ack).
    pub fn is_settled(&self) -> bool {
        self.delivery.is_settled()
    }
}
