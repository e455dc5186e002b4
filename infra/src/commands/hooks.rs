//! Post-commit hooks: how the rest of a process hears that a command committed,
//! without the executor knowing who listens.
//!
//! A feature that keeps something in memory derived from what commands write (the
//! access cache, a consent-state cache) or that waits for certain events (a dispatcher
//! to wake) implements [`CommitHook`] and is registered once, where the process is
//! wired (`Executor::new(..).with_hook(..)`). After every command that wrote events,
//! the executor calls each hook with what committed, in registration order, before it
//! returns to its caller: the process that ran a command never answers before its own
//! hooks have seen it.
//!
//! What other processes must learn belongs in the command's transaction, not here: a
//! feature's effect (`Executor::execute_with`) can `NOTIFY` there, which PostgreSQL
//! delivers when, and only if, that transaction commits (`crate::access::cache` does
//! so for access changes). A hook only ever sees committed commands, and cannot fail
//! or undo one.

use uuid::Uuid;

use crate::commands::executor::CommandOutcome;

/// What one command committed.
#[derive(Debug, Clone, Copy)]
pub struct Committed<'a> {
    /// The organisation whose stream was written.
    pub org_id: Uuid,
    /// The aggregate's type (`cqrs_es::Aggregate::TYPE`): which stream kind, so that a
    /// hook can ignore what does not concern it.
    pub aggregate_type: &'static str,
    /// The stream's id, its version after the commit, the events' global positions:
    /// what the caller gets back.
    pub outcome: &'a CommandOutcome,
}

/// Told of every command that committed events through the executor it is registered
/// with. Called on the command's task right after the commit, so it must be quick and
/// must not block: take a lock briefly, set a flag, wake a task, spawn work.
pub trait CommitHook: Send + Sync {
    fn committed(&self, commit: &Committed<'_>);
}
