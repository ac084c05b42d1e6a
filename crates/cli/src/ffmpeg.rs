//! Optional decoder for formats without a bundled one (AVIF, HEIC), backed by the `ffmpeg`
//! program when it is on PATH. The engine stays free of process spawning; it only sees the
//! `ForeignDecoder` trait.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pixflow_imageops::{DecodeOptions, Error, ForeignDecoder, Format, Limits};

/// `ffmpeg` (or `$PIXFLOW_FFMPEG`), looked for only when a file actually needs it: starting
/// ffmpeg costs tens of milliseconds and megabytes that most requests never need.
pub struct Ffmpeg {
    program: String,
    available: OnceLock<bool>,
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
        let fail = |detail: String| Error::Corrupt { format: "ffmpeg", detail };
        let mut child = Command::new(&self.program)
            .args(["-v", "error", "-i", "pipe:0", "-frames:v", "1", "-f", "image2pipe", "-vcodec", "png", "pipe:1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("cannot start ffmpeg: {e}")))?;
        let mut stdin = child.stdin.take().ok_or_else(|| fail("no stdin".into()))?;
        let input = bytes.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let mut stdout = child.stdout.take().ok_or_else(|| fail("no stdout".into()))?;
        let cap = limits.max_source_pixels.saturating_mul(8).saturating_add(1 << 20);
        let mut png = Vec::new();
        let reader = std::thread::spawn(move || {
            let _ = (&mut stdout).take(cap).read_to_end(&mut png);
            png
        });
        // Drain stderr concurrently (keeping its start) so a chatty ffmpeg never blocks on a
        // full pipe.
        let mut stderr = child.stderr.take().ok_or_else(|| fail("no stderr".into()))?;
        let complaints = std::thread::spawn(move || {
            let mut head = Vec::new();
            let _ = (&mut stderr).take(4096).read_to_end(&mut head);
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
                return Err(Error::Timeout { op: "ffmpeg decode".into(), limit_ms: limits.max_op_millis });
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let _ = writer.join();
        let png = reader.join().map_err(|_| fail("reader thread failed".into()))?;
        let err = complaints.join().unwrap_or_default();
        if !status.success() || png.is_empty() {
            // ffmpeg cannot tell "damaged" from "a variant it does not read" (Debian's 5.1 has
            // no HEIF demuxer), so this is reported as unsupported, with ffmpeg's own words.
            let said: String = err.trim().chars().take(300).collect();
            return Err(Error::Unsupported {
                format: format.name().into(),
                hint: Some(format!("the installed ffmpeg could not decode it: {said}")),
            });
        }
        let opts = DecodeOptions { limits: *limits, ..DecodeOptions::default() };
        Ok(Some(pixflow_imageops::decode::decode(&png, &opts)?.image))
    }
}
