use uuid::Uuid;

use super::events::{ContactChanges, ContactProfile};

/// Commands on a contact. Values are already parsed; the API rejects bad input before.
#[derive(Debug, Clone, PartialEq)]
pub enum ContactCommand {
    Create {
        contact_id: Uuid,
        org_id: Uuid,
        profile: ContactProfile,
    },
    Update {
        changes: ContactChanges,
    },
    Archive,
}
