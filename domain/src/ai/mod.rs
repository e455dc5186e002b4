//! AI action governance: what agents propose, the risk policy that decides whether a
//! human must approve it first, and each action's life as events (EU AI Act Art. 12
//! record-keeping, Art. 14 human oversight). docs/ai.md describes it for users.

pub mod action;
pub mod risk;
pub mod settings;

pub use action::{
    ActionStatus, AiAction, AiActionCommand, AiActionError, AiActionEvent, Content, Initiator,
    ModelInfo, Note, Request,
};
pub use risk::{ActionKind, InitiatorKind, Oversight, Risk, RiskInput, Rule, RULES};
pub use settings::{AiSettings, AiSettingsCommand, AiSettingsError, AiSettingsEvent};

#[cfg(test)]
mod tests;
