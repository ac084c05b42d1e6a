//! What dispatch tells its callers when it cannot do what they asked: a stable `code`, whether
//! running the same call again could succeed, and a detail for people. Callers branch on the
//! first two (the asynchronous workers retry or dead-letter, triggers and workflows will too);
//! the HTTP edge alone turns an error into problem JSON with a status (`crate::problem`).

use pixflow_backends::{ObjectError, QueueError, StateError};
use pixflow_runtime::InvokeError;

use crate::fetch::FetchError;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The call itself is wrong (a parameter, an output template, an input): no retry fixes it.
    #[error("{0}")]
    Invalid(String),
    /// The function is not deployed (any more).
    #[error("no function named `{0}` is deployed")]
    NoFunction(String),
    /// A stored input named with its ETag holds other content now.
    #[error("`{key}` in `{bucket}` no longer has ETag {etag}")]
    Changed { bucket: String, key: String, etag: String },
    /// A process function answered with an error status (its own 5xx may pass on a retry).
    #[error("the function answered {status}: {text}")]
    Answered { status: u16, text: String },
    /// The node stopped while running the call's last attempt (maybe because of it): it is
    /// not run again.
    #[error("the node stopped while running the last attempt")]
    Lost,
    /// Too many asynchronous calls are waiting.
    #[error("{depth} asynchronous invocations are waiting (the node holds {max}); retry later")]
    QueueFull { depth: u64, max: u64 },
    #[error(transparent)]
    Invoke(#[from] InvokeError),
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// A fault of the node itself (the detail goes to the log, not to callers).
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// The stable code, as problem JSON's `code` and `type` carry it.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            Error::Invalid(_) => "bad_request",
            Error::NoFunction(_) => "function_not_found",
            Error::Changed { .. } => "precondition_failed",
            Error::Answered { .. } => "function_error",
            Error::QueueFull { .. } => "async_queue_full",
            Error::Lost => "attempt_lost",
            Error::Invoke(e) => e.code(),
            Error::Object(e) => e.code(),
            Error::Fetch(e) => e.code(),
            Error::State(e) => e.code(),
            Error::Queue(e) => e.code(),
            Error::Internal(_) => "internal",
        }
    }

    /// Whether the same call could succeed later: the service or the node was unavailable,
    /// overloaded or too slow, or the function's program failed on its own. A wrong call, a
    /// missing function or input and content that changed are not retried.
    pub(crate) fn retryable(&self) -> bool {
        match self {
            Error::Invalid(_) | Error::NoFunction(_) | Error::Changed { .. } | Error::Lost | Error::Internal(_) => {
                false
            }
            Error::Answered { status, .. } => *status >= 500,
            Error::QueueFull { .. } | Error::Queue(_) => true,
            Error::State(e) => matches!(e, StateError::Unavailable(_) | StateError::Connect { .. }),
            Error::Invoke(e) => {
                e.retryable() || matches!(e, InvokeError::Engine(pixflow_imageops::Error::Timeout { .. }))
            }
            Error::Object(e) => matches!(
                e,
                ObjectError::TooManyUploads(_)
                    | ObjectError::Service(_)
                    | ObjectError::Io(_)
                    | ObjectError::Catalogue(_)
            ),
            Error::Fetch(e) => e.retryable(),
        }
    }
}

#[cfg(test)]
mod tests {
    use pixflow_runtime::Rejected;

    use super::*;
    use crate::problem::Problem;

    /// What the workers retry on, and the code and status each error reaches callers with.
    #[test]
    fn each_error_says_whether_a_retry_could_help() {
        let cases: Vec<(Error, bool, &str, u16)> = vec![
            (Error::Invalid("output: bad".into()), false, "bad_request", 400),
            (Error::NoFunction("gone".into()), false, "function_not_found", 404),
            (
                Error::Changed { bucket: "b".into(), key: "k".into(), etag: "e".into() },
                false,
                "precondition_failed",
                412,
            ),
            (Error::Answered { status: 503, text: "busy".into() }, true, "function_error", 502),
            (Error::Answered { status: 422, text: "no".into() }, false, "function_error", 502),
            (Error::Lost, false, "attempt_lost", 500),
            (Error::QueueFull { depth: 9, max: 9 }, true, "async_queue_full", 503),
            (InvokeError::Rejected(Rejected::Closed).into(), true, "shutting_down", 503),
            (
                InvokeError::Engine(pixflow_imageops::Error::Timeout { op: "resize".into(), limit_ms: 1 }).into(),
                true,
                "timeout",
                504,
            ),
            (ObjectError::NoSuchKey { bucket: "b".into(), key: "k".into() }.into(), false, "no_such_key", 404),
            (ObjectError::Service("down".into()).into(), true, "object_service_failed", 502),
            (ObjectError::Unsupported("listing").into(), false, "not_supported_by_backend", 501),
            (FetchError::Refused("private".into()).into(), false, "url_not_allowed", 403),
            (FetchError::Origin("reset".into()).into(), true, "origin_failed", 502),
            (FetchError::Timeout.into(), true, "origin_timeout", 504),
            (FetchError::TooLarge { size: "9".into(), limit: 1 }.into(), false, "origin_too_large", 413),
            (QueueError::Unavailable("gone".into()).into(), true, "queue_unavailable", 503),
            (StateError::Unavailable("reset".into()).into(), true, "state_unavailable", 503),
            (StateError::Failed("constraint".into()).into(), false, "internal", 500),
        ];
        for (error, retryable, code, status) in cases {
            let shown = format!("{error:?}");
            assert_eq!((error.retryable(), error.code()), (retryable, code), "{shown}");
            let problem = Problem::from(error);
            assert_eq!((problem.code, problem.status), (code, status), "{shown}");
        }
    }
}
