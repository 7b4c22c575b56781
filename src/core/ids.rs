//! Random identifiers: names for queues the client names itself, and message ids.

use crate::core::error::{Error, Result};

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// 16 random bytes from the operating system.
fn random128() -> Result<[u8; 16]> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes)
        .map_err(|e| Error::connection(format!("no randomness from the operating system: {e}")))?;
    Ok(bytes)
}

/// 22 URL-safe characters carrying 128 random bits, as RabbitMQ's `amq.gen-` names do.
pub fn random_name() -> Result<String> {
    let bytes = random128()?;
    let value = u128::from_be_bytes(bytes);
    Ok((0..22)
        .map(|i| char::from(ALPHABET[((value >> (i * 6)) & 63) as usize]))
        .collect())
}

/// A random (version 4) UUID in its usual text form.
pub fn uuid_v4() -> Result<String> {
    let mut bytes = random128()?;
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_uuids_are_well_formed_and_differ() {
        let a = random_name().expect("random");
        assert_eq!(a.len(), 22);
        assert!(a.bytes().all(|c| ALPHABET.contains(&c)));
        assert_ne!(a, random_name().expect("random"));
        let id = uuid_v4().expect("random");
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
        assert_ne!(id, uuid_v4().expect("random"));
    }
}
