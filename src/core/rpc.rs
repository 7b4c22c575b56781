//! Request/reply over RabbitMQ's direct reply-to (`amq.rabbitmq.reply-to`): no reply queue to
//! declare, and replies come back on the channel the request left on.

use crate::core::error::{self, Error, ErrorKind, Failure, Result};
use crate::core::ids;
use crate::core::link::{Link, COMMAND_TIMEOUT};
use crate::core::producer::Outgoing;
use crate::core::runtime;
use crate::core::shortstr::shortstr;
use futures_core::Stream;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// How long a call waits for its reply before it also watches its confirm (see `call`).
const QUIET: Duration = Duration::from_millis(5);

/// The pseudo-queue the broker routes replies through.
pub const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// A connection's RPC channel: a no-ack consumer of `amq.rabbitmq.reply-to` and the channel
/// requests are published on (direct reply-to needs both on the same channel).
pub(crate) struct RpcClient {
    channel: Channel,
    replies: lapin::Consumer,
    /// Random, so correlation ids never collide with another client's.
    prefix: String,
    sequence: u64,
}

fn failure(request: &Outgoing, reply_code: u16, reason: String) -> Failure {
    let message_id = request
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str());
    Failure::new(
        &request.exchange,
        &request.routing_key,
        message_id,
        reply_code,
        reason,
    )
}

impl RpcClient {
    pub(crate) fn open(link: &Link) -> Result<Self> {
        // Confirm mode, so that a request no queue takes comes back at once (mandatory).
        let channel = link.open_confirm_channel("make RPC calls")?;
        let context = format!("consume RPC replies ({REPLY_TO}) on {}", link.endpoint());
        let options = BasicConsumeOptions {
            no_ack: true,
            ..BasicConsumeOptions::default()
        };
        let replies = runtime::command(
            channel.basic_consume(REPLY_TO.into(), "".into(), options, FieldTable::default()),
            COMMAND_TIMEOUT,
            &context,
        )?;
        Ok(Self {
            channel,
            replies,
            prefix: ids::random_name()?,
            sequence: 0,
        })
    }

    /// Whether the channel can still serve (lapin recovers it with the connection).
    pub(crate) fn usable(&self, link: &Link) -> bool {
        link.channel_usable(&self.channel)
    }

    /// Publishes `request` with `reply_to` and a `correlation_id` (the caller's, if given) and
    /// waits up to `timeout` for the reply that carries it; replies to earlier calls that
    /// timed out are dropped on the way.
    pub(crate) fn call(
        &mut self,
        link: &Link,
        request: Outgoing,
        timeout: Duration,
    ) -> Result<Delivery> {
        let what = format!(
            "RPC to exchange '{}' with routing key '{}' on {}",
            request.exchange,
            request.routing_key,
            link.endpoint()
        );
        let exchange = shortstr(&request.exchange, "exchange name")?;
        let routing_key = shortstr(&request.routing_key, "routing key")?;
        let correlation_id = match request.properties.correlation_id() {
            Some(id) => id.clone(),
            None => {
                self.sequence += 1;
                ShortString::from(format!("{}.{}", self.prefix, self.sequence))
            }
        };
        let properties: BasicProperties = request
            .properties
            .clone()
            .with_reply_to(REPLY_TO.into())
            .with_correlation_id(correlation_id.clone());
        let channel = self.channel.clone();
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let body = request.body.as_slice();
        let mut confirm = Box::pin(async move {
            channel
                .basic_publish(exchange, routing_key, options, body, properties)
                .await?
                .await
        });
        let mut confirmed = false;
        let replies = &mut self.replies;
        let watch_confirm = Cell::new(false);
        let mut poll = |cx: &mut Context<'_>| {
            if !confirmed {
                // The confirm comes before the reply: waking the PHP thread for it would
                // cost a second wake-up per call. Only a late call (no reply within
                // QUIET) waits for it, to report a returned request.
                let mut quiet = Context::from_waker(Waker::noop());
                let confirm_cx = if watch_confirm.get() {
                    &mut *cx
                } else {
                    &mut quiet
                };
                match confirmed_or_failure(confirm.as_mut().poll(confirm_cx), &request, &what) {
                    Poll::Ready(Ok(())) => confirmed = true,
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                    Poll::Pending => {}
                }
            }
            poll_reply(replies, &correlation_id, &what, cx)
        };
        let outcome =
            match runtime::park_on(std::future::poll_fn(&mut poll), QUIET.min(timeout), &what) {
                Err(err) if err.kind() == ErrorKind::Timeout && timeout > QUIET => {
                    watch_confirm.set(true);
                    runtime::park_on(std::future::poll_fn(&mut poll), timeout - QUIET, &what)
                }
                other => other,
            };
        match outcome {
            Ok(result) => result,
            Err(err) if err.kind() == ErrorKind::Timeout => Err(Error::timeout(format!(
                "{what}: no reply with correlation_id '{}' within {:.1} s",
                correlation_id.as_str(),
                timeout.as_secs_f64()
            ))),
            Err(err) => Err(err),
        }
    }
}

/// What the confirm of a request says: `Ok` once the broker took it, the failure if it was
/// returned (no queue bound for it) or nacked.
fn confirmed_or_failure(
    confirm: Poll<lapin::Result<Confirmation>>,
    request: &Outgoing,
    what: &str,
) -> Poll<Result<()>> {
    let failure = match confirm {
        Poll::Pending => return Poll::Pending,
        Poll::Ready(Ok(Confirmation::Ack(None))) => return Poll::Ready(Ok(())),
        Poll::Ready(Err(e)) => return Poll::Ready(Err(Error::from_lapin(&e, what))),
        Poll::Ready(Ok(Confirmation::Ack(Some(returned))))
        | Poll::Ready(Ok(Confirmation::Nack(Some(returned)))) => failure(
            request,
            returned.reply_code,
            format!(
                "returned by the broker: {} {} (no queue is bound for it: is the server \
                 running?)",
                returned.reply_code, returned.reply_text
            ),
        ),
        Poll::Ready(Ok(_)) => failure(request, 0, "nacked by the broker".to_string()),
    };
    Poll::Ready(Err(Error::publish(what, vec![failure])))
}

/// The reply that carries `correlation_id`, dropping late replies to earlier calls.
fn poll_reply(
    replies: &mut lapin::Consumer,
    correlation_id: &ShortString,
    what: &str,
    cx: &mut Context<'_>,
) -> Poll<Result<Delivery>> {
    loop {
        return match Pin::new(&mut *replies).poll_next(cx) {
            Poll::Ready(Some(Ok(reply)))
                if reply.properties.correlation_id().as_ref() == Some(correlation_id) =>
            {
                Poll::Ready(Ok(reply))
            }
            // A late reply to an earlier call that timed out.
            Poll::Ready(Some(Ok(_))) => continue,
            Poll::Ready(Some(Err(e))) => {
                let err = Error::from_lapin(&e, what);
                if !error::lost_connection(&e) {
                    return Poll::Ready(Err(err));
                }
                Poll::Ready(Err(Error::new(
                    err.kind(),
                    format!(
                        "{} (the connection was lost during the call: the request may or may \
                         not have been handled)",
                        err.message()
                    ),
                )))
            }
            Poll::Ready(None) => Poll::Ready(Err(Error::new(
                ErrorKind::Channel(0),
                format!("{what}: the broker cancelled the reply consumer"),
            ))),
            Poll::Pending => Poll::Pending,
        };
    }
}

/// Publishes `body` to `reply_to` with `correlation_id` copied, on the connection's reply
/// channel, and waits for the broker to confirm it.
pub(crate) fn reply(
    link: &Link,
    reply_to: &str,
    correlation_id: Option<ShortString>,
    body: &[u8],
    mut properties: BasicProperties,
) -> Result<()> {
    let what = format!("reply to '{reply_to}' on {}", link.endpoint());
    if let Some(id) = correlation_id {
        if properties.correlation_id().is_none() {
            properties = properties.with_correlation_id(id);
        }
    }
    let channel = link.reply_channel()?;
    let routing_key = shortstr(reply_to, "reply_to")?;
    let confirm = runtime::command(
        async move {
            channel
                .basic_publish(
                    "".into(),
                    routing_key,
                    BasicPublishOptions::default(),
                    body,
                    properties,
                )
                .await?
                .await
        },
        COMMAND_TIMEOUT,
        &what,
    )?;
    match confirm {
        Confirmation::Nack(_) => Err(Error::publish(
            &what,
            vec![Failure::new("", reply_to, None, 0, "nacked by the broker")],
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::connection::tests::connect;
    use crate::core::consumer::{ConsumerOptions, Incoming};
    use crate::core::settlements::Settlement;
    use crate::core::topology::QueueSpec;

    fn request(queue: &str, body: &[u8]) -> Outgoing {
        Outgoing {
            exchange: String::new(),
            routing_key: queue.to_string(),
            body: body.to_vec(),
            properties: BasicProperties::default(),
        }
    }

    #[test]
    fn a_call_gets_its_own_reply_and_late_replies_are_dropped() {
        let mut server = connect();
        let spec = QueueSpec {
            durable: false,
            auto_delete: true,
            ..QueueSpec::default()
        };
        let queue = server.declare_queue("", spec).expect("queue").name;
        let mut consumer = server
            .consumer(std::slice::from_ref(&queue), &ConsumerOptions::default())
            .expect("consumer");
        let serve = std::thread::spawn(move || {
            for round in 0..2 {
                let Some(Incoming::Message(delivery)) = consumer
                    .next(Duration::from_secs(10), false)
                    .expect("delivery")
                else {
                    panic!("no delivery in time");
                };
                if round == 0 {
                    // Too slow for the first call, which times out: this reply arrives late.
                    std::thread::sleep(Duration::from_millis(600));
                }
                let reply_to = delivery.properties.reply_to().clone().expect("reply_to");
                reply(
                    delivery.link(),
                    reply_to.as_str(),
                    delivery.properties.correlation_id().clone(),
                    &delivery.body.to_ascii_uppercase(),
                    BasicProperties::default(),
                )
                .expect("reply");
                delivery.settle(Settlement::Ack, "ack").expect("ack");
            }
            drop(consumer);
            server
        });

        let mut client = connect();
        let err = client
            .rpc(request(&queue, b"slow"), Duration::from_millis(300))
            .expect_err("times out");
        assert_eq!(err.kind(), ErrorKind::Timeout);
        assert!(
            err.message().contains("no reply with correlation_id"),
            "{}",
            err.message()
        );
        let reply = client
            .rpc(request(&queue, b"ping"), Duration::from_secs(10))
            .expect("reply");
        assert_eq!(reply.data, b"PING", "the late SLOW reply was dropped");
        drop(serve.join().expect("server"));

        let err = client
            .rpc(
                request("amqp_rs.core.nobody-serves", b"x"),
                Duration::from_secs(10),
            )
            .expect_err("unroutable");
        assert_eq!(err.kind(), ErrorKind::Publish);
        assert_eq!(err.failures()[0].reply_code, 312);
    }
}
