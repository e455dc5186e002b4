//! The contact aggregate: a person an organisation holds data about.

mod aggregate;
mod commands;
mod events;

pub use aggregate::{apply_changes, Contact, ContactError};
pub use commands::ContactCommand;
pub use events::{
    ContactChanges, ContactEvent, ContactField, ContactProfile, HoldReason, RequestSource,
};

#[cfg(test)]
mod tests;
