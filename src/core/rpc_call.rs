//! An RPC call in flight (`Connection::rpcAsync()`): its reply is taken later, without
//! waiting or by waiting, once; the connection's readiness fd says when it is there.

use crate::core::error::{Error, ErrorKind, Result};
use crate::core::link::Link;
use crate::core::producer::Outgoing;
use crate::core::readiness::{AfterReady, Source};
use crate::core::rpc::{
    confirmed_or_failure, describe, no_reply, PublishFuture, Replies, RpcClient, Slot,
};
use crate::core::runtime;
use lapin::message::Delivery;
use lapin::types::ShortString;
use lapin::BasicProperties;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::task::AbortHandle;

/// An RPC call in flight, made by `Connection::rpc_start`: its reply is taken without
/// blocking (`poll`) or by waiting (`wait`), once.
pub struct RpcCall {
    pub(crate) link: Arc<Link>,
    pub(crate) replies: Arc<Mutex<Replies>>,
    pub(crate) correlation_id: ShortString,
    /// Until the broker confirmed the request (or returned it: no queue took it).
    pub(crate) confirm: Option<PublishFuture>,
    /// What names the request in a failure (its body is not kept).
    pub(crate) request: Outgoing,
    pub(crate) what: String,
    pub(crate) deadline: Instant,
    pub(crate) timeout: Duration,
    pub(crate) source: Source,
    pub(crate) timer: AbortHandle,
    /// The reply, or the error that ended the call, was handed out.
    pub(crate) taken: bool,
}

impl RpcCall {
    /// Sends `request` and returns at once: the call's reply is taken from the `RpcCall`,
    /// which raises the connection's readiness fd when the reply (or its failure) is there.
    pub(crate) fn start(
        client: &mut RpcClient,
        link: Arc<Link>,
        request: Outgoing,
        timeout: Duration,
    ) -> Result<RpcCall> {
        let what = describe(&request, &link);
        let readiness = link.readiness(&what)?;
        let correlation_id = client.correlation_id(&request);
        let source = readiness.source();
        {
            let mut replies = client.replies.lock().unwrap_or_else(|p| p.into_inner());
            if replies.source.is_none() {
                replies.source = Some(readiness.source());
            }
            let slot = Slot {
                outcome: None,
                waker: source.waker(),
            };
            replies.calls.insert(correlation_id.clone(), slot);
        }
        let confirm = match client.send(&request, &correlation_id) {
            Ok(confirm) => confirm,
            Err(err) => {
                let mut replies = client.replies.lock().unwrap_or_else(|p| p.into_inner());
                replies.forget(&correlation_id);
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
            replies: client.replies.clone(),
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
            let (mut this, source) = self.parts();
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
        let what = self.what.clone();
        let (mut this, _) = self.parts();
        this.blocking = true;
        let outcome = match runtime::park_on(std::future::poll_fn(|cx| this.poll(cx)), limit, &what)
        {
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
    pub(crate) fn arm(&mut self) {
        let polled = {
            let (mut this, source) = self.parts();
            source.take(AfterReady::More, |cx| this.poll(cx))
        };
        if let Poll::Ready(outcome) = polled {
            let mut replies = self.replies.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(slot) = replies.calls.get_mut(&self.correlation_id) {
                slot.outcome = Some(outcome);
            }
        }
    }

    /// What one look at the call needs, and its source, borrowed apart.
    fn parts(&mut self) -> (CallPoll<'_>, &Source) {
        let look = CallPoll {
            replies: &self.replies,
            confirm: &mut self.confirm,
            correlation_id: &self.correlation_id,
            request: &self.request,
            what: &self.what,
            blocking: false,
        };
        (look, &self.source)
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
        replies.forget(&self.correlation_id);
        outcome
    }
}

impl Drop for RpcCall {
    fn drop(&mut self) {
        self.timer.abort();
        if self.link.is_own() {
            let mut replies = self.replies.lock().unwrap_or_else(|p| p.into_inner());
            replies.forget(&self.correlation_id);
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
    /// The look of a blocking `wait()`.
    blocking: bool,
}

impl CallPoll<'_> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Delivery>> {
        if let Some(confirm) = self.confirm.as_mut() {
            let confirmed =
                confirmed_or_failure(confirm.as_mut().poll(cx), self.request, self.what);
            if confirmed.is_ready() {
                // A finished future must not be polled again, whatever it gave.
                *self.confirm = None;
            }
            if let Poll::Ready(Err(err)) = confirmed {
                return Poll::Ready(Err(err));
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
        // A blocking wait pumps with its own waker (the thread's), then hands the consumer
        // back to the source (`Replies::arm`); a take that does not wait, with the source's.
        if self.blocking {
            return replies.pump(mine, what, cx);
        }
        match replies.source.take() {
            Some(source) => {
                let pumped = source.take(AfterReady::Done, |rcx| replies.pump(mine, what, rcx));
                replies.source = Some(source);
                pumped
            }
            None => replies.pump(mine, what, cx),
        }
    }
}
