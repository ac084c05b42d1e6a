//! Decoding untrusted bytes into an 8-bit RGB/RGBA raster.
//!
//! Order of work is the safety property: sniff the format, read the header, check the limits,
//! and only then allocate pixels. JPEG goes through mozjpeg (libjpeg-turbo) so it can decode at
//! 1/2, 1/4 or 1/8 scale in the DCT domain ("shrink-on-load"); other formats use the `image`
//! crate's decoders. Formats with no bundled decoder go to an optional [`ForeignDecoder`]
//! (the CLI supplies one backed by the `ffmpeg` program when it is installed).
//!
//! Damaged data is refused by default, as sharp does (`failOn: 'warning'`): libjpeg's
//! recoverable warnings (data that ends early, corrupt entropy data) become
//! `truncated_input`/`corrupt_input` instead of grey-filled rows; [`FailOn`] relaxes that.

use std::cell::Cell;
use std::io::{BufRead, Cursor, Read};
use std::os::raw::c_int;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

use image::{DynamicImage, ImageDecoder, ImageFormat, RgbImage};

use crate::error::{Error, Result};
use crate::format::{Format, sniff};
use crate::limits::{Limits, check_plausible_size};
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
    /// Which decoder complaints refuse the source (default: any warning).
    pub fail_on: FailOn,
}

impl Default for DecodeOptions<'_> {
    fn default() -> Self {
        DecodeOptions {
            limits: Limits::default(),
            auto_orient: true,
            min_size: None,
            region: None,
            foreign: None,
            fail_on: FailOn::default(),
        }
    }
}

/// Which damage refuses a source, after sharp's `failOn` (its `error` level is not offered:
/// here every fatal decoder error refuses the source at every level).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailOn {
    /// Accept what the decoder recovers: missing or damaged parts come out grey, and a header
    /// that declares more pixels than the bytes can hold is believed (the limits still apply).
    None,
    /// Refuse data that ends before the image does (and a declared size the bytes cannot hold);
    /// accept other recoverable damage. For JPEG the first complaint decides: it counts as
    /// truncation when libjpeg raises it at the end of the data.
    Truncated,
    /// Refuse on any decoder warning as well: corrupt entropy data, extraneous bytes (default).
    #[default]
    Warning,
}

impl FailOn {
    /// The accepted names, as `fail_on=` takes them.
    pub const NAMES: &'static [&'static str] = &["none", "truncated", "warning"];

    pub fn parse(name: &str) -> Option<FailOn> {
        match name {
            "none" => Some(FailOn::None),
            "truncated" => Some(FailOn::Truncated),
            "warning" => Some(FailOn::Warning),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FailOn::None => "none",
            FailOn::Truncated => "truncated",
            FailOn::Warning => "warning",
        }
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
            let (orientation, icc) = metadata(&mut dec, f, bytes);
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
    if opts.fail_on != FailOn::None {
        check_plausible_size(f, w, h, bytes.len())?;
    }
    let (orientation, icc) = metadata(&mut dec, f, bytes);
    let image = DynamicImage::from_decoder(dec).map_err(|e| map_image_error(image_format, e))?;
    Ok(Decoded { image: normalize(image), format: f, icc, orientation, region: None })
}

/// The orientation (EXIF) and ICC profile of an image read through `image`; none where they
/// cannot be read safely.
fn metadata(dec: &mut impl ImageDecoder, f: Format, bytes: &[u8]) -> (Orientation, Option<Vec<u8>>) {
    if f == Format::Webp && !webp_chunks_fit(bytes) {
        return (Orientation::default(), None);
    }
    let orientation = dec.orientation().map(Orientation::from_image).unwrap_or_default();
    (orientation, dec.icc_profile().ok().flatten())
}

/// Whether every top-level chunk of a WebP file lies within its bytes. `image-webp` keeps each
/// chunk's range as its header declares it, and reads an EXIF or ICC chunk into a buffer of
/// the declared size allocated before the read (with no memory limit set through `image`): a
/// file of a few kilobytes whose metadata chunk claims 4 GiB would allocate 4 GiB. Such a file
/// is damaged; its metadata is not read (its pixels decode or fail on their own).
fn webp_chunks_fit(bytes: &[u8]) -> bool {
    // "RIFF", the RIFF size, "WEBP", then chunks: a fourcc, a little-endian size, the data,
    // and a pad byte after odd sizes.
    let mut at = 12usize;
    while let Some(header) = bytes.get(at..at.saturating_add(8)) {
        let size = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let end = usize::try_from(size).ok().and_then(|size| (at + 8).checked_add(size));
        match end {
            Some(end) if end <= bytes.len() => at = end + usize::from(size % 2 == 1),
            _ => return false,
        }
    }
    true
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
    let lenient =
        || guarded(|| jpeg_pixels(mozjpeg::Decompress::with_markers(JPEG_MARKERS).from_mem(bytes), bytes.len(), opts));
    if opts.fail_on == FailOn::None {
        // libjpeg's own recovery: a missing end is faked, missing rows come out grey.
        return lenient();
    }
    if !jpeg_has_eoi(bytes) {
        return Err(Error::Truncated {
            format: "jpeg",
            detail: "no end-of-image marker: the data stops before the image does".into(),
        });
    }
    let handed = Cell::new(0);
    let strict = guarded(|| {
        let run = || {
            let reader = Pieces { bytes, pos: 0, handed: &handed };
            let d = mozjpeg::Decompress::with_err(strict_error_mgr()).with_markers(JPEG_MARKERS).from_reader(reader);
            jpeg_pixels(d, bytes.len(), opts)
        };
        match catch_unwind(AssertUnwindSafe(run)) {
            Ok(r) => r.map(Ok),
            Err(payload) => match payload.downcast::<Stop>() {
                Ok(stop) => Ok(Err(*stop)),
                Err(other) => resume_unwind(other),
            },
        }
    })?;
    let hint = "decode with fail_on=none to accept a partial image";
    match strict {
        Ok(decoded) => Ok(decoded),
        // libjpeg had been handed the last bytes: it ran into the end marker (or the end of the
        // input) while it still needed entropy-coded data.
        Err(Stop::Warning) if handed.get() >= bytes.len() => Err(Error::Truncated {
            format: "jpeg",
            detail: format!("premature end of data: the image data stops before the image does ({hint})"),
        }),
        Err(Stop::Warning) if opts.fail_on == FailOn::Warning => Err(Error::Corrupt {
            format: "jpeg",
            detail: format!(
                "libjpeg reported damaged data about byte {} of {} ({hint}, or fail_on=truncated to accept damage other than truncation)",
                handed.get(),
                bytes.len()
            ),
        }),
        // Damage `fail_on=truncated` accepts: libjpeg's own recovery.
        Err(Stop::Warning) => lenient(),
        // The strict error manager cannot format libjpeg's message (that needs `unsafe`): the
        // default one, which can, stops at the same error, since no warning came before it.
        Err(Stop::Fatal) => match lenient() {
            Err(e) => Err(e),
            Ok(_) => Err(Error::Corrupt { format: "jpeg", detail: "libjpeg fatal error".into() }),
        },
    }
}

/// Decodes pixels from an opened JPEG under `opts` (`len`: the input's size in bytes).
fn jpeg_pixels<R: BufRead>(
    d: std::io::Result<mozjpeg::Decompress<R>>,
    len: usize,
    opts: &DecodeOptions<'_>,
) -> Result<Decoded> {
    let mut d = d.map_err(|e| Error::Corrupt { format: "jpeg", detail: e.to_string() })?;
    let (w, h) = d.size();
    let (w, h) = (w as u32, h as u32);
    opts.limits.check_source(w, h)?;
    if opts.fail_on != FailOn::None {
        check_plausible_size(Format::Jpeg, w, h, len)?;
    }
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
}

/// Why a strict libjpeg run unwound: the payload its error manager unwinds with.
#[derive(Debug, Clone, Copy)]
enum Stop {
    Warning,
    Fatal,
}

extern "C-unwind" fn stop_on_fatal(_: &mut mozjpeg_sys::jpeg_common_struct) {
    resume_unwind(Box::new(Stop::Fatal));
}

/// libjpeg calls this for warnings (level -1) and trace messages (level >= 0).
extern "C-unwind" fn stop_on_warning(_: &mut mozjpeg_sys::jpeg_common_struct, level: c_int) {
    if level < 0 {
        resume_unwind(Box::new(Stop::Warning));
    }
}

extern "C-unwind" fn no_output(_: &mut mozjpeg_sys::jpeg_common_struct) {}

extern "C-unwind" fn no_format(_: &mut mozjpeg_sys::jpeg_common_struct, _: &[u8; 80]) {}

/// An error manager that unwinds on warnings as well as on fatal errors. Safe code cannot read
/// the message code through `cinfo.err`, so the payload says only which of the two it was;
/// where in the input it happened comes from [`Pieces`].
fn strict_error_mgr() -> mozjpeg_sys::jpeg_error_mgr {
    mozjpeg_sys::jpeg_error_mgr {
        error_exit: Some(stop_on_fatal),
        emit_message: Some(stop_on_warning),
        output_message: Some(no_output),
        format_message: Some(no_format),
        reset_error_mgr: Some(no_output),
        msg_code: 0,
        msg_parm: mozjpeg_sys::msg_parm_union::default(),
        trace_level: 0,
        num_warnings: 0,
        jpeg_message_table: std::ptr::null(),
        last_jpeg_message: 0,
        addon_message_table: std::ptr::null(),
        first_addon_message: 0,
        last_addon_message: 0,
    }
}

/// Hands libjpeg the input in small pieces and records how far it has been given, so a warning
/// can be placed: one raised once the last piece is out is about data that ends too early.
struct Pieces<'a> {
    bytes: &'a [u8],
    pos: usize,
    handed: &'a Cell<usize>,
}

/// Small enough to place a warning near the end, large enough to cost nothing per refill.
const PIECE: usize = 512;

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = {
            let piece = self.fill_buf()?;
            let n = piece.len().min(buf.len());
            buf[..n].copy_from_slice(&piece[..n]);
            n
        };
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Pieces<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        let end = (self.pos + PIECE).min(self.bytes.len());
        self.handed.set(self.handed.get().max(end));
        Ok(&self.bytes[self.pos..end])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.bytes.len());
    }
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

    /// A 2x1 lossless WebP whose EXIF says "rotate 90" (orientation 6).
    fn webp_with_exif() -> Vec<u8> {
        let exif = [
            b"II*\0".as_slice(),
            &8u32.to_le_bytes(),
            &1u16.to_le_bytes(),
            &0x0112u16.to_le_bytes(),
            &3u16.to_le_bytes(),
            &1u32.to_le_bytes(),
            &6u32.to_le_bytes(),
            &0u32.to_le_bytes(),
        ]
        .concat();
        let mut out = Vec::new();
        let mut encoder = image_webp::WebPEncoder::new(&mut out);
        encoder.set_exif_metadata(exif);
        encoder.encode(&[255, 0, 0, 0, 0, 255], 2, 1, image_webp::ColorType::Rgb8).unwrap();
        out
    }

    #[test]
    fn a_webp_metadata_chunk_that_claims_more_than_the_file_is_not_read() {
        let good = webp_with_exif();
        assert!(webp_chunks_fit(&good));
        let header = read_header(&good, &Limits::default()).unwrap();
        assert_eq!((header.width, header.height, header.orientation), (2, 1, Orientation::Rotate90));

        // The EXIF chunk claims 4 GiB less a little: its buffer would be allocated before the
        // read found the file short.
        let at = good.windows(4).position(|w| w == b"EXIF").expect("an EXIF chunk");
        let mut damaged = good.clone();
        damaged[at + 4..at + 8].copy_from_slice(&0xF000_0000u32.to_le_bytes());
        assert!(!webp_chunks_fit(&damaged));
        let header = read_header(&damaged, &Limits::default()).unwrap();
        assert_eq!((header.width, header.orientation, header.icc), (2, Orientation::Normal, None));
        // The last chunk ends exactly at the end of the file; one byte less and it overruns.
        // Cut anywhere, the check answers without panicking.
        assert!(!webp_chunks_fit(&good[..good.len() - 1]));
        for cut in 0..good.len() {
            let _ = webp_chunks_fit(&good[..cut]);
        }
        let mut huge = good.clone();
        huge[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(!webp_chunks_fit(&huge));
    }

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

    /// A JPEG from mozjpeg (quality 90, 4:2:0) of a busy pattern, so its scan is long.
    fn busy_jpeg(w: u32, h: u32) -> Vec<u8> {
        let im = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([((x * 7) ^ (y * 3)) as u8, (x * y) as u8, (x + y * 5) as u8])
        });
        crate::encode::encode(
            &DynamicImage::ImageRgb8(im),
            crate::OutFormat::Jpeg,
            &crate::EncodeOptions::default(),
            None,
        )
        .unwrap()
    }

    fn with_fail_on(fail_on: FailOn) -> DecodeOptions<'static> {
        DecodeOptions { fail_on, ..DecodeOptions::default() }
    }

    /// The first half of a JPEG with an end-of-image marker appended: libjpeg alone returns
    /// the whole size with grey rows.
    fn cut_with_eoi(jpeg: &[u8]) -> Vec<u8> {
        let mut cut = jpeg[..jpeg.len() / 2].to_vec();
        cut.extend_from_slice(&[0xFF, 0xD9]);
        cut
    }

    #[test]
    fn truncated_jpeg_with_an_end_marker_is_refused_unless_fail_on_none() {
        let cut = cut_with_eoi(&busy_jpeg(256, 256));
        for fail_on in [FailOn::Warning, FailOn::Truncated] {
            let err = decode(&cut, &with_fail_on(fail_on)).unwrap_err();
            assert_eq!(err.code(), "truncated_input", "{fail_on:?}: {err}");
            assert!(err.to_string().contains("fail_on=none"), "{err}");
        }
        // Shrink-on-load still reads every scan, so it sees the cut too.
        let small = DecodeOptions { min_size: Some((32, 32)), ..DecodeOptions::default() };
        assert_eq!(decode(&cut, &small).unwrap_err().code(), "truncated_input");
        let partial = decode(&cut, &with_fail_on(FailOn::None)).unwrap();
        assert_eq!((partial.image.width(), partial.image.height()), (256, 256));
        // Without any end marker, `none` accepts what libjpeg recovers as well.
        let bare = &cut[..cut.len() - 2];
        assert_eq!(decode(bare, &DecodeOptions::default()).unwrap_err().code(), "truncated_input");
        assert!(decode(bare, &with_fail_on(FailOn::None)).is_ok());
    }

    #[test]
    fn damage_inside_the_data_is_corrupt_and_fail_on_truncated_accepts_it() {
        let whole = busy_jpeg(512, 512);
        // A restart marker in the middle of a scan that has no restart interval.
        let mid = whole.len() / 3;
        let mut damaged = whole[..mid].to_vec();
        damaged.extend_from_slice(&[0xFF, 0xD0]);
        damaged.extend_from_slice(&whole[mid..]);
        let err = decode(&damaged, &DecodeOptions::default()).unwrap_err();
        assert_eq!(err.code(), "corrupt_input", "{err}");
        assert_eq!(decode(&damaged, &with_fail_on(FailOn::Truncated)).unwrap().image.width(), 512);
        assert_eq!(decode(&damaged, &with_fail_on(FailOn::None)).unwrap().image.width(), 512);
    }

    /// Patches the first start-of-frame marker's height and width.
    fn patch_sof(jpeg: &mut [u8], w: u16, h: u16) {
        let at = jpeg.windows(2).position(|m| m[0] == 0xFF && matches!(m[1], 0xC0..=0xC2)).unwrap();
        jpeg[at + 5..at + 7].copy_from_slice(&h.to_be_bytes());
        jpeg[at + 7..at + 9].copy_from_slice(&w.to_be_bytes());
    }

    #[test]
    fn small_jpeg_declaring_a_huge_size_is_refused_before_decoding() {
        let im = image::RgbImage::from_pixel(16, 16, image::Rgb([128, 128, 128]));
        let mut bomb = crate::encode::encode(
            &DynamicImage::ImageRgb8(im),
            crate::OutFormat::Jpeg,
            &crate::EncodeOptions::default(),
            None,
        )
        .unwrap();
        patch_sof(&mut bomb, 10_000, 10_000);
        assert!(bomb.len() < 1024, "{}", bomb.len());
        assert_eq!(read_header(&bomb, &Limits::default()).unwrap().width, 10_000);
        let err = decode(&bomb, &DecodeOptions::default()).unwrap_err();
        assert_eq!(err.code(), "truncated_input");
        assert!(err.to_string().contains("declares 10000x10000 (100000000 pixels)"), "{err}");
        // The pipeline refuses it too, also when it plans a shrink-on-load from the header.
        let p = crate::Pipeline::from_steps([("resize", [("width", "100")])]).unwrap();
        assert_eq!(p.run(&bomb, &crate::RunOptions::default()).unwrap_err().code(), "truncated_input");
    }

    #[test]
    fn fatal_errors_keep_libjpeg_messages() {
        let mut jpeg = busy_jpeg(64, 64);
        let at = jpeg.windows(2).position(|m| m == [0xFF, 0xC0] || m == [0xFF, 0xC2]).unwrap();
        jpeg[at + 1] = 0xC3; // lossless: not supported by this libjpeg
        let err = decode(&jpeg, &DecodeOptions::default()).unwrap_err();
        assert_eq!(err.code(), "corrupt_input");
        assert!(err.to_string().contains("Unsupported JPEG process"), "{err}");
    }

    #[test]
    fn whole_jpegs_decode_under_the_strict_default() {
        let whole = busy_jpeg(300, 200);
        let strict = decode(&whole, &DecodeOptions::default()).unwrap();
        let lenient = decode(&whole, &with_fail_on(FailOn::None)).unwrap();
        assert_eq!((strict.image.width(), strict.image.height()), (300, 200));
        assert_eq!(strict.image.as_bytes(), lenient.image.as_bytes());
        // Bytes after the end marker (an MPF secondary image, padding) are never read.
        let mut trailing = whole.clone();
        trailing.extend_from_slice(&[0u8; 700]);
        assert!(decode(&trailing, &DecodeOptions::default()).is_ok());
    }

    /// Measures the densest JPEG mozjpeg makes (flat colour, quality 1), for the bound in
    /// `limits::max_pixels_per_byte`.
    #[test]
    fn flat_jpeg_stays_far_below_the_bound() {
        for (w, h) in [(1024u32, 1024u32), (4096, 4096)] {
            let im = image::RgbImage::from_pixel(w, h, image::Rgb([200, 200, 200]));
            let q1 = crate::EncodeOptions::parse([("quality", "1")]).unwrap();
            let jpeg = crate::encode::encode(&DynamicImage::ImageRgb8(im), crate::OutFormat::Jpeg, &q1, None).unwrap();
            let per_byte = u64::from(w) * u64::from(h) / jpeg.len() as u64;
            eprintln!("flat {w}x{h} q1: {} bytes, {per_byte} px/byte", jpeg.len());
            assert!(per_byte * 2 <= 1024, "{per_byte} px/byte");
            assert!(decode(&jpeg, &DecodeOptions::default()).is_ok());
        }
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    #[test]
    fn png_cut_short_or_declaring_a_huge_size_is_refused() {
        let im = image::RgbImage::from_fn(128, 128, |x, y| image::Rgb([(x * 3) as u8, (y * 5) as u8, (x ^ y) as u8]));
        let mut png = Vec::new();
        DynamicImage::ImageRgb8(im).write_to(&mut Cursor::new(&mut png), ImageFormat::Png).unwrap();
        // image-rs already refuses a cut IDAT.
        let err = decode(&png[..png.len() / 2], &DecodeOptions::default()).unwrap_err();
        assert!(matches!(err.code(), "truncated_input" | "corrupt_input"), "{err}");
        let flat = image::GrayImage::from_pixel(2000, 2000, image::Luma([9]));
        let mut flat_png = Vec::new();
        DynamicImage::ImageLuma8(flat).write_to(&mut Cursor::new(&mut flat_png), ImageFormat::Png).unwrap();
        assert!(decode(&flat_png, &DecodeOptions::default()).is_ok());
        // IHDR's width and height, with its CRC made to match.
        let mut bomb = png[..png.len() / 4].to_vec();
        bomb[16..20].copy_from_slice(&20_000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&5_000u32.to_be_bytes());
        let crc = crc32(&bomb[12..29]);
        bomb[29..33].copy_from_slice(&crc.to_be_bytes());
        let err = decode(&bomb, &DecodeOptions::default()).unwrap_err();
        assert!(err.to_string().contains("declares 20000x5000"), "{err}");
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
