use chrono::Utc;
use cqrs_es::test::TestFramework;

use super::*;
use crate::consent::gate::Reason;

type Given = TestFramework<Message>;

fn decision(allowed: bool) -> Decision {
    Decision {
        allowed,
        reason: if allowed {
            Reason::Consent
        } else {
            Reason::ConsentWithdrawn
        },
        relied_on: vec![Uuid::from_u128(9)],
    }
}

fn content() -> Content {
    Content {
        to: "ada@example.com".into(),
        subject: Some("Hello".into()),
        body: "Hi Ada".into(),
    }
}

fn submit(allowed: bool) -> MessageCommand {
    MessageCommand::Submit {
        message_id: Uuid::from_u128(1),
        contact_id: Uuid::from_u128(2),
        channel: Channel::Email,
        purpose: PurposeKey::parse("marketing").unwrap(),
        content: content(),
        decision: decision(allowed),
    }
}

fn queued() -> MessageEvent {
    MessageEvent::MessageQueued {
        message_id: Uuid::from_u128(1),
        contact_id: Uuid::from_u128(2),
        channel: Channel::Email,
        purpose: PurposeKey::parse("marketing").unwrap(),
        decision: decision(true),
        content: content(),
    }
}

#[test]
fn the_gate_decides_queued_or_blocked() {
    Given::with(())
        .given_no_previous_events()
        .when(submit(true))
        .then_expect_events(vec![queued()]);
    Given::with(())
        .given_no_previous_events()
        .when(submit(false))
        .then_expect_events(vec![MessageEvent::MessageBlocked {
            message_id: Uuid::from_u128(1),
            contact_id: Uuid::from_u128(2),
            channel: Channel::Email,
            purpose: PurposeKey::parse("marketing").unwrap(),
            decision: decision(false),
            content: content(),
        }]);
}

#[test]
fn a_refusal_at_dispatch_is_recorded_and_ends_the_message() {
    Given::with(())
        .given(vec![queued()])
        .when(MessageCommand::Recheck {
            decision: decision(false),
            attempt: 1,
        })
        .then_expect_events(vec![MessageEvent::MessageBlockedAtDispatch {
            decision: decision(false),
            attempt: 1,
        }]);
    Given::with(())
        .given(vec![queued()])
        .when(MessageCommand::Recheck {
            decision: decision(true),
            attempt: 1,
        })
        .then_expect_events(vec![]);
    Given::with(())
        .given(vec![
            queued(),
            MessageEvent::MessageBlockedAtDispatch {
                decision: decision(false),
                attempt: 1,
            },
        ])
        .when(MessageCommand::RecordSent {
            attempt: 1,
            carrier: "smtp".into(),
            carrier_message_id: None,
        })
        .then_expect_error(MessageError::NotQueued);
}

#[test]
fn failures_back_off_then_give_up() {
    let now = Utc::now();
    Given::with(())
        .given(vec![queued()])
        .when(MessageCommand::RecordFailure {
            attempt: 1,
            error: "451".into(),
            retryable: true,
            now,
        })
        .then_expect_events(vec![MessageEvent::MessageAttemptFailed {
            attempt: 1,
            error: "451".into(),
            next_attempt_at: now + chrono::Duration::seconds(2),
        }]);
    Given::with(())
        .given(vec![queued()])
        .when(MessageCommand::RecordFailure {
            attempt: MAX_ATTEMPTS,
            error: "451".into(),
            retryable: true,
            now,
        })
        .then_expect_events(vec![MessageEvent::MessageFailed {
            attempt: MAX_ATTEMPTS,
            error: "451".into(),
        }]);
    Given::with(())
        .given(vec![queued()])
        .when(MessageCommand::RecordFailure {
            attempt: 1,
            error: "550 no such user".into(),
            retryable: false,
            now,
        })
        .then_expect_events(vec![MessageEvent::MessageFailed {
            attempt: 1,
            error: "550 no such user".into(),
        }]);
    assert_eq!(backoff(1).num_seconds(), 2);
    assert_eq!(backoff(3).num_seconds(), 8);
    assert_eq!(backoff(20).num_seconds(), 300);
}

#[test]
fn a_sent_message_is_not_sent_again() {
    Given::with(())
        .given(vec![
            queued(),
            MessageEvent::MessageSent {
                attempt: 1,
                carrier: "smtp".into(),
                carrier_message_id: None,
            },
        ])
        .when(MessageCommand::RecordSent {
            attempt: 2,
            carrier: "smtp".into(),
            carrier_message_id: None,
        })
        .then_expect_error(MessageError::NotQueued);
}
