//! The PHP binding layer: one file per PHP class, conversions in `convert.rs`, errors to
//! exceptions in `exceptions.rs`. PHP values never reach `crate::core`.

pub mod arginfo;
pub mod connection;
pub mod consumer;
pub mod convert;
pub mod exceptions;
pub mod json;
pub mod message;
pub mod producer;
pub mod readiness;
pub mod rpc_call;
