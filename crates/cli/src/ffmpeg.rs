//! Optional decoder for what has no bundled decoder: AVIF/HEIC stills, and video in codecs or
//! containers other than H.264 in MP4/MOV/TS (HEVC, VP9, AV1, MPEG-1/2, ...), backed by the
//! `ffmpeg` program when it is on PATH. The engine stays free of process spawning; it only sees
//! the `ForeignDecoder` trait.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pixflow_imageops::sequence::{FramePos, Select, Still};
use pixflow_imageops::{DecodeOptions, Error, ForeignDecoder, Format, Limits};

/// `ffmpeg` (or `$PIXFLOW_FFMPEG`), looked for only when a file actually needs it: starting
/// ffmpeg costs tens of milliseconds and megabytes that most requests never need.
pub struct Ffmpeg {
    program: String,
    available: OnceLock<bool>,
}

/// What one ffmpeg run left behind.
struct Run {
    ok: bool,
    stdout: Vec<u8>,
    /// The start of stderr (enough for errors and per-frame `showinfo` lines).
    stderr: String,
}

fn fail(detail: impl Into<String>) -> Error {
    Error::Corrupt { format: "ffmpeg", detail: detail.into() }
}

/// A file holding the input for ffmpeg (video needs a seekable input); removed on drop.
/// Created with a random name, exclusively (never through an existing file or link) and
/// readable by this user only.
struct TempInput(std::path::PathBuf);

impl TempInput {
    fn new(bytes: &[u8]) -> pixflow_imageops::Result<Self> {
        use std::hash::{BuildHasher, Hasher};
        use std::os::unix::fs::OpenOptionsExt;
        for _ in 0..8 {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
            );
            let path = std::env::temp_dir().join(format!("pixflow-ffmpeg-{:016x}.bin", h.finish()));
            let file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path);
            match file {
                Ok(mut f) => {
                    let input = TempInput(path);
                    f.write_all(bytes).map_err(|e| fail(format!("cannot write a temporary file: {e}")))?;
                    return Ok(input);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(fail(format!("cannot create a temporary file: {e}"))),
            }
        }
        Err(fail("cannot create a temporary file with a fresh name"))
    }
}

impl Drop for TempInput {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Ffmpeg {
    pub fn new() -> Ffmpeg {
        let program = std::env::var("PIXFLOW_FFMPEG").unwrap_or_else(|_| "ffmpeg".into());
        Ffmpeg { program, available: OnceLock::new() }
    }

    fn available(&self) -> bool {
        *self.available.get_or_init(|| {
            Command::new(&self.program)
                .arg("-version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
    }

    /// Runs ffmpeg with `args`, feeding `stdin`, keeping at most `cap` bytes of its output,
    /// killing it at the time limit.
    fn run(&self, args: &[String], stdin: Option<Vec<u8>>, cap: u64, limits: &Limits) -> pixflow_imageops::Result<Run> {
        let mut child = Command::new(&self.program)
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("cannot start ffmpeg: {e}")))?;
        let writer = stdin.and_then(|input| {
            let mut pipe = child.stdin.take()?;
            Some(std::thread::spawn(move || {
                let _ = pipe.write_all(&input);
            }))
        });
        let mut stdout = child.stdout.take().ok_or_else(|| fail("no stdout"))?;
        let reader = std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = (&mut stdout).take(cap).read_to_end(&mut out);
            // Keep draining so ffmpeg never blocks on a full pipe; what is past the cap is
            // dropped (and reported as a limit by the caller).
            let past = std::io::copy(&mut stdout, &mut std::io::sink()).unwrap_or(0);
            (out, past > 0)
        });
        // Drain stderr concurrently (keeping its start) for the same reason.
        let mut stderr = child.stderr.take().ok_or_else(|| fail("no stderr"))?;
        let complaints = std::thread::spawn(move || {
            let mut head = Vec::new();
            let _ = (&mut stderr).take(4 << 20).read_to_end(&mut head);
            let _ = std::io::copy(&mut stderr, &mut std::io::sink());
            String::from_utf8_lossy(&head).into_owned()
        });
        let deadline = Instant::now() + Duration::from_millis(limits.max_op_millis);
        let status = loop {
            if let Some(s) = child.try_wait().map_err(|e| fail(e.to_string()))? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Timeout { op: "ffmpeg".into(), limit_ms: limits.max_op_millis });
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        if let Some(w) = writer {
            let _ = w.join();
        }
        let (stdout, overflow) = reader.join().map_err(|_| fail("reader thread failed"))?;
        if overflow {
            return Err(Error::LimitExceeded {
                limit: pixflow_imageops::LimitKind::SourcePixels,
                max: limits.max_source_pixels,
                actual: limits.max_source_pixels.saturating_add(1),
            });
        }
        let stderr = complaints.join().unwrap_or_default();
        Ok(Run { ok: status.success(), stdout, stderr })
    }

    /// The video stream's length: ffmpeg copies the stream to nowhere (no decoding) and its
    /// final `time=` is the end of the last frame. Container headers are not trusted: a bare
    /// elementary stream has none, and ffmpeg's estimate for one can be a single frame.
    fn duration_ms(&self, input: &TempInput, limits: &Limits) -> pixflow_imageops::Result<Option<u64>> {
        let path = input.0.to_string_lossy().into_owned();
        let args: Vec<String> =
            ["-hide_banner", "-nostdin", "-i", &path, "-map", "0:v:0", "-c", "copy", "-f", "null", "-"]
                .map(String::from)
                .to_vec();
        let run = self.run(&args, None, 1 << 16, limits)?;
        Ok(run.stderr.rsplit("time=").next().filter(|_| run.stderr.contains("time=")).and_then(|rest| {
            let hms: Vec<f64> =
                rest.split_whitespace().next()?.split(':').map(|p| p.trim().parse().ok()).collect::<Option<_>>()?;
            let [h, m, s] = hms[..] else { return None };
            Some(((h * 3600.0 + m * 60.0 + s) * 1000.0).round() as u64)
        }))
    }
}

/// Splits a stream of concatenated PNG files.
fn split_pngs(stream: &[u8]) -> Vec<&[u8]> {
    const IEND: &[u8] = b"IEND\xAE\x42\x60\x82";
    let mut out = Vec::new();
    let mut start = 0;
    while let Some(at) = stream[start..].windows(IEND.len()).position(|w| w == IEND) {
        let end = start + at + IEND.len();
        out.push(&stream[start..end]);
        start = end;
    }
    out
}

/// `pts_time` of each frame `showinfo` reported, in order.
fn shown_times(stderr: &str) -> Vec<u64> {
    stderr
        .lines()
        .filter(|l| l.contains("Parsed_showinfo"))
        .filter_map(|l| l.split("pts_time:").nth(1)?.split_whitespace().next()?.parse::<f64>().ok())
        .map(|t| (t.max(0.0) * 1000.0).round() as u64)
        .collect()
}

impl ForeignDecoder for Ffmpeg {
    fn decode(
        &self,
        format: Format,
        bytes: &[u8],
        limits: &Limits,
    ) -> pixflow_imageops::Result<Option<image::DynamicImage>> {
        if !self.available() {
            return Ok(None);
        }
        let args: Vec<String> =
            ["-v", "error", "-i", "pipe:0", "-frames:v", "1", "-f", "image2pipe", "-vcodec", "png", "pipe:1"]
                .map(String::from)
                .to_vec();
        let cap = limits.max_source_pixels.saturating_mul(8).saturating_add(1 << 20);
        let run = self.run(&args, Some(bytes.to_vec()), cap, limits)?;
        if !run.ok || run.stdout.is_empty() {
            // ffmpeg cannot tell "damaged" from "a variant it does not read" (Debian's 5.1 has
            // no HEIF demuxer), so this is reported as unsupported, with ffmpeg's own words.
            let said: String = run.stderr.trim().chars().take(300).collect();
            return Err(Error::Unsupported {
                format: format.name().into(),
                hint: Some(format!("the installed ffmpeg could not decode it: {said}")),
            });
        }
        let opts = DecodeOptions { limits: *limits, ..DecodeOptions::default() };
        Ok(Some(pixflow_imageops::decode::decode(&run.stdout, &opts)?.image))
    }

    /// Frames through ffmpeg's `select` filter: frame-number selections by `n`, time selections
    /// as "the first frame at or after each time", keyframes by `key`. `showinfo` reports each
    /// picked frame's time. Frame numbers are exact for `every` and `indices`; for time and
    /// keyframe selections frames are numbered in the order they come out.
    fn video_frames(
        &self,
        format: Format,
        bytes: &[u8],
        select: &Select,
        width: Option<u32>,
        limits: &Limits,
    ) -> pixflow_imageops::Result<Option<Vec<Still>>> {
        if !self.available() {
            return Ok(None);
        }
        let input = TempInput::new(bytes)?;
        let times = |ts: &[u64]| {
            ts.iter()
                .map(|ms| {
                    let t = *ms as f64 / 1000.0;
                    format!("gte(t\\,{t})*(lt(prev_pts*TB\\,{t})+isnan(prev_pts))")
                })
                .collect::<Vec<_>>()
                .join("+")
        };
        let duration = || -> pixflow_imageops::Result<u64> {
            // The length bounds every selection and the video limit.
            self.duration_ms(&input, limits)?.ok_or_else(|| Error::Unsupported {
                format: format!("{} frames", format.name()),
                hint: Some("ffmpeg reports no duration, so time-spaced frames cannot be placed".into()),
            })
        };
        let total = duration()?;
        let max_ms = limits.max_video_seconds.saturating_mul(1000);
        if total > max_ms {
            return Err(Error::LimitExceeded {
                limit: pixflow_imageops::LimitKind::VideoSeconds,
                max: limits.max_video_seconds,
                actual: total.div_ceil(1000),
            });
        }
        if let Select::Times(v) = select
            && let Some(late) = v.iter().find(|t| **t > total)
        {
            return Err(Error::BadParameter {
                op: "frames".into(),
                param: "times".into(),
                reason: format!("{:.3} s is past the end ({:.3} s)", *late as f64 / 1000.0, total as f64 / 1000.0),
            });
        }
        // Frame numbers are known for selections by number; otherwise frames are numbered in
        // the order they come out.
        let numbers: Option<Vec<u32>> = match select {
            Select::Every(k) => {
                Some((0..).map(|i: u32| i.saturating_mul(*k)).take(limits.max_frames as usize + 1).collect())
            }
            Select::Indices(v) => {
                let mut v = v.clone();
                v.sort_unstable();
                v.dedup();
                Some(v)
            }
            _ => None,
        };
        let expr = match select {
            Select::All => None,
            Select::Every(k) => Some(format!("not(mod(n\\,{k}))")),
            Select::Indices(v) => Some(v.iter().map(|i| format!("eq(n\\,{i})")).collect::<Vec<_>>().join("+")),
            Select::Keyframes => Some("eq(key\\,1)".to_owned()),
            Select::Times(v) => Some(times(v)),
            Select::IntervalMs(step) => {
                let ts: Vec<u64> = (0..)
                    .map(|k: u64| k.saturating_mul(*step))
                    .take_while(|t| *t < total.max(1))
                    .take(10_000)
                    .collect();
                Some(times(&ts))
            }
            Select::Count(c) => {
                let c = u64::from(*c);
                Some(times(
                    &(0..c).map(|k| ((2 * k + 1) as f64 * total as f64 / (2 * c) as f64) as u64).collect::<Vec<_>>(),
                ))
            }
        };
        let mut filter = expr.map_or("showinfo".to_owned(), |e| format!("select='{e}',showinfo"));
        if let Some(w) = width {
            // Scaled down (never up) in ffmpeg, keeping the aspect with an even height.
            filter.push_str(&format!(",scale='min({w},iw)':-2"));
        }
        let mut args: Vec<String> = ["-hide_banner", "-nostdin", "-nostats", "-v", "info"].map(String::from).to_vec();
        args.extend(["-i".into(), input.0.to_string_lossy().into_owned()]);
        args.extend(["-map", "0:v:0", "-an", "-vf"].map(String::from));
        args.push(filter);
        args.extend(["-fps_mode", "passthrough", "-frames:v"].map(String::from));
        args.push((limits.max_frames + 1).to_string());
        args.extend(["-f", "image2pipe", "-c:v", "png", "pipe:1"].map(String::from));
        let cap = limits.max_source_pixels.saturating_mul(4).saturating_add(1 << 20);
        let run = self.run(&args, None, cap, limits)?;
        if !run.ok {
            let said: String =
                run.stderr.lines().filter(|l| !l.contains("Parsed_showinfo")).collect::<Vec<_>>().join(" ");
            let said: String = said.trim().chars().rev().take(300).collect::<Vec<_>>().into_iter().rev().collect();
            return Err(Error::Unsupported {
                format: format.name().into(),
                hint: Some(format!("the installed ffmpeg could not decode it: {said}")),
            });
        }
        let pngs = split_pngs(&run.stdout);
        limits.check_frames(pngs.len() as u64)?;
        let times = shown_times(&run.stderr);
        let opts = DecodeOptions { limits: *limits, ..DecodeOptions::default() };
        let mut stills = Vec::with_capacity(pngs.len());
        // Kept pixels share one budget, as in the bundled decoder.
        let mut budget = limits.max_source_pixels;
        for (i, png) in pngs.into_iter().enumerate() {
            let time_ms = times.get(i).copied().unwrap_or(0);
            let next = times.get(i + 1).copied().unwrap_or(time_ms);
            let image = pixflow_imageops::decode::decode(png, &opts)?.image;
            let px = u64::from(image.width()) * u64::from(image.height());
            budget = budget.checked_sub(px).ok_or(Error::LimitExceeded {
                limit: pixflow_imageops::LimitKind::SourcePixels,
                max: limits.max_source_pixels,
                actual: limits.max_source_pixels.saturating_add(px),
            })?;
            let index = numbers.as_ref().and_then(|n| n.get(i).copied()).unwrap_or(i as u32);
            let pos = FramePos { index, time_ms, duration_ms: next.saturating_sub(time_ms) };
            stills.push(Still { image, pos });
        }
        Ok(Some(stills))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_streams_and_showinfo_lines_parse() {
        let png = |n: u8| [&b"\x89PNG"[..], &[n; 5], b"IEND\xAE\x42\x60\x82"].concat();
        let stream = [png(1), png(2)].concat();
        assert_eq!(split_pngs(&stream), [png(1).as_slice(), png(2).as_slice()]);
        let err = "[Parsed_showinfo_1 @ 0x5] n:   0 pts:      0 pts_time:0       duration:1\n\
                   other line pts_time:9\n\
                   [Parsed_showinfo_1 @ 0x5] n:   1 pts:  90000 pts_time:1.04    duration:1\n";
        assert_eq!(shown_times(err), [0, 1040]);
    }
}
