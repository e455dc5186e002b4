//! `GET /.well-known/jwks.json`: the public keys that sign consent receipts
//! (`crm_infra::receipts`), retired ones included, so every receipt ever issued can be
//! verified offline with any JOSE library. Public: no authentication.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use warp::Reply;

use crm_infra::receipts::ReceiptError;

use crate::edge::reply::{RawAs, RawDoc};
use crate::edge::route::OpDoc;
use crate::error::ApiError;
use crate::state::AppState;

/// A JSON Web Key Set (RFC 7517): every key that signs or signed consent receipts,
/// oldest first.
#[derive(Serialize, Deserialize, ToSchema)]
pub(crate) struct Jwks {
    keys: Vec<Jwk>,
}

/// An Ed25519 public key as a JWK (RFC 8037).
#[derive(Serialize, Deserialize, ToSchema)]
pub(crate) struct Jwk {
    kty: KeyType,
    crv: Curve,
    /// The 32-byte public key, base64url without padding.
    x: String,
    /// The key's id, named by the `kid` header of the receipts it signed: its JWK
    /// thumbprint (RFC 7638).
    kid: String,
    #[serde(rename = "use")]
    key_use: KeyUse,
    alg: Algorithm,
}

/// Octet key pair.
#[derive(Serialize, Deserialize, ToSchema)]
enum KeyType {
    #[serde(rename = "OKP")]
    Okp,
}

#[derive(Serialize, Deserialize, ToSchema)]
enum Curve {
    Ed25519,
}

/// Signatures.
#[derive(Serialize, Deserialize, ToSchema)]
enum KeyUse {
    #[serde(rename = "sig")]
    Sig,
}

#[derive(Serialize, Deserialize, ToSchema)]
enum Algorithm {
    EdDSA,
}

pub(crate) struct JwksDoc;

impl RawDoc for JwksDoc {
    fn document(doc: &mut OpDoc) {
        let schema = doc.schema::<Jwks>();
        doc.success(
            200,
            "The receipt signing keys (Cache-Control: public, max-age=300)",
            Some(("application/json", schema)),
        );
    }
}

/// Verifiers may cache the set this long; one that meets an unknown `kid` (a key
/// rotated in meanwhile) fetches it again.
const CACHE_CONTROL: &str = "public, max-age=300";

pub(crate) async fn jwks(state: AppState) -> Result<RawAs<JwksDoc>, ApiError> {
    let value = state.receipts.jwks().await.map_err(api_error)?;
    let set: Jwks = serde_json::from_value(value).map_err(ApiError::internal)?;
    Ok(RawAs::new(
        warp::reply::with_header(warp::reply::json(&set), "cache-control", CACHE_CONTROL)
            .into_response(),
    ))
}

/// The database away is a 503 as everywhere (`ApiError`'s own conversions); anything
/// else is a 500. (Here rather than in `crate::error` while this is its only user.)
pub(crate) fn api_error(e: ReceiptError) -> ApiError {
    match e {
        ReceiptError::Db(e) => e.into(),
        ReceiptError::Pool(e) => e.into(),
        other => ApiError::internal(other),
    }
}
