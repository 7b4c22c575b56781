//! Typed errors of the core. They stay values until `src/php/exceptions.rs` turns them into
//! PHP exceptions; every message names what was being done and with what, never a password.

use lapin::protocol::AMQPErrorKind;
use std::fmt;

/// A message the broker did not take: nacked, returned as unroutable, or lost with its channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Its `message_id` property, if it had one.
    pub message_id: Option<String>,
    /// AMQP reply code when the broker gave one (312 NO_ROUTE, 404...), 0 for a nack.
    pub reply_code: u16,
    /// Why, in words.
    pub reason: String,
}

impl Failure {
    /// The failure of a message published to `exchange` with `routing_key`.
    pub fn new(
        exchange: &str,
        routing_key: &str,
        message_id: Option<&str>,
        reply_code: u16,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            message_id: message_id.map(str::to_string),
            reply_code,
            reason: reason.into(),
        }
    }
}

/// What went wrong, in the terms the PHP exception hierarchy distinguishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Cannot connect, authentication refused, vhost missing, connection lost for good.
    Connection,
    /// The broker closed a channel; carries the AMQP reply code (404, 406, 403...).
    Channel(u16),
    /// A bounded wait ran out.
    Timeout,
    /// Published messages were nacked, returned or lost; `Error::failures()` lists them.
    Publish,
    /// The caller gave a value the extension cannot use.
    InvalidArgument,
    /// Anything else: a bug, a panic, an unexpected state.
    Other,
}

/// A core error: a kind and a message that carries its context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    failures: Vec<Failure>,
}

/// Result with the core's error.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A new error of `kind` with a message that already names its context.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            failures: Vec::new(),
        }
    }

    /// Messages the broker did not take, as one error; `what` names the operation.
    pub fn publish(what: &str, failures: Vec<Failure>) -> Self {
        let first = failures
            .first()
            .map(|f| {
                format!(
                    "; first: exchange '{}', routing key '{}': {}",
                    f.exchange, f.routing_key, f.reason
                )
            })
            .unwrap_or_default();
        Self {
            kind: ErrorKind::Publish,
            message: format!("{what}: {} messages failed{first}", failures.len()),
            failures,
        }
    }

    /// The failed messages of a `Publish` error.
    pub fn failures(&self) -> &[Failure] {
        &self.failures
    }

    /// A connection-level failure.
    pub fn connection(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Connection, message)
    }

    /// A bounded wait that ran out.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Timeout, message)
    }

    /// Input the extension cannot use.
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    /// Anything that fits no other kind.
    pub fn other(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Other, message)
    }

    /// Maps a lapin error met while doing `context` (e.g. "declare queue 'jobs' on amqp://...").
    ///
    /// Soft AMQP errors close only the channel and keep their reply code; hard ones and I/O
    /// failures mean the connection is gone.
    pub fn from_lapin(err: &lapin::Error, context: &str) -> Self {
        match err.kind() {
            lapin::ErrorKind::ProtocolError(amqp) => {
                let code = amqp.get_id();
                let text = amqp.get_message().as_str();
                let message = format!("{context}: {code} {text}");
                match amqp.kind() {
                    AMQPErrorKind::Soft(_) => Self::new(ErrorKind::Channel(code), message),
                    AMQPErrorKind::Hard(_) => Self::connection(message),
                }
            }
            lapin::ErrorKind::InvalidChannelState(state, _) => Self::new(
                ErrorKind::Channel(0),
                format!("{context}: channel is {state:?}"),
            ),
            lapin::ErrorKind::MissingHeartbeatError => Self::connection(format!(
                "{context}: the broker missed its heartbeats, connection considered lost"
            )),
            _ => Self::connection(format!("{context}: {err}")),
        }
    }

    /// The kind, which decides the PHP exception class.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The full message with its context.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The AMQP reply code for channel errors, 0 otherwise.
    pub fn code(&self) -> u16 {
        match self.kind {
            ErrorKind::Channel(code) => code,
            _ => 0,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// A failure that lapin's recovery repairs: the connection broke, not a channel-level error
/// (404, 406...) after which the broker closed only that channel.
pub fn lost_connection(err: &lapin::Error) -> bool {
    let soft = matches!(err.kind(), lapin::ErrorKind::ProtocolError(amqp)
        if matches!(amqp.kind(), AMQPErrorKind::Soft(_)));
    err.can_be_recovered() && !soft
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_errors_keep_their_reply_code() {
        let err = Error::new(
            ErrorKind::Channel(406),
            "declare queue 'q': 406 PRECONDITION_FAILED",
        );
        assert_eq!(err.code(), 406);
        assert_eq!(Error::connection("x").code(), 0);
        assert_eq!(
            err.to_string(),
            "declare queue 'q': 406 PRECONDITION_FAILED"
        );
    }
}
