//! Every operation of the service, declared once: method, path, tag, summary, who may
//! call it, the errors of its own rules, and its handler (whose argument and reply
//! types say what it takes and answers). The edge serves this table and
//! `/openapi.json` is generated from it, so neither can drift from the other.

use crm_domain::access::Permission as P;
use warp::http::Method;

use super::{
    activity, ai, ai_audit, api_keys, carriers, consent, consent_log, contacts, credentials,
    events, health, login, messages, portal, preferences, receipts, reports, rights, roles, users,
    webhooks,
};
use crate::edge::route::{route, Auth, Route};

pub fn table() -> Vec<Route> {
    let (get, post, patch, put, delete) = (
        Method::GET,
        Method::POST,
        Method::PATCH,
        Method::PUT,
        Method::DELETE,
    );
    vec![
        // The caller's own account.
        route(post.clone(), "/v1/auth/login", "auth")
            .summary("Log in with email, password and (with 2FA) a code")
            .errors(&[401])
            .to(login::login),
        route(post.clone(), "/v1/auth/logout", "auth")
            .summary("End every session of the caller")
            .auth(Auth::SignedIn)
            .errors(&[403])
            .to(users::logout),
        route(post.clone(), "/v1/auth/password", "auth")
            .summary("Change the caller's password (ends other sessions)")
            .auth(Auth::SignedIn)
            .errors(&[403])
            .to(users::change_password),
        route(post.clone(), "/v1/auth/password-reset", "auth")
            .summary("Mail a password reset link (same answer for unknown addresses)")
            .to(portal::staff_reset_request),
        route(post.clone(), "/v1/auth/password-reset/confirm", "auth")
            .summary("Set a new password with a reset link's token")
            .errors(&[401])
            .to(portal::staff_reset_confirm),
        route(post.clone(), "/v1/auth/2fa/setup", "auth")
            .summary("Create a TOTP seed for the caller")
            .auth(Auth::SignedIn)
            .errors(&[403, 409])
            .to(users::two_factor_setup),
        route(post.clone(), "/v1/auth/2fa/enable", "auth")
            .summary("Turn 2FA on with a code of the new seed")
            .auth(Auth::SignedIn)
            .errors(&[403, 409])
            .to(users::two_factor_enable),
        route(post.clone(), "/v1/auth/2fa/disable", "auth")
            .summary(
                "Turn the caller's own 2FA off with the password and a code (ends other sessions)",
            )
            .auth(Auth::SignedIn)
            .errors(&[403, 409])
            .to(users::two_factor_disable),
        route(get.clone(), "/v1/me", "auth")
            .summary("The caller's role, permissions, field access and modules")
            .auth(Auth::SignedIn)
            .to(users::me),
        // Contacts.
        route(get.clone(), "/v1/contacts", "contacts")
            .summary("List contacts")
            .staff(P::ContactsRead)
            .to(contacts::list),
        route(post.clone(), "/v1/contacts", "contacts")
            .summary("Create a contact")
            .staff(P::ContactsCreate)
            .large_body()
            .errors(&[409])
            .to(contacts::create),
        route(get.clone(), "/v1/contacts/{id}", "contacts")
            .summary("Read a contact (as_of: as it was then; needs contacts.history too)")
            .staff(P::ContactsRead)
            .to(contacts::get_one),
        route(patch.clone(), "/v1/contacts/{id}", "contacts")
            .summary("Change a contact (null clears a field)")
            .staff(P::ContactsUpdate)
            .large_body()
            .errors(&[409])
            .to(contacts::update),
        route(post.clone(), "/v1/contacts/{id}/archive", "contacts")
            .summary("Archive a contact")
            .staff(P::ContactsArchive)
            .errors(&[409])
            .to(contacts::archive),
        route(get.clone(), "/v1/contacts/{id}/history", "contacts")
            .summary("A contact's events, decrypted and redacted for the caller")
            .staff(P::ContactsHistory)
            .to(contacts::history),
        // Data-subject rights.
        route(post.clone(), "/v1/contacts/{id}/legal-hold", "rights")
            .summary("Place a legal hold: the contact cannot be erased until it is lifted")
            .staff(P::ContactsLegalHold)
            .errors(&[404, 409])
            .to(rights::place_legal_hold),
        route(post.clone(), "/v1/contacts/{id}/legal-hold/lift", "rights")
            .summary("Lift the contact's legal hold")
            .staff(P::ContactsLegalHold)
            .errors(&[404, 409])
            .to(rights::lift_legal_hold),
        route(post.clone(), "/v1/contacts/{id}/restriction", "rights")
            .summary(
                "Restrict the contact's processing (GDPR Art. 18): the gate refuses every \
                 purpose not allowed under restriction",
            )
            .staff(P::ContactsRestrict)
            .errors(&[404, 409])
            .to(rights::restrict),
        route(post.clone(), "/v1/contacts/{id}/restriction/lift", "rights")
            .summary("Lift the restriction of the contact's processing")
            .staff(P::ContactsRestrict)
            .errors(&[404, 409])
            .to(rights::lift_restriction),
        route(put.clone(), "/v1/contacts/{id}/retention", "rights")
            .summary("Set the contact's own retention period (null: the organisation's)")
            .staff(P::ContactsErase)
            .errors(&[404, 409])
            .to(rights::set_retention),
        route(post.clone(), "/v1/contacts/{id}/erase", "rights")
            .summary(
                "Erase a contact: destroy its data keys, write its tombstone, purge the read \
                 models, suppress its addresses; answers the receipt",
            )
            .staff(P::ContactsErase)
            .errors(&[404, 409])
            .to(rights::erase),
        route(get.clone(), "/v1/contacts/{id}/export", "rights")
            .summary(
                "Everything held about a contact, as JSON, streamed (recorded as an event)",
            )
            .staff(P::ContactsExport)
            .errors(&[404])
            .to(rights::export),
        route(get.clone(), "/v1/erasures", "rights")
            .summary("Erasure receipts, newest first (no personal data)")
            .staff(P::ErasuresRead)
            .to(rights::list),
        route(get.clone(), "/v1/erasures/{id}", "rights")
            .summary("One erasure receipt, by its request id")
            .staff(P::ErasuresRead)
            .errors(&[404])
            .to(rights::get_one),
        route(post.clone(), "/v1/contacts/{id}/portal-access", "portal")
            .summary("Give a contact portal access")
            .staff(P::PortalManage)
            .errors(&[409])
            .to(portal::grant),
        route(
            post.clone(),
            "/v1/contacts/{id}/portal-access/revoke",
            "portal",
        )
        .summary("Take a contact's portal access away")
        .staff(P::PortalManage)
        .errors(&[409])
        .to(portal::revoke),
        // Consent, messages and the send gate.
        route(post.clone(), "/v1/contacts/{id}/consent", "consent")
            .summary("Record a consent change with its proof (answers its signed receipt)")
            .staff(P::ConsentManage)
            .errors(&[404, 409])
            .to(consent::record),
        route(
            post.clone(),
            "/v1/contacts/{id}/consent/double-opt-in",
            "consent",
        )
        .summary("Ask the contact to confirm by e-mail (pending until confirmed)")
        .staff(P::ConsentManage)
        .errors(&[404, 409])
        .to(consent::request_double_opt_in),
        route(post.clone(), "/v1/contacts/{id}/do-not-contact", "consent")
            .summary("Mark the contact Do Not Contact: every channel blocked")
            .staff(P::ConsentManage)
            .errors(&[404, 409])
            .to(consent::set_do_not_contact),
        route(
            post.clone(),
            "/v1/contacts/{id}/do-not-contact/lift",
            "consent",
        )
        .summary("Lift the contact's Do Not Contact mark")
        .staff(P::ConsentManage)
        .errors(&[404, 409])
        .to(consent::lift_do_not_contact),
        route(
            post.clone(),
            "/v1/contacts/{id}/sale-sharing-opt-out",
            "consent",
        )
        .summary("Record the contact's opt-out of sale and sharing (CCPA)")
        .staff(P::ConsentManage)
        .errors(&[404, 409])
        .to(consent::opt_out_of_sale),
        route(
            post.clone(),
            "/v1/contacts/{id}/sale-sharing-opt-out/lift",
            "consent",
        )
        .summary("Lift the contact's opt-out of sale and sharing")
        .staff(P::ConsentManage)
        .errors(&[404, 409])
        .to(consent::lift_sale_opt_out),
        route(post.clone(), "/v1/consent/imports", "consent")
            .summary(
                "Import consent changes (CSV or JSON lines): each row an event, bad rows named",
            )
            .staff(P::ConsentManage)
            .bulk_body()
            .to(consent::import),
        route(get.clone(), "/v1/consent/receipts/{id}", "consent")
            .summary("The signed receipt of a consent event")
            .staff(P::ConsentRead)
            .errors(&[404])
            .to(consent::receipt),
        route(post.clone(), "/v1/contacts/{id}/messages", "messages")
            .summary("Send a message through the send gate: queued or blocked, with the reason")
            .staff(P::MessagesSend)
            .large_body()
            .errors(&[404, 409])
            .to(messages::send),
        route(get.clone(), "/v1/messages/{id}", "messages")
            .summary("A message and every decision on it: why it was sent, or not")
            .staff(P::MessagesRead)
            .errors(&[404])
            .to(messages::get_one),
        // AI actions (docs/ai.md).
        route(post.clone(), "/v1/ai/actions", "ai")
            .summary(
                "Propose an AI action: run at once if the risk policy allows, else queued for approval",
            )
            .auth(Auth::SignedIn)
            .large_body()
            .errors(&[403, 404, 409])
            .to(ai::propose),
        route(get.clone(), "/v1/ai/actions/{id}", "ai")
            .summary("An AI action: its risk and rule, where it stands, every step and its outcome")
            .auth(Auth::SignedIn)
            .errors(&[404])
            .to(ai::get_one),
        route(get.clone(), "/v1/ai/actions/{id}/export", "ai")
            .summary("The export an executed `export` action made (its proposer only), streamed")
            .auth(Auth::SignedIn)
            .errors(&[404, 409])
            .to(ai::export),
        route(post.clone(), "/v1/ai/actions/{id}/approve", "ai")
            .summary("Approve an AI action's exact arguments (by their SHA-256); it then runs")
            .staff(P::AiApprove)
            .errors(&[404, 409])
            .to(ai::approve),
        route(post.clone(), "/v1/ai/actions/{id}/edit", "ai")
            .summary("Edit a pending AI action's arguments: it then needs a fresh decision")
            .staff(P::AiApprove)
            .large_body()
            .errors(&[404, 409])
            .to(ai::edit),
        route(post.clone(), "/v1/ai/actions/{id}/reject", "ai")
            .summary("Reject an AI action, with a reason")
            .staff(P::AiApprove)
            .errors(&[404, 409])
            .to(ai::reject),
        route(get.clone(), "/v1/ai/approvals", "ai")
            .summary("Pending AI actions, each with a readable diff of what it would change")
            .staff(P::AiApprove)
            .to(ai_audit::approvals),
        route(get.clone(), "/v1/ai/audit", "ai")
            .summary(
                "The AI audit log: every action with its risk, rule, model, approval chain and outcome",
            )
            .staff(P::AiAuditRead)
            .to(ai_audit::audit),
        route(get.clone(), "/v1/ai/settings", "ai")
            .summary("The organisation's AI oversight level and stop switch")
            .staff(P::AiApprove)
            .to(ai::get_settings),
        route(put.clone(), "/v1/ai/oversight", "ai")
            .summary("Set how much human approval agent actions need (with why)")
            .staff(P::OrganizationManage)
            .to(ai::set_oversight),
        route(post.clone(), "/v1/ai/stop", "ai")
            .summary("Stop every autonomous AI action, queued ones included (with why)")
            .staff(P::AiApprove)
            .to(ai::stop),
        route(post.clone(), "/v1/ai/resume", "ai")
            .summary("Lift the AI stop switch (with why); what waited still needs a decision")
            .staff(P::OrganizationManage)
            .to(ai::resume),
        // AI provider credentials, kept in the vault (docs/vault.md).
        route(post.clone(), "/v1/ai/credentials", "ai")
            .summary("Store an AI provider's API key (sealed; only its last four are ever answered)")
            .staff(P::OrganizationManage)
            .to(credentials::create),
        route(get.clone(), "/v1/ai/credentials", "ai")
            .summary("The organisation's AI provider credentials (last four characters only)")
            .staff(P::OrganizationManage)
            .to(credentials::list),
        route(get.clone(), "/v1/ai/credentials/{id}", "ai")
            .summary("An AI provider credential (last four characters only)")
            .staff(P::OrganizationManage)
            .errors(&[404])
            .to(credentials::get_one),
        route(post.clone(), "/v1/ai/credentials/{id}/rotate", "ai")
            .summary("Replace a credential's API key")
            .staff(P::OrganizationManage)
            .errors(&[404, 409])
            .to(credentials::rotate),
        route(delete.clone(), "/v1/ai/credentials/{id}", "ai")
            .summary("Delete a credential and its sealed key")
            .staff(P::OrganizationManage)
            .errors(&[404, 409])
            .to(credentials::delete),
        route(post.clone(), "/v1/ai/credentials/{id}/verify", "ai")
            .summary(
                "Decrypt the key (recorded as credentials.decrypt, purpose verify) and call GET {base_url}/models with it",
            )
            .staff(P::CredentialsDecrypt)
            .errors(&[404, 409])
            .to(credentials::verify),
        // Outbound webhooks (docs/webhooks.md).
        route(get.clone(), "/v1/events/types", "webhooks")
            .summary("The catalogue of public event types (webhooks and the live stream)")
            .auth(Auth::SignedIn)
            .to(webhooks::event_types),
        route(post.clone(), "/v1/webhooks", "webhooks")
            .summary("Register a webhook endpoint (its signing secret is answered once)")
            .staff(P::WebhooksManage)
            .to(webhooks::create),
        route(get.clone(), "/v1/webhooks", "webhooks")
            .summary("The organisation's webhook endpoints")
            .staff(P::WebhooksManage)
            .to(webhooks::list),
        route(get.clone(), "/v1/webhooks/{id}", "webhooks")
            .summary("A webhook endpoint")
            .staff(P::WebhooksManage)
            .errors(&[404])
            .to(webhooks::get_one),
        route(patch.clone(), "/v1/webhooks/{id}", "webhooks")
            .summary("Change a webhook endpoint's URL, event types, role, description or ordering")
            .staff(P::WebhooksManage)
            .errors(&[404, 409])
            .to(webhooks::update),
        route(delete.clone(), "/v1/webhooks/{id}", "webhooks")
            .summary("Delete a webhook endpoint and its secrets (its log stays for its period)")
            .staff(P::WebhooksManage)
            .errors(&[404, 409])
            .to(webhooks::delete),
        route(post.clone(), "/v1/webhooks/{id}/rotate", "webhooks")
            .summary("A new signing secret; the previous one stays valid for a grace period")
            .staff(P::WebhooksManage)
            .errors(&[404, 409])
            .to(webhooks::rotate),
        route(post.clone(), "/v1/webhooks/{id}/disable", "webhooks")
            .summary("Disable a webhook endpoint (what it misses can be replayed)")
            .staff(P::WebhooksManage)
            .errors(&[404, 409])
            .to(webhooks::disable),
        route(post.clone(), "/v1/webhooks/{id}/enable", "webhooks")
            .summary("Enable a disabled webhook endpoint again")
            .staff(P::WebhooksManage)
            .errors(&[404, 409])
            .to(webhooks::enable),
        route(post.clone(), "/v1/webhooks/{id}/replay", "webhooks")
            .summary("Send one message again, or every message since a time that was not delivered")
            .staff(P::WebhooksManage)
            .errors(&[404, 409])
            .to(webhooks::replay),
        route(get.clone(), "/v1/webhooks/{id}/messages", "webhooks")
            .summary("An endpoint's delivery log: its messages, newest first")
            .staff(P::WebhooksManage)
            .errors(&[404])
            .to(webhooks::messages),
        route(get.clone(), "/v1/webhooks/{id}/messages/{message_id}", "webhooks")
            .summary("A message of the delivery log with every attempt")
            .staff(P::WebhooksManage)
            .errors(&[404])
            .to(webhooks::message),
        route(get.clone(), "/v1/privacy", "privacy")
            .summary("The organisation's privacy mode and purposes")
            .staff(P::ConsentRead)
            .to(consent::get_privacy),
        route(put.clone(), "/v1/privacy/settings", "privacy")
            .summary("Set the privacy mode, double opt-in and default time zone (with why)")
            .staff(P::PrivacyManage)
            .errors(&[409])
            .to(consent::configure_privacy),
        route(put.clone(), "/v1/privacy/branding", "privacy")
            .summary("Set the preference center's colour and logo (with why)")
            .staff(P::PrivacyManage)
            .large_body()
            .errors(&[409])
            .to(consent::set_branding),
        route(put.clone(), "/v1/privacy/retention", "privacy")
            .summary(
                "Set the organisation's retention period (days after a contact's last change; \
                 null: none), with why",
            )
            .staff(P::PrivacyManage)
            .errors(&[409])
            .to(consent::set_retention),
        route(put.clone(), "/v1/privacy/purposes", "privacy")
            .summary("Define a purpose or change one (with why)")
            .staff(P::PrivacyManage)
            .errors(&[409])
            .to(consent::define_purpose),
        route(post.clone(), "/v1/privacy/purposes/retire", "privacy")
            .summary("Retire a purpose (its history is kept)")
            .staff(P::PrivacyManage)
            .errors(&[404, 409])
            .to(consent::retire_purpose),
        route(post.clone(), "/v1/public/consent/confirm", "consent")
            .summary("A contact confirms a double opt-in with the link's token")
            .errors(&[404, 409])
            .to(consent::confirm),
        route(post.clone(), "/v1/public/unsubscribe", "consent")
            .summary("One-click unsubscribe (RFC 8058): withdraws at once")
            .errors(&[404, 409])
            .to(consent::unsubscribe),
        // The preference center: public pages at a contact's link (docs/rights.md).
        route(post.clone(), "/v1/contacts/{id}/preference-link", "rights")
            .summary("Issue a link to the contact's preference center (shown once)")
            .staff(P::ConsentManage)
            .errors(&[404, 409])
            .to(preferences::issue_link),
        route(
            post.clone(),
            "/v1/contacts/{id}/preference-link/revoke",
            "rights",
        )
        .summary("Revoke every open preference-center link of the contact")
        .staff(P::ConsentManage)
        .to(preferences::revoke_links),
        route(get.clone(), "/preferences", "preferences")
            .summary("The contact's preference center (HTML)")
            .to(preferences::page),
        route(post.clone(), "/preferences", "preferences")
            .summary("Save the contact's choices, opt out of everything, or ask for erasure (HTML form)")
            .to(preferences::submit),
        route(get.clone(), "/preferences/export", "preferences")
            .summary("The contact's own copy of its data (JSON download)")
            .to(preferences::export),
        route(get.clone(), "/preferences/erase", "preferences")
            .summary("Confirm an erasure asked for in the preference center (HTML)")
            .to(preferences::erase_confirm_page),
        route(post.clone(), "/preferences/erase", "preferences")
            .summary("The confirmed erasure (HTML; the link works once)")
            .to(preferences::erase_confirmed),
        // The live event stream (docs/live.md).
        route(get.clone(), "/v1/events/stream", "events")
            .summary(
                "The organisation's public events as Server-Sent Events, shaped for the caller; \
                 resumes after Last-Event-ID",
            )
            .describe(
                "Needs one of contacts.read, consent.read, messages.read, ai.audit.read; each \
                 event type needs its own permission and is shaped by the caller's field \
                 policy. `stream=security` needs security.read. 429 `too_many_streams` when \
                 the organisation has CRM_LIVE_MAX_PER_ORG streams open (docs/live.md).",
            )
            .auth(Auth::SignedIn)
            .errors(&[403, 429])
            .to(events::stream),
        // The activity log and reports.
        route(get.clone(), "/v1/activity", "activity")
            .summary("The organisation's activity log, newest first")
            .staff(P::ActivityRead)
            .to(activity::list),
        route(get.clone(), "/v1/reports/contacts", "reports")
            .summary("Contact counts (no personal data)")
            .staff(P::ReportsRead)
            .to(reports::contacts),
        // Reading consent: the ConsentLog, a contact's consent, the bulk gate check.
        route(get.clone(), "/v1/consent/log", "consent")
            .summary("The ConsentLog: every consent change with its proof, newest first")
            .staff(P::ConsentRead)
            .to(consent_log::log),
        route(get.clone(), "/v1/contacts/{id}/consent", "consent")
            .summary("A contact's consent now (read model) or as_of a past moment (events)")
            .staff(P::ConsentRead)
            .to(consent_log::contact_consent),
        route(post.clone(), "/v1/consent/check", "consent")
            .summary("May a message go to each of these contacts now (up to 10,000)")
            .staff(P::ConsentRead)
            .bulk_body()
            .errors(&[422])
            .to(consent_log::check),
        // Users.
        route(get.clone(), "/v1/users", "users")
            .summary("List staff users")
            .staff(P::UsersRead)
            .to(users::list),
        route(post.clone(), "/v1/users", "users")
            .summary("Create a staff user (without a password: invited by mail)")
            .staff(P::UsersManage)
            .errors(&[409])
            .to(users::create),
        route(get.clone(), "/v1/users/{id}", "users")
            .summary("Read a staff user")
            .staff(P::UsersRead)
            .to(users::get_one),
        route(post.clone(), "/v1/users/{id}/role", "users")
            .summary("Change a user's role")
            .staff(P::UsersManage)
            .errors(&[409])
            .to(users::change_role),
        route(post.clone(), "/v1/users/{id}/deactivate", "users")
            .summary("Deactivate a user (ends its sessions)")
            .staff(P::UsersManage)
            .errors(&[409])
            .to(users::deactivate),
        route(post.clone(), "/v1/users/{id}/two-factor/reset", "users")
            .summary("Remove another user's 2FA (lost authenticator; ends its sessions)")
            .staff(P::UsersManage)
            .errors(&[409])
            .to(users::reset_two_factor),
        route(post.clone(), "/v1/users/{id}/reactivate", "users")
            .summary("Reactivate a user")
            .staff(P::UsersManage)
            .errors(&[409])
            .to(users::reactivate),
        // Roles, the organisation, API keys.
        route(get.clone(), "/v1/roles", "roles")
            .summary("Built-in and custom roles with their policies")
            .staff(P::RolesRead)
            .to(roles::list),
        route(get.clone(), "/v1/audit/field-access", "roles")
            .summary("Who could read a contact field at a moment, from the events")
            .staff(P::RolesRead)
            .to(roles::field_access),
        route(post.clone(), "/v1/roles", "roles")
            .summary("Define a custom role")
            .staff(P::RolesManage)
            .errors(&[409])
            .to(roles::define),
        route(patch.clone(), "/v1/roles/{id}", "roles")
            .summary("Change a custom role")
            .staff(P::RolesManage)
            .errors(&[409])
            .to(roles::change),
        route(post.clone(), "/v1/roles/{id}/retire", "roles")
            .summary("Retire a custom role nobody holds")
            .staff(P::RolesManage)
            .errors(&[409])
            .to(roles::retire),
        route(put.clone(), "/v1/organization/modules", "organization")
            .summary("Switch modules on and off")
            .staff(P::OrganizationManage)
            .errors(&[409])
            .to(roles::set_modules),
        route(put.clone(), "/v1/organization/two-factor", "organization")
            .summary("Require 2FA of Owners and Admins")
            .staff(P::OrganizationManage)
            .errors(&[409])
            .to(roles::set_two_factor),
        route(put.clone(), "/v1/organization/carriers", "organization")
            .summary("Set the carrier of a channel (its secret is stored sealed, never answered)")
            .staff(P::OrganizationManage)
            .errors(&[409])
            .to(carriers::configure),
        route(get.clone(), "/v1/organization/carriers", "organization")
            .summary("The organisation's carriers (a secret's last four characters only)")
            .staff(P::OrganizationManage)
            .to(carriers::list),
        route(
            post.clone(),
            "/v1/organization/carriers/remove",
            "organization",
        )
        .summary("Remove the carrier of a channel (the service's defaults apply again)")
        .staff(P::OrganizationManage)
        .errors(&[404, 409])
        .to(carriers::remove),
        route(post.clone(), "/v1/api-keys", "api-keys")
            .summary("Issue an API key (shown once)")
            .staff(P::ApiKeysManage)
            .errors(&[409])
            .to(api_keys::issue),
        route(get.clone(), "/v1/api-keys", "api-keys")
            .summary("List API keys (never their secrets)")
            .staff(P::ApiKeysManage)
            .to(api_keys::list),
        route(post.clone(), "/v1/api-keys/{id}/revoke", "api-keys")
            .summary("Revoke an API key")
            .staff(P::ApiKeysManage)
            .errors(&[409])
            .to(api_keys::revoke),
        // The client portal.
        route(post.clone(), "/portal/auth/login", "portal")
            .summary("A contact logs in to the portal")
            .errors(&[401, 403])
            .to(portal::portal_login),
        route(post.clone(), "/portal/auth/magic-link", "portal")
            .summary("Mail a sign-in link (same answer for unknown addresses)")
            .to(portal::magic_link),
        route(post.clone(), "/portal/auth/magic-link/redeem", "portal")
            .summary("Sign in with a magic link's token")
            .errors(&[401, 403])
            .to(portal::redeem_magic_link),
        route(post.clone(), "/portal/auth/password-reset", "portal")
            .summary("Mail a portal password reset link (same answer for unknown addresses)")
            .to(portal::portal_reset_request),
        route(
            post.clone(),
            "/portal/auth/password-reset/confirm",
            "portal",
        )
        .summary("Set a portal password with a reset link's token")
        .errors(&[401])
        .to(portal::portal_reset_confirm),
        route(post.clone(), "/portal/auth/logout", "portal")
            .summary("End the contact's portal sessions")
            .auth(Auth::Portal)
            .to(portal::portal_logout),
        route(get.clone(), "/portal/me", "portal")
            .summary("The contact's own record")
            .auth(Auth::Portal)
            .errors(&[404])
            .to(portal::portal_me),
        route(get.clone(), "/portal/export", "portal")
            .summary("The contact's own copy of its data (JSON, streamed; recorded as an export)")
            .auth(Auth::Portal)
            .errors(&[404])
            .to(portal::portal_export),
        route(post.clone(), "/portal/erase", "portal")
            .summary("The contact asks for its erasure: a link to confirm it goes to its e-mail address")
            .auth(Auth::Portal)
            .errors(&[404])
            .to(portal::portal_erase),
        // Consent receipts: the keys that verify them.
        route(get.clone(), "/.well-known/jwks.json", "consent")
            .summary("The public keys of consent receipts (JWKS; retired keys included)")
            .to(receipts::jwks),
        // Operations.
        route(get.clone(), "/healthz", "operations")
            .summary("Liveness")
            .to(health::healthz),
        route(get.clone(), "/readyz", "operations")
            .summary(
                "Readiness: PostgreSQL and NATS reachable, with the relay's and projectors' lag",
            )
            .to(health::readyz),
        route(get.clone(), "/metrics", "operations")
            .summary("Prometheus metrics")
            .to(health::metrics),
        route(get, "/openapi.json", "operations")
            .summary("This document")
            .to(health::openapi),
    ]
}
