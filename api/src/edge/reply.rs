//! What handlers answer on success, each documented by its type: `Ok200<T>` (200),
//! `Created<T>` (201, with `Location`), `Accepted<T>` (202), `NoContent` (204), and
//! `Text` for the two non-JSON documents. `T` is a `Serialize + ToSchema` type, or
//! [`Shaped`]: a JSON value documented by a schema type, for bodies whose members
//! depend on the caller (a contact with the fields the caller's role hides removed).

use std::marker::PhantomData;

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Reply;

use super::route::{IntoReply, OpDoc};

/// A JSON value whose members depend on the caller, documented by `S` (whose members
/// are all optional where a role may hide them).
pub struct Shaped<S>(pub Value, PhantomData<fn() -> S>);

impl<S> Shaped<S> {
    pub fn new(value: Value) -> Self {
        Self(value, PhantomData)
    }
}

impl<S: ToSchema + 'static> Serialize for Shaped<S> {
    fn serialize<Ser: serde::Serializer>(&self, s: Ser) -> Result<Ser::Ok, Ser::Error> {
        self.0.serialize(s)
    }
}

impl<S: ToSchema + 'static> utoipa::PartialSchema for Shaped<S> {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::Schema> {
        S::schema()
    }
}

impl<S: ToSchema + 'static> ToSchema for Shaped<S> {
    fn name() -> std::borrow::Cow<'static, str> {
        S::name()
    }
    fn schemas(schemas: &mut Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::Schema>)>) {
        S::schemas(schemas)
    }
}

fn json(status: StatusCode, body: &impl Serialize) -> Response {
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}

/// 200 with `T`.
pub struct Ok200<T>(pub T);
/// 201 with `T` and the new record's address.
pub struct Created<T> {
    pub body: T,
    pub location: String,
}
/// 202 with `T`.
pub struct Accepted<T>(pub T);
/// 204.
pub struct NoContent;

impl<T: Serialize + ToSchema + Send + 'static> IntoReply for Ok200<T> {
    fn into_reply(self) -> Response {
        json(StatusCode::OK, &self.0)
    }
    fn document(doc: &mut OpDoc) {
        let s = doc.schema::<T>();
        doc.success(200, "OK", Some(("application/json", s)));
    }
}

impl<T: Serialize + ToSchema + Send + 'static> IntoReply for Created<T> {
    fn into_reply(self) -> Response {
        let mut r = json(StatusCode::CREATED, &self.body);
        if let Ok(v) = self.location.parse() {
            r.headers_mut().insert("location", v);
        }
        r
    }
    fn document(doc: &mut OpDoc) {
        let s = doc.schema::<T>();
        doc.success(
            201,
            "Created (Location names it)",
            Some(("application/json", s)),
        );
    }
}

impl<T: Serialize + ToSchema + Send + 'static> IntoReply for Accepted<T> {
    fn into_reply(self) -> Response {
        json(StatusCode::ACCEPTED, &self.0)
    }
    fn document(doc: &mut OpDoc) {
        let s = doc.schema::<T>();
        doc.success(
            202,
            "Accepted (the same answer for unknown addresses)",
            Some(("application/json", s)),
        );
    }
}

impl IntoReply for NoContent {
    fn into_reply(self) -> Response {
        warp::reply::with_status(warp::reply(), StatusCode::NO_CONTENT).into_response()
    }
    fn document(doc: &mut OpDoc) {
        doc.success(204, "No content", None);
    }
}

/// What a [`RawAs`] route answers (a response built by hand: probes, metrics, the
/// document itself), for the document: status, description, content type
/// and schema type.
pub trait RawDoc: Send + 'static {
    fn document(doc: &mut OpDoc);
}

/// A [`Raw`] answer documented by `D`.
pub struct RawAs<D>(pub Response, PhantomData<fn() -> D>);

impl<D> RawAs<D> {
    pub fn new(response: Response) -> Self {
        Self(response, PhantomData)
    }
}

impl<D: RawDoc> IntoReply for RawAs<D> {
    fn into_reply(self) -> Response {
        self.0
    }
    fn document(doc: &mut OpDoc) {
        D::document(doc);
    }
}
