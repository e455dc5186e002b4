//! The API's contract at its edges, pinned for the defects found in review: a NUL in a
//! body or a query is a 4xx naming the field (never a 500), a wrong JSON type names
//! its field, `expected_version` does not reveal whether a contact exists, a 413 does
//! not leave a keep-alive connection unusable, every response carries `X-Request-Id`,
//! and a request is logged once.

use std::time::Duration;

use crm_tests::harness::{Options, TestApp};
use reqwest::header::HeaderValue;
use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use uuid::Uuid;

/// The status, the `x-request-id` header and the body (JSON, or its text as a string).
async fn answer(r: reqwest::Response) -> (u16, Option<String>, Value) {
    let status = r.status().as_u16();
    let rid = r
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, rid, body)
}

/// Checks the status, the error code, a message and the request id (header and body
/// alike); returns the body.
async fn error_of(
    r: reqwest::Response,
    status: u16,
    code: &str,
    what: &str,
) -> Result<Value, String> {
    let (got, rid, v) = answer(r).await;
    if got != status || v["code"] != code {
        return Err(format!("{what}: expected {status} {code}, got {got} {v}"));
    }
    if v["message"].as_str().is_none_or(str::is_empty) {
        return Err(format!("{what}: no message: {v}"));
    }
    match rid {
        None => Err(format!("{what}: no x-request-id header")),
        Some(rid) if v["request_id"] != rid.as_str() => {
            Err(format!("{what}: header id {rid} but body {v}"))
        }
        Some(_) => Ok(v),
    }
}

/// Asserts what [`error_of`] checks.
async fn expect_error(r: reqwest::Response, status: u16, code: &str, what: &str) -> Value {
    error_of(r, status, code, what)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The names in the error's `fields`, each with a message.
fn field_names(v: &Value, what: &str) -> Result<Vec<String>, String> {
    let Some(fields) = v["fields"].as_array() else {
        return Err(format!("{what}: no `fields` array: {v}"));
    };
    fields
        .iter()
        .map(|f| match (f["field"].as_str(), f["message"].as_str()) {
            (Some(name), Some(m)) if !m.is_empty() => Ok(name.to_owned()),
            _ => Err(format!(
                "{what}: a field error needs a name and a message: {v}"
            )),
        })
        .collect()
}

/// `fields` names `field` (or, for a name ending in `.`, a field under it).
fn names_field(v: &Value, field: &str, what: &str) -> Result<(), String> {
    let names = field_names(v, what)?;
    let found = names.iter().any(|n| {
        if field.ends_with('.') {
            n.starts_with(field)
        } else {
            n == field
        }
    });
    if found {
        Ok(())
    } else {
        Err(format!("{what}: `fields` does not name {field}: {v}"))
    }
}

/// Fails with every problem found (a case per line), so one run shows them all.
fn report(problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// `body` with every NUL replaced by `x`: the control request of a NUL case.
fn without_nul(body: &Value) -> Value {
    serde_json::from_str(&body.to_string().replace("\\u0000", "x")).unwrap()
}

/// The number of contact events stored (refused requests write none).
async fn contact_events(app: &TestApp) -> i64 {
    app.db()
        .await
        .query_one(
            "SELECT count(*) FROM events WHERE aggregate_type = 'contact'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

// ---------------------------------------------------------------------------------------
// 1. NUL characters

/// A NUL in any string of a sign-in or reset body (no login needed) is 422
/// `validation_failed` naming the field; the same body without the NUL gets the
/// route's ordinary answer (so the shapes are right and only the NUL is refused).
#[tokio::test]
async fn a_nul_in_an_auth_body_is_422_naming_the_field() {
    let app = TestApp::spawn().await;
    let org = app.org_id.to_string();
    let pw = "a long enough password 123";
    let cases: Vec<(&str, Value, &str, u16)> = vec![
        (
            "/v1/auth/login",
            json!({"email": "a\u{0}b@example.com", "password": pw}),
            "email",
            401,
        ),
        (
            "/v1/auth/login",
            json!({"email": "nobody@example.com", "password": "pass\u{0}word"}),
            "password",
            401,
        ),
        (
            "/v1/auth/login",
            json!({"email": "nobody@example.com", "password": pw, "code": "123\u{0}456"}),
            "code",
            401,
        ),
        (
            "/v1/auth/password-reset",
            json!({"email": "\u{0}@example.com"}),
            "email",
            202,
        ),
        (
            "/v1/auth/password-reset/confirm",
            json!({"token": "tok\u{0}en", "new_password": pw}),
            "token",
            401,
        ),
        (
            "/v1/auth/password-reset/confirm",
            json!({"token": "token", "new_password": "a long enough\u{0}password"}),
            "new_password",
            401,
        ),
        (
            "/portal/auth/login",
            json!({"org_id": org, "email": "a\u{0}b@example.com", "password": pw}),
            "email",
            401,
        ),
        (
            "/portal/auth/login",
            json!({"org_id": org, "email": "c@example.com", "password": "\u{0}"}),
            "password",
            401,
        ),
        (
            "/portal/auth/magic-link",
            json!({"org_id": org, "email": "c\u{0}@example.com"}),
            "email",
            202,
        ),
        (
            "/portal/auth/magic-link/redeem",
            json!({"token": "\u{0}token"}),
            "token",
            401,
        ),
        (
            "/portal/auth/password-reset",
            json!({"org_id": org, "email": "c@example.com\u{0}"}),
            "email",
            202,
        ),
        (
            "/portal/auth/password-reset/confirm",
            json!({"token": "tok\u{0}", "new_password": pw}),
            "token",
            401,
        ),
    ];
    let anonymous = reqwest::Client::new();
    let mut problems = Vec::new();
    let mut controlled = std::collections::HashSet::new();
    for (path, body, field, control_status) in &cases {
        let what = format!("POST {path} {body}");
        let r = anonymous
            .post(app.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        let checked = match error_of(r, 422, "validation_failed", &what).await {
            Ok(v) => names_field(&v, field, &what),
            Err(e) => Err(e),
        };
        problems.extend(checked.err());

        // One control per route (a login costs a bcrypt check, a reset confirmation a
        // bcrypt hash).
        if !controlled.insert(*path) {
            continue;
        }
        let control = without_nul(body);
        let r = anonymous
            .post(app.url(path))
            .json(&control)
            .send()
            .await
            .unwrap();
        let (status, _, v) = answer(r).await;
        if status != *control_status {
            problems.push(format!(
                "control POST {path} {control}: expected {control_status}, got {status} {v}"
            ));
        }
    }
    app.stop().await;
    report(&problems);
}

/// A NUL in a query filter is 400 `invalid_query` naming the parameter.
#[tokio::test]
async fn a_nul_in_a_query_filter_is_400_naming_the_parameter() {
    let app = TestApp::spawn().await;
    let mut problems = Vec::new();
    for (path, param) in [
        ("/v1/contacts", "q"),
        ("/v1/contacts", "email"),
        ("/v1/contacts", "company"),
        ("/v1/activity", "action"),
        ("/v1/activity", "entity_type"),
        ("/v1/activity", "entity_id"),
        ("/v1/activity", "actor_id"),
    ] {
        for value in ["%00", "a%00b", "x%00%00"] {
            let url = format!("{path}?limit=10&{param}={value}");
            let checked = match error_of(app.get(&url).await, 400, "invalid_query", &url).await {
                Ok(v) => names_field(&v, param, &url),
                Err(e) => Err(e),
            };
            problems.extend(checked.err());
        }
        // Control: the parameter itself is accepted.
        let url = format!("{path}?limit=10&{param}=ab");
        let (status, _, v) = answer(app.get(&url).await).await;
        if status != 200 {
            problems.push(format!("control {url}: expected 200, got {status} {v}"));
        }
    }
    app.stop().await;
    report(&problems);
}

/// In a contact body, a NUL is 422 naming the field by its path, nested ones and custom
/// keys and values included; nothing is written.
#[tokio::test]
async fn a_nul_in_a_contact_body_is_422_naming_the_path() {
    let app = TestApp::spawn().await;
    let (id, _) = app.create_contact(&json!({"given_name": "Ada"})).await;
    let before = contact_events(&app).await;
    let patch = format!("/v1/contacts/{id}");
    let cases: Vec<(bool, Value, &str)> = vec![
        (true, json!({"given_name": "A\u{0}da"}), "given_name"),
        (
            true,
            json!({"given_name": "Ada", "email": "ada\u{0}@example.com"}),
            "email",
        ),
        (
            true,
            json!({"given_name": "Ada", "address": {"city": "Pa\u{0}ris"}}),
            "address.city",
        ),
        (
            true,
            json!({"given_name": "Ada", "custom": {"note": "a\u{0}b"}}),
            "custom.note",
        ),
        (
            true,
            json!({"given_name": "Ada", "custom": {"no\u{0}te": "fine"}}),
            "custom.",
        ),
        (false, json!({"family_name": "\u{0}"}), "family_name"),
        (
            false,
            json!({"address": {"line1": "1 Main St", "city": "\u{0}"}}),
            "address.city",
        ),
        (false, json!({"custom": {"k\u{0}": 1}}), "custom."),
    ];
    let mut problems = Vec::new();
    for (create, body, field) in &cases {
        let (what, r) = if *create {
            (
                format!("POST /v1/contacts {body}"),
                app.post("/v1/contacts", body).await,
            )
        } else {
            (format!("PATCH {body}"), app.patch(&patch, body).await)
        };
        let checked = match error_of(r, 422, "validation_failed", &what).await {
            Ok(v) => names_field(&v, field, &what),
            Err(e) => Err(e),
        };
        problems.extend(checked.err());
    }
    let after = contact_events(&app).await;
    app.stop().await;
    report(&problems);
    assert_eq!(after, before, "nothing was written");
}

/// Odd `User-Agent` and `X-Request-Id` values are never a 500: tabs and bytes outside
/// ASCII (what a client library lets through), and NUL and other control characters
/// (sent over a raw connection).
#[tokio::test]
async fn control_characters_in_headers_are_not_a_5xx() {
    let app = TestApp::spawn().await;
    let values: [&[u8]; 4] = [
        b"agent\twith\ttabs",
        b"agent \xff\xfe\x80 not utf-8",
        "agent \u{85}\u{9b}31m \u{2028} C1 and separators".as_bytes(),
        b"\t",
    ];
    for raw in values {
        for header in ["user-agent", "x-request-id"] {
            let what = format!("{header}: {:?}", String::from_utf8_lossy(raw));
            let r = app
                .http
                .post(app.url("/v1/contacts"))
                .bearer_auth(&app.token)
                .header(header, HeaderValue::from_bytes(raw).unwrap())
                .json(&json!({"given_name": "Ua"}))
                .send()
                .await
                .unwrap();
            let (status, rid, v) = answer(r).await;
            assert_eq!(status, 201, "{what}: {v}");
            let rid = rid.unwrap_or_else(|| panic!("{what}: no x-request-id"));
            assert!(
                !rid.is_empty() && rid.as_bytes() != raw,
                "{what}: an id that is not plain is replaced: {rid:?}"
            );
        }
    }

    // NUL and other control characters cannot be sent by reqwest: raw HTTP/1.1.
    let token = app.token.clone();
    for (header, value) in [
        ("X-Request-Id", &b"abc\x00123"[..]),
        ("User-Agent", &b"evil\x00agent"[..]),
        ("User-Agent", &b"a\x01b\x1b[31m\x7fc"[..]),
        ("X-Request-Id", &b"\x00"[..]),
    ] {
        for (method, path, body) in [
            ("GET", "/healthz", ""),
            ("POST", "/v1/contacts", r#"{"given_name": "Raw"}"#),
        ] {
            let mut req = format!(
                "{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
                 Content-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n",
                host = authority(&app),
                len = body.len()
            )
            .into_bytes();
            req.extend_from_slice(header.as_bytes());
            req.extend_from_slice(b": ");
            req.extend_from_slice(value);
            req.extend_from_slice(b"\r\n\r\n");
            req.extend_from_slice(body.as_bytes());
            let what = format!(
                "raw {method} {path} {header}: {:?}",
                String::from_utf8_lossy(value)
            );
            let stream = TcpStream::connect(authority(&app)).await.unwrap();
            let (read, mut write) = stream.into_split();
            write.write_all(&req).await.unwrap();
            let mut read = BufReader::new(read);
            let resp = within(&what, read_response(&mut read))
                .await
                .unwrap_or_else(|e| panic!("{what}: no answer: {e}"));
            assert!(
                resp.status < 500,
                "{what}: {} {}",
                resp.status,
                String::from_utf8_lossy(&resp.body)
            );
        }
    }
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// 2. Wrong JSON types

/// A 400 `invalid_body` whose `fields[0].field` is `field`, and whose message still says
/// what serde found wrong.
async fn first_field_is(r: reqwest::Response, field: &str, what: &str) -> Result<(), String> {
    let v = error_of(r, 400, "invalid_body", what).await?;
    let names = field_names(&v, what)?;
    if names.first().map(String::as_str) != Some(field) {
        return Err(format!("{what}: fields[0].field is not {field}: {v}"));
    }
    if !v["message"].as_str().unwrap_or("").contains("invalid type") {
        return Err(format!("{what}: the message says `invalid type`: {v}"));
    }
    Ok(())
}

/// A wrong type is 400 `invalid_body` whose `fields` names the field by its path.
#[tokio::test]
async fn a_wrong_json_type_is_400_naming_the_field() {
    let app = TestApp::spawn().await;
    let (id, _) = app.create_contact(&json!({"given_name": "Ada"})).await;
    let before = contact_events(&app).await;
    let patch = format!("/v1/contacts/{id}");
    let mut problems = Vec::new();
    for (body, field) in [
        (json!({"given_name": 5}), "given_name"),
        (json!({"given_name": "Ada", "email": true}), "email"),
        (json!({"address": {"city": 5}}), "address.city"),
        (
            json!({"given_name": "Ada", "address": {"line1": "1 Main St", "country": ["FR"]}}),
            "address.country",
        ),
    ] {
        for (what, r) in [
            (
                format!("POST /v1/contacts {body}"),
                app.post("/v1/contacts", &body).await,
            ),
            (format!("PATCH {body}"), app.patch(&patch, &body).await),
        ] {
            problems.extend(first_field_is(r, field, &what).await.err());
        }
    }
    let r = app
        .patch(&patch, &json!({"title": "Dr", "expected_version": "1"}))
        .await;
    let what = "PATCH expected_version as a string";
    problems.extend(first_field_is(r, "expected_version", what).await.err());
    let after = contact_events(&app).await;
    app.stop().await;
    report(&problems);
    assert_eq!(after, before, "nothing was written");
}

// ---------------------------------------------------------------------------------------
// 3. expected_version on a contact the caller cannot see

/// The answer without `request_id` (it differs per request).
fn without_request_id(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("request_id");
    }
    v
}

/// `expected_version` on a missing contact, or on another organisation's, is the same
/// 404 as without it: it must not tell "exists, other version" from "not yours".
#[tokio::test]
async fn expected_version_on_a_missing_or_foreign_contact_is_the_same_404() {
    let app = TestApp::spawn().await;
    let (_, _, other_token) = app.another_org("Elsewhere").await;
    let r = app
        .http
        .post(app.url("/v1/contacts"))
        .bearer_auth(&other_token)
        .json(&json!({"given_name": "Theirs"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let foreign = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ghost = Uuid::now_v7().to_string();

    let reference = {
        let r = app
            .patch(&format!("/v1/contacts/{ghost}"), &json!({"title": "Dr"}))
            .await;
        without_request_id(expect_error(r, 404, "not_found", "missing, no version").await)
    };
    let mut problems = Vec::new();
    for (name, id) in [("missing", &ghost), ("foreign", &foreign)] {
        for body in [
            json!({"title": "Dr"}),
            json!({"title": "Dr", "expected_version": 1}),
            json!({"title": "Dr", "expected_version": 2}),
            json!({"title": "Dr", "expected_version": 999}),
        ] {
            let what = format!("PATCH {name} contact {body}");
            let r = app.patch(&format!("/v1/contacts/{id}"), &body).await;
            match error_of(r, 404, "not_found", &what)
                .await
                .map(without_request_id)
            {
                Ok(v) if v == reference => {}
                Ok(v) => problems.push(format!(
                    "{what}: not the answer without a version ({reference}): {v}"
                )),
                Err(e) => problems.push(e),
            }
        }
    }
    // The other organisation's contact was not touched.
    let history: Value = app
        .http
        .get(app.url(&format!("/v1/contacts/{foreign}/history")))
        .bearer_auth(&other_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        history["events"].as_array().map(Vec::len),
        Some(1),
        "the foreign contact has only its creation: {history}"
    );

    // Control: on one's own contact, the version is still checked.
    let (own, _) = app.create_contact(&json!({"given_name": "Ours"})).await;
    let path = format!("/v1/contacts/{own}");
    let r = app
        .patch(&path, &json!({"title": "Dr", "expected_version": 2}))
        .await;
    expect_error(r, 409, "version_conflict", "own contact, stale version").await;
    let r = app
        .patch(&path, &json!({"title": "Dr", "expected_version": 1}))
        .await;
    assert_eq!(r.status(), 200, "own contact, right version");
    app.stop().await;
    report(&problems);
}

// ---------------------------------------------------------------------------------------
// 4. 413 on a keep-alive connection

fn authority(app: &TestApp) -> String {
    app.base.trim_start_matches("http://").to_owned()
}

/// A response read off a raw connection.
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }
}

async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<String> {
    let mut buf = Vec::new();
    let n = r.read_until(b'\n', &mut buf).await?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the connection was closed",
        ));
    }
    Ok(String::from_utf8_lossy(&buf).trim_end().to_owned())
}

/// Reads one HTTP/1.1 response (Content-Length or chunked body).
async fn read_response<R: AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<RawResponse> {
    let status_line = read_line(r).await?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not a status line: {status_line:?}"),
            )
        })?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(r).await?;
        if line.is_empty() {
            break;
        }
        if let Some((n, v)) = line.split_once(':') {
            headers.push((n.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let mut resp = RawResponse {
        status,
        headers,
        body: Vec::new(),
    };
    if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        loop {
            let size_line = read_line(r).await?;
            let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            if size == 0 {
                while !read_line(r).await?.is_empty() {}
                break;
            }
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk).await?;
            chunk.truncate(size);
            resp.body.extend_from_slice(&chunk);
        }
    } else if let Some(len) = resp.header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let mut body = vec![0; len];
        r.read_exact(&mut body).await?;
        resp.body = body;
    }
    Ok(resp)
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within 10 s"))
}

/// After a 413 on a keep-alive connection, either the 413 says `Connection: close` or
/// the connection still serves the next request. Both with a declared Content-Length
/// and with a chunked body.
#[tokio::test]
async fn after_a_413_the_connection_is_closed_or_still_usable() {
    let app = TestApp::spawn().await;
    let limit = app.settings.http.max_body_bytes as usize;
    let json_body = format!(
        "{{\"given_name\": \"A\", \"title\": \"{}\"}}",
        "x".repeat(limit + 16 * 1024)
    );
    let head = |framing: &str| {
        format!(
            "POST /v1/contacts HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\n{framing}\r\n",
            authority(&app),
            app.token
        )
    };
    let by_length = {
        let mut r = head(&format!("Content-Length: {}\r\n", json_body.len())).into_bytes();
        r.extend_from_slice(json_body.as_bytes());
        r
    };
    let chunked = {
        let mut r = head("Transfer-Encoding: chunked\r\n").into_bytes();
        for part in json_body.as_bytes().chunks(4096) {
            r.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            r.extend_from_slice(part);
            r.extend_from_slice(b"\r\n");
        }
        r.extend_from_slice(b"0\r\n\r\n");
        r
    };
    let mut problems = Vec::new();
    for (variant, request) in [("content-length", by_length), ("chunked", chunked)] {
        problems.extend(next_request_after_413(&app, variant, request).await.err());
    }
    app.stop().await;
    report(&problems);
}

/// Sends the oversized `request` on a new connection and reads the 413; unless it says
/// `Connection: close`, sends `GET /healthz` on the same connection and reads a 200.
async fn next_request_after_413(
    app: &TestApp,
    variant: &str,
    request: Vec<u8>,
) -> Result<(), String> {
    let stream = TcpStream::connect(authority(app)).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    // Written beside the reading: the server may answer before it has read the body.
    let writer = tokio::spawn(async move {
        let sent = write.write_all(&request).await;
        (write, sent)
    });
    let first = within(variant, read_response(&mut read))
        .await
        .map_err(|e| format!("{variant}: no 413 read: {e}"))?;
    let body: Value = serde_json::from_slice(&first.body).unwrap_or(Value::Null);
    if first.status != 413 || body["code"] != "payload_too_large" {
        return Err(format!(
            "{variant}: expected 413 payload_too_large, got {} {}",
            first.status,
            String::from_utf8_lossy(&first.body)
        ));
    }
    if first.closes() {
        return Ok(());
    }
    // Kept alive: the whole oversized request must be consumed, and the next request on
    // the connection answered.
    let Ok(joined) = tokio::time::timeout(Duration::from_secs(10), writer).await else {
        return Err(format!(
            "{variant}: the 413 kept the connection open (no `Connection: close`) but the \
             server stopped reading the request body"
        ));
    };
    let (mut write, sent) = joined.unwrap();
    if let Err(e) = sent {
        return Err(format!(
            "{variant}: the 413 did not say `Connection: close`, but the server dropped the \
             connection while the body was sent: {e}"
        ));
    }
    let next = format!(
        "GET /healthz HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        authority(app)
    );
    let written = write.write_all(next.as_bytes()).await;
    let second = within(variant, read_response(&mut read)).await;
    match (written, second) {
        (Ok(()), Ok(resp)) if resp.status == 200 => Ok(()),
        (Ok(()), Ok(resp)) => Err(format!(
            "{variant}: the next request on the connection: {} {}",
            resp.status,
            String::from_utf8_lossy(&resp.body)
        )),
        (w, r) => Err(format!(
            "{variant}: the 413 did not say `Connection: close`, yet the next request on \
             the connection failed (write {w:?}, read {:?})",
            r.err()
        )),
    }
}

// ---------------------------------------------------------------------------------------
// 5. X-Request-Id on every response

/// Every response carries `X-Request-Id`: the client's own when it sent a plain one,
/// a fresh one otherwise; on errors, the body's `request_id` is the same.
#[tokio::test]
async fn every_response_carries_x_request_id() {
    let app = TestApp::spawn().await;
    let anonymous = reqwest::Client::new();
    let cases: Vec<(&str, reqwest::Method, &str, bool)> = vec![
        ("healthz", reqwest::Method::GET, "/healthz", false),
        ("readyz", reqwest::Method::GET, "/readyz", false),
        ("metrics", reqwest::Method::GET, "/metrics", false),
        ("openapi", reqwest::Method::GET, "/openapi.json", false),
        (
            "unknown route",
            reqwest::Method::GET,
            "/no-such-route",
            false,
        ),
        (
            "unknown /v1 route",
            reqwest::Method::GET,
            "/v1/no-such-route",
            true,
        ),
        ("wrong method", reqwest::Method::PUT, "/healthz", false),
    ];
    let mut problems = Vec::new();
    for (what, method, path, authed) in &cases {
        let send = |rid: Option<&str>| {
            let mut rb = anonymous.request(method.clone(), app.url(path));
            if *authed {
                rb = rb.bearer_auth(&app.token);
            }
            if let Some(rid) = rid {
                rb = rb.header("x-request-id", rid);
            }
            rb.send()
        };
        for own in ["abc-123", "req.42_x:y"] {
            let (status, rid, body) = answer(send(Some(own)).await.unwrap()).await;
            if status >= 500 {
                problems.push(format!("{what}: {status} {body}"));
            }
            if rid.as_deref() != Some(own) {
                problems.push(format!(
                    "{what} ({status}): x-request-id {rid:?}, not the client's {own}"
                ));
            }
            if status >= 400 && body["request_id"] != own {
                problems.push(format!(
                    "{what}: the body's request_id is not {own}: {body}"
                ));
            }
        }
        // Without one (and with one that is not plain): a fresh id per request.
        let mut seen = Vec::new();
        for sent in [None, None, Some("not plain!")] {
            let (status, rid, body) = answer(send(sent).await.unwrap()).await;
            match rid {
                Some(rid) if !rid.is_empty() && Some(rid.as_str()) != sent => {
                    if status >= 400 && body["request_id"] != rid.as_str() {
                        problems.push(format!("{what}: header id {rid}, body {body}"));
                    }
                    seen.push(rid);
                }
                other => problems.push(format!(
                    "{what} ({status}), sent {sent:?}: x-request-id {other:?}, not a fresh id"
                )),
            }
        }
        seen.sort();
        seen.dedup();
        if seen.len() != 3 && !problems.iter().any(|p| p.starts_with(what)) {
            problems.push(format!("{what}: the same id twice: {seen:?}"));
        }
    }
    app.stop().await;
    report(&problems);
}

// ---------------------------------------------------------------------------------------
// 6. One log line per request

const LOG_PROBE_ENV: &str = "CRM_CONTRACT_LOG_PROBE";
const LOG_MARK: &str = "CRM-CONTRACT-LOG-MARK";
/// The probe's requests: request id, method, path.
const LOG_PROBES: [(&str, &str, &str); 2] = [
    ("log-probe-create", "POST", "/v1/contacts"),
    ("log-probe-list", "GET", "/v1/contacts"),
];

/// Run by [`one_request_logs_one_info_line`] in a process of its own, with JSON logs on
/// stdout: makes each probe request between two marker lines.
#[tokio::test]
#[ignore = "a helper: run by one_request_logs_one_info_line in its own process"]
async fn request_log_probe() {
    if std::env::var_os(LOG_PROBE_ENV).is_none() {
        return;
    }
    let app = TestApp::spawn_with(Options {
        run_relay: false,
        run_projectors: false,
        ..Default::default()
    })
    .await;
    // Whatever starts lazily logs before the first marker.
    let _ = app.get("/v1/contacts").await.bytes().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (rid, method, path) in LOG_PROBES {
        println!("{LOG_MARK} begin {rid}");
        let rb = match method {
            "POST" => app
                .http
                .post(app.url(path))
                .json(&json!({"given_name": "Logged"})),
            _ => app.http.get(app.url(path)),
        };
        let r = rb
            .bearer_auth(&app.token)
            .header("x-request-id", rid)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let _ = r.bytes().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        println!("{LOG_MARK} end {rid} {status}");
    }
    app.stop().await;
}

/// Every (key, value) of a JSON log line: its fields and its spans' fields.
fn log_fields(line: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut add = |o: &Value| {
        if let Some(o) = o.as_object() {
            out.extend(o.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
    };
    add(&line["fields"]);
    add(&line["span"]);
    if let Some(spans) = line["spans"].as_array() {
        spans.iter().for_each(&mut add);
    }
    out
}

/// One request logs one line at info level, with its method, route, status, latency
/// and request id (`CRM_LOG=info`, `CRM_LOG_FORMAT=json`). The service runs in a child
/// process (this test binary, running [`request_log_probe`]) so that its log is its own.
#[test]
fn one_request_logs_one_info_line() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "contract::request_log_probe",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CRM_LOG", "info,tokio_postgres=warn,async_nats=warn")
        .env("CRM_LOG_FORMAT", "json")
        .env(LOG_PROBE_ENV, "1")
        .output()
        .expect("run the log probe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the probe failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut problems = Vec::new();
    for (rid, method, path) in LOG_PROBES {
        problems.extend(one_info_line(&stdout, rid, method, path).err());
    }
    report(&problems);
}

/// Checks the log lines between the probe's markers for request `rid`.
fn one_info_line(stdout: &str, rid: &str, method: &str, path: &str) -> Result<(), String> {
    let what = format!("{method} {path}");
    let begin = format!("{LOG_MARK} begin {rid}");
    let end = format!("{LOG_MARK} end {rid} ");
    let status: u16 = stdout
        .lines()
        .find_map(|l| l.strip_prefix(&end))
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| format!("{what}: no end marker in\n{stdout}"))?;
    if !(200..300).contains(&status) {
        return Err(format!("{what}: the probe request failed: {status}"));
    }
    let lines: Vec<&str> = stdout
        .lines()
        .skip_while(|l| *l != begin)
        .skip(1)
        .take_while(|l| !l.starts_with(&end))
        .collect();
    let info: Vec<Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["level"] == "INFO")
        .collect();
    let [line] = info.as_slice() else {
        return Err(format!(
            "{what}: {} info lines for one request, not 1:\n{}",
            info.len(),
            lines.join("\n")
        ));
    };
    let fields = log_fields(line);
    let has = |pred: &dyn Fn(&str, &Value) -> bool| fields.iter().any(|(k, v)| pred(k, v));
    let mut missing = Vec::new();
    if !has(&|_, v| v == rid) {
        missing.push("the request id");
    }
    if !has(&|_, v| {
        v.as_str()
            .is_some_and(|s| s == method || s.starts_with(&format!("{method} ")))
    }) {
        missing.push("the method");
    }
    if !has(&|_, v| v.as_str().is_some_and(|s| s.contains(path))) {
        missing.push("the route");
    }
    if !has(&|k, v| {
        k.contains("status")
            && (v.as_u64() == Some(status.into()) || v.as_str() == Some(&status.to_string()))
    }) {
        missing.push("the status");
    }
    if !has(&|k, _| {
        ["latency", "elapsed", "duration"]
            .iter()
            .any(|w| k.contains(w))
    }) {
        missing.push("the latency");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{what}: the line lacks {}: {line}",
            missing.join(", ")
        ))
    }
}

/// Custom numbers at the ends of the f64 range come back as they were sent: PostgreSQL's
/// jsonb writes them out in full (309 digits for 1.8e308), and reading that back must
/// not overflow (found by the schema fuzzer: the read answered by dropping the
/// connection).
#[tokio::test]
async fn extreme_custom_numbers_read_back_as_sent() {
    let app = TestApp::spawn().await;
    let custom = serde_json::json!({
        "big": 1.797_693_134_862_315_7e308,
        "small": -1.797_693_134_862_315_7e308,
        "tiny": 5e-324,
        "third": 0.1 + 0.2,
    });
    let (id, position) = app
        .create_contact(&serde_json::json!({"given_name": "Extreme", "custom": custom}))
        .await;
    let r = app
        .get(&format!("/v1/contacts/{id}?min_position={position}"))
        .await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["custom"], custom, "{v}");
    let r = app.get("/v1/contacts?q=Extreme").await;
    assert_eq!(r.status(), 200);
    let page: serde_json::Value = r.json().await.unwrap();
    assert_eq!(page["items"][0]["custom"], custom);
}

/// An optional body is either absent or JSON: white space alone is not "no body"
/// (a schemathesis find: `' '` was taken as an empty grant).
#[tokio::test]
async fn an_optional_body_of_white_space_is_not_an_absent_one() {
    let app = TestApp::spawn().await;
    let r = app
        .http
        .put(app.url("/v1/organization/modules"))
        .bearer_auth(&app.token)
        .json(&serde_json::json!({"modules": ["contacts", "activity", "reports", "portal"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (id, _) = app
        .create_contact(&serde_json::json!({"given_name": "Ada", "email": "ada@example.com"}))
        .await;
    let url = app.url(&format!("/v1/contacts/{id}/portal-access"));
    let r = app
        .http
        .post(&url)
        .bearer_auth(&app.token)
        .header("content-type", "application/json")
        .body(" ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["code"], "invalid_json", "{v}");
    let r = app
        .http
        .post(&url)
        .bearer_auth(&app.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "no body at all is the default grant");
}
