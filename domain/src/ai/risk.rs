//! The risk policy for AI actions: one table, in code and in docs/ai.md, that sets each
//! proposed action's risk level and whether it waits for a human.
//!
//! The rules are tried in [`RULES`] order and the first that matches decides the risk;
//! the rule's id is recorded on the action, so the AI audit log says which rule set it.
//! Whether the action then needs an approval follows from the risk, the initiator and
//! the organisation's [`Oversight`] setting ([`needs_approval`]).

use serde::{Deserialize, Serialize};

use crate::contact::ContactField;

/// How much harm an action could do if it were wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Risk {
    Low,
    Medium,
    High,
}

/// The kinds of action an agent may propose: each runs one domain command (or a
/// bounded set of them, for a bulk update) when executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    UpdateContact,
    SendMessage,
    ChangeConsent,
    SetDoNotContact,
    LiftDoNotContact,
    BulkUpdate,
    Export,
    Erase,
    ChangePermissions,
}

impl ActionKind {
    pub const ALL: [ActionKind; 9] = [
        Self::UpdateContact,
        Self::SendMessage,
        Self::ChangeConsent,
        Self::SetDoNotContact,
        Self::LiftDoNotContact,
        Self::BulkUpdate,
        Self::Export,
        Self::Erase,
        Self::ChangePermissions,
    ];
}

/// What the policy looks at: the action's kind and the facts of its arguments that
/// bear on risk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RiskInput {
    pub kind: ActionKind,
    /// The contact fields the action would change (update and bulk update).
    pub fields: Vec<ContactField>,
    /// Whether it would set or change a custom field (their content is not known to be
    /// free of personal data, so it counts as personal).
    pub custom_fields: bool,
    /// How many contacts it touches.
    pub contacts: usize,
}

/// The contact fields that hold no personal data: a change to anything else touches
/// personal data. Only the organisation a contact works for.
pub const NON_PERSONAL_FIELDS: &[ContactField] = &[ContactField::Company];

/// A bulk update of more contacts than this is high risk.
pub const BULK_HIGH_ABOVE: usize = 100;

/// One row of the policy.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// Recorded on the action and shown in the AI audit log.
    pub id: &'static str,
    /// What the rule matches, as docs/ai.md says it.
    pub matches: &'static str,
    pub risk: Risk,
    test: fn(&RiskInput) -> bool,
}

fn touches_personal_data(i: &RiskInput) -> bool {
    i.custom_fields || i.fields.iter().any(|f| !NON_PERSONAL_FIELDS.contains(f))
}

/// The policy, tried in order; the last row matches everything.
pub const RULES: &[Rule] = &[
    Rule {
        id: "erase",
        matches: "erasing a contact",
        risk: Risk::High,
        test: |i| i.kind == ActionKind::Erase,
    },
    Rule {
        id: "export",
        matches: "exporting a contact's data",
        risk: Risk::High,
        test: |i| i.kind == ActionKind::Export,
    },
    Rule {
        id: "permissions",
        matches: "changing a role or a user's permissions",
        risk: Risk::High,
        test: |i| i.kind == ActionKind::ChangePermissions,
    },
    Rule {
        id: "bulk_large",
        matches: "a bulk update of more than 100 contacts",
        risk: Risk::High,
        test: |i| i.kind == ActionKind::BulkUpdate && i.contacts > BULK_HIGH_ABOVE,
    },
    Rule {
        id: "lift_do_not_contact",
        matches: "lifting a contact's Do Not Contact",
        risk: Risk::High,
        test: |i| i.kind == ActionKind::LiftDoNotContact,
    },
    Rule {
        id: "bulk",
        matches: "any other bulk update",
        risk: Risk::Medium,
        test: |i| i.kind == ActionKind::BulkUpdate,
    },
    Rule {
        id: "send_message",
        matches: "sending a message",
        risk: Risk::Medium,
        test: |i| i.kind == ActionKind::SendMessage,
    },
    Rule {
        id: "consent",
        matches: "recording a consent change",
        risk: Risk::Medium,
        test: |i| i.kind == ActionKind::ChangeConsent,
    },
    Rule {
        id: "set_do_not_contact",
        matches: "setting a contact's Do Not Contact",
        risk: Risk::Medium,
        test: |i| i.kind == ActionKind::SetDoNotContact,
    },
    Rule {
        id: "personal_data",
        matches:
            "an update touching a field with personal data (any but company; custom fields count)",
        risk: Risk::Medium,
        test: |i| i.kind == ActionKind::UpdateContact && touches_personal_data(i),
    },
    Rule {
        id: "default",
        matches: "anything else (an update of non-personal fields only)",
        risk: Risk::Low,
        test: |_| true,
    },
];

/// The first rule that matches `input`, and with it the action's risk.
pub fn assess(input: &RiskInput) -> &'static Rule {
    RULES
        .iter()
        .find(|r| (r.test)(input))
        .expect("the last rule matches everything")
}

/// Who started an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitiatorKind {
    /// A user, through an assistant: the action runs on their behalf.
    User,
    /// The agent, on its own.
    Autonomous,
}

/// How much human oversight an organisation asks for (a command sets it; the default
/// is `Standard`). It can only tighten the policy, never loosen it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Oversight {
    /// Low-risk actions run at once; medium and high wait for a human.
    #[default]
    Standard,
    /// Autonomous actions always wait; user-initiated low-risk ones run at once.
    AutonomousNeedsApproval,
    /// Every agent action waits for a human.
    ApproveAll,
}

/// Whether an action of `risk` started by `initiator` waits for a human under
/// `oversight`.
pub fn needs_approval(risk: Risk, initiator: InitiatorKind, oversight: Oversight) -> bool {
    match oversight {
        Oversight::ApproveAll => true,
        Oversight::AutonomousNeedsApproval if initiator == InitiatorKind::Autonomous => true,
        _ => risk > Risk::Low,
    }
}
