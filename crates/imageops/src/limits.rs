//! Resource limits applied to every untrusted input. Checks happen from headers, before any
//! pixel buffer is allocated, so a decompression bomb costs a few hundred bytes of parsing.

use serde::{Deserialize, Serialize};

use crate::error::{Error, LimitKind, Result};
use crate::format::Format;

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

/// Most pixels one byte of a format's compressed data can stand for, where the format bounds it.
///
/// - JPEG: the decoder reads Huffman-coded JPEG only (libjpeg is built without arithmetic
///   decoding). A Huffman code is at least one bit, and every 8x8 block of the full-resolution
///   component needs at least one code (its DC difference; a progressive AC scan may skip
///   blocks with one end-of-band run, but an AC scan without the DC scan first is itself a
///   warning), so no JPEG holds more than 64 x 8 = 512 pixels per byte. Flat colour at quality 1
///   from mozjpeg (`encode.rs`) measures 61-63 px/byte at 1024x1024 and 4096x4096
///   (`flat_jpeg_stays_far_below_the_bound` in decode.rs); 1 024 leaves twice the theoretical
///   bound and 16 times the measured one.
/// - PNG: deflate expands at most 1 032:1 and a pixel is at least one bit of the inflated data,
///   so at most 8 256 pixels per byte; 16 384 leaves about twice that.
/// - Others are not bounded this way: GIF's canvas may be almost all background outside a tiny
///   frame, WebP lossless codes a single-symbol alphabet in zero bits, BMP's RLE can skip pixels,
///   TIFF has too many compressions. Their limits stay `max_source_pixels` and the decoders'
///   allocation cap.
fn max_pixels_per_byte(format: Format) -> Option<u64> {
    match format {
        Format::Jpeg => Some(1024),
        Format::Png => Some(16_384),
        _ => None,
    }
}

/// Refuses a source whose header declares far more pixels than its bytes could encode (a few
/// hundred bytes that claim 10000x10000: a patched or cut-off header, or a small-input bomb
/// that would otherwise decode to a grey 100 MP image). Checked from the header, beside
/// [`Limits::check_source`], before any pixel buffer exists; `fail_on=none` skips it, since it
/// accepts partial images (whose missing part is exactly what such a header declares).
pub fn check_plausible_size(format: Format, width: u32, height: u32, input_bytes: usize) -> Result<()> {
    let Some(per_byte) = max_pixels_per_byte(format) else { return Ok(()) };
    let declared = u64::from(width) * u64::from(height);
    let most = (input_bytes as u64).saturating_mul(per_byte);
    if declared > most {
        return Err(Error::Truncated {
            format: format.name(),
            detail: format!(
                "the header declares {width}x{height} ({declared} pixels) but {input_bytes} bytes of {} can encode at most {most} \
                 ({per_byte} per byte): the image data is missing (decode with fail_on=none to accept a partial image)",
                format.name()
            ),
        });
    }
    Ok(())
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
    fn declared_size_must_fit_the_bytes() {
        assert!(check_plausible_size(Format::Jpeg, 1000, 1000, 1000).is_ok());
        let err = check_plausible_size(Format::Jpeg, 10_000, 10_000, 631).unwrap_err();
        assert_eq!(err.code(), "truncated_input");
        assert!(err.to_string().contains("declares 10000x10000 (100000000 pixels) but 631 bytes"), "{err}");
        assert!(check_plausible_size(Format::Png, 10_000, 10_000, 631).is_err());
        assert!(check_plausible_size(Format::Gif, 10_000, 10_000, 631).is_ok());
    }

    #[test]
    fn input_bytes_limit() {
        let l = Limits { max_input_bytes: 4, ..Limits::default() };
        assert!(l.check_input_bytes(4).is_ok());
        assert!(l.check_input_bytes(5).is_err());
    }
}
