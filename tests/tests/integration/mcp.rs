//! The MCP endpoint (docs/ai.md, "MCP endpoint") with an MCP client that is not the
//! server's code: rmcp's client over Streamable HTTP to `/mcp`, the agent's key as its
//! bearer. An agent lists the tools, reads through its field policy, and every change
//! it asks for is an AI action: a personal change waits for a person, who approves it
//! over the API, and then it has run.

use std::time::Duration;

use crm_tests::harness::{eventually, TestApp};
use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::RunningService;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{json, Value};

type Client = RunningService<RoleClient, ()>;

/// An MCP client of `app`'s `/mcp`, initialized, with `key` as its bearer.
async fn connect(app: &TestApp, key: &str) -> Client {
    let config = StreamableHttpClientTransportConfig::with_uri(app.url("/mcp")).auth_header(key);
    ().serve(StreamableHttpClientTransport::from_config(config))
        .await
        .expect("the MCP client initializes")
}

/// Calls tool `name` with `arguments` (an object).
async fn call(client: &Client, name: &str, arguments: Value) -> CallToolResult {
    let Value::Object(arguments) = arguments else {
        panic!("tool arguments are an object")
    };
    client
        .call_tool(CallToolRequestParams::new(name.to_owned()).with_arguments(arguments))
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A result's JSON (its structured content), and whether it is an error.
fn answer(result: &CallToolResult) -> (bool, Value) {
    (
        result.is_error.unwrap_or(false),
        result.structured_content.clone().unwrap_or(Value::Null),
    )
}

async fn post(app: &TestApp, token: &str, path: &str, body: Value) -> (u16, Value) {
    app.call_as(token, reqwest::Method::POST, path, Some(body))
        .await
}

/// An Admin (its token), and an agent it registered (its key) whose custom role reads
/// and changes contacts (names, email and company; it does not see the phone number)
/// and reads consent, but may not send messages.
async fn admin_and_agent(app: &TestApp) -> (String, String) {
    use crm_domain::access::{Role, RoleRef};
    let (_, admin) = app.user_with_role(RoleRef::Builtin(Role::Admin)).await;
    let (s, role) = post(
        app,
        &admin,
        "/v1/roles",
        json!({"name": "Assistant",
               "permissions": ["contacts.read", "contacts.update", "consent.read"],
               "fields": {"given_name": "write", "family_name": "write", "email": "write",
                          "company": "write"}}),
    )
    .await;
    assert_eq!(s, 201, "{role}");
    let (s, issued) = post(
        app,
        &admin,
        "/v1/api-keys",
        json!({"name": "Assistant", "role": role["id"], "kind": "agent"}),
    )
    .await;
    assert_eq!(s, 201, "{issued}");
    (admin, issued["key"].as_str().unwrap().to_owned())
}

/// A contact (created by the test's Owner): its id.
async fn new_contact(app: &TestApp, body: Value) -> String {
    app.create_contact(&body).await.0.to_string()
}

/// `get_contact` once the read model has the contact at `version` or later.
async fn read_contact(client: &Client, id: &str, version: i64) -> Value {
    eventually(Duration::from_secs(10), || async {
        let (error, body) = answer(&call(client, "get_contact", json!({"id": id})).await);
        (!error && body["version"].as_i64() >= Some(version)).then_some(body)
    })
    .await
    .expect("the contact is readable")
}

#[tokio::test]
async fn an_agent_lists_tools_reads_and_its_personal_change_runs_once_approved() {
    let app = TestApp::spawn().await;
    let (admin, agent) = admin_and_agent(&app).await;
    let contact = new_contact(
        &app,
        json!({"given_name": "Ada", "company": "Engines", "phone": "+15550100123"}),
    )
    .await;
    let client = connect(&app, &agent).await;
    assert_eq!(
        client
            .peer_info()
            .and_then(|i| i.server_info.clone())
            .map(|s| s.name),
        Some("crm".to_owned())
    );

    // The tools: reads, and one proposal per kind of AI action, each with a schema.
    let tools = client.list_all_tools().await.unwrap();
    for name in [
        "search_contacts",
        "get_contact",
        "get_consent",
        "update_contact",
        "send_message",
    ] {
        let tool = tools
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no tool {name}"));
        assert_eq!(tool.input_schema["type"], "object", "{name}");
        assert!(tool.description.as_deref().is_some_and(|d| !d.is_empty()));
    }
    let update = tools.iter().find(|t| t.name == "update_contact").unwrap();
    let required = update.input_schema["required"].as_array().unwrap();
    assert!(required.contains(&json!("contact_id")) && required.contains(&json!("arguments")));

    // A read: the phone, hidden from the agent's role, is absent.
    let read = read_contact(&client, &contact, 1).await;
    assert_eq!(read["given_name"], "Ada", "{read}");
    assert!(read.get("phone").is_none(), "{read}");
    assert!(!read.to_string().contains("+15550100123"), "{read}");
    let (error, found) = answer(&call(&client, "search_contacts", json!({"q": "Ada"})).await);
    assert!(!error, "{found}");
    assert_eq!(found["items"][0]["id"], contact.as_str(), "{found}");
    assert!(found["items"][0].get("phone").is_none(), "{found}");
    let (error, consent) =
        answer(&call(&client, "get_consent", json!({"contact_id": contact})).await);
    assert!(!error, "{consent}");
    assert_eq!(consent["contact_id"], contact.as_str());

    // A personal change, autonomous: medium risk, it waits for a person.
    let (error, proposed) = answer(
        &call(
            &client,
            "update_contact",
            json!({"contact_id": contact, "arguments": {"given_name": "Augusta"},
                   "reasoning_summary": "She signs her letters Augusta.",
                   "model": {"provider": "anthropic", "model": "claude"}}),
        )
        .await,
    );
    assert!(!error, "{proposed}");
    assert_eq!(
        (
            proposed["status"].as_str(),
            proposed["risk"].as_str(),
            proposed["rule"].as_str()
        ),
        (
            Some("pending_approval"),
            Some("medium"),
            Some("personal_data")
        ),
        "{proposed}"
    );
    assert!(proposed["expires_at"].is_string(), "{proposed}");
    let id = proposed["id"].as_str().unwrap().to_owned();
    assert_eq!(
        read_contact(&client, &contact, 1).await["given_name"],
        "Ada"
    );

    // The Admin approves it over the API, naming the arguments they saw: it runs.
    let path = format!("/v1/ai/actions/{id}");
    let (s, pending) = app.call_as(&admin, reqwest::Method::GET, &path, None).await;
    assert_eq!(
        (s, pending["status"].as_str()),
        (200, Some("pending_approval"))
    );
    let (s, approved) = post(
        &app,
        &admin,
        &format!("{path}/approve"),
        json!({"arguments_sha256": pending["arguments_sha256"]}),
    )
    .await;
    assert_eq!(s, 200, "{approved}");
    let (s, done) = app.call_as(&admin, reqwest::Method::GET, &path, None).await;
    assert_eq!(
        (s, done["status"].as_str()),
        (200, Some("executed")),
        "{done}"
    );
    assert_eq!(done["proposed_by"], pending["proposed_by"]);
    assert_eq!(done["result_events"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        read_contact(&client, &contact, 2).await["given_name"],
        "Augusta"
    );
}

#[tokio::test]
async fn a_low_risk_change_runs_at_once_and_a_refusal_is_a_tool_error() {
    let app = TestApp::spawn().await;
    let (_, agent) = admin_and_agent(&app).await;
    let contact = new_contact(&app, json!({"given_name": "Ada", "company": "Old"})).await;
    let client = connect(&app, &agent).await;

    // No personal data: low risk, run by the policy at once.
    let (error, done) = answer(
        &call(
            &client,
            "update_contact",
            json!({"contact_id": contact, "arguments": {"company": "Analytical Engines"}}),
        )
        .await,
    );
    assert!(!error, "{done}");
    assert_eq!(
        (done["status"].as_str(), done["risk"].as_str()),
        (Some("executed"), Some("low")),
        "{done}"
    );
    assert_eq!(done["result_events"].as_array().map(Vec::len), Some(1));
    assert!(done.get("expires_at").is_none(), "{done}");
    assert_eq!(
        read_contact(&client, &contact, 2).await["company"],
        "Analytical Engines"
    );

    // Refusals answer the API's error as the tool's result, flagged as an error.
    let (error, invalid) = answer(
        &call(
            &client,
            "update_contact",
            json!({"contact_id": contact, "arguments": {"email": "not an address"}}),
        )
        .await,
    );
    assert!(error, "{invalid}");
    assert_eq!(invalid["code"], "validation_failed", "{invalid}");
    assert!(invalid["request_id"].is_string(), "{invalid}");
    let missing = uuid::Uuid::now_v7().to_string();
    let (error, absent) = answer(&call(&client, "get_contact", json!({"id": missing})).await);
    assert!(error, "{absent}");
    assert_eq!(absent["code"], "not_found", "{absent}");
    let (error, filtered) = answer(
        &call(
            &client,
            "search_contacts",
            json!({"q": "Ada", "unknown": true}),
        )
        .await,
    );
    assert!(error, "{filtered}");
    assert_eq!(filtered["code"], "invalid_body", "{filtered}");
    // A kind of action the agent's role may not run (no messages.send): 403.
    let (error, denied) = answer(
        &call(
            &client,
            "send_message",
            json!({"contact_id": contact,
                   "arguments": {"channel": "email", "purpose": "marketing", "body": "Hi"}}),
        )
        .await,
    );
    assert!(error, "{denied}");
    assert_eq!(denied["code"], "permission_denied", "{denied}");
}

#[tokio::test]
async fn only_an_agent_key_opens_the_endpoint() {
    let app = TestApp::spawn().await;
    let (admin, agent) = admin_and_agent(&app).await;
    let (s, integration) = post(
        &app,
        &admin,
        "/v1/api-keys",
        json!({"name": "Nightly sync", "role": "viewer"}),
    )
    .await;
    assert_eq!(s, 201, "{integration}");
    let integration = integration["key"].as_str().unwrap().to_owned();
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "curl", "version": "1"}}});
    let mcp = |token: Option<&str>| {
        let mut rb = app
            .http
            .post(app.url("/mcp"))
            .header("accept", "application/json, text/event-stream")
            .json(&initialize);
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        async move {
            let r = rb.send().await.unwrap();
            let status = r.status().as_u16();
            let request_id = r.headers().get("x-request-id").is_some();
            (
                status,
                request_id,
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };

    let (s, id, body) = mcp(None).await;
    assert_eq!(
        (s, id, body["code"].as_str()),
        (401, true, Some("unauthorized")),
        "{body}"
    );
    let (s, _, body) = mcp(Some("ck_live_not-a-key")).await;
    assert_eq!(
        (s, body["code"].as_str()),
        (401, Some("unauthorized")),
        "{body}"
    );
    for (who, token) in [
        ("a user's token", &admin),
        ("an integration's key", &integration),
    ] {
        let (s, _, body) = mcp(Some(token)).await;
        assert_eq!(
            (s, body["code"].as_str()),
            (403, Some("agent_only")),
            "{who}: {body}"
        );
    }
    let (s, _, body) = mcp(Some(&agent)).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["result"]["serverInfo"]["name"], "crm", "{body}");
    // No session: a request stands on its own (docs/ai.md's curl example).
    let r = app
        .http
        .post(app.url("/mcp"))
        .bearer_auth(&agent)
        .header("accept", "application/json, text/event-stream")
        .json(&json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}))
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("mcp-session-id").is_none());
    let listed: Value = r.json().await.unwrap();
    assert!(
        listed["result"]["tools"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["name"] == "get_contact")),
        "{listed}"
    );

    // rmcp's client without a key does not get in either.
    let config = StreamableHttpClientTransportConfig::with_uri(app.url("/mcp"));
    assert!(
        ().serve(StreamableHttpClientTransport::from_config(config))
            .await
            .is_err()
    );
}
