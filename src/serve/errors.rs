//! Errors as `troupe serve` answers them: OpenAI's error body with the status that
//! fits (400 for a bad request, schema or over-long prompt, 401 without the key, 404
//! for an unknown model or session, 422 for an output that broke its schema, 503 when
//! the server is full), never a dropped connection.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::api::{ErrorBody, ErrorDetail};
use crate::Error;

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The body's `error`.
    pub detail: ErrorDetail,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            detail: ErrorDetail {
                message: message.into(),
                kind,
                param: None,
                code: None,
            },
        }
    }

    /// 400: the request is malformed or asks for something that cannot be served.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 401: the API key is missing or wrong.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing or wrong API key: send `Authorization: Bearer KEY`",
        )
        .code("invalid_api_key")
    }

    /// 404: no such model, session or route.
    pub fn not_found(message: impl Into<String>, code: &'static str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message).code(code)
    }

    /// 503: too many requests in flight.
    pub fn busy(limit: usize) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            format!("the server is full ({limit} requests in flight): retry later"),
        )
        .code("server_busy")
    }

    /// With a machine-readable code.
    pub fn code(mut self, code: &'static str) -> Self {
        self.detail.code = Some(code);
        self
    }

    /// Naming the request field at fault.
    pub fn param(mut self, param: &'static str) -> Self {
        self.detail.param = Some(param);
        self
    }

    /// The body, as JSON.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": &self.detail })
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let message = error_chain(&e);
        match e {
            Error::RequestTooLong { .. }
            | Error::ContextOverflow { .. }
            | Error::KvBudgetExceeded { .. } => {
                Self::bad_request(message).code("context_length_exceeded")
            }
            Error::Grammar { .. } => Self::bad_request(message)
                .param("response_format")
                .code("invalid_schema"),
            Error::UnknownTool { .. } => Self::bad_request(message).param("tool_choice"),
            Error::BadRequest { .. }
            | Error::Sampling { .. }
            | Error::Config { .. }
            | Error::ChatTemplate(_)
            | Error::TemplateLimit { .. }
            | Error::TokenOutOfRange { .. }
            | Error::Tokenizer(_) => Self::bad_request(message),
            Error::SchemaViolation { .. } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_response_error",
                message,
            )
            .code("schema_violation"),
            Error::Preempted => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                format!("{message}: retry"),
            )
            .code("server_busy"),
            _ => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message),
        }
    }
}

/// An error and its sources, `: `-separated.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let more = c.to_string();
        if !s.contains(&more) {
            s.push_str(": ");
            s.push_str(&more);
        }
        cur = c.source();
    }
    s
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: self.detail };
        (self.status, axum::Json(body)).into_response()
    }
}
