//! Corpus robustness suite: every file under `$PIXFLOW_CORPUS` (real photos, GIFs, videos and
//! deliberately broken files) must either process or fail with a typed error, never panic,
//! and what the engine reports must match what the file name says (`_WxH`, `_Nf`).
//! Runs with the README's test command when `PIXFLOW_CORPUS` names the corpus folder (`.ci/run`
//! points it at `../shared/corpus`); without it, the suite says it was skipped.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use pixflow_imageops::{EncodeOptions, Limits, MediaKind, OutFormat, Pipeline, RunOptions, probe};

/// The corpus folder `PIXFLOW_CORPUS` names; unset, the suite is skipped and says so (past the
/// test harness's capture) once.
fn corpus_dir() -> Option<PathBuf> {
    let Some(dir) = std::env::var_os("PIXFLOW_CORPUS").map(PathBuf::from) else {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "note: skipped the corpus robustness suite; set PIXFLOW_CORPUS to the shared corpus folder (as .ci/run does)"
            );
        });
        return None;
    };
    assert!(dir.is_dir(), "PIXFLOW_CORPUS is set but {} is not a directory", dir.display());
    Some(dir)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in std::fs::read_dir(dir).unwrap() {
        let sub = sub.unwrap().path();
        if sub.is_dir() {
            for f in std::fs::read_dir(&sub).unwrap() {
                out.push(f.unwrap().path());
            }
        }
    }
    out.sort();
    out
}

/// Facts the corpus documents for each file in SOURCES.md's table: (WxH, frames).
/// What SOURCES.md says about one file.
#[derive(Debug, Clone, Copy)]
struct Documented {
    size: Option<(u32, u32)>,
    frames: Option<u64>,
}

fn documented_facts(dir: &Path) -> std::collections::HashMap<String, Documented> {
    let text = std::fs::read_to_string(dir.join("SOURCES.md")).expect("corpus SOURCES.md");
    let mut facts = std::collections::HashMap::new();
    for line in text.lines().filter(|l| l.starts_with("| `")) {
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        let (file, what) = (cols[1].trim_matches('`'), cols[2]);
        let mut size = None;
        let mut frames = None;
        let words: Vec<&str> = what.split([' ', ',']).filter(|w| !w.is_empty()).collect();
        for (i, w) in words.iter().enumerate() {
            if let Some((a, b)) = w.split_once('x')
                && let (Ok(a), Ok(b)) = (a.parse(), b.parse())
            {
                size = Some((a, b));
            }
            if *w == "frames" {
                frames = words.get(i.wrapping_sub(1)).and_then(|n| n.parse().ok());
            }
        }
        facts.insert(file.to_owned(), Documented { size, frames });
    }
    facts
}

/// Files outside `malformed/` that are truncated all the same (cut short by their packagers).
const ALSO_TRUNCATED: &[&str] = &["jpeg/ultrahdr_gainmap_1512x2688.jpg"];

/// What damaged files may be refused as.
const MALFORMED_CODES: &[&str] = &["truncated_input", "corrupt_input"];

#[derive(Debug)]
enum Outcome {
    Processed(usize),
    Refused(&'static str),
}

fn check_file(path: &Path, rel: &str, documented: Documented) -> Result<Outcome, String> {
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    let dir = path.parent().unwrap().file_name().unwrap().to_string_lossy().to_string();
    let dir = if ALSO_TRUNCATED.contains(&rel) { "malformed".to_string() } else { dir };
    let bytes = std::fs::read(path).unwrap();
    let limits = Limits::default();

    let p = match probe(&bytes, &limits, None) {
        Ok(p) => Some(p),
        Err(e) if dir == "malformed" => {
            if !MALFORMED_CODES.contains(&e.code()) {
                return Err(format!("probe refused damage as `{}`: {e}", e.code()));
            }
            None
        }
        Err(e) => return Err(format!("probe failed on a valid file: {e}")),
    };
    if let Some(p) = &p {
        let Documented { size, frames } = documented;
        let malformed = dir == "malformed";
        if dir == "fonts" {
            if p.kind != MediaKind::Unsupported {
                return Err(format!("a font probed as {:?}", p.kind));
            }
        } else if !malformed && p.format.is_none() {
            return Err("probe did not recognise the format".into());
        }
        if let Some((w, h)) = size
            && !malformed
            && p.width.is_some()
            && (p.width, p.height) != (Some(w), Some(h))
        {
            return Err(format!("probe says {:?}x{:?}, SOURCES.md says {w}x{h}", p.width, p.height));
        }
        if let Some(n) = frames
            && !malformed
            && p.frames != Some(n)
        {
            return Err(format!("probe says {:?} frames, SOURCES.md says {n}", p.frames));
        }
        if name.contains("anim") && !malformed && p.kind != MediaKind::Animated {
            return Err(format!("animated file probed as {:?}", p.kind));
        }
        if dir == "video" && p.kind != MediaKind::Video {
            return Err(format!("video probed as {:?}", p.kind));
        }
        if dir == "video" && name.ends_with(".mp4") && p.duration_ms.is_none_or(|d| d < 1000) {
            return Err(format!("mp4 duration {:?}", p.duration_ms));
        }
    }

    let pipeline =
        Pipeline::from_steps([("resize", vec![("width", "256"), ("height", "256")]), ("sharpen", vec![])]).unwrap();
    let webp = EncodeOptions { format: Some(OutFormat::Webp), ..Default::default() };
    match pipeline.run(&bytes, &RunOptions { limits, final_output: Some(&webp), ..Default::default() }) {
        Ok(out) => {
            let r = &out[0];
            if r.width > 256 || r.height > 256 || r.bytes.is_empty() {
                return Err(format!("bad rendition {}x{}", r.width, r.height));
            }
            if dir == "malformed" && !name.starts_with("png_content") {
                return Err("a truncated/broken file processed as if whole".into());
            }
            if let Some(n) = documented.frames.filter(|&n| n > 1) {
                let back = probe(&r.bytes, &limits, None).map_err(|e| e.to_string())?;
                if back.frames != Some(n) {
                    return Err(format!("animation came out with {:?} frames, not {n}", back.frames));
                }
            }
            Ok(Outcome::Processed(r.bytes.len()))
        }
        Err(e) => {
            // Refusals the engine is expected to make today: damage, containers that need a
            // frame operation, formats without a bundled decoder, fonts.
            let expected = matches!(dir.as_str(), "malformed" | "video" | "avif" | "fonts");
            if !expected {
                return Err(format!("valid file refused: {e}"));
            }
            // Damage is named as damage (a damaged video is first told to pick frames, which
            // `specific_corpus_expectations` does); nothing is ever an internal error.
            let video = p.as_ref().is_some_and(|p| p.kind == MediaKind::Video);
            let named = MALFORMED_CODES.contains(&e.code()) || video && e.code() == "bad_parameter";
            if dir == "malformed" && !named || e.code() == "internal" {
                return Err(format!("refused as `{}`: {e}", e.code()));
            }
            Ok(Outcome::Refused(e.code()))
        }
    }
}

#[test]
fn every_corpus_file_processes_or_fails_cleanly() {
    let Some(dir) = corpus_dir() else { return };
    let all = files(&dir);
    let facts = documented_facts(&dir);
    assert!(all.len() >= 60, "corpus at {} looks incomplete ({} files)", dir.display(), all.len());
    let mut failures = Vec::new();
    let (mut processed, mut refused) = (0, 0);
    for path in &all {
        let rel = path.strip_prefix(&dir).unwrap().display().to_string();
        let Some(documented) = facts.get(&rel).copied() else {
            failures.push(format!("{rel}: not documented in SOURCES.md"));
            continue;
        };
        match catch_unwind(AssertUnwindSafe(|| check_file(path, &rel, documented))) {
            Ok(Ok(Outcome::Processed(n))) => {
                processed += 1;
                eprintln!("ok       {rel}: {n} bytes");
            }
            Ok(Ok(Outcome::Refused(code))) => {
                refused += 1;
                eprintln!("refused  {rel}: {code}");
            }
            Ok(Err(why)) => failures.push(format!("{rel}: {why}")),
            Err(_) => failures.push(format!("{rel}: PANIC")),
        }
    }
    eprintln!("corpus: {processed} processed, {refused} refused cleanly, {} wrong", failures.len());
    assert!(failures.is_empty(), "corpus failures:\n{}", failures.join("\n"));
}

#[test]
fn specific_corpus_expectations() {
    let Some(dir) = corpus_dir() else { return };
    let read = |p: &str| std::fs::read(dir.join(p)).unwrap();
    let limits = Limits::default();
    let run = |bytes: &[u8]| Pipeline::default().run(bytes, &RunOptions::default());

    // Content sniffing ignores the misleading extension.
    let p = probe(&read("malformed/png_content_with_jpg_extension.jpg"), &limits, None).unwrap();
    assert_eq!(p.format, Some(pixflow_imageops::Format::Png));

    // Truncations are refused with the right code, and the header-only JPEG is not grey-filled.
    for f in [
        "jpeg/ultrahdr_gainmap_1512x2688.jpg",
        "malformed/header_only_1000B_kleiber.jpg",
        "malformed/pillow_truncated_jpeg.jpg",
        "malformed/trunc50pct_medium_fallenleaf.jpg",
    ] {
        assert_eq!(run(&read(f)).unwrap_err().code(), "truncated_input", "{f}");
    }
    assert_eq!(run(&read("malformed/empty_0B.jpg")).unwrap_err().code(), "truncated_input");

    // A truncated MP4 whose moov is lost is still identified, with the problem reported.
    let p = probe(&read("malformed/trunc30pct_bigbuckbunny.mp4"), &limits, None).unwrap();
    assert_eq!(p.kind, MediaKind::Video);
    assert!(p.problem.is_some());

    // The video length limit is reported by probe (5.28 s clip against a 5 s limit).
    let short = Limits { max_video_seconds: 5, ..Limits::default() };
    let p = probe(&read("video/bigbuckbunny_h264_1280x720_5s.mp4"), &short, None).unwrap();
    let problem = p.problem.expect("over the video limit");
    assert_eq!(problem.code, "limit_exceeded");
    assert!(problem.message.contains("max_video_seconds is 5, input needs 6"), "{}", problem.message);
    assert!(probe(&read("video/bigbuckbunny_h264_1280x720_5s.mp4"), &limits, None).unwrap().problem.is_none());

    // EXIF orientation 6 and 8 are applied; 4 (vertical mirror) keeps the size.
    let p = probe(&read("jpeg/exif_orientation_4_sasha.jpg"), &limits, None).unwrap();
    assert_eq!(p.orientation, Some(4));
    let out = run(&read("jpeg/exif_orientation_4_sasha.jpg")).unwrap();
    assert_eq!((out[0].width, out[0].height), (204, 247));

    // CMYK comes out as colour, not inverted: the sample's background is white paper.
    let out = run(&read("jpeg/cmyk_1000x1000.jpg")).unwrap();
    let img = image::load_from_memory(&out[0].bytes).unwrap().to_rgb8();
    let corner = img.get_pixel(5, 5);
    assert!(corner.0.iter().all(|&c| c > 230), "CMYK paper should be white, got {corner:?}");

    // ICC profiles are kept by default (Adobe RGB rocket) and the output carries it.
    let src = read("jpeg/small_rocket_427x640_adobergb.jpg");
    let out = run(&src).unwrap();
    let h = pixflow_imageops::decode::read_header(&out[0].bytes, &limits).unwrap();
    assert_eq!(h.icc, pixflow_imageops::decode::read_header(&src, &limits).unwrap().icc);

    // AVIF without a foreign decoder is a clear "unsupported" naming the format.
    let err = run(&read("avif/irot0_imir0_640x427.avif")).unwrap_err();
    assert_eq!(err.code(), "unsupported_format");
    assert!(err.to_string().contains("avif") && err.to_string().contains("ffmpeg"), "{err}");

    // A 20 MP JPEG thumbnail decodes at 1/4 scale and stays sharp enough to be useful.
    let big = read("jpeg/large_kleiber_6028x3391.jpg");
    let p = Pipeline::from_steps([("resize", vec![("width", "800"), ("height", "800")])]).unwrap();
    let out = p.run(&big, &RunOptions::default()).unwrap();
    assert_eq!((out[0].width, out[0].height), (800, 450));
}

/// Every real animation in the corpus gives evenly spaced stills and a full storyboard.
#[test]
fn animations_give_frames_and_storyboards() {
    let Some(dir) = corpus_dir() else { return };
    let mut checked = 0;
    for (rel, facts) in documented_facts(&dir) {
        let Some(n) = facts.frames.filter(|&n| n > 1 && !rel.starts_with("malformed/")) else { continue };
        let Some((w, h)) = facts.size else { continue };
        let bytes = std::fs::read(dir.join(&rel)).unwrap();
        let stills = Pipeline::from_steps([("frames", vec![("count", "4")])]).unwrap();
        let out = stills.run(&bytes, &RunOptions::default()).unwrap_or_else(|e| panic!("{rel}: {e}"));
        let indices: Vec<u32> = out.iter().map(|r| r.frame.unwrap().index).collect();
        assert_eq!(indices.len(), 4, "{rel}: {indices:?}");
        assert!(indices.windows(2).all(|p| p[0] < p[1]) && u64::from(indices[3]) < n, "{rel}: {indices:?}");
        assert!(out.iter().all(|r| (r.width, r.height) == (w, h) && r.format == OutFormat::Png), "{rel}");

        let sheet =
            Pipeline::from_steps([("sprite", vec![("columns", "8"), ("width", "64"), ("vtt", "true")])]).unwrap();
        let out = sheet.run(&bytes, &RunOptions::default()).unwrap_or_else(|e| panic!("{rel}: {e}"));
        let rows = n.div_ceil(8) as u32;
        let tile_h = (u64::from(h) * 64 / u64::from(w)).max(1) as u32;
        assert_eq!((out[0].width, out[0].height), (8.min(n as u32) * 64, rows * tile_h), "{rel}");
        assert_eq!(out[0].cues.len() as u64, n, "{rel}");
        assert!(out[0].cues.windows(2).all(|c| c[0].end_ms == c[1].start_ms), "{rel}: cues must be contiguous");
        checked += 1;
    }
    assert!(checked >= 4, "expected the corpus's animated GIF/WebP/APNG files, found {checked}");
}

/// The corpus fonts as `text` inputs: Arabic is joined (contextual shaping, not isolated
/// glyphs), and an OpenType CFF font draws.
#[test]
fn text_with_corpus_fonts() {
    let Some(dir) = corpus_dir() else { return };
    let base = std::fs::read(dir.join("png/coffee_600x400_rgb.png")).unwrap();
    let ink_width = |font: &str, text: &str| {
        let mut inputs = std::collections::BTreeMap::new();
        inputs.insert("f".to_owned(), std::fs::read(dir.join(font)).unwrap());
        let p = Pipeline::from_steps([(
            "text",
            vec![("text", text), ("font", "f"), ("size", "80"), ("color", "#ff00ff"), ("gravity", "northwest")],
        )])
        .unwrap();
        let png = EncodeOptions { format: Some(OutFormat::Png), ..Default::default() };
        let opts = RunOptions { final_output: Some(&png), inputs: Some(&inputs), ..Default::default() };
        let out = p.run(&base, &opts).unwrap_or_else(|e| panic!("{font}: {e}"));
        let img = image::load_from_memory(&out[0].bytes).unwrap().to_rgb8();
        let magenta: Vec<u32> =
            img.enumerate_pixels().filter(|(_, _, p)| p.0 == [255, 0, 255]).map(|(x, _, _)| x).collect();
        assert!(magenta.len() > 200, "{font}: {text} drew {} solid pixels", magenta.len());
        magenta.iter().max().unwrap() - magenta.iter().min().unwrap()
    };
    // سلام joined is much narrower than its letters forced apart by zero-width non-joiners.
    let joined = ink_width("fonts/DejaVuSans.ttf", "سلام");
    let isolated = ink_width("fonts/DejaVuSans.ttf", "س\u{200C}ل\u{200C}ا\u{200C}م");
    assert!(joined * 5 < isolated * 4, "joined {joined} px vs isolated {isolated} px");
    assert!(ink_width("fonts/League_Gothic.otf", "PIXFLOW") > 100);
}

/// Real videos: H.264 MP4s give frames at the asked times (B-frames included); other codecs
/// and damaged files are typed refusals.
#[test]
fn video_frames_from_real_files() {
    let Some(dir) = corpus_dir() else { return };
    let read = |p: &str| std::fs::read(dir.join(p)).unwrap();
    let run = |p: &str, steps: Vec<(&str, Vec<(&str, &str)>)>| {
        Pipeline::from_steps(steps).unwrap().run(&read(p), &RunOptions::default())
    };
    let out = run("video/bigbuckbunny_h264_1280x720_5s.mp4", vec![("frames", vec![("times", "0,2.5,5")])]).unwrap();
    let got: Vec<_> =
        out.iter().map(|r| (r.frame.unwrap().index, r.frame.unwrap().time_ms, r.width, r.height)).collect();
    assert_eq!(got, [(0, 0, 1280, 720), (62, 2480, 1280, 720), (125, 5000, 1280, 720)]);
    // Frames of a real clip differ from each other (a stuck decoder would repeat one).
    assert_ne!(out[0].bytes, out[1].bytes);
    let small =
        run("video/bigbuckbunny_h264_1280x720_5s.mp4", vec![("frames", vec![("count", "10"), ("width", "320")])])
            .unwrap();
    assert!(small.len() == 10 && small.iter().all(|r| (r.width, r.height) == (320, 180)));
    let out = run(
        "video/carphone_h264_176x144_4s.mp4",
        vec![("frames", vec![("count", "6")]), ("sprite", vec![("columns", "3"), ("vtt", "true")])],
    )
    .unwrap();
    assert_eq!((out[0].width, out[0].height, out[0].cues.len()), (3 * 176, 2 * 144, 6));
    let err = run("video/cube_mpeg1_384x288.mpeg", vec![("frames", vec![("count", "2")])]).unwrap_err();
    assert_eq!(err.code(), "unsupported_format");
    let err = run("malformed/trunc30pct_bigbuckbunny.mp4", vec![("frames", vec![])]).unwrap_err();
    assert_eq!(err.code(), "truncated_input", "{err}");
    let short = Limits { max_video_seconds: 4, ..Limits::default() };
    let p = Pipeline::from_steps([("frames", vec![("times", "1")])]).unwrap();
    let err =
        p.run(&read("video/bigbuckbunny_h264_1280x720_5s.mp4"), &RunOptions { limits: short, ..Default::default() });
    assert_eq!(err.unwrap_err().code(), "limit_exceeded");
}

/// The real Big Buck Bunny clip remuxed by ffmpeg (no re-encoding) into an MPEG-TS segment and
/// a fragmented MP4, the latter also split into init and media segments: the same frames come
/// out of every form. The corpus suite needs the ffmpeg CLI for this (`.ci/run` installs it).
#[test]
fn video_segments_remuxed_by_ffmpeg() {
    let Some(dir) = corpus_dir() else { return };
    let src = dir.join("video/bigbuckbunny_h264_1280x720_5s.mp4");
    let tmp = std::env::temp_dir().join(format!("pixflow-remux-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let remux = |out: &str, extra: &[&str]| {
        let path = tmp.join(out);
        let status = std::process::Command::new("ffmpeg")
            .args(["-v", "error", "-y", "-i"])
            .arg(&src)
            .args(["-an", "-c:v", "copy"])
            .args(extra)
            .arg(&path)
            .status()
            .expect("the corpus suite needs the ffmpeg CLI to remux its test video (apt-get install ffmpeg)");
        assert!(status.success(), "ffmpeg failed for {out}");
        std::fs::read(path).unwrap()
    };
    let ts = remux("bbb.ts", &["-bsf:v", "h264_mp4toannexb", "-f", "mpegts"]);
    let fmp4 = remux("bbb.mp4", &["-movflags", "+frag_keyframe+empty_moov+default_base_moof", "-f", "mp4"]);
    let moof = fmp4.windows(4).position(|w| w == b"moof").unwrap() - 4;
    let (init, segment) = fmp4.split_at(moof);
    let steps = || Pipeline::from_steps([("frames", vec![("times", "0,2.5"), ("init", "init")])]).unwrap();
    let plain = || Pipeline::from_steps([("frames", vec![("times", "0,2.5")])]).unwrap();
    let png = EncodeOptions { format: Some(OutFormat::Png), ..Default::default() };
    let original = plain()
        .run(&std::fs::read(&src).unwrap(), &RunOptions { final_output: Some(&png), ..Default::default() })
        .unwrap();
    let inputs = std::collections::BTreeMap::from([("init".to_owned(), init.to_vec())]);
    let forms = [
        ("mpeg-ts", plain().run(&ts, &RunOptions { final_output: Some(&png), ..Default::default() }).unwrap()),
        ("fmp4", plain().run(&fmp4, &RunOptions { final_output: Some(&png), ..Default::default() }).unwrap()),
        (
            "init + segment",
            steps()
                .run(segment, &RunOptions { final_output: Some(&png), inputs: Some(&inputs), ..Default::default() })
                .unwrap(),
        ),
    ];
    for (form, out) in forms {
        assert_eq!(out.len(), 2, "{form}");
        for (a, b) in out.iter().zip(&original) {
            assert_eq!(a.frame.map(|f| f.time_ms), b.frame.map(|f| f.time_ms), "{form}");
            assert!(a.bytes == b.bytes, "{form}: frame at {:?} differs from the MP4's", a.frame);
        }
    }
    let p = probe(&ts, &Limits::default(), None).unwrap();
    assert_eq!((p.width, p.height, p.frames, p.kind), (Some(1280), Some(720), Some(132), MediaKind::VideoSegment));
    std::fs::remove_dir_all(&tmp).ok();
}
