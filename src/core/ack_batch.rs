//! Acks of one consumer channel held back and sent as one `basic.ack` with `multiple`.
//!
//! Each ack costs lapin a trip through its RPC task and the io-loop; a burst of deliveries
//! acked one by one was the consumer's bottleneck. What is acked does not change: a multiple
//! ack goes out only up to a tag below which every delivery of the channel is settled (held
//! here, or already sent), so it can never cover a message the callback has not seen yet
//! (with several queues, deliveries of one may wait while another's are handled).

use crate::core::error::Result;
use crate::core::link::COMMAND_TIMEOUT;
use crate::core::settlements::{Settlement, Unwritten};
use lapin::Acker;
use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

/// The held acks of one consumer channel.
pub struct AckBatch {
    state: Mutex<BatchState>,
    /// Held acks that trigger a send without waiting for the burst to end.
    pub(crate) limit: usize,
    /// The connection's settlements not written yet.
    unwritten: Arc<Unwritten>,
}

#[derive(Default)]
pub(crate) struct BatchState {
    /// Every delivery tag up to this one is settled (held or sent).
    pub(crate) watermark: u64,
    /// Settled tags above the watermark.
    pub(crate) settled_above: BTreeSet<u64>,
    /// Acks not sent yet, oldest first.
    pub(crate) held: VecDeque<(u64, Acker)>,
}

impl AckBatch {
    /// A batch sending after `limit` held acks at the latest.
    pub(crate) fn new(limit: usize, unwritten: Arc<Unwritten>) -> Self {
        Self {
            state: Mutex::new(BatchState::default()),
            limit: limit.max(1),
            unwritten,
        }
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, BatchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Settles delivery `tag`: an ack is held, a nack or reject goes out at once.
    pub fn settle(&self, acker: &Acker, tag: u64, how: Settlement) -> Result<bool> {
        if !acker.usable() {
            return Ok(false);
        }
        if how != Settlement::Ack {
            let sent = self.unwritten.send(acker, how, false)?;
            self.state().mark_settled(tag);
            return Ok(sent);
        }
        let full = {
            let mut state = self.state();
            state.mark_settled(tag);
            state.held.push_back((tag, acker.clone()));
            state.held.len() >= self.limit
        };
        if full {
            self.flush(false)?;
        }
        Ok(true)
    }

    /// Sends the held acks: one multiple ack up to the watermark, and with `all` the rest
    /// one by one (before going idle, so nothing stays held while no delivery comes).
    pub fn flush(&self, all: bool) -> Result<()> {
        // lapin may write settlements out of order (each runs as its own task): a multiple
        // ack overtaking an earlier nack or single ack of a tag it covers would make the
        // broker close the channel (406 unknown delivery tag). So it waits for them.
        if self.unwritten.any() {
            if !all {
                return Ok(());
            }
            self.unwritten.flush(COMMAND_TIMEOUT)?;
        }
        let (multiple, single) = {
            let mut state = self.state();
            let watermark = state.watermark;
            let mut top: Option<(u64, Acker)> = None;
            let mut above = VecDeque::new();
            for (tag, acker) in state.held.drain(..) {
                if tag > watermark {
                    above.push_back((tag, acker));
                } else if top.as_ref().is_none_or(|(t, _)| tag > *t) {
                    top = Some((tag, acker));
                }
            }
            let single: Vec<_> = if all {
                above.into_iter().collect()
            } else {
                state.held = above;
                Vec::new()
            };
            (top, single)
        };
        if let Some((_, acker)) = multiple {
            self.unwritten.send(&acker, Settlement::Ack, true)?;
        }
        for (_, acker) in single {
            self.unwritten.send(&acker, Settlement::Ack, false)?;
        }
        Ok(())
    }
}

impl BatchState {
    pub(crate) fn mark_settled(&mut self, tag: u64) {
        if tag <= self.watermark {
            return;
        }
        self.settled_above.insert(tag);
        while self.settled_above.remove(&(self.watermark + 1)) {
            self.watermark += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watermark_only_passes_tags_settled_without_gaps() {
        let mut state = BatchState::default();
        state.mark_settled(2);
        state.mark_settled(3);
        assert_eq!(state.watermark, 0, "tag 1 is still with the callback");
        state.mark_settled(1);
        assert_eq!(state.watermark, 3);
        state.mark_settled(5);
        assert_eq!(state.watermark, 3);
        state.mark_settled(4);
        assert_eq!(state.watermark, 5);
        assert!(state.settled_above.is_empty());
    }
}
