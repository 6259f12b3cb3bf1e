//! Extractors that answer malformed input with problem+json instead of axum's plain text.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::problem::Problem;

/// JSON body: syntax errors → 400, wrong types or missing fields → 422, no JSON content
/// type → 415, over the body limit → 413.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Json(value)),
            Err(rejection) => Err(json_problem(rejection)),
        }
    }
}

fn json_problem(rejection: JsonRejection) -> Problem {
    match rejection {
        JsonRejection::JsonDataError(e) => Problem::invalid(serde_detail(&e.body_text())),
        JsonRejection::JsonSyntaxError(_) => {
            Problem::bad_request("the body is not well-formed JSON")
        }
        JsonRejection::MissingJsonContentType(_) => Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
        )
        .with_detail("send the body as JSON with `content-type: application/json`"),
        JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            too_large()
        }
        _ => Problem::bad_request("the body could not be read"),
    }
}

pub fn too_large() -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload-too-large",
        "Payload too large",
    )
    .with_detail("the request body exceeds the size limit")
}

/// serde's messages name the field and what was expected, which is what a client needs;
/// axum prefixes them with its own wording, dropped here.
fn serde_detail(text: &str) -> String {
    let msg = text.split_once(": ").map(|(_, rest)| rest).unwrap_or(text);
    msg.to_owned()
}

/// Path parameters: an unparsable id (not a UUID) → 400.
#[derive(Debug, Clone, Copy)]
pub struct Path<T>(pub T);

impl<S, T> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => {
                Err(Problem::bad_request(format!(
                    "invalid path parameter: {}",
                    e.body_text().rsplit(": ").next().unwrap_or("")
                )))
            }
            Err(_) => Err(Problem::bad_request("invalid path parameters")),
        }
    }
}

/// Query string: wrong types → 400.
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

impl<S, T> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Query(value)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => Err(Problem::bad_request(
                format!("invalid query string: {}", serde_detail(&e.body_text())),
            )),
            Err(_) => Err(Problem::bad_request("invalid query string")),
        }
    }
}

/// A JSON body that may be absent (an empty body gives `None`), with [`Json`]'s error answers.
#[derive(Debug, Clone, Default)]
pub struct OptionalJson<T>(pub Option<T>);

impl<S, T> FromRequest<S> for OptionalJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    too_large()
                } else {
                    Problem::bad_request("the body could not be read")
                }
            })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(None));
        }
        serde_json::from_slice(&bytes)
            .map(|v| OptionalJson(Some(v)))
            .map_err(|e| {
                if e.is_data() {
                    Problem::invalid(e.to_string())
                } else {
                    Problem::bad_request("the body is not well-formed JSON")
                }
            })
    }
}

/// The client's address: the `for=` of the `Forwarded` header Mercato's gateway sets (the
/// client it resolved, behind trusted proxies too), else the last `X-Forwarded-For` hop (the
/// one a proxy appended), else the TCP peer. Services sit behind the gateway, never on the
/// open internet, so what the gateway wrote is what they read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAddress(pub String);

/// The last `for=` node of a `Forwarded` header (RFC 7239), without quotes, brackets or port.
fn forwarded_for(headers: &http::HeaderMap) -> Option<String> {
    let value = headers
        .get_all(http::header::FORWARDED)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .flat_map(|element| element.split(';'))
        .filter_map(|pair| pair.split_once('='))
        .filter(|(key, _)| key.trim().eq_ignore_ascii_case("for"))
        .map(|(_, value)| value.trim().trim_matches('"'))
        .next_back()?;
    let node = match value.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => value.split(':').next().unwrap_or(value),
    };
    (!node.is_empty()).then(|| node.chars().take(64).collect())
}

impl<S: Send + Sync> FromRequestParts<S> for ClientAddress {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let forwarded = forwarded_for(&parts.headers).or_else(|| {
            parts
                .headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .rfind(|hop| !hop.is_empty())
                .map(|hop| hop.chars().take(64).collect::<String>())
        });
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|info| info.0.ip().to_string());
        Ok(ClientAddress(
            forwarded.or(peer).unwrap_or_else(|| "unknown".to_owned()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forwarded_client_is_the_last_for_node_without_port_or_brackets() {
        let cases = [
            ("for=203.0.113.7", Some("203.0.113.7")),
            (
                "for=192.0.2.1;proto=https, for=203.0.113.7:4711",
                Some("203.0.113.7"),
            ),
            ("for=\"[2001:db8::1]:4711\";proto=http", Some("2001:db8::1")),
            ("proto=https", None),
            ("for=", None),
        ];
        for (header, expected) in cases {
            let mut headers = http::HeaderMap::new();
            headers.insert(
                http::header::FORWARDED,
                http::HeaderValue::from_str(header).unwrap(),
            );
            assert_eq!(forwarded_for(&headers).as_deref(), expected, "{header}");
        }
    }
}
