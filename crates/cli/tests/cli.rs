//! The CLI contract other tools and benchmarks rely on: the issue's example commands, probe
//! JSON, renditions, batch summaries and error exits, run against the real binary on fixtures
//! generated here.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `pixflow serve --config` and `pixflow config check`.
#[path = "cli/config.rs"]
mod config;

/// Two nodes sharing PostgreSQL, JetStream and an S3 service.
#[path = "cli/two_nodes.rs"]
mod two_nodes;

fn pixflow(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pixflow")).args(args).current_dir(cwd).output().expect("run pixflow")
}

/// Says on the terminal (past the test harness's capture) that part of a test did not run and
/// how to run it.
fn skipped(part: &str, how: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "note: skipped {part}; {how}");
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pixflow-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A photo-like JPEG fixture: smooth gradients plus a marker square in the top-left corner.
fn write_jpeg(path: &Path, w: u32, h: u32) {
    let mut im = image::RgbImage::new(w, h);
    for (x, y, p) in im.enumerate_pixels_mut() {
        *p = if x < w / 10 && y < h / 10 {
            image::Rgb([255, 0, 0])
        } else {
            image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 100])
        };
    }
    im.save_with_format(path, image::ImageFormat::Jpeg).unwrap();
}

fn dims(path: &Path) -> (u32, u32) {
    image::image_dimensions(path).unwrap()
}

#[test]
fn issue_examples_work() {
    let dir = temp_dir("examples");
    write_jpeg(&dir.join("big.jpg"), 2400, 1600);
    let out = pixflow(
        &[
            "run",
            "resize",
            "width=800",
            "height=800",
            "fit=inside",
            "--input",
            "big.jpg",
            "--output",
            "t.jpg",
            "--quality",
            "80",
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(dims(&dir.join("t.jpg")), (800, 533));

    let out = pixflow(
        &[
            "run",
            "crop",
            "x=780",
            "y=300",
            "width=1000",
            "height=1000",
            "+",
            "rotate",
            "angle=90",
            "--input",
            "big.jpg",
            "--output",
            "b.jpg",
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(dims(&dir.join("b.jpg")), (1000, 1000));

    let out = pixflow(&["run", "probe", "--input", "big.jpg"], &dir);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["format"], "jpeg");
    assert_eq!(v["kind"], "still");
    assert_eq!((v["width"].as_u64(), v["height"].as_u64()), (Some(2400), Some(1600)));
}

#[test]
fn output_format_follows_extension_unless_forced() {
    let dir = temp_dir("formats");
    write_jpeg(&dir.join("in.jpg"), 300, 200);
    assert!(pixflow(&["run", "flip", "--input", "in.jpg", "--output", "out.webp"], &dir).status.success());
    assert_eq!(&std::fs::read(dir.join("out.webp")).unwrap()[8..12], b"WEBP");
    assert!(
        pixflow(&["run", "flop", "--input", "in.jpg", "--output", "out.bin", "--format", "png"], &dir).status.success()
    );
    assert!(std::fs::read(dir.join("out.bin")).unwrap().starts_with(b"\x89PNG"));
}

#[test]
fn renditions_are_written_by_name() {
    let dir = temp_dir("renditions");
    write_jpeg(&dir.join("in.jpg"), 1200, 800);
    let out = pixflow(
        &[
            "run",
            "resize",
            "width=600",
            "+",
            "output",
            "name=m.jpg",
            "+",
            "resize",
            "width=150",
            "+",
            "output",
            "name=s.png",
            "--input",
            "in.jpg",
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(dims(&dir.join("m.jpg")), (600, 400));
    assert_eq!(dims(&dir.join("s.png")), (150, 100));
}

#[test]
fn errors_name_the_problem_and_fail() {
    let dir = temp_dir("errors");
    write_jpeg(&dir.join("in.jpg"), 100, 100);
    std::fs::write(dir.join("junk.jpg"), b"definitely not an image").unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["run", "resize", "width=-3", "--input", "in.jpg", "--output", "o.jpg"], "[bad_parameter]"),
        (&["run", "resize", "wdth=3", "--input", "in.jpg", "--output", "o.jpg"], "unknown parameter"),
        (&["run", "explode", "--input", "in.jpg", "--output", "o.jpg"], "[unknown_operation]"),
        (&["run", "flip", "--input", "junk.jpg", "--output", "o.jpg"], "[unsupported_format]"),
        (
            &["run", "flip", "--input", "in.jpg", "--output", "o.jpg", "--max-source-pixels", "100"],
            "max_source_pixels is 100",
        ),
        (&["run", "flip", "--input", "missing.jpg", "--output", "o.jpg"], "missing.jpg"),
    ];
    for (args, needle) in cases {
        let out = pixflow(args, &dir);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: `{err}` lacks `{needle}`");
    }
}

#[test]
fn batch_processes_a_tree_and_reports_failures() {
    let dir = temp_dir("batch");
    let input = dir.join("in");
    std::fs::create_dir_all(input.join("sub")).unwrap();
    write_jpeg(&input.join("a.jpg"), 400, 300);
    write_jpeg(&input.join("sub/b.jpg"), 300, 400);
    std::fs::write(input.join("broken.jpg"), b"\xff\xd8\xff\xe0 nope").unwrap();
    // Files that are not media are skipped and counted, not failures.
    std::fs::write(input.join("README.txt"), b"notes").unwrap();
    std::fs::write(input.join("sub/.DS_Store"), b"\0\0\0\x01Bud1").unwrap();
    let out = pixflow(
        &[
            "batch",
            "resize",
            "width=100",
            "height=100",
            "--input",
            "in",
            "--output",
            "out",
            "--format",
            "webp",
            "--jobs",
            "2",
        ],
        &dir,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a failed file makes the batch fail");
    assert!(err.contains("done 2, failed 1, skipped 2 (not media)"), "{err}");
    assert!(err.contains("broken.jpg") && !err.contains("README"), "{err}");
    // Asked to, it tries them too.
    let out = pixflow(&["batch", "flip", "--input", "in", "--output", "all", "--include-other"], &dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("done 2, failed 3, skipped 0"), "{err}");
    assert!(err.contains("README.txt"), "{err}");
    assert_eq!(dims(&dir.join("out/a.webp")), (100, 75));
    assert_eq!(dims(&dir.join("out/sub/b.webp")), (75, 100));
}

#[test]
fn a_closed_output_pipe_ends_quietly_and_unknown_extensions_are_refused() {
    use std::io::Read;
    let dir = temp_dir("pipe");
    write_jpeg(&dir.join("in.jpg"), 64, 48);
    // Standard output is a pipe nobody reads any more, as after `| head` exits.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = Command::new(env!("CARGO_BIN_EXE_pixflow"))
        .args(["ops"])
        .current_dir(&dir)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success() && err.is_empty(), "{status}: {err}");
    let out = pixflow(&["run", "flip", "--input", "in.jpg", "--output", "out.xyz"], &dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("`.xyz` names no output format"), "{err}");
    assert!(!dir.join("out.xyz").exists());
}

#[test]
fn ops_prints_the_schema() {
    let out = pixflow(&["ops"], &std::env::temp_dir());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<_> = v.as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap().to_owned()).collect();
    for op in ["resize", "crop", "rotate", "blur", "sharpen", "pixelate", "adjust", "trim", "pad", "round", "convert"] {
        assert!(names.iter().any(|n| n == op), "{op} missing from {names:?}");
    }
}

#[test]
fn operations_reference_is_current() {
    let out = pixflow(&["ops", "--markdown"], &std::env::temp_dir());
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/operations.md");
    let committed = std::fs::read_to_string(&doc).unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout) == committed,
        "docs/operations.md is stale: regenerate with `pixflow ops --markdown > docs/operations.md`"
    );
}

#[test]
fn watermark_reads_the_logo_file() {
    let dir = temp_dir("watermark");
    write_jpeg(&dir.join("in.jpg"), 400, 300);
    image::RgbaImage::from_pixel(40, 20, image::Rgba([0, 0, 255, 255])).save(dir.join("logo.png")).unwrap();
    let out =
        pixflow(&["run", "watermark", "image=logo.png", "opacity=1", "--input", "in.jpg", "--output", "w.png"], &dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let img = image::open(dir.join("w.png")).unwrap().to_rgb8();
    assert_eq!(img.get_pixel(390, 290).0, [0, 0, 255], "logo at the bottom-right corner");
    let out = pixflow(&["run", "watermark", "image=nope.png", "--input", "in.jpg", "--output", "w.png"], &dir);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.png"));
}

/// AVIF/HEIC decode through `ffmpeg`. `.ci/run` installs ffmpeg and sets
/// PIXFLOW_TEST_FFMPEG=1, so there the ffmpeg path must work; everywhere, a missing ffmpeg must
/// give a clear `unsupported_format` error naming the format.
#[test]
fn avif_decodes_through_ffmpeg_or_fails_clearly() {
    let dir = temp_dir("avif");
    write_jpeg(&dir.join("in.jpg"), 320, 200);
    let out = pixflow(&["run", "convert", "speed=10", "--input", "in.jpg", "--output", "x.avif"], &dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let missing = Command::new(env!("CARGO_BIN_EXE_pixflow"))
        .args(["run", "resize", "width=100", "--input", "x.avif", "--output", "o.png"])
        .env("PIXFLOW_FFMPEG", dir.join("no-such-ffmpeg"))
        .current_dir(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success());
    assert!(err.contains("[unsupported_format]") && err.contains("avif") && err.contains("ffmpeg"), "{err}");

    if std::env::var_os("PIXFLOW_TEST_FFMPEG").is_none() {
        skipped("AVIF decoding through ffmpeg", "install ffmpeg and set PIXFLOW_TEST_FFMPEG=1 (as .ci/run does)");
        return;
    }
    let out = pixflow(&["run", "resize", "width=100", "--input", "x.avif", "--output", "o.png"], &dir);
    assert!(
        out.status.success(),
        "ffmpeg is configured for tests but failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(dims(&dir.join("o.png")), (100, 63));
    let img = image::open(dir.join("o.png")).unwrap().to_rgb8();
    let p = img.get_pixel(2, 2).0;
    assert!(p[0] > 200 && p[1] < 60, "red marker survives the AVIF round trip: {p:?}");

    // HEIF orientation properties (irot/imir) are applied: the corpus's rotated and mirrored
    // sample must come out like its untransformed twin.
    let Some(corpus) = std::env::var_os("PIXFLOW_CORPUS").map(PathBuf::from) else {
        skipped("HEIF orientation on corpus files", "set PIXFLOW_CORPUS to the shared corpus folder (as .ci/run does)");
        return;
    };
    let a = corpus.join("avif/irot0_imir0_640x427.avif");
    let b = corpus.join("avif/irot1_imir0_640x427.avif");
    for (src, name) in [(&a, "a.png"), (&b, "b.png")] {
        let out = pixflow(&["run", "resize", "width=64", "--input", src.to_str().unwrap(), "--output", name], &dir);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let (a, b) =
        (image::open(dir.join("a.png")).unwrap().to_luma8(), image::open(dir.join("b.png")).unwrap().to_luma8());
    assert_eq!(a.dimensions(), b.dimensions());
    let diff: u64 = a.pixels().zip(b.pixels()).map(|(x, y)| u64::from(x[0].abs_diff(y[0]))).sum();
    let mean = diff / u64::from(a.width() * a.height());
    assert!(mean < 12, "irot/imir sample differs from its twin by {mean} per pixel");
}

#[test]
fn outputs_replace_files_whole_and_failed_writes_leave_nothing() {
    let dir = temp_dir("atomic");
    write_jpeg(&dir.join("in.jpg"), 200, 100);
    std::fs::write(dir.join("out.png"), b"previous").unwrap();
    assert!(pixflow(&["run", "flip", "--input", "in.jpg", "--output", "out.png"], &dir).status.success());
    assert_eq!(dims(&dir.join("out.png")), (200, 100));
    let out = pixflow(&["run", "flip", "--input", "in.jpg", "--output", "missing/out.png"], &dir);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing/out.png"));
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
}

#[test]
fn qrcode_needs_no_input_and_writes_png_or_svg() {
    let dir = temp_dir("qrcode");
    let out = pixflow(&["run", "qrcode", "content=https://example.com", "size=256", "--output", "q.png"], &dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(dims(&dir.join("q.png")), (256, 256));
    let out = pixflow(&["run", "qrcode", "content=hi", "+", "pad", "all=10", "--output", "q.webp"], &dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(dims(&dir.join("q.webp")), (532, 532));
    let out = pixflow(&["run", "qrcode", "content=hi", "--output", "q.svg"], &dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::read_to_string(dir.join("q.svg")).unwrap().starts_with("<svg "));
    for (args, expect) in [
        (&["run", "qrcode", "content=hi", "+", "pad", "all=1", "--output", "p.svg"][..], "[unsupported_format]"),
        (&["run", "qrcode", "content=hi", "--input", "x.jpg", "--output", "p.png"][..], "drop --input"),
        (&["run", "flip", "+", "qrcode", "content=hi", "--output", "p.png"][..], "first step"),
        (&["run", "qrcode", "content=hi", "logo=none.png", "--output", "p.png"][..], "none.png"),
    ] {
        let out = pixflow(args, &dir);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(expect), "{args:?}: {err}");
    }
}

#[test]
fn frames_and_storyboards_from_an_animation() {
    let dir = temp_dir("frames");
    let mut gif = Vec::new();
    {
        let mut enc = image::codecs::gif::GifEncoder::new(&mut gif);
        for i in 0..6u8 {
            let img = image::RgbaImage::from_pixel(32, 16, image::Rgba([i * 40, 80, 0, 255]));
            enc.encode_frame(image::Frame::from_parts(img, 0, 0, image::Delay::from_numer_denom_ms(500, 1))).unwrap();
        }
    }
    std::fs::write(dir.join("a.gif"), gif).unwrap();
    let out = pixflow(&["run", "frames", "interval=1", "--input", "a.gif", "--output", "f-{n}.png"], &dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for n in [0, 2, 4] {
        assert_eq!(dims(&dir.join(format!("f-{n}.png"))), (32, 16));
    }
    assert!(!dir.join("f-1.png").exists());
    let out = pixflow(&["run", "frames", "--input", "a.gif", "--output", "one.png"], &dir);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("{n}"));
    let out =
        pixflow(&["run", "sprite", "columns=3", "width=16", "vtt=true", "--input", "a.gif", "--output", "s.jpg"], &dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(dims(&dir.join("s.jpg")), (48, 16));
    let vtt = std::fs::read_to_string(dir.join("s.vtt")).unwrap();
    let out = pixflow(&["run", "sprite", "vtt=true", "--input", "a.gif", "--output", "-", "--format", "png"], &dir);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("file name"));
    assert!(
        vtt.starts_with("WEBVTT\n") && vtt.contains("00:00:02.500 --> 00:00:03.000\ns.jpg#xywh=32,8,16,8"),
        "{vtt}"
    );
}

#[test]
fn text_draws_with_the_builtin_font_and_names_missing_glyphs() {
    let dir = temp_dir("text");
    image::RgbImage::from_pixel(300, 100, image::Rgb([0, 0, 0])).save(dir.join("in.png")).unwrap();
    let out = pixflow(
        &[
            "run",
            "text",
            "text=Hello",
            "size=60",
            "color=#00ff00",
            "gravity=center",
            "--input",
            "in.png",
            "--output",
            "t.png",
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let img = image::open(dir.join("t.png")).unwrap().to_rgb8();
    let green = img.pixels().filter(|p| p.0 == [0, 255, 0]).count();
    assert!(green > 300, "{green} text pixels");
    let out = pixflow(&["run", "text", "text=你好", "--input", "in.png", "--output", "t.png"], &dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("U+4F60") && err.contains("font="), "{err}");
}

#[test]
fn compose_reads_the_template_and_the_inputs_it_names() {
    let dir = temp_dir("compose");
    // The template and its photo live in a sub-folder: names resolve beside the template.
    std::fs::create_dir_all(dir.join("t")).unwrap();
    image::RgbImage::from_pixel(50, 50, image::Rgb([0, 0, 200])).save(dir.join("t/photo.png")).unwrap();
    std::fs::write(
        dir.join("t/poster.yaml"),
        "width: 120\nheight: 80\nbackground: '#ffffff'\nlayers:\n  - {type: image, input: photo.png, x: 10, y: 10, width: 40, height: 40}\n  - {type: text, text: Hi, x: 60, y: 10, size: 30, color: '#000000'}\n",
    )
    .unwrap();
    let out =
        pixflow(&["run", "compose", "template=t/poster.yaml", "+", "resize", "width=60", "--output", "p.png"], &dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let img = image::open(dir.join("p.png")).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (60, 40));
    assert_eq!(img.get_pixel(15, 15).0, [0, 0, 200], "the photo layer");
    std::fs::write(
        dir.join("bad.yaml"),
        "width: 10\nheight: 10\nlayers:\n  - {type: rect, width: 5, height: 5, size: 3}\n",
    )
    .unwrap();
    let out = pixflow(&["run", "compose", "template=bad.yaml", "--output", "b.png"], &dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("unknown field `size`") && err.contains("line 4"), "{err}");
    // A template cannot reach files outside its folder.
    for name in ["/etc/hostname", "../photo.png"] {
        std::fs::write(
            dir.join("t/escape.yaml"),
            format!("width: 10\nheight: 10\nlayers: [{{type: image, input: '{name}'}}]\n"),
        )
        .unwrap();
        let out = pixflow(&["run", "compose", "template=t/escape.yaml", "--output", "e.png"], &dir);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("beside them"), "{name}: {err}");
    }
}

/// Video in codecs without a bundled decoder (here MPEG-1) goes through ffmpeg when it is
/// installed (`.ci/run` sets PIXFLOW_TEST_FFMPEG), and fails with a clear error when not.
#[test]
fn other_video_codecs_use_ffmpeg_or_fail_clearly() {
    let dir = temp_dir("video-ffmpeg");
    // An MPEG-1 sequence header (384x288) is enough to be recognised as MPEG video.
    std::fs::write(dir.join("seq.mpg"), [0, 0, 1, 0xB3, 0x18, 0x01, 0x20, 0x13, 0xff, 0xff, 0xe0, 0x18]).unwrap();
    let missing = Command::new(env!("CARGO_BIN_EXE_pixflow"))
        .args(["run", "frames", "count=2", "--input", "seq.mpg", "--output", "f-{n}.png"])
        .env("PIXFLOW_FFMPEG", dir.join("no-such-ffmpeg"))
        .current_dir(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success() && err.contains("[unsupported_format]") && err.contains("ffmpeg"), "{err}");

    if std::env::var_os("PIXFLOW_TEST_FFMPEG").is_none() {
        skipped("video decoding through ffmpeg", "install ffmpeg and set PIXFLOW_TEST_FFMPEG=1 (as .ci/run does)");
        return;
    }
    // Two seconds of ffmpeg's test pattern at 25 fps in MPEG-1.
    let made = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=96x64:rate=25", "-t", "2", "-c:v", "mpeg1video"])
        .arg(dir.join("clip.mpg"))
        .status()
        .expect("PIXFLOW_TEST_FFMPEG is set but ffmpeg cannot be started");
    assert!(made.success());
    let out = pixflow(&["run", "frames", "times=0,1.5", "--input", "clip.mpg", "--output", "t-{ms}.png"], &dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Through ffmpeg a time picks the first frame at or after it (here within one 40 ms frame).
    let mut times: Vec<u64> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.strip_prefix("t-")?.strip_suffix(".png")?.parse().ok())
        .collect();
    times.sort_unstable();
    assert!(times.len() == 2 && times[0] == 0 && times[1].abs_diff(1500) <= 40, "{times:?}");
    assert_eq!(dims(&dir.join(format!("t-{}.png", times[1]))), (96, 64));
    let out =
        pixflow(&["run", "frames", "indices=0", "width=48", "--input", "clip.mpg", "--output", "w-{n}.png"], &dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(dims(&dir.join("w-0.png")), (48, 32));
    // Frame numbers are exact for selections by number.
    let out = pixflow(&["run", "frames", "indices=3,10", "--input", "clip.mpg", "--output", "i-{n}.png"], &dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(dir.join("i-3.png").exists() && dir.join("i-10.png").exists());
    let out = pixflow(&["run", "frames", "times=9", "--input", "clip.mpg", "--output", "late-{n}.png"], &dir);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("past the end"));
    let out = pixflow(
        &["run", "frames", "count=4", "+", "sprite", "columns=4", "--input", "clip.mpg", "--output", "s.png"],
        &dir,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(dims(&dir.join("s.png")), (4 * 96, 64));
}

#[test]
fn functions_check_validates_manifests() {
    let dir = temp_dir("manifests");
    std::fs::write(dir.join("ok.yaml"), "name: thumb\nversion: '1'\nbuiltin: resize\nparams: {width: 800}\n").unwrap();
    std::fs::write(
        dir.join("bad.yaml"),
        "name: thumb\nversion: '1'\nbuiltin: resize\nparams: {width: -1}\nscaling: {min: 3, max: 1}\n",
    )
    .unwrap();
    let out = pixflow(&["functions", "check", "ok.yaml"], &dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("thumb 1: resize"));
    let out = pixflow(&["functions", "check", "ok.yaml", "bad.yaml"], &dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("bad.yaml: params") && err.contains("bad.yaml: scaling.min"),
        "{err}"
    );
}

/// One HTTP/1.1 exchange over a plain socket; returns the whole answer as text.
fn http(addr: &str, request_head: &str, body: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(request_head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    out
}

#[test]
fn serve_deploy_list_invoke_and_stop() {
    use std::io::BufRead;
    let dir = temp_dir("serve");
    std::fs::create_dir_all(dir.join("fns")).unwrap();
    std::fs::write(
        dir.join("fns/thumb.yaml"),
        "name: thumb\nversion: '1'\nbuiltin: resize\nparams: {width: 40}\nauth: none\n",
    )
    .unwrap();
    std::fs::write(dir.join("flip.yaml"), "name: flipper\nversion: '1'\nbuiltin: flip\n").unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_pixflow"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir", "data", "--functions", "fns"])
        .current_dir(&dir)
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(server.stderr.take().unwrap()).lines();
    let mut token = None;
    let addr = loop {
        let line = lines.next().expect("serve exited early").unwrap();
        if let Some(t) = line.strip_prefix("admin token (shown once; also in data/admin-token): ") {
            token = Some(t.to_owned());
        }
        if let Some(rest) = line.strip_prefix("pixflow serving on http://") {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    assert!(token.unwrap().starts_with("pfx_"));
    let url = format!("http://{addr}");
    // The client reads the admin token from the data folder.
    let out = pixflow(&["deploy", "flip.yaml", "--server", &url, "--data-dir", "data"], &dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("flipper 1 created"));
    let out = pixflow(&["deploy", "flip.yaml", "--server", &url, "--token", "pfx_wrong"], &dir);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401 [unauthorized]"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = pixflow(&["functions", "list", "--server", &url, "--data-dir", "data"], &dir);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("flipper") && table.contains("thumb"), "{table}");

    write_jpeg(&dir.join("in.jpg"), 200, 100);
    let jpeg = std::fs::read(dir.join("in.jpg")).unwrap();
    let head = format!(
        "POST /v1/functions/thumb/invoke HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        jpeg.len()
    );
    let answer = http(&addr, &head, &jpeg);
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&answer[..split]).to_lowercase();
    assert!(head.starts_with("http/1.1 200") && head.contains("content-type: image/jpeg"), "{head}");
    let img = image::load_from_memory(&answer[split + 4..]).unwrap();
    assert_eq!((img.width(), img.height()), (40, 20));

    // SIGTERM: the node drains and exits cleanly.
    let killed = Command::new("kill").args(["-TERM", &server.id().to_string()]).status().unwrap();
    assert!(killed.success());
    assert!(server.wait().unwrap().success());
}

#[test]
fn serve_refuses_contradicting_storage_options_before_starting() {
    let dir = temp_dir("serve-options");
    let base = ["serve", "--listen", "127.0.0.1:0", "--data-dir", "data"];
    let run = |extra: &[&str]| {
        let out = pixflow(&[&base[..], extra].concat(), &dir);
        assert!(!out.status.success(), "{extra:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let both = run(&[
        "--objects-backend",
        "s3",
        "--s3-listen",
        "127.0.0.1:0",
        "--s3-access-key",
        "cms",
        "--s3-secret-key",
        "0123456789abcdef",
    ]);
    assert!(both.contains("--s3-listen serves the embedded store"), "{both}");
    let stray = run(&["--objects-s3-endpoint", "http://127.0.0.1:9"]);
    assert!(stray.contains("need --objects-backend s3"), "{stray}");
    let backend = run(&["--objects-backend", "disk"]);
    assert!(backend.contains("embedded") && backend.contains("s3"), "{backend}");
    std::fs::write(dir.join("ca.pem"), "not a certificate").unwrap();
    let ca = run(&["--url-ca", "ca.pem"]);
    assert!(ca.contains("--url-ca ca.pem"), "{ca}");
    let no_url = run(&["--state", "postgres"]);
    assert!(no_url.contains("--state postgres needs --state-url"), "{no_url}");
    let stray = run(&["--state-url", "postgres://db.internal/pixflow"]);
    assert!(stray.contains("--state-url names a PostgreSQL database: it needs --state postgres"), "{stray}");
    let no_url = run(&["--queue", "nats"]);
    assert!(no_url.contains("--queue nats needs --queue-url"), "{no_url}");
    let stray = run(&["--queue-url", "nats://127.0.0.1:4222"]);
    assert!(stray.contains("--queue-url names a NATS server: it needs --queue nats"), "{stray}");
    let stray = run(&["--queue-namespace", "staging"]);
    assert!(stray.contains("--queue-namespace names streams on a NATS server: it needs --queue nats"), "{stray}");
    // Refused before any connection (nothing listens at port 9).
    let odd = run(&["--queue", "nats", "--queue-url", "nats://127.0.0.1:9", "--queue-namespace", "Staging.1"]);
    assert!(odd.contains("--queue-namespace: queue namespace `Staging.1`: use 1 to 32 characters"), "{odd}");
}

#[test]
fn a_state_url_that_does_not_answer_stops_the_start_in_one_line() {
    let dir = temp_dir("serve-state-url");
    // A port bound without listening: connections to it are refused, and no one else takes it.
    let dead = tokio::net::TcpSocket::new_v4().unwrap();
    dead.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = dead.local_addr().unwrap().port();
    let base = ["serve", "--listen", "127.0.0.1:0", "--data-dir", "data", "--state", "postgres", "--state-url"];
    let run = |url: &str| {
        let out = pixflow(&[&base[..], &[url]].concat(), &dir);
        assert!(!out.status.success(), "{url} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let refused = run(&format!("postgres://pixflow:hunter2-sekrit@127.0.0.1:{port}/pixflow"));
    assert_eq!(
        refused,
        format!("pixflow: error: --state-url: cannot connect to PostgreSQL at 127.0.0.1:{port}: connection refused\n")
    );
    let wrong = run("mysql://root:hunter2-sekrit@127.0.0.1/pixflow");
    assert_eq!(wrong.lines().count(), 1, "{wrong}");
    assert!(wrong.starts_with("pixflow: error: --state-url: not a PostgreSQL URL"), "{wrong}");
    let port = run("postgres://root:hunter2-sekrit@127.0.0.1:port/pixflow");
    assert_eq!(port.lines().count(), 1, "{port}");
    assert!(port.starts_with("pixflow: error: --state-url: not a valid PostgreSQL URL"), "{port}");
    assert!(!format!("{refused}{wrong}{port}").contains("sekrit"));
    drop(dead);
}

#[test]
fn a_queue_url_that_does_not_answer_stops_the_start_in_one_line() {
    let dir = temp_dir("serve-queue-url");
    // A port bound without listening: connections to it are refused, and no one else takes it.
    let dead = tokio::net::TcpSocket::new_v4().unwrap();
    dead.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = dead.local_addr().unwrap().port();
    let url = format!("nats://pixflow:hunter2-sekrit@127.0.0.1:{port}");
    let args = ["serve", "--listen", "127.0.0.1:0", "--data-dir", "data", "--queue", "nats", "--queue-url", &url];
    let out = pixflow(&args, &dir);
    assert!(!out.status.success(), "started without its queue");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("pixflow: error: --queue-url: cannot use the NATS server: "), "{err}");
    assert!(!err.contains("sekrit"), "{err}");
    drop(dead);
}

/// A process function that answers with the secrets it was given, and starts a helper of its
/// own (as programs that shell out do); both write their process ids beside it.
const SECRETIVE: &str = r#"
import os, subprocess
from http.server import BaseHTTPRequestHandler, HTTPServer

helper = subprocess.Popen(["sleep", "600"])
with open("pids", "w") as f:
    f.write(f"{os.getpid()} {helper.pid}")

class H(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = f"{os.environ.get('DB_PASSWORD')}|{os.environ.get('API_KEY')}|{os.environ.get('PIXFLOW_SECRET_API_KEY')}".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

/// Starts `pixflow serve` in `dir` and returns it with its address.
fn start_serve(dir: &Path, extra: &[&str]) -> (std::process::Child, String) {
    let base = ["--listen", "127.0.0.1:0", "--data-dir", "data", "--functions", "fns"];
    let (server, serving) =
        spawn_serve(dir, &[&base[..], extra].concat(), &[("PIXFLOW_SECRET_API_KEY", "from-the-environment")]);
    (server, serving.split_whitespace().next().unwrap().to_owned())
}

/// Starts `pixflow serve ARGS` in `dir` with these environment variables and returns it with
/// the rest of its `pixflow serving on http://` line (address, functions, data folder).
fn spawn_serve(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut server = Command::new(env!("CARGO_BIN_EXE_pixflow"))
        .arg("serve")
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(server.stderr.take().unwrap()).lines();
    let serving = loop {
        let line = lines.next().expect("serve exited early").unwrap();
        if let Some(rest) = line.strip_prefix("pixflow serving on http://") {
            break rest.to_owned();
        }
    };
    // Keep reading the log so the node never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (server, serving)
}

/// Whether a process is gone (or a zombie nobody reaped yet).
fn gone(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_or(true, |s| s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !cond() {
        assert!(std::time::Instant::now() < until, "timed out waiting until {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn secrets_reach_only_the_child_and_children_die_with_a_killed_node() {
    let dir = temp_dir("children");
    std::fs::create_dir_all(dir.join("fns")).unwrap();
    std::fs::create_dir_all(dir.join("secrets")).unwrap();
    std::fs::write(dir.join("secrets/db-password"), "hunter2\n").unwrap();
    std::fs::write(dir.join("fns/secretive.py"), SECRETIVE).unwrap();
    std::fs::write(
        dir.join("fns/secretive.yaml"),
        "name: secretive\nversion: '1'\nprocess: {command: [python3, secretive.py], \
         secrets: {DB_PASSWORD: db-password, API_KEY: api-key}}\nscaling: {min: 1, max: 1}\nauth: none\n",
    )
    .unwrap();
    let (mut server, addr) = start_serve(&dir, &["--secrets-dir", "secrets"]);
    let head =
        "POST /v1/functions/secretive/invoke HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\nconnection: close\r\n\r\n";
    let answer = String::from_utf8_lossy(&http(&addr, head, b"x")).into_owned();
    // The file's value and the environment's, under the names the manifest gave; nothing else
    // of the node's environment.
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("hunter2|from-the-environment|None"), "{answer}");
    // The manifest names the secrets; the API never shows their values.
    let token = std::fs::read_to_string(dir.join("data/admin-token")).unwrap();
    let head = format!(
        "GET /v1/functions/secretive HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\nconnection: close\r\n\r\n",
        token.trim()
    );
    let shown = String::from_utf8_lossy(&http(&addr, &head, b"")).into_owned();
    assert!(shown.contains("db-password") && !shown.contains("hunter2") && !shown.contains("from-the-env"), "{shown}");

    let pids = std::fs::read_to_string(dir.join("fns/pids")).unwrap();
    let (child, helper) = pids.split_once(' ').unwrap();
    assert!(!gone(child) && !gone(helper));
    // SIGKILL: no shutdown runs, yet the child dies with the node.
    server.kill().unwrap();
    server.wait().unwrap();
    wait_until("the killed node's child is gone", || gone(child));
    // What the child started outlives it, until the node starts again on the same folder.
    assert!(!gone(helper), "the helper died with its parent; nothing left to test at restart");
    std::fs::remove_file(dir.join("fns/pids")).unwrap();
    let (mut again, _) = start_serve(&dir, &["--secrets-dir", "secrets"]);
    wait_until("the restarted node stopped the helper left behind", || gone(helper));
    wait_until("the restarted node's child is up", || {
        std::fs::read_to_string(dir.join("fns/pids")).is_ok_and(|p| p.contains(' '))
    });
    again.kill().unwrap();
    again.wait().unwrap();
    let pids = std::fs::read_to_string(dir.join("fns/pids")).unwrap();
    let (child, helper) = pids.split_once(' ').unwrap();
    wait_until("the second run's child is gone", || gone(child));
    // Leave nothing behind on the machine.
    let _ = Command::new("kill").args(["-KILL", helper]).status();
}

#[test]
fn a_secret_the_node_lacks_refuses_the_deploy_by_field() {
    let dir = temp_dir("secret-missing");
    std::fs::create_dir_all(dir.join("fns")).unwrap();
    std::fs::write(
        dir.join("fns/needy.yaml"),
        "name: needy\nversion: '1'\nprocess: {command: [python3, x.py], secrets: {TOKEN: absent}}\n",
    )
    .unwrap();
    let out = pixflow(&["serve", "--listen", "127.0.0.1:0", "--data-dir", "data", "--functions", "fns"], &dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("process.secrets.TOKEN") && err.contains("no secret named `absent`"), "{err}");
}
