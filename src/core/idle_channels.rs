//! Channels a connection keeps open for the next user: opening a publisher's channel costs
//! two round trips (channel.open, confirm.select), a topology channel one. A producer that is
//! dropped clean leaves its confirm channel here for the next producer, and a persistent
//! connection keeps its command channel between requests.
//!
//! "Clean" is decided by whoever hands a channel back: nothing of its use may reach the next
//! user (no publish awaiting its confirm, no unsettled delivery, no consumer, no QoS). A
//! channel whose state is unknown is closed instead.

use lapin::Channel;
use std::sync::Mutex;

/// One slot per kind of channel; a second channel handed back while one waits is refused.
#[derive(Default)]
pub(crate) struct IdleChannels {
    confirm: Mutex<Option<Channel>>,
    command: Mutex<Option<Channel>>,
}

fn take(slot: &Mutex<Option<Channel>>) -> Option<Channel> {
    let channel = slot.lock().unwrap_or_else(|p| p.into_inner()).take()?;
    // Closed by the broker or lost with the connection while it waited: not worth keeping.
    channel.status().connected().then_some(channel)
}

/// Keeps `channel` in `slot` if the slot is free; otherwise gives it back to be closed.
fn keep(slot: &Mutex<Option<Channel>>, channel: Channel) -> Option<Channel> {
    if !channel.status().connected() {
        return Some(channel);
    }
    let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
    if slot.is_some() {
        return Some(channel);
    }
    *slot = Some(channel);
    None
}

impl IdleChannels {
    /// A clean channel in publisher-confirm mode, if one waits.
    pub(crate) fn take_confirm(&self) -> Option<Channel> {
        take(&self.confirm)
    }

    /// Keeps a clean confirm-mode channel; gives it back if there is no room.
    pub(crate) fn keep_confirm(&self, channel: Channel) -> Option<Channel> {
        keep(&self.confirm, channel)
    }

    /// A clean channel for topology commands, if one waits.
    pub(crate) fn take_command(&self) -> Option<Channel> {
        take(&self.command)
    }

    /// Keeps a clean command channel; gives it back if there is no room.
    pub(crate) fn keep_command(&self, channel: Channel) -> Option<Channel> {
        keep(&self.command, channel)
    }

    /// How many channels wait here, for `php --ri amqp_rs`.
    pub(crate) fn count(&self) -> usize {
        [&self.confirm, &self.command]
            .iter()
            .filter(|slot| slot.lock().is_ok_and(|s| s.is_some()))
            .count()
    }
}
