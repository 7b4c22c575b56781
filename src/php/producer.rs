//! `AmqpRs\Producer`: converts PHP arguments and delegates to `core::producer`.

// PHP parameter names are camelCase (`$routingKey`) and Reflection shows them as written.
#![allow(non_snake_case)]

use crate::core::error::Error;
use crate::core::producer::{Outgoing, Producer as CoreProducer};
use crate::php::convert::{to_publish_properties, PhpArray};
use crate::php::exceptions::{guard, invalid_argument, warn};
use crate::php::json;
use ext_php_rs::binary_slice::BinarySlice;
use ext_php_rs::exception::PhpResult;
use ext_php_rs::prelude::*;
use ext_php_rs::types::Zval;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// How long a producer being destroyed waits for its last confirms before it warns.
const DROP_WAIT: Duration = Duration::from_secs(5);

/// Publishes messages; made by `Connection::producer()`.
#[php_class]
#[php(name = "AmqpRs\\Producer")]
#[php(flags = ext_php_rs::flags::ClassFlags::Final)]
pub struct Producer {
    inner: Arc<Mutex<CoreProducer>>,
}

impl Producer {
    /// Wraps a core producer made by `Connection::producer()`.
    pub(crate) fn new(inner: Arc<Mutex<CoreProducer>>) -> Self {
        Self { inner }
    }

    fn core(&self) -> MutexGuard<'_, CoreProducer> {
        // Only the PHP thread locks it; a poisoned lock just means an earlier call panicked.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What publish() and publishJson() share: the properties (`delay` among them; with
    /// `content_type` as the default content type) and the publish itself.
    fn send(
        &self,
        body: Vec<u8>,
        routing_key: &str,
        exchange: &str,
        properties: &PhpArray<'_>,
        content_type: Option<&str>,
    ) -> PhpResult<()> {
        let (mut properties, delay) = to_publish_properties(properties.table())?;
        if let (Some(default), None) = (content_type, properties.content_type()) {
            properties = properties.with_content_type(default.into());
        }
        let message = Outgoing {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            body,
            properties,
        };
        match delay {
            Some(delay) => self.core().publish_delayed(message, delay)?,
            None => self.core().publish(message)?,
        }
        Ok(())
    }
}

#[php_impl]
impl Producer {
    /// Publishes one message (binary-safe body) without waiting for the broker.
    #[php(defaults(routingKey = "\"\"", exchange = "\"\"", properties = PhpArray::EMPTY))]
    pub fn publish(
        &self,
        body: BinarySlice<'_, u8>,
        routingKey: &str,
        exchange: &str,
        properties: PhpArray<'_>,
    ) -> PhpResult<()> {
        guard("AmqpRs\\Producer::publish()", || {
            self.send(body.to_vec(), routingKey, exchange, &properties, None)
        })
    }

    /// Publishes a PHP value as a JSON body, `content_type` application/json unless given.
    #[php(defaults(routingKey = "\"\"", exchange = "\"\"", properties = PhpArray::EMPTY))]
    pub fn publish_json(
        &self,
        value: &Zval,
        routingKey: &str,
        exchange: &str,
        properties: PhpArray<'_>,
    ) -> PhpResult<()> {
        guard("AmqpRs\\Producer::publishJson()", || {
            let body = json::encode(value, "AmqpRs\\Producer::publishJson()")?;
            let content_type = Some(json::CONTENT_TYPE);
            self.send(body, routingKey, exchange, &properties, content_type)
        })
    }

    /// Waits until every publish so far is confirmed; `PublishException` lists the failures.
    #[php(defaults(timeout = 30.0))]
    pub fn wait_for_confirms(&self, timeout: f64) -> PhpResult<()> {
        guard("AmqpRs\\Producer::waitForConfirms()", || {
            if !(timeout.is_finite() && timeout >= 0.0) {
                return Err(invalid_argument(format!(
                    "waitForConfirms(): timeout must be a number of seconds >= 0, got {timeout}"
                )));
            }
            let mut core = self.core();
            let failures = core.wait_for_confirms(Duration::from_secs_f64(timeout))?;
            if failures.is_empty() {
                return Ok(());
            }
            let what = format!("publish on {}", core.endpoint());
            Err(Error::publish(&what, failures).into())
        })
    }

    /// Settles what the broker confirmed so far, without waiting: `PublishException` lists
    /// the failures as `waitForConfirms()` does; returns how many are still unconfirmed.
    pub fn poll_confirms(&self) -> PhpResult<i64> {
        guard("AmqpRs\\Producer::pollConfirms()", || {
            let mut core = self.core();
            let (failures, pending) = core.poll_confirms()?;
            if failures.is_empty() {
                return Ok(pending as i64);
            }
            let what = format!("publish on {}", core.endpoint());
            Err(Error::publish(&what, failures).into())
        })
    }

    /// Publishes not yet confirmed by the broker.
    pub fn pending_confirms(&self) -> i64 {
        self.core().pending() as i64
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        let mut core = self.core();
        if !core.is_own() || !core.has_unreported() {
            return;
        }
        let message = match core.wait_for_confirms(DROP_WAIT) {
            Ok(failures) if failures.is_empty() => return,
            Ok(failures) => Error::publish(
                &format!("AmqpRs\\Producer destroyed on {}", core.endpoint()),
                failures,
            )
            .message()
            .to_string(),
            Err(err) => format!(
                "AmqpRs\\Producer destroyed with unconfirmed messages: {}",
                err.message()
            ),
        };
        // A destructor has nowhere to pass an exception on to.
        let _ = warn(&message);
    }
}
