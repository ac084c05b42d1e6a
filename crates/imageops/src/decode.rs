//! Decoding untrusted bytes into an 8-bit RGB/RGBA raster.
//!
//! Order of work is the safety property: sniff the format, read the header, check the limits,
//! and only then allocate pixels. JPEG goes through mozjpeg (libjpeg-turbo) so it can decode at
//! 1/2, 1/4 or 1/8 scale in the DCT domain ("shrink-on-load"); other formats use the `image`
//! crate's decoders. Formats with no bundled decoder go to an optional [`ForeignDecoder`]
//! (the CLI supplies one backed by the `ffmpeg` program when it is installed).

use std::io::Cursor;
use std::panic::{AssertUnwindSafe, catch_unwind};

use image::{DynamicImage, ImageDecoder, ImageFormat, RgbImage};

use crate::error::{Error, Result};
use crate::format::{Format, sniff};
use crate::limits::Limits;
use crate::orient::Orientation;

/// A decoded still, always `ImageRgb8` or `ImageRgba8`.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub image: DynamicImage,
    pub format: Format,
    /// Embedded ICC profile (after CMYK conversion this is `None`: the pixels are sRGB).
    pub icc: Option<Vec<u8>>,
    /// EXIF orientation found in the source; already applied when `auto_orient` was set.
    pub orientation: Orientation,
    /// The source rectangle decoded, when a region was asked for and honoured.
    pub region: Option<(u32, u32, u32, u32)>,
}

/// Decodes formats the bundled decoders cannot (AVIF/HEIC today), e.g. through `ffmpeg`.
pub trait ForeignDecoder: Send + Sync {
    /// Returns `Ok(None)` when this decoder cannot handle `format` either.
    fn decode(&self, format: Format, bytes: &[u8], limits: &Limits) -> Result<Option<DynamicImage>>;

    /// Frames of a video whose codec or container has no bundled decoder, picked by `select`
    /// (in time order) and scaled down to `width` if given; `Ok(None)` when this decoder cannot
    /// read it either.
    fn video_frames(
        &self,
        _format: Format,
        _bytes: &[u8],
        _select: &crate::sequence::Select,
        _width: Option<u32>,
        _limits: &Limits,
    ) -> Result<Option<Vec<crate::sequence::Still>>> {
        Ok(None)
    }
}

/// How to decode.
#[derive(Clone, Copy)]
pub struct DecodeOptions<'a> {
    pub limits: Limits,
    /// Apply the EXIF orientation to the pixels (on by default).
    pub auto_orient: bool,
    /// Smallest acceptable decoded size (in oriented space); lets JPEG decode at a DCT scale.
    pub min_size: Option<(u32, u32)>,
    /// Only this rectangle (x, y, width, height) is needed: JPEG stops decoding below it and
    /// keeps only its columns. Check [`Decoded::region`] for whether it was honoured.
    pub region: Option<(u32, u32, u32, u32)>,
    pub foreign: Option<&'a dyn ForeignDecoder>,
}

impl Default for DecodeOptions<'_> {
    fn default() -> Self {
        DecodeOptions { limits: Limits::default(), auto_orient: true, min_size: None, region: None, foreign: None }
    }
}

/// Header facts that need no pixel decode.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub format: Format,
    pub width: u32,
    pub height: u32,
    pub orientation: Orientation,
    pub icc: Option<Vec<u8>>,
    pub color: &'static str,
    pub bit_depth: u8,
    pub has_alpha: bool,
}

/// Sniffs and checks the size limit; the first step of every entry point.
pub fn sniff_checked(bytes: &[u8], limits: &Limits) -> Result<Format> {
    limits.check_input_bytes(bytes.len())?;
    if bytes.is_empty() {
        return Err(Error::Truncated { format: "input", detail: "zero bytes".into() });
    }
    sniff(bytes).ok_or_else(|| Error::Unsupported {
        format: "unknown".into(),
        hint: Some("the bytes match no known image or video signature".into()),
    })
}

/// Reads the header of a still image.
pub fn read_header(bytes: &[u8], limits: &Limits) -> Result<Header> {
    let format = sniff_checked(bytes, limits)?;
    match format {
        Format::Jpeg => jpeg_header(bytes),
        f => {
            let image_format = image_format(f)?;
            let mut dec = image_decoder(bytes, image_format, limits)?;
            let (width, height) = dec.dimensions();
            let color = dec.color_type();
            let orientation = dec.orientation().map(Orientation::from_image).unwrap_or_default();
            let icc = dec.icc_profile().ok().flatten();
            Ok(Header {
                format: f,
                width,
                height,
                orientation,
                icc,
                color: color_name(color),
                bit_depth: (color.bits_per_pixel() / u16::from(color.channel_count())) as u8,
                has_alpha: color.has_alpha(),
            })
        }
    }
}

/// Decodes a still image (the first frame of an animation) under `opts`.
pub fn decode(bytes: &[u8], opts: &DecodeOptions<'_>) -> Result<Decoded> {
    let format = sniff_checked(bytes, &opts.limits)?;
    let mut decoded = match format {
        Format::Jpeg => decode_jpeg(bytes, opts)?,
        Format::Avif | Format::Heif => decode_foreign(format, bytes, opts)?,
        f if f.is_video() => {
            return Err(Error::Unsupported {
                format: f.name().into(),
                hint: Some("video input needs a frame-extraction operation".into()),
            });
        }
        f => decode_with_image(f, bytes, opts)?,
    };
    if opts.auto_orient {
        decoded.image = decoded.orientation.apply(decoded.image);
    }
    Ok(decoded)
}

fn decode_foreign(format: Format, bytes: &[u8], opts: &DecodeOptions<'_>) -> Result<Decoded> {
    let unsupported = || Error::Unsupported {
        format: format.name().into(),
        hint: Some("no bundled decoder; install the `ffmpeg` program to enable it".into()),
    };
    let foreign = opts.foreign.ok_or_else(unsupported)?;
    // Check the declared size before handing the bytes to a decoder we cannot bound.
    let props = HeifProps::read(bytes);
    if let Some((w, h)) = props.stored {
        opts.limits.check_source(w, h)?;
    }
    let mut image = foreign.decode(format, bytes, &opts.limits)?.ok_or_else(unsupported)?;
    opts.limits.check_source(image.width(), image.height())?;
    if opts.auto_orient {
        image = props.apply(image);
    }
    Ok(Decoded { image: normalize(image), format, icc: None, orientation: Orientation::Normal, region: None })
}

/// The HEIF/AVIF item properties the engine reads without a decoder: the stored size (`ispe`)
/// and the orientation transforms `irot` (quarter turns anticlockwise) and `imir` (mirror).
/// Found by scanning the first 64 KiB, where the `meta` box of a still lives.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct HeifProps {
    pub stored: Option<(u32, u32)>,
    pub irot: Option<u8>,
    pub imir: Option<u8>,
}

impl HeifProps {
    pub fn read(bytes: &[u8]) -> HeifProps {
        let head = &bytes[..bytes.len().min(64 * 1024)];
        let at = |name: &[u8]| head.windows(4).position(|w| w == name);
        let byte_after = |name: &[u8]| at(name).and_then(|i| head.get(i + 4)).copied();
        let stored = at(b"ispe")
            .and_then(|i| head.get(i + 8..i + 16))
            .map(|b| (u32::from_be_bytes([b[0], b[1], b[2], b[3]]), u32::from_be_bytes([b[4], b[5], b[6], b[7]])));
        HeifProps { stored, irot: byte_after(b"irot").map(|a| a & 3), imir: byte_after(b"imir").map(|a| a & 1) }
    }

    /// The size a viewer shows: the stored size, axes swapped by an odd number of quarter turns.
    pub fn display_size(self) -> Option<(u32, u32)> {
        let (w, h) = self.stored?;
        Some(if self.irot.is_some_and(|t| t % 2 == 1) { (h, w) } else { (w, h) })
    }

    /// Applies `irot` then `imir` to a decoded image, unless the decoded size shows the decoder
    /// already rotated it.
    fn apply(self, mut image: DynamicImage) -> DynamicImage {
        if let Some(turns) = self.irot {
            let already = turns % 2 == 1 && self.stored.is_some_and(|(w, h)| (image.width(), image.height()) == (h, w));
            if !already {
                image = match turns {
                    1 => image.rotate270(),
                    2 => image.rotate180(),
                    3 => image.rotate90(),
                    _ => image,
                };
            }
        }
        // Axis 0 mirrors top-to-bottom, 1 left-to-right (libheif's reading; the corpus's
        // labelled irot/imir samples confirm it).
        match self.imir {
            Some(0) => image.flipv(),
            Some(_) => image.fliph(),
            None => image,
        }
    }
}

/// Converts any decoded buffer to 8-bit RGB or RGBA, the only layouts operations see.
pub fn normalize(image: DynamicImage) -> DynamicImage {
    match image {
        DynamicImage::ImageRgb8(_) | DynamicImage::ImageRgba8(_) => image,
        other if other.color().has_alpha() => DynamicImage::ImageRgba8(other.to_rgba8()),
        other => DynamicImage::ImageRgb8(other.to_rgb8()),
    }
}

fn image_format(f: Format) -> Result<ImageFormat> {
    Ok(match f {
        Format::Png => ImageFormat::Png,
        Format::Gif => ImageFormat::Gif,
        Format::Webp => ImageFormat::WebP,
        Format::Bmp => ImageFormat::Bmp,
        Format::Tiff => ImageFormat::Tiff,
        Format::Jpeg => ImageFormat::Jpeg,
        other => {
            return Err(Error::Unsupported { format: other.name().into(), hint: None });
        }
    })
}

fn image_decoder<'a>(bytes: &'a [u8], f: ImageFormat, limits: &Limits) -> Result<impl ImageDecoder + 'a> {
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), f);
    // Dimensions are checked by `Limits::check_source` right after the header is read (with a
    // precise error); the allocation cap is the decoder's own backstop: room for one RGBA frame
    // of the largest allowed source plus decoder scratch.
    let mut il = image::Limits::default();
    il.max_alloc = Some(limits.max_source_pixels.saturating_mul(8).max(1 << 24));
    reader.limits(il);
    reader.into_decoder().map_err(|e| map_image_error(f, e))
}

fn decode_with_image(f: Format, bytes: &[u8], opts: &DecodeOptions<'_>) -> Result<Decoded> {
    let image_format = image_format(f)?;
    let mut dec = image_decoder(bytes, image_format, &opts.limits)?;
    let (w, h) = dec.dimensions();
    opts.limits.check_source(w, h)?;
    let orientation = dec.orientation().map(Orientation::from_image).unwrap_or_default();
    let icc = dec.icc_profile().ok().flatten();
    let image = DynamicImage::from_decoder(dec).map_err(|e| map_image_error(image_format, e))?;
    Ok(Decoded { image: normalize(image), format: f, icc, orientation, region: None })
}

pub(crate) fn map_image_error(f: ImageFormat, e: image::ImageError) -> Error {
    use image::ImageError as E;
    let format = match f {
        ImageFormat::Png => "png",
        ImageFormat::Gif => "gif",
        ImageFormat::WebP => "webp",
        ImageFormat::Bmp => "bmp",
        ImageFormat::Tiff => "tiff",
        ImageFormat::Jpeg => "jpeg",
        _ => "image",
    };
    match e {
        E::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            Error::Truncated { format, detail: io.to_string() }
        }
        E::Limits(l) => Error::Corrupt { format, detail: format!("decoder limit: {l}") },
        E::Unsupported(u) => Error::Unsupported { format: format.into(), hint: Some(u.to_string()) },
        other => {
            let detail = other.to_string();
            let lower = detail.to_ascii_lowercase();
            if lower.contains("eof")
                || lower.contains("end of")
                || lower.contains("truncat")
                || lower.contains("no more data")
            {
                Error::Truncated { format, detail }
            } else {
                Error::Corrupt { format, detail }
            }
        }
    }
}

fn color_name(c: image::ColorType) -> &'static str {
    use image::ColorType as C;
    match c {
        C::L8 | C::L16 | C::La8 | C::La16 => "gray",
        C::Rgb8 | C::Rgb16 | C::Rgb32F => "rgb",
        C::Rgba8 | C::Rgba16 | C::Rgba32F => "rgba",
        _ => "other",
    }
}

// ---------------------------------------------------------------------------------------------
// JPEG through mozjpeg

const JPEG_MARKERS: &[mozjpeg::Marker] = &[mozjpeg::Marker::APP(1), mozjpeg::Marker::APP(2), mozjpeg::Marker::APP(14)];

struct JpegMeta {
    orientation: Orientation,
    icc: Option<Vec<u8>>,
    adobe: bool,
}

fn jpeg_meta(markers: mozjpeg::decompress::MarkerIter<'_>) -> JpegMeta {
    let mut orientation = Orientation::Normal;
    let mut chunks: Vec<(u8, &[u8])> = Vec::new();
    let mut adobe = false;
    for m in markers {
        match m.marker {
            mozjpeg::Marker::APP(1) if m.data.starts_with(b"Exif\0\0") => {
                orientation = Orientation::from_exif(&m.data[6..]);
            }
            mozjpeg::Marker::APP(2) if m.data.len() > 14 && m.data.starts_with(b"ICC_PROFILE\0") => {
                chunks.push((m.data[12], &m.data[14..]));
            }
            mozjpeg::Marker::APP(14) if m.data.starts_with(b"Adobe") => adobe = true,
            _ => {}
        }
    }
    chunks.sort_by_key(|c| c.0);
    let icc = (!chunks.is_empty()).then(|| chunks.iter().flat_map(|c| c.1.iter().copied()).collect());
    JpegMeta { orientation, icc, adobe }
}

/// Runs libjpeg code, turning its unwinding fatal errors into typed errors.
pub(crate) fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "libjpeg failed".into());
            let detail = msg.trim_start_matches("libjpeg fatal error: ").to_owned();
            if detail.contains("premature") || detail.contains("empty") {
                Err(Error::Truncated { format: "jpeg", detail })
            } else {
                Err(Error::Corrupt { format: "jpeg", detail })
            }
        }
    }
}

fn jpeg_header(bytes: &[u8]) -> Result<Header> {
    guarded(|| {
        let d = mozjpeg::Decompress::with_markers(JPEG_MARKERS)
            .from_mem(bytes)
            .map_err(|e| Error::Corrupt { format: "jpeg", detail: e.to_string() })?;
        let meta = jpeg_meta(d.markers());
        let (w, h) = d.size();
        let comps = d.components().len();
        Ok(Header {
            format: Format::Jpeg,
            width: w as u32,
            height: h as u32,
            orientation: meta.orientation,
            icc: meta.icc,
            color: match comps {
                1 => "gray",
                4 => "cmyk",
                _ => "rgb",
            },
            bit_depth: 8,
            has_alpha: false,
        })
    })
}

/// True when the entropy-coded data ends with an EOI marker (trailing padding allowed).
fn jpeg_has_eoi(bytes: &[u8]) -> bool {
    let trimmed = bytes.iter().rposition(|&b| b != 0 && b != 0xFF).map_or(&bytes[..0], |i| &bytes[..=i]);
    // EOI is FF D9; `trimmed` ends on D9 if present.
    trimmed.len() >= 2 && trimmed[trimmed.len() - 1] == 0xD9 && bytes[trimmed.len() - 2] == 0xFF
}

/// Picks the DCT scale (8 = full, 4 = 1/2, 2 = 1/4, 1 = 1/8) that keeps the decoded image at
/// least `min` in both dimensions.
pub(crate) fn jpeg_scale(src: (u32, u32), min: Option<(u32, u32)>) -> u32 {
    let Some((mw, mh)) = min else { return 1 };
    for shrink in [8u32, 4, 2] {
        if src.0.div_ceil(shrink) >= mw && src.1.div_ceil(shrink) >= mh {
            return shrink;
        }
    }
    1
}

fn decode_jpeg(bytes: &[u8], opts: &DecodeOptions<'_>) -> Result<Decoded> {
    if !jpeg_has_eoi(bytes) {
        return Err(Error::Truncated {
            format: "jpeg",
            detail: "no end-of-image marker: the data stops before the image does".into(),
        });
    }
    guarded(|| {
        let mut d = mozjpeg::Decompress::with_markers(JPEG_MARKERS)
            .from_mem(bytes)
            .map_err(|e| Error::Corrupt { format: "jpeg", detail: e.to_string() })?;
        let (w, h) = d.size();
        let (w, h) = (w as u32, h as u32);
        opts.limits.check_source(w, h)?;
        let meta = jpeg_meta(d.markers());
        let oriented = meta.orientation != Orientation::Normal && opts.auto_orient;
        let min = opts.min_size.map(|m| if oriented && meta.orientation.swaps_axes() { (m.1, m.0) } else { m });
        let shrink = jpeg_scale((w, h), min);
        d.scale((8 / shrink) as u8);
        // A region is honoured only at full scale and without a pending orientation change.
        let region = opts.region.filter(|_| shrink == 1 && !oriented);
        let fail = |e: std::io::Error| Error::Corrupt { format: "jpeg", detail: e.to_string() };
        let ((px, (ow, oh)), icc) = match d.image().map_err(fail)? {
            mozjpeg::decompress::Format::RGB(mut s) => {
                (read_rows(&mut s, 3, region, |row, out| out.extend_from_slice(row))?, meta.icc)
            }
            mozjpeg::decompress::Format::Gray(mut s) => {
                (read_rows(&mut s, 1, region, |row, out| out.extend(row.iter().flat_map(|&g| [g, g, g])))?, meta.icc)
            }
            mozjpeg::decompress::Format::CMYK(mut s) => {
                let adobe = meta.adobe;
                // A CMYK profile describes the source inks, not our RGB output: drop it.
                (read_rows(&mut s, 4, region, |row, out| cmyk_to_rgb(row, adobe, out))?, None)
            }
        };
        let image = RgbImage::from_raw(ow, oh, px)
            .ok_or(Error::Corrupt { format: "jpeg", detail: "short scanline data".into() })?;
        Ok(Decoded {
            image: DynamicImage::ImageRgb8(image),
            format: Format::Jpeg,
            icc,
            orientation: meta.orientation,
            region: region.map(|r| clip_region(r, (w, h))),
        })
    })
}

fn clip_region(r: (u32, u32, u32, u32), size: (u32, u32)) -> (u32, u32, u32, u32) {
    let x = r.0.min(size.0.saturating_sub(1));
    let y = r.1.min(size.1.saturating_sub(1));
    (x, y, r.2.min(size.0 - x).max(1), r.3.min(size.1 - y).max(1))
}

/// Reads scanlines one at a time, keeping only `region` (rows past its bottom are never
/// decoded) and converting each kept row to RGB with `convert`. Returns pixels and size.
fn read_rows<R>(
    s: &mut mozjpeg::decompress::DecompressStarted<R>,
    comps: usize,
    region: Option<(u32, u32, u32, u32)>,
    mut convert: impl FnMut(&[u8], &mut Vec<u8>),
) -> Result<(Vec<u8>, (u32, u32))> {
    let (fw, fh) = (s.width() as u32, s.height() as u32);
    let (x, y, w, h) = region.map_or((0, 0, fw, fh), |r| clip_region(r, (fw, fh)));
    let truncated = |e: std::io::Error| Error::Truncated { format: "jpeg", detail: e.to_string() };
    let mut row = vec![0u8; fw as usize * comps];
    for _ in 0..y {
        s.read_scanlines_into(&mut row[..]).map_err(truncated)?;
    }
    let len = w as usize * h as usize * 3;
    if comps == 3 && w == fw {
        // Full-width RGB: libjpeg writes straight into the output, no row copy.
        // `vec!` of zeros is calloc: no memset. `len` is bounded by the checked source limits.
        let mut out = vec![0u8; len];
        s.read_scanlines_into(&mut out[..]).map_err(truncated)?;
        return Ok((out, (w, h)));
    }
    let mut out = Vec::new();
    out.try_reserve_exact(len).map_err(|_| alloc_failed())?;
    let cols = x as usize * comps..(x + w) as usize * comps;
    for _ in 0..h {
        s.read_scanlines_into(&mut row[..]).map_err(truncated)?;
        convert(&row[cols.clone()], &mut out);
    }
    Ok((out, (w, h)))
}

fn alloc_failed() -> Error {
    Error::Corrupt { format: "jpeg", detail: "cannot allocate the pixel buffer".into() }
}

/// Naive CMYK -> RGB, appended to `out`. Adobe (Photoshop) CMYK JPEGs store inverted inks.
fn cmyk_to_rgb(px: &[u8], adobe_inverted: bool, out: &mut Vec<u8>) {
    for p in px.chunks_exact(4) {
        let (c, m, y, k) = if adobe_inverted {
            (u32::from(p[0]), u32::from(p[1]), u32::from(p[2]), u32::from(p[3]))
        } else {
            (255 - u32::from(p[0]), 255 - u32::from(p[1]), 255 - u32::from(p[2]), 255 - u32::from(p[3]))
        };
        out.extend_from_slice(&[(c * k / 255) as u8, (m * k / 255) as u8, (y * k / 255) as u8]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heif_with(stored: (u32, u32), irot: Option<u8>) -> Vec<u8> {
        let mut b = b"\0\0\0\x14ftypavif\0\0\0\0mif1".to_vec();
        b.extend_from_slice(b"\0\0\0\x14ispe\0\0\0\0");
        b.extend_from_slice(&stored.0.to_be_bytes());
        b.extend_from_slice(&stored.1.to_be_bytes());
        if let Some(a) = irot {
            b.extend_from_slice(b"\0\0\0\x09irot");
            b.push(a);
        }
        b
    }

    #[test]
    fn heif_properties_give_the_displayed_size() {
        let p = HeifProps::read(&heif_with((640, 427), Some(1)));
        assert_eq!((p.stored, p.irot, p.display_size()), (Some((640, 427)), Some(1), Some((427, 640))));
        assert_eq!(HeifProps::read(&heif_with((640, 427), None)).display_size(), Some((640, 427)));
        assert_eq!(HeifProps::read(b"\0\0\0\x14ftypavif").display_size(), None);
    }

    /// A foreign decoder that must never be reached.
    struct Unreachable;
    impl ForeignDecoder for Unreachable {
        fn decode(&self, _: Format, _: &[u8], _: &Limits) -> Result<Option<DynamicImage>> {
            panic!("the declared size should have been refused first")
        }
    }

    #[test]
    fn oversized_heif_is_refused_before_the_foreign_decoder_runs() {
        let opts = DecodeOptions { foreign: Some(&Unreachable), ..DecodeOptions::default() };
        let err = decode(&heif_with((100_000, 100_000), None), &opts).unwrap_err();
        assert!(matches!(err, Error::LimitExceeded { .. }), "{err:?}");
    }

    #[test]
    fn eoi_detection() {
        assert!(jpeg_has_eoi(&[0xFF, 0xD8, 1, 2, 0xFF, 0xD9]));
        assert!(jpeg_has_eoi(&[0xFF, 0xD8, 1, 2, 0xFF, 0xD9, 0, 0]));
        assert!(!jpeg_has_eoi(&[0xFF, 0xD8, 1, 2, 3]));
        assert!(!jpeg_has_eoi(&[]));
    }

    #[test]
    fn scale_keeps_minimum_size() {
        assert_eq!(jpeg_scale((6028, 3391), Some((1200, 675))), 4);
        assert_eq!(jpeg_scale((6028, 3391), Some((700, 400))), 8);
        assert_eq!(jpeg_scale((2560, 1600), Some((1920, 1200))), 1);
        assert_eq!(jpeg_scale((2560, 1600), None), 1);
    }

    #[test]
    fn cmyk_conversion_handles_adobe_inversion() {
        // Adobe-inverted: 255 = no ink -> white.
        let rgb = |px: &[u8], adobe| {
            let mut out = Vec::new();
            cmyk_to_rgb(px, adobe, &mut out);
            out
        };
        assert_eq!(rgb(&[255, 255, 255, 255], true), vec![255, 255, 255]);
        assert_eq!(rgb(&[0, 0, 0, 0], false), vec![255, 255, 255]);
        assert_eq!(rgb(&[255, 255, 255, 0], true), vec![0, 0, 0]);
    }
}
