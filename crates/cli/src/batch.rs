//! `pixflow batch`: one pipeline over a folder tree on a fixed pool of worker threads, with a
//! progress bar and a summary (done, failed with reasons, bytes in/out).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use pixflow_imageops::{EncodeOptions, Limits, Pipeline, RunOptions};

#[derive(Debug, Default)]
pub struct Report {
    pub done: u64,
    pub failed: u64,
    /// Files whose first bytes show no image or video format, left alone.
    pub skipped: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub failures: Vec<(PathBuf, String)>,
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            collect(&entry.path(), out)?;
        } else if kind.is_file() {
            out.push(entry.path());
        }
    }
    Ok(())
}

pub fn run(
    pipeline: &Pipeline,
    input: &Path,
    output: &Path,
    encode: &EncodeOptions,
    limits: Limits,
    jobs: Option<usize>,
    include_other: bool,
) -> Result<Report> {
    let mut files = Vec::new();
    collect(input, &mut files)?;
    files.sort();
    std::fs::create_dir_all(output).with_context(|| format!("creating {}", output.display()))?;
    let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    let bar = ProgressBar::new(files.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {elapsed_precise} eta {eta} {msg}")
            .expect("static template"),
    );
    let next = AtomicUsize::new(0);
    let (done, bytes_in, bytes_out) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let skipped = AtomicU64::new(0);
    let failures = Mutex::new(Vec::new());
    let inputs = crate::read_named_inputs(pipeline, &limits)?;
    let inputs = &inputs;
    let ffmpeg = crate::ffmpeg::Ffmpeg::new();
    let foreign = Some(&ffmpeg as &dyn pixflow_imageops::ForeignDecoder);
    std::thread::scope(|s| {
        for _ in 0..jobs.min(files.len().max(1)) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(path) = files.get(i) else { break };
                    let rel = path.strip_prefix(input).unwrap_or(path);
                    if !include_other && !looks_like_media(path) {
                        skipped.fetch_add(1, Ordering::Relaxed);
                        bar.inc(1);
                        continue;
                    }
                    match process(pipeline, path, rel, output, encode, (limits, inputs), foreign) {
                        Ok((i, o)) => {
                            done.fetch_add(1, Ordering::Relaxed);
                            bytes_in.fetch_add(i, Ordering::Relaxed);
                            bytes_out.fetch_add(o, Ordering::Relaxed);
                        }
                        Err(e) => failures
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((rel.to_path_buf(), format!("{e:#}"))),
                    }
                    bar.inc(1);
                }
            });
        }
    });
    bar.finish_and_clear();
    let mut failures = failures.into_inner().unwrap_or_else(|p| p.into_inner());
    failures.sort();
    let report = Report {
        done: done.into_inner(),
        failed: failures.len() as u64,
        skipped: skipped.into_inner(),
        bytes_in: bytes_in.into_inner(),
        bytes_out: bytes_out.into_inner(),
        failures,
    };
    eprintln!(
        "done {}, failed {}, skipped {} (not media), bytes in {}, bytes out {}",
        report.done, report.failed, report.skipped, report.bytes_in, report.bytes_out
    );
    for (path, why) in &report.failures {
        eprintln!("  failed {}: {why}", path.display());
    }
    Ok(report)
}

/// Whether a file's first bytes show an image or video format the engine knows (an unreadable
/// file counts as media, so its error is reported).
fn looks_like_media(path: &Path) -> bool {
    use std::io::Read;
    let mut head = Vec::with_capacity(4096);
    match std::fs::File::open(path).and_then(|f| f.take(4096).read_to_end(&mut head)) {
        Ok(_) => pixflow_imageops::sniff(&head).is_some(),
        Err(_) => true,
    }
}

fn process(
    pipeline: &Pipeline,
    path: &Path,
    rel: &Path,
    out_dir: &Path,
    encode: &EncodeOptions,
    (limits, inputs): (Limits, &std::collections::BTreeMap<String, Vec<u8>>),
    foreign: Option<&dyn pixflow_imageops::ForeignDecoder>,
) -> Result<(u64, u64)> {
    let bytes = crate::read_input(path, &limits)?;
    let opts = RunOptions { limits, foreign, final_output: Some(encode), inputs: Some(inputs), deadline: None };
    let renditions = pipeline.run(&bytes, &opts).map_err(anyhow::Error::from)?;
    let mut written = 0;
    for r in renditions {
        let target = match &r.name {
            // Named renditions become siblings: photo.jpg + name=small.webp -> photo-small.webp
            Some(name) => {
                let stem = rel.file_stem().and_then(|s| s.to_str()).unwrap_or("out");
                out_dir.join(rel.with_file_name(format!("{stem}-{name}")))
            }
            None => out_dir.join(rel).with_extension(r.format.extension()),
        };
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        crate::write_output(&target, &r.bytes)?;
        written += r.bytes.len() as u64;
    }
    Ok((bytes.len() as u64, written))
}
