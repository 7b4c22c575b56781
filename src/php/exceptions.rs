//! The `AmqpRs\*Exception` classes, and every conversion of a core error or a Rust panic into
//! a PHP exception.

use crate::core::error::Failure;
use crate::core::error::{Error, ErrorKind};
use ext_php_rs::boxed::ZBox;
use ext_php_rs::builders::{ClassBuilder, ClassProperty, FunctionBuilder};
use ext_php_rs::exception::{PhpException, PhpResult};
use ext_php_rs::flags::{DataType, MethodFlags, PropertyFlags};
use ext_php_rs::types::{ZendHashTable, ZendObject, Zval};
use ext_php_rs::zend::{ce, ClassEntry};
use ext_php_rs::zend::{run_handler, ExecuteData, ExecutorGlobals};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicPtr, Ordering};

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

/// The extension's exception classes, in registration order (each parent before its children).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExceptionClass {
    /// `AmqpRs\Exception`: base of everything the extension throws.
    Base = 0,
    /// Cannot connect, auth refused, vhost missing, connection lost for good.
    Connection = 1,
    /// The broker closed a channel; `getCode()` is the AMQP reply code.
    Channel = 2,
    /// A bounded wait ran out.
    Timeout = 3,
    /// Nacked or returned messages.
    Publish = 4,
}

const CLASS_NAMES: [&str; 5] = [
    "AmqpRs\\Exception",
    "AmqpRs\\ConnectionException",
    "AmqpRs\\ChannelException",
    "AmqpRs\\TimeoutException",
    "AmqpRs\\PublishException",
];

static CLASSES: [AtomicPtr<ClassEntry>; 5] = [const { AtomicPtr::new(std::ptr::null_mut()) }; 5];

impl ExceptionClass {
    /// The registered class entry; `\RuntimeException` if registration never ran.
    pub fn ce(self) -> &'static ClassEntry {
        // SAFETY: the pointer was stored by the engine's registration of a class that lives as
        // long as the process.
        unsafe { CLASSES[self as usize].load(Ordering::Acquire).as_ref() }
            .unwrap_or_else(runtime_exception)
    }
}

fn base_ce() -> &'static ClassEntry {
    ExceptionClass::Base.ce()
}

/// Registers the exception classes at module startup.
///
/// They are built by hand, not with `#[php_class]`: a Rust-backed class gets a constructor that
/// refuses `new` from PHP, while these must inherit `\Exception::__construct()` so user code
/// can throw and construct them like any other exception.
pub fn register() -> ext_php_rs::error::Result<()> {
    fn keep<const I: usize>(ce: &'static mut ClassEntry, _: ext_php_rs::args::ArgInfoTables) {
        CLASSES[I].store(ce, Ordering::Release);
    }
    ClassBuilder::new(CLASS_NAMES[0])
        .extends((runtime_exception, "\\RuntimeException"))
        .registration(keep::<0>)
        .register()?;
    ClassBuilder::new(CLASS_NAMES[1])
        .extends((base_ce, CLASS_NAMES[0]))
        .registration(keep::<1>)
        .register()?;
    ClassBuilder::new(CLASS_NAMES[2])
        .extends((base_ce, CLASS_NAMES[0]))
        .registration(keep::<2>)
        .register()?;
    ClassBuilder::new(CLASS_NAMES[3])
        .extends((base_ce, CLASS_NAMES[0]))
        .registration(keep::<3>)
        .register()?;
    ClassBuilder::new(CLASS_NAMES[4])
        .extends((base_ce, CLASS_NAMES[0]))
        .property(ClassProperty {
            name: FAILURES.to_string(),
            flags: PropertyFlags::Private,
            // Internal classes cannot default a property to a (refcounted) array: null stands
            // for "no failures" and getFailures() answers [] for it.
            default: Some(Box::new(|| {
                let mut none = Zval::new();
                none.set_null();
                Ok(none)
            })),
            docs: &[],
            ty: None,
            nullable: true,
            readonly: false,
            default_stub: Some("null".to_string()),
        })
        .method(
            FunctionBuilder::new("getFailures", get_failures).returns(
                DataType::Array,
                false,
                false,
            ),
            MethodFlags::Public,
        )
        .registration(keep::<4>)
        .register()?;
    Ok(())
}

/// The private property of `PublishException` that holds the failed messages.
const FAILURES: &str = "failures";

/// Runs `f` with the engine's visibility scope set to `PublishException`, so its private
/// property can be read and written from here.
fn in_publish_exception_scope<T>(f: impl FnOnce() -> T) -> T {
    let scope = std::ptr::from_ref(ExceptionClass::Publish.ce()).cast_mut();
    let previous = {
        let mut globals = ExecutorGlobals::get_mut();
        std::mem::replace(&mut globals.fake_scope, scope)
    };
    let out = f();
    ExecutorGlobals::get_mut().fake_scope = previous;
    out
}

/// `PublishException::getFailures(): list<array>`.
extern "C" fn get_failures(ex: &mut ExecuteData, retval: &mut Zval) {
    run_handler(AssertUnwindSafe(|| {
        let list = match ex.get_self() {
            Some(this) => in_publish_exception_scope(|| {
                this.get_property::<&Zval>(FAILURES)
                    .ok()
                    .and_then(|z| z.array().map(|a| a.to_owned()))
            }),
            None => None,
        };
        retval.set_hashtable(list.unwrap_or_else(ZendHashTable::new));
    }));
}

/// One failure as the PHP array `getFailures()` lists.
fn failure_array(f: &Failure) -> ext_php_rs::error::Result<ZBox<ZendHashTable>> {
    let mut row = ZendHashTable::new();
    row.insert("exchange", f.exchange.as_str())?;
    row.insert("routing_key", f.routing_key.as_str())?;
    match &f.message_id {
        Some(id) => row.insert("message_id", id.as_str())?,
        None => row.insert("message_id", ())?,
    }
    row.insert("reply_code", i64::from(f.reply_code))?;
    row.insert("reason", f.reason.as_str())?;
    Ok(row)
}

/// Throws a `PublishException` now, with its failures attached. The `PhpException` returned
/// does nothing when thrown afterwards, because an exception is then already pending.
fn throw_publish_exception(err: &Error) -> PhpException {
    let ce = ExceptionClass::Publish.ce();
    if ext_php_rs::exception::throw_with_code(ce, 0, err.message()).is_ok() {
        let mut list = ZendHashTable::new();
        for failure in err.failures() {
            if let Ok(row) = failure_array(failure) {
                let _ = list.push(row);
            }
        }
        let pending = ExecutorGlobals::get().exception.cast::<ZendObject>();
        // SAFETY: the engine owns the pending exception we just threw; nothing frees it while
        // this function runs on the PHP thread.
        if let Some(object) = unsafe { pending.as_mut() } {
            in_publish_exception_scope(|| {
                let _ = object.set_property(FAILURES, list);
            });
        }
    }
    PhpException::new(err.message().to_string(), 0, ce)
}

/// An `AmqpRs\Exception`, the base class, for failures no subclass names.
pub fn amqp_exception(message: impl Into<String>) -> PhpException {
    PhpException::new(message.into(), 0, ExceptionClass::Base.ce())
}

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
        ErrorKind::Connection => ExceptionClass::Connection.ce(),
        ErrorKind::Channel(_) => ExceptionClass::Channel.ce(),
        ErrorKind::Timeout => ExceptionClass::Timeout.ce(),
        ErrorKind::Publish => ExceptionClass::Publish.ce(),
        ErrorKind::InvalidArgument => invalid_argument_exception(),
        ErrorKind::Other => ExceptionClass::Base.ce(),
    }
}

impl From<Error> for PhpException {
    fn from(err: Error) -> Self {
        if err.kind() == ErrorKind::Publish {
            return throw_publish_exception(&err);
        }
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
            Err(amqp_exception(format!(
                "{what}: internal error in amqp_rs: {detail}"
            )))
        }
    }
}

/// Raises an `E_WARNING`; an error if the user's error handler threw (that exception is
/// pending in the engine and wins over the one returned here).
pub(crate) fn warn(message: &str) -> PhpResult<()> {
    ext_php_rs::error::php_error(&ext_php_rs::flags::ErrorType::Warning, message);
    if ext_php_rs::zend::ExecutorGlobals::has_exception() {
        return Err(amqp_exception("the error handler threw"));
    }
    Ok(())
}
