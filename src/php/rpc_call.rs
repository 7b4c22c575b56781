//! `AmqpRs\RpcCall`: an RPC call in flight, made by `Connection::rpcAsync()`; delegates to
//! `core::rpc::RpcCall`.

use crate::core::link::Link;
use crate::core::rpc_call::RpcCall as CoreCall;
use crate::php::exceptions::guard;
use crate::php::message::Message;
use ext_php_rs::exception::PhpResult;
use ext_php_rs::prelude::*;
use std::sync::Arc;

/// An RPC call whose reply is taken later: `poll()` never waits, `wait()` does.
#[php_class]
#[php(name = "AmqpRs\\RpcCall")]
#[php(flags = ext_php_rs::flags::ClassFlags::Final)]
pub struct RpcCall {
    inner: CoreCall,
    link: Arc<Link>,
}

impl RpcCall {
    /// Wraps a call started by `Connection::rpcAsync()`.
    pub(crate) fn new(inner: CoreCall, link: Arc<Link>) -> Self {
        Self { inner, link }
    }
}

#[php_impl]
impl RpcCall {
    /// The reply if it has come, else null, without waiting. `TimeoutException` once the
    /// call's timeout has passed with no reply; an exception once the reply was taken.
    pub fn poll(&mut self) -> PhpResult<Option<Message>> {
        guard("AmqpRs\\RpcCall::poll()", || {
            let reply = self.inner.poll()?;
            Ok(reply.map(|d| Message::received(d, self.link.clone(), true)))
        })
    }

    /// Waits for the reply, up to what is left of the call's timeout.
    pub fn wait(&mut self) -> PhpResult<Message> {
        guard("AmqpRs\\RpcCall::wait()", || {
            let reply = self.inner.wait()?;
            Ok(Message::received(reply, self.link.clone(), true))
        })
    }

    /// The correlation id the reply carries (the caller's, or the one made for the call).
    pub fn get_correlation_id(&self) -> String {
        self.inner.correlation_id().to_string()
    }

    /// Whether the reply (or the error that ended the call) was handed out.
    pub fn is_done(&self) -> bool {
        self.inner.is_done()
    }
}
