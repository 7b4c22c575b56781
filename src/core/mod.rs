//! The AMQP core: lapin on one background Tokio runtime, with no PHP types anywhere.

pub mod confirms;
pub mod connect_options;
pub mod connection;
pub mod consumer;
pub mod delay;
pub mod error;
pub mod frame_size;
pub mod idle_channels;
pub mod ids;
pub mod link;
pub mod poison;
pub mod pool;
pub mod producer;
pub mod recovery;
pub mod resolve;
pub mod retry;
pub mod rpc;
pub mod runtime;
pub mod shortstr;
pub mod stop_signals;
pub mod topology;
pub mod transport;
pub mod uri;

/// The lapin version this build links, for `php --ri amqp_rs`.
pub const LAPIN_VERSION: &str = env!("AMQP_RS_LAPIN_VERSION");
