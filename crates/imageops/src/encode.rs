//! Encoding a raster to JPEG (mozjpeg), PNG (png + optional oxipng and palette quantisation),
//! WebP (libwebp), AVIF (rav1e via `image`) and GIF, plus the `max_bytes` size target.
//! Metadata policy: EXIF/XMP are never written (no GPS leaks, no stale orientation); the ICC
//! profile is kept unless `icc=strip` (JPEG and PNG carry it), or the pixels are converted to
//! sRGB with `icc=srgb`.

use std::io::Cursor;

use image::DynamicImage;
use serde::Serialize;

use crate::color::Color;
use crate::decode::guarded;
use crate::error::{Error, Result};
use crate::format::Format;
use crate::params::{Args, OpSpec, boolean, choice, color, int};
use crate::raster;

pub static SPEC: OpSpec = OpSpec {
    name: "convert",
    doc: "Output encoding; applies to every output of the pipeline (the CLI's --format/--quality override it).",
    params: &[
        choice(
            "format",
            &["jpeg", "jpg", "png", "webp", "avif", "gif", "svg"],
            None,
            "Output format (default: from the output name, else the input's); svg only for a lone `qrcode` step.",
        ),
        int(
            "quality",
            1,
            100,
            None,
            "Lossy quality (defaults: JPEG 80, WebP 80, AVIF 50; AVIF is calibrated to libavif's scale).",
        ),
        boolean("progressive", "false", "JPEG: progressive scans."),
        choice("chroma", &["420", "422", "444"], Some("420"), "JPEG chroma subsampling."),
        choice(
            "jpeg_mode",
            &["fast", "balanced", "smallest"],
            Some("fast"),
            "JPEG encoder effort: fast (standard Huffman tables, the libjpeg/libvips/Pillow default), balanced (optimised Huffman tables as sharp does: ~4% smaller, ~2.5x encode time), smallest (mozjpeg trellis quantisation: ~15% smaller again, slower, slightly lower SSIM at equal quality).",
        ),
        int("compression", 0, 9, Some("6"), "PNG effort; 7-9 also run oxipng."),
        boolean("palette", "false", "PNG: quantise to a palette (lossy, much smaller)."),
        int("colors", 2, 256, Some("256"), "Palette size for palette=true and GIF."),
        boolean("lossless", "false", "WebP: lossless."),
        int("speed", 1, 10, Some("9"), "AVIF encoder (rav1e) speed: 1 slowest/smallest, 10 fastest."),
        int(
            "max_bytes",
            64,
            1_073_741_824,
            None,
            "Largest acceptable output; lossy formats lower quality to fit, others fail.",
        ),
        choice(
            "icc",
            &["keep", "strip", "srgb"],
            Some("keep"),
            "Embedded colour profile: keep it (JPEG/PNG), drop it, or convert the pixels to sRGB and drop it.",
        ),
        color("background", Some("white"), "Colour that transparent areas become in formats without alpha (JPEG)."),
    ],
};

/// Output formats the engine writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutFormat {
    Jpeg,
    Png,
    Webp,
    Avif,
    Gif,
    /// Only from a vector source with nothing after it (a `qrcode` step); see the pipeline.
    Svg,
}

impl OutFormat {
    pub fn from_name(s: &str) -> Option<OutFormat> {
        Some(match s.to_ascii_lowercase().as_str() {
            "jpeg" | "jpg" => OutFormat::Jpeg,
            "png" => OutFormat::Png,
            "webp" => OutFormat::Webp,
            "avif" => OutFormat::Avif,
            "gif" => OutFormat::Gif,
            "svg" => OutFormat::Svg,
            _ => return None,
        })
    }

    /// The format an output of this source format defaults to.
    pub fn for_source(f: Format) -> OutFormat {
        match f {
            Format::Jpeg => OutFormat::Jpeg,
            Format::Webp => OutFormat::Webp,
            Format::Gif => OutFormat::Gif,
            Format::Avif => OutFormat::Avif,
            _ => OutFormat::Png,
        }
    }

    pub fn mime(self) -> &'static str {
        match self {
            OutFormat::Jpeg => "image/jpeg",
            OutFormat::Png => "image/png",
            OutFormat::Webp => "image/webp",
            OutFormat::Avif => "image/avif",
            OutFormat::Gif => "image/gif",
            OutFormat::Svg => "image/svg+xml",
        }
    }

    /// The format a media type names (`image/jpeg; q=1` → JPEG), if it is an output format.
    pub fn from_mime(content_type: &str) -> Option<OutFormat> {
        let mime = content_type.split(';').next().unwrap_or_default().trim();
        [OutFormat::Jpeg, OutFormat::Png, OutFormat::Webp, OutFormat::Avif, OutFormat::Gif, OutFormat::Svg]
            .into_iter()
            .find(|f| f.mime().eq_ignore_ascii_case(mime))
    }

    pub fn extension(self) -> &'static str {
        match self {
            OutFormat::Jpeg => "jpg",
            OutFormat::Png => "png",
            OutFormat::Webp => "webp",
            OutFormat::Avif => "avif",
            OutFormat::Gif => "gif",
            OutFormat::Svg => "svg",
        }
    }

    fn name(self) -> &'static str {
        match self {
            OutFormat::Jpeg => "jpeg",
            other => other.extension(),
        }
    }
}

/// What happens to the source's ICC profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IccPolicy {
    Keep,
    Strip,
    /// Convert pixels to sRGB, then write no profile.
    Srgb,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JpegMode {
    Fast,
    Balanced,
    Smallest,
}

/// Encoding options as the user wrote them; unset fields fall back to per-format defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EncodeOptions {
    pub format: Option<OutFormat>,
    pub quality: Option<u8>,
    pub progressive: Option<bool>,
    pub chroma: Option<(u8, u8)>,
    pub jpeg_mode: Option<JpegMode>,
    pub compression: Option<u8>,
    pub palette: Option<bool>,
    pub colors: Option<u16>,
    pub lossless: Option<bool>,
    pub speed: Option<u8>,
    pub max_bytes: Option<u64>,
    pub icc: Option<IccPolicy>,
    pub background: Option<Color>,
}

impl EncodeOptions {
    /// Parses only the keys actually given, so later settings can be layered over earlier ones.
    pub fn from_args(a: &Args) -> Result<Self> {
        let given = |n: &str| a.given(n);
        Ok(EncodeOptions {
            format: a.choice("format").filter(|_| given("format")).and_then(OutFormat::from_name),
            quality: a.u32("quality").map(|q| q as u8),
            progressive: given("progressive").then(|| a.boolean("progressive")),
            chroma: a.choice("chroma").filter(|_| given("chroma")).map(|c| match c {
                "444" => (1, 1),
                "422" => (2, 1),
                _ => (2, 2),
            }),
            jpeg_mode: a.choice("jpeg_mode").filter(|_| given("jpeg_mode")).map(|m| match m {
                "fast" => JpegMode::Fast,
                "smallest" => JpegMode::Smallest,
                _ => JpegMode::Balanced,
            }),
            compression: a.u32("compression").filter(|_| given("compression")).map(|c| c as u8),
            palette: given("palette").then(|| a.boolean("palette")),
            colors: a.u32("colors").filter(|_| given("colors")).map(|c| c as u16),
            lossless: given("lossless").then(|| a.boolean("lossless")),
            speed: a.u32("speed").filter(|_| given("speed")).map(|s| s as u8),
            max_bytes: a.int("max_bytes").map(|b| b as u64),
            icc: a.choice("icc").filter(|_| given("icc")).map(|v| match v {
                "strip" => IccPolicy::Strip,
                "srgb" => IccPolicy::Srgb,
                _ => IccPolicy::Keep,
            }),
            background: a.color("background").filter(|_| given("background")),
        })
    }

    pub fn parse<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self> {
        Self::from_args(&Args::parse(&SPEC, pairs)?)
    }

    /// `self` with every field that `over` sets replaced.
    pub fn overlay(&self, over: &EncodeOptions) -> EncodeOptions {
        macro_rules! pick {
            ($($f:ident),*) => { EncodeOptions { $($f: over.$f.or(self.$f)),* } };
        }
        pick!(
            format,
            quality,
            progressive,
            chroma,
            jpeg_mode,
            compression,
            palette,
            colors,
            lossless,
            speed,
            max_bytes,
            icc,
            background
        )
    }

    fn default_quality(&self, f: OutFormat) -> u8 {
        self.quality.unwrap_or(match f {
            OutFormat::Avif => 50,
            _ => 80,
        })
    }
}

/// Encodes `img` as `format`. `icc` is the source profile, embedded unless stripped.
pub fn encode(img: &DynamicImage, format: OutFormat, opts: &EncodeOptions, icc: Option<&[u8]>) -> Result<Vec<u8>> {
    let converted;
    let (img, icc) = match (opts.icc.unwrap_or(IccPolicy::Keep), icc) {
        (IccPolicy::Keep, icc) => (img, icc),
        (IccPolicy::Strip, _) | (IccPolicy::Srgb, None) => (img, None),
        (IccPolicy::Srgb, Some(profile)) => {
            let mut copy = img.clone();
            crate::icc::to_srgb(&mut copy, profile)?;
            converted = copy;
            (&converted, None)
        }
    };
    let quality = opts.default_quality(format);
    let Some(max) = opts.max_bytes else {
        return encode_once(img, format, opts, quality, icc);
    };
    let lossy = match format {
        OutFormat::Jpeg | OutFormat::Avif => true,
        OutFormat::Webp => opts.lossless != Some(true),
        OutFormat::Png | OutFormat::Gif | OutFormat::Svg => false,
    };
    let first = encode_once(img, format, opts, quality, icc)?;
    if first.len() as u64 <= max {
        return Ok(first);
    }
    if !lossy {
        return Err(Error::Encode {
            format: format.name(),
            detail: format!(
                "lossless output is {} bytes, over max_bytes {max}; use a lossy format or resize",
                first.len()
            ),
        });
    }
    // Binary search for the highest quality that fits; quality is monotone in size in practice.
    let (mut lo, mut hi) = (1u8, quality - 1);
    let mut best: Option<Vec<u8>> = None;
    while lo <= hi {
        let q = lo + (hi - lo) / 2;
        let out = encode_once(img, format, opts, q, icc)?;
        if out.len() as u64 <= max {
            best = Some(out);
            lo = q + 1;
        } else if q == 1 {
            break;
        } else {
            hi = q - 1;
        }
    }
    best.ok_or_else(|| Error::Encode {
        format: format.name(),
        detail: format!("cannot fit in max_bytes {max} even at quality 1; resize first"),
    })
}

fn encode_once(
    img: &DynamicImage,
    format: OutFormat,
    opts: &EncodeOptions,
    quality: u8,
    icc: Option<&[u8]>,
) -> Result<Vec<u8>> {
    let bg = opts.background.unwrap_or(Color::WHITE);
    match format {
        OutFormat::Jpeg => {
            if raster::channels(img) == 4 {
                encode_jpeg(&raster::flatten(img, bg), opts, quality, icc)
            } else {
                encode_jpeg(img, opts, quality, icc)
            }
        }
        OutFormat::Png => encode_png(img, opts, icc),
        OutFormat::Webp => encode_webp(img, opts, quality),
        OutFormat::Svg => Err(svg_needs_vector()),
        #[cfg(not(feature = "avif"))]
        OutFormat::Avif => {
            Err(Error::Unsupported { format: "avif".into(), hint: Some("built without the `avif` feature".into()) })
        }
        #[cfg(feature = "avif")]
        OutFormat::Avif => {
            let mut out = Vec::new();
            let speed = opts.speed.unwrap_or(9);
            let enc = image::codecs::avif::AvifEncoder::new_with_speed_quality(&mut out, speed, avif_quality(quality));
            img.write_with_encoder(enc).map_err(|e| Error::Encode { format: "avif", detail: e.to_string() })?;
            Ok(out)
        }
        OutFormat::Gif => {
            let mut out = Vec::new();
            {
                let mut enc = image::codecs::gif::GifEncoder::new_with_speed(&mut out, 10);
                let frame = image::Frame::new(img.to_rgba8());
                enc.encode_frame(frame).map_err(|e| Error::Encode { format: "gif", detail: e.to_string() })?;
            }
            Ok(out)
        }
    }
}

/// Why a raster cannot be written as SVG.
pub(crate) fn svg_needs_vector() -> Error {
    Error::Unsupported {
        format: "svg output".into(),
        hint: Some("SVG is written only for a vector source with nothing after it (a lone `qrcode` step)".into()),
    }
}

/// Maps our AVIF quality to rav1e's scale. rav1e's numbers run lower than libavif's: at 50 it
/// scores SSIM 0.969 on the benchmark photo where libavif (Pillow, sharp) scores 0.976; +17
/// lines the two scales up there, so `quality=50` means what users of those tools expect.
#[cfg(feature = "avif")]
fn avif_quality(q: u8) -> u8 {
    q.saturating_add(17).min(100)
}

fn encode_jpeg(img: &DynamicImage, opts: &EncodeOptions, quality: u8, icc: Option<&[u8]>) -> Result<Vec<u8>> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let px = img.as_bytes();
    let mode = opts.jpeg_mode.unwrap_or(JpegMode::Fast);
    guarded(|| {
        let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
        if mode != JpegMode::Smallest {
            c.set_fastest_defaults();
        }
        c.set_size(w, h);
        c.set_quality(f32::from(quality));
        let (cx, cy) = opts.chroma.unwrap_or((2, 2));
        c.set_chroma_sampling_pixel_sizes((cx, cy), (cx, cy));
        match mode {
            JpegMode::Fast => c.set_optimize_coding(false),
            JpegMode::Balanced | JpegMode::Smallest => c.set_optimize_coding(true),
        }
        if opts.progressive == Some(true) {
            c.set_progressive_mode();
        }
        let mut started = c
            .start_compress(Vec::with_capacity(w * h / 4))
            .map_err(|e| Error::Encode { format: "jpeg", detail: e.to_string() })?;
        if let Some(icc) = icc {
            started.write_icc_profile(icc);
        }
        started.write_scanlines(px).map_err(|e| Error::Encode { format: "jpeg", detail: e.to_string() })?;
        started.finish().map_err(|e| Error::Encode { format: "jpeg", detail: e.to_string() })
    })
}

fn encode_png(img: &DynamicImage, opts: &EncodeOptions, icc: Option<&[u8]>) -> Result<Vec<u8>> {
    let fail = |e: &dyn std::fmt::Display| Error::Encode { format: "png", detail: e.to_string() };
    let level = opts.compression.unwrap_or(6);
    // Opaque RGBA is written as RGB (a quarter fewer bytes to compress), without copying otherwise.
    let rgb;
    let img = if raster::channels(img) == 4 && raster::is_opaque(img) {
        rgb = raster::ensure_channels(img, 3);
        &rgb
    } else {
        img
    };
    let mut out = Vec::new();
    if opts.palette == Some(true) {
        write_indexed_png(&mut out, img, opts.colors.unwrap_or(256), level).map_err(|e| fail(&e))?;
    } else {
        let ct = match level {
            0..=3 => image::codecs::png::CompressionType::Fast,
            4..=6 => image::codecs::png::CompressionType::Default,
            _ => image::codecs::png::CompressionType::Best,
        };
        let mut enc = image::codecs::png::PngEncoder::new_with_quality(
            Cursor::new(&mut out),
            ct,
            image::codecs::png::FilterType::Adaptive,
        );
        if let Some(icc) = icc {
            use image::ImageEncoder as _;
            // A malformed source profile is dropped rather than failing the whole request.
            let _ = enc.set_icc_profile(icc.to_vec());
        }
        img.write_with_encoder(enc).map_err(|e| fail(&e))?;
    }
    if level >= 7 {
        let preset = (level - 6).min(3);
        out = oxipng::optimize_from_memory(&out, &oxipng::Options::from_preset(preset)).map_err(|e| fail(&e))?;
    }
    Ok(out)
}

/// NeuQuant palette + an indexed PNG with a tRNS chunk when the palette has transparency.
fn write_indexed_png(
    out: &mut Vec<u8>,
    img: &DynamicImage,
    colors: u16,
    level: u8,
) -> std::result::Result<(), png::EncodingError> {
    let rgba = img.to_rgba8();
    let nq = color_quant::NeuQuant::new(10, usize::from(colors), rgba.as_raw());
    let map = nq.color_map_rgba();
    let indices: Vec<u8> = rgba.as_raw().chunks_exact(4).map(|p| nq.index_of(p) as u8).collect();
    let mut enc = png::Encoder::new(out, img.width(), img.height());
    enc.set_color(png::ColorType::Indexed);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(if level <= 3 { png::Compression::Fast } else { png::Compression::High });
    let palette: Vec<u8> = map.chunks_exact(4).flat_map(|c| [c[0], c[1], c[2]]).collect();
    let trns: Vec<u8> = map.chunks_exact(4).map(|c| c[3]).collect();
    enc.set_palette(palette);
    if trns.iter().any(|&a| a != 255) {
        enc.set_trns(trns);
    }
    let mut w = enc.write_header()?;
    w.write_image_data(&indices)?;
    w.finish()
}

fn encode_webp(img: &DynamicImage, opts: &EncodeOptions, quality: u8) -> Result<Vec<u8>> {
    let (w, h) = (img.width(), img.height());
    let enc = if raster::channels(img) == 4 {
        webp::Encoder::from_rgba(img.as_bytes(), w, h)
    } else {
        webp::Encoder::from_rgb(img.as_bytes(), w, h)
    };
    let mem = if opts.lossless == Some(true) {
        enc.encode_simple(true, 100.0)
    } else {
        enc.encode_simple(false, f32::from(quality))
    };
    mem.map(|m| m.to_vec()).map_err(|e| Error::Encode { format: "webp", detail: format!("{e:?}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32, alpha: bool) -> DynamicImage {
        let mut im = image::RgbaImage::new(w, h);
        for (x, y, p) in im.enumerate_pixels_mut() {
            *p = image::Rgba([
                (x * 255 / w) as u8,
                (y * 255 / h) as u8,
                ((x + y) % 256) as u8,
                if alpha { (x % 256) as u8 } else { 255 },
            ]);
        }
        if alpha {
            DynamicImage::ImageRgba8(im)
        } else {
            DynamicImage::ImageRgb8(DynamicImage::ImageRgba8(im).to_rgb8())
        }
    }

    fn decode(bytes: &[u8]) -> DynamicImage {
        image::load_from_memory(bytes).unwrap()
    }

    #[test]
    fn every_format_round_trips_dimensions() {
        let img = gradient(64, 48, false);
        for f in [OutFormat::Jpeg, OutFormat::Png, OutFormat::Webp, OutFormat::Gif, OutFormat::Avif] {
            let opts = EncodeOptions { speed: Some(10), ..Default::default() };
            let bytes = encode(&img, f, &opts, None).unwrap();
            assert_eq!(crate::format::sniff(&bytes).map(OutFormat::for_source), Some(f), "{f:?}");
            if f != OutFormat::Avif {
                let back = decode(&bytes);
                assert_eq!((back.width(), back.height()), (64, 48), "{f:?}");
            }
        }
    }

    #[test]
    fn quality_changes_size_and_max_bytes_is_met() {
        let img = gradient(256, 256, false);
        let q90 =
            encode(&img, OutFormat::Jpeg, &EncodeOptions { quality: Some(90), ..Default::default() }, None).unwrap();
        let q30 =
            encode(&img, OutFormat::Jpeg, &EncodeOptions { quality: Some(30), ..Default::default() }, None).unwrap();
        assert!(q30.len() < q90.len());
        let target = (q30.len() + q90.len()) as u64 / 2;
        let fit = encode(
            &img,
            OutFormat::Jpeg,
            &EncodeOptions { quality: Some(90), max_bytes: Some(target), ..Default::default() },
            None,
        )
        .unwrap();
        assert!(fit.len() as u64 <= target && fit.len() > q30.len());
        let err = encode(&img, OutFormat::Png, &EncodeOptions { max_bytes: Some(100), ..Default::default() }, None)
            .unwrap_err();
        assert_eq!(err.code(), "encode_failed");
    }

    #[test]
    fn jpeg_flattens_alpha_and_embeds_icc() {
        let img = gradient(32, 32, true);
        let icc = vec![7u8; 300];
        let bytes = encode(&img, OutFormat::Jpeg, &EncodeOptions::default(), Some(&icc)).unwrap();
        let header = crate::decode::read_header(&bytes, &crate::Limits::default()).unwrap();
        assert_eq!(header.icc.as_deref(), Some(&icc[..]));
        let stripped = encode(
            &img,
            OutFormat::Jpeg,
            &EncodeOptions { icc: Some(IccPolicy::Strip), ..Default::default() },
            Some(&icc),
        )
        .unwrap();
        assert!(crate::decode::read_header(&stripped, &crate::Limits::default()).unwrap().icc.is_none());
    }

    #[test]
    fn palette_png_keeps_transparency() {
        let img = gradient(40, 40, true);
        let bytes = encode(
            &img,
            OutFormat::Png,
            &EncodeOptions { palette: Some(true), colors: Some(16), ..Default::default() },
            None,
        )
        .unwrap();
        let back = decode(&bytes).to_rgba8();
        assert!(back.get_pixel(0, 0)[3] < 40);
        assert!(back.get_pixel(39, 0)[3] > 10);
    }

    #[test]
    fn media_types_name_output_formats() {
        assert_eq!(OutFormat::from_mime("image/webp"), Some(OutFormat::Webp));
        assert_eq!(OutFormat::from_mime("IMAGE/JPEG; charset=binary"), Some(OutFormat::Jpeg));
        assert_eq!(OutFormat::from_mime("image/svg+xml"), Some(OutFormat::Svg));
        assert_eq!(OutFormat::from_mime("image/tiff"), None);
        assert_eq!(OutFormat::from_mime(""), None);
    }

    #[test]
    fn options_layer() {
        let base = EncodeOptions::parse([("quality", "70"), ("format", "webp")]).unwrap();
        let over = EncodeOptions::parse([("quality", "50")]).unwrap();
        let merged = base.overlay(&over);
        assert_eq!((merged.quality, merged.format), (Some(50), Some(OutFormat::Webp)));
    }
}
