//! Errors become HTTP here and only here: one JSON shape,
//! `{"code", "message", "request_id", "fields"?, ...}`, one status mapping.

use serde::Serialize;
use serde_json::json;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Reply;

use crm_domain::api_key::ApiKeyError;
use crm_domain::contact::ContactError;
use crm_domain::organization::OrganizationError;
use crm_domain::role::RoleError;
use crm_domain::user::UserError;
use crm_infra::access::accounts::AccountError;
use crm_infra::commands::executor::CommandError;
use crm_infra::store::event_store::StoreError;

/// A problem with one input field.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The one error shape of every 4xx and 5xx answer (documentation of what
/// [`ApiError::into_response`] writes).
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    /// Machine-readable, e.g. `permission_denied`, `validation_failed`, `invalid_query`.
    code: String,
    /// Names the field, parameter, permission or module at fault.
    message: String,
    request_id: String,
    /// The members or parameters at fault (422, and 400 where one is named).
    fields: Option<Vec<FieldError>>,
    /// 503 `projection_behind` only: the read model, the position asked for and how
    /// many events it still has to apply.
    projection: Option<String>,
    position: Option<i64>,
    behind_by_events: Option<i64>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// 400; `fields` names the members or parameters at fault, when there are any.
    #[error("{message}")]
    BadRequest {
        code: &'static str,
        message: String,
        fields: Vec<FieldError>,
    },
    #[error("the request has invalid fields")]
    Validation(Vec<FieldError>),
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 401 with its own code (two-factor steps of a login).
    #[error("{message}")]
    Unauthenticated {
        code: &'static str,
        message: &'static str,
    },
    #[error("{message}")]
    Forbidden { code: &'static str, message: String },
    #[error("{0}")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    /// 409 with a code of its own: the record's state forbids the command (`erased`,
    /// `legal_hold`).
    #[error("{message}")]
    StateConflict {
        code: &'static str,
        message: &'static str,
    },
    /// 409 `secret_unreadable`: a stored secret does not open at its row (sealed for
    /// another row, altered, or under another key-encryption key); its decryption is
    /// on record, nothing was decrypted.
    #[error("{0}")]
    Unreadable(String),
    #[error("request body is too large")]
    PayloadTooLarge,
    /// The client took too long to send its body.
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    #[error("request body must be application/json")]
    UnsupportedMediaType,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("too many requests: retry after {retry_after_secs} s")]
    TooManyRequests { retry_after_secs: u64 },
    /// 429 `too_many_streams`: the organisation has as many live event streams open as
    /// it may (`CRM_LIVE_MAX_PER_ORG`).
    #[error(
        "your organisation already has {limit} live event streams open; close one or retry later"
    )]
    TooManyStreams { limit: usize },
    #[error("the {projection} view has not reached position {position} yet")]
    NotCaughtUp {
        projection: &'static str,
        position: i64,
        behind: i64,
    },
    #[error("a dependency of the service is unavailable; retry after Retry-After")]
    Unavailable(String),
    /// Anything unexpected: logged with its cause, answered without it.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// 409 `erased`: the contact was erased; nothing more is recorded about it.
    pub fn erased() -> Self {
        Self::StateConflict {
            code: "erased",
            message: "the contact was erased",
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
            fields: Vec::new(),
        }
    }

    /// The same error naming `fields` (400s only; others are unchanged).
    pub fn with_fields(self, named: Vec<FieldError>) -> Self {
        match self {
            Self::BadRequest { code, message, .. } => Self::BadRequest {
                code,
                message,
                fields: named,
            },
            other => other,
        }
    }

    /// 429: over a rate limit until `wait` has passed (`Retry-After` in whole seconds).
    pub fn too_many_requests(wait: std::time::Duration) -> Self {
        Self::TooManyRequests {
            retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
        }
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::Internal(e.to_string())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unauthorized(_) | Self::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) | Self::Unreadable(_) | Self::StateConflict { .. } => {
                StatusCode::CONFLICT
            }
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::TooManyRequests { .. } | Self::TooManyStreams { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::NotCaughtUp { .. } | Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The machine-readable code of the answer (`permission_denied`, `not_found`, …).
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { code, .. } => code,
            Self::Validation(_) => "validation_failed",
            Self::Unauthorized(_) => "unauthorized",
            Self::Unauthenticated { code, .. } => code,
            Self::Forbidden { code, .. } => code,
            Self::NotFound(_) => "not_found",
            Self::Conflict(_) => "version_conflict",
            Self::StateConflict { code, .. } => code,
            Self::Unreadable(_) => "secret_unreadable",
            Self::PayloadTooLarge => "payload_too_large",
            Self::RequestTimeout => "request_timeout",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::TooManyRequests { .. } => "rate_limited",
            Self::TooManyStreams { .. } => "too_many_streams",
            Self::NotCaughtUp { .. } => "projection_behind",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    /// The JSON error response, tagged with the request id.
    pub fn into_response(self, request_id: &str) -> Response {
        match &self {
            Self::Internal(cause) => tracing::error!(request_id, cause = %cause, "internal error"),
            Self::Unavailable(cause) => {
                tracing::warn!(request_id, cause = %cause, "answered 503: a dependency is unavailable")
            }
            _ => {}
        }
        let mut body = json!({
            "code": self.code(),
            "message": self.to_string(),
            "request_id": request_id,
        });
        match &self {
            Self::Validation(fields) => body["fields"] = json!(fields),
            Self::BadRequest { fields, .. } if !fields.is_empty() => body["fields"] = json!(fields),
            Self::NotCaughtUp {
                projection,
                position,
                behind,
            } => {
                body["projection"] = json!(projection);
                body["position"] = json!(position);
                body["behind_by_events"] = json!(behind);
            }
            _ => {}
        }
        let mut resp =
            warp::reply::with_status(warp::reply::json(&body), self.status()).into_response();
        let headers = resp.headers_mut();
        if let Ok(v) = request_id.parse() {
            headers.insert("x-request-id", v);
        }
        match &self {
            Self::Unauthorized(_) => {
                headers.insert("www-authenticate", "Bearer".parse().expect("static header"));
            }
            Self::NotCaughtUp { .. } | Self::Unavailable(_) => {
                headers.insert("retry-after", "1".parse().expect("static header"));
            }
            Self::TooManyRequests { retry_after_secs } => {
                headers.insert("retry-after", (*retry_after_secs).into());
            }
            Self::TooManyStreams { .. } => {
                headers.insert("retry-after", "5".parse().expect("static header"));
            }
            // The rest of the body is not read: say so, so the client does not send
            // its next request on a connection the server is about to close.
            Self::PayloadTooLarge | Self::RequestTimeout => {
                headers.insert("connection", "close".parse().expect("static header"));
            }
            _ => {}
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => {
                Self::Conflict("another command changed this record first; reload and retry".into())
            }
            StoreError::Db(e) => e.into(),
            StoreError::Pool(e) => e.into(),
            StoreError::Unavailable(what) => Self::Unavailable(what.into()),
            // Writing personal data of a subject whose key was destroyed.
            StoreError::Crypto(crm_infra::crypto::CryptoError::Erased) => Self::erased(),
            other => Self::internal(other),
        }
    }
}

impl From<crm_infra::feed::projector::ProjectionError> for ApiError {
    fn from(e: crm_infra::feed::projector::ProjectionError) -> Self {
        use crm_infra::feed::projector::ProjectionError as P;
        match e {
            P::Db(e) => e.into(),
            P::Pool(e) => e.into(),
            P::Store(e) => e.into(),
            other => Self::internal(other),
        }
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::Unavailable(format!("database: {e}"))
    }
}

impl From<tokio_postgres::Error> for ApiError {
    /// The database away is a 503 (retry); anything else it says is a 500.
    fn from(e: tokio_postgres::Error) -> Self {
        if crm_infra::db::is_unavailable(&e) {
            Self::Unavailable(format!("database: {}", crm_infra::db::describe(&e)))
        } else {
            Self::internal(crm_infra::db::describe(&e))
        }
    }
}

impl From<CommandError<ContactError>> for ApiError {
    fn from(e: CommandError<ContactError>) -> Self {
        match e {
            CommandError::Domain(ContactError::NotFound) => Self::NotFound("contact not found"),
            CommandError::Domain(ContactError::AlreadyExists) => {
                Self::Conflict("contact already exists".into())
            }
            CommandError::Domain(ContactError::Archived) => {
                Self::Conflict("contact is archived and cannot change".into())
            }
            CommandError::Domain(ContactError::Erased) => Self::erased(),
            CommandError::Domain(d @ ContactError::BadRetention) => {
                Self::Validation(vec![FieldError::new("days", d.to_string())])
            }
            CommandError::Domain(ContactError::OnLegalHold) => Self::StateConflict {
                code: "legal_hold",
                message: "the contact is under a legal hold: it cannot be erased until the hold is lifted",
            },
            CommandError::Domain(
                d @ (ContactError::AlreadyOnHold
                | ContactError::NoLegalHold
                | ContactError::AlreadyRestricted
                | ContactError::NotRestricted),
            ) => Self::Conflict(d.to_string()),
            CommandError::Domain(ContactError::EmptyProfile) => {
                Self::Validation(vec![FieldError::new(
                    "profile",
                    "a contact needs at least one field",
                )])
            }
            // Version 0 is "no such stream" in the caller's organisation: the same 404
            // as without `expected_version` (a create expects 0 and never gets here).
            CommandError::VersionMismatch { actual: 0, .. } => Self::NotFound("contact not found"),
            CommandError::VersionMismatch { expected, actual } => Self::Conflict(format!(
                "expected version {expected}, but the contact is at version {actual}"
            )),
            CommandError::Conflict => Self::Conflict(
                "another command changed this contact first; reload and retry".into(),
            ),
            CommandError::Store(e) => e.into(),
        }
    }
}

fn forbidden(code: &'static str, message: impl std::fmt::Display) -> ApiError {
    ApiError::Forbidden {
        code,
        message: message.to_string(),
    }
}

fn command_conflict<E: std::error::Error>(e: CommandError<E>, what: &'static str) -> ApiError {
    match e {
        // Version 0: no such record in the caller's organisation (as without a version).
        CommandError::VersionMismatch { actual: 0, .. } => ApiError::NotFound(match what {
            "user" => "user not found",
            "role" => "role not found",
            "API key" => "API key not found",
            _ => "not found",
        }),
        CommandError::VersionMismatch { expected, actual } => ApiError::Conflict(format!(
            "expected version {expected}, but the {what} is at version {actual}"
        )),
        CommandError::Conflict => ApiError::Conflict(format!(
            "another command changed this {what} first; reload and retry"
        )),
        CommandError::Store(e) => e.into(),
        CommandError::Domain(e) => ApiError::internal(e),
    }
}

impl From<CommandError<UserError>> for ApiError {
    fn from(e: CommandError<UserError>) -> Self {
        match e {
            CommandError::Domain(d) => match d {
                UserError::NotFound => Self::NotFound("user not found"),
                UserError::AlreadyExists | UserError::EmailTaken => Self::Conflict(d.to_string()),
                UserError::LastOwner
                | UserError::TwoFactorAlreadyOn
                | UserError::TwoFactorNotOn => Self::Conflict(d.to_string()),
                UserError::TwoFactorRequired => forbidden("two_factor_required_by_organization", d),
                UserError::OnlyOwnerGrantsOwner | UserError::OnlyOwnerChangesOwner => {
                    forbidden("owner_required", d)
                }
                UserError::ExceedsOwnGrant(_) => forbidden("grant_exceeds_own", d),
                UserError::HoldsMoreThanYou(_) => forbidden("user_exceeds_own", d),
                UserError::UnknownRole => {
                    Self::Validation(vec![FieldError::new("role", d.to_string())])
                }
            },
            other => command_conflict(other, "user"),
        }
    }
}

impl From<CommandError<RoleError>> for ApiError {
    fn from(e: CommandError<RoleError>) -> Self {
        match e {
            CommandError::Domain(d) => match d {
                RoleError::NotFound => Self::NotFound("role not found"),
                RoleError::AlreadyExists | RoleError::Retired | RoleError::InUse(_) => {
                    Self::Conflict(d.to_string())
                }
                RoleError::ExceedsOwnGrant(_) => forbidden("grant_exceeds_own", d),
            },
            other => command_conflict(other, "role"),
        }
    }
}

impl From<CommandError<ApiKeyError>> for ApiError {
    fn from(e: CommandError<ApiKeyError>) -> Self {
        match e {
            CommandError::Domain(d) => match d {
                ApiKeyError::NotFound => Self::NotFound("API key not found"),
                ApiKeyError::AlreadyExists => Self::Conflict(d.to_string()),
                ApiKeyError::OnlyOwnerGrantsOwner => forbidden("owner_required", d),
                ApiKeyError::ExceedsOwnGrant(_) => forbidden("grant_exceeds_own", d),
                ApiKeyError::NotInRole(_) => {
                    Self::Validation(vec![FieldError::new("permissions", d.to_string())])
                }
                ApiKeyError::ExpiryInPast => {
                    Self::Validation(vec![FieldError::new("expires_at", d.to_string())])
                }
            },
            other => command_conflict(other, "API key"),
        }
    }
}

impl From<CommandError<OrganizationError>> for ApiError {
    fn from(e: CommandError<OrganizationError>) -> Self {
        match e {
            CommandError::Domain(OrganizationError::NotFound) => {
                Self::NotFound("organisation not found")
            }
            CommandError::Domain(d @ OrganizationError::AlreadyExists) => {
                Self::Conflict(d.to_string())
            }
            other => command_conflict(other, "organisation"),
        }
    }
}

impl From<CommandError<crm_domain::consent::ledger::ConsentError>> for ApiError {
    fn from(e: CommandError<crm_domain::consent::ledger::ConsentError>) -> Self {
        use crm_domain::consent::ledger::ConsentError as C;
        match e {
            CommandError::Domain(d @ C::NoticeRequired) => {
                Self::Validation(vec![FieldError::new("notice", d.to_string())])
            }
            CommandError::Domain(d @ C::ExpiryTooLong) => {
                Self::Validation(vec![FieldError::new("expires_in_hours", d.to_string())])
            }
            CommandError::Domain(C::UnknownToken) => {
                Self::NotFound("the confirmation link is unknown, used or expired")
            }
            CommandError::Domain(d @ (C::DoubleOptInRequired | C::NotMarked | C::NotOptedOut)) => {
                Self::Conflict(d.to_string())
            }
            other => command_conflict(other, "consent record"),
        }
    }
}

impl From<CommandError<crm_domain::consent::privacy::PrivacyError>> for ApiError {
    fn from(e: CommandError<crm_domain::consent::privacy::PrivacyError>) -> Self {
        use crm_domain::consent::privacy::PrivacyError as P;
        match e {
            CommandError::Domain(P::UnknownPurpose(_)) => {
                Self::NotFound("no such purpose in this organisation's registry")
            }
            CommandError::Domain(d @ P::NoChannel) => {
                Self::Validation(vec![FieldError::new("channels", d.to_string())])
            }
            CommandError::Domain(d @ P::Retired(_)) => Self::Conflict(d.to_string()),
            CommandError::Domain(d @ P::BadRetention) => {
                Self::Validation(vec![FieldError::new("days", d.to_string())])
            }
            CommandError::Domain(P::BadBranding(field, why)) => {
                Self::Validation(vec![FieldError::new(field, why)])
            }
            other => command_conflict(other, "privacy settings"),
        }
    }
}

impl From<CommandError<crm_domain::message::MessageError>> for ApiError {
    fn from(e: CommandError<crm_domain::message::MessageError>) -> Self {
        use crm_domain::message::MessageError as M;
        match e {
            CommandError::Domain(M::NotFound) => Self::NotFound("message not found"),
            CommandError::Domain(d) => Self::Conflict(d.to_string()),
            other => command_conflict(other, "message"),
        }
    }
}

impl From<CommandError<crm_domain::ai::AiActionError>> for ApiError {
    fn from(e: CommandError<crm_domain::ai::AiActionError>) -> Self {
        use crm_domain::ai::AiActionError as E;
        match e {
            CommandError::Domain(E::NotFound) => Self::NotFound("AI action not found"),
            CommandError::Domain(d @ E::OwnAction) => forbidden("own_action", d),
            CommandError::Domain(d @ (E::ReasonRequired | E::ExpiryInPast)) => {
                Self::Validation(vec![FieldError::new("reason", d.to_string())])
            }
            CommandError::Domain(d) => Self::Conflict(d.to_string()),
            other => command_conflict(other, "AI action"),
        }
    }
}

impl From<CommandError<crm_domain::ai::AiSettingsError>> for ApiError {
    fn from(e: CommandError<crm_domain::ai::AiSettingsError>) -> Self {
        match e {
            CommandError::Domain(d @ crm_domain::ai::AiSettingsError::TtlOutOfRange) => {
                Self::Validation(vec![FieldError::new("approval_ttl_secs", d.to_string())])
            }
            CommandError::Domain(d) => {
                Self::Validation(vec![FieldError::new("reason", d.to_string())])
            }
            other => command_conflict(other, "AI settings"),
        }
    }
}

impl From<AccountError> for ApiError {
    fn from(e: AccountError) -> Self {
        match e {
            AccountError::NoSuchOrganization => Self::NotFound("organisation not found"),
            AccountError::Organization(e) => e.into(),
            AccountError::User(e) => e.into(),
            AccountError::Role(e) => e.into(),
            AccountError::ApiKey(e) => e.into(),
            AccountError::Store(e) => e.into(),
            AccountError::Db(e) => e.into(),
            AccountError::Pool(e) => e.into(),
        }
    }
}
