//! Outbound webhooks (docs/webhooks.md): an organisation's endpoints receive the public
//! events of the catalogue (`crm_domain::public_events`) they subscribe to, signed after
//! the Standard Webhooks specification.
//!
//! - [`endpoints`]: the `webhook_endpoint` stream's commands, with the effects that keep
//!   `webhook_endpoints`, the vault (signing secrets) and the queue in step in the same
//!   transaction; the endpoint reads.
//! - [`worker`]: the delivery worker: fan-out from its durable consumer into
//!   `webhook_messages`, then claimed attempts with a lease, the retry schedule, the
//!   automatic disable, the delivery log and its retention.
//! - [`net`]: where requests may go (the service's own networks are refused unless an
//!   operator allowlist permits them; one DNS lookup per connection, checked, and the
//!   checked address is the one connected to; no redirects) and the client.
//! - [`signer`]: the signing secret and the `webhook-signature` header.
//! - [`log`]: the delivery log's reads.
//!
//! Invariants: an event acknowledged by the fan-out is in the queue (one row per
//! endpoint and event, so a redelivery adds nothing); a message keeps its `webhook-id`
//! over every attempt and every worker; the body is shaped at each attempt for the
//! endpoint's role from the stored event, so a contact erased meanwhile is not in it;
//! the secret is decrypted only on the record (`WebhookSecretDecrypted`).

pub mod endpoints;
pub mod log;
pub mod net;
pub mod signer;
pub mod worker;
