//! Request/reply over RabbitMQ's direct reply-to (`amq.rabbitmq.reply-to`): no reply queue to
//! declare, and replies come back on the channel the request left on.

use crate::core::error::{self, Error, ErrorKind, Failure, Result};
use crate::core::ids;
use crate::core::link::{Link, COMMAND_TIMEOUT};
use crate::core::producer::Outgoing;
use crate::core::readiness::{AfterReady, Source};
use crate::core::runtime;
use crate::core::shortstr::shortstr;
use futures_core::Stream;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
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
    /// Shared with the calls made by `start()`, which take their replies from it.
    pub(crate) replies: Arc<Mutex<Replies>>,
    /// Random, so correlation ids never collide with another client's.
    prefix: String,
    sequence: u64,
}

/// The reply consumer, and the replies it brought for calls that were not polling then.
pub(crate) struct Replies {
    stream: lapin::Consumer,
    /// Calls made by `start()` that await their reply, by correlation id.
    pub(crate) calls: HashMap<ShortString, Slot>,
    /// Raised when a reply arrives while a started call awaits one: lapin keeps one waker
    /// per consumer, so the calls share this one and each is raised by the routing.
    pub(crate) source: Option<Source>,
}

/// A started call's place: its reply (or the error that ended it) once routed, and the waker
/// that tells it.
pub(crate) struct Slot {
    pub(crate) outcome: Option<Result<Delivery>>,
    pub(crate) waker: Waker,
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
            replies: Arc::new(Mutex::new(Replies {
                stream: replies,
                calls: HashMap::new(),
                source: None,
            })),
            prefix: ids::random_name()?,
            sequence: 0,
        })
    }

    /// The correlation id of the next call: the caller's, or a fresh one.
    pub(crate) fn correlation_id(&mut self, request: &Outgoing) -> ShortString {
        match request.properties.correlation_id() {
            Some(id) => id.clone(),
            None => {
                self.sequence += 1;
                ShortString::from(format!("{}.{}", self.prefix, self.sequence))
            }
        }
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
        let what = describe(&request, link);
        let correlation_id = self.correlation_id(&request);
        let mut confirm = self.send(&request, &correlation_id)?;
        let mut confirmed = false;
        let shared = self.replies.clone();
        let mut replies = shared.lock().unwrap_or_else(|p| p.into_inner());
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
            replies.pump(Some(&correlation_id), &what, cx)
        };
        let outcome =
            match runtime::park_on(std::future::poll_fn(&mut poll), QUIET.min(timeout), &what) {
                Err(err) if err.kind() == ErrorKind::Timeout && timeout > QUIET => {
                    watch_confirm.set(true);
                    runtime::park_on(std::future::poll_fn(&mut poll), timeout - QUIET, &what)
                }
                other => other,
            };
        // Polled with this thread's waker, the consumer no longer raises the started calls.
        replies.arm(&what);
        match outcome {
            Ok(result) => result,
            Err(err) if err.kind() == ErrorKind::Timeout => {
                Err(no_reply(&what, &correlation_id, timeout))
            }
            Err(err) => Err(err),
        }
    }

    /// The publish of `request` with `reply_to` and `correlation_id`, resolving to its confirm.
    pub(crate) fn send(
        &self,
        request: &Outgoing,
        correlation_id: &ShortString,
    ) -> Result<PublishFuture> {
        let exchange = shortstr(&request.exchange, "exchange name")?;
        let routing_key = shortstr(&request.routing_key, "routing key")?;
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
        let body = request.body.clone();
        // Not polled here: the caller's first poll sends it, and a future that completed
        // must not be polled again.
        Ok(Box::pin(async move {
            channel
                .basic_publish(exchange, routing_key, options, &body, properties)
                .await?
                .await
        }))
    }
}

/// What names a call in its errors.
pub(crate) fn describe(request: &Outgoing, link: &Link) -> String {
    format!(
        "RPC to exchange '{}' with routing key '{}' on {}",
        request.exchange,
        request.routing_key,
        link.endpoint()
    )
}

pub(crate) fn no_reply(what: &str, correlation_id: &ShortString, timeout: Duration) -> Error {
    Error::timeout(format!(
        "{what}: no reply with correlation_id '{}' within {:.1} s",
        correlation_id.as_str(),
        timeout.as_secs_f64()
    ))
}

pub(crate) type PublishFuture = Pin<Box<dyn Future<Output = lapin::Result<Confirmation>> + Send>>;

impl Replies {
    /// Takes the replies that came: the one for `mine` is returned; those of started calls
    /// go to their slot (raising them); late replies to calls given up are dropped. When the
    /// consumer fails, every started call gets the error.
    pub(crate) fn pump(
        &mut self,
        mine: Option<&ShortString>,
        what: &str,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Delivery>> {
        loop {
            let reply = match Pin::new(&mut self.stream).poll_next(cx) {
                Poll::Ready(Some(Ok(reply))) => reply,
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Err(self.fail_all(lost_during_call(&e, what))))
                }
                Poll::Ready(None) => {
                    let err = Error::new(
                        ErrorKind::Channel(0),
                        format!("{what}: the broker cancelled the reply consumer"),
                    );
                    return Poll::Ready(Err(self.fail_all(err)));
                }
                Poll::Pending => return Poll::Pending,
            };
            let Some(id) = reply.properties.correlation_id().clone() else {
                continue;
            };
            if mine == Some(&id) {
                return Poll::Ready(Ok(reply));
            }
            if let Some(slot) = self.calls.get_mut(&id) {
                if slot.outcome.is_none() {
                    slot.outcome = Some(Ok(reply));
                    slot.waker.wake_by_ref();
                }
            }
            // Else a late reply to a call that timed out or was dropped.
        }
    }

    /// Ends every started call still waiting with `err` (their replies cannot come now).
    fn fail_all(&mut self, err: Error) -> Error {
        for slot in self.calls.values_mut() {
            if slot.outcome.is_none() {
                slot.outcome = Some(Err(err.clone()));
                slot.waker.wake_by_ref();
            }
        }
        err
    }

    /// Forgets a started call that is done or dropped. With none left, the consumer's share
    /// of the readiness fd goes too: a reply still on its way (to a call that timed out or was
    /// dropped) would raise it with no call whose poll() lowers it, and the fd would stay
    /// readable for good. The next started call makes a new one.
    pub(crate) fn forget(&mut self, correlation_id: &ShortString) {
        self.calls.remove(correlation_id);
        if self.calls.is_empty() {
            self.source = None;
        }
    }

    /// Routes what came and leaves the consumer raising the readiness fd, while started calls
    /// await their replies.
    pub(crate) fn arm(&mut self, what: &str) {
        if self.calls.is_empty() {
            return;
        }
        if let Some(source) = self.source.take() {
            let _ = source.take(AfterReady::Done, |cx| self.pump(None, what, cx));
            self.source = Some(source);
        }
    }
}

/// What the confirm of a request says: `Ok` once the broker took it, the failure if it was
/// returned (no queue bound for it) or nacked.
pub(crate) fn confirmed_or_failure(
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

/// The error of a reply consumer that failed: a lost connection says the request may or may
/// not have been handled.
fn lost_during_call(e: &lapin::Error, what: &str) -> Error {
    let err = Error::from_lapin(e, what);
    if !error::lost_connection(e) {
        return err;
    }
    Error::new(
        err.kind(),
        format!(
            "{} (the connection was lost during the call: the request may or may not have \
             been handled)",
            err.message()
        ),
    )
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
        // Durable, as RabbitMQ 4 deprecates transient queues that are not exclusive; deleted
        // with its consumer (auto-delete).
        let spec = QueueSpec {
            durable: true,
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
