//! The permission matrix, walked: every documented route with every built-in role, and
//! module gating. The expectations come from docs/permissions.md, not from the code.

use std::collections::HashMap;

use crm_domain::access::{Role, RoleRef};
use crm_tests::harness::TestApp;
use serde_json::{json, Value};

const DOC: &str = include_str!("../../../docs/permissions.md");

/// (permission → roles that hold it) from the documented matrix.
fn documented_grants() -> HashMap<String, Vec<String>> {
    let mut roles: Vec<String> = Vec::new();
    let mut out = HashMap::new();
    for line in DOC.lines() {
        let cells: Vec<String> = line
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_owned())
            .collect();
        if line.starts_with("| permission | sensitive |") {
            roles = cells[2..].to_vec();
        } else if line.starts_with("| `") && !roles.is_empty() && cells.len() == roles.len() + 2 {
            let holders = roles
                .iter()
                .zip(&cells[2..])
                .filter(|(_, c)| *c == "✓")
                .map(|(r, _)| r.clone())
                .collect();
            out.insert(cells[0].trim_matches('`').to_owned(), holders);
        }
    }
    out
}

/// (method, path, permission) from the documented route table.
fn documented_routes() -> Vec<(String, String, String)> {
    let start = DOC
        .find("| method | path | permission |")
        .expect("route table");
    DOC[start..]
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let c: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            (c[0].to_owned(), c[1].to_owned(), c[2].to_owned())
        })
        .collect()
}

async fn call(app: &TestApp, token: &str, method: &str, path: &str) -> (u16, Value) {
    let url = app.url(path);
    let rb = match method {
        "GET" => app.http.get(url),
        "POST" => app.http.post(url),
        "PATCH" => app.http.patch(url),
        "PUT" => app.http.put(url),
        other => panic!("method {other}"),
    };
    let r = rb.bearer_auth(token).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn every_route_with_every_role() {
    let app = TestApp::spawn().await;
    let grants = documented_grants();
    let mut routes = documented_routes();
    assert!(routes.len() >= 20, "{routes:?}");
    // Logging out ends the token; walk it last.
    routes.sort_by_key(|(_, p, _)| p == "/v1/auth/logout");
    // Every module on: this test is about permissions.
    let r = app
        .http
        .put(app.url("/v1/organization/modules"))
        .bearer_auth(&app.token)
        .json(&json!({"modules": ["contacts", "activity", "reports", "portal"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (contact, _) = app
        .create_contact(&json!({"given_name": "Ada", "email": "ada@example.com"}))
        .await;
    let (target, _) = app.user_with_role(RoleRef::Builtin(Role::Viewer)).await;
    let r = app
        .post(
            "/v1/roles",
            &json!({"name": "Reader", "permissions": ["contacts.read"]}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let role_id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = app
        .post("/v1/api-keys", &json!({"name": "CI", "role": "viewer"}))
        .await;
    assert_eq!(r.status(), 201);
    let key_id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut checked = 0;
    for role in Role::ALL {
        let (_, token) = app.user_with_role(RoleRef::Builtin(role)).await;
        for (method, path, permission) in &routes {
            let path = path
                .replace("/v1/contacts/{id}", &format!("/v1/contacts/{contact}"))
                .replace("/v1/users/{id}", &format!("/v1/users/{target}"))
                .replace("/v1/roles/{id}", &format!("/v1/roles/{role_id}"))
                .replace("/v1/api-keys/{id}", &format!("/v1/api-keys/{key_id}"))
                .replace("?as_of=…", "?as_of=2100-01-01T00:00:00Z");
            let (status, body) = call(&app, &token, method, &path).await;
            let context = format!(
                "{} {method} {path} (needs {permission}): {status} {body}",
                role.name()
            );
            assert_ne!(status, 401, "{context}");
            if permission == "signed in" {
                assert_ne!(status, 403, "{context}");
            } else {
                let needed: Vec<&str> = permission.split(", ").collect();
                let holds = |p: &str| {
                    grants
                        .get(p)
                        .unwrap_or_else(|| panic!("{p} is not in the matrix"))
                        .iter()
                        .any(|r| r == role.name())
                };
                if needed.iter().all(|p| holds(p)) {
                    assert_ne!(body["code"], "permission_denied", "{context}");
                    assert_ne!(status, 403, "{context}");
                } else {
                    assert_eq!(status, 403, "{context}");
                    assert_eq!(body["code"], "permission_denied", "{context}");
                    let message = body["message"].as_str().unwrap();
                    assert!(
                        needed
                            .iter()
                            .any(|p| !holds(p) && message.contains(&format!("`{p}`"))),
                        "the message names a missing permission: {context}"
                    );
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, routes.len() * Role::ALL.len());
    app.stop().await;
}

#[tokio::test]
async fn an_inactive_module_is_403_naming_it() {
    let app = TestApp::spawn().await;
    let r = app
        .http
        .put(app.url("/v1/organization/modules"))
        .bearer_auth(&app.token)
        .json(&json!({"modules": ["activity"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app.get("/v1/contacts").await;
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "module_inactive");
    assert!(
        body["message"].as_str().unwrap().contains("`contacts`"),
        "{body}"
    );
    let r = app
        .post("/v1/contacts", &json!({"given_name": "Ada"}))
        .await;
    assert_eq!(r.status(), 403);
    assert_eq!(app.get("/v1/activity").await.status(), 200);
    // Core stays on: the module can be switched back on.
    let me: Value = app.get("/v1/me").await.json().await.unwrap();
    assert_eq!(me["modules"], json!(["core", "activity"]));
    let r = app
        .http
        .put(app.url("/v1/organization/modules"))
        .bearer_auth(&app.token)
        .json(&json!({"modules": ["contacts", "nonsense"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422, "an unknown module is named");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["fields"][0]["field"], "modules.nonsense");
    let r = app
        .http
        .put(app.url("/v1/organization/modules"))
        .bearer_auth(&app.token)
        .json(&json!({"modules": ["contacts"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(app.get("/v1/contacts").await.status(), 200);
    assert_eq!(app.get("/v1/activity").await.status(), 403);
    app.stop().await;
}
