//! The tools an agent sees, and what calling one does.
//!
//! Every tool is a call of one declared operation of the API ([`crate::routes::table`])
//! as the agent, in this process ([`crate::edge::call_as`]): the route's permission,
//! its extractors' validation, its handler (field-level redaction, the risk policy, the
//! approval queue) are the API's own. Nothing here decides anything.
//!
//! - Read tools: `search_contacts` (`GET /v1/contacts`), `get_contact`
//!   (`GET /v1/contacts/{id}`), `get_consent` (`GET /v1/contacts/{id}/consent`).
//! - One write tool per kind of AI action the API serves, named after the kind (the
//!   `type` of `POST /v1/ai/actions`): the kinds, and each tool's input schema, are read
//!   from the OpenAPI document generated from the route table, so a kind added to the
//!   API gets its tool without a change here. [`COMMANDS`] adds, per kind, a
//!   description and the command route whose body `arguments` is (its exact schema);
//!   a kind it lacks still gets a tool, its `arguments` any object.
//!
//! A refusal (401/403/404/409/422…) is a tool result with `isError: true` whose text is
//! the API's JSON error body; only a call of no tool is a protocol error.

use std::collections::BTreeSet;
use std::sync::Arc;

use http_body_util::BodyExt;
use rmcp::handler::server::common::schema_for_input;
use rmcp::model::{CallToolResult, JsonObject, Tool, ToolAnnotations};
use rmcp::schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use uuid::Uuid;
use warp::http::Method;

use crate::edge::route::Route;
use crate::error::ApiError;
use crate::routes::Authed;
use crate::state::AppState;

/// `search_contacts`: the filters of `GET /v1/contacts` an agent needs.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(crate = "rmcp::schemars")]
struct SearchContacts {
    /// A case-insensitive substring of the contact's given or family name, email or
    /// company.
    #[serde(skip_serializing_if = "Option::is_none")]
    q: Option<String>,
    /// An exact email address (needs read access to `email`).
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<String>,
    /// An exact company name (needs read access to `company`).
    #[serde(skip_serializing_if = "Option::is_none")]
    company: Option<String>,
    /// How many contacts at most, 1 to 500 (default 50).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 500))]
    limit: Option<i64>,
    /// The `next_after` of the previous answer, for the next page.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", extend("format" = "uuid"))]
    after: Option<Uuid>,
}

/// `get_contact`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(crate = "rmcp::schemars")]
struct GetContact {
    /// The contact's id.
    #[schemars(with = "String", extend("format" = "uuid"))]
    id: Uuid,
}

/// `get_consent`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(crate = "rmcp::schemars")]
struct GetConsent {
    /// The contact's id.
    #[schemars(with = "String", extend("format" = "uuid"))]
    contact_id: Uuid,
}

/// Per kind of AI action: what its tool does, for the model reading the list, and the
/// command route whose body its `arguments` are (docs/ai.md).
pub(crate) const COMMANDS: &[(&str, &str, Method, &str)] = &[
    (
        "update_contact",
        "Change fields of one contact. `arguments` is the change: a field set to a value \
         is set, a field set to null is cleared, an absent field is left alone; at least \
         one field. Changing `company` only is low risk; any other field is personal data \
         (medium risk).",
        Method::PATCH,
        "/v1/contacts/{id}",
    ),
    (
        "send_message",
        "Send one message to one contact on a channel, for a purpose. It passes the \
         consent gate when it runs: without consent it is blocked (status `failed`, \
         `failure_reason` the gate's reason).",
        Method::POST,
        "/v1/contacts/{id}/messages",
    ),
    (
        "bulk_update",
        "Make the same change to several contacts (`contact_ids`, 1 to 1,000, each once). \
         `arguments` is the change, as for update_contact. Always waits for a person's \
         approval (medium risk; high above 100 contacts); then each contact is changed once.",
        Method::PATCH,
        "/v1/contacts/{id}",
    ),
    (
        "change_consent",
        "Record a consent change of one contact (channel, purpose, status granted, withdrawn \
         or denied, and its proof). Medium risk: waits for approval.",
        Method::POST,
        "/v1/contacts/{id}/consent",
    ),
    (
        "set_do_not_contact",
        "Mark one contact Do Not Contact (every channel blocked), with an optional reason. \
         Medium risk: waits for approval.",
        Method::POST,
        "/v1/contacts/{id}/do-not-contact",
    ),
    (
        "lift_do_not_contact",
        "Lift one contact's Do Not Contact mark, with an optional reason. High risk: waits \
         for approval.",
        Method::POST,
        "/v1/contacts/{id}/do-not-contact/lift",
    ),
    (
        "change_permissions",
        "Change a staff user's role (`user_id`). High risk: waits for approval; it runs only \
         if your own rights cover the role.",
        Method::POST,
        "/v1/users/{id}/role",
    ),
    (
        "export",
        "Export everything held about one contact (profile, consent and its log, messages, \
         AI actions, activity, history), `arguments` `{}`. High risk: waits for approval; \
         once executed, you download it at `GET /v1/ai/actions/{id}/export`.",
        Method::GET,
        "/v1/contacts/{id}/export",
    ),
    (
        "erase",
        "Erase one contact for good (GDPR Art. 17): its data keys are destroyed, its \
         personal data is gone from every read model, its addresses are suppressed; \
         `arguments` `{}`. High risk: waits for approval; refused under a legal hold.",
        Method::POST,
        "/v1/contacts/{id}/erase",
    ),
];

/// What every write tool says about where its action goes.
const WRITE_TOOL_NOTE: &str = "Nothing changes directly: this proposes an AI action, which \
     the organisation's risk policy assesses. It runs at once when the policy allows \
     (answer `status: executed`, with `result_events`), otherwise it waits for a person to \
     approve it (answer `status: pending_approval`, with its `id` and `expires_at`). \
     `failed` says why in `failure_reason`. Say why you propose it in `reasoning_summary`; \
     `initiated_by: user` with `on_behalf_of` when a user asked for it (default \
     `autonomous`).";

/// What calling a tool does.
#[derive(Debug, Clone)]
enum Op {
    SearchContacts,
    GetContact,
    GetConsent,
    /// Propose an AI action of this kind (`POST /v1/ai/actions`).
    Propose(String),
}

/// The tools, built once per process.
pub(crate) struct Catalog {
    table: Vec<Route>,
    tools: Vec<(Tool, Op)>,
}

impl Catalog {
    pub(crate) fn new() -> Self {
        let doc = crate::openapi::document();
        let read = ToolAnnotations::new()
            .read_only(true)
            .destructive(false)
            .open_world(false);
        let mut tools = vec![
            (
                Tool::new(
                    "search_contacts",
                    "Search the organisation's contacts. Filters combine; none lists every \
                     contact. Answers `{items, next_after}`: pass `next_after` as `after` for \
                     the next page (null on the last). Each contact carries only the fields \
                     your role may read (the others are absent); filtering by a field you may \
                     not read is refused.",
                    input_schema::<SearchContacts>(),
                )
                .annotate(read.clone()),
                Op::SearchContacts,
            ),
            (
                Tool::new(
                    "get_contact",
                    "Read one contact by id: its fields (only those your role may read; the \
                     others are absent), version, archived flag and times.",
                    input_schema::<GetContact>(),
                )
                .annotate(read.clone()),
                Op::GetContact,
            ),
            (
                Tool::new(
                    "get_consent",
                    "A contact's consent now: each consent record (channel, purpose, status, \
                     expiry; the contact point when your role may read it), whether the \
                     contact is marked Do Not Contact, and whether they opted out of sale or \
                     sharing of their data. Check it before proposing a message.",
                    input_schema::<GetConsent>(),
                )
                .annotate(read),
                Op::GetConsent,
            ),
        ];
        for kind in action_kinds(&doc) {
            let command = COMMANDS.iter().find(|(k, ..)| *k == kind);
            let what = command.map_or(
                "Propose this kind of AI action (docs/ai.md). `arguments` is the body of the \
                 command it runs.",
                |(_, what, ..)| what,
            );
            let body = command.and_then(|(_, _, method, path)| {
                let schema = body_schema(&doc, method, path)?;
                Some((
                    schema,
                    format!("The command's body, as `{method} {path}` takes it."),
                ))
            });
            let tool = Tool::new(
                kind.clone(),
                format!("{what}\n\n{WRITE_TOOL_NOTE}"),
                Arc::new(propose_schema(&doc, &kind, body)),
            )
            .annotate(
                ToolAnnotations::new()
                    .read_only(false)
                    .idempotent(false)
                    .open_world(false),
            );
            tools.push((tool, Op::Propose(kind)));
        }
        Self {
            table: crate::routes::table::table(),
            tools,
        }
    }

    pub(crate) fn tools(&self) -> Vec<Tool> {
        self.tools.iter().map(|(t, _)| t.clone()).collect()
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.tools.iter().any(|(t, _)| t.name == name)
    }

    /// Calls tool `name` (one of [`Self::has`]) with `arguments` as `caller`.
    pub(crate) async fn call(
        &self,
        state: &AppState,
        caller: Authed,
        name: &str,
        arguments: JsonObject,
    ) -> CallToolResult {
        let Some((_, op)) = self.tools.iter().find(|(t, _)| t.name == name) else {
            return refusal(&caller, ApiError::NotFound("no such tool")).await;
        };
        let args = Value::Object(arguments);
        let request_id = caller.ctx.request_id.clone();
        let answer = match op {
            Op::SearchContacts => match parse::<SearchContacts>(args) {
                Ok(q) => {
                    let query = serde_urlencoded::to_string(&q).unwrap_or_default();
                    self.api(state, caller, Method::GET, "/v1/contacts", query, None)
                        .await
                }
                Err(e) => Err(e),
            },
            Op::GetContact => match parse::<GetContact>(args) {
                Ok(GetContact { id }) => {
                    let path = format!("/v1/contacts/{id}");
                    self.api(state, caller, Method::GET, &path, String::new(), None)
                        .await
                }
                Err(e) => Err(e),
            },
            Op::GetConsent => match parse::<GetConsent>(args) {
                Ok(GetConsent { contact_id }) => {
                    let path = format!("/v1/contacts/{contact_id}/consent");
                    self.api(state, caller, Method::GET, &path, String::new(), None)
                        .await
                }
                Err(e) => Err(e),
            },
            Op::Propose(kind) => {
                let mut body = args;
                // The tool names the kind; a `type` in the arguments is not the agent's
                // to choose here.
                body["type"] = json!(kind);
                self.api(
                    state,
                    caller,
                    Method::POST,
                    "/v1/ai/actions",
                    String::new(),
                    Some(&body),
                )
                .await
                .map(|action| action_summary(&action))
            }
        };
        match answer {
            Ok(value) => CallToolResult::structured(value),
            Err(e) => CallToolResult::structured_error(error_body(e, &request_id).await),
        }
    }

    /// The API's answer to `method path` as `caller`: its JSON body, or its refusal.
    async fn api(
        &self,
        state: &AppState,
        caller: Authed,
        method: Method,
        path: &str,
        query: String,
        body: Option<&Value>,
    ) -> Result<Value, Refused> {
        let response = crate::edge::call_as(state, &self.table, caller, method, path, query, body)
            .await
            .map_err(Refused::Api)?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| Refused::Api(ApiError::internal(e)))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_client_error() || status.is_server_error() {
            return Err(Refused::Answered(value));
        }
        Ok(value)
    }
}

/// Why a tool call did not succeed.
enum Refused {
    /// An error not yet written out.
    Api(ApiError),
    /// The API's error body, as it answered.
    Answered(Value),
}

/// The API's JSON error body for `refused`.
async fn error_body(refused: Refused, request_id: &str) -> Value {
    match refused {
        Refused::Answered(v) => v,
        Refused::Api(e) => {
            // The one error shape, written by the one mapping (which also logs what
            // must be logged).
            let bytes = e
                .into_response(request_id)
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        }
    }
}

async fn refusal(caller: &Authed, e: ApiError) -> CallToolResult {
    CallToolResult::structured_error(error_body(Refused::Api(e), &caller.ctx.request_id).await)
}

/// A tool's arguments as `T`: a member of the wrong type, unknown or missing is refused
/// as the API refuses a body (400 `invalid_body` naming it).
fn parse<T: serde::de::DeserializeOwned>(args: Value) -> Result<T, Refused> {
    let bytes = serde_json::to_vec(&args).unwrap_or_default();
    crate::edge::extract::parse_json(&bytes).map_err(Refused::Api)
}

/// What a write tool answers: where the action stands.
fn action_summary(action: &Value) -> Value {
    let mut out = Map::new();
    for key in ["id", "status", "risk", "rule"] {
        out.insert(key.into(), action[key].clone());
    }
    for key in ["expires_at", "failure_reason"] {
        if !action[key].is_null() {
            out.insert(key.into(), action[key].clone());
        }
    }
    if action["result_events"]
        .as_array()
        .is_some_and(|e| !e.is_empty())
    {
        out.insert("result_events".into(), action["result_events"].clone());
    }
    Value::Object(out)
}

fn input_schema<T: JsonSchema + 'static>() -> Arc<JsonObject> {
    // The argument types are plain structs: their schemas are objects.
    schema_for_input::<T>().unwrap_or_else(|e| panic!("tool input schema: {e}"))
}

/// The kinds of AI action the API serves: the values of `type` in the body of
/// `POST /v1/ai/actions` (one shape per type or two), as the document states them.
fn action_kinds(doc: &Value) -> Vec<String> {
    proposal_shapes(doc)
        .iter()
        .flat_map(|shape| shape["properties"]["type"]["enum"].as_array().cloned())
        .flatten()
        .filter_map(|k| k.as_str().map(str::to_owned))
        .collect()
}

/// The shapes of the body of `POST /v1/ai/actions` (`oneOf`, one per type or two).
fn proposal_shapes(doc: &Value) -> Vec<Value> {
    doc["components"]["schemas"]["AiProposeInput"]["oneOf"]
        .as_array()
        .map(|shapes| shapes.iter().map(|s| resolve(doc, s).clone()).collect())
        .unwrap_or_default()
}

/// A schema, or the one its `$ref` names.
fn resolve<'d>(doc: &'d Value, schema: &'d Value) -> &'d Value {
    match schema["$ref"]
        .as_str()
        .and_then(|r| r.strip_prefix("#/components/schemas/"))
    {
        Some(name) => &doc["components"]["schemas"][name],
        None => schema,
    }
}

/// The schema of the JSON body of `method path` in the document.
fn body_schema(doc: &Value, method: &Method, path: &str) -> Option<Value> {
    let schema = doc["paths"][path][method.as_str().to_ascii_lowercase()]["requestBody"]["content"]
        ["application/json"]["schema"]
        .clone();
    (!schema.is_null()).then_some(schema)
}

/// A propose tool's input: the body of `POST /v1/ai/actions` without `type` (the tool
/// names it), `arguments` as the command route's body (`body`: its schema and a
/// description) when known, with every schema it refers to under `$defs`. Examples
/// (the document's, written for the REST body) are left out.
fn propose_schema(doc: &Value, kind: &str, body: Option<(Value, String)>) -> JsonObject {
    // The kind's own shape: the one target it takes, required, and its arguments.
    let mut schema = proposal_shapes(doc)
        .into_iter()
        .find(|shape| {
            shape["properties"]["type"]["enum"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|k| k == kind))
        })
        .unwrap_or_else(|| json!({"type": "object", "properties": {}, "required": []}));
    if let Some(props) = schema["properties"].as_object_mut() {
        props.remove("type");
        let arguments = match body {
            Some((mut b, description)) => {
                if let Some(obj) = b.as_object_mut() {
                    // A `$ref` with siblings is fine in JSON Schema 2020-12.
                    obj.insert("description".into(), json!(description));
                }
                b
            }
            None => json!({
                "type": "object",
                "description": "The body of the command the action runs (docs/ai.md)."
            }),
        };
        props.insert("arguments".into(), arguments);
    }
    if let Some(required) = schema["required"].as_array_mut() {
        required.retain(|r| r != "type");
    }
    if let Some(obj) = schema.as_object_mut() {
        obj.remove("example");
        obj.remove("description");
    }
    // Every schema referred to, transitively, under `$defs`, and the references
    // rewritten to point there.
    let mut names = BTreeSet::new();
    let mut pending = vec![schema.clone()];
    while let Some(s) = pending.pop() {
        let mut found = Vec::new();
        references(&s, &mut found);
        for name in found {
            if names.insert(name.clone()) {
                pending.push(doc["components"]["schemas"][&name].clone());
            }
        }
    }
    let mut defs = Map::new();
    for name in names {
        let mut def = doc["components"]["schemas"][&name].clone();
        if let Some(obj) = def.as_object_mut() {
            obj.remove("example");
        }
        rewrite_references(&mut def);
        defs.insert(name, def);
    }
    rewrite_references(&mut schema);
    let mut out = match schema {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    out.insert("type".into(), json!("object"));
    if !defs.is_empty() {
        out.insert("$defs".into(), Value::Object(defs));
    }
    out
}

/// The names of the component schemas `schema` refers to.
fn references(schema: &Value, out: &mut Vec<String>) {
    match schema {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v.as_str()) {
                    ("$ref", Some(r)) => {
                        if let Some(name) = r.strip_prefix("#/components/schemas/") {
                            out.push(name.to_owned());
                        }
                    }
                    _ => references(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| references(v, out)),
        _ => {}
    }
}

fn rewrite_references(schema: &mut Value) {
    match schema {
        Value::Object(m) => {
            for (k, v) in m.iter_mut() {
                match (k.as_str(), v.as_str()) {
                    ("$ref", Some(r)) => {
                        if let Some(name) = r.strip_prefix("#/components/schemas/") {
                            *v = json!(format!("#/$defs/{name}"));
                        }
                    }
                    _ => rewrite_references(v),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(rewrite_references),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_served_kind_has_a_tool_with_the_command_body_as_arguments() {
        let catalog = Catalog::new();
        let names: Vec<String> = catalog.tools().iter().map(|t| t.name.to_string()).collect();
        for name in ["search_contacts", "get_contact", "get_consent"] {
            assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
        }
        let doc = crate::openapi::document();
        let kinds = action_kinds(&doc);
        assert!(kinds.contains(&"update_contact".to_owned()), "{kinds:?}");
        for kind in &kinds {
            let tool = catalog
                .tools()
                .into_iter()
                .find(|t| t.name == kind.as_str())
                .unwrap_or_else(|| panic!("no tool for {kind}"));
            let schema = Value::Object(tool.input_schema.as_ref().clone());
            assert_eq!(schema["type"], "object");
            assert!(schema["properties"].get("type").is_none(), "{schema}");
            assert!(schema["required"]
                .as_array()
                .unwrap()
                .contains(&json!("arguments")));
            // Every reference resolves inside the schema itself.
            let mut refs = Vec::new();
            let text = schema.to_string();
            let mut rest = text.as_str();
            while let Some(i) = rest.find("\"$ref\":\"") {
                rest = &rest[i + 8..];
                refs.push(rest[..rest.find('"').unwrap()].to_owned());
            }
            for r in refs {
                let name = r.strip_prefix("#/$defs/").expect("a local reference");
                assert!(
                    schema["$defs"].get(name).is_some(),
                    "{kind}: {r} unresolved"
                );
            }
        }
        // A kind with a command route: `arguments` is that route's body.
        let update = catalog
            .tools()
            .into_iter()
            .find(|t| t.name == "update_contact")
            .unwrap();
        assert_eq!(
            update.input_schema["properties"]["arguments"]["$ref"],
            "#/$defs/ContactInput"
        );
    }
}
