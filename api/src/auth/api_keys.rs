//! The API key format: `ck_live_` + 22 base62 characters of randomness (131 bits) + a
//! 6-character base62 checksum of them. A mistyped key fails its checksum and is
//! refused without a database lookup. Only the SHA-256 digest of a key is stored; the
//! key itself is shown once, when it is issued.

use rand::distributions::{Alphanumeric, DistString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const PREFIX: &str = "ck_live_";
const RANDOM_CHARS: usize = 22;
const CHECKSUM_CHARS: usize = 6;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn checksum(random: &str) -> String {
    let d = Sha256::digest(random.as_bytes());
    let mut n = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as u64;
    let mut out = [b'0'; CHECKSUM_CHARS];
    for c in out.iter_mut().rev() {
        *c = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A new key.
pub struct NewKey {
    /// The whole key, shown once.
    pub secret: String,
    pub digest: Vec<u8>,
    pub last4: String,
}

pub fn generate() -> NewKey {
    let random = Alphanumeric.sample_string(&mut rand::rngs::OsRng, RANDOM_CHARS);
    let secret = format!("{PREFIX}{random}{}", checksum(&random));
    NewKey {
        digest: digest(&secret),
        last4: secret[secret.len() - 4..].to_owned(),
        secret,
    }
}

pub fn digest(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Whether `token` looks like an API key (so it is not a JWT).
pub fn is_api_key(token: &str) -> bool {
    token.starts_with(PREFIX)
}

/// The digest to look up, if `token` is a well-formed key with a valid checksum.
pub fn check(token: &str) -> Option<Vec<u8>> {
    let body = token.strip_prefix(PREFIX)?;
    if body.len() != RANDOM_CHARS + CHECKSUM_CHARS
        || !body.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return None;
    }
    let (random, sum) = body.split_at(RANDOM_CHARS);
    let expected = checksum(random);
    // Not secret (anyone can compute a checksum), but compared in constant time anyway.
    let same: bool = sum.as_bytes().ct_eq(expected.as_bytes()).into();
    same.then(|| digest(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_the_format_and_check() {
        let k = generate();
        assert!(k.secret.starts_with("ck_live_"));
        assert_eq!(k.secret.len(), 8 + 22 + 6);
        assert_eq!(check(&k.secret), Some(k.digest.clone()));
        assert_eq!(k.last4, &k.secret[k.secret.len() - 4..]);
        assert_ne!(generate().secret, k.secret);
    }

    #[test]
    fn a_mistyped_key_fails_its_checksum() {
        let k = generate();
        let mut typo = k.secret.clone().into_bytes();
        // Change one character of the random part.
        typo[10] = if typo[10] == b'a' { b'b' } else { b'a' };
        let typo = String::from_utf8(typo).unwrap();
        assert_eq!(check(&typo), None);
        assert_eq!(check(&k.secret[..k.secret.len() - 1]), None, "too short");
        assert_eq!(check("ck_live_"), None);
        assert_eq!(check(&k.secret.replace("ck_live_", "ck_test_")), None);
    }
}
