//! The readiness stream `Connection::readiness()` returns: a PHP stream on a duplicate of the
//! connection's eventfd (see `core::readiness`), which PHP closes with the stream.

use crate::php::exceptions::amqp_exception;
use ext_php_rs::exception::PhpResult;
use ext_php_rs::ffi::php_stream;
use ext_php_rs::types::Zval;
use std::os::raw::{c_char, c_int};

extern "C" {
    // PHP's php_stream_fopen_from_fd() (main/streams/php_stream_plain_wrapper.h), exported by
    // every PHP binary. Release builds only: a debug PHP (ZEND_DEBUG) adds four arguments.
    fn _php_stream_fopen_from_fd(
        fd: c_int,
        mode: *const c_char,
        persistent_id: *const c_char,
        zero_position: bool,
    ) -> *mut php_stream;
}

/// A read-only PHP stream resource that owns `fd`: PHP closes it with the stream (at
/// `fclose()` or when the request ends), or here if no stream can be made.
pub(crate) fn stream_from_fd(fd: c_int) -> PhpResult<Zval> {
    // SAFETY: `fd` is ours to give away; the mode is a NUL-terminated literal and no
    // persistent id is asked. PHP takes the fd only when it returns a stream.
    let stream = unsafe { _php_stream_fopen_from_fd(fd, c"rb".as_ptr(), std::ptr::null(), false) };
    if stream.is_null() {
        // SAFETY: PHP did not take the fd.
        unsafe { libc::close(fd) };
        return Err(amqp_exception(
            "AmqpRs\\Connection::readiness(): PHP could not open a stream on the readiness fd",
        ));
    }
    let mut zval = Zval::new();
    // SAFETY: php_stream_to_zval(): the zval takes the stream's resource (refcount 1, owned
    // by the request's resource list, no add-ref), and the stream is marked as exposed so PHP
    // frees it with the zval's last reference.
    unsafe {
        zval.set_resource((*stream).res);
        (*stream).set___exposed(1);
    }
    Ok(zval)
}
