//! The AMQP core: lapin on one background Tokio runtime, with no PHP types anywhere.

pub mod ack_batch;
pub mod confirms;
pub mod connect;
pub mod connect_options;
pub mod connection;
pub mod consumer;
pub mod delay;
pub mod delivery;
pub mod error;
pub mod frame_size;
pub mod idle_channels;
pub mod ids;
pub mod link;
pub mod poison;
pub mod pool;
pub mod producer;
pub mod readiness;
pub mod recovery;
pub mod resolve;
pub mod retry;
pub mod rpc;
pub mod rpc_call;
pub mod runtime;
pub mod settlements;
pub mod shortstr;
pub mod state_changes;
pub mod stop_signals;
#[cfg(test)]
pub(crate) mod testing;
pub mod topology;
pub mod transport;
pub mod uri;
pub mod worker;

/// The lapin version this build links, for `php --ri amqp_rs`.
pub const LAPIN_VERSION: &str = env!("AMQP_RS_LAPIN_VERSION");

/// The git commit this build comes from, between markers that stay whole in the .so, so
/// scripts/deb.sh reads the commit of the very file it packages (`amqp_rs-commit=...;`).
pub const BUILD_COMMIT_MARKED: &str = concat!("amqp_rs-commit=", env!("AMQP_RS_GIT_COMMIT"), ";");

/// The git commit this build comes from ("unknown" when built without .git), for `php --ri`.
pub fn build_commit() -> &'static str {
    BUILD_COMMIT_MARKED
        .trim_start_matches("amqp_rs-commit=")
        .trim_end_matches(';')
}
