//! Publisher confirms: the in-flight window of one producer, what each confirm settles, and
//! the republish of nacked messages.
//!
//! Hot path: each publish's future sits here after its first poll (see `producer.rs`) and
//! resolves later to the broker's confirm. A wait parks the PHP thread once for the whole
//! batch and is woken by the last confirm it waits for, not once per confirm frame; acked
//! publishes are dropped without being collected, so only failures cost memory.

use crate::core::error::{self, Error, Failure, Result};
use crate::core::link::Link;
use crate::core::runtime;
use lapin::BasicProperties;
use lapin::Confirmation;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Most publishes awaiting their confirm (or, without confirms, their write) at once.
pub(crate) const MAX_IN_FLIGHT: usize = 2000;
/// Most body bytes in flight at once: with large bodies the count alone let a publisher hold
/// 2000 x 64 KiB (240 MB of RSS in the bench's P2-64K, against 20 MB for the other clients).
pub(crate) const MAX_IN_FLIGHT_BYTES: usize = 16 << 20;

/// Delay before the first republish of a nacked message; it doubles each time, up to the max.
const NACK_RETRY_DELAY: Duration = Duration::from_millis(250);
const NACK_RETRY_MAX_DELAY: Duration = Duration::from_secs(5);

/// What a failure report needs to name a message.
pub(crate) struct Meta {
    /// Which of the producer's channels carried it (they are reopened after a channel error).
    pub(crate) channel: u64,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) message_id: Option<String>,
}

pub(crate) type PublishFuture = Pin<Box<dyn Future<Output = lapin::Result<Confirmation>> + Send>>;

/// One publish awaiting its confirm.
pub(crate) struct InFlight {
    pub(crate) future: PublishFuture,
    pub(crate) meta: Meta,
    /// The result, once the future gave it (it may resolve before older publishes).
    pub(crate) outcome: Option<lapin::Result<Confirmation>>,
    /// The message itself, kept (with confirms and nack retries on) to republish if nacked.
    pub(crate) copy: Option<Copy>,
    /// Size of its body, for the bound on bytes in flight.
    pub(crate) bytes: usize,
}

/// What republishing a nacked message needs.
pub(crate) struct Copy {
    pub(crate) body: Arc<Vec<u8>>,
    pub(crate) properties: BasicProperties,
    /// Times it was nacked so far.
    pub(crate) nacks: u32,
}

/// A nacked message waiting for its republish.
pub(crate) struct Retry {
    pub(crate) due: Instant,
    pub(crate) meta: Meta,
    pub(crate) copy: Copy,
}

impl InFlight {
    /// Polls unless already resolved; true once the outcome is in.
    fn resolved(&mut self, cx: &mut Context<'_>) -> bool {
        if self.outcome.is_none() {
            if let Poll::Ready(result) = self.future.as_mut().poll(cx) {
                self.outcome = Some(result);
            }
        }
        self.outcome.is_some()
    }
}

impl Meta {
    fn failure(&self, reply_code: u16, reason: String) -> Failure {
        let message_id = self.message_id.as_deref();
        Failure::new(
            &self.exchange,
            &self.routing_key,
            message_id,
            reply_code,
            reason,
        )
    }
}

/// The publishes of one producer that await their confirm, and what came of those settled.
pub(crate) struct Confirms {
    in_flight: VecDeque<InFlight>,
    /// Body bytes of the publishes in `in_flight`.
    in_flight_bytes: usize,
    failures: Vec<(u64, Failure)>,
    /// The first channel-level error the caller has not heard of, and its channel.
    channel_error: Option<(u64, Error)>,
    /// Channels whose loss the caller has heard of: later failures from them are covered.
    reported_channel: u64,
    /// Nacked messages to republish, soonest first.
    retrying: VecDeque<Retry>,
    /// How many times a nacked message is republished before it is reported.
    nack_retries: u32,
    /// Number of the producer's current channel (reopened after a channel error or a nack).
    pub(crate) channel_number: u64,
    /// A nack came: the next publish goes on a new channel. After losing a quorum queue's
    /// leader, a channel can get nothing but nacks for 15 s and more while a new one works.
    pub(crate) renew_channel: bool,
}

impl Confirms {
    /// An empty window; nacked messages are republished up to `nack_retries` times.
    pub(crate) fn new(nack_retries: u32) -> Self {
        Self {
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            failures: Vec::new(),
            channel_error: None,
            reported_channel: 0,
            retrying: VecDeque::new(),
            nack_retries,
            channel_number: 0,
            renew_channel: false,
        }
    }

    /// Whether the window is full: the next publish must first wait for room.
    pub(crate) fn is_full(&self) -> bool {
        self.in_flight.len() >= MAX_IN_FLIGHT || self.in_flight_bytes >= MAX_IN_FLIGHT_BYTES
    }

    /// How many publishes may stay in flight once a full window has made room.
    pub(crate) fn room_target(&self) -> usize {
        if self.in_flight_bytes >= MAX_IN_FLIGHT_BYTES {
            self.in_flight.len() / 2
        } else {
            MAX_IN_FLIGHT / 2
        }
    }

    /// Body bytes in flight, for the bound's test.
    #[cfg(test)]
    pub(crate) fn in_flight_bytes(&self) -> usize {
        self.in_flight_bytes
    }

    /// Puts a publish in the window, or settles it at once if its first poll resolved it.
    pub(crate) fn track(&mut self, publish: InFlight, link: &Link) {
        if publish.outcome.is_some() {
            self.settle(publish, link);
        } else {
            self.in_flight_bytes += publish.bytes;
            self.in_flight.push_back(publish);
        }
    }

    /// The next nacked message whose republish is due by `now`.
    pub(crate) fn take_due(&mut self, now: Instant) -> Option<Retry> {
        if self.retrying.front().is_some_and(|r| r.due <= now) {
            return self.retrying.pop_front();
        }
        None
    }

    /// When the next republish is due, if one waits.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.retrying.front().map(|r| r.due)
    }

    /// Publishes not yet confirmed, republishes waiting included.
    pub(crate) fn pending(&self) -> usize {
        self.in_flight.len() + self.retrying.len()
    }

    /// Whether the broker closed a channel of this producer and the caller was not told yet.
    pub(crate) fn has_channel_error(&self) -> bool {
        self.channel_error.is_some()
    }

    /// Whether failures or unconfirmed publishes are waiting to be reported.
    pub(crate) fn has_unreported(&self) -> bool {
        !self.in_flight.is_empty() || !self.retrying.is_empty() || !self.failures.is_empty()
    }

    /// The failures since the last call, oldest first.
    pub(crate) fn take_failures(&mut self) -> Vec<Failure> {
        self.failures.drain(..).map(|(_, f)| f).collect()
    }

    /// Parks the calling thread until at most `keep` publishes are in flight, or `limit` runs
    /// out; settles what resolved meanwhile either way.
    pub(crate) fn wait(
        &mut self,
        keep: usize,
        limit: Duration,
        context: &str,
        link: &Link,
    ) -> Result<()> {
        let mut done = Vec::new();
        let mut settled = 0;
        let in_flight = &mut self.in_flight;
        let waited = runtime::park_on(
            std::future::poll_fn(|cx| settle_front(in_flight, keep, cx, &mut done, &mut settled)),
            limit,
            context,
        );
        self.in_flight_bytes -= settled;
        for publish in done {
            self.settle(publish, link);
        }
        waited
    }

    /// Settles every in-flight publish that has resolved, oldest first, without blocking.
    pub(crate) fn reap(&mut self, link: &Link) {
        let _ = self.poll_settled(&mut Context::from_waker(Waker::noop()), link);
    }

    /// Settles what resolved, without blocking; Ready once nothing is in flight, else `cx`
    /// is woken when the last publish resolves (see `settle_front`).
    pub(crate) fn poll_settled(&mut self, cx: &mut Context<'_>, link: &Link) -> Poll<()> {
        let mut done = Vec::new();
        let mut settled = 0;
        let polled = settle_front(&mut self.in_flight, 0, cx, &mut done, &mut settled);
        self.in_flight_bytes -= settled;
        for publish in done {
            self.settle(publish, link);
        }
        polled
    }

    fn settle(&mut self, publish: InFlight, link: &Link) {
        let InFlight {
            meta,
            outcome,
            copy,
            ..
        } = publish;
        let Some(result) = outcome else {
            return;
        };
        if let (Ok(Confirmation::Nack(None)), Some(copy)) = (&result, copy) {
            if copy.nacks < self.nack_retries {
                self.retry_nacked(meta, copy);
                return;
            }
        }
        let publish = &meta;
        match result {
            Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => {}
            Ok(Confirmation::Ack(Some(returned))) | Ok(Confirmation::Nack(Some(returned))) => {
                self.failures.push((
                    publish.channel,
                    publish.failure(
                        returned.reply_code,
                        format!(
                            "returned by the broker: {} {}",
                            returned.reply_code, returned.reply_text
                        ),
                    ),
                ));
            }
            Ok(Confirmation::Nack(None)) => self.failures.push((
                publish.channel,
                publish.failure(
                    0,
                    match self.nack_retries {
                        0 => "nacked by the broker".to_string(),
                        n => format!(
                            "nacked by the broker {} times (republished {n} times, each on a \
                             new channel)",
                            n + 1
                        ),
                    },
                ),
            )),
            Err(_) if publish.channel <= self.reported_channel => {
                // Lost with a channel whose closing the caller was already told of.
            }
            Err(err) if link.recovers() && error::lost_connection(&err) => {
                // The connection broke before the broker confirmed it: it may or may not have
                // arrived. Reported as a failure; the producer goes on once lapin recovers.
                self.failures.push((
                    publish.channel,
                    publish.failure(
                        0,
                        format!(
                            "connection to {} lost before the broker confirmed it (it may or \
                             may not have arrived): {err}",
                            link.endpoint()
                        ),
                    ),
                ));
            }
            Err(err) => {
                let context = format!(
                    "publish to exchange '{}' with routing key '{}' on {}",
                    publish.exchange,
                    publish.routing_key,
                    link.endpoint()
                );
                let error = Error::from_lapin(&err, &context);
                self.failures.push((
                    publish.channel,
                    publish.failure(error.code(), error.message().to_string()),
                ));
                if self.channel_error.is_none() {
                    self.channel_error = Some((publish.channel, error));
                }
            }
        }
    }

    /// Schedules a nacked message's republish, after a delay that doubles with each nack, on
    /// a new channel.
    fn retry_nacked(&mut self, meta: Meta, mut copy: Copy) {
        let delay = NACK_RETRY_DELAY
            .saturating_mul(1 << copy.nacks.min(16))
            .min(NACK_RETRY_MAX_DELAY);
        copy.nacks += 1;
        if meta.channel == self.channel_number {
            self.renew_channel = true;
        }
        self.retrying.push_back(Retry {
            due: Instant::now() + delay,
            meta,
            copy,
        });
        // Delays grow with the nack count, so a later nack can be due before an earlier one.
        self.retrying.make_contiguous().sort_by_key(|r| r.due);
    }

    /// The pending channel error, once: the failures of that channel are folded into it, and
    /// its messages still in flight will be lost without another report.
    pub(crate) fn take_channel_error(&mut self) -> Option<Error> {
        let (channel, err) = self.channel_error.take()?;
        let before = self.failures.len();
        self.failures.retain(|(c, _)| *c != channel);
        let lost = before - self.failures.len();
        self.reported_channel = self.reported_channel.max(channel);
        Some(Error::new(
            err.kind(),
            format!(
                "{} (the broker closed the channel: {lost} messages published on it failed, \
                 any still unconfirmed on it are lost too; the next publish opens a new channel)",
                err.message()
            ),
        ))
    }
}

/// Settles in-flight publishes from the front while they are resolved, until `keep` remain;
/// Pending as soon as the oldest is not. Resolved ones that failed go to `done` in order.
///
/// Confirms normally arrive in publish order, so the waker goes to the last publish the caller
/// waits for: the PHP thread is woken once for the batch, not once per confirm frame. Should
/// that one resolve first (out of order), the waker goes to the oldest instead.
fn settle_front(
    in_flight: &mut VecDeque<InFlight>,
    keep: usize,
    cx: &mut Context<'_>,
    done: &mut Vec<InFlight>,
    settled_bytes: &mut usize,
) -> Poll<()> {
    let mut noop = Context::from_waker(Waker::noop());
    while in_flight.len() > keep {
        let target = in_flight.len() - keep - 1;
        let front_resolved = match in_flight.front_mut() {
            Some(front) => front.resolved(&mut noop),
            None => break,
        };
        if front_resolved {
            *settled_bytes += in_flight.front().map_or(0, |f| f.bytes);
            match in_flight.pop_front() {
                // Most publishes: nothing to report. Only failures are collected, or `done`
                // would grow to thousands of large entries per call, fresh pages each time.
                Some(InFlight {
                    outcome: Some(Ok(Confirmation::Ack(None) | Confirmation::NotRequested)),
                    ..
                }) => {}
                Some(publish) => done.push(publish),
                None => {}
            }
            continue;
        }
        let target_waits = match in_flight.get_mut(target) {
            Some(last) if target != 0 => !last.resolved(cx),
            _ => false,
        };
        // Otherwise the oldest gets the waker; resolved meanwhile, it is settled next round.
        if target_waits || !in_flight.front_mut().is_some_and(|f| f.resolved(cx)) {
            return Poll::Pending;
        }
    }
    Poll::Ready(())
}

#[cfg(test)]
#[path = "confirms_tests.rs"]
mod tests;
