//! The OpenAPI 3.1 document served at `/openapi.json`, built with utoipa: request
//! bodies are the handlers' own input types (`#[derive(ToSchema)]`), so a field added
//! to one appears here; [`OPERATIONS`] lists every route once with its authentication,
//! permission and responses. A test checks that every listed route is served and that
//! every route of docs/permissions.md is listed.

use utoipa::openapi::path::{
    HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItem,
};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, InfoBuilder, OpenApi, OpenApiBuilder, PathsBuilder, Ref,
    RefOr, Required, Schema,
};
use utoipa::{PartialSchema, ToSchema};

use crate::routes;

/// Who may call an operation.
#[derive(Clone, Copy)]
pub enum Auth {
    /// No credentials (login, links, probes).
    Public,
    /// A staff JWT or API key holding this permission (`module.action`).
    Staff(&'static str),
    /// A staff JWT or API key of an active user; acts on the caller's own account.
    SignedIn,
    /// A portal JWT.
    Portal,
}

/// One route: method, path, tag, summary, who may call it, request schema, success.
pub struct Op {
    pub method: &'static str,
    pub path: &'static str,
    pub tag: &'static str,
    pub summary: &'static str,
    pub auth: Auth,
    pub body: Option<&'static str>,
    pub ok: (u16, &'static str),
    pub query: &'static [&'static str],
}

const fn op(
    method: &'static str,
    path: &'static str,
    tag: &'static str,
    summary: &'static str,
    auth: Auth,
    body: Option<&'static str>,
    ok: (u16, &'static str),
) -> Op {
    Op {
        method,
        path,
        tag,
        summary,
        auth,
        body,
        ok,
        query: &[],
    }
}

use Auth::{Portal, Public, SignedIn, Staff};

/// Every route the service serves.
pub const OPERATIONS: &[Op] = &[
    op(
        "POST",
        "/v1/auth/login",
        "auth",
        "Log in with email, password and (with 2FA) a code",
        Public,
        Some("LoginRequest"),
        (200, "Token"),
    ),
    op(
        "POST",
        "/v1/auth/logout",
        "auth",
        "End every session of the caller",
        SignedIn,
        None,
        (204, ""),
    ),
    op(
        "POST",
        "/v1/auth/password",
        "auth",
        "Change the caller's password (ends other sessions)",
        SignedIn,
        Some("PasswordInput"),
        (200, "Token"),
    ),
    op(
        "POST",
        "/v1/auth/password-reset",
        "auth",
        "Mail a password reset link (same answer for unknown addresses)",
        Public,
        Some("StaffEmailInput"),
        (202, "Message"),
    ),
    op(
        "POST",
        "/v1/auth/password-reset/confirm",
        "auth",
        "Set a new password with a reset link's token",
        Public,
        Some("ResetInput"),
        (200, "Message"),
    ),
    op(
        "POST",
        "/v1/auth/2fa/setup",
        "auth",
        "Create a TOTP seed for the caller",
        SignedIn,
        None,
        (200, "TotpSetup"),
    ),
    op(
        "POST",
        "/v1/auth/2fa/enable",
        "auth",
        "Turn 2FA on with a code of the new seed",
        SignedIn,
        Some("CodeInput"),
        (200, "TwoFactorEnabled"),
    ),
    op(
        "POST",
        "/v1/auth/2fa/disable",
        "auth",
        "Turn the caller's own 2FA off with the password and a code (ends other sessions)",
        SignedIn,
        Some("DisableTwoFactorInput"),
        (200, "Token"),
    ),
    op(
        "GET",
        "/v1/me",
        "auth",
        "The caller's role, permissions, field access and modules",
        SignedIn,
        None,
        (200, "Me"),
    ),
    Op {
        query: &[
            "limit",
            "after",
            "email",
            "company",
            "q",
            "archived",
            "updated_since",
            "min_position",
            "wait_ms",
        ],
        ..op(
            "GET",
            "/v1/contacts",
            "contacts",
            "List contacts",
            Staff("contacts.read"),
            None,
            (200, "ContactPage"),
        )
    },
    op(
        "POST",
        "/v1/contacts",
        "contacts",
        "Create a contact",
        Staff("contacts.create"),
        Some("ContactInput"),
        (201, "Outcome"),
    ),
    Op {
        query: &["as_of", "min_position", "wait_ms"],
        ..op(
            "GET",
            "/v1/contacts/{id}",
            "contacts",
            "Read a contact (as_of: as it was then; needs contacts.history too)",
            Staff("contacts.read"),
            None,
            (200, "Contact"),
        )
    },
    op(
        "PATCH",
        "/v1/contacts/{id}",
        "contacts",
        "Change a contact (null clears a field)",
        Staff("contacts.update"),
        Some("ContactInput"),
        (200, "Outcome"),
    ),
    op(
        "POST",
        "/v1/contacts/{id}/archive",
        "contacts",
        "Archive a contact",
        Staff("contacts.archive"),
        None,
        (200, "Outcome"),
    ),
    op(
        "GET",
        "/v1/contacts/{id}/history",
        "contacts",
        "A contact's events, decrypted and redacted for the caller",
        Staff("contacts.history"),
        None,
        (200, "History"),
    ),
    op(
        "POST",
        "/v1/contacts/{id}/portal-access",
        "portal",
        "Give a contact portal access",
        Staff("portal.manage"),
        Some("GrantInput"),
        (200, "Outcome"),
    ),
    op(
        "POST",
        "/v1/contacts/{id}/portal-access/revoke",
        "portal",
        "Take a contact's portal access away",
        Staff("portal.manage"),
        None,
        (200, "Outcome"),
    ),
    Op {
        query: &[
            "actor_id",
            "action",
            "entity_type",
            "entity_id",
            "since",
            "until",
            "before",
            "limit",
            "min_position",
            "wait_ms",
        ],
        ..op(
            "GET",
            "/v1/activity",
            "activity",
            "The organisation's activity log, newest first",
            Staff("activity.read"),
            None,
            (200, "ActivityPage"),
        )
    },
    op(
        "GET",
        "/v1/reports/contacts",
        "reports",
        "Contact counts (no personal data)",
        Staff("reports.read"),
        None,
        (200, "ContactCounts"),
    ),
    op(
        "GET",
        "/v1/users",
        "users",
        "List staff users",
        Staff("users.read"),
        None,
        (200, "UserList"),
    ),
    op(
        "POST",
        "/v1/users",
        "users",
        "Create a staff user",
        Staff("users.manage"),
        Some("NewUserInput"),
        (201, "Created"),
    ),
    op(
        "GET",
        "/v1/users/{id}",
        "users",
        "Read a staff user",
        Staff("users.read"),
        None,
        (200, "User"),
    ),
    op(
        "POST",
        "/v1/users/{id}/role",
        "users",
        "Change a user's role",
        Staff("users.manage"),
        Some("RoleChange"),
        (200, "Outcome"),
    ),
    op(
        "POST",
        "/v1/users/{id}/deactivate",
        "users",
        "Deactivate a user (ends its sessions)",
        Staff("users.manage"),
        None,
        (200, "Outcome"),
    ),
    op(
        "POST",
        "/v1/users/{id}/two-factor/reset",
        "users",
        "Remove another user's 2FA (lost authenticator; ends its sessions)",
        Staff("users.manage"),
        None,
        (200, "Outcome"),
    ),
    op(
        "POST",
        "/v1/users/{id}/reactivate",
        "users",
        "Reactivate a user",
        Staff("users.manage"),
        None,
        (200, "Outcome"),
    ),
    op(
        "GET",
        "/v1/roles",
        "roles",
        "Built-in and custom roles with their policies",
        Staff("roles.read"),
        None,
        (200, "RoleList"),
    ),
    Op {
        query: &["field", "at"],
        ..op(
            "GET",
            "/v1/audit/field-access",
            "roles",
            "Who could read a contact field at a moment, from the events",
            Staff("roles.read"),
            None,
            (200, "FieldReaders"),
        )
    },
    op(
        "POST",
        "/v1/roles",
        "roles",
        "Define a custom role",
        Staff("roles.manage"),
        Some("RoleDefinition"),
        (201, "Created"),
    ),
    op(
        "PATCH",
        "/v1/roles/{id}",
        "roles",
        "Change a custom role",
        Staff("roles.manage"),
        Some("RoleDefinition"),
        (200, "Outcome"),
    ),
    op(
        "POST",
        "/v1/roles/{id}/retire",
        "roles",
        "Retire a custom role nobody holds",
        Staff("roles.manage"),
        None,
        (200, "Outcome"),
    ),
    op(
        "PUT",
        "/v1/organization/modules",
        "organization",
        "Switch modules on and off",
        Staff("organization.manage"),
        Some("ModulesInput"),
        (200, "Outcome"),
    ),
    op(
        "PUT",
        "/v1/organization/two-factor",
        "organization",
        "Require 2FA of Owners and Admins",
        Staff("organization.manage"),
        Some("TwoFactorInput"),
        (200, "Outcome"),
    ),
    op(
        "POST",
        "/v1/api-keys",
        "api-keys",
        "Issue an API key (shown once)",
        Staff("api_keys.manage"),
        Some("IssueInput"),
        (201, "IssuedKey"),
    ),
    op(
        "GET",
        "/v1/api-keys",
        "api-keys",
        "List API keys (never their secrets)",
        Staff("api_keys.manage"),
        None,
        (200, "KeyList"),
    ),
    op(
        "POST",
        "/v1/api-keys/{id}/revoke",
        "api-keys",
        "Revoke an API key",
        Staff("api_keys.manage"),
        None,
        (200, "Outcome"),
    ),
    op(
        "POST",
        "/portal/auth/login",
        "portal",
        "A contact logs in to the portal",
        Public,
        Some("PortalLoginInput"),
        (200, "Token"),
    ),
    op(
        "POST",
        "/portal/auth/magic-link",
        "portal",
        "Mail a sign-in link (same answer for unknown addresses)",
        Public,
        Some("PortalEmailInput"),
        (202, "Message"),
    ),
    op(
        "POST",
        "/portal/auth/magic-link/redeem",
        "portal",
        "Sign in with a magic link's token",
        Public,
        Some("TokenInput"),
        (200, "Token"),
    ),
    op(
        "POST",
        "/portal/auth/password-reset",
        "portal",
        "Mail a portal password reset link",
        Public,
        Some("PortalEmailInput"),
        (202, "Message"),
    ),
    op(
        "POST",
        "/portal/auth/password-reset/confirm",
        "portal",
        "Set a portal password with a reset link's token",
        Public,
        Some("ResetInput"),
        (200, "Message"),
    ),
    op(
        "POST",
        "/portal/auth/logout",
        "portal",
        "End the contact's portal sessions",
        Portal,
        None,
        (204, ""),
    ),
    op(
        "GET",
        "/portal/me",
        "portal",
        "The contact's own record",
        Portal,
        None,
        (200, "Contact"),
    ),
    op(
        "GET",
        "/healthz",
        "operations",
        "Liveness",
        Public,
        None,
        (200, ""),
    ),
    op(
        "GET",
        "/readyz",
        "operations",
        "Readiness: PostgreSQL and NATS reachable",
        Public,
        None,
        (200, ""),
    ),
    op(
        "GET",
        "/metrics",
        "operations",
        "Prometheus metrics",
        Public,
        None,
        (200, ""),
    ),
    op(
        "GET",
        "/openapi.json",
        "operations",
        "This document",
        Public,
        None,
        (200, ""),
    ),
];

fn method(m: &str) -> HttpMethod {
    match m {
        "GET" => HttpMethod::Get,
        "POST" => HttpMethod::Post,
        "PUT" => HttpMethod::Put,
        "PATCH" => HttpMethod::Patch,
        _ => HttpMethod::Delete,
    }
}

fn json_ref(description: &str, schema: &str) -> RefOr<utoipa::openapi::Response> {
    let mut r = ResponseBuilder::new().description(description);
    if !schema.is_empty() {
        r = r.content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name(schema)))
                .build(),
        );
    }
    RefOr::T(r.build())
}

fn error(description: &str) -> RefOr<utoipa::openapi::Response> {
    json_ref(description, "Error")
}

fn object(fields: &[(&str, Type)]) -> Schema {
    let mut o = ObjectBuilder::new();
    for (name, ty) in fields {
        o = o
            .property(*name, ObjectBuilder::new().schema_type(ty.clone()))
            .required(*name);
    }
    Schema::Object(o.build())
}

fn any_object(description: &str) -> Schema {
    Schema::Object(
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(description))
            .build(),
    )
}

/// Schemas of responses: named shapes (the handlers build these with `json!`).
fn response_schemas() -> Vec<(&'static str, Schema)> {
    use Type::{Array, Boolean, Integer, Object, String as Str};
    vec![
        ("Error", Schema::Object(ObjectBuilder::new()
            .property("code", ObjectBuilder::new().schema_type(Str).description(Some("machine-readable, e.g. permission_denied, field_forbidden, module_inactive")))
            .required("code")
            .property("message", ObjectBuilder::new().schema_type(Str).description(Some("names the field, permission or module at fault")))
            .required("message")
            .property("request_id", ObjectBuilder::new().schema_type(Str))
            .property("fields", ObjectBuilder::new().schema_type(Array).description(Some("422 only: [{field, message}]")))
            .build())),
        ("Token", object(&[("access_token", Str), ("token_type", Str), ("expires_in", Integer)])),
        ("Message", object(&[("message", Str)])),
        ("Outcome", object(&[("id", Str), ("version", Integer), ("positions", Array)])),
        ("Created", object(&[("id", Str)])),
        ("TotpSetup", object(&[("secret", Str), ("otpauth_url", Str), ("digits", Integer), ("period", Integer)])),
        ("TwoFactorEnabled", object(&[("backup_codes", Array), ("access_token", Str), ("token_type", Str), ("expires_in", Integer)])),
        ("Me", object(&[("principal", Object), ("role", Str), ("permissions", Array), ("fields", Object), ("modules", Array)])),
        ("Contact", any_object("a contact's fields (those the caller's role does not hide) with id, version, archived, created_at, updated_at")),
        ("ContactPage", object(&[("items", Array), ("next_after", Str)])),
        ("History", object(&[("id", Str), ("events", Array)])),
        ("ActivityPage", object(&[("items", Array), ("next_before", Integer)])),
        ("ContactCounts", object(&[("total", Integer), ("archived", Integer), ("active", Integer)])),
        ("User", object(&[("id", Str), ("email", Str), ("role", Str), ("active", Boolean)])),
        ("UserList", object(&[("items", Array)])),
        ("RoleList", object(&[("items", Array)])),
        ("IssuedKey", object(&[("id", Str), ("key", Str), ("last4", Str), ("role", Str)])),
        ("KeyList", object(&[("items", Array)])),
        ("FieldReaders", object(&[("field", Str), ("at", Str), ("readers", Array)])),
    ]
}

/// Request schemas: the handlers' own input types.
fn request_schemas() -> Vec<(String, RefOr<Schema>)> {
    fn s<T: ToSchema>() -> (String, RefOr<Schema>) {
        (T::name().into_owned(), T::schema())
    }
    vec![
        s::<routes::login::LoginRequest>(),
        s::<routes::users::PasswordInput>(),
        s::<routes::users::NewUserInput>(),
        s::<routes::users::RoleChange>(),
        s::<routes::users::CodeInput>(),
        s::<routes::users::DisableTwoFactorInput>(),
        s::<routes::contacts::ContactInput>(),
        s::<routes::contacts::AddressInput>(),
        s::<routes::roles::RoleDefinition>(),
        s::<routes::roles::ModulesInput>(),
        s::<routes::roles::TwoFactorInput>(),
        s::<routes::api_keys::IssueInput>(),
        s::<routes::portal::PortalLoginInput>(),
        s::<routes::portal::PortalEmailInput>(),
        s::<routes::portal::StaffEmailInput>(),
        s::<routes::portal::TokenInput>(),
        s::<routes::portal::ResetInput>(),
        s::<routes::portal::GrantInput>(),
    ]
}

pub fn document() -> OpenApi {
    let mut paths = PathsBuilder::new();
    for o in OPERATIONS {
        let mut b = OperationBuilder::new()
            .tag(o.tag)
            .summary(Some(o.summary))
            .operation_id(Some(format!("{} {}", o.method, o.path)));
        let ok_text = match o.ok.0 {
            201 => "Created",
            202 => "Accepted (the same for unknown addresses)",
            204 => "No content",
            _ => "OK",
        };
        b = b.response(o.ok.0.to_string(), json_ref(ok_text, o.ok.1));
        if o.path.contains("{id}") {
            b = b.parameter(
                ParameterBuilder::new()
                    .name("id")
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .schema(Some(String::schema())),
            );
            b = b.response("404", error("No such record in the caller's organisation (another organisation's id answers the same)"));
        }
        for q in o.query {
            b = b.parameter(
                ParameterBuilder::new()
                    .name(*q)
                    .parameter_in(ParameterIn::Query)
                    .required(Required::False)
                    .schema(Some(String::schema())),
            );
        }
        if let Some(body) = o.body {
            b = b.request_body(Some(
                RequestBodyBuilder::new()
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(Ref::from_schema_name(body)))
                            .build(),
                    )
                    .required(Some(Required::True))
                    .build(),
            ));
            b = b
                .response("400", error("Malformed JSON, unknown member, bad query"))
                .response("413", error("Body too large"))
                .response("415", error("Not application/json"))
                .response("422", error("Invalid fields, each named in `fields`"));
        }
        match o.auth {
            Public => {}
            Staff(permission) => {
                b = b
                    .description(Some(format!("Needs the `{permission}` permission (docs/permissions.md) and its module active.")))
                    .security(SecurityRequirement::new("staff_jwt", Vec::<String>::new()))
                    .security(SecurityRequirement::new("api_key", Vec::<String>::new()))
                    .response("401", error("Missing, invalid, expired or revoked credentials"))
                    .response("403", error("permission_denied, module_inactive, field_forbidden, grant_exceeds_own, owner_required or two_factor_setup_required"));
            }
            SignedIn => {
                b = b
                    .security(SecurityRequirement::new("staff_jwt", Vec::<String>::new()))
                    .response(
                        "401",
                        error("Missing, invalid, expired or revoked credentials"),
                    );
            }
            Portal => {
                b = b
                    .security(SecurityRequirement::new("portal_jwt", Vec::<String>::new()))
                    .response("401", error("Missing, invalid or staff credentials"))
                    .response("403", error("module_inactive (portal)"));
            }
        }
        if o.method != "GET" && !matches!(o.auth, Public) {
            b = b.response(
                "409",
                error("Version conflict or a rule of the record (last Owner, retired role…)"),
            );
        }
        if o.path.starts_with("/v1/") || o.path.starts_with("/portal/") {
            b = b.response("429", error("Rate limited: see Retry-After"));
        }
        b = b.response(
            "503",
            error("A dependency is unavailable or a projection is behind; retry"),
        );
        paths = paths.path(o.path, PathItem::new(method(o.method), b.build()));
    }
    let bearer = |desc: &str, fmt: &str| {
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format(fmt)
                .description(Some(desc))
                .build(),
        )
    };
    let mut components = ComponentsBuilder::new()
        .security_scheme(
            "staff_jwt",
            bearer("Staff JWT (HS256, typ=staff) from /v1/auth/login", "JWT"),
        )
        .security_scheme(
            "api_key",
            bearer(
                "API key: ck_live_ + 22 base62 + 6 checksum characters",
                "ck_live_…",
            ),
        )
        .security_scheme(
            "portal_jwt",
            bearer("Portal JWT (typ=portal) from /portal/auth/…", "JWT"),
        );
    for (name, schema) in response_schemas() {
        components = components.schema(name, schema);
    }
    for (name, schema) in request_schemas() {
        components = components.schema(name, schema);
    }
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("CRM compliance core")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some("Commands become immutable events; reads come from projections. Errors share one shape (Error)."))
                .build(),
        )
        .paths(paths.build())
        .components(Some(components.build()))
        .build()
}

/// The document as served (built once).
pub fn json() -> &'static str {
    static DOC: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        serde_json::to_string(&document()).unwrap_or_else(|_| "{}".into())
    });
    &DOC
}
