//! Delayed publishing: a message waits in a delay queue the producer declares (per exchange,
//! routing key and delay: a per-queue TTL, so no message waits behind a longer one), whose
//! dead-letter target is the message's own exchange and routing key. Retries (`retry.rs`)
//! go back to their queue this way.

use crate::core::error::Result;
use crate::core::producer::{Outgoing, Producer};
use lapin::types::{AMQPValue, FieldTable};
use std::time::Duration;

/// How long a delay queue may sit unused (no declare) beyond its delay before the broker
/// deletes it.
const DELAY_QUEUE_IDLE: Duration = Duration::from_secs(3600);

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

impl Producer {
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
}
