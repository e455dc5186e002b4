//! Field-level permissions: for every built-in role, a hidden field is absent from every
//! output (single read, list, as-of read, history, activity log), and writing a field
//! without write access is a 403 naming it.

use crm_domain::access::{builtin_policy, FieldAccess, Permission, Role, RoleRef, CONTACT_FIELDS};
use crm_tests::harness::TestApp;
use serde_json::{json, Value};

/// A value of each field, unlike anything else in a response.
const VALUES: [(&str, &str); 9] = [
    ("given_name", "Givenxq"),
    ("family_name", "Familyxq"),
    ("email", "mailxq@example.com"),
    ("phone", "+15550100199"),
    ("address", "Streetxq 1"),
    ("company", "Companyxq"),
    ("title", "Titlexq"),
    ("time_zone", "Pacific/Chatham"),
    ("custom", "Customxq"),
];

fn value_of(field: &str) -> &'static str {
    VALUES.iter().find(|(f, _)| *f == field).unwrap().1
}

async fn get(app: &TestApp, token: &str, path: &str) -> (u16, String) {
    let r = app
        .http
        .get(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Checks one output: every hidden field's name and value are absent, and (when
/// `visible_too`) every readable field's value is there.
fn check(role: Role, what: &str, body: &str, visible_too: bool) {
    let policy = builtin_policy(role);
    for field in CONTACT_FIELDS {
        let value = value_of(field);
        if policy.field(field) == FieldAccess::Hidden {
            assert!(
                !body.contains(value),
                "{role:?} {what}: hidden {field} leaked: {body}"
            );
            assert!(
                !body.contains(&format!("\"{field}\"")),
                "{role:?} {what}: hidden {field} named: {body}"
            );
        } else if visible_too {
            assert!(
                body.contains(value),
                "{role:?} {what}: readable {field} missing: {body}"
            );
        }
    }
}

#[tokio::test]
async fn hidden_fields_are_absent_from_every_output() {
    let app = TestApp::spawn().await;
    let (id, _) = app
        .create_contact(&json!({
            "given_name": value_of("given_name"), "family_name": value_of("family_name"),
            "email": value_of("email"), "phone": value_of("phone"),
            "address": {"line1": value_of("address"), "country": "DE"},
            "company": value_of("company"), "title": value_of("title"),
            "time_zone": value_of("time_zone"), "custom": {"note": value_of("custom")},
        }))
        .await;
    // An update that clears fields: history carries their names.
    let r = app
        .patch(
            &format!("/v1/contacts/{id}"),
            &json!({"phone": null, "custom": {"note": null}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let position = r.json::<Value>().await.unwrap()["positions"][0]
        .as_i64()
        .unwrap();
    let wait = format!("min_position={position}&wait_ms=5000");
    let mut outputs_checked = 0;
    for role in Role::ALL {
        let policy = builtin_policy(role);
        let (_, token) = app.user_with_role(RoleRef::Builtin(role)).await;
        if policy.allows(Permission::ContactsRead) {
            let (s, body) = get(&app, &token, &format!("/v1/contacts/{id}?{wait}")).await;
            assert_eq!(s, 200, "{body}");
            // The current record lost its phone (and its custom field: `custom` is `{}`);
            // the rest must be visible.
            let v: Value = serde_json::from_str(&body).unwrap();
            for field in CONTACT_FIELDS {
                let present = v.get(field).is_some();
                let expect = policy.field(field) != FieldAccess::Hidden && field != "phone";
                assert_eq!(present, expect, "{role:?} single read, {field}: {body}");
            }
            check(role, "single read", &body, false);
            let (s, body) = get(&app, &token, &format!("/v1/contacts?{wait}")).await;
            assert_eq!(s, 200);
            check(role, "list", &body, false);
            outputs_checked += 2;
        }
        if policy.allows(Permission::ContactsHistory) {
            let (s, body) = get(&app, &token, &format!("/v1/contacts/{id}/history")).await;
            assert_eq!(s, 200);
            check(role, "history", &body, true);
            // The actor's IP and user agent are consent proof.
            let v: Value = serde_json::from_str(&body).unwrap();
            let proof = v["events"][0]["metadata"].get("user_agent").is_some();
            assert_eq!(
                proof,
                policy.allows(Permission::ConsentProofView),
                "{role:?} {body}"
            );
            let (s, body) = get(
                &app,
                &token,
                &format!("/v1/contacts/{id}?as_of=2100-01-01T00:00:00Z"),
            )
            .await;
            assert_eq!(s, 200);
            check(role, "as_of", &body, false);
            outputs_checked += 2;
        }
        if policy.allows(Permission::ActivityRead) {
            let (s, body) = get(&app, &token, &format!("/v1/activity?{wait}")).await;
            assert_eq!(s, 200);
            assert!(body.contains(&id.to_string()), "{body}");
            check(role, "activity", &body, false);
            outputs_checked += 1;
        }
    }
    assert!(outputs_checked >= 25, "{outputs_checked}");
    app.stop().await;
}

#[tokio::test]
async fn writing_or_filtering_a_field_without_access_is_403_naming_it() {
    let app = TestApp::spawn().await;
    let (id, _) = app
        .create_contact(&json!({"given_name": "Ada", "email": "ada@example.com"}))
        .await;
    // Support may write email, not names.
    let (_, support) = app.user_with_role(RoleRef::Builtin(Role::Support)).await;
    let patch = |token: String, body: Value| {
        let app = &app;
        async move {
            let r = app
                .http
                .patch(app.url(&format!("/v1/contacts/{id}")))
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (s, body) = patch(
        support.clone(),
        json!({"email": "new@example.com", "family_name": "L"}),
    )
    .await;
    assert_eq!(s, 403, "{body}");
    assert_eq!(body["code"], "field_forbidden");
    assert!(
        body["message"].as_str().unwrap().contains("`family_name`"),
        "{body}"
    );
    let (s, _) = patch(support.clone(), json!({"given_name": null})).await;
    assert_eq!(s, 403, "clearing is writing");
    let (s, body) = patch(support.clone(), json!({"email": "new@example.com"})).await;
    assert_eq!(s, 200, "{body}");
    // Partner creates contacts but may not set a phone.
    let (_, partner) = app.user_with_role(RoleRef::Builtin(Role::Partner)).await;
    let r = app
        .http
        .post(app.url("/v1/contacts"))
        .bearer_auth(&partner)
        .json(&json!({"given_name": "Bo", "phone": "+15550100100"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("`phone`"));
    // A Viewer cannot find contacts by a field it cannot see.
    let (_, viewer) = app.user_with_role(RoleRef::Builtin(Role::Viewer)).await;
    for query in ["email=ada@example.com", "q=ada"] {
        let (s, body) = get(&app, &viewer, &format!("/v1/contacts?{query}")).await;
        assert_eq!(s, 403, "{query}: {body}");
        assert!(body.contains("field_forbidden"), "{body}");
    }
    let (s, _) = get(&app, &viewer, "/v1/contacts?company=Acme").await;
    assert_eq!(s, 200, "company is readable");
    app.stop().await;
}
