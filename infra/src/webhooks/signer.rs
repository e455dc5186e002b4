//! Standard Webhooks signatures (https://www.standardwebhooks.com, "Signature scheme"):
//! the secret is `whsec_` + base64 of the key bytes; a delivery carries `webhook-id`,
//! `webhook-timestamp` (Unix seconds) and `webhook-signature`: space-separated
//! `v1,<base64 of HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`, one per valid secret
//! (two during a rotation's grace period).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use secrecy::SecretString;
use sha2::Sha256;

/// The prefix of a signing secret.
pub const PREFIX: &str = "whsec_";
/// Key bytes of a new secret (the specification asks for 24 to 64).
pub const KEY_BYTES: usize = 32;

/// A new signing secret: `whsec_` + base64 of 32 random bytes.
pub fn generate() -> SecretString {
    let mut key = [0u8; KEY_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut key);
    SecretString::from(format!("{PREFIX}{}", B64.encode(key)))
}

/// The key bytes of a secret (`None`: not `whsec_` + base64).
pub fn key_of(secret: &str) -> Option<Vec<u8>> {
    B64.decode(secret.strip_prefix(PREFIX)?).ok()
}

/// The `webhook-signature` header's value: one `v1,` signature per key.
pub fn sign(keys: &[&[u8]], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    keys.iter()
        .map(|key| {
            let mut mac =
                Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
            mac.update(msg_id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A message's `webhook-id`.
pub fn message_id(id: uuid::Uuid) -> String {
    format!("msg_{}", id.simple())
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    /// The example of the Standard Webhooks specification's reference libraries.
    #[test]
    fn the_specifications_example_signs_alike() {
        let key = key_of("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&[&key], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn a_new_secret_has_the_prefix_and_enough_random_bytes() {
        let a = generate();
        let b = generate();
        assert!(a.expose_secret().starts_with(PREFIX));
        assert_eq!(key_of(a.expose_secret()).unwrap().len(), KEY_BYTES);
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert!(key_of("nope").is_none());
    }

    #[test]
    fn two_keys_give_two_signatures() {
        let sig = sign(&[b"a", b"b"], "msg_1", 1, b"{}");
        assert_eq!(sig.split(' ').count(), 2);
        assert!(sig.split(' ').all(|s| s.starts_with("v1,")));
    }
}
