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
use std::time::{Duration, Instant};
use tokio::task::AbortHandle;

/// How long a call waits for its reply before it also watches its confirm (see `call`).
const QUIET: Duration = Duration::from_millis(5);

/// The pseudo-queue the broker routes replies through.
pub const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// A connection's RPC channel: a no-ack consumer of `amq.rabbitmq.reply-to` and the channel
/// requests are published on (direct reply-to needs both on the same channel).
pub(crate) struct RpcClient {
    channel: Channel,
    /// Shared with the calls made by `start()`, which take their replies from it.
    replies: Arc<Mutex<Replies>>,
    /// Random, so correlation ids never collide with another client's.
    prefix: String,
    sequence: u64,
}

/// The reply consumer, and the replies it brought for calls that were not polling then.
pub(crate) struct Replies {
    stream: lapin::Consumer,
    /// Calls made by `start()` that await their reply, by correlation id.
    calls: HashMap<ShortString, Slot>,
    /// Raised when a reply arrives while a started call awaits one: lapin keeps one waker
    /// per consumer, so the calls share this one and each is raised by the routing.
    source: Option<Source>,
}

/// A started call's place: its reply (or the error that ended it) once routed, and the waker
/// that tells it.
struct Slot {
    outcome: Option<Result<Delivery>>,
    waker: Waker,
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
    fn correlation_id(&mut self, request: &Outgoing) -> ShortString {
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
        let what = format!(
            "RPC to exchange '{}' with routing key '{}' on {}",
            request.exchange,
            request.routing_key,
            link.endpoint()
        );
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
    fn send(&self, request: &Outgoing, correlation_id: &ShortString) -> Result<PublishFuture> {
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

    /// Sends `request` and returns at once: the call's reply is taken from the `RpcCall`,
    /// which raises the connection's readiness fd when the reply (or its failure) is there.
    pub(crate) fn start(
        &mut self,
        link: Arc<Link>,
        request: Outgoing,
        timeout: Duration,
    ) -> Result<RpcCall> {
        let what = format!(
            "RPC to exchange '{}' with routing key '{}' on {}",
            request.exchange,
            request.routing_key,
            link.endpoint()
        );
        let readiness = link.readiness(&what)?;
        let correlation_id = self.correlation_id(&request);
        let source = readiness.source();
        {
            let mut replies = self.replies.lock().unwrap_or_else(|p| p.into_inner());
            if replies.source.is_none() {
                replies.source = Some(readiness.source());
            }
            let slot = Slot {
                outcome: None,
                waker: source.waker(),
            };
            replies.calls.insert(correlation_id.clone(), slot);
        }
        let confirm = match self.send(&request, &correlation_id) {
            Ok(confirm) => confirm,
            Err(err) => {
                let mut replies = self.replies.lock().unwrap_or_else(|p| p.into_inner());
                replies.calls.remove(&correlation_id);
                return Err(Error::new(err.kind(), format!("{what}: {}", err.message())));
            }
        };
        let deadline = Instant::now() + timeout;
        let timer = source.raise_at(deadline)?;
        let mut named = BasicProperties::default();
        if let Some(id) = request.properties.message_id().clone() {
            named = named.with_message_id(id);
        }
        let mut call = RpcCall {
            link,
            replies: self.replies.clone(),
            correlation_id,
            confirm: Some(confirm),
            request: Outgoing {
                body: Vec::new(),
                properties: named,
                ..request
            },
            what,
            deadline,
            timeout,
            source,
            timer,
            taken: false,
        };
        call.arm();
        Ok(call)
    }
}

fn no_reply(what: &str, correlation_id: &ShortString, timeout: Duration) -> Error {
    Error::timeout(format!(
        "{what}: no reply with correlation_id '{}' within {:.1} s",
        correlation_id.as_str(),
        timeout.as_secs_f64()
    ))
}

type PublishFuture = Pin<Box<dyn Future<Output = lapin::Result<Confirmation>> + Send>>;

impl Replies {
    /// Takes the replies that came: the one for `mine` is returned; those of started calls
    /// go to their slot (raising them); late replies to calls given up are dropped. When the
    /// consumer fails, every started call gets the error.
    fn pump(
        &mut self,
        mine: Option<&ShortString>,
        what: &str,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Delivery>> {
        loop {
            let reply = match Pin::new(&mut self.stream).poll_next(cx) {
                Poll::Ready(Some(Ok(reply))) => reply,
                Poll::Ready(Some(Err(e))) => {
                    let err = lost_during_call(&e, what);
                    for slot in self.calls.values_mut() {
                        if slot.outcome.is_none() {
                            slot.outcome = Some(Err(err.clone()));
                            slot.waker.wake_by_ref();
                        }
                    }
                    return Poll::Ready(Err(err));
                }
                Poll::Ready(None) => {
                    let err = Error::new(
                        ErrorKind::Channel(0),
                        format!("{what}: the broker cancelled the reply consumer"),
                    );
                    for slot in self.calls.values_mut() {
                        if slot.outcome.is_none() {
                            slot.outcome = Some(Err(err.clone()));
                            slot.waker.wake_by_ref();
                        }
                    }
                    return Poll::Ready(Err(err));
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

    /// Routes what came and leaves the consumer raising the readiness fd, while started calls
    /// await their replies.
    fn arm(&mut self, what: &str) {
        if self.calls.is_empty() {
            return;
        }
        if let Some(source) = self.source.take() {
            let _ = source.take(AfterReady::Done, |cx| self.pump(None, what, cx));
            self.source = Some(source);
        }
    }
}

/// An RPC call in flight, made by `Connection::rpc_start`: its reply is taken without
/// blocking (`poll`) or by waiting (`wait`), once.
pub struct RpcCall {
    link: Arc<Link>,
    replies: Arc<Mutex<Replies>>,
    correlation_id: ShortString,
    /// Until the broker confirmed the request (or returned it: no queue took it).
    confirm: Option<PublishFuture>,
    /// What names the request in a failure (its body is not kept).
    request: Outgoing,
    what: String,
    deadline: Instant,
    timeout: Duration,
    source: Source,
    timer: AbortHandle,
    /// The reply, or the error that ended the call, was handed out.
    taken: bool,
}

impl RpcCall {
    /// The correlation id the reply will carry.
    pub fn correlation_id(&self) -> &str {
        self.correlation_id.as_str()
    }

    /// Whether the reply (or the error that ended the call) was handed out.
    pub fn is_done(&self) -> bool {
        self.taken
    }

    /// The reply if it is there, without waiting; a `Timeout` error once the call's timeout
    /// passed without one.
    pub fn poll(&mut self) -> Result<Option<Delivery>> {
        self.ensure_pending()?;
        // No wait for a recovery: the call fails with the lost connection, or times out.
        self.link.ensure_open("take an RPC reply")?;
        let polled = {
            let source = &self.source;
            let mut this = CallPoll {
                replies: &self.replies,
                confirm: &mut self.confirm,
                correlation_id: &self.correlation_id,
                request: &self.request,
                what: &self.what,
            };
            source.take(AfterReady::Done, |cx| this.poll(cx))
        };
        match polled {
            Poll::Ready(outcome) => self.finish(outcome).map(Some),
            Poll::Pending if Instant::now() >= self.deadline => {
                let err = no_reply(&self.what, &self.correlation_id, self.timeout);
                self.finish(Err(err)).map(Some)
            }
            Poll::Pending => Ok(None),
        }
    }

    /// Waits for the reply, until the call's own timeout.
    pub fn wait(&mut self) -> Result<Delivery> {
        self.ensure_pending()?;
        self.link.ensure_usable("wait for an RPC reply")?;
        let limit = self.deadline.saturating_duration_since(Instant::now());
        let mut this = CallPoll {
            replies: &self.replies,
            confirm: &mut self.confirm,
            correlation_id: &self.correlation_id,
            request: &self.request,
            what: &self.what,
        };
        let outcome =
            match runtime::park_on(std::future::poll_fn(|cx| this.poll(cx)), limit, &self.what) {
                Ok(outcome) => outcome,
                Err(err) if err.kind() == ErrorKind::Timeout => {
                    Err(no_reply(&self.what, &self.correlation_id, self.timeout))
                }
                Err(err) => Err(err),
            };
        self.replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .arm(&self.what);
        self.finish(outcome)
    }

    /// Polls the call once with its source's waker, so the readiness fd tells of its reply
    /// (or of its request coming back) with no take first; an outcome already there is kept
    /// for the first take.
    fn arm(&mut self) {
        let polled = {
            let mut this = CallPoll {
                replies: &self.replies,
                confirm: &mut self.confirm,
                correlation_id: &self.correlation_id,
                request: &self.request,
                what: &self.what,
            };
            self.source.take(AfterReady::More, |cx| this.poll(cx))
        };
        if let Poll::Ready(outcome) = polled {
            let mut replies = self.replies.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(slot) = replies.calls.get_mut(&self.correlation_id) {
                slot.outcome = Some(outcome);
            }
        }
    }

    fn ensure_pending(&self) -> Result<()> {
        if self.taken {
            return Err(Error::other(format!(
                "{}: the reply to this call (correlation_id '{}') was already taken; an \
                 RpcCall gives its reply once",
                self.what,
                self.correlation_id.as_str()
            )));
        }
        Ok(())
    }

    fn finish(&mut self, outcome: Result<Delivery>) -> Result<Delivery> {
        self.taken = true;
        self.timer.abort();
        self.source.lower();
        let mut replies = self.replies.lock().unwrap_or_else(|p| p.into_inner());
        replies.calls.remove(&self.correlation_id);
        outcome
    }
}

impl Drop for RpcCall {
    fn drop(&mut self) {
        self.timer.abort();
        if self.link.is_own() {
            let mut replies = self.replies.lock().unwrap_or_else(|p| p.into_inner());
            replies.calls.remove(&self.correlation_id);
        } else if let Some(confirm) = self.confirm.take() {
            // The parent's future on the parent's channel: leaked with it.
            std::mem::forget(confirm);
        }
    }
}

/// One look at a started call: its confirm (a returned request fails it), its slot, then the
/// reply consumer.
struct CallPoll<'a> {
    replies: &'a Mutex<Replies>,
    confirm: &'a mut Option<PublishFuture>,
    correlation_id: &'a ShortString,
    request: &'a Outgoing,
    what: &'a str,
}

impl CallPoll<'_> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Delivery>> {
        if let Some(confirm) = self.confirm.as_mut() {
            match confirmed_or_failure(confirm.as_mut().poll(cx), self.request, self.what) {
                Poll::Ready(Ok(())) => *self.confirm = None,
                Poll::Ready(Err(err)) => {
                    // Finished: arm() keeps this outcome for the first take, which polls again.
                    *self.confirm = None;
                    return Poll::Ready(Err(err));
                }
                Poll::Pending => {}
            }
        }
        let mut replies = self.replies.lock().unwrap_or_else(|p| p.into_inner());
        let replies = &mut *replies;
        if let Some(outcome) = replies
            .calls
            .get_mut(self.correlation_id)
            .and_then(|slot| slot.outcome.take())
        {
            return Poll::Ready(outcome);
        }
        let what = self.what;
        let mine = Some(self.correlation_id);
        let pumped = match replies.source.take() {
            Some(source) => {
                let pumped = source.take(AfterReady::Done, |rcx| replies.pump(mine, what, rcx));
                replies.source = Some(source);
                pumped
            }
            None => replies.pump(mine, what, cx),
        };
        match pumped {
            Poll::Ready(outcome) => Poll::Ready(outcome),
            Poll::Pending => Poll::Pending,
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
