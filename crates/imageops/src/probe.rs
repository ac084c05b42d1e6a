//! `probe`: what a file is, decided from its bytes: format, media kind (the value workflows
//! branch on), dimensions, frames, duration, orientation, colour facts, and for stills a
//! dominant colour and a BlurHash placeholder. Header facts never need a full decode; the
//! colour summary decodes at the smallest JPEG DCT scale.

use std::io::Cursor;

use serde::Serialize;

use crate::decode::{self, DecodeOptions, ForeignDecoder};
use crate::error::{Error, LimitKind, Result};
use crate::format::Format;
use crate::limits::Limits;
use crate::ops::resize::{Kernel, resample};

/// What kind of media the bytes hold; the value workflows branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MediaKind {
    Still,
    Animated,
    Video,
    VideoSegment,
    Unsupported,
}

/// A problem found while probing, reported instead of failing the probe.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub code: &'static str,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub format: Option<Format>,
    pub mime: Option<&'static str>,
    pub kind: MediaKind,
    pub bytes: u64,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub frames: Option<u64>,
    pub animated: bool,
    pub duration_ms: Option<u64>,
    pub orientation: Option<u8>,
    pub icc: bool,
    pub color: Option<&'static str>,
    pub bit_depth: Option<u8>,
    pub has_alpha: bool,
    pub codec: Option<String>,
    pub dominant_color: Option<String>,
    pub blurhash: Option<String>,
    /// Set when the header reads but the media does not decode (truncated, corrupt...).
    pub problem: Option<Problem>,
}

impl Probe {
    fn empty(format: Option<Format>, kind: MediaKind, bytes: usize) -> Probe {
        Probe {
            format,
            mime: format.map(Format::mime),
            kind,
            bytes: bytes as u64,
            width: None,
            height: None,
            frames: None,
            animated: false,
            duration_ms: None,
            orientation: None,
            icc: false,
            color: None,
            bit_depth: None,
            has_alpha: false,
            codec: None,
            dominant_color: None,
            blurhash: None,
            problem: None,
        }
    }
}

/// Probes `bytes`. Errors only for inputs that are not media at all or over the byte limit;
/// damage found after the header is reported in [`Probe::problem`].
pub fn probe(bytes: &[u8], limits: &Limits, foreign: Option<&dyn ForeignDecoder>) -> Result<Probe> {
    let format = match decode::sniff_checked(bytes, limits) {
        Ok(f) => f,
        Err(Error::Unsupported { .. }) => {
            return Ok(Probe::empty(None, MediaKind::Unsupported, bytes.len()));
        }
        Err(e) => return Err(e),
    };
    if format.is_video() {
        return Ok(probe_video(format, bytes, limits));
    }
    if matches!(format, Format::Avif | Format::Heif) {
        return Ok(probe_heif(format, bytes, limits, foreign));
    }
    let header = decode::read_header(bytes, limits)?;
    let mut p = Probe::empty(Some(format), MediaKind::Still, bytes.len());
    p.width = Some(header.width);
    p.height = Some(header.height);
    p.orientation = Some(header.orientation.exif_value());
    p.icc = header.icc.is_some();
    p.color = Some(header.color);
    p.bit_depth = Some(header.bit_depth);
    p.has_alpha = header.has_alpha;
    match animation(format, bytes, limits) {
        Ok(Some((frames, duration_ms))) => {
            p.frames = Some(frames);
            p.animated = frames > 1;
            p.duration_ms = duration_ms;
            if p.animated {
                p.kind = MediaKind::Animated;
            }
        }
        Ok(None) => p.frames = Some(1),
        Err(e) => p.problem = Some(Problem { code: e.code(), message: e.to_string() }),
    }
    if let Err(e) = summarise_colour(&mut p, bytes, limits, foreign) {
        p.problem.get_or_insert(Problem { code: e.code(), message: e.to_string() });
    }
    Ok(p)
}

fn summarise_colour(p: &mut Probe, bytes: &[u8], limits: &Limits, foreign: Option<&dyn ForeignDecoder>) -> Result<()> {
    let opts = DecodeOptions { limits: *limits, min_size: Some((32, 32)), foreign, ..DecodeOptions::default() };
    let d = decode::decode(bytes, &opts)?;
    let (w, h) = (d.image.width(), d.image.height());
    let scale = (64.0 / f64::from(w.max(h))).min(1.0);
    let size = (((f64::from(w) * scale) as u32).max(1), ((f64::from(h) * scale) as u32).max(1));
    let small = resample(&d.image, (0.0, 0.0, f64::from(w), f64::from(h)), size, Kernel::Bilinear)?.to_rgba8();
    p.blurhash = blurhash::encode(4, 3, size.0, size.1, small.as_raw()).ok();
    p.dominant_color = Some(dominant(small.as_raw()));
    Ok(())
}

/// Most common colour after quantising to 4 bits per channel (transparent pixels ignored),
/// reported as the mean of the pixels in that bucket.
fn dominant(rgba: &[u8]) -> String {
    let mut buckets = vec![(0u32, [0u32; 3]); 4096];
    for p in rgba.chunks_exact(4).filter(|p| p[3] >= 128) {
        let key = (usize::from(p[0] >> 4) << 8) | (usize::from(p[1] >> 4) << 4) | usize::from(p[2] >> 4);
        let b = &mut buckets[key];
        b.0 += 1;
        for (sum, &v) in b.1.iter_mut().zip(p) {
            *sum += u32::from(v);
        }
    }
    let (n, sum) = buckets.iter().max_by_key(|b| b.0).copied().unwrap_or((0, [0; 3]));
    if n == 0 {
        return "#00000000".into();
    }
    format!("#{:02x}{:02x}{:02x}", sum[0] / n, sum[1] / n, sum[2] / n)
}

/// Frame count and total duration of animated formats; `None` for single-image formats.
fn animation(format: Format, bytes: &[u8], limits: &Limits) -> Result<Option<(u64, Option<u64>)>> {
    match format {
        Format::Gif => {
            let mut opts = gif::DecodeOptions::new();
            opts.set_color_output(gif::ColorOutput::Indexed);
            let mut dec = opts.read_info(Cursor::new(bytes)).map_err(|e| gif_error(&e))?;
            let (mut frames, mut centis) = (0u64, 0u64);
            while let Some(frame) = dec.next_frame_info().map_err(|e| gif_error(&e))? {
                frames += 1;
                centis += u64::from(frame.delay);
                limits.check_frames(frames)?;
            }
            Ok(Some((frames, Some(centis * 10))))
        }
        Format::Webp => {
            let dec = image_webp::WebPDecoder::new(Cursor::new(bytes))
                .map_err(|e| Error::Corrupt { format: "webp", detail: e.to_string() })?;
            if !dec.is_animated() {
                return Ok(None);
            }
            let frames = u64::from(dec.num_frames());
            limits.check_frames(frames)?;
            Ok(Some((frames, Some(dec.loop_duration()))))
        }
        Format::Png => {
            let dec = png::Decoder::new(Cursor::new(bytes));
            let reader = dec.read_info().map_err(|e| Error::Corrupt { format: "png", detail: e.to_string() })?;
            let Some(actl) = reader.info().animation_control else {
                return Ok(None);
            };
            let frames = u64::from(actl.num_frames);
            limits.check_frames(frames)?;
            Ok(Some((frames, None)))
        }
        _ => Ok(None),
    }
}

/// Number of frames of a GIF/WebP/PNG (1 for stills), for callers that only need the count.
pub(crate) fn animation_frames(format: Format, bytes: &[u8], limits: &Limits) -> Result<u64> {
    Ok(animation(format, bytes, limits)?.map_or(1, |a| a.0))
}

fn gif_error(e: &gif::DecodingError) -> Error {
    match e {
        gif::DecodingError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            Error::Truncated { format: "gif", detail: io.to_string() }
        }
        other => {
            let detail = other.to_string();
            if detail.contains("end") || detail.contains("EOF") {
                Error::Truncated { format: "gif", detail }
            } else {
                Error::Corrupt { format: "gif", detail }
            }
        }
    }
}

/// AVIF/HEIF: dimensions from the `ispe` property; decoded only through a foreign decoder.
fn probe_heif(format: Format, bytes: &[u8], limits: &Limits, foreign: Option<&dyn ForeignDecoder>) -> Probe {
    let mut p = Probe::empty(Some(format), MediaKind::Still, bytes.len());
    if let Some((w, h)) = crate::decode::HeifProps::read(bytes).display_size() {
        p.width = Some(w);
        p.height = Some(h);
    }
    p.codec = Some(if format == Format::Avif { "av1" } else { "hevc" }.into());
    p.frames = Some(1);
    if let Err(e) = summarise_colour(&mut p, bytes, limits, foreign) {
        p.problem = Some(Problem { code: e.code(), message: e.to_string() });
    }
    p
}

fn probe_video(format: Format, bytes: &[u8], limits: &Limits) -> Probe {
    let kind = match format {
        Format::Fmp4 | Format::MpegTs => MediaKind::VideoSegment,
        _ => MediaKind::Video,
    };
    let mut p = Probe::empty(Some(format), kind, bytes.len());
    match format {
        Format::Mp4 | Format::Mov | Format::Fmp4 => match crate::video::read_mp4(bytes) {
            Err(e) => p.problem = Some(Problem { code: e.code(), message: e.to_string() }),
            Ok(mp4) => {
                if let Some(t) = mp4.tracks().values().find(|t| t.kind == Some(re_mp4::TrackKind::Video)) {
                    // Coded size from the sample entry (as ffprobe reports it); the track
                    // header's size can include a pixel-aspect correction.
                    let (w, h) = match &t.trak(&mp4).mdia.minf.stbl.stsd.contents {
                        re_mp4::StsdBoxContent::Avc1(a) => (a.width, a.height),
                        _ => (t.width, t.height),
                    };
                    p.width = Some(u32::from(w));
                    p.height = Some(u32::from(h));
                    p.frames = Some(t.samples.len() as u64);
                    p.duration_ms = t.duration.saturating_mul(1000).checked_div(t.timescale);
                    p.codec = t.codec_string(&mp4);
                }
            }
        },
        Format::MpegTs => match crate::video::ts_summary(bytes, limits) {
            Ok(ts) => {
                p.frames = Some(ts.frames);
                p.duration_ms = Some(ts.duration_ms);
                p.width = ts.size.map(|s| s.0);
                p.height = ts.size.map(|s| s.1);
                p.codec = Some("h264".into());
            }
            Err(e) => p.problem = Some(Problem { code: e.code(), message: e.to_string() }),
        },
        Format::MpegVideo => {
            // Sequence header: 12-bit width, 12-bit height right after the start code.
            if let Some(b) = bytes.get(4..7) {
                p.width = Some((u32::from(b[0]) << 4) | (u32::from(b[1]) >> 4));
                p.height = Some(((u32::from(b[1]) & 0x0F) << 8) | u32::from(b[2]));
            }
            p.codec = Some("mpeg1video".into());
        }
        _ => {}
    }
    // The video limit is reported where the duration is known, so callers can refuse before
    // fetching frames (`frames` refuses such a video too).
    let max_ms = limits.max_video_seconds.saturating_mul(1000);
    if let Some(ms) = p.duration_ms.filter(|&ms| ms > max_ms) {
        let e = Error::LimitExceeded {
            limit: LimitKind::VideoSeconds,
            max: limits.max_video_seconds,
            actual: ms.div_ceil(1000),
        };
        p.problem = Some(Problem { code: e.code(), message: e.to_string() });
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::{EncodeOptions, OutFormat, encode};

    #[test]
    fn still_probe_reports_header_and_colour() {
        let img = crate::raster::canvas(120, 80, crate::Color([200, 30, 40, 255]), false);
        let bytes = encode(&img, OutFormat::Png, &EncodeOptions::default(), None).unwrap();
        let p = probe(&bytes, &Limits::default(), None).unwrap();
        assert_eq!(p.format, Some(Format::Png));
        assert_eq!(p.kind, MediaKind::Still);
        assert_eq!((p.width, p.height, p.frames), (Some(120), Some(80), Some(1)));
        assert_eq!(p.dominant_color.as_deref(), Some("#c81e28"));
        assert!(p.blurhash.as_deref().is_some_and(|h| h.len() >= 6));
        assert!(p.problem.is_none());
    }

    #[test]
    fn unknown_bytes_are_unsupported_not_errors() {
        let p = probe(b"just some text", &Limits::default(), None).unwrap();
        assert_eq!(p.kind, MediaKind::Unsupported);
        assert!(probe(b"", &Limits::default(), None).is_err());
    }

    #[test]
    fn animated_gif_counts_frames_and_duration() {
        let mut out = Vec::new();
        {
            let mut enc = image::codecs::gif::GifEncoder::new(&mut out);
            for i in 0..3u8 {
                let frame = image::Frame::from_parts(
                    image::RgbaImage::from_pixel(8, 8, image::Rgba([i * 80, 0, 0, 255])),
                    0,
                    0,
                    image::Delay::from_numer_denom_ms(100, 1),
                );
                enc.encode_frame(frame).unwrap();
            }
        }
        let p = probe(&out, &Limits::default(), None).unwrap();
        assert_eq!((p.kind, p.frames, p.duration_ms), (MediaKind::Animated, Some(3), Some(300)));
        let limited = Limits { max_frames: 2, ..Limits::default() };
        assert_eq!(probe(&out, &limited, None).unwrap().problem.unwrap().code, "limit_exceeded");
    }

    #[test]
    fn dominant_colour_prefers_the_majority() {
        let mut px = Vec::new();
        for i in 0..100 {
            px.extend_from_slice(if i < 70 { &[10, 200, 10, 255] } else { &[250, 0, 0, 255] });
        }
        assert_eq!(dominant(&px), "#0ac80a");
    }
}
