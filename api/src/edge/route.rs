//! One declaration per operation. A [`Route`] names its method, path, tag, summary,
//! who may call it and its handler; the handler's argument types (the extractors of
//! [`super::extract`]) and its reply type ([`super::reply`]) say what it reads and
//! answers. The dispatcher serves the table ([`super::dispatch`]) and the OpenAPI
//! document is generated from the same table ([`crate::openapi`]): a route cannot be
//! served without its description, nor described without being served.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crm_domain::access::Permission;
use utoipa::openapi::path::Parameter;
use utoipa::openapi::{RefOr, Schema};
use utoipa::ToSchema;
use warp::http::Method;
use warp::reply::Response;

use super::context::RequestContext;
use crate::error::ApiError;
use crate::routes::portal::PortalAuthed;
use crate::routes::Authed;
use crate::state::AppState;

/// Who may call an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    /// No credentials (login, links, probes).
    Public,
    /// A staff JWT or API key of an active user; acts on the caller's own account.
    SignedIn,
    /// A staff JWT or API key holding this permission, its module active.
    Staff(Permission),
    /// A portal JWT of a contact whose access is live.
    Portal,
}

/// Who the dispatcher authenticated, as the route's [`Auth`] asked.
pub enum Caller {
    Nobody,
    Staff(Authed),
    Portal(PortalAuthed),
}

/// What the dispatcher hands to a handler's extractors.
pub struct Call {
    pub ctx: RequestContext,
    pub caller: Caller,
    /// The path's `{…}` segments, parsed as UUIDs, in order.
    pub ids: Vec<uuid::Uuid>,
    pub query: String,
    pub content_type: Option<String>,
    pub body: bytes::Bytes,
    /// The `Authorization` header as presented, for a handler that checks it again
    /// later ([`super::extract::Credential`]); `None` for a call made inside the service.
    pub credential: Option<String>,
}

/// How large a body an operation takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyLimit {
    /// 16 KiB: credentials, roles, settings.
    Small,
    /// `CRM_MAX_BODY_BYTES`: records with free text (contacts).
    Large,
    /// [`BULK_BODY_BYTES`] (or `CRM_MAX_BODY_BYTES` if larger): bulk operations (the
    /// consent check of up to 10,000 contacts, consent imports).
    Bulk,
}

pub const SMALL_BODY_BYTES: u64 = 16 * 1024;
pub const BULK_BODY_BYTES: u64 = 4 * 1024 * 1024;

/// One response of an operation in the document.
#[derive(Clone)]
pub struct ResponseDoc {
    pub description: String,
    /// Content type and schema; `None` for an empty body.
    pub content: Option<(&'static str, RefOr<Schema>)>,
}

/// The request body of an operation in the document.
#[derive(Clone)]
pub struct BodyDoc {
    pub schema: RefOr<Schema>,
    pub required: bool,
    /// `application/json`, or `application/x-www-form-urlencoded` for an HTML form.
    pub content_type: &'static str,
}

/// What an operation's extractors and reply contribute to its description.
#[derive(Default, Clone)]
pub struct OpDoc {
    pub parameters: Vec<Parameter>,
    pub body: Option<BodyDoc>,
    pub responses: BTreeMap<u16, ResponseDoc>,
    /// Named schemas the operation refers to (collected into `components`).
    pub schemas: Vec<(String, RefOr<Schema>)>,
    /// The caller the handler takes, if any (checked against the route's [`Auth`]).
    pub takes: Option<Taken>,
}

/// The kind of caller a handler's arguments need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    Staff,
    Portal,
}

impl OpDoc {
    /// Registers `T` (and the schemas it refers to) and answers a reference to it.
    pub fn schema<T: ToSchema>(&mut self) -> RefOr<Schema> {
        let name = T::name().into_owned();
        self.schemas.push((name.clone(), T::schema()));
        T::schemas(&mut self.schemas);
        RefOr::Ref(utoipa::openapi::Ref::from_schema_name(name))
    }

    /// Declares that the operation can answer `status` with the error shape.
    pub fn error(&mut self, status: u16) {
        self.responses.entry(status).or_insert_with(|| ResponseDoc {
            description: error_description(status).to_owned(),
            content: Some((
                "application/json",
                RefOr::Ref(utoipa::openapi::Ref::from_schema_name("Error")),
            )),
        });
    }

    /// Declares the success response.
    pub fn success(
        &mut self,
        status: u16,
        description: &str,
        content: Option<(&'static str, RefOr<Schema>)>,
    ) {
        self.responses.insert(
            status,
            ResponseDoc {
                description: description.to_owned(),
                content,
            },
        );
    }
}

/// What each error status means, in the document.
pub fn error_description(status: u16) -> &'static str {
    match status {
        400 => "Bad request: malformed JSON, a body or query parameter of the wrong type, an unknown or NUL-containing parameter, or an id that is not a UUID (each named in `fields`)",
        401 => "Missing, invalid, expired or revoked credentials",
        403 => "permission_denied, module_inactive, field_forbidden, grant_exceeds_own, owner_required, user_exceeds_own or two_factor_setup_required",
        404 => "No such record in the caller's organisation (another organisation's id answers the same)",
        405 => "The path exists, the method does not (see Allow)",
        409 => "Version conflict or a rule of the record (last Owner, retired role, archived contact…)",
        408 => "The body did not arrive in time (the connection is closed after the answer)",
        413 => "Body too large (the connection is closed after the answer)",
        415 => "The body is not application/json",
        422 => "Invalid values, each named in `fields`",
        429 => "Rate limited: see Retry-After",
        503 => "A dependency is unavailable or a projection is behind; retry after Retry-After",
        _ => "Error",
    }
}

pub type BoxFuture = Pin<Box<dyn Future<Output = Result<Response, ApiError>> + Send>>;

/// A value a handler takes, taken from the call (see [`super::extract`]).
pub trait FromCall: Sized + Send + 'static {
    fn from_call(call: &mut Call) -> Result<Self, ApiError>;
    /// What this argument adds to the operation's description.
    fn document(_doc: &mut OpDoc) {}
}

/// What a handler answers on success (see [`super::reply`]).
pub trait IntoReply: Send + 'static {
    fn into_reply(self) -> Response;
    fn document(doc: &mut OpDoc);
}

/// An async function `(AppState, A, B, …) -> Result<R, ApiError>` whose arguments are
/// [`FromCall`] and whose `R` is [`IntoReply`].
pub trait Handler<Args>: Send + Sync + 'static {
    fn call(&self, state: AppState, call: Call) -> BoxFuture;
    fn document(doc: &mut OpDoc);
}

macro_rules! handler {
    ($($arg:ident),*) => {
        impl<F, Fut, R, $($arg,)*> Handler<($($arg,)*)> for F
        where
            F: Fn(AppState, $($arg,)*) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = Result<R, ApiError>> + Send + 'static,
            R: IntoReply,
            $($arg: FromCall,)*
        {
            #[allow(non_snake_case, unused_mut, unused_variables)]
            fn call(&self, state: AppState, mut call: Call) -> BoxFuture {
                let f = self.clone();
                $(let $arg = $arg::from_call(&mut call);)*
                Box::pin(async move {
                    $(let $arg = $arg?;)*
                    f(state, $($arg,)*).await.map(IntoReply::into_reply)
                })
            }

            fn document(doc: &mut OpDoc) {
                $($arg::document(doc);)*
                R::document(doc);
            }
        }
    };
}

handler!();
handler!(A1);
handler!(A1, A2);
handler!(A1, A2, A3);
handler!(A1, A2, A3, A4);

type Erased = Arc<dyn Fn(AppState, Call) -> BoxFuture + Send + Sync>;

/// One path segment of a route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    Literal(&'static str),
    /// `{name}`: a UUID.
    Id(&'static str),
}

/// One operation: declared once, served and described from the same value.
#[derive(Clone)]
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub tag: &'static str,
    pub summary: &'static str,
    pub description: Option<&'static str>,
    pub auth: Auth,
    pub body_limit: BodyLimit,
    pub doc: OpDoc,
    pub segments: Vec<Segment>,
    /// Whether the handler reads a body (the dispatcher reads it only then).
    pub reads_body: bool,
    /// Whether the handler takes query parameters (else any is refused).
    pub takes_query: bool,
    pub(crate) handler: Erased,
}

/// The start of a route's declaration: [`RouteBuilder::to`] finishes it.
pub struct RouteBuilder {
    method: Method,
    path: &'static str,
    tag: &'static str,
    summary: &'static str,
    description: Option<&'static str>,
    auth: Auth,
    body_limit: BodyLimit,
    errors: Vec<u16>,
}

pub fn route(method: Method, path: &'static str, tag: &'static str) -> RouteBuilder {
    RouteBuilder {
        method,
        path,
        tag,
        summary: "",
        description: None,
        auth: Auth::Public,
        body_limit: BodyLimit::Small,
        errors: Vec::new(),
    }
}

impl RouteBuilder {
    pub fn summary(mut self, summary: &'static str) -> Self {
        self.summary = summary;
        self
    }
    pub fn describe(mut self, description: &'static str) -> Self {
        self.description = Some(description);
        self
    }
    pub fn auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }
    pub fn staff(self, permission: Permission) -> Self {
        self.auth(Auth::Staff(permission))
    }
    pub fn large_body(mut self) -> Self {
        self.body_limit = BodyLimit::Large;
        self
    }
    pub fn bulk_body(mut self) -> Self {
        self.body_limit = BodyLimit::Bulk;
        self
    }
    /// Error statuses of the operation's own rules (409, 422, 401 for credentials…);
    /// those of authentication, bodies, queries, ids and dependencies are added from
    /// the declaration.
    pub fn errors(mut self, statuses: &[u16]) -> Self {
        self.errors.extend_from_slice(statuses);
        self
    }

    /// Finishes the declaration with its handler.
    ///
    /// # Panics
    /// When the handler takes a caller the route does not authenticate (a programming
    /// error, found by any test that builds the table).
    pub fn to<H: Handler<Args>, Args>(self, handler: H) -> Route {
        let mut doc = OpDoc::default();
        H::document(&mut doc);
        let segments: Vec<Segment> = self
            .path
            .trim_start_matches('/')
            .split('/')
            .map(
                |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Some(name) => Segment::Id(name),
                    None => Segment::Literal(s),
                },
            )
            .collect();
        match (doc.takes, self.auth) {
            (None, _)
            | (Some(Taken::Staff), Auth::Staff(_) | Auth::SignedIn)
            | (Some(Taken::Portal), Auth::Portal) => {}
            (Some(t), a) => panic!(
                "{} {}: the handler takes a {t:?} caller but the route is {a:?}",
                self.method, self.path
            ),
        }
        let reads_body = doc.body.is_some();
        if reads_body {
            for s in [400, 408, 413, 415, 422] {
                doc.error(s);
            }
        }
        let takes_query = doc
            .parameters
            .iter()
            .any(|p| matches!(p.parameter_in, utoipa::openapi::path::ParameterIn::Query));
        // Every operation can refuse its query (an operation without parameters refuses
        // any: 400 `invalid_query` naming it).
        doc.error(400);
        if segments.iter().any(|s| matches!(s, Segment::Id(_))) {
            doc.error(400);
            doc.error(404);
        }
        match self.auth {
            Auth::Public => {}
            Auth::SignedIn => doc.error(401),
            Auth::Staff(_) | Auth::Portal => {
                doc.error(401);
                doc.error(403);
            }
        }
        if self.path.starts_with("/v1/") || self.path.starts_with("/portal/") {
            doc.error(429);
        }
        for s in self.errors {
            doc.error(s);
        }
        // Probes answer without the database (readyz declares its own 503).
        if self.tag != "operations" {
            doc.error(503);
        }
        let handler: Erased = Arc::new(move |state, call| handler.call(state, call));
        Route {
            method: self.method,
            path: self.path,
            tag: self.tag,
            summary: self.summary,
            description: self.description,
            auth: self.auth,
            body_limit: self.body_limit,
            doc,
            segments,
            reads_body,
            takes_query,
            handler,
        }
    }
}

impl Route {
    /// The ids of `path` if it is this route's path (whatever the method).
    pub fn matches<'p>(&self, path: &[&'p str]) -> Option<Vec<(&'static str, &'p str)>> {
        if path.len() != self.segments.len() {
            return None;
        }
        let mut ids = Vec::new();
        for (seg, part) in self.segments.iter().zip(path) {
            match seg {
                Segment::Literal(l) if l == part => {}
                Segment::Literal(_) => return None,
                Segment::Id(name) => ids.push((*name, *part)),
            }
        }
        Some(ids)
    }

    pub fn call(&self, state: AppState, call: Call) -> BoxFuture {
        (self.handler)(state, call)
    }
}
