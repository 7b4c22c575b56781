//! Exchanges, queues and bindings: the declare/bind/delete/purge commands of a connection.

use crate::core::connection::Connection;
use crate::core::error::Result;
use crate::core::ids;
use crate::core::shortstr::shortstr;
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::ExchangeKind;

/// Prefix of the names the client gives queues declared without one, when recovery is on.
pub const GENERATED_QUEUE_PREFIX: &str = "amq_rs.gen-";

/// Options of `exchange.declare`.
#[derive(Clone, Debug)]
pub struct ExchangeSpec {
    /// Survive a broker restart (default true).
    pub durable: bool,
    /// Deleted when its last binding goes.
    pub auto_delete: bool,
    /// Only reachable through exchange-to-exchange bindings.
    pub internal: bool,
    /// Only check that it exists.
    pub passive: bool,
    /// `x-...` arguments (alternate-exchange, ...).
    pub arguments: FieldTable,
}

impl Default for ExchangeSpec {
    fn default() -> Self {
        Self {
            durable: true,
            auto_delete: false,
            internal: false,
            passive: false,
            arguments: FieldTable::default(),
        }
    }
}

/// Options of `queue.declare`.
#[derive(Clone, Debug)]
pub struct QueueSpec {
    /// Survive a broker restart (default true).
    pub durable: bool,
    /// Owned by this connection, deleted with it.
    pub exclusive: bool,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// Only check that it exists.
    pub passive: bool,
    /// `x-queue-type`, `x-dead-letter-exchange`, `x-message-ttl`, ...
    pub arguments: FieldTable,
}

impl Default for QueueSpec {
    fn default() -> Self {
        Self {
            durable: true,
            exclusive: false,
            auto_delete: false,
            passive: false,
            arguments: FieldTable::default(),
        }
    }
}

/// What `queue.declare` answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueState {
    /// The queue's name (the server's choice when declared with "").
    pub name: String,
    /// Messages ready for delivery.
    pub messages: u32,
    /// Consumers attached.
    pub consumers: u32,
}

fn exchange_kind(kind: &str) -> ExchangeKind {
    match kind {
        "direct" => ExchangeKind::Direct,
        "fanout" => ExchangeKind::Fanout,
        "topic" => ExchangeKind::Topic,
        "headers" => ExchangeKind::Headers,
        other => ExchangeKind::Custom(other.to_string()),
    }
}

fn names(
    queue: &str,
    exchange: &str,
    routing_key: &str,
) -> Result<(ShortString, ShortString, ShortString)> {
    Ok((
        shortstr(queue, "queue name")?,
        shortstr(exchange, "exchange name")?,
        shortstr(routing_key, "routing key")?,
    ))
}

impl Connection {
    /// Declares (or with `passive`, checks) an exchange of type `kind`.
    pub fn declare_exchange(&mut self, name: &str, kind: &str, spec: ExchangeSpec) -> Result<()> {
        let what = format!("declare exchange '{name}' ({kind})");
        let options = ExchangeDeclareOptions {
            passive: spec.passive,
            durable: spec.durable,
            auto_delete: spec.auto_delete,
            internal: spec.internal,
            nowait: false,
        };
        let kind = exchange_kind(kind);
        let name = shortstr(name, "exchange name")?;
        self.command(&what, |ch| async move {
            ch.exchange_declare(name, kind, options, spec.arguments)
                .await
        })
    }

    /// Declares (or with `passive`, checks) a queue; "" asks the broker for a name.
    pub fn declare_queue(&mut self, name: &str, spec: QueueSpec) -> Result<QueueState> {
        let what = if name.is_empty() {
            "declare a server-named queue".to_string()
        } else {
            format!("declare queue '{name}'")
        };
        // A name the server makes (amq.gen-...) cannot be declared again after a recovery:
        // the amq. prefix is reserved. With recovery on, the client names the queue itself.
        let generated;
        let name = if name.is_empty() && !spec.passive && self.reconnects() {
            generated = format!("{GENERATED_QUEUE_PREFIX}{}", ids::random_name()?);
            generated.as_str()
        } else {
            name
        };
        let options = QueueDeclareOptions {
            passive: spec.passive,
            durable: spec.durable,
            exclusive: spec.exclusive,
            auto_delete: spec.auto_delete,
            nowait: false,
        };
        let name = shortstr(name, "queue name")?;
        let arguments = spec.arguments;
        let args = arguments.clone();
        let queue = self.command(&what, |ch| async move {
            ch.queue_declare(name, options, args).await
        })?;
        self.link()
            .remember_queue(queue.name().as_str(), options, arguments);
        Ok(QueueState {
            name: queue.name().to_string(),
            messages: queue.message_count(),
            consumers: queue.consumer_count(),
        })
    }

    /// Binds `queue` to `exchange` with `routing_key`.
    pub fn bind_queue(
        &mut self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        let what =
            format!("bind queue '{queue}' to exchange '{exchange}' with key '{routing_key}'");
        let (queue, exchange, routing_key) = names(queue, exchange, routing_key)?;
        self.command(&what, |ch| async move {
            ch.queue_bind(
                queue,
                exchange,
                routing_key,
                QueueBindOptions::default(),
                arguments,
            )
            .await
        })
    }

    /// Removes a binding made by `bind_queue`.
    pub fn unbind_queue(
        &mut self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        let what =
            format!("unbind queue '{queue}' from exchange '{exchange}' with key '{routing_key}'");
        let (queue, exchange, routing_key) = names(queue, exchange, routing_key)?;
        self.command(&what, |ch| async move {
            ch.queue_unbind(queue, exchange, routing_key, arguments)
                .await
        })
    }

    /// Deletes a queue; returns how many messages went with it.
    pub fn delete_queue(&mut self, name: &str, if_unused: bool, if_empty: bool) -> Result<u32> {
        let what = format!("delete queue '{name}'");
        let options = QueueDeleteOptions {
            if_unused,
            if_empty,
            nowait: false,
        };
        let queue = shortstr(name, "queue name")?;
        let deleted = self.command(
            &what,
            |ch| async move { ch.queue_delete(queue, options).await },
        )?;
        self.link().forget_queue(name);
        Ok(deleted)
    }

    /// Deletes an exchange.
    pub fn delete_exchange(&mut self, name: &str, if_unused: bool) -> Result<()> {
        let what = format!("delete exchange '{name}'");
        let options = ExchangeDeleteOptions {
            if_unused,
            nowait: false,
        };
        let name = shortstr(name, "exchange name")?;
        self.command(&what, |ch| async move {
            ch.exchange_delete(name, options).await
        })
    }

    /// Removes every ready message of a queue; returns how many.
    pub fn purge_queue(&mut self, name: &str) -> Result<u32> {
        let what = format!("purge queue '{name}'");
        let name = shortstr(name, "queue name")?;
        self.command(&what, |ch| async move {
            ch.queue_purge(name, QueuePurgeOptions::default()).await
        })
    }

    /// Message and consumer counts of an existing queue (a passive declare).
    pub fn queue_status(&mut self, name: &str) -> Result<QueueState> {
        self.declare_queue(
            name,
            QueueSpec {
                passive: true,
                ..QueueSpec::default()
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::connection::tests::connect;
    use crate::core::error::ErrorKind;
    use lapin::types::AMQPValue;

    fn unique(prefix: &str) -> String {
        format!("amqp_rs.core.{prefix}.{}", std::process::id())
    }

    #[test]
    fn declare_bind_purge_delete_round_trip() {
        let mut conn = connect();
        let ex = unique("ex");
        let q = unique("q");
        conn.declare_exchange(&ex, "topic", ExchangeSpec::default())
            .expect("exchange");
        let state = conn.declare_queue(&q, QueueSpec::default()).expect("queue");
        assert_eq!(
            state,
            QueueState {
                name: q.clone(),
                messages: 0,
                consumers: 0
            }
        );
        conn.bind_queue(&q, &ex, "a.#", FieldTable::default())
            .expect("bind");
        conn.unbind_queue(&q, &ex, "a.#", FieldTable::default())
            .expect("unbind");
        assert_eq!(conn.purge_queue(&q).expect("purge"), 0);
        assert_eq!(conn.delete_queue(&q, false, false).expect("delete"), 0);
        conn.delete_exchange(&ex, false).expect("delete exchange");
    }

    #[test]
    fn a_queue_without_a_name_is_named_by_the_client_when_recovery_is_on() {
        let mut conn = connect();
        let spec = QueueSpec {
            durable: false,
            exclusive: true,
            ..QueueSpec::default()
        };
        let state = conn.declare_queue("", spec.clone()).expect("queue");
        assert!(
            state.name.starts_with(GENERATED_QUEUE_PREFIX),
            "{}",
            state.name
        );
        assert!(conn.link().transient_queue(&state.name).is_some());
        conn.delete_queue(&state.name, false, false)
            .expect("delete");
        assert!(conn.link().transient_queue(&state.name).is_none());

        let options = crate::core::connect_options::ConnectOptions {
            reconnect: false,
            ..Default::default()
        };
        let uris = [crate::core::testing::broker()];
        let mut plain = Connection::open(&uris, &options).expect("broker up");
        let state = plain.declare_queue("", spec).expect("queue");
        assert!(state.name.starts_with("amq.gen-"), "{}", state.name);
    }

    #[test]
    fn redeclare_with_other_arguments_is_406_and_the_connection_serves_on() {
        let mut conn = connect();
        let q = unique("redeclare");
        let _ = conn.delete_queue(&q, false, false);
        conn.declare_queue(&q, QueueSpec::default()).expect("first");
        let mut args = FieldTable::default();
        args.insert(
            ShortString::from("x-max-length"),
            AMQPValue::LongLongInt(10),
        );
        let err = conn
            .declare_queue(
                &q,
                QueueSpec {
                    arguments: args,
                    ..QueueSpec::default()
                },
            )
            .expect_err("406");
        assert_eq!(err.kind(), ErrorKind::Channel(406));
        assert!(err.message().contains(&q), "{}", err.message());
        assert_eq!(conn.queue_status(&q).expect("still serves").messages, 0);
        conn.delete_queue(&q, false, false).expect("cleanup");
    }

    #[test]
    fn passive_declare_of_a_missing_queue_is_404() {
        let mut conn = connect();
        let err = conn.queue_status(&unique("missing")).expect_err("404");
        assert_eq!(err.code(), 404);
    }
}
