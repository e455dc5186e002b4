//! The OpenAPI 3.1 document served at `/openapi.json`, generated from the route table
//! (`routes::table`): each operation's parameters, body and responses come from its
//! handler's argument and reply types (utoipa schemas of the very types the handler
//! parses and answers), its security and error responses from its declaration. A
//! route cannot be served without being described, nor described without being served.

use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, InfoBuilder, OpenApi, OpenApiBuilder, Paths, Required,
};
use utoipa::{PartialSchema, ToSchema};
use warp::http::Method;

use crate::edge::route::{Auth, Route, Segment};
use crate::error::ErrorBody;

fn method(m: &Method) -> HttpMethod {
    match *m {
        Method::GET => HttpMethod::Get,
        Method::POST => HttpMethod::Post,
        Method::PUT => HttpMethod::Put,
        Method::PATCH => HttpMethod::Patch,
        Method::DELETE => HttpMethod::Delete,
        Method::HEAD => HttpMethod::Head,
        _ => HttpMethod::Options,
    }
}

fn uuid_schema() -> utoipa::openapi::Schema {
    utoipa::openapi::Schema::Object(
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)))
            .build(),
    )
}

fn header(description: &str, ty: Type) -> utoipa::openapi::header::Header {
    utoipa::openapi::header::HeaderBuilder::new()
        .schema(utoipa::openapi::Schema::Object(
            ObjectBuilder::new().schema_type(ty).build(),
        ))
        .description(Some(description))
        .build()
}

fn operation(r: &Route) -> utoipa::openapi::path::Operation {
    let mut b = OperationBuilder::new()
        .tag(r.tag)
        .summary(Some(r.summary))
        .operation_id(Some(format!("{} {}", r.method, r.path)));
    let mut description = r.description.map(str::to_owned);
    for seg in &r.segments {
        if let Segment::Id(name) = seg {
            b = b.parameter(
                ParameterBuilder::new()
                    .name(*name)
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .schema(Some(uuid_schema())),
            );
        }
    }
    for p in &r.doc.parameters {
        b = b.parameter(p.clone());
    }
    if let Some(body) = &r.doc.body {
        b = b.request_body(Some(
            RequestBodyBuilder::new()
                .content(
                    body.content_type,
                    ContentBuilder::new()
                        .schema(Some(body.schema.clone()))
                        .build(),
                )
                .required(Some(if body.required {
                    Required::True
                } else {
                    Required::False
                }))
                .build(),
        ));
    }
    for (status, resp) in &r.doc.responses {
        let mut rb = ResponseBuilder::new()
            .description(&resp.description)
            .header(
                "X-Request-Id",
                header("The request's id: the client's own when it sent a plain one (at most 128 of A-Z a-z 0-9 - _ . :), else a new UUID v7", Type::String),
            );
        match status {
            201 => rb = rb.header("Location", header("The new record's path", Type::String)),
            429 | 503 => {
                rb = rb.header(
                    "Retry-After",
                    header("Seconds to wait before retrying", Type::Integer),
                )
            }
            _ => {}
        }
        if let Some((ct, schema)) = &resp.content {
            rb = rb.content(
                *ct,
                ContentBuilder::new().schema(Some(schema.clone())).build(),
            );
        }
        b = b.response(status.to_string(), rb.build());
    }
    let none = Vec::<String>::new;
    match r.auth {
        Auth::Public => {}
        Auth::Staff(permission) => {
            let needs = format!(
                "Needs the `{}` permission (docs/permissions.md) and its module active.",
                permission.name()
            );
            description = Some(match description {
                Some(d) => format!("{d}\n\n{needs}"),
                None => needs,
            });
            b = b
                .security(SecurityRequirement::new("staff_jwt", none()))
                .security(SecurityRequirement::new("api_key", none()));
        }
        Auth::SignedIn => {
            b = b
                .security(SecurityRequirement::new("staff_jwt", none()))
                .security(SecurityRequirement::new("api_key", none()));
        }
        Auth::Portal => {
            b = b.security(SecurityRequirement::new("portal_jwt", none()));
        }
    }
    b.description(description).build()
}

pub fn document() -> serde_json::Value {
    document_of(&crate::routes::table::table())
}

/// Replaces every `"pattern": "@name"` with the pattern it names.
fn expand_patterns(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, item) in m.iter_mut() {
                if k == "pattern" {
                    if let Some(p) = item
                        .as_str()
                        .and_then(crate::routes::schemas::pattern::expand)
                    {
                        *item = p.into();
                        continue;
                    }
                }
                expand_patterns(item);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(expand_patterns),
        _ => {}
    }
}

/// What the schema derive cannot say (utoipa 5.5 writes `min_properties` as
/// `maxProperties`): bodies that must name at least one member.
const AT_LEAST_ONE_MEMBER: [&str; 3] = ["Address", "NewContactInput", "ContactInput"];

/// The document of `table`.
pub fn document_of(table: &[Route]) -> serde_json::Value {
    let mut doc = serde_json::to_value(openapi_of(table)).unwrap_or_default();
    expand_patterns(&mut doc);
    for name in AT_LEAST_ONE_MEMBER {
        if let Some(schema) = doc
            .pointer_mut(&format!("/components/schemas/{name}"))
            .and_then(serde_json::Value::as_object_mut)
        {
            schema.insert("minProperties".into(), 1.into());
        }
    }
    doc
}

fn openapi_of(table: &[Route]) -> OpenApi {
    let mut paths = Paths::new();
    let mut components = ComponentsBuilder::new();
    let mut schemas = vec![(ErrorBody::name().into_owned(), ErrorBody::schema())];
    ErrorBody::schemas(&mut schemas);
    for r in table {
        paths.add_path_operation(r.path, vec![method(&r.method)], operation(r));
        schemas.extend(r.doc.schemas.iter().cloned());
    }
    for (name, schema) in schemas {
        components = components.schema(name, schema);
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
    let components = components
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
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("CRM compliance core")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "Commands become immutable events; reads come from projections. \
                     Every error has one shape (Error); every response carries X-Request-Id.",
                ))
                .build(),
        )
        .paths(paths)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The document and the served table are the same list, operation for operation.
    #[test]
    fn every_served_route_is_described_and_nothing_else() {
        let table = crate::routes::table::table();
        let doc = document_of(&table);
        let mut described = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                described.push(format!("{} {path}", method.to_uppercase()));
            }
        }
        let mut served: Vec<String> = table
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect();
        described.sort();
        served.sort();
        assert_eq!(described, served);
        let mut unique = served.clone();
        unique.dedup();
        assert_eq!(unique, served, "a route is declared twice");
    }

    /// The body of `POST /v1/ai/actions` is one shape per type: every kind of action is
    /// in exactly one shape, which requires its one target and its arguments and allows
    /// nothing else; a change of contacts takes `PATCH`'s body without its version.
    #[test]
    fn an_ai_proposal_is_one_shape_per_type() {
        let v: serde_json::Value = serde_json::from_str(json()).unwrap();
        let schemas = &v["components"]["schemas"];
        let shapes = schemas["AiProposeInput"]["oneOf"].as_array().unwrap();
        let kinds = schemas["AiActionKind"]["enum"].as_array().unwrap();
        assert_eq!(kinds.len(), 9);
        for kind in kinds {
            let kind = kind.as_str().unwrap();
            let of_kind: Vec<&serde_json::Value> = shapes
                .iter()
                .filter(|s| {
                    s["properties"]["type"]["enum"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|k| k == kind)
                })
                .collect();
            assert_eq!(of_kind.len(), 1, "{kind}: one shape");
            let shape = of_kind[0];
            let target = match kind {
                "bulk_update" => "contact_ids",
                "change_permissions" => "user_id",
                _ => "contact_id",
            };
            assert_eq!(
                shape["required"],
                serde_json::json!(["type", target, "arguments"]),
                "{kind}"
            );
            for other in ["contact_id", "contact_ids", "user_id"] {
                assert_eq!(
                    shape["properties"][other].is_null(),
                    other != target,
                    "{kind}: {other}"
                );
            }
            assert_eq!(shape["additionalProperties"], false, "{kind}");
        }
        let update = shapes
            .iter()
            .find(|s| s["properties"]["type"]["enum"][0] == "update_contact")
            .unwrap();
        let arguments = &update["properties"]["arguments"]["properties"];
        assert!(arguments["company"].is_object());
        assert!(arguments["expected_version"].is_null());
    }

    #[test]
    fn every_reference_resolves() {
        let doc = json();
        let v: serde_json::Value = serde_json::from_str(doc).unwrap();
        let schemas = v["components"]["schemas"].as_object().unwrap();
        let mut rest = doc;
        while let Some(i) = rest.find("#/components/schemas/") {
            rest = &rest[i + "#/components/schemas/".len()..];
            let name: String = rest.chars().take_while(|c| *c != '"').collect();
            assert!(
                schemas.contains_key(&name),
                "{name} is referred to, not defined"
            );
        }
    }
}
