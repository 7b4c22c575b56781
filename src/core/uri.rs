//! Parsing of `amqp://` and `amqps://` URIs into lapin's `AMQPUri`, with errors and display
//! forms that never contain the password.
//!
//! We parse ourselves rather than with `AMQPUri::from_str` because that one maps a host given
//! as an IP address (`amqp://10.0.0.5`) to `localhost`.

use crate::core::error::{Error, Result};
use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use percent_encoding::percent_decode_str;
use url::Url;

/// One broker address as given by the user, parsed.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// What lapin connects to.
    pub uri: AMQPUri,
    /// `amqp://user@host:port/vhost`, safe to print.
    pub display: String,
}

/// Replaces the password of anything URI-shaped with `***`, for error messages about input
/// that could not even be parsed.
pub fn redact(raw: &str) -> String {
    let Some(scheme_end) = raw.find("://") else {
        return raw.to_string();
    };
    let rest = &raw[scheme_end + 3..];
    // Up to the last '@' anywhere, not only within the authority: a password with an
    // unencoded '/', '?' or '#' (base64 has '/') is what made the URI unparseable. Masking
    // too much is harmless; masking too little is a leak.
    match rest.rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_string()
            };
            format!("{}{}{}", &raw[..scheme_end + 3], masked, &rest[at..])
        }
        None => raw.to_string(),
    }
}

fn decode(part: &str, what: &str, raw: &str) -> Result<String> {
    percent_decode_str(part)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| {
            Error::invalid_argument(format!(
                "invalid AMQP URI '{}': the {what} is not valid UTF-8 once decoded",
                redact(raw)
            ))
        })
}

fn query_int<T: std::str::FromStr>(url: &Url, key: &str, raw: &str) -> Result<Option<T>> {
    match url.query_pairs().find(|(k, _)| k == key) {
        None => Ok(None),
        Some((_, v)) => v.parse().map(Some).map_err(|_| {
            Error::invalid_argument(format!(
                "invalid AMQP URI '{}': query parameter '{key}' must be a whole number, got '{v}'",
                redact(raw)
            ))
        }),
    }
}

/// Parses one URI. Only `amqp` and `amqps` are accepted; the default vhost is `/`
/// (write `%2f`), an empty path segment (`amqp://host/`) means the vhost "".
pub fn parse(raw: &str) -> Result<Endpoint> {
    let bad =
        |why: &str| Error::invalid_argument(format!("invalid AMQP URI '{}': {why}", redact(raw)));
    let url = Url::parse(raw.trim()).map_err(|e| bad(&e.to_string()))?;
    let scheme = match url.scheme() {
        "amqp" => AMQPScheme::AMQP,
        "amqps" => AMQPScheme::AMQPS,
        other => {
            return Err(bad(&format!(
                "unsupported scheme '{other}', expected amqp:// or amqps://"
            )))
        }
    };
    let host = match url.host_str() {
        Some(h) if !h.is_empty() => h.trim_start_matches('[').trim_end_matches(']').to_string(),
        _ => return Err(bad("no host")),
    };
    let port = url.port().unwrap_or(match scheme {
        AMQPScheme::AMQP => 5672,
        AMQPScheme::AMQPS => 5671,
    });
    let username = match url.username() {
        "" => "guest".to_string(),
        u => decode(u, "user name", raw)?,
    };
    let password = match url.password() {
        None => "guest".to_string(),
        Some(p) => decode(p, "password", raw)?,
    };
    let vhost = match url.path() {
        "" => "/".to_string(),
        path => decode(&path[1..], "vhost", raw)?,
    };
    let auth_mechanism = match url.query_pairs().find(|(k, _)| k == "auth_mechanism") {
        None => None,
        Some((_, v)) => Some(v.parse().map_err(|_| bad("unknown auth_mechanism"))?),
    };
    // The connection's options set these for every broker of the list; a URI's own value
    // would be overwritten without a word, so it is refused instead.
    for (key, option) in [
        ("heartbeat", "heartbeat"),
        ("connection_timeout", "connect_timeout"),
    ] {
        if url.query_pairs().any(|(k, _)| k == key) {
            return Err(bad(&format!(
                "query parameter '{key}' is not read from a URI: give the connection option \
                 '{option}' instead (it applies to every broker of the list)"
            )));
        }
    }
    let query = AMQPQueryString {
        frame_max: query_int(&url, "frame_max", raw)?,
        channel_max: query_int(&url, "channel_max", raw)?,
        heartbeat: None,
        connection_timeout: None,
        auth_mechanism,
    };
    let display = format!(
        "{}://{}@{}:{}/{}",
        url.scheme(),
        username,
        host,
        port,
        percent_encoding::utf8_percent_encode(&vhost, percent_encoding::NON_ALPHANUMERIC)
    );
    Ok(Endpoint {
        uri: AMQPUri {
            scheme,
            authority: AMQPAuthority {
                userinfo: AMQPUserInfo { username, password },
                host,
                port,
            },
            vhost,
            query,
        },
        display,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ip_hosts_without_turning_them_into_localhost() {
        let ep = parse("amqp://u:secret@10.1.2.3:5673/%2f").expect("valid");
        assert_eq!(ep.uri.authority.host, "10.1.2.3");
        assert_eq!(ep.uri.authority.port, 5673);
        assert_eq!(ep.uri.vhost, "/");
        assert_eq!(ep.uri.authority.userinfo.password, "secret");
        assert_eq!(ep.display, "amqp://u@10.1.2.3:5673/%2F");
        assert!(!ep.display.contains("secret"));
    }

    #[test]
    fn defaults_follow_the_rabbitmq_uri_spec() {
        let ep = parse("amqps://broker.example").expect("valid");
        assert_eq!(ep.uri.authority.port, 5671);
        assert_eq!(ep.uri.vhost, "/");
        assert_eq!(ep.uri.authority.userinfo.username, "guest");
        let empty = parse("amqp://h/").expect("valid");
        assert_eq!(empty.uri.vhost, "");
        let named = parse("amqp://h/my%20vhost?frame_max=8192").expect("valid");
        assert_eq!(named.uri.vhost, "my vhost");
        assert_eq!(named.uri.query.frame_max, Some(8192));
    }

    #[test]
    fn rejects_other_schemes_and_garbage_without_showing_the_password() {
        let err = parse("http://u:hunter2@h:5672").expect_err("scheme");
        assert!(err.message().contains("unsupported scheme 'http'"));
        assert!(!err.message().contains("hunter2"));
        let err = parse("not a uri").expect_err("garbage");
        assert!(err.message().starts_with("invalid AMQP URI 'not a uri'"));
        let err = parse("amqp://u:hunter2@h:99999999/").expect_err("port");
        assert!(!err.message().contains("hunter2"), "{}", err.message());
        let err = parse("amqp://u:p@h/?channel_max=x").expect_err("query");
        assert!(err.message().contains("channel_max"));
    }

    #[test]
    fn refuses_what_the_connection_options_set() {
        let err = parse("amqp://u:p@h/?heartbeat=5").expect_err("heartbeat");
        assert!(
            err.message().contains("option 'heartbeat'"),
            "{}",
            err.message()
        );
        let err = parse("amqp://u:p@h/?connection_timeout=500").expect_err("timeout");
        assert!(
            err.message().contains("option 'connect_timeout'"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn redact_masks_only_the_password() {
        assert_eq!(redact("amqp://u:p@h:1/v"), "amqp://u:***@h:1/v");
        assert_eq!(redact("amqp://u@h"), "amqp://u@h");
        assert_eq!(redact("amqp://h"), "amqp://h");
        assert_eq!(redact("garbage"), "garbage");
        assert_eq!(redact("amqps://u:pa/ss@h:1/"), "amqps://u:***@h:1/");
        assert_eq!(redact("amqp://u:a?b#c@h"), "amqp://u:***@h");
        let err = parse("amqps://u:pa/ss@localhost:5671/").expect_err("unencoded '/'");
        assert!(!err.message().contains("pa/ss"), "{}", err.message());
    }
}
