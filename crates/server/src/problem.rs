//! Every error the HTTP API returns, as RFC 9457 problem details (`application/problem+json`)
//! with a stable `type` (`urn:pixflow:problem:<code>`) and the same `code` as a member, so
//! clients branch on either. The one exhaustive mapping from runtime and engine errors to
//! statuses lives here.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use pixflow_imageops::{Error as EngineError, LimitKind};
use pixflow_runtime::{InvokeError, Rejected};
use serde::Serialize;

/// A problem response.
#[derive(Debug, Clone)]
pub struct Problem {
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    pub code: &'static str,
    /// Per-field diagnostics (invalid manifests).
    pub errors: Vec<FieldError>,
    retry_after: Option<Duration>,
}

/// The problem as it goes on the wire.
#[derive(Serialize)]
struct Wire<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
    code: &'a str,
    #[serde(skip_serializing_if = "<[FieldError]>::is_empty")]
    errors: &'a [FieldError],
}

impl Serialize for Problem {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Wire {
            kind: format!("urn:pixflow:problem:{}", self.code),
            title: self.title,
            status: self.status,
            detail: &self.detail,
            code: self.code,
            errors: &self.errors,
        }
        .serialize(s)
    }
}

/// One problem with one field of a request document.
#[derive(Debug, Clone, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
}

impl Problem {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Problem {
        Problem {
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail: detail.into(),
            code,
            errors: Vec::new(),
            retry_after: None,
        }
    }

    pub fn retry_after(mut self, after: Duration) -> Problem {
        self.retry_after = Some(after);
        self
    }

    pub fn with_errors(mut self, errors: Vec<FieldError>) -> Problem {
        self.errors = errors;
        self
    }

    pub fn not_found(code: &'static str, detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::NOT_FOUND, code, detail)
    }

    pub fn bad_request(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, "bad_request", detail)
    }

    pub fn unauthorized() -> Problem {
        Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send `Authorization: Bearer <token>` with a valid API token",
        )
    }

    pub fn forbidden(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }

    pub fn internal(detail: impl std::fmt::Display) -> Problem {
        tracing::error!(%detail, "internal error");
        Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; the server log has the details")
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after = self.retry_after;
        let unauthorized = status == StatusCode::UNAUTHORIZED;
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(after) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(after.as_secs().max(1)));
        }
        if unauthorized {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<pixflow_backends::StateError> for Problem {
    fn from(e: pixflow_backends::StateError) -> Problem {
        match e {
            // Out of reach for now (the node reconnects by itself): retry, here or elsewhere.
            pixflow_backends::StateError::Unavailable(_) => {
                tracing::warn!(error = %e, "state store");
                crate::health::suspect();
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "state_unavailable",
                    "the state store is unavailable; retry later",
                )
                .retry_after(Duration::from_secs(5))
            }
            _ => Problem::internal(e),
        }
    }
}

impl From<pixflow_backends::ObjectError> for Problem {
    /// The status of each object store error; its code is the error's own.
    fn from(e: pixflow_backends::ObjectError) -> Problem {
        use pixflow_backends::ObjectError as E;
        let (code, detail) = (e.code(), e.to_string());
        let status = match e {
            E::InvalidBucket { .. }
            | E::InvalidKey(_)
            | E::InvalidMetadata(_)
            | E::InvalidPart(_)
            | E::InvalidPartOrder
            | E::EntityTooSmall { .. }
            | E::InvalidCursor => StatusCode::BAD_REQUEST,
            E::NoSuchBucket(_) | E::NoSuchKey { .. } | E::NoSuchUpload(_) => StatusCode::NOT_FOUND,
            E::BucketNotEmpty(_) => StatusCode::CONFLICT,
            E::Reserved(_) => StatusCode::FORBIDDEN,
            E::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            E::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            E::TooManyUploads(_) => {
                metrics::counter!("pixflow_uploads_refused_total").increment(1);
                return Problem::new(StatusCode::SERVICE_UNAVAILABLE, code, detail).retry_after(Duration::from_secs(1));
            }
            E::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
            E::NotInService(_) => StatusCode::UNPROCESSABLE_ENTITY,
            E::Service(_) => {
                // The service's own words name hosts and bodies; they stay in the log.
                tracing::warn!(error = %detail, "object service");
                crate::health::suspect();
                return Problem::new(
                    StatusCode::BAD_GATEWAY,
                    code,
                    "the object storage service failed or did not answer; the server log has the details",
                );
            }
            E::Io(_) | E::Catalogue(_) => return Problem::internal(detail),
        };
        Problem::new(status, code, detail)
    }
}

impl From<pixflow_backends::QueueError> for Problem {
    fn from(e: pixflow_backends::QueueError) -> Problem {
        tracing::error!(error = %e, "queue");
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, "queue_unavailable", "the queue is unavailable; retry later")
            .retry_after(Duration::from_secs(5))
    }
}

impl From<crate::fetch::FetchError> for Problem {
    fn from(e: crate::fetch::FetchError) -> Problem {
        use crate::fetch::FetchError as E;
        let status = match e {
            E::Node(inner) => return inner.into(),
            E::Refused(_) => StatusCode::FORBIDDEN,
            E::Origin(_) => StatusCode::BAD_GATEWAY,
            E::Timeout => StatusCode::GATEWAY_TIMEOUT,
            E::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        };
        Problem::new(status, e.code(), e.to_string())
    }
}

/// A dispatch error as the API tells it: its code, and the status that fits it.
impl From<crate::dispatch::Error> for Problem {
    fn from(e: crate::dispatch::Error) -> Problem {
        use crate::dispatch::Error as E;
        let code = e.code();
        match e {
            E::Invalid(detail) => Problem::bad_request(detail),
            E::NoFunction(name) => crate::functions::not_found(&name),
            E::Changed { .. } => Problem::new(StatusCode::PRECONDITION_FAILED, code, e.to_string()),
            E::Answered { .. } => Problem::new(StatusCode::BAD_GATEWAY, code, e.to_string()),
            E::Lost => Problem::new(StatusCode::INTERNAL_SERVER_ERROR, code, e.to_string()),
            E::QueueFull { .. } => {
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, code, e.to_string()).retry_after(Duration::from_secs(5))
            }
            E::Invoke(e) => e.into(),
            E::Object(e) => e.into(),
            E::Fetch(e) => e.into(),
            E::State(e) => e.into(),
            E::Queue(e) => e.into(),
            E::Internal(detail) => Problem::internal(detail),
        }
    }
}

/// The status of each engine error (decision 002's table).
pub fn engine(e: &EngineError) -> Problem {
    let status = match e {
        EngineError::Unsupported { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        EngineError::Truncated { .. } | EngineError::Corrupt { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        EngineError::LimitExceeded { limit: LimitKind::InputBytes, .. } => StatusCode::PAYLOAD_TOO_LARGE,
        EngineError::LimitExceeded { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        EngineError::BadParameter { .. } | EngineError::UnknownOperation(_) => StatusCode::BAD_REQUEST,
        EngineError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        EngineError::Encode { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    Problem::new(status, e.code(), e.to_string())
}

impl From<InvokeError> for Problem {
    fn from(e: InvokeError) -> Problem {
        let code = e.code();
        let detail = e.to_string();
        match &e {
            InvokeError::Engine(inner) => engine(inner),
            InvokeError::Rejected(Rejected::QueueFull { .. }) => {
                Problem::new(StatusCode::TOO_MANY_REQUESTS, code, detail).retry_after(Duration::from_secs(1))
            }
            InvokeError::Rejected(Rejected::WaitTimeout(_)) | InvokeError::Overloaded(_) => {
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, code, detail).retry_after(Duration::from_secs(1))
            }
            InvokeError::Rejected(Rejected::Closed) => {
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, code, detail).retry_after(Duration::from_secs(5))
            }
            InvokeError::Parameter { .. } => Problem::new(StatusCode::BAD_REQUEST, code, detail),
            InvokeError::Timeout(_) => Problem::new(StatusCode::GATEWAY_TIMEOUT, code, detail),
            InvokeError::RequestTooLarge { .. } => Problem::new(StatusCode::PAYLOAD_TOO_LARGE, code, detail),
            InvokeError::ResponseTooLarge { .. } => Problem::new(StatusCode::BAD_GATEWAY, code, detail),
            InvokeError::Unavailable(_) => {
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, code, detail).retry_after(Duration::from_secs(1))
            }
            InvokeError::FunctionFailed(_) => Problem::new(StatusCode::BAD_GATEWAY, code, detail),
            InvokeError::StartFailed(_) | InvokeError::Rejected(Rejected::NoInstance) => {
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, code, detail).retry_after(Duration::from_secs(5))
            }
            InvokeError::Internal(_) => Problem::internal(detail),
        }
    }
}
