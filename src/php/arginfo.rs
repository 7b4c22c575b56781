//! Union parameter types that ext-php-rs cannot declare (`string|array $uri`).
//!
//! Such a parameter is declared `mixed` by the macros and checked by hand; once the classes
//! are registered we widen its arg-info mask, so Reflection, IDE stubs and named arguments
//! see the real union.

use ext_php_rs::ffi::{zend_function, zend_hash_str_find_ptr_lc};
use ext_php_rs::zend::ClassEntry;
use std::sync::atomic::{AtomicBool, Ordering};

const MAY_BE_STRING: u32 = 1 << 6;
const MAY_BE_ARRAY: u32 = 1 << 7;

/// Parameters to widen: class, lower-case method, zero-based position, type mask.
const UNIONS: &[(&str, &str, usize, u32)] = &[(
    "AmqpRs\\Connection",
    "__construct",
    0,
    MAY_BE_STRING | MAY_BE_ARRAY,
)];

static DONE: AtomicBool = AtomicBool::new(false);

/// Applies `UNIONS` once per process; called at request startup, when classes exist.
pub fn declare_union_types() {
    if DONE.swap(true, Ordering::SeqCst) {
        return;
    }
    for &(class, method, position, mask) in UNIONS {
        let Some(ce) = ClassEntry::try_find(class) else {
            continue;
        };
        // SAFETY: the method was registered by this module; its arg-info array was built by
        // ext-php-rs with at least `num_args` entries and is not shared with other functions.
        unsafe {
            let func =
                zend_hash_str_find_ptr_lc(&ce.function_table, method.as_ptr().cast(), method.len())
                    as *mut zend_function;
            let Some(func) = func.as_mut() else {
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
}
