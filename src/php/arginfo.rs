//! Signatures ext-php-rs cannot declare, fixed once the classes are registered:
//! - union parameter types (`string|array $uri`): the macros declare `mixed` and the method
//!   checks by hand; we narrow the arg-info mask so Reflection and IDEs see the union;
//! - private constructors: a class made only by a factory (`Connection::producer()`) gets a
//!   public `__construct()` that throws; we make it private, as PHP's own such classes are.

use ext_php_rs::ffi::{zend_function, zend_hash_str_find_ptr_lc, IS_ARRAY, IS_STRING};
use ext_php_rs::flags::MethodFlags;
use ext_php_rs::zend::ClassEntry;
use std::sync::atomic::{AtomicBool, Ordering};

// Zend's MAY_BE_* type-mask bits are `1 << IS_*`.
const MAY_BE_STRING: u32 = 1 << IS_STRING;
const MAY_BE_ARRAY: u32 = 1 << IS_ARRAY;

/// Parameters to widen: class, lower-case method, zero-based position, type mask.
const UNIONS: &[(&str, &str, usize, u32)] = &[
    (
        "AmqpRs\\Connection",
        "__construct",
        0,
        MAY_BE_STRING | MAY_BE_ARRAY,
    ),
    (
        "AmqpRs\\Connection",
        "consumer",
        0,
        MAY_BE_STRING | MAY_BE_ARRAY,
    ),
];

/// Classes whose objects only factories make.
const FACTORY_MADE: &[&str] = &[
    "AmqpRs\\Producer",
    "AmqpRs\\Consumer",
    "AmqpRs\\Message",
    "AmqpRs\\RpcCall",
];

static DONE: AtomicBool = AtomicBool::new(false);

/// The method `name` (lower case) of `ce`, if registered.
///
/// # Safety
/// Call on the PHP thread after the class is registered.
unsafe fn method(ce: &ClassEntry, name: &str) -> Option<&'static mut zend_function> {
    let func = zend_hash_str_find_ptr_lc(&ce.function_table, name.as_ptr().cast(), name.len())
        as *mut zend_function;
    func.as_mut()
}

/// Applies `UNIONS` and `FACTORY_MADE` once per process; called at request startup, when
/// classes exist.
pub fn fix_signatures() {
    if DONE.swap(true, Ordering::SeqCst) {
        return;
    }
    for &(class, name, position, mask) in UNIONS {
        let Some(ce) = ClassEntry::try_find(class) else {
            continue;
        };
        // SAFETY: the method was registered by this module; its arg-info array was built by
        // ext-php-rs with at least `num_args` entries and is not shared with other functions.
        unsafe {
            let Some(func) = method(ce, name) else {
                continue;
            };
            let internal = &mut func.internal_function;
            if (position as u32) < internal.num_args && !internal.arg_info.is_null() {
                let arg = &mut *internal.arg_info.add(position);
                arg.type_.ptr = std::ptr::null_mut();
                arg.type_.type_mask = mask;
            }
        }
    }
    for class in FACTORY_MADE {
        let Some(ce) = ClassEntry::try_find(class) else {
            continue;
        };
        // SAFETY: as above; fn_flags is a plain bit set of the registered method.
        unsafe {
            if let Some(ctor) = method(ce, "__construct") {
                ctor.common.fn_flags = (ctor.common.fn_flags & !MethodFlags::Public.bits())
                    | MethodFlags::Private.bits();
            }
        }
    }
}
