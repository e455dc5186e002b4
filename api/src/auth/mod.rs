//! Authentication and authorisation: bcrypt passwords without the 72-byte truncation,
//! HS256 JWTs, the API key format ([`api_keys`]), TOTP ([`totp`]) and the field-level
//! decision point ([`visibility`]). Route-level permission checks are
//! `routes::Authed::require`, run by the edge for every route's declared permission.

pub mod api_keys;
pub mod totp;
pub mod visibility;

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::config::JwtSettings;

/// bcrypt work factor.
pub const BCRYPT_COST: u32 = 12;
/// Passwords are between these lengths (in characters / bytes).
pub const MIN_PASSWORD_CHARS: usize = 12;
pub const MAX_PASSWORD_CHARS: usize = 1024;

/// bcrypt reads only 72 bytes. Every byte of the password counts because bcrypt is
/// given the base64 of its SHA-256 (44 bytes) instead of the password itself.
fn prehash(password: &str) -> String {
    B64.encode(Sha256::digest(password.as_bytes()))
}

pub fn hash_password(password: &str) -> Result<String, bcrypt::BcryptError> {
    bcrypt::hash(prehash(password), BCRYPT_COST)
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    bcrypt::verify(prehash(password), hash).unwrap_or(false)
}

/// A hash to verify against when the account does not exist, so that an unknown
/// email costs the same time as a known one.
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        hash_password("not-a-real-password-but-same-cost").expect("bcrypt works")
    });
    &DUMMY
}

/// Checks a new password's length; the message names the rule.
pub fn check_password_policy(password: &str) -> Result<(), String> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(format!("must be at least {MIN_PASSWORD_CHARS} characters"));
    }
    if password.chars().count() > MAX_PASSWORD_CHARS {
        return Err(format!("must be at most {MAX_PASSWORD_CHARS} characters"));
    }
    Ok(())
}

/// Token types: staff tokens are refused by every portal route, portal tokens by every
/// staff route.
pub const TYP_STAFF: &str = "staff";
pub const TYP_PORTAL: &str = "portal";
pub const TYP_UNSUBSCRIBE: &str = "unsubscribe";

/// How long a one-click unsubscribe link in a message works.
const UNSUBSCRIBE_TTL_SECS: u64 = 400 * 24 * 3600;

/// What a one-click unsubscribe link (RFC 8058) stands for: withdraw this contact's
/// consent for one channel and purpose. Signed like every token (HS256), so the link
/// needs no table and cannot be forged or edited.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct UnsubscribeClaims {
    sub: String,
    org: String,
    typ: String,
    ch: crm_domain::consent::Channel,
    pur: String,
    msg: String,
    iat: u64,
    exp: u64,
    aud: String,
    iss: String,
}

/// A verified unsubscribe link.
#[derive(Debug, Clone, PartialEq)]
pub struct UnsubscribeLink {
    pub org_id: Uuid,
    pub contact_id: Uuid,
    pub channel: crm_domain::consent::Channel,
    pub purpose: crm_domain::consent::PurposeKey,
    pub message_id: Uuid,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    pub sub: String,
    pub org: String,
    pub typ: String,
    pub iat: u64,
    pub exp: u64,
    pub jti: String,
    pub aud: String,
    pub iss: String,
    /// The user's token generation when issued: logout, a password change and
    /// deactivation move it on, which ends every token issued before.
    pub gen: i32,
}

/// A staff token's subject, before its access is looked up.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user_id: Uuid,
    pub org_id: Uuid,
    pub generation: i32,
}

pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    settings: JwtSettings,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Tokens {
    pub fn new(settings: &JwtSettings) -> Result<Self, String> {
        let secret = settings.secret.expose_secret().as_bytes();
        if secret.len() < 32 {
            return Err("the JWT secret must be at least 32 bytes".into());
        }
        // Only HS256 is accepted: `alg: none` and any other algorithm are refused.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[settings.audience.as_str()]);
        validation.set_issuer(&[settings.issuer.as_str()]);
        validation.set_required_spec_claims(&["exp", "iat", "sub", "aud", "iss"]);
        validation.leeway = 5;
        Ok(Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            settings: settings.clone(),
        })
    }

    pub fn ttl_secs(&self) -> u64 {
        self.settings.ttl.as_secs()
    }

    /// Issues a staff token.
    pub fn issue(
        &self,
        user_id: Uuid,
        org_id: Uuid,
        generation: i32,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        self.issue_typed(TYP_STAFF, user_id, org_id, generation)
    }

    /// Issues a portal token for a contact.
    pub fn issue_portal(
        &self,
        contact_id: Uuid,
        org_id: Uuid,
        generation: i32,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        self.issue_typed(TYP_PORTAL, contact_id, org_id, generation)
    }

    fn issue_typed(
        &self,
        typ: &str,
        subject: Uuid,
        org_id: Uuid,
        generation: i32,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let iat = now();
        let claims = Claims {
            sub: subject.to_string(),
            org: org_id.to_string(),
            typ: typ.into(),
            iat,
            exp: iat + self.settings.ttl.as_secs(),
            jti: Uuid::now_v7().to_string(),
            aud: self.settings.audience.clone(),
            iss: self.settings.issuer.clone(),
            gen: generation,
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
    }

    /// Verifies a staff token; every failure reads the same to the caller.
    pub fn verify_staff(&self, token: &str) -> Option<Caller> {
        self.verify_typed(TYP_STAFF, token)
    }

    /// Verifies a portal token: `user_id` is the contact's id.
    pub fn verify_portal(&self, token: &str) -> Option<Caller> {
        self.verify_typed(TYP_PORTAL, token)
    }

    /// The token of a message's one-click unsubscribe link.
    pub fn issue_unsubscribe(
        &self,
        link: &UnsubscribeLink,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let iat = now();
        let claims = UnsubscribeClaims {
            sub: link.contact_id.to_string(),
            org: link.org_id.to_string(),
            typ: TYP_UNSUBSCRIBE.into(),
            ch: link.channel,
            pur: link.purpose.to_string(),
            msg: link.message_id.to_string(),
            iat,
            exp: iat + UNSUBSCRIBE_TTL_SECS,
            aud: self.settings.audience.clone(),
            iss: self.settings.issuer.clone(),
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
    }

    pub fn verify_unsubscribe(&self, token: &str) -> Option<UnsubscribeLink> {
        let data = decode::<UnsubscribeClaims>(token, &self.decoding, &self.validation).ok()?;
        let c = data.claims;
        if c.typ != TYP_UNSUBSCRIBE {
            return None;
        }
        Some(UnsubscribeLink {
            org_id: c.org.parse().ok()?,
            contact_id: c.sub.parse().ok()?,
            channel: c.ch,
            purpose: crm_domain::consent::PurposeKey::parse(&c.pur).ok()?,
            message_id: c.msg.parse().ok()?,
        })
    }

    fn verify_typed(&self, typ: &str, token: &str) -> Option<Caller> {
        let data = decode::<Claims>(token, &self.decoding, &self.validation).ok()?;
        if data.claims.typ != typ {
            return None;
        }
        Some(Caller {
            user_id: data.claims.sub.parse().ok()?,
            org_id: data.claims.org.parse().ok()?,
            generation: data.claims.gen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_after_the_72nd_count() {
        let base = "a".repeat(72);
        let (p1, p2) = (format!("{base}1"), format!("{base}2"));
        let h1 = hash_password(&p1).unwrap();
        assert!(verify_password(&p1, &h1));
        assert!(
            !verify_password(&p2, &h1),
            "bcrypt must not truncate at 72 bytes"
        );
        assert!(h1.starts_with("$2b$12$"), "cost 12");
    }

    #[test]
    fn policy_names_the_rule() {
        assert!(check_password_policy("short").is_err());
        assert!(check_password_policy(&"x".repeat(2000)).is_err());
        assert!(check_password_policy("correct horse battery").is_ok());
    }

    fn tokens(secret: &str) -> Tokens {
        Tokens::new(&JwtSettings {
            secret: secret.to_owned().into(),
            ttl: std::time::Duration::from_secs(60),
            audience: "crm-api".into(),
            issuer: "crm".into(),
        })
        .unwrap()
    }

    #[test]
    fn tokens_round_trip_and_forgeries_fail() {
        let t = tokens(&"s".repeat(32));
        let (u, o) = (Uuid::now_v7(), Uuid::now_v7());
        let jwt = t.issue(u, o, 0).unwrap();
        let caller = t.verify_staff(&jwt).unwrap();
        assert_eq!((caller.user_id, caller.org_id), (u, o));
        assert!(
            tokens(&"t".repeat(32)).verify_staff(&jwt).is_none(),
            "other key"
        );
        // alg=none: header {"alg":"none","typ":"JWT"} with the same claims, no signature.
        let claims = jwt.split('.').nth(1).unwrap();
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{claims}.");
        assert!(t.verify_staff(&none).is_none(), "alg=none");
        let portal = t.issue_portal(u, o, 0).unwrap();
        assert!(
            t.verify_staff(&portal).is_none(),
            "a portal token is no staff token"
        );
        assert!(
            t.verify_portal(&jwt).is_none(),
            "a staff token is no portal token"
        );
        assert_eq!(t.verify_portal(&portal).unwrap().user_id, u);
    }
}
