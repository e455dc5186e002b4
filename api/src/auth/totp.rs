//! TOTP (RFC 6238): 30-second steps, six digits, HMAC-SHA1 (what authenticator apps
//! use), computed by `totp-rs`. A code is accepted for the current step and the one
//! before it only, and the caller records the step so it cannot be used twice. Backup
//! codes are 80 random bits each, stored as SHA-256 digests and usable once.

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use totp_rs::{Algorithm, Secret, TOTP};

pub const STEP_SECS: u64 = 30;
pub const DIGITS: usize = 6;
pub const BACKUP_CODES: usize = 10;

fn totp(secret: &[u8], digits: usize) -> TOTP {
    TOTP::new_unchecked(
        Algorithm::SHA1,
        digits,
        0,
        STEP_SECS,
        secret.to_vec(),
        Some("CRM".into()),
        String::new(),
    )
}

/// A new 160-bit seed (RFC 4226's recommended length).
pub fn new_secret() -> Vec<u8> {
    let mut s = vec![0u8; 20];
    rand::rngs::OsRng.fill_bytes(&mut s);
    s
}

pub fn base32(secret: &[u8]) -> String {
    Secret::Raw(secret.to_vec()).to_encoded().to_string()
}

/// The `otpauth://` URL an authenticator app reads (usually from a QR code).
pub fn otpauth_url(secret: &[u8], account: &str) -> String {
    let mut t = totp(secret, DIGITS);
    t.account_name = account.replace(':', "");
    t.get_url()
}

/// The code for the step containing `unix_secs`.
pub fn code_at(secret: &[u8], digits: usize, unix_secs: u64) -> String {
    totp(secret, digits).generate(unix_secs)
}

/// The step `code` belongs to, if it is the current step's or the previous one's.
pub fn matching_step(secret: &[u8], code: &str, unix_secs: u64) -> Option<u64> {
    let now = unix_secs / STEP_SECS;
    [now, now.saturating_sub(1)].into_iter().find(|step| {
        let expected = code_at(secret, DIGITS, step * STEP_SECS);
        bool::from(expected.as_bytes().ct_eq(code.trim().as_bytes()))
    })
}

/// Ten new backup codes (`xxxx-xxxx-xxxx-xxxx`, base32) and their digests.
pub fn new_backup_codes() -> (Vec<String>, Vec<Vec<u8>>) {
    (0..BACKUP_CODES)
        .map(|_| {
            let mut raw = [0u8; 10];
            rand::rngs::OsRng.fill_bytes(&mut raw);
            let s = base32(&raw).to_ascii_lowercase();
            let code = format!("{}-{}-{}-{}", &s[0..4], &s[4..8], &s[8..12], &s[12..16]);
            let digest = backup_digest(&code);
            (code, digest)
        })
        .unzip()
}

/// The digest a backup code is stored under (case and dashes do not matter).
pub fn backup_digest(code: &str) -> Vec<u8> {
    let normal: String = code
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    Sha256::digest(normal.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B, SHA-1, eight digits.
    #[test]
    fn rfc_6238_test_vectors() {
        let secret = b"12345678901234567890";
        for (t, code) in [
            (59, "94287082"),
            (1111111109, "07081804"),
            (1111111111, "14050471"),
            (1234567890, "89005924"),
            (2000000000, "69279037"),
            (20000000000, "65353130"),
        ] {
            assert_eq!(code_at(secret, 8, t), code, "T={t}");
        }
    }

    #[test]
    fn the_current_and_previous_step_only() {
        let secret = new_secret();
        let now = 1_800_000_000;
        let current = code_at(&secret, DIGITS, now);
        let previous = code_at(&secret, DIGITS, now - 30);
        let older = code_at(&secret, DIGITS, now - 60);
        let next = code_at(&secret, DIGITS, now + 30);
        assert_eq!(matching_step(&secret, &current, now), Some(now / 30));
        assert_eq!(matching_step(&secret, &previous, now), Some(now / 30 - 1));
        for (what, code) in [("older", &older), ("next", &next)] {
            if code != &current && code != &previous {
                assert_eq!(matching_step(&secret, code, now), None, "{what}");
            }
        }
    }

    #[test]
    fn backup_codes_are_distinct_and_digest_loosely() {
        let (codes, digests) = new_backup_codes();
        assert_eq!(codes.len(), 10);
        let unique: std::collections::HashSet<_> = codes.iter().collect();
        assert_eq!(unique.len(), 10);
        assert_eq!(
            backup_digest(&codes[0].to_uppercase().replace('-', "")),
            digests[0]
        );
    }
}
