//! amqp_rs: a RabbitMQ (AMQP 0-9-1) client for PHP. `core` speaks AMQP, `php` speaks Zvals;
//! this file only registers the module.

pub mod core;

/// Rust-side allocations (frames, futures, buffers) go to mimalloc: on the publish path glibc's
/// malloc took about a third of the PHP thread's time (measured with perf, P2 scenario).
/// PHP's own memory is untouched: the engine allocates with its own allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_arena_eager_commit` (mimalloc.h; not exported by libmimalloc-sys).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// By default mimalloc commits its arenas up front where the system overcommits, and with
/// transparent huge pages that memory becomes resident: measured 8-10 MB of RSS for a PHP
/// process's first connection and each further one. Committed on demand, a further
/// connection costs about 0.2 MB. Runs when the library is loaded, before it allocates.
#[used]
#[link_section = ".init_array"]
static TUNE_ALLOCATOR: extern "C" fn() = tune_allocator;

extern "C" fn tune_allocator() {
    // SAFETY: sets one of mimalloc's option values; no allocation has happened yet.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
}
#[cfg(not(test))]
mod php;

#[cfg(not(test))]
mod module {
    use crate::php::{arginfo, connection, consumer, exceptions, message, producer, rpc_call};
    use ext_php_rs::prelude::*;
    use ext_php_rs::zend::ModuleEntry;
    use ext_php_rs::{info_table_end, info_table_row, info_table_start};
    use std::panic::catch_unwind;

    /// `php --ri amqp_rs`: versions and the runtime's state, never a connection's secrets.
    pub extern "C" fn module_info(_module: *mut ModuleEntry) {
        // A panic must not cross into the engine: this hook is raw `extern "C"`.
        let _ = catch_unwind(|| {
            let rt = crate::core::runtime::info();
            let state = if rt.started {
                format!(
                    "running (pid {}, {} worker thread{}, generation {})",
                    std::process::id(),
                    rt.workers,
                    if rt.workers == 1 { "" } else { "s" },
                    rt.generation
                )
            } else if rt.generation > 0 {
                "not started in this process (inherited from the parent before fork)".to_string()
            } else {
                "not started (starts with the first connection)".to_string()
            };
            info_table_start!();
            info_table_row!("amqp_rs support", "enabled");
            info_table_row!("version", env!("CARGO_PKG_VERSION"));
            info_table_row!("lapin version", crate::core::LAPIN_VERSION);
            // The engine refuses a module built for another API; this row says which one it was.
            let api = ext_php_rs::ffi::ZEND_MODULE_API_NO.to_string();
            info_table_row!("PHP API (built for)", api.as_str());
            info_table_row!("git commit", crate::core::build_commit());
            info_table_row!("runtime", state.as_str());
            let pooled = crate::core::pool::info();
            info_table_row!("persistent connections", pooled.len().to_string().as_str());
            for (i, c) in pooled.iter().enumerate() {
                let row = format!(
                    "{} ({}), open {} s, {} idle channels, {} requests served",
                    c.endpoint,
                    if c.connected { "connected" } else { "lost" },
                    c.age,
                    c.idle_channels,
                    c.served
                );
                info_table_row!(format!("persistent #{}", i + 1).as_str(), row.as_str());
            }
            info_table_end!();
        });
    }

    extern "C" fn startup(_ty: i32, _module_number: i32) -> i32 {
        // A panic must not unwind into the engine's MINIT.
        match catch_unwind(exceptions::register) {
            Ok(Ok(())) => 0,
            _ => 1,
        }
    }

    extern "C" fn request_startup(_ty: i32, _module_number: i32) -> i32 {
        let _ = catch_unwind(arginfo::fix_signatures);
        0
    }

    /// After the request's objects are gone: pooled connections are cleaned for the next one.
    unsafe extern "C" fn post_deactivate() -> i32 {
        let _ = catch_unwind(crate::core::pool::end_request);
        0
    }

    /// Process end (a php-fpm worker retiring, a CLI script's end): pooled connections are
    /// closed properly instead of being cut when the process exits.
    extern "C" fn shutdown(_ty: i32, _module_number: i32) -> i32 {
        let _ = catch_unwind(crate::core::pool::close_all);
        0
    }

    #[php_module]
    pub fn get_module(module: ModuleBuilder) -> ModuleBuilder {
        module
            .name("amqp_rs")
            .startup_function(startup)
            .class::<producer::Producer>()
            .class::<rpc_call::RpcCall>()
            .class::<message::Message>()
            .class::<consumer::Consumer>()
            .class::<connection::Connection>()
            .info_function(module_info)
            .request_startup_function(request_startup)
            .post_deactivate_function(post_deactivate)
            .shutdown_function(shutdown)
    }
}
