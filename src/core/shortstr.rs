//! AMQP `shortstr` values (names, routing keys): at most 255 bytes.
//!
//! lapin's `From<&str> for ShortString` panics past 255 bytes; every user-given name goes
//! through here first so a long name is an error, not a crash.

use crate::core::error::{Error, Result};
use lapin::types::ShortString;

/// Checks `value` against the 255-byte limit; `what` names it in the error ("queue name").
pub fn shortstr(value: &str, what: &str) -> Result<ShortString> {
    ShortString::try_new(value).map_err(|_| {
        let shown: String = value.chars().take(40).collect();
        Error::invalid_argument(format!(
            "{what} '{shown}...' is {} bytes long; AMQP allows at most 255",
            value.len()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_255_bytes_and_refuses_256() {
        assert!(shortstr(&"a".repeat(255), "queue name").is_ok());
        let err = shortstr(&"a".repeat(256), "queue name").expect_err("too long");
        assert!(err.message().starts_with("queue name 'aaaa"));
        assert!(err.message().contains("256 bytes"));
    }
}
