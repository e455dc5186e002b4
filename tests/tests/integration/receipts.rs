//! Consent receipts, verified by another implementation: PyJWT, whose EdDSA is the
//! `cryptography` package's (OpenSSL's Ed25519), checks receipts signed before and
//! after a key rotation against the JWKS the service publishes over HTTP, and refuses
//! a tampered one. Also: issuing is idempotent and walled per organisation, the first
//! key is made once however many processes race for it, and `crm receipts rotate-key`.
//!
//! The Python comes from `CRM_TEST_PYTHON` (scripts/test sets it); when unset, the
//! virtualenv is made as scripts/test makes it (`ensure_jose_python` of
//! scripts/lib/services.sh, under `$CRM_DATA_DIR` or `<repo>/.data`). No Python: the
//! test fails, saying so.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use clap::Parser;
use crm_infra::receipts::{self, Receipt, ReceiptError, ReceiptSigner};
use crm_tests::harness::TestApp;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

/// Reads `{"jwks": …, "tokens": [...]}` on stdin; for each token, finds its key in the
/// set by the header's kid and verifies it with PyJWT (EdDSA only); prints
/// `[{"ok": true, "claims": …} | {"ok": false, "error": "<exception class>"}]`.
const VERIFY_PY: &str = r#"
import json, sys
import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

given = json.load(sys.stdin)
keys = {k["kid"]: k for k in given["jwks"]["keys"]}
out = []
for token in given["tokens"]:
    try:
        kid = jwt.get_unverified_header(token)["kid"]
        key = jwt.PyJWK(keys[kid]).key
        assert isinstance(key, Ed25519PublicKey), type(key)
        claims = jwt.decode(token, key, algorithms=["EdDSA"], options={"require": ["iat", "jti"]})
        out.append({"ok": True, "claims": claims})
    except Exception as e:
        out.append({"ok": False, "error": type(e).__name__})
print(json.dumps(out))
"#;

pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_owned()
}

/// A python with PyJWT: `CRM_TEST_PYTHON`, else the virtualenv scripts/test makes.
pub(crate) async fn jose_python() -> PathBuf {
    if let Some(py) = std::env::var_os("CRM_TEST_PYTHON").filter(|p| !p.is_empty()) {
        return py.into();
    }
    let out = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(
            r#"set -euo pipefail; source "$1/scripts/lib/services.sh"
               ensure_jose_python; printf '%s' "$CRM_TEST_PYTHON""#,
        )
        .arg("bash")
        .arg(repo_root())
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run bash for scripts/lib/services.sh");
    assert!(
        out.status.success(),
        "no Python with PyJWT to verify receipts with: set CRM_TEST_PYTHON to one, or let \
         ensure_jose_python (scripts/lib/services.sh) make the virtualenv (it needs Python \
         >= 3.11 with venv, and PyPI). It said:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().into()
}

/// What PyJWT says of each token against `jwks`.
async fn verify_with_pyjwt(jwks: &Value, tokens: &[&str]) -> Vec<Value> {
    let python = jose_python().await;
    let mut child = tokio::process::Command::new(&python)
        .arg("-c")
        .arg(VERIFY_PY)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let input = json!({ "jwks": jwks, "tokens": tokens }).to_string();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "{} failed: {}",
        python.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "PyJWT's answer is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Claims shaped as the consent code builds them.
fn claims(app: &TestApp, status: &str) -> Value {
    json!({
        "iss": "crm",
        "sub": Uuid::now_v7().to_string(),
        "jti": Uuid::now_v7().to_string(),
        "iat": chrono::Utc::now().timestamp(),
        "org": app.org_id.to_string(),
        "consent": { "channel": "email", "purpose": "marketing", "status": status },
        "event_hash": "9f".repeat(32),
    })
}

async fn fetch_jwks(app: &TestApp) -> Value {
    let r = app
        .http
        .get(app.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("cache-control")
            .and_then(|v| v.to_str().ok()),
        Some("public, max-age=300")
    );
    r.json().await.unwrap()
}

/// The token with its payload replaced by `claims` (header and signature kept).
fn with_payload(jws: &str, claims: &Value) -> String {
    let p: Vec<&str> = jws.split('.').collect();
    format!("{}.{}.{}", p[0], B64URL.encode(claims.to_string()), p[2])
}

#[tokio::test]
async fn receipts_signed_before_and_after_a_rotation_verify_with_pyjwt() {
    let app = TestApp::spawn().await;
    let signer = &app.state.receipts;
    let granted = claims(&app, "granted");
    let first = signer.sign(&granted).await.unwrap();
    let new_kid = signer.rotate().await.unwrap();
    assert_ne!(new_kid, first.kid);
    let withdrawn = claims(&app, "withdrawn");
    let second = signer.sign(&withdrawn).await.unwrap();
    assert_eq!(second.kid, new_kid, "signs with the new key at once");

    // Public: no credentials. Both keys, the retired one first.
    let jwks = fetch_jwks(&app).await;
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "{jwks}");
    assert_eq!(keys[0]["kid"], first.kid.as_str());
    assert_eq!(keys[1]["kid"], new_kid.as_str());
    for k in keys {
        assert_eq!(k["kty"], "OKP");
        assert_eq!(k["crv"], "Ed25519");
        assert_eq!(k["use"], "sig");
        assert_eq!(k["alg"], "EdDSA");
        assert_eq!(B64URL.decode(k["x"].as_str().unwrap()).unwrap().len(), 32);
    }

    let mut forged = granted.clone();
    forged["consent"]["status"] = json!("withdrawn");
    let tampered = with_payload(&first.jws, &forged);
    // The first receipt's signature under the new key's id.
    let wrong_key = {
        let p: Vec<&str> = first.jws.split('.').collect();
        let header = json!({ "alg": "EdDSA", "kid": new_kid, "typ": "JWT" }).to_string();
        format!("{}.{}.{}", B64URL.encode(header), p[1], p[2])
    };
    let verdicts =
        verify_with_pyjwt(&jwks, &[&first.jws, &second.jws, &tampered, &wrong_key]).await;
    assert_eq!(verdicts[0], json!({ "ok": true, "claims": granted }));
    assert_eq!(verdicts[1], json!({ "ok": true, "claims": withdrawn }));
    assert_eq!(
        verdicts[2],
        json!({ "ok": false, "error": "InvalidSignatureError" })
    );
    assert_eq!(
        verdicts[3],
        json!({ "ok": false, "error": "InvalidSignatureError" })
    );
    app.stop().await;
}

#[tokio::test]
async fn only_json_objects_are_signed() {
    let app = TestApp::spawn().await;
    for claims in [json!([1, 2]), json!("text"), json!(null), json!(7)] {
        assert!(matches!(
            app.state.receipts.sign(&claims).await,
            Err(ReceiptError::ClaimsNotAnObject)
        ));
    }
    app.stop().await;
}

#[tokio::test]
async fn a_receipt_is_issued_once_per_event_and_read_only_by_its_organisation() {
    let app = TestApp::spawn().await;
    let signer = &app.state.receipts;
    let event = Uuid::now_v7();
    let mut client = app.state.pool.get().await.unwrap();
    let first = signer
        .issue(&client, app.org_id, event, &claims(&app, "granted"))
        .await
        .unwrap();
    // Issued again (a retry), with other claims: the stored receipt.
    let again = signer
        .issue(&client, app.org_id, event, &claims(&app, "withdrawn"))
        .await
        .unwrap();
    assert_eq!(again, first);

    // Two at once for a new event: both get the one stored.
    let racing = Uuid::now_v7();
    let (c1, c2) = (
        app.state.pool.get().await.unwrap(),
        app.state.pool.get().await.unwrap(),
    );
    let (granted, withdrawn) = (claims(&app, "granted"), claims(&app, "withdrawn"));
    let (a, b) = tokio::join!(
        signer.issue(&c1, app.org_id, racing, &granted),
        signer.issue(&c2, app.org_id, racing, &withdrawn),
    );
    assert_eq!(a.unwrap(), b.unwrap());

    // `store` keeps what was stored first.
    let other = Receipt {
        kid: first.kid.clone(),
        jws: "a.b.c".into(),
    };
    assert_eq!(
        receipts::store(&client, app.org_id, event, &other)
            .await
            .unwrap(),
        first
    );

    // Read in the API's read-only transaction that names the organisation.
    let (other_org, _, _) = app.another_org("Other").await;
    {
        let tx = crm_infra::read_models::org_scope(&mut client, app.org_id)
            .await
            .unwrap();
        assert_eq!(
            receipts::load(&tx, app.org_id, event).await.unwrap(),
            Some(first.clone())
        );
        tx.commit().await.unwrap();
    }
    {
        // Another organisation's transaction sees nothing, even asking by the id.
        let tx = crm_infra::read_models::org_scope(&mut client, other_org)
            .await
            .unwrap();
        assert_eq!(receipts::load(&tx, app.org_id, event).await.unwrap(), None);
        tx.commit().await.unwrap();
    }
    // Outside any transaction naming an organisation: nothing.
    assert_eq!(
        receipts::load(&client, app.org_id, event).await.unwrap(),
        None
    );
    let stored: i64 = app
        .db()
        .await
        .query_one("SELECT count(*) FROM consent_receipts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 2);
    app.stop().await;
}

#[tokio::test]
async fn processes_racing_for_the_first_key_sign_with_the_same_one() {
    let app = TestApp::spawn().await;
    let signers: Vec<ReceiptSigner> = (0..4)
        .map(|_| ReceiptSigner::new(app.state.pool.clone(), app.state.crypto.clone()))
        .collect();
    let c = claims(&app, "granted");
    let signed = futures::future::join_all(signers.iter().map(|s| s.sign(&c))).await;
    let kids: Vec<String> = signed.into_iter().map(|r| r.unwrap().kid).collect();
    assert!(kids.iter().all(|k| *k == kids[0]), "{kids:?}");
    let db = app.db().await;
    let row = db
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE retired_at IS NULL) FROM receipt_keys",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (1, 1));
    // The private key is stored wrapped, never as the raw 32 bytes.
    let wrapped: Vec<u8> = db
        .query_one("SELECT wrapped_key FROM receipt_keys", &[])
        .await
        .unwrap()
        .get(0);
    assert!(wrapped.len() > 32);
    app.stop().await;
}

#[tokio::test]
async fn crm_receipts_rotate_key_retires_the_key_and_keeps_it_published() {
    let app = TestApp::spawn().await;
    let before = app
        .state
        .receipts
        .sign(&claims(&app, "granted"))
        .await
        .unwrap();
    let cli = crm_api::cli::Cli::try_parse_from([
        "crm",
        "--database-url",
        &app.db_url,
        "--kek",
        secrecy::ExposeSecret::expose_secret(&app.settings.keys.kek),
        "--kek-id",
        &app.settings.keys.kek_id,
        "--jwt-secret",
        "a-secret-only-for-parsing-the-command-line",
        "receipts",
        "rotate-key",
    ])
    .unwrap();
    crm_api::cli::run(cli, async {}).await.unwrap();
    let db = app.db().await;
    let active: String = db
        .query_one("SELECT kid FROM receipt_keys WHERE retired_at IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(active, before.kid);
    let jwks = fetch_jwks(&app).await;
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, [before.kid.as_str(), active.as_str()]);
    // A retired key is kept as it was, whoever asks (here a superuser): every receipt
    // it signed keeps a key that verifies it.
    for refused in [
        "DELETE FROM receipt_keys WHERE retired_at IS NOT NULL",
        "UPDATE receipt_keys SET public_key = decode(repeat('00', 32), 'hex')",
        "UPDATE receipt_keys SET kid = kid || 'x'",
        "TRUNCATE receipt_keys",
    ] {
        let e = db.batch_execute(refused).await.unwrap_err();
        assert!(
            e.to_string().contains("receipt keys are kept")
                || e.as_db_error()
                    .is_some_and(|d| d.message().contains("receipt keys are kept")),
            "{refused}: {e}"
        );
    }
    let kept: i64 = db
        .query_one("SELECT count(*) FROM receipt_keys", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 2);
    app.stop().await;
}
