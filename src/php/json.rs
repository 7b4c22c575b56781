//! JSON bodies, through PHP's own `json_encode()`/`json_decode()` so that values come and go
//! exactly as PHP code would see them (arrays, not objects; floats keep their `.0`).

use crate::php::exceptions::{amqp_exception, invalid_argument};
use ext_php_rs::binary::Binary;
use ext_php_rs::convert::IntoZval;
use ext_php_rs::exception::PhpResult;
use ext_php_rs::types::{ZendCallable, Zval};

/// `JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_PRESERVE_ZERO_FRACTION`.
const ENCODE_FLAGS: i64 = 64 | 256 | 1024;
/// Nesting `json_decode()` accepts, PHP's default.
const DEPTH: i64 = 512;

/// The content type `Producer::publishJson()` sets unless the caller gives one.
pub const CONTENT_TYPE: &str = "application/json";

fn call(name: &str, args: Vec<&dyn ext_php_rs::convert::IntoZvalDyn>) -> PhpResult<Zval> {
    let function = ZendCallable::try_from_name(name).map_err(|_| {
        amqp_exception(format!(
            "{name}() is not available (the json extension is missing)"
        ))
    })?;
    function
        .try_call(args)
        .map_err(|e| amqp_exception(format!("{name}() failed: {e:?}")))
}

/// What `json_last_error_msg()` says, or None when the last call succeeded.
fn last_error() -> Option<String> {
    let code = call("json_last_error", vec![]).ok()?.long()?;
    if code == 0 {
        return None;
    }
    Some(
        call("json_last_error_msg", vec![])
            .ok()
            .and_then(|msg| msg.string())
            .unwrap_or_else(|| format!("error {code}")),
    )
}

/// `value` as JSON text; what cannot be encoded (invalid UTF-8, INF, a resource, a
/// recursive array) is an `InvalidArgumentException` that says why.
pub fn encode(value: &Zval, what: &str) -> PhpResult<Vec<u8>> {
    let depth = DEPTH;
    let encoded = call("json_encode", vec![value, &ENCODE_FLAGS, &depth])?;
    match encoded.binary::<u8>() {
        Some(bytes) if last_error().is_none() => Ok(bytes),
        _ => Err(invalid_argument(format!(
            "{what}: the value cannot be encoded as JSON: {}",
            last_error().unwrap_or_else(|| "json_encode() returned false".to_string())
        ))),
    }
}

/// The PHP value of a JSON body (objects become arrays); bad JSON is an `AmqpRs\Exception`.
pub fn decode(body: &[u8], what: &str) -> PhpResult<Zval> {
    let mut text = Zval::new();
    Binary::from(body.to_vec()).set_zval(&mut text, false)?;
    let assoc = true;
    let depth = DEPTH;
    let flags = 0i64;
    let decoded = call("json_decode", vec![&text, &assoc, &depth, &flags])?;
    match last_error() {
        None => Ok(decoded),
        Some(why) => Err(amqp_exception(format!(
            "{what}: the body is not valid JSON: {why}"
        ))),
    }
}
