//! Steps over a sequence of frames rather than one raster: `frames` picks stills out of an
//! animation (all, every Nth, at indices, at times, every N seconds, N evenly spaced), and
//! `sprite` tiles a sequence into one contact sheet / seek-preview storyboard whose tiles can be
//! indexed by a WebVTT file. Both keep each frame's position (index and time), so outputs can be
//! named per frame and storyboard cues carry real timestamps.

use image::DynamicImage;
use serde::Serialize;

use crate::Limits;
use crate::color::Color;
use crate::error::{Error, Result};
use crate::ops::resize::{Kernel, resample};
use crate::params::{Args, OpSpec, boolean, color, float, int, text};
use crate::raster;

pub static FRAMES: OpSpec = OpSpec {
    name: "frames",
    doc: "Pick frames of an animation as stills; outputs are then one image per frame (name them with {n} or {ms}). At most one selector; none means every frame.",
    params: &[
        int("every", 1, 100_000, None, "Every Nth frame, starting with the first."),
        text("indices", 4096, None, "Comma-separated frame numbers, from 0 (e.g. `0,10,20`)."),
        text("times", 4096, None, "Comma-separated times in seconds (e.g. `0,1.5`): the frame showing at each."),
        float("interval", 0.001, 86_400.0, None, "One frame every N seconds, from 0."),
        int("count", 1, 10_000, None, "N frames evenly spaced in time (the middle of N equal spans)."),
        boolean("keyframes", "false", "Video only: every keyframe (sync sample), the cheapest frames to decode."),
        int(
            "width",
            1,
            8192,
            None,
            "Scale each picked frame down to this width as it is decoded (aspect kept, never enlarged): long storyboards stay within the pixel limit.",
        ),
        text(
            "init",
            1024,
            None,
            "Video only: name of the init segment input (`moov`) for a fragmented-MP4 media segment that has none.",
        ),
    ],
};

pub static SPRITE: OpSpec = OpSpec {
    name: "sprite",
    doc: "Tile the frames (of an animation, or picked by `frames`) into one contact sheet, left to right, top to bottom.",
    params: &[
        int("columns", 1, 1000, None, "Tiles per row (default: a near-square grid)."),
        int("width", 1, 4096, None, "Tile width in pixels (default: the frame's, or from height keeping aspect)."),
        int("height", 1, 4096, None, "Tile height in pixels (default: from width keeping aspect)."),
        int("spacing", 0, 1000, Some("0"), "Gap between tiles and around the sheet, in pixels."),
        color("background", Some("black"), "Colour behind and between the tiles."),
        boolean("vtt", "false", "Attach WebVTT cues (time range -> tile rectangle) for a seek-preview storyboard."),
    ],
};

/// Which frames `frames` keeps.
#[derive(Debug, Clone, PartialEq)]
pub enum Select {
    All,
    Every(u32),
    Indices(Vec<u32>),
    /// Milliseconds from the start.
    Times(Vec<u64>),
    IntervalMs(u64),
    Count(u32),
    /// Video sync samples.
    Keyframes,
}

/// A `frames` step: which frames, and for a media segment, its init segment.
#[derive(Debug, Clone, PartialEq)]
pub struct Frames {
    pub select: Select,
    pub init: Option<String>,
    /// Scale picked frames down to this width as they are decoded.
    pub width: Option<u32>,
}

impl Frames {
    pub fn from_args(a: &Args) -> Result<Self> {
        Ok(Frames { select: Select::from_args(a)?, init: a.text("init").map(str::to_owned), width: a.u32("width") })
    }
}

/// `img` scaled down to `width` (aspect kept), or unchanged when it is not wider.
pub fn shrink_to_width(img: DynamicImage, width: Option<u32>) -> Result<DynamicImage> {
    let Some(w) = width.filter(|w| *w < img.width()) else { return Ok(img) };
    let h = ((u64::from(img.height()) * u64::from(w)).div_ceil(u64::from(img.width())) as u32).max(1);
    let full = (0.0, 0.0, f64::from(img.width()), f64::from(img.height()));
    resample(&img, full, (w, h), Kernel::Lanczos3)
}

/// Where a frame sits in its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FramePos {
    pub index: u32,
    pub time_ms: u64,
    /// How long it shows (until the next source frame).
    pub duration_ms: u64,
}

/// One picked frame.
#[derive(Debug, Clone)]
pub struct Still {
    pub image: DynamicImage,
    pub pos: FramePos,
}

/// One storyboard cue: a time range and the tile that previews it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Cue {
    pub start_ms: u64,
    pub end_ms: u64,
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

const MAX_LIST: usize = 10_000;

fn list<T: std::str::FromStr>(a: &Args, name: &str, what: &str) -> Result<Vec<T>> {
    let raw = a.text(name).unwrap_or_default();
    let items: Vec<&str> = raw.split(',').map(str::trim).collect();
    if items.len() > MAX_LIST {
        return Err(a.invalid(name, format!("at most {MAX_LIST} entries")));
    }
    items.iter().map(|s| s.parse().map_err(|_| a.invalid(name, format!("`{s}` is not {what}")))).collect()
}

impl Select {
    pub fn from_args(a: &Args) -> Result<Self> {
        let given: Vec<&str> = ["every", "indices", "times", "interval", "count", "keyframes"]
            .into_iter()
            .filter(|n| a.given(n) && (*n != "keyframes" || a.boolean(n)))
            .collect();
        if given.len() > 1 {
            return Err(a.invalid(given[1], format!("give one selector; `{}` is already set", given[0])));
        }
        Ok(match given.first().copied() {
            None => Select::All,
            Some("every") => Select::Every(a.require_u32("every")?),
            Some("indices") => Select::Indices(list(a, "indices", "a frame number")?),
            Some("times") => {
                let secs: Vec<f64> = list(a, "times", "a time in seconds")?;
                if let Some(bad) = secs.iter().find(|s| !(0.0..=86_400.0).contains(*s)) {
                    return Err(a.invalid("times", format!("{bad} is not between 0 and 86400 seconds")));
                }
                Select::Times(secs.iter().map(|s| (s * 1000.0).round() as u64).collect())
            }
            Some("keyframes") => Select::Keyframes,
            Some("interval") => {
                Select::IntervalMs(((a.float("interval").unwrap_or(1.0) * 1000.0).round() as u64).max(1))
            }
            _ => Select::Count(a.require_u32("count")?),
        })
    }

    /// Indices to keep, ascending and without repeats, of `n` frames starting at `starts`
    /// (milliseconds) and lasting `total_ms` in all.
    pub fn resolve(&self, starts: &[u64], total_ms: u64) -> Result<Vec<usize>> {
        let n = starts.len();
        let at_time = |t: u64| -> Result<usize> {
            if t > total_ms {
                return Err(Error::bad(
                    "frames",
                    "times",
                    format!("{:.3} s is past the end ({:.3} s)", t as f64 / 1000.0, total_ms as f64 / 1000.0),
                ));
            }
            Ok(starts.partition_point(|s| *s <= t).saturating_sub(1))
        };
        let mut picked = match self {
            Select::All => (0..n).collect(),
            Select::Every(k) => (0..n).step_by(*k as usize).collect(),
            Select::Indices(v) => v
                .iter()
                .map(|&i| {
                    if (i as usize) < n {
                        Ok(i as usize)
                    } else {
                        Err(Error::bad("frames", "indices", format!("frame {i} does not exist (there are {n})")))
                    }
                })
                .collect::<Result<Vec<_>>>()?,
            Select::Times(v) => v.iter().map(|&t| at_time(t)).collect::<Result<Vec<_>>>()?,
            Select::IntervalMs(step) => {
                let mut v = Vec::new();
                let mut t = 0;
                while t < total_ms.max(1) && v.len() < MAX_LIST {
                    v.push(at_time(t)?);
                    t += step;
                }
                v
            }
            Select::Keyframes => {
                return Err(Error::bad("frames", "keyframes", "keyframes applies to video; animations have none"));
            }
            Select::Count(c) => {
                let c = u64::from(*c);
                (0..c).map(|k| at_time((2 * k + 1) * total_ms / (2 * c))).collect::<Result<Vec<_>>>()?
            }
        };
        // Frames come out in time order, each once (two times inside one frame give one still).
        picked.sort_unstable();
        picked.dedup();
        Ok(picked)
    }
}

/// How long a frame with this stored delay shows in browsers: delays of 10 ms or less
/// (common in GIFs: 0 means "as fast as possible") play as 100 ms in Chrome, Firefox and Safari,
/// so frame times follow what viewers see.
pub fn shown_ms(delay_ms: u64) -> u64 {
    if delay_ms <= 10 { 100 } else { delay_ms }
}

/// Picks frames out of `(image, delay_ms)` pairs (delays as stored; see [`shown_ms`]).
pub fn pick(frames: Vec<(DynamicImage, u64)>, select: &Select) -> Result<Vec<Still>> {
    let mut starts = Vec::with_capacity(frames.len());
    let mut total = 0u64;
    for (_, delay) in &frames {
        starts.push(total);
        total = total.saturating_add(shown_ms(*delay));
    }
    let keep = select.resolve(&starts, total)?;
    let mut slots: Vec<Option<DynamicImage>> = frames.into_iter().map(|(img, _)| Some(img)).collect();
    Ok(keep
        .into_iter()
        .map(|i| {
            let end = starts.get(i + 1).copied().unwrap_or(total);
            // `resolve` yields each index once, so every slot is taken at most once.
            let image = slots[i].take().unwrap_or_default();
            Still { image, pos: FramePos { index: i as u32, time_ms: starts[i], duration_ms: end - starts[i] } }
        })
        .collect())
}

/// How `sprite` lays tiles out.
#[derive(Debug, Clone, PartialEq)]
pub struct Sprite {
    pub columns: Option<u32>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub spacing: u32,
    pub background: Color,
    pub vtt: bool,
}

impl Sprite {
    pub fn from_args(a: &Args) -> Result<Self> {
        Ok(Sprite {
            columns: a.u32("columns"),
            width: a.u32("width"),
            height: a.u32("height"),
            spacing: a.u32("spacing").unwrap_or(0),
            background: a.color("background").unwrap_or(Color::BLACK),
            vtt: a.boolean("vtt"),
        })
    }

    /// Tiles `stills` into one sheet; the cues say which tile previews which time range.
    pub fn apply(&self, stills: &[Still], limits: &Limits) -> Result<(DynamicImage, Vec<Cue>)> {
        let Some(first) = stills.first() else {
            return Err(Error::bad("sprite", "frames", "no frames to tile"));
        };
        let (fw, fh) = (first.image.width().max(1), first.image.height().max(1));
        let (tw, th) = match (self.width, self.height) {
            (Some(w), Some(h)) => (w, h),
            (Some(w), None) => (w, ((u64::from(fh) * u64::from(w) / u64::from(fw)) as u32).max(1)),
            (None, Some(h)) => (((u64::from(fw) * u64::from(h) / u64::from(fh)) as u32).max(1), h),
            (None, None) => (fw, fh),
        };
        let n = stills.len() as u32;
        let cols = self.columns.unwrap_or_else(|| (f64::from(n).sqrt().ceil() as u32).max(1)).min(n);
        let rows = n.div_ceil(cols);
        let sp = u64::from(self.spacing);
        let sheet_w = u64::from(cols) * (u64::from(tw) + sp) + sp;
        let sheet_h = u64::from(rows) * (u64::from(th) + sp) + sp;
        let (sheet_w, sheet_h) = (
            u32::try_from(sheet_w).map_err(|_| Error::bad("sprite", "width", "sheet too wide"))?,
            u32::try_from(sheet_h).map_err(|_| Error::bad("sprite", "height", "sheet too tall"))?,
        );
        limits.check_output(sheet_w, sheet_h)?;
        let alpha = !self.background.is_opaque() || stills.iter().any(|s| raster::channels(&s.image) == 4);
        let mut sheet = raster::canvas(sheet_w, sheet_h, self.background, alpha);
        let mut cues = Vec::with_capacity(stills.len());
        for (i, s) in stills.iter().enumerate() {
            let (c, r) = (i as u32 % cols, i as u32 / cols);
            let x = self.spacing + c * (tw + self.spacing);
            let y = self.spacing + r * (th + self.spacing);
            // Fit inside the tile keeping aspect; centre on the background.
            let (iw, ih) = (s.image.width().max(1), s.image.height().max(1));
            let scale = (f64::from(tw) / f64::from(iw)).min(f64::from(th) / f64::from(ih));
            let (dw, dh) = (
                ((f64::from(iw) * scale).round() as u32).clamp(1, tw),
                ((f64::from(ih) * scale).round() as u32).clamp(1, th),
            );
            let tile = if (dw, dh) == (iw, ih) {
                s.image.clone()
            } else {
                resample(&s.image, (0.0, 0.0, f64::from(iw), f64::from(ih)), (dw, dh), Kernel::Lanczos3)?
            };
            raster::paste(&mut sheet, &tile, x + (tw - dw) / 2, y + (th - dh) / 2);
            let end = s.pos.time_ms + s.pos.duration_ms;
            // A cue runs until the next tile's frame starts (or the frame's own end).
            let end = stills.get(i + 1).map_or(end, |next| next.pos.time_ms.max(s.pos.time_ms));
            cues.push(Cue { start_ms: s.pos.time_ms, end_ms: end, x, y, width: tw, height: th });
        }
        Ok((sheet, cues))
    }
}

/// A WebVTT storyboard: one cue per tile, pointing at `image_url#xywh=x,y,w,h`.
pub fn webvtt(cues: &[Cue], image_url: &str) -> String {
    let ts = |ms: u64| format!("{:02}:{:02}:{:02}.{:03}", ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    let mut out = String::from("WEBVTT\n");
    for c in cues {
        out.push_str(&format!(
            "\n{} --> {}\n{image_url}#xywh={},{},{},{}\n",
            ts(c.start_ms),
            ts(c.end_ms),
            c.x,
            c.y,
            c.width,
            c.height
        ));
    }
    out
}

/// Fills `{n}` (frame number) and `{ms}` (time) in an output name for one frame.
pub fn frame_name(template: &str, pos: FramePos) -> String {
    template.replace("{n}", &pos.index.to_string()).replace("{ms}", &pos.time_ms.to_string())
}

/// Whether an output name tells frames apart.
pub fn names_frames(template: &str) -> bool {
    template.contains("{n}") || template.contains("{ms}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(pairs: &[(&str, &str)]) -> Result<Select> {
        Select::from_args(&Args::parse(&FRAMES, pairs.iter().copied())?)
    }

    fn param_of(e: Error) -> String {
        match e {
            Error::BadParameter { param, .. } => param,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn selectors_parse_and_conflict() {
        assert_eq!(select(&[]).unwrap(), Select::All);
        assert_eq!(select(&[("times", "0, 1.5")]).unwrap(), Select::Times(vec![0, 1500]));
        assert_eq!(select(&[("interval", "0.25")]).unwrap(), Select::IntervalMs(250));
        assert_eq!(param_of(select(&[("every", "2"), ("count", "3")]).unwrap_err()), "count");
        assert_eq!(param_of(select(&[("indices", "1,x")]).unwrap_err()), "indices");
        assert_eq!(param_of(select(&[("times", "-1")]).unwrap_err()), "times");
        assert_eq!(param_of(select(&[("every", "0")]).unwrap_err()), "every");
    }

    #[test]
    fn selections_map_to_frames_in_time_order() {
        // Four frames of 100 ms each: 0-100, 100-200, 200-300, 300-400.
        let starts = [0, 100, 200, 300];
        let r = |s: Select| s.resolve(&starts, 400);
        assert_eq!(r(Select::All).unwrap(), [0, 1, 2, 3]);
        assert_eq!(r(Select::Every(3)).unwrap(), [0, 3]);
        assert_eq!(r(Select::Indices(vec![3, 1, 3])).unwrap(), [1, 3]);
        assert_eq!(r(Select::Times(vec![150, 399, 400, 0, 50])).unwrap(), [0, 1, 3]);
        assert_eq!(r(Select::IntervalMs(150)).unwrap(), [0, 1, 3]);
        assert_eq!(r(Select::Count(2)).unwrap(), [1, 3], "midpoints of two 200 ms spans: 100 and 300 ms");
        assert_eq!(param_of(r(Select::Indices(vec![4])).unwrap_err()), "indices");
        assert_eq!(param_of(r(Select::Times(vec![401])).unwrap_err()), "times");
    }

    fn still(i: u32, color: [u8; 4]) -> Still {
        let image = raster::canvas(10, 10, Color(color), false);
        Still { image, pos: FramePos { index: i, time_ms: u64::from(i) * 100, duration_ms: 100 } }
    }

    #[test]
    fn sprite_lays_tiles_out_with_spacing_and_cues() {
        let colours = [[255, 0, 0, 255], [0, 255, 0, 255], [0, 0, 255, 255], [255, 255, 0, 255], [0, 255, 255, 255]];
        let stills: Vec<Still> = colours.iter().enumerate().map(|(i, c)| still(i as u32 * 2, *c)).collect();
        let s = Sprite { columns: Some(3), width: None, height: None, spacing: 2, background: Color::WHITE, vtt: true };
        let (sheet, cues) = s.apply(&stills, &Limits::default()).unwrap();
        assert_eq!((sheet.width(), sheet.height()), (3 * 12 + 2, 2 * 12 + 2));
        let rgb = sheet.to_rgb8();
        for (i, c) in colours.iter().enumerate() {
            let (x, y) = (2 + (i as u32 % 3) * 12, 2 + (i as u32 / 3) * 12);
            assert_eq!(rgb.get_pixel(x + 5, y + 5).0, c[..3], "tile {i}");
            assert_eq!(cues[i], Cue { start_ms: i as u64 * 200, end_ms: cues[i].end_ms, x, y, width: 10, height: 10 });
        }
        assert_eq!(rgb.get_pixel(1, 1).0, [255, 255, 255], "spacing shows the background");
        assert_eq!(rgb.get_pixel(30, 20).0, [255, 255, 255], "the empty sixth tile too");
        // Each cue ends where the next tile's frame starts; the last at its frame's end.
        assert_eq!(cues.iter().map(|c| c.end_ms).collect::<Vec<_>>(), [200, 400, 600, 800, 900]);
    }

    #[test]
    fn sprite_scales_tiles_keeping_aspect_and_respects_limits() {
        let stills = vec![still(0, [9, 9, 9, 255])];
        let s = Sprite {
            columns: None,
            width: Some(40),
            height: Some(20),
            spacing: 0,
            background: Color::BLACK,
            vtt: false,
        };
        let (sheet, _) = s.apply(&stills, &Limits::default()).unwrap();
        let rgb = sheet.to_rgb8();
        assert_eq!((rgb.width(), rgb.height()), (40, 20));
        assert_eq!(rgb.get_pixel(20, 10).0, [9, 9, 9], "20x20 tile centred");
        assert_eq!(rgb.get_pixel(2, 10).0, [0, 0, 0], "pillarbox");
        let huge = Sprite { width: Some(4096), height: Some(4096), ..s };
        let many: Vec<Still> = (0..9).map(|i| still(i, [0, 0, 0, 255])).collect();
        let err = huge.apply(&many, &Limits::default()).unwrap_err();
        assert_eq!(err.code(), "limit_exceeded");
    }

    #[test]
    fn zero_delays_play_as_browsers_play_them() {
        let frames: Vec<_> =
            (0..4).map(|i| (raster::canvas(2, 2, Color::BLACK, false), if i == 3 { 40 } else { 0 })).collect();
        let picked = pick(frames, &Select::Times(vec![250])).unwrap();
        assert_eq!(picked[0].pos, FramePos { index: 2, time_ms: 200, duration_ms: 100 });
    }

    #[test]
    fn webvtt_cues_and_frame_names() {
        let cues = [Cue { start_ms: 3_723_004, end_ms: 3_725_000, x: 0, y: 90, width: 160, height: 90 }];
        assert_eq!(webvtt(&cues, "s.jpg"), "WEBVTT\n\n01:02:03.004 --> 01:02:05.000\ns.jpg#xywh=0,90,160,90\n");
        let pos = FramePos { index: 7, time_ms: 1400, duration_ms: 100 };
        assert_eq!(frame_name("f-{n}-{ms}.png", pos), "f-7-1400.png");
        assert!(names_frames("a{ms}.png") && !names_frames("a.png"));
    }
}
