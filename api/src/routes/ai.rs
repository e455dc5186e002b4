//! AI actions (docs/ai.md): an agent, or a user through an assistant, proposes a
//! domain command; the risk policy (`crm_domain::ai::risk`) decides whether it runs at
//! once or waits for a human holding `ai.approve`; once approved it runs as the real
//! command, as its proposer with the proposer's rights at that moment, through the same
//! permission, field-level and send-gate checks as any caller, with the action's id as
//! causation id; the outcome (the events it produced, or the refusal's reason code) is
//! recorded on the action. Each step is an event of the action's own stream.
//!
//! Served kinds: `update_contact`, `bulk_update`, `send_message`, `change_consent`,
//! `set_do_not_contact`, `lift_do_not_contact` and `change_permissions` (a user's
//! role). Export and erasure arrive with the data-subject rights (their commands do not
//! exist yet).

use chrono::{DateTime, Duration, Utc};
use cqrs_es::Aggregate;
use crm_domain::access::Permission;
use crm_domain::ai::risk::{ActionKind, InitiatorKind, Oversight, RiskInput};
use crm_domain::ai::{
    ActionStatus, AiAction, AiActionCommand, AiActionEvent, AiSettings, AiSettingsCommand, Content,
    Initiator, ModelInfo, Request,
};
use crm_domain::consent::ledger::ConsentLedger;
use crm_domain::contact::{Contact, RequestSource};
use crm_domain::message::Message;
use crm_domain::metadata::PrincipalKind;
use crm_domain::user::User;
use crm_infra::commands::executor::Loaded;
use crm_infra::store::decode::decode;
use crm_infra::store::event_store::{self, StreamHead, StreamId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use uuid::Uuid;

use super::consent::{ConsentInput, ReasonInput};
use super::contacts::ContactInput;
use super::messages::MessageInput;
use super::rights::ExportDocument;
use super::users::RoleChange;
use super::Authed;
use crate::auth::Caller;
use crate::edge::extract::{Id, Json};
use crate::edge::reply::{Created, Ok200, RawAs};
use crate::error::{ApiError, FieldError};
use crate::state::AppState;

/// The kinds of action served so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum AiActionKind {
    /// `contact_id`; `arguments` as `PATCH /v1/contacts/{id}` takes its body.
    UpdateContact,
    /// `contact_ids` (1 to 1,000); `arguments` as `PATCH /v1/contacts/{id}` takes its
    /// body, applied to each.
    BulkUpdate,
    /// `contact_id`; `arguments` as `POST /v1/contacts/{id}/messages` takes its body.
    SendMessage,
    /// `contact_id`; `arguments` as `POST /v1/contacts/{id}/consent` takes its body.
    ChangeConsent,
    /// `contact_id`; `arguments` as `POST /v1/contacts/{id}/do-not-contact` takes its
    /// body.
    SetDoNotContact,
    /// `contact_id`; `arguments` as `POST /v1/contacts/{id}/do-not-contact/lift` takes
    /// its body.
    LiftDoNotContact,
    /// `user_id`; `arguments` as `POST /v1/users/{id}/role` takes its body.
    ChangePermissions,
    /// `contact_id`; `arguments` `{}`. Runs `GET /v1/contacts/{id}/export`'s export:
    /// the proposer then downloads it at `GET /v1/ai/actions/{id}/export`.
    Export,
    /// `contact_id`; `arguments` `{}`. Runs `POST /v1/contacts/{id}/erase`.
    Erase,
}

/// What an action is about, as its kind names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TargetKind {
    Contact,
    Contacts,
    User,
}

impl TargetKind {
    /// The member of a proposal that names it.
    fn member(self) -> &'static str {
        match self {
            Self::Contact => "contact_id",
            Self::Contacts => "contact_ids",
            Self::User => "user_id",
        }
    }
}

/// The most contacts one bulk update may touch.
const MAX_BULK: usize = 1000;

impl AiActionKind {
    fn kind(self) -> ActionKind {
        match self {
            Self::UpdateContact => ActionKind::UpdateContact,
            Self::BulkUpdate => ActionKind::BulkUpdate,
            Self::SendMessage => ActionKind::SendMessage,
            Self::ChangeConsent => ActionKind::ChangeConsent,
            Self::SetDoNotContact => ActionKind::SetDoNotContact,
            Self::LiftDoNotContact => ActionKind::LiftDoNotContact,
            Self::ChangePermissions => ActionKind::ChangePermissions,
            Self::Export => ActionKind::Export,
            Self::Erase => ActionKind::Erase,
        }
    }

    /// The served kind of a recorded action.
    fn of(kind: ActionKind) -> Option<Self> {
        [
            Self::UpdateContact,
            Self::BulkUpdate,
            Self::SendMessage,
            Self::ChangeConsent,
            Self::SetDoNotContact,
            Self::LiftDoNotContact,
            Self::ChangePermissions,
            Self::Export,
            Self::Erase,
        ]
        .into_iter()
        .find(|k| k.kind() == kind)
    }

    /// The permission running it needs (the command route's).
    fn permission(self) -> Permission {
        match self {
            Self::UpdateContact | Self::BulkUpdate => Permission::ContactsUpdate,
            Self::SendMessage => Permission::MessagesSend,
            Self::ChangeConsent | Self::SetDoNotContact | Self::LiftDoNotContact => {
                Permission::ConsentManage
            }
            Self::ChangePermissions => Permission::UsersManage,
            Self::Export => Permission::ContactsExport,
            Self::Erase => Permission::ContactsErase,
        }
    }

    fn target(self) -> TargetKind {
        match self {
            Self::BulkUpdate => TargetKind::Contacts,
            Self::ChangePermissions => TargetKind::User,
            _ => TargetKind::Contact,
        }
    }
}

/// What an action is about: its contacts (one, or a bulk update's), or a user.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    contacts: Vec<Uuid>,
    user_id: Option<Uuid>,
}

impl Target {
    /// The target a proposal names, as its kind wants it (exactly one of `contact_id`,
    /// `contact_ids`, `user_id`).
    fn of(
        kind: AiActionKind,
        contact_id: Option<Uuid>,
        contact_ids: Option<Vec<Uuid>>,
        user_id: Option<Uuid>,
    ) -> Result<Self, ApiError> {
        let mut errors = Vec::new();
        let wants = kind.target();
        for (given, takes) in [
            (contact_id.is_some(), TargetKind::Contact),
            (contact_ids.is_some(), TargetKind::Contacts),
            (user_id.is_some(), TargetKind::User),
        ] {
            let name = takes.member();
            if given && wants != takes {
                errors.push(FieldError::new(name, "not taken by this type"));
            } else if !given && wants == takes {
                errors.push(FieldError::new(name, "is required by this type"));
            }
        }
        if let Some(ids) = &contact_ids {
            let mut unique = ids.clone();
            unique.sort();
            unique.dedup();
            if ids.is_empty() || ids.len() > MAX_BULK || unique.len() != ids.len() {
                errors.push(FieldError::new(
                    "contact_ids",
                    format!("1 to {MAX_BULK} contact ids, each once"),
                ));
            }
        }
        if !errors.is_empty() {
            return Err(ApiError::Validation(errors));
        }
        Ok(Self {
            contacts: contact_id
                .map(|c| vec![c])
                .or(contact_ids)
                .unwrap_or_default(),
            user_id,
        })
    }

    /// The target of a recorded action.
    fn recorded(kind: AiActionKind, request: &Request) -> Option<Self> {
        let ok = match kind.target() {
            TargetKind::Contact => request.contacts.len() == 1,
            TargetKind::Contacts => !request.contacts.is_empty(),
            TargetKind::User => request.user_id.is_some(),
        };
        ok.then(|| Self {
            contacts: request.contacts.clone(),
            user_id: request.user_id,
        })
    }

    fn contact(&self) -> Uuid {
        self.contacts.first().copied().unwrap_or_default()
    }
}

/// Who started the action.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum AiInitiatedBy {
    /// The agent, on its own (the default for an agent's call).
    #[default]
    Autonomous,
    /// A user, through the agent: `on_behalf_of` names them, and they cannot approve it.
    User,
}

/// The model behind the proposal (OpenTelemetry GenAI names in docs/ai.md).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AiModelInput {
    /// `gen_ai.system`.
    #[schema(max_length = 200, pattern = "@no_nul")]
    provider: Option<String>,
    /// `gen_ai.request.model`.
    #[schema(max_length = 200, pattern = "@no_nul")]
    model: Option<String>,
    /// `gen_ai.response.model`.
    #[schema(max_length = 200, pattern = "@no_nul")]
    model_version: Option<String>,
    #[schema(max_length = 200, pattern = "@no_nul")]
    prompt_version: Option<String>,
    /// `gen_ai.usage.input_tokens`.
    #[serde(default, deserialize_with = "crate::edge::extract::whole_number")]
    #[schema(minimum = 0)]
    input_tokens: Option<i64>,
    /// `gen_ai.usage.output_tokens`.
    #[serde(default, deserialize_with = "crate::edge::extract::whole_number")]
    #[schema(minimum = 0)]
    output_tokens: Option<i64>,
}

/// An action's arguments: the body the route of its `type` takes.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // the document's shape only: arguments are kept as sent (`Value`)
pub(crate) enum AiActionArguments {
    /// `update_contact`, `bulk_update`: as `PATCH /v1/contacts/{id}` takes it.
    UpdateContact(Box<ContactInput>),
    /// `send_message`: as `POST /v1/contacts/{id}/messages` takes it.
    SendMessage(Box<MessageInput>),
    /// `change_consent`: as `POST /v1/contacts/{id}/consent` takes it.
    ChangeConsent(Box<ConsentInput>),
    /// `set_do_not_contact`, `lift_do_not_contact`: as `POST
    /// /v1/contacts/{id}/do-not-contact` takes it.
    DoNotContact(ReasonInput),
    /// `change_permissions`: as `POST /v1/users/{id}/role` takes it.
    ChangePermissions(RoleChange),
    /// `export`, `erase`: nothing (`{}`).
    Nothing(NoArguments),
}

/// The arguments of a kind that takes none: `{}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NoArguments {}

/// `POST /v1/ai/actions`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "type": "update_contact", "contact_id": "0193a1c2-7d1e-7c3a-9f00-2b5c1d9e8a11",
    "arguments": {"company": "Analytical Engines Ltd"},
    "initiated_by": "user", "on_behalf_of": "0193a1c2-7d1e-7c3a-9f00-2b5c1d9e8a12",
    "model": {"provider": "anthropic", "model": "claude", "prompt_version": "crm-assist-3"},
    "reasoning_summary": "The contact wrote that she moved company."
}))]
pub(crate) struct AiProposeInput {
    #[serde(rename = "type")]
    kind: AiActionKind,
    /// The contact (every type but `bulk_update` and `change_permissions`).
    contact_id: Option<Uuid>,
    /// `bulk_update`: the contacts, 1 to 1,000, each once.
    contact_ids: Option<Vec<Uuid>>,
    /// `change_permissions`: the user whose role changes.
    user_id: Option<Uuid>,
    /// The command's body, as the route named under `type` takes it.
    #[schema(value_type = AiActionArguments)]
    arguments: Value,
    /// An agent's call: `autonomous` (the default) or `user`. A user's own call is
    /// always `user`, on their own behalf.
    #[serde(default)]
    initiated_by: AiInitiatedBy,
    /// With `initiated_by: user` from an agent: the user it acts for.
    on_behalf_of: Option<Uuid>,
    #[serde(default)]
    model: AiModelInput,
    /// What the agent acted on (personal data: stored encrypted).
    #[schema(max_length = 4000, pattern = "@no_nul")]
    input_summary: Option<String>,
    /// Why it proposes this (personal data: stored encrypted).
    #[schema(max_length = 4000, pattern = "@no_nul")]
    reasoning_summary: Option<String>,
}

/// The body of `POST /v1/ai/actions`, parsed as [`AiProposeInput`] and documented as
/// one shape per `type` (`oneOf`, named `AiProposeInput` in the document): each shape
/// requires the one target its type takes (`contact_id`, `contact_ids` or `user_id`)
/// and the body its command's route takes as `arguments`, and allows nothing else, so
/// a client generated from the document (or a fuzzer) builds only proposals the
/// service can take.
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub(crate) struct AiProposal(AiProposeInput);

/// Each shape of [`AiProposal`]: its types (their target is [`AiActionKind::target`]),
/// the schema of its `arguments`, and what it says.
const PROPOSAL_SHAPES: &[(&[AiActionKind], &str, &str)] = &[
    (
        &[AiActionKind::UpdateContact],
        "ContactInput",
        "Change a contact's fields: `arguments` as `PATCH /v1/contacts/{id}` takes its body.",
    ),
    (
        &[AiActionKind::BulkUpdate],
        "ContactInput",
        "Change the same fields of 1 to 1,000 contacts: `arguments` as `PATCH \
         /v1/contacts/{id}` takes its body, applied to each.",
    ),
    (
        &[AiActionKind::SendMessage],
        "MessageInput",
        "Send a message through the consent gate: `arguments` as `POST \
         /v1/contacts/{id}/messages` takes its body.",
    ),
    (
        &[AiActionKind::ChangeConsent],
        "ConsentInput",
        "Record a consent change: `arguments` as `POST /v1/contacts/{id}/consent` takes \
         its body.",
    ),
    (
        &[
            AiActionKind::SetDoNotContact,
            AiActionKind::LiftDoNotContact,
        ],
        "ReasonInput",
        "Set or lift Do Not Contact: `arguments` as `POST \
         /v1/contacts/{id}/do-not-contact` (or `.../lift`) takes its body.",
    ),
    (
        &[AiActionKind::ChangePermissions],
        "RoleChange",
        "Change a user's role: `arguments` as `POST /v1/users/{id}/role` takes its body.",
    ),
    (
        &[AiActionKind::Export, AiActionKind::Erase],
        "NoArguments",
        "Export or erase a contact's data: `arguments` `{}`.",
    ),
];

impl utoipa::PartialSchema for AiProposal {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::Schema> {
        use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
        use utoipa::openapi::{KnownFormat, Ref, RefOr, Schema, SchemaFormat};
        // The members every shape has: the parsed struct's own schema, less the type,
        // the targets and the arguments, which each shape states for itself.
        let RefOr::T(Schema::Object(members)) = <AiProposeInput as utoipa::PartialSchema>::schema()
        else {
            unreachable!("a struct's schema is an object")
        };
        let uuid = || {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)))
        };
        let mut one_of = OneOfBuilder::new().description(Some(
            "`POST /v1/ai/actions`: one shape per `type` (docs/ai.md).",
        ));
        for (kinds, arguments, description) in PROPOSAL_SHAPES {
            let target = kinds[0].target();
            let mut shape = members.clone();
            for member in ["type", "contact_id", "contact_ids", "user_id", "arguments"] {
                shape.properties.shift_remove(member);
            }
            let names = kinds.iter().map(|k| {
                serde_json::to_value(k)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            });
            shape.properties.insert(
                "type".into(),
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(names))
                    .into(),
            );
            let about: RefOr<Schema> = match target {
                TargetKind::Contacts => ArrayBuilder::new()
                    .items(uuid())
                    .min_items(Some(1))
                    .max_items(Some(MAX_BULK))
                    .unique_items(true)
                    .description(Some("The contacts, each once."))
                    .into(),
                TargetKind::User => uuid()
                    .description(Some("The user whose role changes."))
                    .into(),
                TargetKind::Contact => uuid().description(Some("The contact.")).into(),
            };
            shape.properties.insert(target.member().into(), about);
            let arguments = match *arguments {
                // A change of contacts runs on the contacts as they are when it runs:
                // `PATCH`'s body without its `expected_version` (refused here).
                "ContactInput" => match <ContactInput as utoipa::PartialSchema>::schema() {
                    RefOr::T(Schema::Object(mut changes)) => {
                        changes.properties.shift_remove("expected_version");
                        changes.required.retain(|r| r != "expected_version");
                        #[allow(deprecated)]
                        let examples = changes.example.iter_mut().chain(&mut changes.examples);
                        for example in examples {
                            if let Some(example) = example.as_object_mut() {
                                example.remove("expected_version");
                            }
                        }
                        changes.description = Some(
                            "As `PATCH /v1/contacts/{id}` takes its body, without \
                             `expected_version`."
                                .into(),
                        );
                        RefOr::T(Schema::Object(changes))
                    }
                    other => other,
                },
                name => RefOr::Ref(Ref::from_schema_name(name)),
            };
            shape.properties.insert("arguments".into(), arguments);
            shape.required = vec!["type".into(), target.member().into(), "arguments".into()];
            shape.description = Some((*description).into());
            if kinds != &[AiActionKind::UpdateContact] {
                #[allow(deprecated)]
                {
                    shape.example = None;
                }
            }
            one_of = one_of.item(Schema::Object(shape));
        }
        RefOr::T(Schema::OneOf(one_of.build()))
    }
}

impl ToSchema for AiProposal {
    fn name() -> std::borrow::Cow<'static, str> {
        std::borrow::Cow::Borrowed("AiProposeInput")
    }

    fn schemas(
        schemas: &mut Vec<(
            String,
            utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
        )>,
    ) {
        // What the members refer to (the model, who initiated it), and each shape's
        // `arguments`.
        <AiProposeInput as ToSchema>::schemas(schemas);
        fn add<T: ToSchema>(
            schemas: &mut Vec<(
                String,
                utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
            )>,
        ) {
            schemas.push((T::name().into_owned(), T::schema()));
            T::schemas(schemas);
        }
        add::<ContactInput>(schemas);
        add::<MessageInput>(schemas);
        add::<ConsentInput>(schemas);
        add::<ReasonInput>(schemas);
        add::<RoleChange>(schemas);
        add::<NoArguments>(schemas);
    }
}

/// An action's state: what it would run, its risk and the rule that set it, where it
/// stands, and its outcome.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AiActionDoc {
    id: Uuid,
    /// `pending_approval`, `approved`, `rejected`, `expired`, `executed` or `failed`.
    status: String,
    #[serde(rename = "type")]
    kind: String,
    /// The contact (the first, for a bulk update).
    contact_id: Option<Uuid>,
    /// Every contact the action touches.
    contacts: Vec<Uuid>,
    /// The user a role change is about.
    user_id: Option<Uuid>,
    /// `low`, `medium` or `high`.
    risk: String,
    /// The id of the policy rule that set the risk (docs/ai.md).
    rule: String,
    /// SHA-256 (hex) of the arguments' JSON with sorted keys and no white space: an
    /// approval names it.
    arguments_sha256: String,
    /// The command's body as proposed (or as last edited); null once a contact the
    /// action touched was erased (its key went with it).
    #[schema(value_type = Option<Object>)]
    arguments: Option<Value>,
    /// The proposer: an agent's key id, or a user's id.
    proposed_by: String,
    initiated_by: String,
    on_behalf_of: Option<Uuid>,
    /// When a pending action expires.
    expires_at: Option<DateTime<Utc>>,
    /// The events the executed command produced (or its refusal, e.g. a blocked message).
    result_events: Vec<Uuid>,
    /// Why execution failed: the send gate's reason code, or the refusal's.
    failure_reason: Option<String>,
    /// The refusal's message (null once erased).
    failure_detail: Option<String>,
    /// Every step, in order.
    steps: Vec<AiActionStep>,
}

/// One event of an action's life.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AiActionStep {
    event_id: Uuid,
    event_type: String,
    recorded_at: DateTime<Utc>,
    /// Who caused it (`kind:id`).
    by: String,
}

/// `POST /v1/ai/actions/{id}/approve`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AiApproveInput {
    /// The `arguments_sha256` the approver saw.
    #[schema(pattern = "^[0-9a-f]{64}$")]
    arguments_sha256: String,
    #[schema(max_length = 2000, pattern = "@no_nul")]
    reason: Option<String>,
}

/// `POST /v1/ai/actions/{id}/edit`: new arguments for a pending action.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AiEditInput {
    /// The command's body, as the action's route takes it (its type and contact stay).
    #[schema(value_type = AiActionArguments)]
    arguments: Value,
}

/// `POST /v1/ai/actions/{id}/reject`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AiRejectInput {
    #[schema(max_length = 2000, pattern = "@line")]
    reason: String,
}

/// SHA-256 (hex) of the canonical JSON of what an action would run.
fn digest(kind: AiActionKind, target: &Target, arguments: &Value) -> String {
    // serde_json's maps are sorted by key: this is the canonical form.
    let mut canonical = serde_json::json!({"type": kind, "arguments": arguments});
    match kind.target() {
        TargetKind::Contact => canonical["contact_id"] = serde_json::json!(target.contact()),
        TargetKind::Contacts => canonical["contact_ids"] = serde_json::json!(target.contacts),
        TargetKind::User => canonical["user_id"] = serde_json::json!(target.user_id),
    }
    hex::encode(Sha256::digest(
        serde_json::to_vec(&canonical).expect("a JSON value serialises"),
    ))
}

fn text(errors: &mut Vec<FieldError>, name: &str, v: &Option<String>, max: usize) {
    if v.as_deref()
        .is_some_and(|t| t.chars().count() > max || t.contains('\0'))
    {
        errors.push(FieldError::new(
            name,
            format!("at most {max} characters, no NUL"),
        ));
    }
}

/// A reason: a line of at most 2,000 characters with something besides white space and
/// no control characters (the document's `@line`).
fn reason_line(reason: &str) -> Result<(), ApiError> {
    if reason.trim().is_empty()
        || reason.chars().count() > 2000
        || reason.chars().any(char::is_control)
    {
        return Err(ApiError::Validation(vec![FieldError::new(
            "reason",
            "one line of at most 2,000 characters, not blank",
        )]));
    }
    Ok(())
}

/// The facts of the arguments the risk policy reads, validated as the command's own
/// route validates them.
fn risk_input(
    kind: AiActionKind,
    target: &Target,
    arguments: &Value,
) -> Result<RiskInput, ApiError> {
    let invalid = |e: serde_json::Error| {
        ApiError::Validation(vec![FieldError::new("arguments", e.to_string())])
    };
    let mut input = RiskInput {
        kind: kind.kind(),
        fields: vec![],
        custom_fields: false,
        contacts: target.contacts.len(),
    };
    match kind {
        AiActionKind::UpdateContact | AiActionKind::BulkUpdate => {
            let changes: ContactInput =
                serde_json::from_value(arguments.clone()).map_err(invalid)?;
            if changes.expected_version.is_some() {
                return Err(ApiError::Validation(vec![FieldError::new(
                    "arguments.expected_version",
                    "not part of an AI action",
                )]));
            }
            let (fields, custom) = super::contacts::fields_touched(changes)?;
            input.fields = fields;
            input.custom_fields = custom;
        }
        AiActionKind::SendMessage => {
            let _: MessageInput = serde_json::from_value(arguments.clone()).map_err(invalid)?;
        }
        AiActionKind::ChangeConsent => {
            let body: ConsentInput = serde_json::from_value(arguments.clone()).map_err(invalid)?;
            super::consent::check_consent_input(&body)?;
        }
        AiActionKind::SetDoNotContact | AiActionKind::LiftDoNotContact => {
            let body: ReasonInput = serde_json::from_value(arguments.clone()).map_err(invalid)?;
            super::consent::reason(body.reason)?;
        }
        AiActionKind::ChangePermissions => {
            let body: RoleChange = serde_json::from_value(arguments.clone()).map_err(invalid)?;
            super::users::check_role_change(&body)?;
        }
        AiActionKind::Export | AiActionKind::Erase => {
            let _: NoArguments = serde_json::from_value(arguments.clone()).map_err(invalid)?;
        }
    }
    Ok(input)
}

pub(crate) async fn propose(
    s: AppState,
    a: Authed,
    Json(AiProposal(input)): Json<AiProposal>,
) -> Result<Created<AiActionDoc>, ApiError> {
    // Proposing needs what running needs: deny by default.
    a.require(input.kind.permission())?;
    let mut errors = Vec::new();
    text(&mut errors, "input_summary", &input.input_summary, 4000);
    text(
        &mut errors,
        "reasoning_summary",
        &input.reasoning_summary,
        4000,
    );
    for (name, v) in [
        ("model.provider", &input.model.provider),
        ("model.model", &input.model.model),
        ("model.model_version", &input.model.model_version),
        ("model.prompt_version", &input.model.prompt_version),
    ] {
        text(&mut errors, name, v, 200);
    }
    for (name, n) in [
        ("model.input_tokens", input.model.input_tokens),
        ("model.output_tokens", input.model.output_tokens),
    ] {
        if n.is_some_and(|n| n < 0) {
            errors.push(FieldError::new(name, "must not be negative"));
        }
    }
    let initiator = match (a.kind, input.initiated_by, input.on_behalf_of) {
        // A user's own call: on their own behalf, whatever the body says.
        (PrincipalKind::User, _, _) => Initiator {
            kind: InitiatorKind::User,
            on_behalf_of: Some(a.caller.user_id),
        },
        (_, AiInitiatedBy::User, Some(user)) => Initiator {
            kind: InitiatorKind::User,
            on_behalf_of: Some(user),
        },
        (_, AiInitiatedBy::User, None) => {
            errors.push(FieldError::new(
                "on_behalf_of",
                "is required when initiated_by is user",
            ));
            Initiator {
                kind: InitiatorKind::User,
                on_behalf_of: None,
            }
        }
        (_, AiInitiatedBy::Autonomous, Some(_)) => {
            errors.push(FieldError::new(
                "on_behalf_of",
                "only with initiated_by: user",
            ));
            Initiator {
                kind: InitiatorKind::Autonomous,
                on_behalf_of: None,
            }
        }
        (_, AiInitiatedBy::Autonomous, None) => Initiator {
            kind: InitiatorKind::Autonomous,
            on_behalf_of: None,
        },
    };
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let target = Target::of(
        input.kind,
        input.contact_id,
        input.contact_ids,
        input.user_id,
    )?;
    let risk = risk_input(input.kind, &target, &input.arguments)?;
    let org = a.caller.org_id;
    // What it is about must be the organisation's (the same 404 as the command's). A
    // change of contacts loads them: should the policy let it run at once, it runs on
    // the contacts as loaded here.
    // A change of contacts: their streams and the settings' are read together, batched
    // with the reads of concurrent commands (`Executor::load_two`, `load_many`). Else
    // the reads are pipelined on one connection (one round trip).
    let (settings, contact) = match target.contacts.as_slice() {
        [id] if changes_contacts(input.kind) => {
            let (settings, contact) = s
                .executor
                .load_two::<AiSettings, Contact>(org, &org.to_string(), &id.to_string())
                .await?;
            (settings.aggregate, Some(vec![found(*id, contact)?]))
        }
        ids if changes_contacts(input.kind) => {
            let (settings, contacts) = tokio::try_join!(
                async {
                    let id = org.to_string();
                    let settings = s.executor.load_batched::<AiSettings>(org, &id).await?;
                    Ok::<_, ApiError>(settings.aggregate)
                },
                load_contacts(&s, org, ids)
            )?;
            (settings, Some(contacts))
        }
        _ => {
            let client = s.pool.get().await?;
            let target_found = require_target(&s, &client, org, &target);
            let (settings, ()) = tokio::try_join!(settings_of(&s, &client, org), target_found)?;
            (settings, None)
        }
    };
    let action_id = Uuid::now_v7();
    let now = Utc::now();
    let request = Request {
        kind: input.kind.kind(),
        arguments_sha256: digest(input.kind, &target, &input.arguments),
        contacts: target.contacts,
        user_id: target.user_id,
    };
    let content = Content {
        arguments: input.arguments,
        input_summary: input.input_summary,
        reasoning_summary: input.reasoning_summary,
    };
    let m = input.model;
    let propose = AiActionCommand::Propose {
        action_id,
        org_id: org,
        agent_id: a.caller.user_id,
        initiator,
        request,
        content,
        risk_input: risk,
        oversight: settings.oversight,
        stopped: settings.stopped,
        model: ModelInfo {
            provider: m.provider,
            model: m.model,
            model_version: m.model_version,
            prompt_version: m.prompt_version,
            input_tokens: m.input_tokens.and_then(|n| u64::try_from(n).ok()),
            output_tokens: m.output_tokens.and_then(|n| u64::try_from(n).ok()),
        },
        expires_at: now + Duration::seconds(settings.approval_ttl_secs().into()),
        now,
    };
    let created = |body: AiActionDoc| Created {
        location: format!("/v1/ai/actions/{action_id}"),
        body,
    };
    if let Some(contacts) = contact {
        if let Some(doc) = propose_and_run(&s, &a, action_id, propose.clone(), contacts).await? {
            return Ok(created(doc));
        }
        // A contact moved on meanwhile, each time: nothing was written; the general path
        // below proposes, then runs on the contacts as they are now.
    }
    let (written, events) = s
        .executor
        .execute_returning::<AiAction>(
            org,
            &action_id.to_string(),
            propose,
            &a.metadata(),
            Some(0),
            None,
            // A new stream: nothing to load.
            Some(Loaded {
                aggregate: AiAction::default(),
                head: StreamHead {
                    version: 0,
                    last_hash: None,
                },
            }),
        )
        .await?;
    let mut action = AiAction::default();
    for e in &events {
        action.apply(e.clone());
    }
    if action.status == Some(ActionStatus::Approved) {
        // Run at once, on the state just written (no read back).
        let head = StreamHead {
            version: written.version,
            last_hash: written
                .appended
                .last()
                .and_then(|e| hex::decode(&e.hash).ok()),
        };
        let fresh = Fresh {
            proposer: &a,
            stopped: settings.stopped,
            action,
            events,
            head,
        };
        Box::pin(run(&s, &Runner::of(&a), org, action_id, Some(fresh))).await?;
    }
    Ok(created(describe(&s, &a, action_id).await?))
}

/// Whether `kind` changes contacts' fields (`PATCH /v1/contacts/{id}` on each): such an
/// action runs as one unit with its steps (see [`propose_and_run`]).
fn changes_contacts(kind: AiActionKind) -> bool {
    matches!(kind, AiActionKind::UpdateContact | AiActionKind::BulkUpdate)
}

/// The contacts `ids`, loaded as of one moment (one read, batched); 404 unless each is
/// the organisation's.
async fn load_contacts(
    s: &AppState,
    org: Uuid,
    ids: &[Uuid],
) -> Result<Vec<(Uuid, Loaded<Contact>)>, ApiError> {
    let names: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    let loaded = s.executor.load_many::<Contact>(org, &names).await?;
    ids.iter()
        .zip(loaded)
        .map(|(id, loaded)| found(*id, loaded))
        .collect()
}

/// The contact `id` as loaded; 404 if its stream is empty (not the organisation's).
fn found(id: Uuid, loaded: Loaded<Contact>) -> Result<(Uuid, Loaded<Contact>), ApiError> {
    if loaded.head.version == 0 {
        return Err(ApiError::NotFound("contact not found"));
    }
    Ok((id, loaded))
}

/// A change of contacts (`update_contact`, `bulk_update`), proposed and, when the policy
/// approves it at once, run, in one unit (`crm_infra::commands::unit`): the proposal,
/// the contacts' changes (or the refusal) and the outcome commit together or not at all,
/// in one group-committed statement, and the answer is built from what was written.
/// Should a contact move on before the commit, nothing was written, and it is staged
/// again on the contacts as they are then (a few times; `None` after that: the caller
/// takes the general path).
async fn propose_and_run(
    s: &AppState,
    a: &Authed,
    action_id: Uuid,
    propose: AiActionCommand,
    mut contacts: Vec<(Uuid, Loaded<Contact>)>,
) -> Result<Option<AiActionDoc>, ApiError> {
    const TRIES: usize = 3;
    let org = a.caller.org_id;
    let ids: Vec<Uuid> = contacts.iter().map(|(id, _)| *id).collect();
    let mut proposer = a.clone();
    proposer.ctx.causation_id = Some(action_id.to_string());
    for attempt in 1..=TRIES {
        let action = Loaded {
            aggregate: AiAction::default(),
            head: StreamHead::default(),
        };
        let decided = Decided {
            command: propose.clone(),
            by: a.metadata(),
        };
        let tried = stage_and_commit(
            s,
            action_id,
            (action, &[]),
            decided,
            Some(&proposer),
            contacts,
        )
        .await?;
        if let Some((action, steps)) = tried {
            return Ok(Some(doc_of(action_id, &action, steps.into_iter())));
        }
        if attempt == TRIES {
            break;
        }
        contacts = load_contacts(s, org, &ids).await?;
    }
    Ok(None)
}

/// A decision on an action (its proposal, or a person's approval) and the metadata of
/// whoever took it.
struct Decided {
    command: AiActionCommand,
    by: crm_domain::metadata::EventMetadata,
}

/// One try of a unit: stages `decided` on `action`; if that approves it, the contacts'
/// changes its arguments ask for, as `proposer` (whose context names the action as
/// causation id; `None`: the proposer is gone, and the action fails), then the outcome
/// (by whoever decided); commits. The action as it stands after, with the steps written,
/// or `None`, with nothing written, when a stream moved on.
async fn stage_and_commit(
    s: &AppState,
    action_id: Uuid,
    (mut action, earlier): (Loaded<AiAction>, &[AiActionEvent]),
    decided: Decided,
    proposer: Option<&Authed>,
    mut contacts: Vec<(Uuid, Loaded<Contact>)>,
) -> Result<Option<(AiAction, Vec<(AiActionStep, AiActionEvent)>)>, ApiError> {
    use crm_infra::commands::unit::Unit;
    use crm_infra::store::event_store::StoreError;
    let Decided { command, by } = decided;
    let org = by.org_id;
    let sid = action_id.to_string();
    let mut unit = Unit::new();
    let mut staged = s
        .executor
        .stage::<AiAction>(&mut unit, org, &sid, &mut action, command, &by)
        .await?;
    if action.aggregate.status == Some(ActionStatus::Approved) {
        let Some((_, content)) = in_force(action_events(&staged, earlier)) else {
            return Err(ApiError::NotFound("AI action not found"));
        };
        let outcome = match proposer {
            Some(p) => change_contacts(s, &mut unit, p, &mut contacts, content.arguments).await?,
            None => Outcome::failed(
                "proposer_gone",
                "the proposer's credential or account is no longer active",
            ),
        };
        let mut meta = by.clone();
        meta.occurred_at = Utc::now();
        meta.causation_id = Some(sid.clone());
        let recorded = s
            .executor
            .stage::<AiAction>(&mut unit, org, &sid, &mut action, outcome.command(), &meta)
            .await?;
        staged.extend(recorded);
    }
    let appended = match s.executor.commit(unit).await {
        Ok(appended) => appended,
        Err(StoreError::Conflict | StoreError::KeyExists) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let who = by_of(&by.principal);
    let steps = staged
        .into_iter()
        .map(|(event_id, event)| {
            let recorded_at = appended
                .iter()
                .find(|w| w.event_id == event_id)
                .map_or_else(Utc::now, |w| w.recorded_at);
            let step = AiActionStep {
                event_id,
                event_type: cqrs_es::DomainEvent::event_type(&event),
                recorded_at,
                by: who.clone(),
            };
            (step, event)
        })
        .collect();
    Ok(Some((action.aggregate, steps)))
}

/// The events of an action: `earlier` ones (if any) and those just `staged`.
fn action_events<'e>(
    staged: &'e [(Uuid, AiActionEvent)],
    earlier: &'e [AiActionEvent],
) -> impl DoubleEndedIterator<Item = &'e AiActionEvent> {
    earlier.iter().chain(staged.iter().map(|(_, e)| e))
}

/// Stages in `unit` the change `arguments` ask of each of `contacts`, as `proposer`
/// through the route's own checks (`contacts::update_command`); how it ended. All or
/// nothing: a refusal of any contact takes back what was staged for the others.
async fn change_contacts(
    s: &AppState,
    unit: &mut crm_infra::commands::unit::Unit,
    proposer: &Authed,
    contacts: &mut [(Uuid, Loaded<Contact>)],
    arguments: Value,
) -> Result<Outcome, ApiError> {
    use crm_domain::contact::ContactError;
    use crm_infra::commands::executor::CommandError;
    if let Err(e) = proposer.require(AiActionKind::UpdateContact.permission()) {
        return Ok(Outcome::refused(&e));
    }
    let input: ContactInput = match arguments_of(arguments) {
        Ok(i) => i,
        Err(o) => return Ok(o),
    };
    let (command, expected) = match super::contacts::update_command(proposer, input) {
        Ok(c) => c,
        Err(e) => return Ok(Outcome::refused(&e)),
    };
    let org = proposer.caller.org_id;
    let meta = proposer.metadata();
    let mark = unit.mark();
    let total = contacts.len();
    let mut done = Vec::with_capacity(total);
    for (n, (id, contact)) in contacts.iter_mut().enumerate() {
        let actual = contact.head.version;
        let refusal = match expected.filter(|&v| v != actual) {
            Some(expected) => Some(ApiError::from(
                CommandError::<ContactError>::VersionMismatch { expected, actual },
            )),
            None => match s
                .executor
                .stage::<Contact>(unit, org, &id.to_string(), contact, command.clone(), &meta)
                .await
            {
                Ok(staged) => {
                    done.extend(staged.into_iter().map(|(event_id, _)| event_id));
                    None
                }
                Err(CommandError::Store(e)) => return Err(e.into()),
                Err(e) => Some(ApiError::from(e)),
            },
        };
        if let Some(e) = refusal {
            unit.rewind(mark);
            if total == 1 {
                return Ok(Outcome::refused(&e));
            }
            return Ok(Outcome::failed(
                e.code(),
                &format!(
                    "contact {id} ({} of {total}) refused, so none was changed: {e}",
                    n + 1
                ),
            ));
        }
    }
    Ok(Outcome::Executed(done))
}

pub(crate) async fn get_one(
    s: AppState,
    a: Authed,
    Id(id): Id,
) -> Result<Ok200<AiActionDoc>, ApiError> {
    Ok(Ok200(describe(&s, &a, id).await?))
}

/// `GET /v1/ai/actions/{id}/export`: the export an executed `export` action made, for
/// its proposer only (the document as `GET /v1/contacts/{id}/export` streams it, under
/// the export's own id; downloading it again records nothing new).
pub(crate) async fn export(
    s: AppState,
    a: Authed,
    Id(id): Id,
) -> Result<RawAs<ExportDocument>, ApiError> {
    let org = a.caller.org_id;
    let (action, events) = read(&s, org, id).await?;
    // Someone else's action is as unknown as a missing one.
    if action.agent_id != Some(a.caller.user_id) {
        return Err(ApiError::NotFound("AI action not found"));
    }
    let request = in_force(events.iter().map(|(_, e)| e))
        .map(|(r, _)| r)
        .filter(|r| r.kind == ActionKind::Export)
        .ok_or(ApiError::NotFound("not an export action"))?;
    if action.status != Some(ActionStatus::Executed) {
        return Err(ApiError::Conflict(format!(
            "the action is {}: only an executed export can be downloaded",
            super::schemas::wire_name(&action.status)
        )));
    }
    let contact = request.contacts.first().copied().unwrap_or_default();
    let client = s.pool.get().await?;
    let row = client
        .query_opt(
            "SELECT payload -> 'ContactExported' ->> 'export_id', global_position FROM events \
             WHERE org_id = $1 AND aggregate_type = $2 AND aggregate_id = $3 \
               AND event_type = 'ContactExported' AND metadata ->> 'causation_id' = $4",
            &[&org, &Contact::TYPE, &contact.to_string(), &id.to_string()],
        )
        .await?
        .ok_or(ApiError::NotFound("the action's export was not recorded"))?;
    let export_id: Uuid = row
        .get::<_, String>(0)
        .parse()
        .map_err(ApiError::internal)?;
    drop(client);
    let response = super::rights::stream_export_of(
        &s,
        org,
        contact,
        (export_id, row.get(1)),
        &a.access.policy,
    )
    .await?;
    Ok(RawAs::new(response))
}

pub(crate) async fn approve(
    s: AppState,
    a: Authed,
    Id(id): Id,
    Json(input): Json<AiApproveInput>,
) -> Result<Ok200<AiActionDoc>, ApiError> {
    let mut errors = Vec::new();
    if input.arguments_sha256.len() != 64
        || !input
            .arguments_sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        errors.push(FieldError::new(
            "arguments_sha256",
            "64 lower-case hexadecimal digits",
        ));
    }
    text(&mut errors, "reason", &input.reason, 2000);
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let org = a.caller.org_id;
    let (action, _) = read(&s, org, id).await?;
    // Approving again answers as the first time did (a retry after a lost answer): an
    // action already run is not run again, and one approved but not yet run (the
    // service stopped in between) runs now, exactly once whoever calls (see `run`).
    if matches!(
        action.status,
        Some(ActionStatus::Executed | ActionStatus::Failed)
    ) {
        if input.arguments_sha256 != action.arguments_sha256 {
            return Err(ApiError::Conflict(
                "the action was decided and run on other arguments".into(),
            ));
        }
        return Ok(Ok200(describe(&s, &a, id).await?));
    }
    // Past its time, a pending action expires (recorded now) instead of being approved.
    let now = Utc::now();
    if action.status == Some(ActionStatus::PendingApproval)
        && action.expires_at.is_some_and(|t| t <= now)
    {
        record(
            &s,
            &Runner::of(&a),
            org,
            id,
            AiActionCommand::Expire { now },
        )
        .await?;
        return Err(ApiError::Conflict(
            "the action expired before a decision".into(),
        ));
    }
    if action.status != Some(ActionStatus::Approved) {
        let stopped = {
            let client = s.pool.get().await?;
            settings_of(&s, &client, org).await?.stopped
        };
        let approve = AiActionCommand::Approve {
            by: a.caller.user_id,
            arguments_sha256: input.arguments_sha256.clone(),
            reason: input.reason.clone(),
            stopped,
            now,
        };
        if approve_and_run(&s, &a, id, approve).await? {
            return Ok(Ok200(describe(&s, &a, id).await?));
        }
        s.executor
            .execute::<AiAction>(
                org,
                &id.to_string(),
                AiActionCommand::Approve {
                    by: a.caller.user_id,
                    arguments_sha256: input.arguments_sha256,
                    reason: input.reason,
                    stopped,
                    now,
                },
                &a.metadata(),
                None,
            )
            .await?;
    }
    Box::pin(run(&s, &Runner::of(&a), org, id, None)).await?;
    Ok(Ok200(describe(&s, &a, id).await?))
}

/// Approves a pending change of contacts and runs it in one unit: the approval, the
/// contacts' changes (as the proposer, with its rights now) and the outcome commit
/// together or not at all. `false`, with nothing written, for another kind, or when a
/// stream moved on meanwhile: the caller takes the general path.
async fn approve_and_run(
    s: &AppState,
    a: &Authed,
    id: Uuid,
    approve: AiActionCommand,
) -> Result<bool, ApiError> {
    let org = a.caller.org_id;
    let (action, read) = read(s, org, id).await?;
    let events: Vec<AiActionEvent> = read.iter().map(|(_, e)| e.clone()).collect();
    let Some((request, _)) = in_force(events.iter()) else {
        return Ok(false);
    };
    let changes = AiActionKind::of(request.kind).is_some_and(changes_contacts);
    if !changes || action.status != Some(ActionStatus::PendingApproval) {
        return Ok(false);
    }
    let head = read
        .last()
        .map_or_else(StreamHead::default, |(d, _)| StreamHead {
            version: d.stored.sequence,
            last_hash: hex::decode(&d.stored.hash).ok(),
        });
    let kind = read
        .first()
        .map_or(PrincipalKind::AiAgent, |(d, _)| d.metadata.principal.kind);
    let proposer = proposer_now(s, &a.ctx, (org, id), &action, kind).await?;
    let contacts = match load_contacts(s, org, &request.contacts).await {
        Ok(contacts) => contacts,
        // Gone since the proposal: the general path records the refusal.
        Err(ApiError::NotFound(_)) => return Ok(false),
        Err(e) => return Err(e),
    };
    let loaded = Loaded {
        aggregate: action,
        head,
    };
    let decided = Decided {
        command: approve,
        by: a.metadata(),
    };
    let done = stage_and_commit(
        s,
        id,
        (loaded, &events),
        decided,
        proposer.as_ref(),
        contacts,
    )
    .await?;
    Ok(done.is_some())
}

/// Edits a pending action's arguments (a person holding `ai.approve`, not the one it was
/// proposed for): the risk is assessed again, and the action waits for a fresh decision
/// on the new digest, which an approval must then name.
pub(crate) async fn edit(
    s: AppState,
    a: Authed,
    Id(id): Id,
    Json(input): Json<AiEditInput>,
) -> Result<Ok200<AiActionDoc>, ApiError> {
    let org = a.caller.org_id;
    let (_, events) = read(&s, org, id).await?;
    let Some((request, _)) = in_force(events.iter().map(|(_, e)| e)) else {
        return Err(ApiError::NotFound("AI action not found"));
    };
    let Some((kind, target)) =
        AiActionKind::of(request.kind).and_then(|k| Some((k, Target::recorded(k, &request)?)))
    else {
        return Err(ApiError::Conflict(
            "this action's kind cannot be edited".into(),
        ));
    };
    let risk = risk_input(kind, &target, &input.arguments)?;
    let ttl = {
        let client = s.pool.get().await?;
        settings_of(&s, &client, org).await?.approval_ttl_secs()
    };
    s.executor
        .execute::<AiAction>(
            org,
            &id.to_string(),
            AiActionCommand::Edit {
                by: a.caller.user_id,
                request: Request {
                    kind: kind.kind(),
                    arguments_sha256: digest(kind, &target, &input.arguments),
                    contacts: target.contacts,
                    user_id: target.user_id,
                },
                content: Content {
                    arguments: input.arguments,
                    input_summary: None,
                    reasoning_summary: None,
                },
                risk_input: risk,
                expires_at: Utc::now() + Duration::seconds(ttl.into()),
            },
            &a.metadata(),
            None,
        )
        .await?;
    Ok(Ok200(describe(&s, &a, id).await?))
}

pub(crate) async fn reject(
    s: AppState,
    a: Authed,
    Id(id): Id,
    Json(input): Json<AiRejectInput>,
) -> Result<Ok200<AiActionDoc>, ApiError> {
    reason_line(&input.reason)?;
    let org = a.caller.org_id;
    read(&s, org, id).await?;
    s.executor
        .execute::<AiAction>(
            org,
            &id.to_string(),
            AiActionCommand::Reject {
                by: a.caller.user_id,
                reason: input.reason,
            },
            &a.metadata(),
            None,
        )
        .await?;
    Ok(Ok200(describe(&s, &a, id).await?))
}

/// The organisation's AI oversight and stop switch.
async fn settings_of(
    s: &AppState,
    client: &impl deadpool_postgres::GenericClient,
    org: Uuid,
) -> Result<AiSettings, ApiError> {
    Ok(s.executor
        .load::<AiSettings>(client, org, &org.to_string())
        .await?
        .aggregate)
}

/// `PUT /v1/ai/oversight`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"oversight": "approve_all", "reason": "pilot month: a person checks every agent action"}))]
pub(crate) struct AiOversightInput {
    oversight: AiOversight,
    /// How long a proposal waits for a decision, 1 s to 30 days (absent: 72 hours).
    #[serde(default, deserialize_with = "crate::edge::extract::whole_number")]
    #[schema(minimum = 1, maximum = 2592000)]
    approval_ttl_secs: Option<i64>,
    #[schema(max_length = 2000, pattern = "@line")]
    reason: String,
}

/// How much human approval agent actions need (docs/ai.md).
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum AiOversight {
    /// Low-risk actions run at once; medium and high wait for a person.
    Standard,
    /// Autonomous actions always wait.
    AutonomousNeedsApproval,
    /// Every agent action waits.
    ApproveAll,
}

impl From<AiOversight> for Oversight {
    fn from(o: AiOversight) -> Self {
        match o {
            AiOversight::Standard => Self::Standard,
            AiOversight::AutonomousNeedsApproval => Self::AutonomousNeedsApproval,
            AiOversight::ApproveAll => Self::ApproveAll,
        }
    }
}

/// `POST /v1/ai/stop`, `POST /v1/ai/resume`: why.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AiReasonInput {
    #[schema(max_length = 2000, pattern = "@line")]
    reason: String,
}

/// The organisation's AI oversight.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AiSettingsDoc {
    /// `standard`, `autonomous_needs_approval` or `approve_all`.
    oversight: String,
    /// The stop switch: while on, every autonomous action waits and none can be approved.
    stopped: bool,
    /// How long a proposal waits for a decision.
    approval_ttl_secs: u32,
}

pub(crate) async fn get_settings(s: AppState, a: Authed) -> Result<Ok200<AiSettingsDoc>, ApiError> {
    let client = s.pool.get().await?;
    let settings = settings_of(&s, &client, a.caller.org_id).await?;
    Ok(Ok200(AiSettingsDoc {
        oversight: super::schemas::wire_name(&settings.oversight),
        stopped: settings.stopped,
        approval_ttl_secs: settings.approval_ttl_secs(),
    }))
}

pub(crate) async fn set_oversight(
    s: AppState,
    a: Authed,
    Json(input): Json<AiOversightInput>,
) -> Result<Ok200<AiSettingsDoc>, ApiError> {
    change_settings(
        &s,
        &a,
        AiSettingsCommand::SetOversight {
            oversight: input.oversight.into(),
            approval_ttl_secs: match input.approval_ttl_secs {
                None => None,
                Some(t) => Some(u32::try_from(t).map_err(|_| {
                    ApiError::Validation(vec![FieldError::new(
                        "approval_ttl_secs",
                        "between 1 second and 30 days",
                    )])
                })?),
            },
            reason: input.reason,
        },
    )
    .await
}

pub(crate) async fn stop(
    s: AppState,
    a: Authed,
    Json(input): Json<AiReasonInput>,
) -> Result<Ok200<AiSettingsDoc>, ApiError> {
    change_settings(
        &s,
        &a,
        AiSettingsCommand::Stop {
            reason: input.reason,
        },
    )
    .await
}

pub(crate) async fn resume(
    s: AppState,
    a: Authed,
    Json(input): Json<AiReasonInput>,
) -> Result<Ok200<AiSettingsDoc>, ApiError> {
    change_settings(
        &s,
        &a,
        AiSettingsCommand::Resume {
            reason: input.reason,
        },
    )
    .await
}

async fn change_settings(
    s: &AppState,
    a: &Authed,
    command: AiSettingsCommand,
) -> Result<Ok200<AiSettingsDoc>, ApiError> {
    let (AiSettingsCommand::SetOversight { reason, .. }
    | AiSettingsCommand::Stop { reason }
    | AiSettingsCommand::Resume { reason }) = &command;
    reason_line(reason)?;
    let org = a.caller.org_id;
    s.executor
        .execute::<AiSettings>(org, &org.to_string(), command, &a.metadata(), None)
        .await?;
    get_settings(s.clone(), a.clone()).await
}

/// The action's state and its events (404 when the organisation has no such action).
async fn read(
    s: &AppState,
    org: Uuid,
    id: Uuid,
) -> Result<
    (
        AiAction,
        Vec<(crm_infra::store::decode::DecodedEvent, AiActionEvent)>,
    ),
    ApiError,
> {
    let client = s.pool.get().await?;
    let sid = id.to_string();
    let stream = StreamId {
        org_id: org,
        aggregate_type: AiAction::TYPE,
        aggregate_id: &sid,
    };
    let mut action = AiAction::default();
    let mut events = Vec::new();
    for stored in event_store::read_stream(&client, &stream, 0, None).await? {
        let decoded = decode(s.executor.crypto(), &client, stored).await?;
        let event: AiActionEvent = decoded.typed()?;
        action.apply(event.clone());
        events.push((decoded, event));
    }
    if action.id.is_none() {
        return Err(ApiError::NotFound("AI action not found"));
    }
    Ok((action, events))
}

async fn describe(s: &AppState, a: &Authed, id: Uuid) -> Result<AiActionDoc, ApiError> {
    let (action, events) = read(s, a.caller.org_id, id).await?;
    let proposer = action.agent_id.unwrap_or_default();
    // An action (its arguments hold personal data) is for the approvers, its proposer
    // and the user it was proposed for: anyone else gets the same 404 as for no action.
    let on_behalf_of = action.initiator.and_then(|i| i.on_behalf_of);
    let sees = a.access.policy.allows(Permission::AiApprove)
        || a.caller.user_id == proposer
        || on_behalf_of == Some(a.caller.user_id);
    if !sees {
        return Err(ApiError::NotFound("AI action not found"));
    }
    let steps = events.into_iter().map(|(decoded, event)| {
        let step = AiActionStep {
            event_id: decoded.stored.event_id,
            event_type: decoded.stored.event_type.clone(),
            recorded_at: decoded.stored.recorded_at,
            by: by_of(&decoded.metadata.principal),
        };
        (step, event)
    });
    Ok(doc_of(id, &action, steps))
}

/// How a step names who took it: `kind:id`.
fn by_of(principal: &crm_domain::metadata::Principal) -> String {
    format!(
        "{}:{}",
        super::schemas::wire_name(&principal.kind),
        principal.id
    )
}

/// The answer for action `id`, as `action` stands after its `steps` (each with its event).
fn doc_of(
    id: Uuid,
    action: &AiAction,
    steps: impl ExactSizeIterator<Item = (AiActionStep, AiActionEvent)>,
) -> AiActionDoc {
    let mut doc = AiActionDoc {
        id,
        status: super::schemas::wire_name(&action.status.unwrap_or(ActionStatus::Failed)),
        kind: String::new(),
        contact_id: None,
        contacts: vec![],
        user_id: None,
        risk: action
            .risk
            .map(|r| super::schemas::wire_name(&r))
            .unwrap_or_default(),
        rule: String::new(),
        arguments_sha256: action.arguments_sha256.clone(),
        arguments: None,
        proposed_by: action.agent_id.unwrap_or_default().to_string(),
        initiated_by: String::new(),
        on_behalf_of: action.initiator.and_then(|i| i.on_behalf_of),
        expires_at: (action.status == Some(ActionStatus::PendingApproval))
            .then_some(action.expires_at)
            .flatten(),
        result_events: vec![],
        failure_reason: None,
        failure_detail: None,
        steps: Vec::with_capacity(steps.len()),
    };
    for (step, event) in steps {
        match event {
            AiActionEvent::AiActionProposed {
                request,
                content,
                rule,
                initiator,
                ..
            } => {
                doc.kind = super::schemas::wire_name(&request.kind);
                doc.contact_id = request.contacts.first().copied();
                doc.contacts = request.contacts;
                doc.user_id = request.user_id;
                doc.rule = rule;
                doc.initiated_by = super::schemas::wire_name(&initiator.kind);
                doc.arguments = Some(content.arguments);
            }
            AiActionEvent::AiActionEdited {
                content,
                rule,
                request,
                ..
            } => {
                doc.rule = rule;
                doc.contacts = request.contacts;
                doc.arguments = Some(content.arguments);
            }
            AiActionEvent::AiActionExecuted { event_ids } => doc.result_events = event_ids,
            AiActionEvent::AiActionFailed {
                reason,
                event_ids,
                note,
            } => {
                doc.result_events = event_ids;
                doc.failure_reason = Some(reason);
                doc.failure_detail = note.text;
            }
            _ => {}
        }
        doc.steps.push(step);
    }
    doc
}

/// Who runs an approved action and records its outcome: the request that approved it
/// (or proposed it, when the policy approved it at once), or the service's sweep.
pub(crate) struct Runner {
    ctx: crate::edge::context::RequestContext,
    meta: crm_domain::metadata::EventMetadata,
}

impl Runner {
    fn of(a: &Authed) -> Self {
        Self {
            ctx: a.ctx.clone(),
            meta: a.metadata(),
        }
    }

    /// The service's own sweep (principal `system:ai-sweep`).
    fn sweep(org: Uuid) -> Self {
        let request_id = crate::edge::context::new_request_id();
        let mut meta = crm_domain::metadata::EventMetadata::system(org, "ai-sweep");
        meta.request_id = Some(request_id.clone());
        Self {
            ctx: crate::edge::context::RequestContext {
                request_id,
                ip: None,
                user_agent: None,
                global_privacy_control: false,
                correlation_id: None,
                causation_id: None,
                last_event_id: None,
            },
            meta,
        }
    }
}

/// Runs an approved action once: as its proposer, with the proposer's rights now,
/// through the command's own route logic, with the action's id as causation id; then
/// records the outcome on the action. A retry finds what an earlier run wrote (the
/// contact's events caused by the action; the message whose id is the action's) and
/// records that instead of running again. Runs of one action never overlap: each holds
/// the action's advisory lock, and one that cannot take it leaves the action to the
/// run that holds it.
async fn run(
    s: &AppState,
    by: &Runner,
    org: Uuid,
    id: Uuid,
    fresh: Option<Fresh<'_>>,
) -> Result<bool, ApiError> {
    let mut lock_client = s.pool.get().await?;
    let lock = lock_client.transaction().await?;
    let held: bool = lock
        .query_one(
            "SELECT pg_try_advisory_xact_lock(hashtextextended('ai_action:' || $1, 0))",
            &[&id.to_string()],
        )
        .await?
        .get(0);
    if !held {
        return Ok(false);
    }
    // The action as it stands under the lock (as just written, for a fresh proposal).
    let stopped_at_proposal = fresh.as_ref().map(|f| f.stopped);
    let (action, events, proposer_kind, head, proposer) = match fresh {
        Some(f) => (
            f.action,
            f.events,
            f.proposer.kind,
            Some(f.head),
            Some(f.proposer),
        ),
        None => {
            let (action, read) = read(s, org, id).await?;
            let kind = read
                .first()
                .map_or(PrincipalKind::AiAgent, |(d, _)| d.metadata.principal.kind);
            (
                action,
                read.into_iter().map(|(_, e)| e).collect(),
                kind,
                None,
                None,
            )
        }
    };
    if action.status != Some(ActionStatus::Approved) {
        return Ok(false);
    }
    // Approved before the stop switch went on, not run yet (the service stopped in
    // between): held for a fresh decision, never run by itself. A fresh proposal was
    // decided on the switch as its request read it (the proposal would have waited).
    let autonomous = action.initiator.map(|i| i.kind) == Some(InitiatorKind::Autonomous);
    if autonomous && stopped_at_proposal != Some(false) {
        let client = s.pool.get().await?;
        let settings = settings_of(s, &client, org).await?;
        if settings.stopped {
            let hold = AiActionCommand::Hold {
                expires_at: Utc::now() + Duration::seconds(settings.approval_ttl_secs().into()),
            };
            record(s, by, org, id, hold).await?;
            return Ok(true);
        }
    }
    let who = Proposer {
        kind: proposer_kind,
        fresh: proposer,
    };
    let outcome = Box::pin(outcome_of(s, &by.ctx, (org, id), &action, &events, who)).await?;
    let loaded = head.map(|head| Loaded {
        aggregate: action,
        head,
    });
    // How the run ended, on the action.
    record_loaded(s, by, org, id, outcome.command(), loaded).await?;
    lock.commit().await?;
    Ok(true)
}

/// An action its proposal's request runs at once: its state as just written.
pub(crate) struct Fresh<'a> {
    proposer: &'a Authed,
    /// The stop switch as the proposal read it.
    stopped: bool,
    action: AiAction,
    events: Vec<AiActionEvent>,
    head: StreamHead,
}

/// What the service's sweep did: pending actions past their time recorded as expired,
/// and approved actions left unrun (a process stopped between the approval and the
/// run) run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub expired: usize,
    pub run: usize,
}

/// How long an approved action may wait for the run its approval started before the
/// sweep runs it instead.
const STRANDED_AFTER: i64 = 5;

/// One pass of the sweep, over every organisation (at most 100 actions of each kind):
/// records the expiry of pending actions past their time, so the queue and the audit
/// log say so without anyone asking, and finishes approved actions whose run was cut
/// short. Runs inside the API process (`Application::run_until_stopped`).
pub async fn sweep(s: &AppState) -> Result<Swept, ApiError> {
    use crm_infra::read_models::ai_audit as audit_rm;
    let now = Utc::now();
    let (expired, stranded) = {
        let mut client = s.pool.get().await?;
        let tx = crm_infra::read_models::all_orgs_scope(&mut client, true).await?;
        let expired = audit_rm::past_their_time(&tx, now, 100).await?;
        let stranded =
            audit_rm::approved_not_run(&tx, now - Duration::seconds(STRANDED_AFTER), 100).await?;
        tx.commit().await?;
        (expired, stranded)
    };
    let mut swept = Swept::default();
    for (org, id) in expired {
        let by = Runner::sweep(org);
        match record(s, &by, org, id, AiActionCommand::Expire { now }).await {
            Ok(()) => swept.expired += 1,
            // Decided (or edited) since the read model saw it: nothing to expire.
            Err(ApiError::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
    }
    for (org, id) in stranded {
        if Box::pin(run(s, &Runner::sweep(org), org, id, None)).await? {
            swept.run += 1;
        }
    }
    Ok(swept)
}

/// Who proposed an action: the principal kind of its first event, and, when the
/// request that proposed it runs it at once, that request (its access is the one to
/// use, and nothing can have run the action before).
#[derive(Clone, Copy)]
struct Proposer<'a> {
    kind: PrincipalKind,
    fresh: Option<&'a Authed>,
}

/// The proposer of `action` (principal kind `kind`) with its rights now (an agent's
/// capped by its user's now), acting in `ctx` with the action as causation id; `None`
/// once its credential or account is no longer active.
async fn proposer_now(
    s: &AppState,
    ctx: &crate::edge::context::RequestContext,
    (org, id): (Uuid, Uuid),
    action: &AiAction,
    kind: PrincipalKind,
) -> Result<Option<Authed>, ApiError> {
    let proposer_id = action.agent_id.unwrap_or_default();
    let client = s.pool.get().await?;
    let access = match kind {
        PrincipalKind::User => {
            crm_infra::access::accounts::load_access(&client, proposer_id, org).await?
        }
        _ => crm_infra::access::api_keys::access_by_key_id(&client, org, proposer_id).await?,
    };
    let mut ctx = ctx.clone();
    ctx.causation_id = Some(id.to_string());
    Ok(access.map(|access| Authed {
        caller: Caller {
            user_id: proposer_id,
            org_id: org,
            generation: 0,
        },
        access: std::sync::Arc::new(access),
        ctx,
        kind,
    }))
}

/// Runs the approved `action` (with its `events`) and says how it ended.
async fn outcome_of(
    s: &AppState,
    ctx: &crate::edge::context::RequestContext,
    (org, id): (Uuid, Uuid),
    action: &AiAction,
    events: &[AiActionEvent],
    who: Proposer<'_>,
) -> Result<Outcome, ApiError> {
    let (proposer_kind, fresh) = (who.kind, who.fresh);
    let Some((request, content)) = in_force(events.iter()) else {
        return Err(ApiError::NotFound("AI action not found"));
    };
    let Some((kind, target)) =
        AiActionKind::of(request.kind).and_then(|k| Some((k, Target::recorded(k, &request)?)))
    else {
        return Ok(Outcome::failed("unsupported", "not a served kind"));
    };
    let arguments = content.arguments;
    let proposer = match fresh {
        Some(a) => {
            let mut a = a.clone();
            a.ctx.causation_id = Some(id.to_string());
            Some(a)
        }
        None => proposer_now(s, ctx, (org, id), action, proposer_kind).await?,
    };
    let Some(proposer) = proposer else {
        return Ok(Outcome::failed(
            "proposer_gone",
            "the proposer's credential or account is no longer active",
        ));
    };
    let fresh = fresh.is_some();
    Ok(match proposer.require(kind.permission()) {
        Err(e) => Outcome::refused(&e),
        Ok(()) => match kind {
            AiActionKind::UpdateContact => {
                Box::pin(update_contact(
                    s,
                    proposer,
                    org,
                    id,
                    target.contact(),
                    arguments,
                    fresh,
                ))
                .await?
            }
            AiActionKind::BulkUpdate => {
                Box::pin(bulk_update(
                    s,
                    proposer,
                    org,
                    id,
                    &target.contacts,
                    arguments,
                    fresh,
                ))
                .await?
            }
            AiActionKind::SendMessage => {
                send_message(s, &proposer, org, id, target.contact(), arguments).await?
            }
            AiActionKind::ChangeConsent
            | AiActionKind::SetDoNotContact
            | AiActionKind::LiftDoNotContact => {
                Box::pin(consent_change(
                    s,
                    proposer,
                    org,
                    id,
                    kind,
                    target.contact(),
                    arguments,
                ))
                .await?
            }
            AiActionKind::ChangePermissions => {
                let user = target.user_id.unwrap_or_default();
                Box::pin(change_permissions(s, proposer, org, id, user, arguments)).await?
            }
            AiActionKind::Export | AiActionKind::Erase => {
                Box::pin(subject_right(
                    s,
                    proposer,
                    org,
                    id,
                    kind,
                    target.contact(),
                    fresh,
                ))
                .await?
            }
        },
    })
}

/// What the action would run now: the last edit's request and arguments, else the
/// proposal's (`None` without a proposal).
fn in_force<'e>(
    events: impl DoubleEndedIterator<Item = &'e AiActionEvent>,
) -> Option<(Request, Content)> {
    events.rev().find_map(|e| match e {
        AiActionEvent::AiActionProposed {
            request, content, ..
        }
        | AiActionEvent::AiActionEdited {
            request, content, ..
        } => Some((request.clone(), content.clone())),
        _ => None,
    })
}

/// How a run ended.
enum Outcome {
    Executed(Vec<Uuid>),
    Failed {
        reason: String,
        detail: String,
        event_ids: Vec<Uuid>,
    },
}

impl Outcome {
    fn failed(reason: &str, detail: &str) -> Self {
        Self::Failed {
            reason: reason.to_owned(),
            detail: detail.to_owned(),
            event_ids: vec![],
        }
    }

    /// The command that records it on the action.
    fn command(self) -> AiActionCommand {
        match self {
            Self::Executed(event_ids) => AiActionCommand::RecordExecuted { event_ids },
            Self::Failed {
                reason,
                detail,
                event_ids,
            } => AiActionCommand::RecordFailed {
                reason,
                detail,
                event_ids,
            },
        }
    }

    /// The command's route refused it: its answer's code and message.
    fn refused(e: &ApiError) -> Self {
        Self::failed(e.code(), &e.to_string())
    }
}

/// The arguments as the command's route takes them.
fn arguments_of<T: serde::de::DeserializeOwned>(arguments: Value) -> Result<T, Outcome> {
    serde_json::from_value(arguments)
        .map_err(|e| Outcome::failed("validation_failed", &e.to_string()))
}

async fn update_contact(
    s: &AppState,
    proposer: Authed,
    org: Uuid,
    id: Uuid,
    contact_id: Uuid,
    arguments: Value,
    fresh: bool,
) -> Result<Outcome, ApiError> {
    let input: ContactInput = match arguments_of(arguments) {
        Ok(i) => i,
        Err(o) => return Ok(o),
    };
    let stream = (Contact::TYPE, contact_id.to_string());
    Box::pin(once(s, org, id, stream, fresh, async {
        super::contacts::update(s.clone(), proposer, Id(contact_id), Json(input))
            .await
            .map(|_| ())
    }))
    .await
}

/// Runs `command` (a route's handler, writing to stream `(aggregate type, id)` with the
/// action as causation id) once: unless it is a fresh action's first run, what an
/// earlier run of the action wrote there is recorded instead of running again. The
/// events it caused, or its refusal.
async fn once(
    s: &AppState,
    org: Uuid,
    id: Uuid,
    (aggregate_type, stream): (&str, String),
    fresh: bool,
    command: impl std::future::Future<Output = Result<(), ApiError>>,
) -> Result<Outcome, ApiError> {
    // A run of an action just proposed is its first: nothing to look for.
    if !fresh {
        let earlier = caused_events(s, org, aggregate_type, &stream, id).await?;
        if !earlier.is_empty() {
            return Ok(Outcome::Executed(earlier));
        }
    }
    Ok(match command.await {
        Ok(()) => Outcome::Executed(caused_events(s, org, aggregate_type, &stream, id).await?),
        Err(e) => Outcome::refused(&e),
    })
}

/// The general path of a bulk update (a unit, [`change_contacts`], is all or none; this
/// runs when a unit could not be committed, or for a run cut short): updates each contact
/// in turn, each once (a retry finds the contacts already done by their causation id),
/// so it is not atomic: a refusal ends it, and the failure names what was done before it.
async fn bulk_update(
    s: &AppState,
    proposer: Authed,
    org: Uuid,
    id: Uuid,
    contacts: &[Uuid],
    arguments: Value,
    fresh: bool,
) -> Result<Outcome, ApiError> {
    let mut done = Vec::new();
    for (n, contact) in contacts.iter().enumerate() {
        let arguments = arguments.clone();
        match Box::pin(update_contact(
            s,
            proposer.clone(),
            org,
            id,
            *contact,
            arguments,
            fresh,
        ))
        .await?
        {
            Outcome::Executed(ids) => done.extend(ids),
            Outcome::Failed { reason, detail, .. } => {
                return Ok(Outcome::Failed {
                    reason,
                    detail: format!(
                        "contact {contact} ({} of {}) refused, {n} updated before it: {detail}",
                        n + 1,
                        contacts.len()
                    ),
                    event_ids: done,
                })
            }
        }
    }
    Ok(Outcome::Executed(done))
}

/// A consent change or a Do Not Contact mark (set or lifted), through its route.
async fn consent_change(
    s: &AppState,
    proposer: Authed,
    org: Uuid,
    id: Uuid,
    kind: AiActionKind,
    contact_id: Uuid,
    arguments: Value,
) -> Result<Outcome, ApiError> {
    let stream = (ConsentLedger::TYPE, contact_id.to_string());
    let (s2, contact) = (s.clone(), Id(contact_id));
    if kind == AiActionKind::ChangeConsent {
        let input: ConsentInput = match arguments_of(arguments) {
            Ok(i) => i,
            Err(o) => return Ok(o),
        };
        let record = super::consent::record(s2, proposer, contact, Json(input));
        return Box::pin(once(s, org, id, stream, false, async {
            record.await.map(|_| ())
        }))
        .await;
    }
    let input: ReasonInput = match arguments_of(arguments) {
        Ok(i) => i,
        Err(o) => return Ok(o),
    };
    let set = kind == AiActionKind::SetDoNotContact;
    once(s, org, id, stream, false, async {
        if set {
            super::consent::set_do_not_contact(s2, proposer, contact, Json(input)).await
        } else {
            super::consent::lift_do_not_contact(s2, proposer, contact, Json(input)).await
        }
        .map(|_| ())
    })
    .await
}

/// An export or an erasure of one contact, as the proposer (the tombstone's or the
/// export's event caused by the action). An export is recorded here; the proposer
/// downloads it at `GET /v1/ai/actions/{id}/export`.
async fn subject_right(
    s: &AppState,
    proposer: Authed,
    org: Uuid,
    id: Uuid,
    kind: AiActionKind,
    contact: Uuid,
    fresh: bool,
) -> Result<Outcome, ApiError> {
    let stream = (Contact::TYPE, contact.to_string());
    let metadata = proposer.metadata();
    Box::pin(once(s, org, id, stream, fresh, async {
        if kind == AiActionKind::Erase {
            super::rights::erase_contact(s, org, contact, RequestSource::AiAction, &metadata)
                .await
                .map(|_| ())
        } else {
            super::rights::record_export(s, org, contact, RequestSource::AiAction, &metadata)
                .await
                .map(|_| ())
        }
    }))
    .await
}

/// A user's role change, through its route (the proposer's grant must cover the role).
async fn change_permissions(
    s: &AppState,
    proposer: Authed,
    org: Uuid,
    id: Uuid,
    user_id: Uuid,
    arguments: Value,
) -> Result<Outcome, ApiError> {
    let input: RoleChange = match arguments_of(arguments) {
        Ok(i) => i,
        Err(o) => return Ok(o),
    };
    let stream = (User::TYPE, user_id.to_string());
    once(s, org, id, stream, false, async {
        super::users::change_role(s.clone(), proposer, Id(user_id), Json(input))
            .await
            .map(|_| ())
    })
    .await
}

/// 404 unless every contact (or the user) of `target` is the organisation's.
async fn require_target(
    s: &AppState,
    client: &deadpool_postgres::Object,
    org: Uuid,
    target: &Target,
) -> Result<(), ApiError> {
    if let Some(user) = target.user_id {
        let found = s
            .executor
            .load::<User>(client, org, &user.to_string())
            .await?;
        if found.aggregate.id.is_none() {
            return Err(ApiError::NotFound("user not found"));
        }
        return Ok(());
    }
    // One query for all: a contact exists once its stream has an event.
    let ids: Vec<String> = target.contacts.iter().map(Uuid::to_string).collect();
    let found: i64 = client
        .query_one(
            "SELECT count(DISTINCT aggregate_id) FROM events WHERE org_id = $1 \
             AND aggregate_type = $2 AND aggregate_id = ANY($3) AND sequence = 1",
            &[&org, &Contact::TYPE, &ids],
        )
        .await?
        .get(0);
    if found != ids.len() as i64 {
        return Err(ApiError::NotFound("contact not found"));
    }
    Ok(())
}

async fn send_message(
    s: &AppState,
    proposer: &Authed,
    org: Uuid,
    id: Uuid,
    contact_id: Uuid,
    arguments: Value,
) -> Result<Outcome, ApiError> {
    // The message's id is the action's: a retry finds it.
    let stream = id.to_string();
    let earlier = caused_events(s, org, Message::TYPE, &stream, id).await?;
    let (queued, reason, event_ids) = if earlier.is_empty() {
        let input: MessageInput = match arguments_of(arguments) {
            Ok(i) => i,
            Err(o) => return Ok(o),
        };
        match super::messages::send_with_id(s, proposer, contact_id, input, id).await {
            Ok(c) => (
                c.body.decision.allowed,
                super::schemas::wire_name(&c.body.decision.reason),
                caused_events(s, org, Message::TYPE, &stream, id).await?,
            ),
            Err(e) => return Ok(Outcome::refused(&e)),
        }
    } else {
        message_outcome(s, org, id, earlier).await?
    };
    Ok(if queued {
        Outcome::Executed(event_ids)
    } else {
        Outcome::Failed {
            reason,
            detail: "blocked by the send gate".into(),
            event_ids,
        }
    })
}

/// The ids of the events of stream (`aggregate_type`, `aggregate_id`) caused by action
/// `action_id`, in order.
async fn caused_events(
    s: &AppState,
    org: Uuid,
    aggregate_type: &str,
    aggregate_id: &str,
    action_id: Uuid,
) -> Result<Vec<Uuid>, ApiError> {
    let client = s.pool.get().await?;
    let rows = client
        .query(
            "SELECT event_id FROM events WHERE org_id = $1 AND aggregate_type = $2 \
             AND aggregate_id = $3 AND metadata ->> 'causation_id' = $4 ORDER BY sequence",
            &[&org, &aggregate_type, &aggregate_id, &action_id.to_string()],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// What an earlier run's message says: (queued, the gate's reason code, event ids).
async fn message_outcome(
    s: &AppState,
    org: Uuid,
    message_id: Uuid,
    ids: Vec<Uuid>,
) -> Result<(bool, String, Vec<Uuid>), ApiError> {
    use crm_domain::message::MessageEvent;
    let client = s.pool.get().await?;
    let sid = message_id.to_string();
    let stream = StreamId {
        org_id: org,
        aggregate_type: Message::TYPE,
        aggregate_id: &sid,
    };
    for stored in event_store::read_stream_page(&client, &stream, 0, 1).await? {
        let decoded = decode(s.executor.crypto(), &client, stored).await?;
        if let MessageEvent::MessageQueued { decision, .. }
        | MessageEvent::MessageBlocked { decision, .. } = decoded.typed::<MessageEvent>()?
        {
            return Ok((
                decision.allowed,
                super::schemas::wire_name(&decision.reason),
                ids,
            ));
        }
    }
    Ok((false, "unknown".into(), ids))
}

async fn record(
    s: &AppState,
    by: &Runner,
    org: Uuid,
    id: Uuid,
    command: AiActionCommand,
) -> Result<(), ApiError> {
    record_loaded(s, by, org, id, command, None).await
}

/// [`record`], on the action as the caller loaded it (`None`: loaded here).
async fn record_loaded(
    s: &AppState,
    by: &Runner,
    org: Uuid,
    id: Uuid,
    command: AiActionCommand,
    loaded: Option<Loaded<AiAction>>,
) -> Result<(), ApiError> {
    let mut meta = by.meta.clone();
    meta.occurred_at = Utc::now();
    meta.causation_id = Some(id.to_string());
    s.executor
        .execute_returning::<AiAction>(org, &id.to_string(), command, &meta, None, None, loaded)
        .await?;
    Ok(())
}
