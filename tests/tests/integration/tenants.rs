//! Cross-tenant suite: for every route that takes an id, a caller of organisation B
//! (an Owner: every permission) using organisation A's ids gets exactly the 404 an id
//! that does not exist gets, and nothing of A changes. B's lists hold nothing of A's.

use crm_domain::access::{Role, RoleRef};
use crm_tests::harness::TestApp;
use serde_json::{json, Value};
use uuid::Uuid;

const DOC: &str = include_str!("../../../docs/permissions.md");

/// Status and body without the request id (which differs on every response).
async fn answer(
    app: &TestApp,
    token: &str,
    method: &str,
    path: &str,
    body: &Value,
) -> (u16, Value) {
    let url = app.url(path);
    let rb = match method {
        "GET" => app.http.get(url),
        "POST" => app.http.post(url).json(body),
        "PATCH" => app.http.patch(url).json(body),
        "PUT" => app.http.put(url).json(body),
        other => panic!("{other}"),
    };
    let r = rb.bearer_auth(token).send().await.unwrap();
    let status = r.status().as_u16();
    let mut v: Value = r.json().await.unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.remove("request_id");
    }
    (status, v)
}

#[tokio::test]
async fn another_organisations_ids_are_404_and_learn_nothing() {
    let app = TestApp::spawn().await;
    let (contact, created_at) = app
        .create_contact(&json!({"given_name": "Ada", "email": "ada@a.example.com"}))
        .await;
    let (user, _) = app.user_with_role(RoleRef::Builtin(Role::Team)).await;
    let r = app
        .post(
            "/v1/roles",
            &json!({"name": "Reader", "permissions": ["contacts.read"]}),
        )
        .await;
    let role = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = app
        .post("/v1/api-keys", &json!({"name": "CI", "role": "viewer"}))
        .await;
    let key = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, _, b) = app.another_org("Other Org").await;
    for token in [&app.token, &b] {
        let r = app
            .http
            .put(app.url("/v1/organization/modules"))
            .bearer_auth(token)
            .json(&json!({"modules": ["contacts", "activity", "reports", "portal"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    // Every documented route with an {id}, with a body that would be valid.
    let start = DOC.find("| method | path | permission |").unwrap();
    let routes: Vec<(String, String)> = DOC[start..]
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let c: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            (c[0].to_owned(), c[1].to_owned())
        })
        .filter(|(_, p)| p.contains("{id}"))
        .collect();
    assert!(routes.len() >= 12, "{routes:?}");
    let missing = Uuid::now_v7();
    for (method, path) in &routes {
        // Each body fits its route, so the answer is about the id.
        let (real, body) = if path.ends_with("/portal-access") {
            (contact.to_string(), json!({"email": "m@b.example.com"}))
        } else if path.starts_with("/v1/contacts") {
            (
                contact.to_string(),
                json!({"given_name": "Mallory", "email": "m@b.example.com"}),
            )
        } else if path.starts_with("/v1/users") {
            (user.to_string(), json!({"role": "viewer"}))
        } else if path.starts_with("/v1/roles") {
            (role.clone(), json!({"name": "Stolen"}))
        } else if path.starts_with("/v1/api-keys") {
            (key.clone(), json!({}))
        } else {
            panic!("no id for {path}")
        };
        let path = path.replace("?as_of=…", "?as_of=2100-01-01T00:00:00Z");
        let theirs = answer(&app, &b, method, &path.replace("{id}", &real), &body).await;
        let nobodys = answer(
            &app,
            &b,
            method,
            &path.replace("{id}", &missing.to_string()),
            &body,
        )
        .await;
        assert_eq!(theirs.0, 404, "{method} {path}: {theirs:?}");
        assert_eq!(
            theirs, nobodys,
            "{method} {path}: another org's id reads as no id"
        );
    }

    // Nothing of A changed, and B's lists show nothing of A's. (Once the read model
    // has the contact: B's attempts wrote nothing, so that is all there is to wait for.)
    let v: Value = app
        .get(&format!(
            "/v1/contacts/{contact}?min_position={created_at}&wait_ms=5000"
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (v["given_name"].as_str(), v["archived"].as_bool()),
        (Some("Ada"), Some(false))
    );
    let users: Value = app.get("/v1/users").await.json().await.unwrap();
    let team = users["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["id"] == json!(user))
        .unwrap();
    assert_eq!(
        (team["role"].as_str(), team["active"].as_bool()),
        (Some("team"), Some(true))
    );
    let keys: Value = app.get("/v1/api-keys").await.json().await.unwrap();
    assert!(
        keys["items"][0]["revoked_at"].is_null(),
        "A's key is not revoked: {keys}"
    );
    for path in [
        "/v1/contacts",
        "/v1/users",
        "/v1/roles",
        "/v1/activity",
        "/v1/api-keys",
    ] {
        let (s, body) = answer(&app, &b, "GET", path, &Value::Null).await;
        assert_eq!(s, 200);
        let text = body.to_string();
        for secret in [
            contact.to_string(),
            user.to_string(),
            role.clone(),
            "Ada".into(),
        ] {
            assert!(!text.contains(&secret), "{path} shows A's {secret}: {text}");
        }
    }
    let (_, report) = answer(&app, &b, "GET", "/v1/reports/contacts", &Value::Null).await;
    assert_eq!(report["total"], 0);
    // And B cannot give its users A's custom role.
    let (s, body) = answer(&app, &b, "POST", "/v1/users", &json!({
        "email": "x@b.example.com", "display_name": "X", "role": role, "password": "a long enough password"
    })).await;
    assert_eq!(s, 422, "{body}");
    app.stop().await;
}
