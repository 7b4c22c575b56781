//! Retries with backoff and dead-lettering for messages whose handler failed: the message
//! goes back to its queue through a delay queue (see `Producer::publish_delayed`), with its
//! attempt count in a header, until its retries are spent; then to a dead-letter queue with
//! the reason. Each step is confirmed by the broker before the delivery is acked.

use crate::core::error::{Error, Result};
use crate::core::link::{Link, COMMAND_TIMEOUT};
use crate::core::producer::{Outgoing, Producer, ProducerOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;
use std::sync::Arc;
use std::time::Duration;

/// Header carrying the attempt a delivery is: absent on the first, 2 on the first retry...
pub const ATTEMPT_HEADER: &str = "x-attempt";
/// Headers a dead-lettered message gets: why its last attempt failed, and its queue.
pub const REASON_HEADER: &str = "x-failure-reason";
pub const QUEUE_HEADER: &str = "x-failed-queue";
/// Where the message was first published: a retry or dead letter travels through the default
/// exchange, and `Message::getExchange()`/`getRoutingKey()` give these back instead.
pub const EXCHANGE_HEADER: &str = "x-original-exchange";
pub const ROUTING_KEY_HEADER: &str = "x-original-routing-key";

/// Longest delay between two attempts, however many retries.
const MAX_DELAY: Duration = Duration::from_secs(3600);

/// What to do with a message whose handler failed.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Retries after the first attempt (default 3).
    pub max_retries: u32,
    /// Delay before the first retry; it doubles with each one (default 1 s).
    pub delay: Duration,
    /// Queue for messages whose retries are spent; None: `<queue>.dead`.
    pub dead_letter: Option<String>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 3,
            delay: Duration::from_secs(1),
            dead_letter: None,
        }
    }
}

/// Where a failed message went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Back to its queue after `delay`, as attempt `attempt`.
    Retried { attempt: u32, delay: Duration },
    /// Into `queue`, its retries spent.
    DeadLettered { queue: String },
}

/// The attempt a delivery is, from its `x-attempt` header (1 when absent).
pub fn attempt(properties: &BasicProperties) -> u32 {
    let value = properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(ATTEMPT_HEADER).cloned());
    let n = match value {
        Some(AMQPValue::LongLongInt(n)) => n,
        Some(AMQPValue::LongInt(n)) => i64::from(n),
        Some(AMQPValue::ShortInt(n)) => i64::from(n),
        Some(AMQPValue::LongUInt(n)) => i64::from(n),
        Some(AMQPValue::ShortShortInt(n)) => i64::from(n),
        _ => 1,
    };
    u32::try_from(n.max(1)).unwrap_or(u32::MAX)
}

fn with_headers(properties: &BasicProperties, extra: &[(&str, AMQPValue)]) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    for (key, value) in extra {
        headers.insert(ShortString::from(*key), value.clone());
    }
    properties.clone().with_headers(headers)
}

/// Republishes failed messages; one per consumer, made on its first failure.
pub struct Retrier {
    producer: Producer,
}

impl Retrier {
    pub(crate) fn new(link: Arc<Link>) -> Result<Self> {
        Ok(Self {
            producer: Producer::new(link, ProducerOptions::default())?,
        })
    }

    /// Sends a failed delivery of `queue` on: to a retry, or to the dead-letter queue once
    /// `policy` allows no more. Returns once the broker has it; the caller then acks.
    /// `exchange` and `routing_key` are the delivery's, as the consumer saw them.
    #[allow(clippy::too_many_arguments)]
    pub fn handle(
        &mut self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: &BasicProperties,
        reason: &str,
        policy: &RetryPolicy,
    ) -> Result<Fate> {
        let attempt = attempt(properties);
        // Kept from the first publish on; later attempts already carry them.
        let origin = [
            (EXCHANGE_HEADER, AMQPValue::LongString(exchange.into())),
            (
                ROUTING_KEY_HEADER,
                AMQPValue::LongString(routing_key.into()),
            ),
        ];
        let known = properties
            .headers()
            .as_ref()
            .is_some_and(|h| h.inner().contains_key(ROUTING_KEY_HEADER));
        let origin: &[(&str, AMQPValue)] = if known { &[] } else { &origin };
        let fate = if attempt <= policy.max_retries {
            let delay = policy
                .delay
                .saturating_mul(1 << (attempt - 1).min(20))
                .min(MAX_DELAY);
            let next = i64::from(attempt) + 1;
            let message = Outgoing {
                exchange: String::new(),
                routing_key: queue.to_string(),
                body: body.to_vec(),
                properties: with_headers(
                    &with_headers(properties, origin),
                    &[(ATTEMPT_HEADER, AMQPValue::LongLongInt(next))],
                ),
            };
            if delay.is_zero() {
                self.producer.publish(message)?;
            } else {
                self.producer.publish_delayed(message, delay)?;
            }
            Fate::Retried {
                attempt: attempt + 1,
                delay,
            }
        } else {
            let dead = policy
                .dead_letter
                .clone()
                .unwrap_or_else(|| format!("{queue}.dead"));
            self.producer.declare_queue(&dead, FieldTable::default())?;
            let reason: String = reason.chars().take(4000).collect();
            let message = Outgoing {
                exchange: String::new(),
                routing_key: dead.clone(),
                body: body.to_vec(),
                properties: with_headers(
                    &with_headers(properties, origin),
                    &[
                        (ATTEMPT_HEADER, AMQPValue::LongLongInt(i64::from(attempt))),
                        (REASON_HEADER, AMQPValue::LongString(reason.as_str().into())),
                        (QUEUE_HEADER, AMQPValue::LongString(queue.into())),
                    ],
                ),
            };
            self.producer.publish(message)?;
            Fate::DeadLettered { queue: dead }
        };
        let failures = self.producer.wait_for_confirms(COMMAND_TIMEOUT)?;
        if !failures.is_empty() {
            return Err(Error::publish(
                &format!("pass on a failed message of queue '{queue}'"),
                failures,
            ));
        }
        Ok(fate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::connection::tests::connect;
    use crate::core::topology::QueueSpec;

    #[test]
    fn a_failed_message_is_retried_then_dead_lettered_with_its_reason() {
        let mut conn = connect();
        let spec = QueueSpec {
            durable: false,
            exclusive: true,
            ..QueueSpec::default()
        };
        let queue = conn.declare_queue("", spec).expect("queue").name;
        let dead = format!("{queue}.dead");
        let mut retrier = Retrier::new(conn.link_arc()).expect("retrier");
        let policy = RetryPolicy {
            max_retries: 1,
            delay: Duration::ZERO,
            dead_letter: Some(dead.clone()),
        };
        let first = BasicProperties::default();
        assert_eq!(attempt(&first), 1);
        let fate = retrier
            .handle(
                &queue,
                "events",
                "order.created",
                b"job",
                &first,
                "E: boom",
                &policy,
            )
            .expect("retried");
        assert_eq!(
            fate,
            Fate::Retried {
                attempt: 2,
                delay: Duration::ZERO
            }
        );
        let (again, _) = conn.get(&queue, true).expect("get");
        let again = again.expect("back in its queue");
        assert_eq!(attempt(&again.properties), 2);
        let fate = retrier
            .handle(
                &queue,
                "",
                &queue,
                b"job",
                &again.properties,
                "E: boom again",
                &policy,
            )
            .expect("dead-lettered");
        assert_eq!(
            fate,
            Fate::DeadLettered {
                queue: dead.clone()
            }
        );
        let (gone, _) = conn.get(&dead, true).expect("get");
        let headers = gone.expect("dead-lettered").properties.headers().clone();
        let headers = headers.expect("headers");
        assert_eq!(
            headers.inner().get(REASON_HEADER),
            Some(&AMQPValue::LongString("E: boom again".into()))
        );
        assert_eq!(
            headers.inner().get(ROUTING_KEY_HEADER),
            Some(&AMQPValue::LongString("order.created".into())),
            "the first publish's routing key survives every hop"
        );
        conn.delete_queue(&dead, false, false).expect("delete");
    }
}
