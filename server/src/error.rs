//! OpenAI-style errors: an HTTP status and `{"error": {"message", "type", "param", "code"}}`.

use serde_json::{json, Value};

/// An error answered to the client: HTTP status and an OpenAI-style body
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// Human-readable message.
    pub message: String,
    /// OpenAI's error type (`invalid_request_error`, `authentication_error`, ...).
    pub kind: &'static str,
    /// The request field at fault, if any.
    pub param: Option<String>,
    /// A short machine-readable code.
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400: the request is malformed or out of range.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    /// Sets the machine-readable code.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// 400: the request asked for routing and no router sidecar is loaded.
    pub fn no_routers() -> Self {
        ApiError::invalid(
            "routing was requested but no router sidecar is loaded",
            Some("routing"),
        )
        .with_code("no_routers")
    }

    /// 401: missing or wrong bearer token.
    pub fn unauthorized() -> Self {
        ApiError {
            status: 401,
            message: "missing or invalid API key (send Authorization: Bearer <key>)".into(),
            kind: "authentication_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    /// 404: unknown route or model.
    pub fn not_found(message: impl Into<String>, code: &'static str) -> Self {
        ApiError {
            status: 404,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some(code),
        }
    }

    /// 405: the route exists with another method.
    pub fn method_not_allowed(allowed: &str) -> Self {
        ApiError {
            status: 405,
            message: format!("method not allowed (use {allowed})"),
            kind: "invalid_request_error",
            param: None,
            code: Some("method_not_allowed"),
        }
    }

    /// 413: the body is larger than the limit.
    pub fn too_large(limit: usize) -> Self {
        ApiError {
            status: 413,
            message: format!("request body larger than {limit} bytes"),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_too_large"),
        }
    }

    /// 408: the client did not send its body in time.
    pub fn timeout(limit: std::time::Duration) -> Self {
        ApiError {
            status: 408,
            message: format!(
                "the request body did not arrive within {} s",
                limit.as_secs()
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("body_timeout"),
        }
    }

    /// 503: the model is still loading, or the queue is full.
    pub fn unavailable(message: impl Into<String>, code: &'static str) -> Self {
        ApiError {
            status: 503,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some(code),
        }
    }

    /// 500: the engine failed.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: 500,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some("internal_error"),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.message)
    }
}

impl std::error::Error for ApiError {}
