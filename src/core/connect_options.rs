//! How a connection is asked for: the options of the PHP `Connection` constructor, the TLS
//! material for `amqps://`, and the URI lapin is handed for each broker of the list.

use crate::core::error::{Error, Result};
use crate::core::uri::Endpoint;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::AMQPUri;
use std::time::Duration;

/// The frame size asked of the broker unless the URI gives one: RabbitMQ's default.
const DEFAULT_FRAME_MAX: u32 = 128 * 1024;

/// TLS settings for `amqps://` URIs.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// PEM file of CA certificates trusted besides the system's.
    pub cafile: Option<String>,
    /// PEM client certificate for mutual TLS.
    pub certfile: Option<String>,
    /// PEM (PKCS#8) private key of the client certificate.
    pub keyfile: Option<String>,
    /// Verify the broker's certificate and host name.
    pub verify: bool,
}

/// Settings of a connection, as the PHP `Connection` options give them.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Heartbeat interval asked of the broker, in seconds; with 0, lapin takes the broker's
    /// proposal (RabbitMQ's is 60 s): heartbeats stay on.
    pub heartbeat: u16,
    /// Bound on TCP connect + TLS + AMQP handshake, per broker tried.
    pub connect_timeout: Duration,
    /// Connection name shown in the management UI.
    pub name: Option<String>,
    /// Automatic recovery after a lost connection.
    pub reconnect: bool,
    /// TLS settings, used for `amqps://` URIs.
    pub tls: TlsOptions,
    /// Keep the connection in the process's pool for the next request (see `pool.rs`).
    pub persistent: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            heartbeat: 30,
            connect_timeout: Duration::from_secs(5),
            name: None,
            reconnect: true,
            tls: TlsOptions {
                verify: true,
                ..TlsOptions::default()
            },
            persistent: false,
        }
    }
}

fn read_file(path: &str, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::invalid_argument(format!("cannot read TLS {what} '{path}': {e}")))
}

pub(crate) fn tls_config(tls: &TlsOptions) -> Result<OwnedTLSConfig> {
    if !tls.verify {
        return Err(Error::invalid_argument(
            "tls option 'verify' => false is not supported: give the broker's CA with 'cafile' instead",
        ));
    }
    let cert_chain = match &tls.cafile {
        Some(path) => Some(
            String::from_utf8(read_file(path, "cafile")?)
                .map_err(|_| Error::invalid_argument(format!("TLS cafile '{path}' is not PEM")))?,
        ),
        None => None,
    };
    let identity = match (&tls.certfile, &tls.keyfile) {
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: read_file(cert, "certfile")?,
            key: read_file(key, "keyfile")?,
        }),
        (None, None) => None,
        _ => {
            return Err(Error::invalid_argument(
                "tls options 'certfile' and 'keyfile' go together: give both or neither",
            ))
        }
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

/// The URI lapin connects to for `endpoint`, with the options that travel in its query
/// (`uri::parse` refuses a URI that sets them itself).
pub(crate) fn prepared(endpoint: &Endpoint, options: &ConnectOptions) -> AMQPUri {
    let mut uri = endpoint.uri.clone();
    uri.query.heartbeat = Some(options.heartbeat);
    uri.query.connection_timeout = Some(options.connect_timeout.as_millis() as u64);
    // Asked for up front, lapin sizes its read and write buffers (32 frames each) for it when
    // the connection starts: zeroed memory the process only pays for as it is used. Left to
    // the broker's tune, they are grown after the handshake and written through, 8 MiB of RSS
    // per connection at RabbitMQ's 128 KiB.
    uri.query.frame_max = uri.query.frame_max.or(Some(DEFAULT_FRAME_MAX));
    uri
}
