//! Cross-origin requests: allowed only from the origins an operator configured
//! (`CRM_CORS_ORIGINS`); with none configured, browsers on other origins get no CORS
//! headers and so can read nothing.

use warp::http::{HeaderValue, Method, StatusCode};
use warp::reply::Response;

use crate::error::ApiError;

/// Methods a browser may use cross-origin.
const METHODS: &str = "GET, POST, PATCH, DELETE";
/// Request headers a browser may send cross-origin.
const HEADERS: &str = "authorization, content-type, x-request-id, x-correlation-id, x-causation-id";
/// Response headers a browser may read.
const EXPOSED: &str = "x-request-id, location, retry-after";
/// How long a browser may cache a preflight answer (seconds).
const MAX_AGE: &str = "600";

/// Checks an operator's origin list: each `scheme://host[:port]`, http or https, no
/// path, no wildcard. Returns them normalised (lower case, no trailing slash).
pub fn parse_origins(list: &[String]) -> Result<Vec<String>, String> {
    list.iter()
        .map(|o| o.trim())
        .filter(|o| !o.is_empty())
        .map(|o| {
            let lower = o.trim_end_matches('/').to_ascii_lowercase();
            let rest = lower
                .strip_prefix("https://")
                .or_else(|| lower.strip_prefix("http://"))
                .ok_or_else(|| format!("CORS origin {o:?} must start with https:// or http://"))?;
            let ok = !rest.is_empty()
                && rest
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
            if ok {
                Ok(lower)
            } else {
                Err(format!(
                    "CORS origin {o:?} must be scheme://host[:port] (no path, no wildcard)"
                ))
            }
        })
        .collect()
}

/// The staff API's origins and the client portal's, kept apart: an origin allowed for
/// one is not thereby allowed for the other.
#[derive(Debug, Clone, Default)]
pub struct CorsPolicy {
    pub api: Vec<String>,
    pub portal: Vec<String>,
}

impl CorsPolicy {
    pub fn for_path(&self, path: &str) -> &[String] {
        if path == "/portal" || path.starts_with("/portal/") {
            &self.portal
        } else {
            &self.api
        }
    }
}

fn allowed<'a>(origins: &[String], origin: Option<&'a str>) -> Option<&'a str> {
    origin.filter(|o| origins.iter().any(|a| a.eq_ignore_ascii_case(o)))
}

/// Adds the CORS headers to `response` when `origin` is an allowed one.
pub fn decorate(origins: &[String], origin: Option<&str>, mut response: Response) -> Response {
    let headers = response.headers_mut();
    // Caches must keep answers to different origins apart.
    headers.append("vary", HeaderValue::from_static("Origin"));
    if let Some(origin) = allowed(origins, origin).and_then(|o| HeaderValue::from_str(o).ok()) {
        headers.insert("access-control-allow-origin", origin);
        headers.insert(
            "access-control-expose-headers",
            HeaderValue::from_static(EXPOSED),
        );
    }
    response
}

/// Answers a preflight request (`OPTIONS` with `Origin` and
/// `Access-Control-Request-Method`): 204 with the policy for an allowed origin and
/// method, 403 for any other. `None` when the request is not a preflight (the routes
/// answer it: 405 for OPTIONS).
pub fn preflight(
    origins: &[String],
    method: &Method,
    origin: Option<&str>,
    requested: Option<&str>,
) -> Option<Result<Response, ApiError>> {
    if method != Method::OPTIONS {
        return None;
    }
    let requested = requested.and_then(|m| m.parse::<Method>().ok());
    let (Some(origin), Some(requested)) = (origin, requested) else {
        return None;
    };
    let permitted = allowed(origins, Some(origin)).is_some()
        && [Method::GET, Method::POST, Method::PATCH, Method::DELETE].contains(&requested);
    if !permitted {
        return Some(Err(ApiError::Forbidden {
            code: "cors_forbidden",
            message: "cross-origin requests from this origin are not allowed".into(),
        }));
    }
    let response = warp::http::Response::builder()
        .status(StatusCode::NO_CONTENT)
        .header("access-control-allow-methods", METHODS)
        .header("access-control-allow-headers", HEADERS)
        .header("access-control-max-age", MAX_AGE)
        .body(warp::hyper::body::Bytes::new().into())
        .expect("static headers are valid");
    Some(Ok(response))
}

#[cfg(test)]
mod tests {
    use super::parse_origins;

    #[test]
    fn origins_must_be_scheme_host_port() {
        let ok = parse_origins(&[
            "https://App.Example.com/".into(),
            " http://localhost:3000 ".into(),
            "".into(),
        ])
        .unwrap();
        assert_eq!(ok, ["https://app.example.com", "http://localhost:3000"]);
        for bad in [
            "*",
            "app.example.com",
            "https://*.example.com",
            "https://app.example.com/path",
            "ftp://app.example.com",
            "https://",
        ] {
            assert!(parse_origins(&[bad.into()]).is_err(), "{bad} accepted");
        }
    }
}
