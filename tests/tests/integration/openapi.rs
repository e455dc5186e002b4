//! `/openapi.json`: an OpenAPI 3.1 document that covers every route the service serves
//! (each listed route answers; each route of docs/permissions.md is listed) with its
//! authentication and error responses.

use crm_tests::harness::TestApp;
use serde_json::{json, Value};

const DOC: &str = include_str!("../../../docs/permissions.md");

#[tokio::test]
async fn the_document_covers_every_route_with_auth_and_errors() {
    let app = TestApp::spawn().await;
    let r = app.http.get(app.url("/openapi.json")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let doc: Value = r.json().await.unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().unwrap();

    // Every documented staff route is in it.
    let start = DOC.find("| method | path | permission |").unwrap();
    for line in DOC[start..]
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
    {
        let c: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let path = c[1].split('?').next().unwrap();
        let method = c[0].to_lowercase();
        assert!(
            paths.get(path).and_then(|p| p.get(&method)).is_some(),
            "{method} {path} missing"
        );
        if c[2] != "signed in" {
            let description = paths[path][&method]["description"].as_str().unwrap_or("");
            let first = c[2].split(", ").next().unwrap();
            assert!(
                description.contains(first),
                "{method} {path}: permission {first} not named"
            );
        }
    }

    // Every listed route is served, and says how it fails.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    let mut operations = 0;
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            operations += 1;
            let responses = op["responses"].as_object().unwrap();
            if op.get("security").is_some() {
                assert!(responses.contains_key("401"), "{method} {path}: no 401");
            }
            if path.starts_with("/v1/") || path.starts_with("/portal/") {
                assert!(responses.contains_key("429"), "{method} {path}: no 429");
            }
            if let Some(r) =
                op["requestBody"]["content"]["application/json"]["schema"]["$ref"].as_str()
            {
                let name = r.rsplit('/').next().unwrap();
                assert!(
                    schemas.contains_key(name),
                    "{method} {path}: schema {name} missing"
                );
                assert!(responses.contains_key("422"), "{method} {path}: no 422");
            }
            for (status, resp) in responses {
                if let Some(r) = resp["content"]["application/json"]["schema"]["$ref"].as_str() {
                    let name = r.rsplit('/').next().unwrap();
                    assert!(
                        schemas.contains_key(name),
                        "{method} {path} {status}: {name} missing"
                    );
                }
            }
            let url = app.url(&path.replace("{id}", "00000000-0000-7000-8000-000000000000"));
            let rb = match method.as_str() {
                "get" => app.http.get(url),
                "post" => app.http.post(url).json(&json!({})),
                "put" => app.http.put(url).json(&json!({})),
                "patch" => app.http.patch(url).json(&json!({})),
                "delete" => app.http.delete(url),
                other => panic!("{other}"),
            };
            let r = rb.send().await.unwrap();
            let status = r.status().as_u16();
            let body = r.text().await.unwrap();
            assert!(
                !(status == 404 && body.contains("no such route")) && status != 405,
                "{method} {path} is not served: {status} {body}"
            );
        }
    }
    assert!(operations >= 40, "{operations}");
    // Request schemas come from the handlers' types.
    let contact = &schemas["ContactInput"]["properties"];
    for field in [
        "given_name",
        "email",
        "address",
        "custom",
        "expected_version",
    ] {
        assert!(
            contact.get(field).is_some(),
            "ContactInput.{field}: {contact}"
        );
    }
    app.stop().await;
}
