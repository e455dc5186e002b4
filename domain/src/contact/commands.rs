use uuid::Uuid;

use super::events::{ContactChanges, ContactProfile, RequestSource};

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
    PlaceLegalHold {
        reason: Option<String>,
    },
    LiftLegalHold {
        reason: Option<String>,
    },
    RestrictProcessing {
        reason: Option<String>,
    },
    LiftRestriction {
        reason: Option<String>,
    },
    SetRetention {
        days: Option<u32>,
        reason: Option<String>,
    },
    /// Records that everything held about the contact was exported.
    RecordExport {
        export_id: Uuid,
        source: RequestSource,
    },
    /// Records the erasure whose keys the same commit destroys (the executor's effect).
    Erase {
        request_id: Uuid,
        source: RequestSource,
        keys_destroyed: Vec<String>,
        suppressed: Vec<String>,
    },
}
