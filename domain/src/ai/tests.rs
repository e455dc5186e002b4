use chrono::{Duration, Utc};
use cqrs_es::test::TestFramework;
use serde_json::json;
use uuid::Uuid;

use super::risk::{assess, needs_approval, BULK_HIGH_ABOVE};
use super::*;
use crate::contact::ContactField;

fn input(kind: ActionKind) -> RiskInput {
    RiskInput {
        kind,
        fields: vec![],
        custom_fields: false,
        contacts: 1,
    }
}

fn rule_for(i: RiskInput) -> (&'static str, Risk) {
    let r = assess(&i);
    (r.id, r.risk)
}

// ---- The risk policy table: one test per row, in the table's order ----

#[test]
fn erasing_is_high() {
    assert_eq!(rule_for(input(ActionKind::Erase)), ("erase", Risk::High));
}

#[test]
fn exporting_is_high() {
    assert_eq!(rule_for(input(ActionKind::Export)), ("export", Risk::High));
}

#[test]
fn changing_permissions_is_high() {
    assert_eq!(
        rule_for(input(ActionKind::ChangePermissions)),
        ("permissions", Risk::High)
    );
}

#[test]
fn a_bulk_update_of_more_than_100_contacts_is_high_and_of_100_medium() {
    let mut i = input(ActionKind::BulkUpdate);
    i.fields = vec![ContactField::Company];
    i.contacts = BULK_HIGH_ABOVE + 1;
    assert_eq!(rule_for(i.clone()), ("bulk_large", Risk::High));
    i.contacts = BULK_HIGH_ABOVE;
    assert_eq!(rule_for(i), ("bulk", Risk::Medium));
}

#[test]
fn lifting_do_not_contact_is_high_and_setting_it_medium() {
    assert_eq!(
        rule_for(input(ActionKind::LiftDoNotContact)),
        ("lift_do_not_contact", Risk::High)
    );
    assert_eq!(
        rule_for(input(ActionKind::SetDoNotContact)),
        ("set_do_not_contact", Risk::Medium)
    );
}

#[test]
fn sending_a_message_is_medium() {
    assert_eq!(
        rule_for(input(ActionKind::SendMessage)),
        ("send_message", Risk::Medium)
    );
}

#[test]
fn a_consent_change_is_medium() {
    assert_eq!(
        rule_for(input(ActionKind::ChangeConsent)),
        ("consent", Risk::Medium)
    );
}

#[test]
fn an_update_touching_personal_data_is_medium() {
    for field in ContactField::ALL {
        if field == ContactField::Company {
            continue;
        }
        let mut i = input(ActionKind::UpdateContact);
        i.fields = vec![ContactField::Company, field];
        assert_eq!(rule_for(i), ("personal_data", Risk::Medium), "{field:?}");
    }
    let mut custom = input(ActionKind::UpdateContact);
    custom.custom_fields = true;
    assert_eq!(rule_for(custom), ("personal_data", Risk::Medium));
}

#[test]
fn an_update_of_non_personal_fields_only_is_low() {
    let mut i = input(ActionKind::UpdateContact);
    i.fields = vec![ContactField::Company];
    assert_eq!(rule_for(i), ("default", Risk::Low));
}

#[test]
fn the_rules_name_each_kind_and_end_with_a_catch_all() {
    assert_eq!(super::RULES.last().unwrap().id, "default");
    let ids: std::collections::BTreeSet<_> = super::RULES.iter().map(|r| r.id).collect();
    assert_eq!(ids.len(), super::RULES.len(), "rule ids are unique");
    // Only a non-personal update can be low risk.
    for kind in ActionKind::ALL {
        if kind != ActionKind::UpdateContact {
            assert!(
                assess(&input(kind)).risk >= Risk::Medium,
                "{kind:?} is at least medium"
            );
        }
    }
}

#[test]
fn approval_follows_risk_initiator_and_oversight() {
    use InitiatorKind::*;
    use Oversight::*;
    for (risk, who, oversight, waits) in [
        (Risk::Low, User, Standard, false),
        (Risk::Low, Autonomous, Standard, false),
        (Risk::Medium, User, Standard, true),
        (Risk::Medium, Autonomous, Standard, true),
        (Risk::High, Autonomous, Standard, true),
        (Risk::Low, User, AutonomousNeedsApproval, false),
        (Risk::Low, Autonomous, AutonomousNeedsApproval, true),
        (Risk::Low, User, ApproveAll, true),
        (Risk::Low, Autonomous, ApproveAll, true),
    ] {
        assert_eq!(
            needs_approval(risk, who, oversight),
            waits,
            "{risk:?} {who:?} {oversight:?}"
        );
    }
}

// ---- An action's life ----

type Framework = TestFramework<AiAction>;

const SHA_A: &str = "aaaa";
const SHA_B: &str = "bbbb";

fn request(sha: &str) -> Request {
    Request {
        kind: ActionKind::SendMessage,
        arguments_sha256: sha.to_owned(),
        contacts: vec![Uuid::nil()],
        user_id: None,
    }
}

fn content() -> Content {
    Content {
        arguments: json!({"channel": "email", "purpose": "marketing", "body": "Hi"}),
        input_summary: None,
        reasoning_summary: None,
    }
}

fn propose(kind: InitiatorKind, on_behalf_of: Option<Uuid>, stopped: bool) -> AiActionCommand {
    let now = Utc::now();
    AiActionCommand::Propose {
        action_id: Uuid::from_u128(1),
        org_id: Uuid::from_u128(2),
        agent_id: Uuid::from_u128(3),
        initiator: Initiator { kind, on_behalf_of },
        request: request(SHA_A),
        content: content(),
        risk_input: input(ActionKind::SendMessage),
        oversight: Oversight::Standard,
        stopped,
        model: ModelInfo::default(),
        expires_at: now + Duration::hours(1),
        now,
    }
}

fn proposed_events(cmd: AiActionCommand) -> Vec<AiActionEvent> {
    Framework::with(())
        .given_no_previous_events()
        .when(cmd)
        .inspect_result()
        .expect("proposed")
}

fn pending_history(on_behalf_of: Option<Uuid>) -> Vec<AiActionEvent> {
    proposed_events(propose(
        if on_behalf_of.is_some() {
            InitiatorKind::User
        } else {
            InitiatorKind::Autonomous
        },
        on_behalf_of,
        false,
    ))
}

#[test]
fn a_medium_risk_proposal_waits_for_approval_and_names_its_rule() {
    let events = pending_history(None);
    assert!(matches!(
        &events[0],
        AiActionEvent::AiActionProposed { risk: Risk::Medium, rule, .. } if rule == "send_message"
    ));
    assert!(matches!(
        &events[1],
        AiActionEvent::AiActionApprovalRequested { because, .. } if because == "risk"
    ));
}

#[test]
fn a_low_risk_user_initiated_proposal_is_auto_approved() {
    let mut cmd = propose(InitiatorKind::User, Some(Uuid::from_u128(9)), false);
    if let AiActionCommand::Propose {
        risk_input,
        request,
        ..
    } = &mut cmd
    {
        *risk_input = RiskInput {
            fields: vec![ContactField::Company],
            ..input(ActionKind::UpdateContact)
        };
        request.kind = ActionKind::UpdateContact;
    }
    let events = proposed_events(cmd);
    assert!(matches!(
        &events[1],
        AiActionEvent::AiActionAutoApproved { rule } if rule == "default"
    ));
}

#[test]
fn with_the_stop_switch_on_an_autonomous_action_waits_whatever_its_risk() {
    let mut cmd = propose(InitiatorKind::Autonomous, None, true);
    if let AiActionCommand::Propose { risk_input, .. } = &mut cmd {
        *risk_input = RiskInput {
            fields: vec![ContactField::Company],
            ..input(ActionKind::UpdateContact)
        };
    }
    let events = proposed_events(cmd);
    assert!(matches!(
        &events[1],
        AiActionEvent::AiActionApprovalRequested { because, .. } if because == "stop_switch"
    ));
}

#[test]
fn the_user_it_was_proposed_for_cannot_approve_or_reject_it() {
    let user = Uuid::from_u128(9);
    Framework::with(())
        .given(pending_history(Some(user)))
        .when(AiActionCommand::Approve {
            by: user,
            arguments_sha256: SHA_A.into(),
            reason: None,
            stopped: false,
            now: Utc::now(),
        })
        .then_expect_error(AiActionError::OwnAction);
    Framework::with(())
        .given(pending_history(Some(user)))
        .when(AiActionCommand::Reject {
            by: user,
            reason: "no".into(),
        })
        .then_expect_error(AiActionError::OwnAction);
    let other = Uuid::from_u128(10);
    Framework::with(())
        .given(pending_history(Some(user)))
        .when(AiActionCommand::Approve {
            by: other,
            arguments_sha256: SHA_A.into(),
            reason: None,
            stopped: false,
            now: Utc::now(),
        })
        .then_expect_events(vec![AiActionEvent::AiActionApproved {
            by: other,
            arguments_sha256: SHA_A.into(),
            note: Note::of(None),
        }]);
}

#[test]
fn an_approval_holds_for_the_exact_arguments_only() {
    let approver = Uuid::from_u128(10);
    let mut history = pending_history(None);
    history.push(AiActionEvent::AiActionEdited {
        by: approver,
        request: request(SHA_B),
        content: content(),
        risk: Risk::Medium,
        rule: "send_message".into(),
    });
    history.push(AiActionEvent::AiActionApprovalRequested {
        expires_at: Utc::now() + Duration::hours(1),
        because: "edited".into(),
    });
    Framework::with(())
        .given(history.clone())
        .when(AiActionCommand::Approve {
            by: approver,
            arguments_sha256: SHA_A.into(),
            reason: None,
            stopped: false,
            now: Utc::now(),
        })
        .then_expect_error(AiActionError::StaleApproval);
    Framework::with(())
        .given(history)
        .when(AiActionCommand::Approve {
            by: approver,
            arguments_sha256: SHA_B.into(),
            reason: None,
            stopped: false,
            now: Utc::now(),
        })
        .then_expect_events(vec![AiActionEvent::AiActionApproved {
            by: approver,
            arguments_sha256: SHA_B.into(),
            note: Note::of(None),
        }]);
}

#[test]
fn an_edit_of_an_approved_action_is_refused_and_an_edit_asks_again() {
    let approver = Uuid::from_u128(10);
    let mut approved = pending_history(None);
    approved.push(AiActionEvent::AiActionApproved {
        by: approver,
        arguments_sha256: SHA_A.into(),
        note: Note::of(None),
    });
    let expires_at = Utc::now() + Duration::hours(1);
    let edit = AiActionCommand::Edit {
        by: approver,
        request: request(SHA_B),
        content: content(),
        risk_input: input(ActionKind::SendMessage),
        expires_at,
    };
    Framework::with(())
        .given(approved)
        .when(edit.clone())
        .then_expect_error(AiActionError::NotAllowedNow(
            ActionStatus::Approved,
            "edited",
        ));
    Framework::with(())
        .given(pending_history(None))
        .when(edit)
        .then_expect_events(vec![
            AiActionEvent::AiActionEdited {
                by: approver,
                request: request(SHA_B),
                content: content(),
                risk: Risk::Medium,
                rule: "send_message".into(),
            },
            AiActionEvent::AiActionApprovalRequested {
                expires_at,
                because: "edited".into(),
            },
        ]);
}

#[test]
fn a_pending_action_expires_only_once_its_time_is_up_and_cannot_be_approved_after() {
    let history = pending_history(None);
    let expires_at = match &history[1] {
        AiActionEvent::AiActionApprovalRequested { expires_at, .. } => *expires_at,
        e => panic!("{e:?}"),
    };
    Framework::with(())
        .given(history.clone())
        .when(AiActionCommand::Expire {
            now: expires_at - Duration::seconds(1),
        })
        .then_expect_error(AiActionError::NotAllowedNow(
            ActionStatus::PendingApproval,
            "expired before its time",
        ));
    Framework::with(())
        .given(history.clone())
        .when(AiActionCommand::Approve {
            by: Uuid::from_u128(10),
            arguments_sha256: SHA_A.into(),
            reason: None,
            stopped: false,
            now: expires_at,
        })
        .then_expect_error(AiActionError::ExpiredApproval);
    Framework::with(())
        .given(history)
        .when(AiActionCommand::Expire { now: expires_at })
        .then_expect_events(vec![AiActionEvent::AiActionExpired {}]);
}

#[test]
fn only_an_approved_action_is_executed_and_only_once() {
    let ids = vec![Uuid::from_u128(77)];
    Framework::with(())
        .given(pending_history(None))
        .when(AiActionCommand::RecordExecuted {
            event_ids: ids.clone(),
        })
        .then_expect_error(AiActionError::NotAllowedNow(
            ActionStatus::PendingApproval,
            "executed",
        ));
    let mut approved = pending_history(None);
    approved.push(AiActionEvent::AiActionApproved {
        by: Uuid::from_u128(10),
        arguments_sha256: SHA_A.into(),
        note: Note::of(None),
    });
    Framework::with(())
        .given(approved.clone())
        .when(AiActionCommand::RecordExecuted {
            event_ids: ids.clone(),
        })
        .then_expect_events(vec![AiActionEvent::AiActionExecuted {
            event_ids: ids.clone(),
        }]);
    approved.push(AiActionEvent::AiActionExecuted {
        event_ids: ids.clone(),
    });
    Framework::with(())
        .given(approved)
        .when(AiActionCommand::RecordExecuted { event_ids: ids })
        .then_expect_error(AiActionError::NotAllowedNow(
            ActionStatus::Executed,
            "executed",
        ));
}

#[test]
fn the_stop_switch_holds_an_approved_action_until_a_fresh_decision() {
    let mut approved = pending_history(None);
    approved.push(AiActionEvent::AiActionApproved {
        by: Uuid::from_u128(10),
        arguments_sha256: SHA_A.into(),
        note: Note::of(None),
    });
    let expires_at = Utc::now() + Duration::hours(1);
    approved.push(AiActionEvent::AiActionHeld { expires_at });
    Framework::with(())
        .given(approved.clone())
        .when(AiActionCommand::RecordExecuted { event_ids: vec![] })
        .then_expect_error(AiActionError::NotAllowedNow(
            ActionStatus::PendingApproval,
            "executed",
        ));
    Framework::with(())
        .given(approved)
        .when(AiActionCommand::Approve {
            by: Uuid::from_u128(10),
            arguments_sha256: SHA_A.into(),
            reason: Some("checked again".into()),
            stopped: false,
            now: Utc::now(),
        })
        .then_expect_events(vec![AiActionEvent::AiActionApproved {
            by: Uuid::from_u128(10),
            arguments_sha256: SHA_A.into(),
            note: Note::of(Some("checked again".into())),
        }]);
}

#[test]
fn a_rejection_needs_a_reason() {
    Framework::with(())
        .given(pending_history(None))
        .when(AiActionCommand::Reject {
            by: Uuid::from_u128(10),
            reason: "  ".into(),
        })
        .then_expect_error(AiActionError::ReasonRequired);
}

#[test]
fn the_documented_table_is_the_policy_in_code() {
    // docs/ai.md's table, row by row: `| rule id | matches | risk |`.
    let doc = include_str!("../../../docs/ai.md");
    let rows: Vec<(String, String)> = doc
        .lines()
        .skip_while(|l| !l.starts_with("| rule id |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').to_owned(), cells[3].to_owned())
        })
        .collect();
    let code: Vec<(String, String)> = super::RULES
        .iter()
        .map(|r| {
            let risk = serde_json::to_value(r.risk).unwrap();
            (r.id.to_owned(), risk.as_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(rows, code);
}

#[test]
fn with_the_stop_switch_on_an_autonomous_action_cannot_be_approved() {
    Framework::with(())
        .given(pending_history(None))
        .when(AiActionCommand::Approve {
            by: Uuid::from_u128(10),
            arguments_sha256: SHA_A.into(),
            reason: None,
            stopped: true,
            now: Utc::now(),
        })
        .then_expect_error(AiActionError::Stopped);
    // A user-initiated one can: the stop switch holds what agents do on their own.
    let user = Uuid::from_u128(9);
    Framework::with(())
        .given(pending_history(Some(user)))
        .when(AiActionCommand::Approve {
            by: Uuid::from_u128(10),
            arguments_sha256: SHA_A.into(),
            reason: None,
            stopped: true,
            now: Utc::now(),
        })
        .then_expect_events(vec![AiActionEvent::AiActionApproved {
            by: Uuid::from_u128(10),
            arguments_sha256: SHA_A.into(),
            note: Note::of(None),
        }]);
}

#[test]
fn the_personal_data_of_every_step_sits_in_its_encrypted_sections() {
    use crate::PersonalData;
    let mut c = content();
    c.input_summary = Some("SECRET-input".into());
    c.reasoning_summary = Some("SECRET-reasoning".into());
    let events = vec![
        AiActionEvent::AiActionProposed {
            action_id: Uuid::nil(),
            org_id: Uuid::nil(),
            agent_id: Uuid::nil(),
            initiator: Initiator {
                kind: InitiatorKind::Autonomous,
                on_behalf_of: None,
            },
            request: request(SHA_A),
            content: c.clone(),
            risk: Risk::Medium,
            rule: "r".into(),
            model: ModelInfo::default(),
        },
        AiActionEvent::AiActionEdited {
            by: Uuid::nil(),
            request: request(SHA_B),
            content: c,
            risk: Risk::Medium,
            rule: "r".into(),
        },
        AiActionEvent::AiActionApproved {
            by: Uuid::nil(),
            arguments_sha256: SHA_A.into(),
            note: Note::of(Some("SECRET-why".into())),
        },
        AiActionEvent::AiActionRejected {
            by: Uuid::nil(),
            note: Note::of(Some("SECRET-why".into())),
        },
        AiActionEvent::AiActionFailed {
            reason: "blocked".into(),
            note: Note::of(Some("SECRET-detail".into())),
            event_ids: vec![],
        },
    ];
    for event in events {
        let mut json = serde_json::to_value(&event).unwrap();
        let body = json.as_object_mut().unwrap().values_mut().next().unwrap();
        for section in event.personal_sections() {
            // The store encrypts the direct members of objects: each section is one.
            assert!(body[*section].is_object(), "{event:?}: {section}");
            body.as_object_mut().unwrap().remove(*section);
        }
        // Nothing personal is left outside them (the message body "Hi" included).
        let rest = json.to_string();
        assert!(
            !rest.contains("SECRET") && !rest.contains("\"Hi\""),
            "{rest}"
        );
    }
}
