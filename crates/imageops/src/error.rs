//! The engine's one error type. Every failure an untrusted input can cause maps to a variant
//! with a stable machine-readable `code()`; callers (the CLI, later the HTTP server) branch on
//! the variant and never parse messages.

use std::fmt;

/// Which limit a request ran into; the name is part of the stable error text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    InputBytes,
    SourcePixels,
    SourceDimension,
    OutputPixels,
    Frames,
    VideoSeconds,
    /// Work rendering one SVG document would take, in pixel passes (a multiple of
    /// `max_output_pixels`; see `ops::text::svg_cost`).
    SvgRenderWork,
    /// Pixels rendering one SVG document would hold at once in layers, masks and filter
    /// results (a multiple of `max_output_pixels`).
    SvgLayerPixels,
    /// Kernel taps a Gaussian blur (or a sharpen's blur) would take: pixels x kernel width x
    /// two passes (a multiple of `max_output_pixels`; see `ops::filter`).
    BlurWork,
}

impl LimitKind {
    /// Name of the limit as it appears in configuration (`Limits` field), or of a budget
    /// derived from one.
    pub fn name(self) -> &'static str {
        match self {
            LimitKind::InputBytes => "max_input_bytes",
            LimitKind::SourcePixels => "max_source_pixels",
            LimitKind::SourceDimension => "max_source_dimension",
            LimitKind::OutputPixels => "max_output_pixels",
            LimitKind::Frames => "max_frames",
            LimitKind::VideoSeconds => "max_video_seconds",
            LimitKind::SvgRenderWork => "svg_render_work",
            LimitKind::SvgLayerPixels => "svg_layer_pixels",
            LimitKind::BlurWork => "blur_work",
        }
    }
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything that can go wrong inside the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bytes are not a format the engine knows, or one it knows but cannot decode here.
    #[error("unsupported format: {format}{}", hint.as_deref().map(|h| format!(" ({h})")).unwrap_or_default())]
    Unsupported { format: String, hint: Option<String> },
    /// The input was empty or ended before the image data did.
    #[error("truncated {format} data: {detail}")]
    Truncated { format: &'static str, detail: String },
    /// The bytes claim a format but are not valid for it.
    #[error("corrupt {format} data: {detail}")]
    Corrupt { format: &'static str, detail: String },
    /// A configured limit would be exceeded; nothing was allocated for it.
    #[error("limit exceeded: {limit} is {max}, input needs {actual}")]
    LimitExceeded { limit: LimitKind, max: u64, actual: u64 },
    /// A parameter is missing, unknown, malformed or out of range.
    #[error("bad parameter `{param}` for `{op}`: {reason}")]
    BadParameter { op: String, param: String, reason: String },
    /// The request names an operation that does not exist.
    #[error("unknown operation `{0}`")]
    UnknownOperation(String),
    /// An operation ran past the per-operation time limit.
    #[error("operation `{op}` exceeded the time limit of {limit_ms} ms")]
    Timeout { op: String, limit_ms: u64 },
    /// The encoder failed or could not meet a target (e.g. `max_bytes`).
    #[error("cannot encode {format}: {detail}")]
    Encode { format: &'static str, detail: String },
}

impl Error {
    /// Stable code for programs: never changes once released.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Unsupported { .. } => "unsupported_format",
            Error::Truncated { .. } => "truncated_input",
            Error::Corrupt { .. } => "corrupt_input",
            Error::LimitExceeded { .. } => "limit_exceeded",
            Error::BadParameter { .. } => "bad_parameter",
            Error::UnknownOperation(_) => "unknown_operation",
            Error::Timeout { .. } => "timeout",
            Error::Encode { .. } => "encode_failed",
        }
    }

    pub(crate) fn bad(op: &str, param: &str, reason: impl Into<String>) -> Self {
        Error::BadParameter { op: op.to_owned(), param: param.to_owned(), reason: reason.into() }
    }

    pub(crate) fn limit(limit: LimitKind, max: u64, actual: u64) -> Self {
        Error::LimitExceeded { limit, max, actual }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
