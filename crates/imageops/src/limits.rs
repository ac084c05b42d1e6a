//! Resource limits applied to every untrusted input. Checks happen from headers, before any
//! pixel buffer is allocated, so a decompression bomb costs a few hundred bytes of parsing.

use serde::{Deserialize, Serialize};

use crate::error::{Error, LimitKind, Result};

/// Limits with production defaults; every field can be configured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest accepted input, in bytes (default 64 MiB).
    pub max_input_bytes: u64,
    /// Largest source image, in pixels (width x height, per frame; default 100 MP).
    pub max_source_pixels: u64,
    /// Largest source width or height (default 30 000 px).
    pub max_source_dimension: u32,
    /// Largest output image, in pixels (default 50 MP).
    pub max_output_pixels: u64,
    /// Most frames accepted from an animation (default 1 000).
    pub max_frames: u64,
    /// Longest video accepted, in seconds (default 4 h).
    pub max_video_seconds: u64,
    /// Wall-clock budget for one operation of a pipeline, in milliseconds (default 30 s).
    pub max_op_millis: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_input_bytes: 64 << 20,
            max_source_pixels: 100_000_000,
            max_source_dimension: 30_000,
            max_output_pixels: 50_000_000,
            max_frames: 1_000,
            max_video_seconds: 4 * 3600,
            max_op_millis: 30_000,
        }
    }
}

impl Limits {
    pub fn check_input_bytes(&self, len: usize) -> Result<()> {
        let len = len as u64;
        if len > self.max_input_bytes {
            return Err(Error::limit(LimitKind::InputBytes, self.max_input_bytes, len));
        }
        Ok(())
    }

    /// Checks a source's header dimensions before anything is decoded.
    pub fn check_source(&self, width: u32, height: u32) -> Result<()> {
        let dim = width.max(height);
        if dim > self.max_source_dimension {
            return Err(Error::limit(LimitKind::SourceDimension, self.max_source_dimension.into(), dim.into()));
        }
        let px = u64::from(width) * u64::from(height);
        if px > self.max_source_pixels {
            return Err(Error::limit(LimitKind::SourcePixels, self.max_source_pixels, px));
        }
        Ok(())
    }

    /// Checks a planned output (or intermediate) size before it is allocated.
    pub fn check_output(&self, width: u32, height: u32) -> Result<()> {
        let px = u64::from(width) * u64::from(height);
        if px > self.max_output_pixels {
            return Err(Error::limit(LimitKind::OutputPixels, self.max_output_pixels, px));
        }
        Ok(())
    }

    pub fn check_frames(&self, frames: u64) -> Result<()> {
        if frames > self.max_frames {
            return Err(Error::limit(LimitKind::Frames, self.max_frames, frames));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_inclusive_at_the_boundary() {
        let l = Limits { max_source_pixels: 100, max_source_dimension: 50, ..Limits::default() };
        assert!(l.check_source(10, 10).is_ok());
        assert!(l.check_source(50, 2).is_ok());
        let err = l.check_source(11, 10).unwrap_err();
        assert!(matches!(err, Error::LimitExceeded { limit: LimitKind::SourcePixels, max: 100, actual: 110 }));
        let err = l.check_source(51, 1).unwrap_err();
        assert!(matches!(err, Error::LimitExceeded { limit: LimitKind::SourceDimension, .. }));
        assert_eq!(err.code(), "limit_exceeded");
        assert!(err.to_string().contains("max_source_dimension is 50"));
    }

    #[test]
    fn input_bytes_limit() {
        let l = Limits { max_input_bytes: 4, ..Limits::default() };
        assert!(l.check_input_bytes(4).is_ok());
        assert!(l.check_input_bytes(5).is_err());
    }
}
