//! A pipeline: one decode, a chain of operations, and one or more encoded outputs
//! (renditions). An `output` step snapshots the current raster, so
//! `resize width=1600 + output name=l.jpg + resize width=400 + output name=s.webp` makes two
//! renditions from one decode, each resampled from the previous (cheap cascades).
//!
//! The pipeline also plans the decode: when the first step is a `resize`, a JPEG source is
//! decoded at the smallest DCT scale that keeps 1.5x the needed resolution (shrink-on-load).

use std::collections::BTreeMap;
use std::time::Instant;

use crate::decode::{self, DecodeOptions, FailOn, ForeignDecoder};
use crate::encode::{self, EncodeOptions, OutFormat};
use crate::error::{Error, Result};
use crate::format::Format;
use crate::limits::Limits;
use crate::ops::{InputKind, Op};
use crate::params::{Args, OpSpec, choice, text};
use crate::sequence::{self, Cue, FramePos, Frames, Select, Sprite, Still};

pub static OUTPUT: OpSpec = OpSpec {
    name: "output",
    doc: "Emit a rendition of the current image (name, plus any `convert` parameter); later steps continue from the same image.",
    params: &[text(
        "name",
        1024,
        None,
        "Rendition name (the CLI treats it as a file path; the format follows its extension).",
    )],
};

pub static DECODE: OpSpec = OpSpec {
    name: "decode",
    doc: "How to read the source image; only as the first step.",
    params: &[choice(
        "fail_on",
        FailOn::NAMES,
        Some("warning"),
        "Which damage refuses the source: `warning` any decoder warning (corrupt or truncated data), `truncated` only data that ends before the image does (or a header declaring more pixels than the bytes can hold), `none` nothing recoverable (missing parts come out grey).",
    )],
};

/// One step of a pipeline.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Op(Op),
    /// Encoding settings for every output from here on.
    Convert(EncodeOptions),
    Output {
        name: String,
        encode: EncodeOptions,
    },
    /// Pick frames as stills (see [`crate::sequence`]).
    Frames(Frames),
    /// Tile the frames into one sheet.
    Sprite(Sprite),
}

/// A validated chain of steps.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pipeline {
    pub steps: Vec<Step>,
    /// Set by a leading `decode` step: which damage refuses the source.
    pub fail_on: FailOn,
}

/// How to run a pipeline.
#[derive(Clone, Copy, Default)]
pub struct RunOptions<'a> {
    pub limits: Limits,
    pub foreign: Option<&'a dyn ForeignDecoder>,
    /// Encoding for the implicit final output (when the last step is not `output`).
    pub final_output: Option<&'a EncodeOptions>,
    /// Extra named inputs (watermark logos) as encoded bytes.
    pub inputs: Option<&'a BTreeMap<String, Vec<u8>>>,
    /// When the caller stops waiting: past it, the run ends with [`Error::Timeout`] between
    /// steps and between the frames of an animation or sequence (an operation already running
    /// on one image finishes; its cost was bounded before it started).
    pub deadline: Option<Instant>,
}

/// One encoded result.
#[derive(Debug, Clone)]
pub struct Rendition {
    /// The output step's name with `{n}`/`{ms}` filled in; `None` for the implicit final output.
    pub name: Option<String>,
    pub format: OutFormat,
    pub width: u32,
    pub height: u32,
    pub bytes: Vec<u8>,
    /// For one frame picked by `frames`: which one.
    pub frame: Option<FramePos>,
    /// For a `sprite vtt=true` sheet: the storyboard cues (write them with [`crate::sequence::webvtt`]).
    pub cues: Vec<Cue>,
}

impl Pipeline {
    /// Builds a pipeline from `(name, [(key, value)])` groups, as the CLI and HTTP APIs give them.
    pub fn from_steps<'a, I, P>(groups: I) -> Result<Pipeline>
    where
        I: IntoIterator<Item = (&'a str, P)>,
        P: IntoIterator<Item = (&'a str, &'a str)>,
    {
        let mut steps = Vec::new();
        let mut fail_on = FailOn::default();
        for (i, (name, pairs)) in groups.into_iter().enumerate() {
            let step = match name {
                "decode" => {
                    let a = Args::parse(&DECODE, pairs)?;
                    if i > 0 {
                        return Err(a.invalid("step", "`decode` describes the source, so it must be the first step"));
                    }
                    fail_on = a.choice("fail_on").and_then(FailOn::parse).unwrap_or_default();
                    continue;
                }
                "convert" => Step::Convert(EncodeOptions::parse(pairs)?),
                "frames" => Step::Frames(Frames::from_args(&Args::parse(&sequence::FRAMES, pairs)?)?),
                "sprite" => Step::Sprite(Sprite::from_args(&Args::parse(&sequence::SPRITE, pairs)?)?),
                "output" => {
                    let (named, rest): (Vec<_>, Vec<_>) = pairs.into_iter().partition(|(k, _)| *k == "name");
                    let a = Args::parse(&OUTPUT, named)?;
                    let name = a.text("name").ok_or_else(|| a.invalid("name", "required"))?.to_owned();
                    Step::Output { name, encode: EncodeOptions::parse(rest)? }
                }
                op => {
                    let op = Op::parse(op, pairs)?;
                    if op.is_source() && !steps.is_empty() {
                        return Err(Error::bad(
                            op.name(),
                            "step",
                            format!("`{}` makes an image, so it must be the first step", op.name()),
                        ));
                    }
                    Step::Op(op)
                }
            };
            steps.push(step);
        }
        Ok(Pipeline { steps, fail_on })
    }

    /// Names of the extra inputs the steps read (logos, fonts), each once.
    pub fn input_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.inputs().map(|(n, _)| n).collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// Names that the inputs themselves refer to (a compose template's images and fonts), once
    /// `raw` holds the inputs named by [`Pipeline::input_names`].
    pub fn nested_input_names(&self, raw: &BTreeMap<String, Vec<u8>>) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for (name, kind) in self.inputs() {
            if kind == InputKind::Template
                && let Some(bytes) = raw.get(name)
            {
                names.extend(crate::ops::compose::referenced_inputs(bytes)?);
            }
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn inputs(&self) -> impl Iterator<Item = (&str, InputKind)> {
        self.steps.iter().filter_map(|s| match s {
            Step::Op(op) => op.inputs(),
            Step::Frames(Frames { init: Some(init), .. }) => Some((init.as_str(), InputKind::Segment)),
            _ => None,
        })
    }

    /// Decodes every extra input the steps need, each once, under the same limits.
    fn decode_inputs(&self, opts: &RunOptions<'_>) -> Result<BTreeMap<String, image::DynamicImage>> {
        let mut images = BTreeMap::new();
        let mut names: Vec<&str> = self.inputs().filter(|(_, k)| *k == InputKind::Image).map(|(n, _)| n).collect();
        names.sort_unstable();
        names.dedup();
        for name in names {
            // An input nobody supplied is reported by the operation that needs it, with its
            // own parameter name.
            let Some(bytes) = opts.inputs.and_then(|m| m.get(name)) else { continue };
            let dopts = DecodeOptions { limits: opts.limits, foreign: opts.foreign, ..DecodeOptions::default() };
            images.insert(name.to_owned(), decode::decode(bytes, &dopts)?.image);
        }
        Ok(images)
    }

    /// Whether the result after the last step still has to be written somewhere (the last step
    /// is not an `output`).
    pub fn needs_final_output(&self) -> bool {
        !matches!(self.steps.last(), Some(Step::Output { .. }))
    }

    /// Decodes `input`, runs every step and returns the renditions in order. A pipeline that
    /// starts with a source operation (`qrcode`) makes its first raster and ignores `input`.
    pub fn run(&self, input: &[u8], opts: &RunOptions<'_>) -> Result<Vec<Rendition>> {
        let limits = opts.limits;
        if let Some(Step::Op(source)) = self.steps.first()
            && source.is_source()
        {
            let images = self.decode_inputs(opts)?;
            let cx = crate::ops::Context { limits, images: &images, raw: opts.inputs, deadline: opts.deadline };
            let started = Instant::now();
            let img = source.generate(&cx)?;
            check_time(source, started, &limits)?;
            let vector = match source {
                Op::Qrcode(q) if q.logo.is_none() => Some(q.svg()?),
                _ => None,
            };
            let start = Start {
                media: Media::Still(img),
                skip: 1,
                first_resize: None,
                source_out: OutFormat::Png,
                icc: None,
                vector,
            };
            return self.run_steps(start, &cx, opts);
        }
        let mut first_resize = None;
        let mut dopts =
            DecodeOptions { limits, foreign: opts.foreign, fail_on: self.fail_on, ..DecodeOptions::default() };
        let format = decode::sniff_checked(input, &limits)?;
        if format.is_video() {
            return self.run_video(format, input, opts);
        }
        if format == Format::Jpeg
            && let Some(Step::Op(first)) = self.steps.first()
            && matches!(first, Op::Resize(_) | Op::Crop(_))
        {
            let h = decode::read_header(input, &limits)?;
            limits.check_source(h.width, h.height)?;
            let src = if h.orientation.swaps_axes() { (h.height, h.width) } else { (h.width, h.height) };
            match first {
                Op::Resize(r) => {
                    dopts.min_size = Some(r.min_source(src));
                    // Scale-relative sizes must be pinned to the source before it shrinks.
                    first_resize = Some(r.absolute(src));
                }
                // A leading crop is pushed into the decoder: rows below it are never decoded.
                Op::Crop(c) => dopts.region = c.rect_in(src.0, src.1),
                _ => {}
            }
        }
        if matches!(format, Format::Gif | Format::Webp | Format::Png) {
            let frames = crate::probe::animation_frames(format, input, &limits)?;
            if frames > 1 {
                let anim = crate::animation::decode(format, input, frames, &limits)?;
                let images = self.decode_inputs(opts)?;
                let cx = crate::ops::Context { limits, images: &images, raw: opts.inputs, deadline: opts.deadline };
                let source_out = if format == Format::Webp { OutFormat::Webp } else { OutFormat::Gif };
                let start = Start {
                    media: Media::Animation(anim),
                    skip: 0,
                    first_resize: None,
                    source_out,
                    icc: None,
                    vector: None,
                };
                return self.run_steps(start, &cx, opts);
            }
        }
        let decoded = decode::decode(input, &dopts)?;
        let images = self.decode_inputs(opts)?;
        let cx = crate::ops::Context { limits, images: &images, raw: opts.inputs, deadline: opts.deadline };
        let start = Start {
            skip: usize::from(decoded.region.is_some()),
            media: Media::Still(decoded.image),
            first_resize,
            source_out: OutFormat::for_source(decoded.format),
            icc: decoded.icc,
            vector: None,
        };
        self.run_steps(start, &cx, opts)
    }

    /// Runs the steps after the first raster (or animation) exists.
    fn run_steps(&self, start: Start, cx: &crate::ops::Context<'_>, opts: &RunOptions<'_>) -> Result<Vec<Rendition>> {
        let Start { mut media, skip, first_resize, mut source_out, icc, mut vector } = start;
        let limits = opts.limits;
        let mut encode_opts = EncodeOptions::default();
        let mut out = Vec::new();
        let mut cues: Vec<Cue> = Vec::new();
        for (i, step) in self.steps.iter().enumerate().skip(skip) {
            past_deadline(opts.deadline, step_name(step))?;
            match step {
                Step::Op(op) => {
                    let started = Instant::now();
                    let op = match (i, &first_resize) {
                        (0, Some(r)) => &Op::Resize(r.clone()),
                        _ => op,
                    };
                    media = apply(media, op, cx, &cues)?;
                    vector = None;
                    check_time(op, started, &limits)?;
                }
                Step::Convert(c) => encode_opts = encode_opts.overlay(c),
                Step::Frames(Frames { select, width, .. }) => {
                    if matches!(media, Media::Stills(_)) {
                        return Err(Error::bad("frames", "step", "frames were already picked"));
                    }
                    if matches!(media, Media::Animation(_)) {
                        // Frames of an animation are stills; PNG keeps their palette and alpha.
                        source_out = OutFormat::Png;
                    }
                    let mut stills = into_stills(media, select)?;
                    for s in &mut stills {
                        s.image = sequence::shrink_to_width(std::mem::take(&mut s.image), *width)?;
                    }
                    media = Media::Stills(stills);
                    vector = None;
                }
                Step::Sprite(sprite) => {
                    if matches!(media, Media::Animation(_)) {
                        // A sheet of frames is a still picture, whatever the animation was.
                        source_out = OutFormat::Png;
                    }
                    let (sheet, sheet_cues) = sprite.apply(&into_stills(media, &Select::All)?, &limits)?;
                    cues = if sprite.vtt { sheet_cues } else { Vec::new() };
                    media = Media::Still(sheet);
                    vector = None;
                }
                Step::Output { name, encode } => {
                    let o = encode_opts.overlay(encode);
                    emit(&mut out, &media, Some(name), &o, source_out, icc.as_deref(), vector.as_deref(), &cues)?;
                }
            }
        }
        if self.needs_final_output() {
            let o = opts.final_output.map_or(encode_opts.clone(), |f| encode_opts.overlay(f));
            emit(&mut out, &media, None, &o, source_out, icc.as_deref(), vector.as_deref(), &cues)?;
        }
        Ok(out)
    }

    /// A video input: the first step must pick frames, which are decoded without the rest.
    fn run_video(&self, format: Format, input: &[u8], opts: &RunOptions<'_>) -> Result<Vec<Rendition>> {
        let Some(Step::Frames(frames)) = self.steps.first() else {
            return Err(Error::bad(
                self.steps.first().map_or("pipeline", step_name),
                "input",
                format!("the input is {} video: start with a `frames` step (e.g. frames times=1.5)", format.name()),
            ));
        };
        let init = match &frames.init {
            Some(name) => Some(
                opts.inputs
                    .and_then(|m| m.get(name))
                    .map(Vec::as_slice)
                    .ok_or_else(|| Error::bad("frames", "init", format!("no input named `{name}` was supplied")))?,
            ),
            None => None,
        };
        let limits = opts.limits;
        let started = Instant::now();
        let stills = match crate::video::frames(format, input, init, &frames.select, frames.width, &limits) {
            // A codec or container without a bundled decoder: the foreign decoder (ffmpeg), if any.
            Err(unsupported @ Error::Unsupported { .. }) => {
                let whole = init.map_or_else(|| input.to_vec(), |i| [i, input].concat());
                match opts.foreign {
                    Some(f) => {
                        f.video_frames(format, &whole, &frames.select, frames.width, &limits)?.ok_or(unsupported)?
                    }
                    None => return Err(unsupported),
                }
            }
            other => other?,
        };
        limits.check_frames(stills.len() as u64)?;
        if started.elapsed().as_millis() > u128::from(limits.max_op_millis) {
            return Err(Error::Timeout { op: "frames".into(), limit_ms: limits.max_op_millis });
        }
        let images = self.decode_inputs(opts)?;
        let cx = crate::ops::Context { limits, images: &images, raw: opts.inputs, deadline: opts.deadline };
        let start = Start {
            media: Media::Stills(stills),
            skip: 1,
            first_resize: None,
            // Video frames are photographs: JPEG, like a poster frame or thumbnail.
            source_out: OutFormat::Jpeg,
            icc: None,
            vector: None,
        };
        self.run_steps(start, &cx, opts)
    }

    /// Whether the pipeline makes its own first raster (and so reads no input).
    pub fn is_generated(&self) -> bool {
        matches!(self.steps.first(), Some(Step::Op(op)) if op.is_source())
    }
}

/// What the steps work on.
enum Media {
    Still(image::DynamicImage),
    /// Every frame of an animation; outputs are animations.
    Animation(crate::animation::Animation),
    /// Frames picked by `frames`; outputs are one still per frame.
    Stills(Vec<Still>),
}

/// The first raster and what the steps after it need to know about its origin.
struct Start {
    media: Media,
    /// Steps already done while making the raster (a crop pushed into the decoder, a source).
    skip: usize,
    /// The first step's resize pinned to the source's size (shrink-on-load changes it).
    first_resize: Option<crate::ops::resize::Resize>,
    /// Output format when neither the step nor the caller names one.
    source_out: OutFormat,
    icc: Option<Vec<u8>>,
    /// The same picture as SVG, while no raster operation has run on it.
    vector: Option<String>,
}

/// The media as a sequence of stills: a still is one frame at 0 ms, an animation gives the
/// frames `select` picks, picked stills stay as they are.
fn into_stills(media: Media, select: &Select) -> Result<Vec<Still>> {
    Ok(match media {
        Media::Still(image) => {
            select.resolve(&[0], 0)?;
            vec![Still { image, pos: FramePos { index: 0, time_ms: 0, duration_ms: 0 } }]
        }
        Media::Animation(anim) => {
            sequence::pick(anim.frames.into_iter().map(|f| (f.image, u64::from(f.delay_ms))).collect(), select)?
        }
        Media::Stills(stills) => stills,
    })
}

/// Runs one operation over the media: the raster, every frame, or every picked still.
fn apply(media: Media, op: &Op, cx: &crate::ops::Context<'_>, cues: &[Cue]) -> Result<Media> {
    Ok(match media {
        Media::Still(img) => {
            let before = (img.width(), img.height());
            let img = op.apply(img, cx)?;
            if !cues.is_empty() && (img.width(), img.height()) != before {
                return Err(Error::bad(
                    op.name(),
                    "step",
                    "the storyboard cues (sprite vtt=true) point into the sheet as sprite made it; size the tiles with sprite's width/height instead",
                ));
            }
            Media::Still(img)
        }
        Media::Animation(mut anim) => {
            for f in &mut anim.frames {
                past_deadline(cx.deadline, op.name())?;
                f.image = op.apply(std::mem::take(&mut f.image), cx)?;
            }
            let first = anim.frames.first().map(|f| (f.image.width(), f.image.height()));
            if anim.frames.iter().any(|f| Some((f.image.width(), f.image.height())) != first) {
                return Err(Error::bad(
                    op.name(),
                    "image",
                    "frames came out in different sizes; this operation cannot run on animations",
                ));
            }
            Media::Animation(anim)
        }
        Media::Stills(mut stills) => {
            for s in &mut stills {
                past_deadline(cx.deadline, op.name())?;
                s.image = op.apply(std::mem::take(&mut s.image), cx)?;
            }
            Media::Stills(stills)
        }
    })
}

/// Encodes the media as renditions: one for a still or an animation, one per picked frame.
#[allow(clippy::too_many_arguments, reason = "one call site per output kind; a struct would only rename them")]
fn emit(
    out: &mut Vec<Rendition>,
    media: &Media,
    name: Option<&String>,
    o: &EncodeOptions,
    source_out: OutFormat,
    icc: Option<&[u8]>,
    vector: Option<&str>,
    cues: &[Cue],
) -> Result<()> {
    let named = name.and_then(|n| format_from_name(n));
    match media {
        Media::Still(img) => {
            let format = o.format.or(named).unwrap_or(source_out);
            let mut r = if format == OutFormat::Svg {
                let svg = vector.ok_or_else(encode::svg_needs_vector)?;
                Rendition::new(name.cloned(), format, (img.width(), img.height()), svg.as_bytes().to_vec())
            } else {
                render(img, name.cloned(), format, o, icc)?
            };
            r.cues = cues.to_vec();
            out.push(r);
        }
        Media::Animation(anim) => {
            let format = o.format.or(named).unwrap_or(source_out);
            let bytes = crate::animation::encode(anim, format, o)?;
            let size = anim.frames.first().map_or((0, 0), |f| (f.image.width(), f.image.height()));
            out.push(Rendition::new(name.cloned(), format, size, bytes));
        }
        Media::Stills(stills) => {
            if let Some(n) = name
                && stills.len() > 1
                && !sequence::names_frames(n)
            {
                return Err(Error::bad(
                    "output",
                    "name",
                    format!("{} frames were picked; put {{n}} (frame number) or {{ms}} (time) in `{n}`", stills.len()),
                ));
            }
            let format = o.format.or(named).unwrap_or(source_out);
            for s in stills {
                let mut r = render(&s.image, name.map(|n| sequence::frame_name(n, s.pos)), format, o, icc)?;
                r.frame = Some(s.pos);
                out.push(r);
            }
        }
    }
    Ok(())
}

impl Rendition {
    fn new(name: Option<String>, format: OutFormat, (width, height): (u32, u32), bytes: Vec<u8>) -> Self {
        Rendition { name, format, width, height, bytes, frame: None, cues: Vec::new() }
    }
}

fn step_name(step: &Step) -> &'static str {
    match step {
        Step::Op(op) => op.name(),
        Step::Convert(_) => "convert",
        Step::Output { .. } => "output",
        Step::Frames(_) => "frames",
        Step::Sprite(_) => "sprite",
    }
}

/// The caller's deadline, checked between steps and frames.
fn past_deadline(deadline: Option<Instant>, op: &str) -> Result<()> {
    match deadline {
        Some(d) if Instant::now() > d => Err(Error::Timeout { op: op.into(), limit_ms: 0 }),
        _ => Ok(()),
    }
}

/// The per-operation time budget, checked once the operation returns (the engine cannot
/// pre-empt a running codec; hard cancellation is the caller's).
fn check_time(op: &Op, started: Instant, limits: &Limits) -> Result<()> {
    if started.elapsed().as_millis() > u128::from(limits.max_op_millis) {
        return Err(Error::Timeout { op: op.name().into(), limit_ms: limits.max_op_millis });
    }
    Ok(())
}

fn render(
    img: &image::DynamicImage,
    name: Option<String>,
    format: OutFormat,
    o: &EncodeOptions,
    icc: Option<&[u8]>,
) -> Result<Rendition> {
    let bytes = encode::encode(img, format, o, icc)?;
    Ok(Rendition::new(name, format, (img.width(), img.height()), bytes))
}

/// The output format implied by a name's extension, if any.
pub fn format_from_name(name: &str) -> Option<OutFormat> {
    let ext = name.rsplit_once('.')?.1;
    OutFormat::from_name(ext)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::color::Color;
    use crate::raster;

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let mut im = image::RgbImage::new(w, h);
        for (x, y, p) in im.enumerate_pixels_mut() {
            *p = image::Rgb([(x % 256) as u8, (y % 256) as u8, 128]);
        }
        encode::encode(&image::DynamicImage::ImageRgb8(im), OutFormat::Jpeg, &EncodeOptions::default(), None).unwrap()
    }

    fn pipeline(steps: &[(&str, &[(&str, &str)])]) -> Result<Pipeline> {
        Pipeline::from_steps(steps.iter().map(|(n, p)| (*n, p.iter().copied())))
    }

    #[test]
    fn renditions_cascade_from_one_decode() {
        let p = pipeline(&[
            ("resize", &[("width", "400")]),
            ("output", &[("name", "a.jpg"), ("quality", "90")]),
            ("resize", &[("width", "100")]),
            ("output", &[("name", "b.webp")]),
        ])
        .unwrap();
        let out = p.run(&jpeg(1600, 1200), &RunOptions::default()).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].format, out[0].width, out[0].height), (OutFormat::Jpeg, 400, 300));
        assert_eq!((out[1].format, out[1].width, out[1].height), (OutFormat::Webp, 100, 75));
        assert_eq!(crate::format::sniff(&out[1].bytes), Some(Format::Webp));
    }

    #[test]
    fn shrink_on_load_keeps_exact_output_size() {
        // scale=0.1 must be relative to the original even when decoding at 1/4.
        let p = pipeline(&[("resize", &[("scale", "0.1")])]).unwrap();
        let out = p.run(&jpeg(1600, 1200), &RunOptions::default()).unwrap();
        assert_eq!((out[0].width, out[0].height), (160, 120));
        let p = pipeline(&[("resize", &[("width", "200"), ("height", "200")])]).unwrap();
        let out = p.run(&jpeg(1600, 1200), &RunOptions::default()).unwrap();
        assert_eq!((out[0].width, out[0].height), (200, 150));
    }

    #[test]
    fn leading_crop_is_decoded_as_a_region_with_identical_pixels() {
        let src = jpeg(640, 480);
        let crop = pipeline(&[("crop", &[("x", "100"), ("y", "50"), ("width", "200"), ("height", "120")])]).unwrap();
        let png = EncodeOptions { format: Some(OutFormat::Png), ..Default::default() };
        let run = RunOptions { final_output: Some(&png), ..Default::default() };
        let pushed = crop.run(&src, &run).unwrap();
        // The same crop after a no-op step runs on the fully decoded image.
        let late = pipeline(&[
            ("pad", &[("all", "1"), ("color", "black")]),
            ("crop", &[("x", "101"), ("y", "51"), ("width", "200"), ("height", "120")]),
        ])
        .unwrap();
        let full = late.run(&src, &run).unwrap();
        assert_eq!((pushed[0].width, pushed[0].height), (200, 120));
        let a = image::load_from_memory(&pushed[0].bytes).unwrap().to_rgb8();
        let b = image::load_from_memory(&full[0].bytes).unwrap().to_rgb8();
        assert_eq!(a.as_raw(), b.as_raw());
        let outside = pipeline(&[("crop", &[("x", "700"), ("y", "0"), ("width", "10"), ("height", "10")])]).unwrap();
        assert_eq!(outside.run(&src, &run).unwrap_err().code(), "bad_parameter");
    }

    #[test]
    fn animations_run_every_frame() {
        let mut gif = Vec::new();
        {
            let mut enc = image::codecs::gif::GifEncoder::new(&mut gif);
            for i in 0..5u8 {
                let img = image::RgbaImage::from_pixel(40, 20, image::Rgba([i * 50, 0, 0, 255]));
                enc.encode_frame(image::Frame::from_parts(img, 0, 0, image::Delay::from_numer_denom_ms(40, 1)))
                    .unwrap();
            }
        }
        let p = pipeline(&[("resize", &[("width", "20")]), ("flip", &[])]).unwrap();
        let out = p.run(&gif, &RunOptions::default()).unwrap();
        assert_eq!((out[0].format, out[0].width, out[0].height), (OutFormat::Gif, 20, 10));
        let probe = crate::probe(&out[0].bytes, &Limits::default(), None).unwrap();
        assert_eq!((probe.frames, probe.duration_ms), (Some(5), Some(200)));
        let jpeg = EncodeOptions { format: Some(OutFormat::Jpeg), ..Default::default() };
        let err = p.run(&gif, &RunOptions { final_output: Some(&jpeg), ..Default::default() }).unwrap_err();
        assert_eq!(err.code(), "unsupported_format");
    }

    fn gif(frames: u8) -> Vec<u8> {
        let mut gif = Vec::new();
        {
            let mut enc = image::codecs::gif::GifEncoder::new(&mut gif);
            for i in 0..frames {
                let img = image::RgbaImage::from_pixel(40, 20, image::Rgba([i * 50, 0, 0, 255]));
                enc.encode_frame(image::Frame::from_parts(img, 0, 0, image::Delay::from_numer_denom_ms(100, 1)))
                    .unwrap();
            }
        }
        gif
    }

    #[test]
    fn frames_become_stills_named_per_frame() {
        let p = pipeline(&[("frames", &[("indices", "3,1")]), ("resize", &[("width", "20")])]).unwrap();
        let out = p.run(&gif(5), &RunOptions::default()).unwrap();
        assert_eq!(out.len(), 2);
        for (r, (index, red)) in out.iter().zip([(1, 50), (3, 150)]) {
            assert_eq!((r.format, r.width, r.height), (OutFormat::Png, 20, 10));
            assert_eq!(r.frame, Some(FramePos { index, time_ms: u64::from(index) * 100, duration_ms: 100 }));
            let px = image::load_from_memory(&r.bytes).unwrap().to_rgb8().get_pixel(10, 5).0;
            assert!(px[0].abs_diff(red) <= 3, "frame {index}: {px:?}");
        }
        let named = pipeline(&[("frames", &[("every", "2")]), ("output", &[("name", "f-{n}.jpg")])]).unwrap();
        let out = named.run(&gif(5), &RunOptions::default()).unwrap();
        let names: Vec<_> = out.iter().map(|r| (r.name.clone().unwrap(), r.format)).collect();
        assert_eq!(
            names,
            [
                ("f-0.jpg".into(), OutFormat::Jpeg),
                ("f-2.jpg".into(), OutFormat::Jpeg),
                ("f-4.jpg".into(), OutFormat::Jpeg)
            ]
        );
        let clash = pipeline(&[("frames", &[]), ("output", &[("name", "same.png")])]).unwrap();
        assert_eq!(clash.run(&gif(3), &RunOptions::default()).unwrap_err().code(), "bad_parameter");
        // Frames can be scaled down as they are picked.
        let small = pipeline(&[("frames", &[("every", "2"), ("width", "10")])]).unwrap();
        let out = small.run(&gif(5), &RunOptions::default()).unwrap();
        assert!(
            out.iter().all(|r| (r.width, r.height) == (10, 5)),
            "{:?}",
            out.iter().map(|r| (r.width, r.height)).collect::<Vec<_>>()
        );
        // A still is a one-frame sequence.
        let out =
            pipeline(&[("frames", &[("times", "0")])]).unwrap().run(&jpeg(32, 32), &RunOptions::default()).unwrap();
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn video_frames_run_through_the_steps_with_an_init_segment() {
        let video = crate::video::tests::mp4(8, 4);
        let p = pipeline(&[("frames", &[("times", "0.1,0.2")]), ("resize", &[("width", "32")])]).unwrap();
        let out = p.run(&video, &RunOptions::default()).unwrap();
        assert_eq!(
            out.iter().map(|r| (r.frame.unwrap().index, r.width, r.format)).collect::<Vec<_>>(),
            [(2, 32, OutFormat::Jpeg), (5, 32, OutFormat::Jpeg)]
        );
        // A media segment without its moov, given the init segment by name.
        let mdat = video.windows(4).position(|w| w == b"mdat").unwrap() - 4;
        let (init, segment) = video.split_at(mdat);
        let p = pipeline(&[("frames", &[("indices", "7"), ("init", "init.mp4")])]).unwrap();
        assert_eq!(p.input_names(), ["init.mp4"]);
        let inputs = BTreeMap::from([("init.mp4".to_owned(), init.to_vec())]);
        let out = p.run(segment, &RunOptions { inputs: Some(&inputs), ..Default::default() }).unwrap();
        assert_eq!(out[0].frame.unwrap().index, 7);
        let without = pipeline(&[("frames", &[("indices", "7")])]).unwrap().run(segment, &RunOptions::default());
        assert!(without.unwrap_err().to_string().contains("init"));
        // Video needs frames picked first.
        let err = pipeline(&[("resize", &[("width", "10")])]).unwrap().run(&video, &RunOptions::default()).unwrap_err();
        assert!(matches!(&err, Error::BadParameter { op, .. } if op == "resize"), "{err}");
    }

    #[test]
    fn sprite_tiles_an_animation_with_cues() {
        let p = pipeline(&[("sprite", &[("columns", "5"), ("width", "20"), ("vtt", "true")])]).unwrap();
        let out = p.run(&gif(5), &RunOptions::default()).unwrap();
        assert_eq!((out.len(), out[0].format, out[0].width, out[0].height), (1, OutFormat::Png, 100, 10));
        let starts: Vec<_> = out[0].cues.iter().map(|c| (c.start_ms, c.x)).collect();
        assert_eq!(starts, [(0, 0), (100, 20), (200, 40), (300, 60), (400, 80)]);
        let moved = pipeline(&[("sprite", &[("vtt", "true")]), ("resize", &[("width", "50")])]).unwrap();
        assert_eq!(moved.run(&gif(2), &RunOptions::default()).unwrap_err().code(), "bad_parameter");
    }

    #[test]
    fn final_output_defaults_to_source_format_and_accepts_overrides() {
        let src = jpeg(64, 64);
        let p = pipeline(&[("flip", &[])]).unwrap();
        let out = p.run(&src, &RunOptions::default()).unwrap();
        assert_eq!(out[0].format, OutFormat::Jpeg);
        let png = EncodeOptions { format: Some(OutFormat::Png), ..Default::default() };
        let out = p.run(&src, &RunOptions { final_output: Some(&png), ..Default::default() }).unwrap();
        assert_eq!(crate::format::sniff(&out[0].bytes), Some(Format::Png));
    }

    #[test]
    fn limits_stop_bombs_before_decoding() {
        let limits = Limits { max_source_pixels: 1000, ..Limits::default() };
        let p = pipeline(&[("resize", &[("width", "10")])]).unwrap();
        let err = p.run(&jpeg(64, 64), &RunOptions { limits, ..Default::default() }).unwrap_err();
        assert_eq!(err.code(), "limit_exceeded");
        let png = encode::encode(
            &raster::canvas(64, 64, Color::WHITE, false),
            OutFormat::Png,
            &EncodeOptions::default(),
            None,
        )
        .unwrap();
        let err = p.run(&png, &RunOptions { limits, ..Default::default() }).unwrap_err();
        assert_eq!(err.code(), "limit_exceeded");
    }

    #[test]
    fn a_run_past_its_deadline_stops_between_steps() {
        let p = Pipeline::from_steps([("flip", vec![]), ("flop", vec![])]).unwrap();
        let opts = RunOptions { deadline: Some(Instant::now()), ..Default::default() };
        std::thread::sleep(std::time::Duration::from_millis(2));
        let err = p.run(&jpeg(64, 48), &opts).unwrap_err();
        assert!(matches!(&err, Error::Timeout { op, .. } if op == "flip"), "{err:?}");
        let opts =
            RunOptions { deadline: Some(Instant::now() + std::time::Duration::from_secs(60)), ..Default::default() };
        assert!(p.run(&jpeg(64, 48), &opts).is_ok());
    }

    #[test]
    fn operation_time_limit_is_enforced() {
        // A 20-sigma blur of 1.9 MP takes well over the 0 ms budget.
        let limits = Limits { max_op_millis: 0, ..Limits::default() };
        let p = pipeline(&[("blur", &[("sigma", "20")])]).unwrap();
        let err = p.run(&jpeg(1600, 1200), &RunOptions { limits, ..Default::default() }).unwrap_err();
        assert!(matches!(&err, Error::Timeout { op, limit_ms: 0 } if op == "blur"), "{err:?}");
        assert_eq!(err.code(), "timeout");
    }

    #[test]
    fn png_bomb_header_is_refused_as_a_limit() {
        // A PNG whose header claims 100 000 x 100 000 pixels and holds no data.
        let mut bomb = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut bomb, 100_000, 100_000);
            enc.set_color(png::ColorType::Rgba);
            let mut w = enc.write_header().unwrap();
            // An empty zlib stream: enough for a decoder to reach the pixel data.
            w.write_chunk(png::chunk::IDAT, &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]).unwrap();
        }
        let p = pipeline(&[("resize", &[("width", "10")])]).unwrap();
        let err = p.run(&bomb, &RunOptions::default()).unwrap_err();
        assert!(matches!(err, Error::LimitExceeded { .. }), "{err:?}");
        assert!(err.to_string().contains("max_source_dimension"), "{err}");
    }

    #[test]
    fn a_leading_decode_step_sets_fail_on() {
        let whole = jpeg(320, 240);
        let mut cut = whole[..whole.len() / 2].to_vec();
        cut.extend_from_slice(&[0xFF, 0xD9]);
        let strict = pipeline(&[("resize", &[("width", "100")])]).unwrap();
        assert_eq!(strict.fail_on, FailOn::Warning);
        assert_eq!(strict.run(&cut, &RunOptions::default()).unwrap_err().code(), "truncated_input");
        let lenient = pipeline(&[("decode", &[("fail_on", "none")]), ("resize", &[("width", "100")])]).unwrap();
        assert_eq!((lenient.fail_on, lenient.steps.len()), (FailOn::None, 1));
        let out = lenient.run(&cut, &RunOptions::default()).unwrap();
        assert_eq!((out[0].width, out[0].height), (100, 75));
        let late = pipeline(&[("resize", &[("width", "100")]), ("decode", &[("fail_on", "none")])]).unwrap_err();
        assert_eq!(late.code(), "bad_parameter");
        assert_eq!(pipeline(&[("decode", &[("fail_on", "error")])]).unwrap_err().code(), "bad_parameter");
    }

    #[test]
    fn bad_steps_are_rejected_with_names() {
        assert!(matches!(pipeline(&[("resize", &[("width", "-1")])]), Err(Error::BadParameter { .. })));
        assert!(matches!(pipeline(&[("output", &[])]), Err(Error::BadParameter { .. })));
        assert!(matches!(pipeline(&[("warp", &[])]), Err(Error::UnknownOperation(_))));
        assert!(matches!(pipeline(&[("convert", &[("quality", "101")])]), Err(Error::BadParameter { .. })));
    }
}
