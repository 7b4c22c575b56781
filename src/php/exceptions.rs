//! The `AmqpRs\*Exception` classes, and every conversion of a core error or a Rust panic into
//! a PHP exception.

use crate::core::error::{Error, ErrorKind};
use ext_php_rs::class::RegisteredClass;
use ext_php_rs::exception::{PhpException, PhpResult};
use ext_php_rs::prelude::*;
use ext_php_rs::zend::{ce, ClassEntry};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Finds an SPL class entry exported by the PHP binary (`spl_ce_RuntimeException`...).
///
/// ext-php-rs has no accessor for SPL classes and `ClassEntry::try_find` does not work during
/// module startup, but the globals are exported symbols of the executable.
fn spl_class(symbol: &std::ffi::CStr) -> &'static ClassEntry {
    // SAFETY: the symbol is a `zend_class_entry *` global that SPL sets in its MINIT, which
    // runs before ours; the entry lives as long as the process.
    unsafe {
        let slot = libc::dlsym(libc::RTLD_DEFAULT, symbol.as_ptr()) as *const *const ClassEntry;
        match slot.as_ref().and_then(|entry| entry.as_ref()) {
            Some(entry) => entry,
            // Not an SPL build we understand: fall back to the base class of all exceptions.
            None => ce::exception(),
        }
    }
}

/// `\RuntimeException`, the parent of `AmqpRs\Exception`.
pub fn runtime_exception() -> &'static ClassEntry {
    spl_class(c"spl_ce_RuntimeException")
}

/// `\InvalidArgumentException`, for option keys and values the extension cannot use.
pub fn invalid_argument_exception() -> &'static ClassEntry {
    spl_class(c"spl_ce_InvalidArgumentException")
}

/// Base of everything the extension throws.
#[php_class]
#[php(name = "AmqpRs\\Exception")]
#[php(extends(ce = runtime_exception, stub = "\\RuntimeException"))]
#[derive(Default)]
pub struct AmqpException;

/// Cannot connect, auth refused, vhost missing, connection lost for good.
#[php_class]
#[php(name = "AmqpRs\\ConnectionException")]
#[php(extends(AmqpException))]
#[derive(Default)]
pub struct ConnectionException;

/// The broker closed a channel; `getCode()` is the AMQP reply code.
#[php_class]
#[php(name = "AmqpRs\\ChannelException")]
#[php(extends(AmqpException))]
#[derive(Default)]
pub struct ChannelException;

/// A bounded wait ran out.
#[php_class]
#[php(name = "AmqpRs\\TimeoutException")]
#[php(extends(AmqpException))]
#[derive(Default)]
pub struct TimeoutException;

/// Nacked or returned messages.
#[php_class]
#[php(name = "AmqpRs\\PublishException")]
#[php(extends(AmqpException))]
#[derive(Default)]
pub struct PublishException;

/// A PHP `TypeError`, for values of the wrong PHP type inside arrays.
pub fn type_error(message: impl Into<String>) -> PhpException {
    PhpException::new(message.into(), 0, ce::type_error())
}

/// A PHP `\InvalidArgumentException`.
pub fn invalid_argument(message: impl Into<String>) -> PhpException {
    PhpException::new(message.into(), 0, invalid_argument_exception())
}

/// The exception class a core error becomes.
fn class_for(kind: ErrorKind) -> &'static ClassEntry {
    match kind {
        ErrorKind::Connection => ConnectionException::get_metadata().ce(),
        ErrorKind::Channel(_) => ChannelException::get_metadata().ce(),
        ErrorKind::Timeout => TimeoutException::get_metadata().ce(),
        ErrorKind::InvalidArgument => invalid_argument_exception(),
        ErrorKind::Other => AmqpException::get_metadata().ce(),
    }
}

impl From<Error> for PhpException {
    fn from(err: Error) -> Self {
        PhpException::new(
            err.message().to_string(),
            i32::from(err.code()),
            class_for(err.kind()),
        )
    }
}

/// Runs a method body so that a Rust panic becomes an `AmqpRs\Exception` naming `what`,
/// instead of ext-php-rs's generic `\Error`.
pub fn guard<T>(what: &str, body: impl FnOnce() -> PhpResult<T>) -> PhpResult<T> {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(result) => result,
        Err(payload) => {
            let detail = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_string());
            Err(PhpException::new(
                format!("{what}: internal error in amqp_rs: {detail}"),
                0,
                AmqpException::get_metadata().ce(),
            ))
        }
    }
}
