//! AI actions over HTTP (docs/ai.md): the risk policy decides what runs at once and what
//! waits; a decision is someone else's and binds the exact arguments; an approved
//! action runs as the real command, as its proposer with the proposer's rights then,
//! through the send gate, exactly once; every step is an event.

use crm_domain::access::{Role, RoleRef};
use std::time::Duration;

use crm_tests::harness::{eventually, TestApp};
use serde_json::{json, Value};
use uuid::Uuid;

async fn call(
    app: &TestApp,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    app.call_as(token, method, path, body).await
}

async fn post(app: &TestApp, token: &str, path: &str, body: Value) -> (u16, Value) {
    call(app, token, reqwest::Method::POST, path, Some(body)).await
}

/// Proposes an AI action as `token`: (status, body).
async fn propose(app: &TestApp, token: &str, body: Value) -> (u16, Value) {
    post(app, token, "/v1/ai/actions", body).await
}

/// The body proposing to change `contact` with `arguments` (a PATCH body).
fn update(contact: &str, arguments: Value) -> Value {
    json!({"type": "update_contact", "contact_id": contact, "arguments": arguments})
}

/// `GET /v1/ai/actions/{id}` as `token`: (status, body).
async fn action(app: &TestApp, token: &str, id: &str) -> (u16, Value) {
    call(
        app,
        token,
        reqwest::Method::GET,
        &format!("/v1/ai/actions/{id}"),
        None,
    )
    .await
}

/// An Admin, and an agent (Team role) the Admin registered: (admin id, admin token,
/// agent key, agent id).
async fn admin_and_agent(app: &TestApp) -> (Uuid, String, String, String) {
    let (admin_id, admin) = app.user_with_role(RoleRef::Builtin(Role::Admin)).await;
    let (s, issued) = post(
        app,
        &admin,
        "/v1/api-keys",
        json!({"name": "Assistant", "role": "team", "kind": "agent"}),
    )
    .await;
    assert_eq!(s, 201, "{issued}");
    (
        admin_id,
        admin,
        issued["key"].as_str().unwrap().to_owned(),
        issued["id"].as_str().unwrap().to_owned(),
    )
}

async fn new_contact(app: &TestApp, body: Value) -> String {
    let r = app.post("/v1/contacts", &body).await;
    assert_eq!(r.status(), 201);
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The events of a contact's stream caused by `action`: (event id, principal).
async fn caused(app: &TestApp, contact: &str, action: &str) -> Vec<(Uuid, Value)> {
    app.db()
        .await
        .query(
            "SELECT event_id, metadata -> 'principal' FROM events \
             WHERE aggregate_type = 'contact' AND aggregate_id = $1 \
               AND metadata ->> 'causation_id' = $2 ORDER BY sequence",
            &[&contact, &action],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn given_name(app: &TestApp, contact: &str) -> Value {
    app.get(&format!("/v1/contacts/{contact}"))
        .await
        .json::<Value>()
        .await
        .unwrap()["given_name"]
        .clone()
}

#[tokio::test]
async fn a_low_risk_change_runs_at_once_and_a_personal_one_waits_for_someone_else() {
    let app = TestApp::spawn().await;
    let (admin_id, admin, agent, agent_id) = admin_and_agent(&app).await;
    let contact = new_contact(&app, json!({"given_name": "Ada", "company": "Old"})).await;

    // A company change touches no personal data: low risk, run at once, as the agent.
    let (s, done) = propose(
        &app,
        &agent,
        json!({"type": "update_contact", "contact_id": contact,
               "arguments": {"company": "Analytical Engines"},
               "model": {"provider": "anthropic", "model": "claude", "input_tokens": 812},
               "reasoning_summary": "She wrote that she moved."}),
    )
    .await;
    assert_eq!(s, 201, "{done}");
    assert_eq!(
        (
            done["status"].as_str(),
            done["risk"].as_str(),
            done["rule"].as_str(),
            done["initiated_by"].as_str()
        ),
        (
            Some("executed"),
            Some("low"),
            Some("default"),
            Some("autonomous")
        ),
        "{done}"
    );
    let id = done["id"].as_str().unwrap();
    let events = caused(&app, &contact, id).await;
    assert_eq!(events.len(), 1, "one contact event, caused by the action");
    assert_eq!(events[0].1, json!({"kind": "ai_agent", "id": agent_id}));
    assert_eq!(done["result_events"], json!([events[0].0]));
    let steps: Vec<&str> = done["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "AiActionProposed",
            "AiActionAutoApproved",
            "AiActionExecuted"
        ]
    );
    // The answer is what the action reads as afterwards; the proposal, the contact's
    // change and the outcome were committed together.
    let (s, read) = action(&app, &agent, id).await;
    assert_eq!((s, &read), (200, &done));
    let txs: i64 = app
        .db()
        .await
        .query_one(
            "SELECT count(DISTINCT tx_id) FROM events              WHERE aggregate_id = $1 OR metadata ->> 'causation_id' = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(txs, 1, "one commit for the whole action");

    // A name change touches personal data: it waits, and nothing changes meanwhile.
    let (s, pending) = propose(
        &app,
        &agent,
        json!({"type": "update_contact", "contact_id": contact,
               "arguments": {"given_name": "Eve"},
               "initiated_by": "user", "on_behalf_of": admin_id}),
    )
    .await;
    assert_eq!(s, 201, "{pending}");
    assert_eq!(
        (
            pending["status"].as_str(),
            pending["risk"].as_str(),
            pending["rule"].as_str()
        ),
        (
            Some("pending_approval"),
            Some("medium"),
            Some("personal_data")
        )
    );
    assert!(pending["expires_at"].is_string());
    let id = pending["id"].as_str().unwrap().to_owned();
    let sha = pending["arguments_sha256"].as_str().unwrap().to_owned();
    assert!(caused(&app, &contact, &id).await.is_empty());

    // The user it was proposed for holds ai.approve, and still may not decide it.
    let path = format!("/v1/ai/actions/{id}/approve");
    let (s, body) = post(&app, &admin, &path, json!({"arguments_sha256": sha})).await;
    assert_eq!(
        (s, body["code"].as_str()),
        (403, Some("own_action")),
        "{body}"
    );
    // An approval names the arguments it saw.
    let (s, body) = post(
        &app,
        &app.token,
        &path,
        json!({"arguments_sha256": "0".repeat(64)}),
    )
    .await;
    assert_eq!(s, 409, "{body}");
    assert!(caused(&app, &contact, &id).await.is_empty());
    let (s, done) = post(&app, &app.token, &path, json!({"arguments_sha256": sha})).await;
    assert_eq!(
        (s, done["status"].as_str()),
        (200, Some("executed")),
        "{done}"
    );
    // The read model follows the event.
    eventually(Duration::from_secs(10), || async {
        (given_name(&app, &contact).await == json!("Eve")).then_some(())
    })
    .await
    .expect("the contact read model shows the approved change");
    // Approving again (a retry after a lost answer) runs nothing twice.
    let (s, again) = post(&app, &app.token, &path, json!({"arguments_sha256": sha})).await;
    assert_eq!((s, again["status"].as_str()), (200, Some("executed")));
    assert_eq!(caused(&app, &contact, &id).await.len(), 1);
    let steps: Vec<(String, String)> = again["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["event_type"].as_str().unwrap().to_owned(),
                s["by"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        steps,
        [
            ("AiActionProposed".into(), format!("ai_agent:{agent_id}")),
            (
                "AiActionApprovalRequested".into(),
                format!("ai_agent:{agent_id}")
            ),
            ("AiActionApproved".into(), format!("user:{}", app.user_id)),
            ("AiActionExecuted".into(), format!("user:{}", app.user_id)),
        ]
    );
    app.stop().await;
}

#[tokio::test]
async fn an_approved_message_without_consent_is_blocked_by_the_gate_and_recorded() {
    let app = TestApp::spawn().await;
    let (_, _, agent, _) = admin_and_agent(&app).await;
    let contact = new_contact(
        &app,
        json!({"given_name": "Ada", "email": format!("{}@example.com", Uuid::new_v4().simple())}),
    )
    .await;
    let (s, pending) = propose(
        &app,
        &agent,
        json!({"type": "send_message", "contact_id": contact,
               "arguments": {"channel": "email", "purpose": "marketing",
                             "subject": "Spring", "body": "Our offers"}}),
    )
    .await;
    assert_eq!(s, 201, "{pending}");
    assert_eq!(
        (pending["status"].as_str(), pending["rule"].as_str()),
        (Some("pending_approval"), Some("send_message"))
    );
    let id = pending["id"].as_str().unwrap().to_owned();
    let (s, done) = post(
        &app,
        &app.token,
        &format!("/v1/ai/actions/{id}/approve"),
        json!({"arguments_sha256": pending["arguments_sha256"]}),
    )
    .await;
    assert_eq!(s, 200, "{done}");
    assert_eq!(
        (done["status"].as_str(), done["failure_reason"].as_str()),
        (Some("failed"), Some("no_consent")),
        "{done}"
    );
    // The message (its id is the action's) was blocked, and the action names its event.
    let r = app.get(&format!("/v1/messages/{id}")).await;
    assert_eq!(r.status(), 200);
    let message: Value = r.json().await.unwrap();
    assert_eq!(message["status"], "blocked", "{message}");
    assert_eq!(done["result_events"].as_array().unwrap().len(), 1);
    assert_eq!(done["result_events"][0], message["steps"][0]["event_id"]);
    app.stop().await;
}

#[tokio::test]
async fn a_rejection_needs_a_reason_ends_the_action_and_strangers_see_nothing() {
    let app = TestApp::spawn().await;
    let (_, _, agent, _) = admin_and_agent(&app).await;
    let contact = new_contact(&app, json!({"given_name": "Ada"})).await;
    let (_, pending) = propose(
        &app,
        &agent,
        update(&contact, json!({"family_name": "Lovelace"})),
    )
    .await;
    let id = pending["id"].as_str().unwrap().to_owned();
    // A Viewer neither proposed it nor may approve: it does not exist for them.
    let (_, viewer) = app.user_with_role(RoleRef::Builtin(Role::Viewer)).await;
    let (s, _) = action(&app, &viewer, &id).await;
    assert_eq!(s, 404);
    let (s, mine) = action(&app, &agent, &id).await;
    assert_eq!(
        (s, mine["arguments"].clone()),
        (200, json!({"family_name": "Lovelace"}))
    );
    let reject = format!("/v1/ai/actions/{id}/reject");
    let (s, body) = post(&app, &app.token, &reject, json!({"reason": " "})).await;
    assert_eq!(s, 422, "{body}");
    let (s, done) = post(
        &app,
        &app.token,
        &reject,
        json!({"reason": "not asked for"}),
    )
    .await;
    assert_eq!((s, done["status"].as_str()), (200, Some("rejected")));
    let (s, _) = post(
        &app,
        &app.token,
        &format!("/v1/ai/actions/{id}/approve"),
        json!({"arguments_sha256": pending["arguments_sha256"]}),
    )
    .await;
    assert_eq!(s, 409, "a rejected action stays rejected");
    assert!(caused(&app, &contact, &id).await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn an_action_runs_with_its_proposers_rights_at_approval_and_proposals_need_them() {
    let app = TestApp::spawn().await;
    let (admin_id, _, agent, _) = admin_and_agent(&app).await;
    let contact = new_contact(&app, json!({"given_name": "Ada"})).await;
    let (_, pending) = propose(&app, &agent, update(&contact, json!({"given_name": "Eve"}))).await;
    let id = pending["id"].as_str().unwrap().to_owned();
    // The agent's user is demoted before the decision: the agent may no longer update.
    let r = app
        .post(
            &format!("/v1/users/{admin_id}/role"),
            &json!({"role": "viewer"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let (s, done) = post(
        &app,
        &app.token,
        &format!("/v1/ai/actions/{id}/approve"),
        json!({"arguments_sha256": pending["arguments_sha256"]}),
    )
    .await;
    assert_eq!(s, 200, "{done}");
    assert_eq!(
        (done["status"].as_str(), done["failure_reason"].as_str()),
        (Some("failed"), Some("permission_denied"))
    );
    assert!(caused(&app, &contact, &id).await.is_empty());
    // And now it may not propose an update either; bad arguments are named.
    let (s, body) = propose(&app, &agent, update(&contact, json!({"given_name": "X"}))).await;
    assert_eq!((s, body["code"].as_str()), (403, Some("permission_denied")));
    let (s, body) = propose(
        &app,
        &app.token,
        update(&contact, json!({"email": "not an address"})),
    )
    .await;
    assert_eq!(s, 422, "{body}");
    let unknown = Uuid::now_v7().to_string();
    let (s, _) = propose(&app, &app.token, update(&unknown, json!({"company": "X"}))).await;
    assert_eq!(s, 404);
    app.stop().await;
}

#[tokio::test]
async fn the_stop_switch_holds_autonomous_actions_until_a_fresh_decision_and_oversight_tightens() {
    let app = TestApp::spawn().await;
    let (admin_id, _, agent, _) = admin_and_agent(&app).await;
    let contact = new_contact(&app, json!({"given_name": "Ada"})).await;
    let company = |name: &str| update(&contact, json!({"company": name}));
    let (s, body) = post(&app, &app.token, "/v1/ai/stop", json!({"reason": ""})).await;
    assert_eq!(s, 422, "a stop needs a why: {body}");
    let (s, settings) = post(
        &app,
        &app.token,
        "/v1/ai/stop",
        json!({"reason": "odd sends overnight"}),
    )
    .await;
    assert_eq!((s, settings["stopped"].as_bool()), (200, Some(true)));

    // Stopped: even a low-risk autonomous action waits, and cannot be approved.
    let (_, held) = propose(&app, &agent, company("A")).await;
    assert_eq!(held["status"], "pending_approval", "{held}");
    let approve = format!("/v1/ai/actions/{}/approve", held["id"].as_str().unwrap());
    let sha = json!({"arguments_sha256": held["arguments_sha256"]});
    let (s, body) = post(&app, &app.token, &approve, sha.clone()).await;
    assert_eq!(s, 409, "{body}");
    // What a user asked the agent for still runs: the switch holds what agents do alone.
    let mut asked = company("B");
    asked["initiated_by"] = json!("user");
    asked["on_behalf_of"] = json!(admin_id);
    let (_, ran) = propose(&app, &agent, asked).await;
    assert_eq!(ran["status"], "executed", "{ran}");

    // Lifted: what waited does not run by itself; it needs (and can now get) a decision.
    let (s, settings) = post(
        &app,
        &app.token,
        "/v1/ai/resume",
        json!({"reason": "carrier fixed"}),
    )
    .await;
    assert_eq!((s, settings["stopped"].as_bool()), (200, Some(false)));
    let (_, still) = action(&app, &app.token, held["id"].as_str().unwrap()).await;
    assert_eq!(still["status"], "pending_approval");
    let (s, done) = post(&app, &app.token, &approve, sha).await;
    assert_eq!(
        (s, done["status"].as_str()),
        (200, Some("executed")),
        "{done}"
    );

    // Tightened: every agent action waits for a person.
    let (s, settings) = call(
        &app,
        &app.token,
        reqwest::Method::PUT,
        "/v1/ai/oversight",
        Some(json!({"oversight": "approve_all", "reason": "pilot month"})),
    )
    .await;
    assert_eq!(
        (s, settings["oversight"].as_str()),
        (200, Some("approve_all"))
    );
    let (_, waits) = propose(&app, &agent, company("C")).await;
    assert_eq!(waits["status"], "pending_approval", "{waits}");

    // Each change is an event with who and why.
    let org = app.org_id.to_string();
    let types: Vec<String> = app
        .db()
        .await
        .query(
            "SELECT event_type FROM events WHERE aggregate_type = 'ai_settings' \
             AND aggregate_id = $1 ORDER BY sequence",
            &[&org],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(types, ["AiStopped", "AiResumed", "AiOversightSet"]);
    app.stop().await;
}

#[tokio::test]
async fn an_edit_needs_a_fresh_decision_and_a_pending_action_expires_after_the_set_time() {
    let app = TestApp::spawn().await;
    let (_, _, agent, _) = admin_and_agent(&app).await;
    let contact = new_contact(&app, json!({"given_name": "Ada"})).await;
    let (_, pending) = propose(&app, &agent, update(&contact, json!({"given_name": "Eve"}))).await;
    let id = pending["id"].as_str().unwrap().to_owned();
    let old = pending["arguments_sha256"].clone();
    // An approver edits it to a company change: a new digest, assessed again, and
    // still waiting for a decision.
    let (s, edited) = post(
        &app,
        &app.token,
        &format!("/v1/ai/actions/{id}/edit"),
        json!({"arguments": {"company": "Analytical Engines"}}),
    )
    .await;
    assert_eq!(s, 200, "{edited}");
    assert_eq!(
        (
            edited["status"].as_str(),
            edited["rule"].as_str(),
            edited["arguments"].clone()
        ),
        (
            Some("pending_approval"),
            Some("default"),
            json!({"company": "Analytical Engines"})
        )
    );
    assert_ne!(edited["arguments_sha256"], old);
    let approve = format!("/v1/ai/actions/{id}/approve");
    let (s, _) = post(&app, &app.token, &approve, json!({"arguments_sha256": old})).await;
    assert_eq!(s, 409, "an approval of the old arguments does not hold");
    let (s, done) = post(
        &app,
        &app.token,
        &approve,
        json!({"arguments_sha256": edited["arguments_sha256"]}),
    )
    .await;
    assert_eq!(
        (s, done["status"].as_str()),
        (200, Some("executed")),
        "{done}"
    );
    let ran = caused(&app, &contact, &id).await;
    assert_eq!(ran.len(), 1);

    // The organisation gives decisions one second; a proposal left alone expires.
    let (s, settings) = call(
        &app,
        &app.token,
        reqwest::Method::PUT,
        "/v1/ai/oversight",
        Some(json!({"oversight": "standard", "approval_ttl_secs": 1, "reason": "test"})),
    )
    .await;
    assert_eq!((s, settings["approval_ttl_secs"].as_u64()), (200, Some(1)));
    let (_, late) = propose(&app, &agent, update(&contact, json!({"given_name": "Zoe"}))).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let late_id = late["id"].as_str().unwrap();
    let (s, _) = post(
        &app,
        &app.token,
        &format!("/v1/ai/actions/{late_id}/approve"),
        json!({"arguments_sha256": late["arguments_sha256"]}),
    )
    .await;
    assert_eq!(s, 409, "too late");
    let (_, gone) = action(&app, &app.token, late_id).await;
    assert_eq!(gone["status"], "expired", "{gone}");
    assert!(caused(&app, &contact, late_id).await.is_empty());
    let (s, _) = call(
        &app,
        &app.token,
        reqwest::Method::PUT,
        "/v1/ai/oversight",
        Some(json!({"oversight": "standard", "approval_ttl_secs": 0, "reason": "test"})),
    )
    .await;
    assert_eq!(s, 422);
    app.stop().await;
}

/// Approves `action` (as proposed) straight in the store, as the test's owner: what a
/// process that stopped between an approval and its run leaves. The action's id.
async fn approved_in_the_store_only(app: &TestApp, action: &Value) -> String {
    use crm_domain::ai::{AiAction, AiActionCommand};
    use crm_domain::metadata::EventMetadata;
    let id = action["id"].as_str().unwrap().to_owned();
    let mut meta = EventMetadata::system(app.org_id, "test");
    meta.causation_id = Some(id.clone());
    app.state
        .executor
        .execute::<AiAction>(
            app.org_id,
            &id,
            AiActionCommand::Approve {
                by: app.user_id,
                arguments_sha256: action["arguments_sha256"].as_str().unwrap().into(),
                reason: None,
                stopped: false,
                now: chrono::Utc::now(),
            },
            &meta,
            None,
        )
        .await
        .unwrap();
    id
}

#[tokio::test]
async fn a_run_cut_short_by_a_stop_is_finished_once_when_approved_again() {
    use crm_domain::contact::{Contact, ContactChanges, ContactCommand, ContactProfile};
    use crm_domain::metadata::EventMetadata;
    use crm_domain::values::Name;

    let app = TestApp::spawn().await;
    let (_, _, agent, _) = admin_and_agent(&app).await;
    let contact = new_contact(&app, json!({"given_name": "Ada"})).await;
    let (_, first) = propose(
        &app,
        &agent,
        update(&contact, json!({"family_name": "Byron"})),
    )
    .await;
    let (_, second) = propose(
        &app,
        &agent,
        update(&contact, json!({"family_name": "King"})),
    )
    .await;
    let org = app.org_id;
    let meta = |causation: &str| {
        let mut m = EventMetadata::system(org, "test");
        m.causation_id = Some(causation.to_owned());
        m
    };
    // The first was approved, then the service stopped before it ran: the approval is
    // in the store and nothing else.
    let first_id = approved_in_the_store_only(&app, &first).await;
    // The second was approved and its command ran, then the service stopped before the
    // outcome was recorded.
    let second_id = approved_in_the_store_only(&app, &second).await;
    app.state
        .executor
        .execute::<Contact>(
            org,
            &contact,
            ContactCommand::Update {
                changes: ContactChanges {
                    set: ContactProfile {
                        family_name: Some(Name::parse("King").unwrap()),
                        ..ContactProfile::default()
                    },
                    cleared: vec![],
                    cleared_custom: vec![],
                },
            },
            &meta(&second_id),
            None,
        )
        .await
        .unwrap();
    let ran_before = caused(&app, &contact, &second_id).await;
    assert_eq!(ran_before.len(), 1);

    // Approving again finishes each: the first runs now, the second is recorded with
    // the event it already produced; neither runs twice.
    for (id, action) in [(&first_id, &first), (&second_id, &second)] {
        let (s, done) = post(
            &app,
            &app.token,
            &format!("/v1/ai/actions/{id}/approve"),
            json!({"arguments_sha256": action["arguments_sha256"]}),
        )
        .await;
        assert_eq!(
            (s, done["status"].as_str()),
            (200, Some("executed")),
            "{done}"
        );
        let events = caused(&app, &contact, id).await;
        assert_eq!(events.len(), 1, "exactly one run of {id}");
        assert_eq!(done["result_events"], json!([events[0].0]));
    }
    assert_eq!(caused(&app, &contact, &second_id).await, ran_before);
    app.stop().await;
}

/// `GET path` as `token`, waiting until `ready` holds of the answer (the audit log is a
/// read model): the last answer.
async fn audit_until(
    app: &TestApp,
    token: &str,
    path: &str,
    ready: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (s, v) = call(app, token, reqwest::Method::GET, path, None).await;
        assert_eq!(s, 200, "{path}: {v}");
        if ready(&v) {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "{path}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn items(v: &Value) -> Vec<Value> {
    v["items"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn executed_actions_are_in_the_ai_audit_log_with_their_chain_and_sealed_at_rest() {
    let app = TestApp::spawn().await;
    let (admin_id, admin, agent, agent_id) = admin_and_agent(&app).await;
    let contact = new_contact(
        &app,
        json!({"given_name": "Ada", "email": "ada@example.com", "company": "Old Ltd"}),
    )
    .await;
    let other = new_contact(&app, json!({"given_name": "Bob"})).await;
    // The admin, through an assistant: low risk, runs at once.
    let mut low = update(&contact, json!({"company": "New Ltd"}));
    low["reasoning_summary"] = json!("SECRET-reasoning: she wrote from her new company");
    low["model"] = json!({"provider": "anthropic", "model": "claude", "input_tokens": 812});
    let (s, done) = propose(&app, &admin, low).await;
    assert_eq!(
        (s, done["status"].as_str()),
        (201, Some("executed")),
        "{done}"
    );
    let low_id = done["id"].as_str().unwrap().to_owned();
    // The agent on its own: a personal field, waits; someone else approves it.
    let (_, pending) = propose(
        &app,
        &agent,
        update(&contact, json!({"email": "ada@new.example"})),
    )
    .await;
    let medium_id = pending["id"].as_str().unwrap().to_owned();
    let (s, approved) = post(
        &app,
        &app.token,
        &format!("/v1/ai/actions/{medium_id}/approve"),
        json!({"arguments_sha256": pending["arguments_sha256"], "reason": "SECRET-why: checked by phone"}),
    )
    .await;
    assert_eq!(
        (s, approved["status"].as_str()),
        (200, Some("executed")),
        "{approved}"
    );

    let log = audit_until(&app, &app.token, "/v1/ai/audit", |v| {
        items(v).len() == 2 && items(v).iter().all(|i| i["status"] == "executed")
    })
    .await;
    let entries = items(&log);
    // Newest first.
    let (medium, low) = (&entries[0], &entries[1]);
    assert_eq!(medium["id"], medium_id.as_str());
    assert_eq!(
        (
            low["risk"].as_str(),
            low["rule"].as_str(),
            low["initiated_by"].as_str()
        ),
        (Some("low"), Some("default"), Some("user"))
    );
    assert_eq!(low["on_behalf_of"], admin_id.to_string());
    assert_eq!(low["model"]["model"], "claude");
    assert_eq!(low["model"]["input_tokens"], 812);
    assert_eq!(
        low["reasoning_summary"],
        "SECRET-reasoning: she wrote from her new company"
    );
    assert_eq!(low["arguments"], json!({"company": "New Ltd"}));
    // The causal links: the result events are the contact's events caused by the action.
    for (entry, id) in [(low, &low_id), (medium, &medium_id)] {
        let caused: Vec<Value> = caused(&app, &contact, id)
            .await
            .into_iter()
            .map(|(e, _)| json!(e))
            .collect();
        assert_eq!(caused.len(), 1);
        assert_eq!(entry["result_events"], json!(caused), "{entry}");
        assert_eq!(entry["contacts"], json!([contact]));
    }
    // The approval chain: who proposed, who decided, why, the digest decided on.
    let steps: Vec<&str> = medium["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        ["proposed", "approval_requested", "approved", "executed"]
    );
    let approval = &medium["steps"][2];
    assert_eq!(approval["decided_by"], app.user_id.to_string());
    assert_eq!(approval["note"], "SECRET-why: checked by phone");
    assert_eq!(approval["arguments_sha256"], pending["arguments_sha256"]);
    assert_eq!(medium["steps"][0]["by"]["kind"], "ai_agent");
    assert_eq!(medium["steps"][0]["by"]["id"], agent_id.as_str());
    assert_eq!(medium["steps"][1]["because"], "risk");

    // Filters.
    let only = |path: String| {
        let app = &app;
        async move {
            let (s, v) = call(app, &app.token, reqwest::Method::GET, &path, None).await;
            assert_eq!(s, 200, "{path}: {v}");
            items(&v)
                .iter()
                .map(|i| i["id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        only(format!("/v1/ai/audit?agent_id={agent_id}")).await,
        [medium_id.as_str()]
    );
    assert_eq!(
        only("/v1/ai/audit?risk=low".into()).await,
        [low_id.as_str()]
    );
    assert_eq!(
        only("/v1/ai/audit?status=executed&limit=1".into()).await,
        [medium_id.as_str()]
    );
    assert_eq!(
        only(format!(
            "/v1/ai/audit?status=executed&limit=1&before={medium_id}"
        ))
        .await,
        [low_id.as_str()]
    );
    assert!(only(format!("/v1/ai/audit?contact_id={other}"))
        .await
        .is_empty());
    assert_eq!(
        only(format!("/v1/ai/audit?contact_id={contact}"))
            .await
            .len(),
        2
    );
    assert!(only("/v1/ai/audit?type=send_message".into())
        .await
        .is_empty());
    assert!(only("/v1/ai/audit?until=2020-01-01T00:00:00Z".into())
        .await
        .is_empty());
    let (s, bad) = call(
        &app,
        &app.token,
        reqwest::Method::GET,
        "/v1/ai/audit?risk=extreme",
        None,
    )
    .await;
    assert_eq!(s, 400, "{bad}");
    // Only holders of ai.audit.read read it.
    let (_, team) = app.user_with_role(RoleRef::Builtin(Role::Team)).await;
    let (s, _) = call(&app, &team, reqwest::Method::GET, "/v1/ai/audit", None).await;
    assert_eq!(s, 403);
    let (s, _) = call(&app, &agent, reqwest::Method::GET, "/v1/ai/audit", None).await;
    assert_eq!(s, 403);

    // At rest the personal data is sealed under the action's key.
    let db = app.db().await;
    for row in db
        .query("SELECT content::text || steps::text FROM ai_audit", &[])
        .await
        .unwrap()
    {
        let text: String = row.get(0);
        assert!(
            !text.contains("SECRET") && !text.contains("New Ltd") && !text.contains("ada@new"),
            "{text}"
        );
    }
    // Rebuilt from the events alone, the log is the same.
    let before: Vec<String> = db
        .query("SELECT (to_jsonb(a) - 'content' - 'steps')::text || (a.steps - 0)::text FROM ai_audit a ORDER BY action_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    app.rebuild("ai_audit").await;
    let db = app.db().await;
    let after: Vec<String> = db
        .query("SELECT (to_jsonb(a) - 'content' - 'steps')::text || (a.steps - 0)::text FROM ai_audit a ORDER BY action_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(before, after);
    // Shredding the action's key (what erasing the contact does) leaves the entry
    // without its personal data, everything else intact.
    db.execute(
        "UPDATE data_keys SET wrapped_key = NULL, destroyed_at = now() \
         WHERE org_id = $1 AND subject_id = $2",
        &[&app.org_id, &medium_id],
    )
    .await
    .unwrap();
    app.state.crypto.forget(&app.org_id, &medium_id);
    let (_, log) = call(
        &app,
        &app.token,
        reqwest::Method::GET,
        &format!("/v1/ai/audit?agent_id={agent_id}"),
        None,
    )
    .await;
    let shredded = &items(&log)[0];
    assert_eq!(shredded["arguments"], Value::Null);
    assert_eq!(shredded["steps"][2]["note"], Value::Null);
    assert_eq!(shredded["status"], "executed");
    assert_eq!(shredded["arguments_sha256"], pending["arguments_sha256"]);
    app.stop().await;
}

#[tokio::test]
async fn the_approval_queue_shows_what_would_change_and_who_may_decide() {
    let app = TestApp::spawn().await;
    let (_, _, agent, _) = admin_and_agent(&app).await;
    let contact = new_contact(
        &app,
        json!({"given_name": "Ada", "email": "ada@example.com", "company": "Old Ltd"}),
    )
    .await;
    let (_, pending) = propose(
        &app,
        &agent,
        update(
            &contact,
            json!({"email": "ada@new.example", "company": "Old Ltd", "given_name": null}),
        ),
    )
    .await;
    let id = pending["id"].as_str().unwrap().to_owned();
    // A message for someone else's sake: its proposer's user may see it, not decide it.
    let (user_id, user) = app.user_with_role(RoleRef::Builtin(Role::Director)).await;
    let (s, msg) = propose(
        &app,
        &agent,
        json!({"type": "send_message", "contact_id": contact, "initiated_by": "user",
               "on_behalf_of": user_id,
               "arguments": {"channel": "email", "purpose": "service", "subject": "Hi", "body": "Hello"}}),
    )
    .await;
    assert_eq!(
        (s, msg["status"].as_str()),
        (201, Some("pending_approval")),
        "{msg}"
    );
    let queue = audit_until(&app, &app.token, "/v1/ai/approvals", |v| {
        items(v).len() == 2
    })
    .await;
    let entries = items(&queue);
    let update_entry = entries
        .iter()
        .find(|i| i["action"]["id"] == id.as_str())
        .unwrap();
    // The unchanged company is no change; the cleared name goes to null.
    assert_eq!(
        update_entry["changes"],
        json!([
            {"field": "email", "from": "ada@example.com", "to": "ada@new.example"},
            {"field": "given_name", "from": "Ada", "to": null},
        ])
    );
    assert_eq!(update_entry["can_decide"], true);
    // The same moment (the read model keeps microseconds).
    let at = |v: &Value| {
        chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap())
            .unwrap()
            .timestamp_micros()
    };
    // PostgreSQL rounds to the microsecond: at most one apart.
    assert!(
        (at(&update_entry["action"]["expires_at"]) - at(&pending["expires_at"])).abs() <= 1,
        "{update_entry}"
    );
    let message = entries
        .iter()
        .find(|i| i["action"]["type"] == "send_message")
        .unwrap();
    assert!(message["changes"]
        .as_array()
        .unwrap()
        .contains(&json!({"field": "message.body", "from": null, "to": "Hello"})));
    // The director holds ai.approve, but this one was proposed on their behalf.
    let (s, theirs) = call(&app, &user, reqwest::Method::GET, "/v1/ai/approvals", None).await;
    assert_eq!(s, 200);
    let mine = items(&theirs)
        .into_iter()
        .find(|i| i["action"]["type"] == "send_message")
        .unwrap();
    assert_eq!(mine["can_decide"], false);
    // Decided actions leave the queue.
    let (s, _) = post(
        &app,
        &app.token,
        &format!("/v1/ai/actions/{id}/reject"),
        json!({"reason": "not what she asked"}),
    )
    .await;
    assert_eq!(s, 200);
    audit_until(&app, &app.token, "/v1/ai/approvals", |v| {
        items(v).len() == 1
    })
    .await;
    // Only approvers see the queue.
    let (_, team) = app.user_with_role(RoleRef::Builtin(Role::Team)).await;
    let (s, _) = call(&app, &team, reqwest::Method::GET, "/v1/ai/approvals", None).await;
    assert_eq!(s, 403);
    app.stop().await;
}

#[tokio::test]
async fn the_sweep_records_expiries_and_finishes_runs_cut_short() {
    let app = TestApp::spawn().await;
    let (_, _, agent, _) = admin_and_agent(&app).await;
    let contact = new_contact(&app, json!({"given_name": "Ada"})).await;
    // Approved, then the service stopped before it ran: nobody approves it again.
    let (_, cut) = propose(
        &app,
        &agent,
        update(&contact, json!({"family_name": "Byron"})),
    )
    .await;
    let cut_id = approved_in_the_store_only(&app, &cut).await;
    // A proposal nobody decides, with one second to decide it.
    let (s, _) = call(
        &app,
        &app.token,
        reqwest::Method::PUT,
        "/v1/ai/oversight",
        Some(json!({"oversight": "standard", "approval_ttl_secs": 1, "reason": "test"})),
    )
    .await;
    assert_eq!(s, 200);
    let (_, late) = propose(&app, &agent, update(&contact, json!({"given_name": "Zoe"}))).await;
    let late_id = late["id"].as_str().unwrap().to_owned();
    // The sweep records the expiry on its own, and it leaves the queue.
    let log = audit_until(&app, &app.token, "/v1/ai/audit?status=expired", |v| {
        items(v).len() == 1
    })
    .await;
    let expired = &items(&log)[0];
    assert_eq!(expired["id"], late_id.as_str());
    let last = expired["steps"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (
            last["step"].as_str(),
            last["by"]["kind"].as_str(),
            last["by"]["id"].as_str()
        ),
        (Some("expired"), Some("system"), Some("ai-sweep"))
    );
    let (_, queue) = call(
        &app,
        &app.token,
        reqwest::Method::GET,
        "/v1/ai/approvals",
        None,
    )
    .await;
    assert!(items(&queue).is_empty(), "{queue}");
    // The run cut short is finished by the sweep, exactly once.
    let done = audit_until(&app, &app.token, "/v1/ai/audit?status=executed", |v| {
        items(v).len() == 1
    })
    .await;
    assert_eq!(items(&done)[0]["id"], cut_id.as_str());
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(caused(&app, &contact, &cut_id).await.len(), 1);
    assert!(caused(&app, &contact, &late_id).await.is_empty());
    let got: Value = app
        .get(&format!("/v1/contacts/{contact}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got["family_name"], "Byron");
    app.stop().await;
}

/// Approves `action` (as proposed) as `token`: the answer.
async fn approve(app: &TestApp, token: &str, action: &Value) -> Value {
    let id = action["id"].as_str().unwrap();
    let (s, v) = post(
        app,
        token,
        &format!("/v1/ai/actions/{id}/approve"),
        json!({"arguments_sha256": action["arguments_sha256"]}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v
}

/// The ids of the events of stream (`aggregate_type`, `id`) caused by `action`.
async fn caused_in(app: &TestApp, aggregate_type: &str, id: &str, action: &Value) -> Value {
    let rows = app
        .db()
        .await
        .query(
            "SELECT event_id FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 \
               AND metadata ->> 'causation_id' = $3 ORDER BY sequence",
            &[&aggregate_type, &id, &action["id"].as_str().unwrap()],
        )
        .await
        .unwrap();
    json!(rows.iter().map(|r| r.get::<_, Uuid>(0)).collect::<Vec<_>>())
}

#[tokio::test]
async fn consent_do_not_contact_bulk_and_role_changes_run_as_their_commands_once_approved() {
    let app = TestApp::spawn().await;
    let (_, admin, agent, _) = admin_and_agent(&app).await;
    let ada = new_contact(
        &app,
        json!({"given_name": "Ada", "email": "ada@example.com"}),
    )
    .await;
    let contacts = [
        ada.clone(),
        new_contact(&app, json!({"given_name": "Bob"})).await,
        new_contact(&app, json!({"given_name": "Cy"})).await,
    ];

    // A consent change: medium, waits, then is recorded with the action as its cause.
    let (s, consent) = propose(
        &app,
        &agent,
        json!({"type": "change_consent", "contact_id": ada, "arguments": {
            "channel": "email", "purpose": "service", "status": "granted", "source": "form",
            "notice": {"id": "privacy-policy", "version": "2026-01",
                       "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}}}),
    )
    .await;
    assert_eq!(s, 201, "{consent}");
    assert_eq!(
        (consent["status"].as_str(), consent["rule"].as_str()),
        (Some("pending_approval"), Some("consent"))
    );
    let done = approve(&app, &admin, &consent).await;
    assert_eq!(done["status"], "executed", "{done}");
    let events = caused_in(&app, "consent", &ada, &consent).await;
    assert_eq!(events.as_array().unwrap().len(), 1);
    assert_eq!(done["result_events"], events);

    // Do Not Contact: setting it is medium, lifting it high; both run once approved.
    for (kind, rule) in [
        ("set_do_not_contact", "set_do_not_contact"),
        ("lift_do_not_contact", "lift_do_not_contact"),
    ] {
        let (s, dnc) = propose(
            &app,
            &agent,
            json!({"type": kind, "contact_id": ada, "arguments": {"reason": "asked by mail"}}),
        )
        .await;
        assert_eq!((s, dnc["rule"].as_str()), (201, Some(rule)), "{dnc}");
        let done = approve(&app, &admin, &dnc).await;
        assert_eq!(done["status"], "executed", "{done}");
        assert_eq!(
            caused_in(&app, "consent", &ada, &dnc)
                .await
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }
    let (_, lifted) = propose(
        &app,
        &agent,
        json!({"type": "lift_do_not_contact", "contact_id": ada, "arguments": {}}),
    )
    .await;
    assert_eq!(lifted["risk"], "high");

    // A bulk update: each contact once, all events on the action.
    let (s, bulk) = propose(
        &app,
        &agent,
        json!({"type": "bulk_update", "contact_ids": contacts, "arguments": {"company": "Acme"}}),
    )
    .await;
    assert_eq!(
        (s, bulk["rule"].as_str(), bulk["contacts"].clone()),
        (201, Some("bulk"), json!(contacts)),
        "{bulk}"
    );
    let done = approve(&app, &admin, &bulk).await;
    assert_eq!(done["status"], "executed", "{done}");
    let mut all = Vec::new();
    for c in &contacts {
        let ids = caused_in(&app, "contact", c, &bulk).await;
        assert_eq!(ids.as_array().unwrap().len(), 1, "{c}");
        all.extend(ids.as_array().unwrap().clone());
        // The read model follows the events.
        eventually(Duration::from_secs(10), || async {
            let got: Value = app
                .get(&format!("/v1/contacts/{c}"))
                .await
                .json()
                .await
                .unwrap();
            (got["company"] == "Acme").then_some(())
        })
        .await
        .expect("the contact read model shows the bulk change");
    }
    assert_eq!(done["result_events"], json!(all));
    // The approval, the contacts' changes and the outcome are one commit.
    let bulk_id = bulk["id"].as_str().unwrap();
    let txs: i64 = app
        .db()
        .await
        .query_one(
            "SELECT count(DISTINCT tx_id) FROM events WHERE (aggregate_id = $1 AND sequence > 2)              OR metadata ->> 'causation_id' = $1",
            &[&bulk_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(txs, 1, "one commit from the approval on");

    // A bulk update one of whose contacts the route refuses (archived): all or none, so
    // none is changed, and the failure names the contact.
    let r = app
        .post(&format!("/v1/contacts/{}/archive", contacts[2]), &json!({}))
        .await;
    assert_eq!(r.status(), 200);
    let (s, partial) = propose(
        &app,
        &agent,
        json!({"type": "bulk_update", "contact_ids": contacts, "arguments": {"company": "Globex"}}),
    )
    .await;
    assert_eq!(s, 201, "{partial}");
    let failed = approve(&app, &admin, &partial).await;
    assert_eq!(
        (failed["status"].as_str(), failed["failure_reason"].as_str()),
        (Some("failed"), Some("version_conflict")),
        "{failed}"
    );
    let detail = failed["failure_detail"].as_str().unwrap();
    assert!(
        detail.contains(&contacts[2]) && detail.contains("3 of 3") && detail.contains("none"),
        "{detail}"
    );
    assert_eq!(failed["result_events"], json!([]));
    for c in &contacts {
        assert_eq!(
            caused_in(&app, "contact", c, &partial).await,
            json!([]),
            "{c}"
        );
    }

    // A role change: high; the agent needs users.manage to propose it.
    let (target, _) = app.user_with_role(RoleRef::Builtin(Role::Team)).await;
    let (s, refused) = propose(
        &app,
        &agent,
        json!({"type": "change_permissions", "user_id": target, "arguments": {"role": "support"}}),
    )
    .await;
    assert_eq!(s, 403, "{refused}");
    let (s, key) = post(
        &app,
        &admin,
        "/v1/api-keys",
        json!({"name": "Ops agent", "role": "admin", "kind": "agent"}),
    )
    .await;
    assert_eq!(s, 201, "{key}");
    let ops = key["key"].as_str().unwrap();
    let (s, role) = propose(
        &app,
        ops,
        json!({"type": "change_permissions", "user_id": target, "arguments": {"role": "support"}}),
    )
    .await;
    assert_eq!(
        (s, role["risk"].as_str(), role["rule"].as_str()),
        (201, Some("high"), Some("permissions")),
        "{role}"
    );
    assert_eq!(role["user_id"], target.to_string());
    let done = approve(&app, &admin, &role).await;
    assert_eq!(done["status"], "executed", "{done}");
    let (_, user) = call(
        &app,
        &admin,
        reqwest::Method::GET,
        &format!("/v1/users/{target}"),
        None,
    )
    .await;
    assert_eq!(user["role"], "support", "{user}");

    // What each type takes is checked at the proposal.
    for (body, status) in [
        (
            json!({"type": "update_contact", "contact_ids": [ada], "arguments": {"company": "X"}}),
            422,
        ),
        (
            json!({"type": "bulk_update", "contact_ids": [ada, ada], "arguments": {"company": "X"}}),
            422,
        ),
        (
            json!({"type": "bulk_update", "contact_ids": [], "arguments": {"company": "X"}}),
            422,
        ),
        (
            json!({"type": "bulk_update", "contact_ids": [ada, Uuid::now_v7()], "arguments": {"company": "X"}}),
            404,
        ),
        (
            json!({"type": "change_consent", "contact_id": ada, "arguments": {"channel": "email", "purpose": "Not A Key", "status": "granted"}}),
            422,
        ),
        (
            json!({"type": "change_permissions", "user_id": target, "arguments": {"role": "emperor"}}),
            422,
        ),
        (
            json!({"type": "change_permissions", "user_id": Uuid::now_v7(), "arguments": {"role": "team"}}),
            404,
        ),
        (
            json!({"type": "set_do_not_contact", "user_id": target, "arguments": {}}),
            422,
        ),
    ] {
        let (s, v) = propose(&app, ops, body.clone()).await;
        assert_eq!(s, status, "{body}: {v}");
    }
    app.stop().await;
}

#[tokio::test]
async fn concurrent_actions_on_one_contact_each_run_once_or_fail_whole() {
    let app = TestApp::spawn().await;
    let (_, _, agent, _) = admin_and_agent(&app).await;
    let contact = new_contact(&app, json!({"given_name": "Ada"})).await;
    // Twelve low-risk changes of the same contact at once: each runs at once, or (its
    // contact moved on under it each time it tried) ends failed with the route's
    // version conflict; none is lost, none is half written, none runs twice.
    let answers = futures::future::join_all((0..12).map(|n| {
        let (app, agent, contact) = (&app, &agent, &contact);
        async move {
            propose(
                app,
                agent,
                update(contact, json!({"company": format!("Company {n}")})),
            )
            .await
        }
    }))
    .await;
    let mut executed = 0;
    for (s, done) in &answers {
        assert_eq!(*s, 201, "{done}");
        let id = done["id"].as_str().unwrap();
        let events = caused(&app, &contact, id).await;
        match done["status"].as_str() {
            Some("executed") => {
                executed += 1;
                assert_eq!(events.len(), 1, "{done}");
                assert_eq!(done["result_events"], json!([events[0].0]));
            }
            Some("failed") => {
                assert_eq!(done["failure_reason"], "version_conflict", "{done}");
                assert!(events.is_empty(), "{done}");
            }
            other => panic!("{other:?}: {done}"),
        }
        let (_, read) = action(&app, &agent, id).await;
        assert_eq!(&read, done);
    }
    assert!(executed >= 1);
    // A change the route refuses (the contact is archived) ends failed at once, with
    // the route's code and message, in the same one commit, and changes nothing.
    let archived = new_contact(&app, json!({"given_name": "Bob"})).await;
    let r = app
        .post(&format!("/v1/contacts/{archived}/archive"), &json!({}))
        .await;
    assert_eq!(r.status(), 200);
    let (s, refused) = propose(&app, &agent, update(&archived, json!({"company": "X"}))).await;
    assert_eq!(s, 201, "{refused}");
    assert_eq!(
        (
            refused["status"].as_str(),
            refused["failure_reason"].as_str()
        ),
        (Some("failed"), Some("version_conflict")),
        "{refused}"
    );
    assert!(
        refused["failure_detail"]
            .as_str()
            .unwrap()
            .contains("archived"),
        "{refused}"
    );
    let id = refused["id"].as_str().unwrap();
    assert!(caused(&app, &archived, id).await.is_empty());
    let (_, read) = action(&app, &agent, id).await;
    assert_eq!(read, refused);
    // The contact holds every change that was recorded as executed.
    let history: i64 = app
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM events WHERE aggregate_id = $1 AND sequence > 1",
            &[&contact],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(history, executed);
    app.stop().await;
}

#[tokio::test]
async fn an_export_and_an_erasure_wait_for_approval_then_run_as_the_proposer_once() {
    let app = TestApp::spawn().await;
    // An agent of the Owner with Admin rights (exports and erasures need them); a
    // Team agent may not even propose them.
    let (s, issued) = post(
        &app,
        &app.token,
        "/v1/api-keys",
        json!({"name": "Privacy assistant", "role": "admin", "kind": "agent"}),
    )
    .await;
    assert_eq!(s, 201, "{issued}");
    let agent = issued["key"].as_str().unwrap().to_owned();
    let (_, _, team_agent, _) = admin_and_agent(&app).await;
    let contact = new_contact(
        &app,
        json!({"given_name": "Grace", "email": format!("{}@example.com", Uuid::new_v4().simple())}),
    )
    .await;
    for kind in ["export", "erase"] {
        let (s, v) = propose(
            &app,
            &team_agent,
            json!({"type": kind, "contact_id": contact, "arguments": {}}),
        )
        .await;
        assert_eq!(s, 403, "{kind}: {v}");
    }
    let (s, v) = propose(
        &app,
        &agent,
        json!({"type": "erase", "contact_id": contact, "arguments": {"why": "x"}}),
    )
    .await;
    assert_eq!(s, 422, "erase takes no arguments: {v}");

    // Export: high risk, so it waits; approved, it runs once as the agent.
    let (s, pending) = propose(
        &app,
        &agent,
        json!({"type": "export", "contact_id": contact, "arguments": {},
               "reasoning_summary": "the contact asked for a copy"}),
    )
    .await;
    assert_eq!(s, 201, "{pending}");
    assert_eq!(
        (pending["status"].as_str(), pending["risk"].as_str()),
        (Some("pending_approval"), Some("high")),
        "{pending}"
    );
    let id = pending["id"].as_str().unwrap().to_owned();
    let r = app
        .http
        .get(app.url(&format!("/v1/ai/actions/{id}/export")))
        .bearer_auth(&agent)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409, "not executed yet");
    let done = approve(&app, &app.token, &pending).await;
    assert_eq!(done["status"], "executed", "{done}");
    let exported = caused_in(&app, "contact", &contact, &pending).await;
    assert_eq!(done["result_events"], exported, "{done}");
    let r = app
        .http
        .get(app.url(&format!("/v1/ai/actions/{id}/export")))
        .bearer_auth(&agent)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let doc: Value = r.json().await.unwrap();
    assert_eq!(doc["contact"]["given_name"], "Grace", "{doc}");
    assert_eq!(doc["schema"], "crm.contact-export.v1");
    // Only the proposer downloads it.
    let r = app
        .http
        .get(app.url(&format!("/v1/ai/actions/{id}/export")))
        .bearer_auth(&app.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Erasure: waits, then runs the erasure with the action as causation.
    let (s, pending) = propose(
        &app,
        &agent,
        json!({"type": "erase", "contact_id": contact, "arguments": {}}),
    )
    .await;
    assert_eq!(
        (s, pending["status"].as_str(), pending["rule"].as_str()),
        (201, Some("pending_approval"), Some("erase")),
        "{pending}"
    );
    let done = approve(&app, &app.token, &pending).await;
    assert_eq!(done["status"], "executed", "{done}");
    let tombstone = caused_in(&app, "contact", &contact, &pending).await;
    assert_eq!(done["result_events"], tombstone, "{done}");
    let receipts = eventually(Duration::from_secs(5), || async {
        let (s, v) = call(
            &app,
            &app.token,
            reqwest::Method::GET,
            &format!("/v1/erasures?contact_id={contact}"),
            None,
        )
        .await;
        (s == 200 && !v["items"].as_array().unwrap().is_empty()).then_some(v)
    })
    .await
    .expect("the erasure's receipt is listed");
    assert_eq!(receipts["items"][0]["source"], "ai_action", "{receipts}");
    assert_eq!(receipts["items"][0]["tombstone"]["event_id"], tombstone[0]);
    // The action's own record went with it: its key was the contact's to destroy.
    let (s, audit) = call(
        &app,
        &app.token,
        reqwest::Method::GET,
        &format!("/v1/ai/audit?contact_id={contact}"),
        None,
    )
    .await;
    assert_eq!(s, 200, "{audit}");
    assert!(
        audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["reasoning_summary"].is_null()),
        "{audit}"
    );
    app.stop().await;
}
