//! The AI audit log: one entry per AI action, folded from the action's `ai_action`
//! stream (EU AI Act Art. 12 record-keeping).
//!
//! An entry says what the action would run (type, contacts, the digest of the exact
//! arguments), its risk and the policy rule that set it, who proposed it (the agent, and
//! the user on whose behalf, or autonomous), the model behind it, every step of its
//! approval chain (who, when, what was decided, why), and its outcome (the events the
//! command produced, or the refusal's reason code).
//!
//! The personal members (the arguments, the summaries, every free-text reason) are kept
//! exactly as the event store holds them: sealed under the action's data key. Only a
//! reader holding that key sees them, and erasing a contact the action touched shreds
//! it, so the entry's personal data goes with the contact's everywhere. This module only
//! copies those values; it never sees them in clear.

use chrono::{DateTime, Utc};
use crm_domain::ai::{AiActionEvent, Note};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::Envelope;

/// Aggregate type of the AI action streams (`crm_domain::ai::AiAction`).
pub const AI_ACTION_STREAM: &str = "ai_action";

/// One AI action as the audit log shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AiAuditEntry {
    pub org_id: Uuid,
    pub action_id: Uuid,
    /// The proposer: an agent's key id, or a user's id.
    pub agent_id: Uuid,
    /// The proposer's principal kind (`ai_agent`, `user`).
    pub proposer_kind: String,
    /// The action type (`update_contact`, `send_message`, …).
    pub kind: String,
    /// `pending_approval`, `approved`, `rejected`, `expired`, `executed`, `failed`.
    pub status: String,
    /// `low`, `medium`, `high`.
    pub risk: String,
    /// The id of the policy rule that set the risk.
    pub rule: String,
    /// `user` or `autonomous`.
    pub initiated_by: String,
    pub on_behalf_of: Option<Uuid>,
    /// The model behind the proposal (`crm_domain::ai::ModelInfo`, OpenTelemetry
    /// GenAI names).
    pub model: Value,
    pub contacts: Vec<Uuid>,
    /// The user the action is about (a role change).
    pub user_id: Option<Uuid>,
    pub arguments_sha256: String,
    /// The arguments in force and the summaries the agent acted on
    /// (`crm_domain::ai::Content`), sealed as stored.
    pub content: Value,
    /// Every step, in order.
    pub steps: Vec<AiAuditStep>,
    /// The events the executed command produced (or its refusal, e.g. a blocked
    /// message).
    pub result_events: Vec<Uuid>,
    /// Why execution failed: the send gate's reason code, or the refusal's.
    pub failure_reason: Option<String>,
    /// When a pending action expires.
    pub expires_at: Option<DateTime<Utc>>,
    pub proposed_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The last sequence applied of the action's stream.
    pub version: i64,
    pub last_position: i64,
}

/// One step of an action's life.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AiAuditStep {
    pub event_id: Uuid,
    /// `proposed`, `auto_approved`, `approval_requested`, `approved`, `rejected`,
    /// `edited`, `expired`, `held`, `executed`, `failed`.
    pub step: String,
    pub at: DateTime<Utc>,
    /// Who caused it (`kind:id`).
    pub by: String,
    /// The person who decided (approve, reject, edit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<Uuid>,
    /// The digest the step names (approved, edited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments_sha256: Option<String>,
    /// The rule in force after the step (proposed, auto-approved, edited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Why it waits (approval requested): `risk`, `oversight`, `stop_switch`, `edited`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub because: Option<String>,
    /// The free text of the step (a reason, a refusal's message), sealed as stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<Value>,
}

/// Outcome of offering an event to an entry.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    Changed(Box<AiAuditEntry>),
    /// The event was already reflected (its sequence is not above the entry's).
    AlreadyApplied,
    /// The event does not follow the entry's last sequence: an earlier one is missing.
    OutOfOrder {
        have: i64,
        got: i64,
    },
}

fn wire<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The step name of an event type (`AiActionAutoApproved` → `auto_approved`).
fn step_name(event_type: &str) -> String {
    let name = event_type.strip_prefix("AiAction").unwrap_or(event_type);
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn note_of(note: &Note) -> Option<Value> {
    note.text.clone().map(Value::String)
}

/// The next entry after `event` (at `env.sequence` of the action's stream), caused by
/// principal `by` (`kind:id`). Idempotent; a gap is reported.
pub fn update(
    entry: Option<&AiAuditEntry>,
    env: &Envelope<'_>,
    by: String,
    event: &AiActionEvent,
) -> Update {
    let have = entry.map_or(0, |e| e.version);
    if env.sequence <= have {
        return Update::AlreadyApplied;
    }
    if env.sequence != have + 1 {
        return Update::OutOfOrder {
            have,
            got: env.sequence,
        };
    }
    let mut step = AiAuditStep {
        event_id: env.event_id,
        step: step_name(env.event_type),
        at: env.recorded_at,
        by,
        decided_by: None,
        arguments_sha256: None,
        rule: None,
        because: None,
        note: None,
    };
    let mut next = match (entry, event) {
        (
            None,
            AiActionEvent::AiActionProposed {
                action_id,
                org_id,
                agent_id,
                initiator,
                request,
                content,
                risk,
                rule,
                model,
            },
        ) => {
            step.rule = Some(rule.clone());
            step.arguments_sha256 = Some(request.arguments_sha256.clone());
            AiAuditEntry {
                org_id: *org_id,
                action_id: *action_id,
                agent_id: *agent_id,
                proposer_kind: step.by.split(':').next().unwrap_or_default().to_owned(),
                kind: wire(&request.kind),
                status: "proposed".to_owned(),
                risk: wire(risk),
                rule: rule.clone(),
                initiated_by: wire(&initiator.kind),
                on_behalf_of: initiator.on_behalf_of,
                model: serde_json::to_value(model).unwrap_or(Value::Null),
                contacts: request.contacts.clone(),
                user_id: request.user_id,
                arguments_sha256: request.arguments_sha256.clone(),
                content: serde_json::to_value(content).unwrap_or(Value::Null),
                steps: Vec::new(),
                result_events: Vec::new(),
                failure_reason: None,
                expires_at: None,
                proposed_at: env.recorded_at,
                updated_at: env.recorded_at,
                version: 0,
                last_position: env.global_position,
            }
        }
        (None, _) => {
            // A stream always starts with its proposal.
            return Update::OutOfOrder {
                have: 0,
                got: env.sequence,
            };
        }
        (Some(e), _) => e.clone(),
    };
    match event {
        AiActionEvent::AiActionProposed { .. } => {}
        AiActionEvent::AiActionAutoApproved { rule } => {
            step.rule = Some(rule.clone());
            next.status = "approved".to_owned();
            next.expires_at = None;
        }
        AiActionEvent::AiActionApprovalRequested {
            expires_at,
            because,
        } => {
            step.because = Some(because.clone());
            next.status = "pending_approval".to_owned();
            next.expires_at = Some(*expires_at);
        }
        AiActionEvent::AiActionHeld { expires_at } => {
            step.because = Some("stop_switch".to_owned());
            next.status = "pending_approval".to_owned();
            next.expires_at = Some(*expires_at);
        }
        AiActionEvent::AiActionApproved {
            by,
            arguments_sha256,
            note,
        } => {
            step.decided_by = Some(*by);
            step.arguments_sha256 = Some(arguments_sha256.clone());
            step.note = note_of(note);
            next.status = "approved".to_owned();
            next.expires_at = None;
        }
        AiActionEvent::AiActionRejected { by, note } => {
            step.decided_by = Some(*by);
            step.note = note_of(note);
            next.status = "rejected".to_owned();
            next.expires_at = None;
        }
        AiActionEvent::AiActionEdited {
            by,
            request,
            content,
            risk,
            rule,
        } => {
            step.decided_by = Some(*by);
            step.arguments_sha256 = Some(request.arguments_sha256.clone());
            step.rule = Some(rule.clone());
            next.arguments_sha256 = request.arguments_sha256.clone();
            next.contacts = request.contacts.clone();
            next.user_id = request.user_id;
            next.content = serde_json::to_value(content).unwrap_or(Value::Null);
            next.risk = wire(risk);
            next.rule = rule.clone();
        }
        AiActionEvent::AiActionExpired {} => {
            next.status = "expired".to_owned();
            next.expires_at = None;
        }
        AiActionEvent::AiActionExecuted { event_ids } => {
            next.status = "executed".to_owned();
            next.result_events = event_ids.clone();
        }
        AiActionEvent::AiActionFailed {
            reason,
            note,
            event_ids,
        } => {
            step.note = note_of(note);
            next.status = "failed".to_owned();
            next.failure_reason = Some(reason.clone());
            next.result_events = event_ids.clone();
        }
    }
    next.steps.push(step);
    next.version = env.sequence;
    next.last_position = env.global_position;
    next.updated_at = env.recorded_at;
    Update::Changed(Box::new(next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crm_domain::ai::ActionKind;
    use crm_domain::ai::{Content, Initiator, InitiatorKind, ModelInfo, Request, Risk};

    fn env(seq: i64, event_type: &'static str) -> Envelope<'static> {
        Envelope {
            event_id: Uuid::now_v7(),
            org_id: Uuid::nil(),
            aggregate_type: AI_ACTION_STREAM,
            aggregate_id: "a",
            event_type,
            sequence: seq,
            global_position: 10 + seq,
            recorded_at: Utc::now(),
        }
    }

    fn proposed() -> AiActionEvent {
        AiActionEvent::AiActionProposed {
            action_id: Uuid::from_u128(1),
            org_id: Uuid::nil(),
            agent_id: Uuid::from_u128(3),
            initiator: Initiator {
                kind: InitiatorKind::User,
                on_behalf_of: Some(Uuid::from_u128(4)),
            },
            request: Request {
                kind: ActionKind::SendMessage,
                arguments_sha256: "aa".into(),
                contacts: vec![Uuid::from_u128(5)],
                user_id: None,
            },
            content: Content {
                arguments: Value::String("enc:v1:sealed".into()),
                input_summary: None,
                reasoning_summary: Some("enc:v1:why".into()),
            },
            risk: Risk::Medium,
            rule: "send_message".into(),
            model: ModelInfo {
                model: Some("m".into()),
                ..ModelInfo::default()
            },
        }
    }

    fn changed(u: Update) -> AiAuditEntry {
        match u {
            Update::Changed(e) => *e,
            other => panic!("expected a change, got {other:?}"),
        }
    }

    #[test]
    fn an_entry_follows_the_chain_and_keeps_sealed_values_as_they_are() {
        let e1 = changed(update(
            None,
            &env(1, "AiActionProposed"),
            "ai_agent:3".into(),
            &proposed(),
        ));
        assert_eq!(
            (
                e1.kind.as_str(),
                e1.risk.as_str(),
                e1.proposer_kind.as_str()
            ),
            ("send_message", "medium", "ai_agent")
        );
        assert_eq!(e1.content["arguments"], "enc:v1:sealed");
        assert_eq!(e1.content["reasoning_summary"], "enc:v1:why");
        let e2 = changed(update(
            Some(&e1),
            &env(2, "AiActionApprovalRequested"),
            "ai_agent:3".into(),
            &AiActionEvent::AiActionApprovalRequested {
                expires_at: Utc::now(),
                because: "risk".into(),
            },
        ));
        assert_eq!(e2.status, "pending_approval");
        assert!(e2.expires_at.is_some());
        let e3 = changed(update(
            Some(&e2),
            &env(3, "AiActionApproved"),
            "user:9".into(),
            &AiActionEvent::AiActionApproved {
                by: Uuid::from_u128(9),
                arguments_sha256: "aa".into(),
                note: Note::of(Some("enc:v1:ok".into())),
            },
        ));
        let e4 = changed(update(
            Some(&e3),
            &env(4, "AiActionExecuted"),
            "user:9".into(),
            &AiActionEvent::AiActionExecuted {
                event_ids: vec![Uuid::from_u128(7)],
            },
        ));
        assert_eq!(e4.status, "executed");
        assert_eq!(e4.result_events, vec![Uuid::from_u128(7)]);
        let names: Vec<_> = e4.steps.iter().map(|s| s.step.as_str()).collect();
        assert_eq!(
            names,
            ["proposed", "approval_requested", "approved", "executed"]
        );
        assert_eq!(e4.steps[2].decided_by, Some(Uuid::from_u128(9)));
        assert_eq!(e4.steps[2].note, Some(Value::String("enc:v1:ok".into())));
        assert_eq!(e4.expires_at, None);
        // Redelivery and a gap.
        assert_eq!(
            update(
                Some(&e4),
                &env(2, "AiActionApprovalRequested"),
                "x:y".into(),
                &AiActionEvent::AiActionExpired {}
            ),
            Update::AlreadyApplied
        );
        assert_eq!(
            update(
                Some(&e4),
                &env(6, "AiActionExpired"),
                "x:y".into(),
                &AiActionEvent::AiActionExpired {}
            ),
            Update::OutOfOrder { have: 4, got: 6 }
        );
    }
}
