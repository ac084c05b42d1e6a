//! pixflow's image engine: pure media operations on bytes in memory.
//!
//! `sniff` → `probe`/`decode` (limits checked from headers first) → [`ops`] → `encode`, tied
//! together by [`Pipeline`]. No I/O, no async, no global state: every entry point takes bytes
//! and returns bytes or a typed [`Error`], so the CLI, the HTTP server and the workflow engine
//! share one implementation. Formats without a bundled decoder are delegated to a
//! caller-supplied [`ForeignDecoder`].

pub mod animation;
pub mod color;
pub mod decode;
pub mod encode;
pub mod error;
pub mod format;
pub mod icc;
pub mod limits;
pub mod ops;
pub mod orient;
pub mod params;
pub mod pipeline;
pub mod probe;
mod raster;
pub mod sequence;
pub mod video;

pub use color::Color;
pub use decode::{DecodeOptions, Decoded, ForeignDecoder};
pub use encode::{EncodeOptions, OutFormat};
pub use error::{Error, LimitKind, Result};
pub use format::{Format, sniff};
pub use limits::Limits;
pub use ops::{Context, Op};
pub use pipeline::{Pipeline, Rendition, RunOptions};
pub use probe::{MediaKind, Probe, probe};
