//! `AmqpRs\Connection`: converts PHP arguments and delegates to `core::connection` and
//! `core::topology`.

// PHP parameter names are camelCase (`$routingKey`) and Reflection shows them as written.
#![allow(non_snake_case)]

use crate::core::connect_options::{ConnectOptions, TlsOptions};
use crate::core::connection::Connection as CoreConnection;
use crate::core::consumer::ConsumerOptions;
use crate::core::producer::{Outgoing, ProducerOptions};
use crate::core::topology::{ExchangeSpec, QueueSpec};
use crate::php::consumer::Consumer;
use crate::php::convert::{
    string_list, to_field_table, to_properties, Options, PhpArray, StringOrList,
};
use crate::php::exceptions::{guard, invalid_argument, warn};
use crate::php::message::Message;
use crate::php::producer::Producer;
use crate::php::readiness::stream_from_fd;
use crate::php::rpc_call::RpcCall;
use ext_php_rs::binary_slice::BinarySlice;
use ext_php_rs::boxed::ZBox;
use ext_php_rs::convert::{FromZval, StubLiteral};
use ext_php_rs::exception::PhpResult;
use ext_php_rs::flags::DataType;
use ext_php_rs::prelude::*;
use ext_php_rs::types::{ZendHashTable, Zval};
use std::time::Duration;

/// The broker a `new Connection()` without arguments talks to.
pub const DEFAULT_URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The `string|array $uri` parameter: one URI or a list tried in order.
///
/// Reflection shows the union because `arginfo` patches the declared type after startup.
pub enum UriArg<'a> {
    /// Omitted: `DEFAULT_URI`.
    Default,
    /// Whatever the caller passed, checked in `uris()` for a precise TypeError.
    Given(&'a Zval),
}

impl<'a> FromZval<'a> for UriArg<'a> {
    const TYPE: DataType = DataType::Mixed;

    fn from_zval(zval: &'a Zval) -> Option<Self> {
        Some(UriArg::Given(zval))
    }
}

impl StubLiteral for UriArg<'_> {
    fn stub_literal(&self) -> String {
        DEFAULT_URI.stub_literal()
    }
}

impl UriArg<'_> {
    fn uris(&self) -> PhpResult<Vec<String>> {
        match self {
            UriArg::Default => Ok(vec![DEFAULT_URI.to_string()]),
            UriArg::Given(z) => {
                string_list(z, "AmqpRs\\Connection::__construct(): Argument #1 ($uri)")
            }
        }
    }
}

fn connect_options(options: &PhpArray<'_>) -> PhpResult<ConnectOptions> {
    let ctx = "Connection options";
    let opts = Options::new(
        options.table(),
        &[
            "heartbeat",
            "connect_timeout",
            "name",
            "reconnect",
            "tls",
            "persistent",
        ],
        ctx,
    )?;
    let defaults = ConnectOptions::default();
    let timeout = opts.float("connect_timeout", defaults.connect_timeout.as_secs_f64())?;
    if !(timeout > 0.0 && timeout <= 3600.0) {
        return Err(invalid_argument(format!(
            "{ctx}: option 'connect_timeout' must be a number of seconds in (0, 3600], got {timeout}"
        )));
    }
    Ok(ConnectOptions {
        heartbeat: opts.int_in("heartbeat", i64::from(defaults.heartbeat), 0..=65535)? as u16,
        connect_timeout: Duration::from_secs_f64(timeout),
        name: opts.string("name")?,
        reconnect: opts.bool("reconnect", defaults.reconnect)?,
        tls: tls_options(opts.array("tls")?)?,
        persistent: opts.bool("persistent", defaults.persistent)?,
    })
}

fn tls_options(tls: Option<&ZendHashTable>) -> PhpResult<TlsOptions> {
    let opts = Options::new(
        tls,
        &["cafile", "certfile", "keyfile", "verify"],
        "Connection option 'tls'",
    )?;
    Ok(TlsOptions {
        cafile: opts.string("cafile")?,
        certfile: opts.string("certfile")?,
        keyfile: opts.string("keyfile")?,
        verify: opts.bool("verify", true)?,
    })
}

/// A connection to RabbitMQ, opened in the constructor.
#[php_class]
#[php(name = "AmqpRs\\Connection")]
#[php(flags = ext_php_rs::flags::ClassFlags::Final)]
pub struct Connection {
    inner: CoreConnection,
}

#[php_impl]
#[allow(non_snake_case)]
impl Connection {
    /// Connects to the first broker of `$uri` (one URI or a list) that answers.
    #[php(defaults(uri = UriArg::Default, options = PhpArray::EMPTY))]
    pub fn __construct(uri: UriArg<'_>, options: PhpArray<'_>) -> PhpResult<Self> {
        guard("AmqpRs\\Connection::__construct()", || {
            let uris = uri.uris()?;
            let options = connect_options(&options)?;
            let inner = CoreConnection::open(&uris, &options)?;
            Ok(Self { inner })
        })
    }

    /// Whether the connection is open and usable.
    pub fn is_connected(&self) -> bool {
        self.inner.is_connected()
    }

    /// Closes the connection; calling it again does nothing. A persistent connection is only
    /// released: it stays in the pool for the next request.
    pub fn close(&mut self) -> PhpResult<()> {
        guard("AmqpRs\\Connection::close()", || Ok(self.inner.close()?))
    }

    /// Whether this connection was opened with `persistent` and lives in the process's pool.
    pub fn is_persistent(&self) -> bool {
        self.inner.is_persistent()
    }

    /// Closes a persistent connection for good and takes it out of the pool, as php-amqp's
    /// `pdisconnect()`; on a connection that is not persistent, the same as `close()`.
    pub fn close_persistent(&mut self) -> PhpResult<()> {
        guard("AmqpRs\\Connection::closePersistent()", || {
            Ok(self.inner.close_persistent()?)
        })
    }

    /// Declares an exchange (`passive` only checks that it exists).
    #[php(defaults(r#type = "\"direct\"", options = PhpArray::EMPTY))]
    pub fn declare_exchange(
        &mut self,
        name: &str,
        r#type: &str,
        options: PhpArray<'_>,
    ) -> PhpResult<()> {
        guard("AmqpRs\\Connection::declareExchange()", || {
            let opts = Options::new(
                options.table(),
                &["durable", "auto_delete", "internal", "passive", "arguments"],
                "declareExchange options",
            )?;
            let spec = ExchangeSpec {
                durable: opts.bool("durable", true)?,
                auto_delete: opts.bool("auto_delete", false)?,
                internal: opts.bool("internal", false)?,
                passive: opts.bool("passive", false)?,
                arguments: opts.field_table("arguments")?,
            };
            if r#type.is_empty() {
                return Err(invalid_argument(
                    "declareExchange: the exchange type is empty",
                ));
            }
            Ok(self.inner.declare_exchange(name, r#type, spec)?)
        })
    }

    /// Declares a queue and returns its name ('' lets the broker choose one).
    #[php(defaults(name = "\"\"", options = PhpArray::EMPTY))]
    pub fn declare_queue(&mut self, name: &str, options: PhpArray<'_>) -> PhpResult<String> {
        guard("AmqpRs\\Connection::declareQueue()", || {
            let opts = Options::new(
                options.table(),
                &[
                    "durable",
                    "exclusive",
                    "auto_delete",
                    "passive",
                    "arguments",
                ],
                "declareQueue options",
            )?;
            let spec = QueueSpec {
                durable: opts.bool("durable", true)?,
                exclusive: opts.bool("exclusive", false)?,
                auto_delete: opts.bool("auto_delete", false)?,
                passive: opts.bool("passive", false)?,
                arguments: opts.field_table("arguments")?,
            };
            Ok(self.inner.declare_queue(name, spec)?.name)
        })
    }

    /// Binds a queue to an exchange.
    #[php(defaults(routingKey = "\"\"", arguments = PhpArray::EMPTY))]
    pub fn bind_queue(
        &mut self,
        queue: &str,
        exchange: &str,
        routingKey: &str,
        arguments: PhpArray<'_>,
    ) -> PhpResult<()> {
        guard("AmqpRs\\Connection::bindQueue()", || {
            let args = binding_arguments(&arguments, "bindQueue arguments")?;
            Ok(self.inner.bind_queue(queue, exchange, routingKey, args)?)
        })
    }

    /// Removes a binding.
    #[php(defaults(routingKey = "\"\"", arguments = PhpArray::EMPTY))]
    pub fn unbind_queue(
        &mut self,
        queue: &str,
        exchange: &str,
        routingKey: &str,
        arguments: PhpArray<'_>,
    ) -> PhpResult<()> {
        guard("AmqpRs\\Connection::unbindQueue()", || {
            let args = binding_arguments(&arguments, "unbindQueue arguments")?;
            Ok(self.inner.unbind_queue(queue, exchange, routingKey, args)?)
        })
    }

    /// Deletes a queue; returns how many messages were deleted with it.
    #[php(defaults(options = PhpArray::EMPTY))]
    pub fn delete_queue(&mut self, name: &str, options: PhpArray<'_>) -> PhpResult<i64> {
        guard("AmqpRs\\Connection::deleteQueue()", || {
            let opts = Options::new(
                options.table(),
                &["if_unused", "if_empty"],
                "deleteQueue options",
            )?;
            let if_unused = opts.bool("if_unused", false)?;
            let if_empty = opts.bool("if_empty", false)?;
            Ok(i64::from(
                self.inner.delete_queue(name, if_unused, if_empty)?,
            ))
        })
    }

    /// Deletes an exchange.
    #[php(defaults(options = PhpArray::EMPTY))]
    pub fn delete_exchange(&mut self, name: &str, options: PhpArray<'_>) -> PhpResult<()> {
        guard("AmqpRs\\Connection::deleteExchange()", || {
            let opts = Options::new(options.table(), &["if_unused"], "deleteExchange options")?;
            let if_unused = opts.bool("if_unused", false)?;
            Ok(self.inner.delete_exchange(name, if_unused)?)
        })
    }

    /// Removes all ready messages of a queue; returns how many.
    pub fn purge_queue(&mut self, name: &str) -> PhpResult<i64> {
        guard("AmqpRs\\Connection::purgeQueue()", || {
            Ok(i64::from(self.inner.purge_queue(name)?))
        })
    }

    /// A producer on its own channel: `confirms` (default true), `mandatory` (default false),
    /// `blocked_timeout` (seconds `publish()` waits while the broker blocks the connection,
    /// default 30), `nack_retries` (republishes of a nacked message before it is reported,
    /// default 6), `stamp_message_id` (a UUID `message_id` on messages without one).
    #[php(defaults(options = PhpArray::EMPTY))]
    pub fn producer(&mut self, options: PhpArray<'_>) -> PhpResult<Producer> {
        guard("AmqpRs\\Connection::producer()", || {
            let opts = Options::new(
                options.table(),
                &[
                    "confirms",
                    "mandatory",
                    "blocked_timeout",
                    "nack_retries",
                    "stamp_message_id",
                ],
                "producer options",
            )?;
            let defaults = ProducerOptions::default();
            let options = ProducerOptions {
                confirms: opts.bool("confirms", defaults.confirms)?,
                mandatory: opts.bool("mandatory", defaults.mandatory)?,
                blocked_timeout: opts.duration("blocked_timeout", defaults.blocked_timeout)?,
                nack_retries: opts.int_in(
                    "nack_retries",
                    i64::from(defaults.nack_retries),
                    0..=20,
                )? as u32,
                stamp_message_id: opts.bool("stamp_message_id", defaults.stamp_message_id)?,
            };
            Ok(Producer::new(self.inner.producer(options)?))
        })
    }

    /// A consumer of one queue or a list of queues: `prefetch` (default 100), `auto_ack`,
    /// `exclusive`, `consumer_tag`, `arguments`, `priority`.
    #[php(defaults(options = PhpArray::EMPTY))]
    pub fn consumer(
        &mut self,
        queues: StringOrList<'_>,
        options: PhpArray<'_>,
    ) -> PhpResult<Consumer> {
        guard("AmqpRs\\Connection::consumer()", || {
            let queues = string_list(
                queues.0,
                "AmqpRs\\Connection::consumer(): Argument #1 ($queues)",
            )?;
            let opts = Options::new(
                options.table(),
                &[
                    "prefetch",
                    "auto_ack",
                    "exclusive",
                    "consumer_tag",
                    "arguments",
                    "priority",
                ],
                "consumer options",
            )?;
            let priority = match opts.get("priority") {
                None => None,
                Some(_) => Some(opts.int_in(
                    "priority",
                    0,
                    i64::from(i32::MIN)..=i64::from(i32::MAX),
                )? as i32),
            };
            let options = ConsumerOptions {
                prefetch: opts.int_in("prefetch", 100, 0..=65535)? as u16,
                auto_ack: opts.bool("auto_ack", false)?,
                exclusive: opts.bool("exclusive", false)?,
                consumer_tag: opts.string("consumer_tag")?,
                arguments: opts.field_table("arguments")?,
                priority,
            };
            let core = self.inner.consumer(&queues, &options)?;
            Ok(Consumer::new(core))
        })
    }

    /// One message by basic.get, or null when the queue is empty.
    #[php(defaults(autoAck = false))]
    pub fn get(&mut self, queue: &str, autoAck: bool) -> PhpResult<Option<Message>> {
        guard("AmqpRs\\Connection::get()", || {
            let (delivery, warnings) = self.inner.get(queue, autoAck)?;
            for warning in warnings {
                warn(&warning)?;
            }
            let link = self.inner.link_arc();
            Ok(delivery.map(|d| Message::received(d, link, autoAck)))
        })
    }

    /// Publishes a request and waits up to `timeout` seconds for its reply (direct reply-to):
    /// `reply_to` and `correlation_id` are set for you. `TimeoutException` when no reply comes.
    #[php(defaults(routingKey = "\"\"", exchange = "\"\"", properties = PhpArray::EMPTY, timeout = 30.0))]
    pub fn rpc(
        &mut self,
        body: BinarySlice<'_, u8>,
        routingKey: &str,
        exchange: &str,
        properties: PhpArray<'_>,
        timeout: f64,
    ) -> PhpResult<Message> {
        guard("AmqpRs\\Connection::rpc()", || {
            let request = rpc_request("rpc", &body, routingKey, exchange, &properties, timeout)?;
            let reply = self.inner.rpc(request, Duration::from_secs_f64(timeout))?;
            let link = self.inner.link_arc();
            Ok(Message::received(reply, link, true))
        })
    }

    /// Publishes a request as `rpc()` does and returns at once: the reply is taken from the
    /// `RpcCall`, when `readiness()` says something came. The timeout still holds.
    #[php(defaults(routingKey = "\"\"", exchange = "\"\"", properties = PhpArray::EMPTY, timeout = 30.0))]
    pub fn rpc_async(
        &mut self,
        body: BinarySlice<'_, u8>,
        routingKey: &str,
        exchange: &str,
        properties: PhpArray<'_>,
        timeout: f64,
    ) -> PhpResult<RpcCall> {
        guard("AmqpRs\\Connection::rpcAsync()", || {
            let name = "rpcAsync";
            let request = rpc_request(name, &body, routingKey, exchange, &properties, timeout)?;
            let call = self
                .inner
                .rpc_start(request, Duration::from_secs_f64(timeout))?;
            Ok(RpcCall::new(call, self.inner.link_arc()))
        })
    }

    /// A read-only stream that is readable while a consumer, producer or RPC call of this
    /// connection may have something to take (see docs/event-loops.md); never read it.
    pub fn readiness(&mut self) -> PhpResult<Zval> {
        guard("AmqpRs\\Connection::readiness()", || {
            let fd = self.inner.readiness_fd()?;
            stream_from_fd(fd)
        })
    }

    /// `['messages' => int, 'consumers' => int]` of an existing queue.
    pub fn queue_status(&mut self, name: &str) -> PhpResult<ZBox<ZendHashTable>> {
        guard("AmqpRs\\Connection::queueStatus()", || {
            let state = self.inner.queue_status(name)?;
            let mut out = ZendHashTable::new();
            out.insert("messages", i64::from(state.messages))?;
            out.insert("consumers", i64::from(state.consumers))?;
            Ok(out)
        })
    }
}

/// The request `rpc()` and `rpcAsync()` send; `method` names the caller in errors.
fn rpc_request(
    method: &str,
    body: &BinarySlice<'_, u8>,
    routing_key: &str,
    exchange: &str,
    properties: &PhpArray<'_>,
    timeout: f64,
) -> PhpResult<Outgoing> {
    if !(timeout.is_finite() && timeout > 0.0) {
        return Err(invalid_argument(format!(
            "{method}(): timeout must be a number of seconds > 0, got {timeout}"
        )));
    }
    let table = properties.table();
    let given = |key: &str| table.is_some_and(|t| t.get(key).is_some());
    if given("reply_to") {
        return Err(invalid_argument(format!(
            "{method}(): 'reply_to' is set by {method}() itself (direct reply-to); publish() \
             with your own reply_to and consume that queue instead"
        )));
    }
    let mut props = to_properties(table)?;
    if !given("delivery_mode") {
        // A request lives as long as its caller waits: not worth a disk write.
        props = props.with_delivery_mode(1);
    }
    if props
        .correlation_id()
        .as_ref()
        .is_some_and(|id| id.as_str().is_empty())
    {
        return Err(invalid_argument(format!(
            "{method}(): 'correlation_id' may not be empty (leave it out to have one made)"
        )));
    }
    Ok(Outgoing {
        exchange: exchange.to_string(),
        routing_key: routing_key.to_string(),
        body: body.to_vec(),
        properties: props,
    })
}

fn binding_arguments(arguments: &PhpArray<'_>, path: &str) -> PhpResult<lapin::types::FieldTable> {
    match arguments.table() {
        None => Ok(lapin::types::FieldTable::default()),
        Some(table) => to_field_table(table, path),
    }
}
