//! What handlers take from a request, each documented by its type: the caller, the
//! request context, a path id, a JSON body, query parameters.
//!
//! Every string that reaches a handler has passed here: PostgreSQL text cannot hold
//! NUL, so a NUL anywhere in a body or a query is refused at the edge by name (422 for
//! a body member, 400 for a query parameter), and a value of the wrong type is a 400
//! naming its member (`fields`), never a 500 further in.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use utoipa::openapi::path::ParameterIn;
use utoipa::{IntoParams, ToSchema};

use super::context::RequestContext;
use super::route::{BodyDoc, Call, Caller, FromCall, OpDoc, Taken};
use crate::error::{ApiError, FieldError};
use crate::routes::portal::PortalAuthed;
use crate::routes::Authed;

/// The check every text input passes: nothing PostgreSQL text could not store.
pub fn storable(s: &str) -> bool {
    !s.contains('\0')
}

const NUL_MESSAGE: &str = "must not contain a NUL character";

impl FromCall for Authed {
    fn from_call(call: &mut Call) -> Result<Self, ApiError> {
        match std::mem::replace(&mut call.caller, Caller::Nobody) {
            Caller::Staff(a) => Ok(a),
            _ => Err(ApiError::internal(
                "route takes a staff caller it did not authenticate",
            )),
        }
    }
    fn document(doc: &mut OpDoc) {
        doc.takes = Some(Taken::Staff);
    }
}

impl FromCall for PortalAuthed {
    fn from_call(call: &mut Call) -> Result<Self, ApiError> {
        match std::mem::replace(&mut call.caller, Caller::Nobody) {
            Caller::Portal(p) => Ok(p),
            _ => Err(ApiError::internal(
                "route takes a portal caller it did not authenticate",
            )),
        }
    }
    fn document(doc: &mut OpDoc) {
        doc.takes = Some(Taken::Portal);
    }
}

/// The credential the caller presented (its `Authorization` header), for a handler
/// whose work outlives the request and must check the caller's access again (a live
/// stream). A secret: no `Debug`, never logged.
pub(crate) struct Credential(String);

impl Credential {
    /// The header's value, as [`crate::routes::authenticate`] takes it.
    pub(crate) fn header(&self) -> &str {
        &self.0
    }
}

impl FromCall for Credential {
    fn from_call(call: &mut Call) -> Result<Self, ApiError> {
        call.credential
            .take()
            .map(Self)
            .ok_or_else(|| ApiError::internal("route takes a credential it was not given"))
    }
}

impl FromCall for RequestContext {
    fn from_call(call: &mut Call) -> Result<Self, ApiError> {
        Ok(call.ctx.clone())
    }
}

/// The path's id (`{id}`), already a UUID.
pub struct Id(pub uuid::Uuid);

impl FromCall for Id {
    fn from_call(call: &mut Call) -> Result<Self, ApiError> {
        call.ids
            .first()
            .copied()
            .map(Id)
            .ok_or_else(|| ApiError::internal("route takes an id its path does not have"))
    }
}

/// The path's second id (`/v1/webhooks/{id}/messages/{message_id}`), a UUID.
pub struct SecondId(pub uuid::Uuid);

impl FromCall for SecondId {
    fn from_call(call: &mut Call) -> Result<Self, ApiError> {
        call.ids
            .get(1)
            .copied()
            .map(SecondId)
            .ok_or_else(|| ApiError::internal("route takes a second id its path does not have"))
    }
}

/// A JSON object body of type `T` (required).
pub struct Json<T>(pub T);

/// A JSON object body of type `T`, or no body at all (`T::default()`).
pub struct OptionalJson<T>(pub T);

fn body_doc<T: ToSchema>(doc: &mut OpDoc, required: bool) {
    let schema = doc.schema::<T>();
    doc.body = Some(BodyDoc {
        schema,
        required,
        content_type: "application/json",
    });
}

/// An HTML form's body (`application/x-www-form-urlencoded`) of type `T`: for the
/// pages people fill in without JavaScript (the preference center).
pub struct Form<T>(pub T);

impl<T: DeserializeOwned + ToSchema + Send + 'static> FromCall for Form<T> {
    fn from_call(call: &mut Call) -> Result<Self, ApiError> {
        let form = call.content_type.as_deref().is_some_and(|ct| {
            ct.trim()
                .to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        });
        if !form {
            return Err(ApiError::UnsupportedMediaType);
        }
        serde_urlencoded::from_bytes(&call.body)
            .map(Form)
            .map_err(|e| ApiError::bad_request("invalid_form", format!("the form: {e}")))
    }
    fn document(doc: &mut OpDoc) {
        let schema = doc.schema::<T>();
        doc.body = Some(BodyDoc {
            schema,
            required: true,
            content_type: "application/x-www-form-urlencoded",
        });
    }
}

impl<T: DeserializeOwned + ToSchema + Send + 'static> FromCall for Json<T> {
    fn from_call(call: &mut Call) -> Result<Self, ApiError> {
        require_json(call.content_type.as_deref())?;
        parse_json(&call.body).map(Json)
    }
    fn document(doc: &mut OpDoc) {
        body_doc::<T>(doc, true);
    }
}

impl<T: DeserializeOwned + ToSchema + Default + Send + 'static> FromCall for OptionalJson<T> {
    fn from_call(call: &mut Call) -> Result<Self, ApiError> {
        // No body at all is the default; anything else (white space too) must be JSON.
        if call.body.is_empty() {
            return Ok(OptionalJson(T::default()));
        }
        require_json(call.content_type.as_deref())?;
        parse_json(&call.body).map(OptionalJson)
    }
    fn document(doc: &mut OpDoc) {
        body_doc::<T>(doc, false);
    }
}

/// Insists on a JSON content type.
pub fn require_json(content_type: Option<&str>) -> Result<(), ApiError> {
    match content_type {
        Some(ct)
            if ct
                .trim()
                .to_ascii_lowercase()
                .starts_with("application/json") =>
        {
            Ok(())
        }
        _ => Err(ApiError::UnsupportedMediaType),
    }
}

/// Where the first NUL is in a JSON value (a dotted path; keys count too).
fn find_nul(v: &Value, path: &mut Vec<String>) -> bool {
    match v {
        Value::String(s) => !storable(s),
        Value::Array(items) => items.iter().enumerate().any(|(i, item)| {
            path.push(i.to_string());
            let found = find_nul(item, path);
            if !found {
                path.pop();
            }
            found
        }),
        Value::Object(members) => members.iter().any(|(k, item)| {
            path.push(k.clone());
            let found = !storable(k) || find_nul(item, path);
            if !found {
                path.pop();
            }
            found
        }),
        _ => false,
    }
}

/// Parses a JSON object body: syntax errors are 400 `invalid_json`, a member of the
/// wrong type, unknown or missing is 400 `invalid_body` naming it in `fields`, a NUL
/// anywhere is 422 naming the member.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "invalid_json",
            "the request body is empty",
        ));
    }
    // A NUL can only arrive as the escape `\u0000` (raw control bytes are not JSON):
    // only a body that has one pays for a second look.
    if body.windows(6).any(|w| w == b"\\u0000") {
        if let Ok(v) = serde_json::from_slice::<Value>(body) {
            let mut path = Vec::new();
            if find_nul(&v, &mut path) {
                return Err(ApiError::Validation(vec![FieldError::new(
                    path.join("."),
                    NUL_MESSAGE,
                )]));
            }
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::bad_request("invalid_json", inner.to_string());
        }
        body_error(&path, inner.to_string())
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request("invalid_json", e.to_string()))?;
    // serde fills a struct from a JSON array by position; bodies are objects only.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::bad_request(
            "invalid_body",
            "the request body must be a JSON object",
        ));
    }
    Ok(value)
}

/// 400 `invalid_body` naming the member at `path` (`.` is the body itself).
fn body_error(path: &str, message: String) -> ApiError {
    // serde's messages end with " at line 1 column 17": the field names the place.
    let message = match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message,
    };
    // A missing member is reported at its parent (an unknown one at itself): name it.
    let field = match (path, named_member(&message)) {
        (".", Some(m)) => m,
        (p, Some(m)) if !p.ends_with(&m) => format!("{p}.{m}"),
        (".", None) => "body".to_owned(),
        (p, _) => p.to_owned(),
    };
    ApiError::bad_request("invalid_body", format!("`{field}`: {message}"))
        .with_fields(vec![FieldError::new(field, message)])
}

/// The member a serde message names first ("unknown field `x`…", "missing field `x`",
/// "duplicate field `x`").
fn named_member(message: &str) -> Option<String> {
    if !["unknown field", "missing field", "duplicate field"]
        .iter()
        .any(|p| message.starts_with(p))
    {
        return None;
    }
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_owned())
}

/// An optional integer that JSON may also write as a float with no fraction (`3.0`
/// is the integer 3 in JSON Schema).
pub fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let n = Option::<serde_json::Number>::deserialize(d)?;
    n.map(|n| {
        n.as_i64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                    .map(|f| f as i64)
            })
            .ok_or_else(|| {
                serde::de::Error::custom(format!("invalid type: `{n}`, expected an integer"))
            })
    })
    .transpose()
}

/// Query parameters of type `T` (`#[serde(deny_unknown_fields)]` structs): an unknown,
/// repeated, mistyped or NUL-containing parameter is a 400 naming it.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned + IntoParams + Send + 'static> FromCall for Query<T> {
    fn from_call(call: &mut Call) -> Result<Self, ApiError> {
        parse_query(&call.query).map(Query)
    }
    fn document(doc: &mut OpDoc) {
        doc.parameters
            .extend(T::into_params(|| Some(ParameterIn::Query)));
    }
}

/// The answer to a query string on an operation that takes no parameters: 400
/// `invalid_query` naming the first one.
pub fn no_query_expected(raw: &str) -> ApiError {
    let first = form_urlencoded_pairs(raw)
        .next()
        .map(|(k, _)| k.replace('\0', "\\u0000"))
        .unwrap_or_default();
    query_error(&first, "this operation takes no query parameters".into())
}

fn query_error(field: &str, message: String) -> ApiError {
    let text = if field.is_empty() {
        message.clone()
    } else {
        format!("query parameter `{field}`: {message}")
    };
    ApiError::bad_request("invalid_query", text).with_fields(if field.is_empty() {
        Vec::new()
    } else {
        vec![FieldError::new(field, message)]
    })
}

pub fn parse_query<T: DeserializeOwned>(raw: &str) -> Result<T, ApiError> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(raw).map_err(|e| query_error("", e.to_string()))?;
    if let Some((k, _)) = pairs.iter().find(|(k, v)| !storable(k) || !storable(v)) {
        return Err(query_error(&k.replace('\0', "\\u0000"), NUL_MESSAGE.into()));
    }
    let de = serde_urlencoded::Deserializer::new(form_urlencoded_pairs(raw));
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        let field = match (path.as_str(), named_member(&message)) {
            (_, Some(m)) => m,
            (".", None) => String::new(),
            (p, None) => p.to_owned(),
        };
        query_error(&field, message)
    })
}

fn form_urlencoded_pairs(raw: &str) -> form_urlencoded::Parse<'_> {
    form_urlencoded::parse(raw.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: Option<String>,
        inner: Option<Inner>,
        count: Option<i64>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        city: Option<String>,
    }

    fn fields(e: ApiError) -> (u16, Vec<String>) {
        let status = e.status().as_u16();
        let names = match e {
            ApiError::Validation(f) | ApiError::BadRequest { fields: f, .. } => {
                f.into_iter().map(|f| f.field).collect()
            }
            other => panic!("unexpected {other:?}"),
        };
        (status, names)
    }

    #[test]
    fn a_nul_anywhere_in_a_body_is_422_naming_the_member() {
        let e = parse_json::<Body>(br#"{"inner": {"city": "a\u0000b"}}"#).unwrap_err();
        assert_eq!(fields(e), (422, vec!["inner.city".to_owned()]));
        let e = parse_json::<Body>(br#"{"name": "\u0000"}"#).unwrap_err();
        assert_eq!(fields(e), (422, vec!["name".to_owned()]));
        // An escaped backslash before `u0000` is text, not a NUL.
        assert!(parse_json::<Body>(br#"{"name": "\\u0000"}"#).is_ok());
    }

    #[test]
    fn a_wrong_type_unknown_or_missing_member_is_400_naming_it() {
        let e = parse_json::<Body>(br#"{"name": 5}"#).unwrap_err();
        assert_eq!(fields(e), (400, vec!["name".to_owned()]));
        let e = parse_json::<Body>(br#"{"inner": {"city": 5}}"#).unwrap_err();
        assert_eq!(fields(e), (400, vec!["inner.city".to_owned()]));
        let e = parse_json::<Body>(br#"{"inner": {"town": "x"}}"#).unwrap_err();
        assert_eq!(fields(e), (400, vec!["inner.town".to_owned()]));
        let e = parse_json::<Body>(br#"{"nmae": "x"}"#).unwrap_err();
        assert_eq!(fields(e), (400, vec!["nmae".to_owned()]));
        assert!(matches!(
            parse_json::<Body>(b"not json"),
            Err(ApiError::BadRequest {
                code: "invalid_json",
                ..
            })
        ));
        assert!(matches!(
            parse_json::<Body>(b"[]"),
            Err(ApiError::BadRequest { .. })
        ));
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Params {
        q: Option<String>,
        limit: Option<i64>,
    }

    #[test]
    fn query_parameters_are_named_when_refused() {
        let e = parse_query::<Params>("q=a%00b").unwrap_err();
        assert_eq!(fields(e), (400, vec!["q".to_owned()]));
        let e = parse_query::<Params>("limit=ten").unwrap_err();
        assert_eq!(fields(e), (400, vec!["limit".to_owned()]));
        let e = parse_query::<Params>("colour=red").unwrap_err();
        assert_eq!(fields(e), (400, vec!["colour".to_owned()]));
        let e = parse_query::<Params>("q=a&q=b").unwrap_err();
        assert_eq!(fields(e), (400, vec!["q".to_owned()]));
        let p = parse_query::<Params>("q=caf%C3%A9&limit=5").unwrap();
        assert_eq!((p.q.as_deref(), p.limit), (Some("café"), Some(5)));
    }
}
