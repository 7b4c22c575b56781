//! Graceful stop on SIGTERM/SIGINT while a worker waits in Rust.
//!
//! PHP's pcntl handlers only run when the VM runs, and a worker parked in `consume()` is not
//! running PHP. While `consume()` runs we install our own handler for its `stop_signals`: it
//! records the signal and, when asked, chains to the handler that was there before (PHP's, so
//! a user's pcntl handler still sees it at the next `pcntl_signal_dispatch()`). It does not
//! chain when the user has no handler: PHP's own then applies the default action and would
//! kill the worker instead of stopping it. The previous handlers come back when `consume()`
//! returns.

use crate::core::error::{Error, Result};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

const MAX_SIGNAL: usize = 65;

static TRIGGERED: AtomicBool = AtomicBool::new(false);
/// The handler each signal had before ours (a `sighandler_t`, or a `sa_sigaction` when the
/// matching flag is set in `PREVIOUS_FLAGS`), for chaining.
static PREVIOUS: [AtomicUsize; MAX_SIGNAL] = [const { AtomicUsize::new(0) }; MAX_SIGNAL];
static PREVIOUS_SIGINFO: [AtomicBool; MAX_SIGNAL] = [const { AtomicBool::new(false) }; MAX_SIGNAL];
static CHAIN: [AtomicBool; MAX_SIGNAL] = [const { AtomicBool::new(false) }; MAX_SIGNAL];

extern "C" fn on_signal(sig: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    TRIGGERED.store(true, Ordering::SeqCst);
    let Some(slot) = usize::try_from(sig).ok().filter(|s| *s < MAX_SIGNAL) else {
        return;
    };
    let previous = PREVIOUS[slot].load(Ordering::SeqCst);
    if !CHAIN[slot].load(Ordering::SeqCst)
        || previous == libc::SIG_DFL
        || previous == libc::SIG_IGN
        || previous == 0
    {
        // Default action (terminate) is exactly what we replace with a graceful stop.
        return;
    }
    // SAFETY: `previous` is the handler the process installed before us, with the calling
    // convention its flags declared; calling it is what the kernel would have done.
    unsafe {
        if PREVIOUS_SIGINFO[slot].load(Ordering::SeqCst) {
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                std::mem::transmute(previous);
            f(sig, info, context);
        } else {
            let f: extern "C" fn(libc::c_int) = std::mem::transmute(previous);
            f(sig);
        }
    }
}

/// Our handlers for a set of signals, removed (previous ones restored) on drop.
pub struct StopSignals {
    installed: Vec<(libc::c_int, libc::sigaction)>,
}

impl StopSignals {
    /// Installs the handler for each of `signals` (number, chain to the previous handler);
    /// an invalid number is an error.
    pub fn install(signals: &[(i64, bool)]) -> Result<Self> {
        let catchable = |s: &usize| {
            (1..MAX_SIGNAL).contains(s)
                && *s != libc::SIGKILL as usize
                && *s != libc::SIGSTOP as usize
        };
        let mut slots = Vec::with_capacity(signals.len());
        for &(sig, chain) in signals {
            match usize::try_from(sig).ok().filter(catchable) {
                Some(slot) => slots.push((slot, chain)),
                None => {
                    return Err(Error::invalid_argument(format!(
                        "stop_signals: {sig} is not a signal that can be caught"
                    )))
                }
            }
        }
        TRIGGERED.store(false, Ordering::SeqCst);
        let mut guard = Self {
            installed: Vec::new(),
        };
        for (slot, chain) in slots {
            let sig = slot as libc::c_int;
            CHAIN[slot].store(chain, Ordering::SeqCst);
            // SAFETY: plain sigaction calls with zeroed, then filled, structures.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as *const () as usize;
                action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, &action, &mut old) != 0 {
                    return Err(Error::invalid_argument(format!(
                        "stop_signals: cannot handle signal {sig}"
                    )));
                }
                PREVIOUS[slot].store(old.sa_sigaction, Ordering::SeqCst);
                PREVIOUS_SIGINFO[slot]
                    .store(old.sa_flags & libc::SA_SIGINFO != 0, Ordering::SeqCst);
                guard.installed.push((sig, old));
            }
        }
        Ok(guard)
    }

    /// Whether one of the signals arrived since `install`.
    pub fn triggered(&self) -> bool {
        TRIGGERED.load(Ordering::SeqCst)
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        for (sig, old) in self.installed.drain(..).rev() {
            // SAFETY: restores the exact action sigaction gave us.
            unsafe {
                libc::sigaction(sig, &old, std::ptr::null_mut());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_the_signal_and_restores_the_previous_handler() {
        let guard = StopSignals::install(&[(i64::from(libc::SIGUSR2), false)]).expect("install");
        assert!(!guard.triggered());
        // SAFETY: raising a signal we handle.
        unsafe { libc::raise(libc::SIGUSR2) };
        assert!(guard.triggered());
        drop(guard);
        // SAFETY: reading the current disposition.
        let current = unsafe {
            let mut now: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGUSR2, std::ptr::null(), &mut now);
            now.sa_sigaction
        };
        assert_eq!(current, libc::SIG_DFL);
    }

    #[test]
    fn refuses_signals_that_cannot_be_caught() {
        assert!(StopSignals::install(&[(i64::from(libc::SIGKILL), false)]).is_err());
        assert!(StopSignals::install(&[(0, false)]).is_err());
    }
}
