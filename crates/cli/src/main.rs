//! The `pixflow` binary: argument parsing and wiring only. Image work lives in
//! `pixflow-imageops`, the platform in `pixflow-server`; this crate reads and writes files,
//! draws progress, supplies the optional `ffmpeg`-backed decoder, layers `serve`'s configuration
//! file under its flags (`config.rs`), and makes the HTTP calls of the client commands (`deploy`,
//! `functions list`).

mod alloc;
mod batch;
mod chain;
mod client;
mod config;
mod ffmpeg;
mod limits;
mod opsdoc;
mod serve;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use pixflow_imageops::{EncodeOptions, RunOptions};

#[global_allocator]
static ALLOCATOR: alloc::HugePageHint = alloc::HugePageHint;

#[derive(Parser)]
#[command(name = "pixflow", version, about = "Serverless image production: image engine, functions, workflows")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the platform on this machine: HTTP API, functions, durable queue (embedded defaults).
    Serve(Box<serve::ServeArgs>),
    /// Deploy function manifests to a running node (`PUT /v1/functions/{name}`).
    Deploy {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        #[command(flatten)]
        remote: client::Remote,
    },
    /// Run a pipeline on one file: `pixflow run OP [key=value ...] [+ OP ...] --input IN --output OUT`.
    /// `probe` as the only operation prints the file's facts as JSON.
    Run {
        /// Operations and their key=value parameters, chained with `+`.
        #[arg(required = true, value_name = "OP")]
        steps: Vec<String>,
        #[command(flatten)]
        io: RunIo,
        #[command(flatten)]
        limits: limits::LimitArgs,
    },
    /// Run a pipeline over every file of a folder in parallel, with progress and a summary.
    Batch {
        #[arg(required = true, value_name = "OP")]
        steps: Vec<String>,
        /// Folder to read (recursively).
        #[arg(long)]
        input: PathBuf,
        /// Folder to write; the input's sub-folders are recreated.
        #[arg(long)]
        output: PathBuf,
        /// Output format (default: each input's own).
        #[arg(long)]
        format: Option<String>,
        /// Lossy quality 1-100.
        #[arg(long)]
        quality: Option<u8>,
        /// Parallel workers (default: one per CPU).
        #[arg(long)]
        jobs: Option<usize>,
        /// Also try files whose first bytes show no image or video format (each then fails
        /// with its reason); by default they are skipped and counted.
        #[arg(long)]
        include_other: bool,
        #[command(flatten)]
        limits: limits::LimitArgs,
    },
    /// Function manifests and deployed functions: `check` validates files offline, `list` shows
    /// what a node runs and its live state.
    Functions {
        #[command(subcommand)]
        command: FunctionsCommand,
    },
    /// Print the operations and their parameter schemas (JSON, or Markdown with --markdown).
    Ops {
        #[arg(long)]
        markdown: bool,
    },
    /// Configuration files of `pixflow serve`: `check` validates one without starting anything.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a `pixflow serve --config` file (`-` for standard input): prints `FILE: ok`, or
    /// every problem as `FILE:LINE:COL: field `name`: problem` and exits 2.
    Check {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Also print the effective settings (flags > environment > file > defaults) as YAML on
        /// standard output, secrets as "<redacted>"; `FILE: ok` then goes to standard error.
        #[arg(long)]
        print: bool,
    },
}

#[derive(Subcommand)]
enum FunctionsCommand {
    /// Validate manifests (YAML or JSON); prints every problem with its field, exits 1 if any.
    Check {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// List a node's functions with their live state (`GET /v1/functions`).
    List {
        #[command(flatten)]
        remote: client::Remote,
    },
}

#[derive(clap::Args)]
struct RunIo {
    /// Input file, or `-` for standard input (none when the first step makes the image, e.g. qrcode).
    #[arg(long, short)]
    input: Option<PathBuf>,
    /// Output file, or `-` for standard output (not needed for probe or when every rendition is named).
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Output format; default: from the output's extension, else the input's format.
    #[arg(long)]
    format: Option<String>,
    /// Lossy quality 1-100.
    #[arg(long)]
    quality: Option<u8>,
}

/// Writes a line to standard output; a closed pipe (`| head`) becomes an error that `main` ends
/// on quietly, as `grep` does, instead of a panic.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).context("writing standard output")?
    }};
}

/// Whether the error is standard output closed by its reader.
fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

fn main() -> ExitCode {
    let cli = match parse_command_line(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) if broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(engine) = e.downcast_ref::<pixflow_imageops::Error>() {
                eprintln!("pixflow: error [{}]: {engine}", engine.code());
            } else {
                eprintln!("pixflow: error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Exit status of a configuration file with problems (as clap's for a bad command line).
const BAD_CONFIG: u8 = 2;

/// Parses the command line; with `serve --config FILE` the file is layered under the flags and
/// the environment, and a file with problems ends the program here (exit 2), before any state
/// is opened.
fn parse_command_line(argv: Vec<OsString>) -> Result<Cli, ExitCode> {
    let root = Cli::command();
    let matches = root.clone().get_matches_from(&argv);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut Cli::command()).exit());
    let Command::Serve(args) = &cli.command else { return Ok(cli) };
    let Some(path) = args.config_file() else { return Ok(cli) };
    let layered = config::read(path).map_err(|p| vec![p]).and_then(|text| config::resolve(&root, &argv, &text));
    match layered {
        Ok(matches) => Ok(Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut Cli::command()).exit())),
        Err(problems) => {
            for problem in problems {
                eprintln!("{}", problem.line(&path.display().to_string()));
            }
            Err(ExitCode::from(BAD_CONFIG))
        }
    }
}

/// `pixflow config check FILE [--print]`.
fn config_check(file: &Path, print: bool) -> Result<ExitCode> {
    let root = Cli::command();
    let name = file.display().to_string();
    let argv = [OsString::from("pixflow"), OsString::from("serve")];
    let layered = config::read(file).map_err(|p| vec![p]).and_then(|text| config::resolve(&root, &argv, &text));
    match layered {
        Ok(matches) => {
            if print {
                let serve = matches.subcommand_matches("serve").context("the settings of serve")?;
                std::io::stdout()
                    .lock()
                    .write_all(config::effective_yaml(&root, serve).as_bytes())
                    .context("writing standard output")?;
                eprintln!("{name}: ok");
            } else {
                say!("{name}: ok");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(problems) => {
            for problem in problems {
                eprintln!("{}", problem.line(&name));
            }
            Ok(ExitCode::from(BAD_CONFIG))
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Config { command: ConfigCommand::Check { file, print } } => config_check(&file, print),
        Command::Run { steps, io, limits } => {
            let limits = limits.resolve();
            run_one(&steps, &io, limits)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Batch { steps, input, output, format, quality, jobs, include_other, limits } => {
            let encode = final_encode(format.as_deref(), quality, None)?;
            let pipeline = chain::parse(&steps)?;
            if pipeline.is_generated() {
                anyhow::bail!("`{}` makes its own image, so there is nothing to batch; use `pixflow run`", steps[0]);
            }
            let report = batch::run(&pipeline, &input, &output, &encode, limits.resolve(), jobs, include_other)?;
            Ok(if report.failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Serve(args) => {
            serve::run(*args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Deploy { files, remote } => block_on(deploy(&files, &remote)),
        Command::Functions { command: FunctionsCommand::List { remote } } => block_on(list(&remote)),
        Command::Functions { command: FunctionsCommand::Check { files } } => {
            let mut ok = true;
            for file in &files {
                let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
                match pixflow_runtime::parse(&text) {
                    Ok(d) => {
                        let what = match &d.runnable {
                            pixflow_runtime::Runnable::Pipeline { steps, .. } => {
                                steps.iter().map(|s| s.op.as_str()).collect::<Vec<_>>().join(" + ")
                            }
                            pixflow_runtime::Runnable::Process(p) => format!("process {}", p.command.join(" ")),
                        };
                        say!(
                            "{}: {} {}: {what}; {} concurrent per instance, {}..{} instances, timeout {:?}",
                            file.display(),
                            d.name,
                            d.version,
                            d.quota.concurrency,
                            d.scaling.min,
                            d.scaling.max,
                            d.quota.timeout
                        );
                    }
                    Err(invalid) => {
                        ok = false;
                        for problem in &invalid.0 {
                            eprintln!("{}: {problem}", file.display());
                        }
                    }
                }
            }
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Ops { markdown } => {
            if markdown {
                std::io::stdout().lock().write_all(opsdoc::markdown().as_bytes()).context("writing standard output")?;
            } else {
                say!("{}", serde_json::to_string_pretty(&opsdoc::catalogue())?);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn block_on<F: std::future::Future<Output = Result<ExitCode>>>(f: F) -> Result<ExitCode> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?.block_on(f)
}

/// Validates each manifest here, then PUTs it; a file that fails is reported and the rest go on.
async fn deploy(files: &[PathBuf], remote: &client::Remote) -> Result<ExitCode> {
    let mut ok = true;
    for file in files {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let name = match pixflow_runtime::parse(&text) {
            Ok(d) => d.name,
            Err(invalid) => {
                ok = false;
                for problem in &invalid.0 {
                    eprintln!("{}: {problem}", file.display());
                }
                continue;
            }
        };
        let (status, body) =
            remote.call(hyper::Method::PUT, &format!("/v1/functions/{name}"), text.into_bytes()).await?;
        if (200..300).contains(&status) {
            say!(
                "{}: {name} {} {}",
                file.display(),
                body["version"].as_str().unwrap_or("?"),
                body["result"].as_str().unwrap_or("deployed")
            );
        } else {
            ok = false;
            eprintln!("{}: {}", file.display(), client::problem_line(status, &body));
        }
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn list(remote: &client::Remote) -> Result<ExitCode> {
    let (status, body) = remote.call(hyper::Method::GET, "/v1/functions", Vec::new()).await?;
    if status != 200 {
        eprintln!("{}", client::problem_line(status, &body));
        return Ok(ExitCode::FAILURE);
    }
    say!("{:<24} {:<10} {:>5} {:>9} {:>6}  RUNS", "NAME", "VERSION", "READY", "IN-FLIGHT", "QUEUED");
    for f in body["functions"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let state = &f["state"];
        say!(
            "{:<24} {:<10} {:>5} {:>9} {:>6}  {}",
            f["name"].as_str().unwrap_or("?"),
            f["version"].as_str().unwrap_or("?"),
            state["ready_instances"].to_string(),
            state["in_flight"].to_string(),
            state["queued"].to_string(),
            match state["start_error"].as_str() {
                Some(e) => format!("{}  FAILING: {e}", f["runs"]),
                None => f["runs"].to_string(),
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Encoding for the final output: `--format`, else the output name's extension; `--quality`.
fn final_encode(format: Option<&str>, quality: Option<u8>, output: Option<&Path>) -> Result<EncodeOptions> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    let from_name = output.and_then(|p| p.to_str()).and_then(pixflow_imageops::pipeline::format_from_name);
    // A file name whose extension names no format would otherwise get the source's format
    // under a misleading name.
    if let (None, None, Some(path)) = (format, from_name, output)
        && path != Path::new("-")
        && let Some(ext) = path.extension()
    {
        anyhow::bail!(
            "--output {}: `.{}` names no output format; use .jpg, .png, .webp, .avif, .gif or .svg, or give --format",
            path.display(),
            ext.to_string_lossy()
        );
    }
    if let Some(f) = format {
        pairs.push(("format".into(), f.into()));
    } else if let Some(f) = from_name {
        pairs.push(("format".into(), f.extension().into()));
    }
    if let Some(q) = quality {
        pairs.push(("quality".into(), q.to_string()));
    }
    Ok(EncodeOptions::parse(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))?)
}

fn read_input(path: &Path, limits: &pixflow_imageops::Limits) -> Result<Vec<u8>> {
    if path == Path::new("-") {
        let mut buf = Vec::new();
        std::io::stdin().take(limits.max_input_bytes + 1).read_to_end(&mut buf).context("reading standard input")?;
        return Ok(buf);
    }
    let len = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    limits.check_input_bytes(usize::try_from(len).unwrap_or(usize::MAX))?;
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Reads the extra inputs a pipeline names (logos, fonts, templates and what templates name);
/// on the CLI a name is a path.
fn read_named_inputs(
    pipeline: &pixflow_imageops::Pipeline,
    limits: &pixflow_imageops::Limits,
) -> Result<std::collections::BTreeMap<String, Vec<u8>>> {
    let mut inputs: std::collections::BTreeMap<String, Vec<u8>> = pipeline
        .input_names()
        .into_iter()
        .map(|name| Ok((name.to_owned(), read_input(Path::new(name), limits)?)))
        .collect::<Result<_>>()?;
    // A compose template names further inputs (images, fonts). A template may come from
    // someone else, so what it names is read only from beside it: relative paths without `..`,
    // resolved against the template's folder.
    let base = match pipeline.steps.first() {
        Some(pixflow_imageops::pipeline::Step::Op(pixflow_imageops::Op::Compose(c))) => {
            Path::new(&c.template).parent().map(Path::to_path_buf).unwrap_or_default()
        }
        _ => PathBuf::new(),
    };
    for name in pipeline.nested_input_names(&inputs)? {
        let rel = PathBuf::from(&name);
        if rel.is_absolute() || rel.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
            anyhow::bail!(
                "the template names `{name}`: templates may only name files beside them (no absolute paths or `..`)"
            );
        }
        if let std::collections::btree_map::Entry::Vacant(slot) = inputs.entry(name) {
            let bytes = read_input(&base.join(rel), limits)?;
            slot.insert(bytes);
        }
    }
    Ok(inputs)
}

fn write_output(path: &Path, bytes: &[u8]) -> Result<()> {
    if path == Path::new("-") {
        let mut out = std::io::stdout().lock();
        out.write_all(bytes).context("writing standard output")?;
        return out.flush().context("writing standard output");
    }
    // Write beside the target and rename, so an existing file is never left half-written.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".pixflow-{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| format!("writing {}", path.display()))
}

fn run_one(steps: &[String], io: &RunIo, limits: pixflow_imageops::Limits) -> Result<()> {
    let ffmpeg = ffmpeg::Ffmpeg::new();
    let foreign = Some(&ffmpeg as &dyn pixflow_imageops::ForeignDecoder);
    let input_path = || io.input.as_deref().context("--input is required");
    if steps.len() == 1 && steps[0] == "probe" {
        let input = read_input(input_path()?, &limits)?;
        let probe = pixflow_imageops::probe(&input, &limits, foreign)?;
        say!("{}", serde_json::to_string_pretty(&probe)?);
        return Ok(());
    }
    let pipeline = chain::parse(steps)?;
    let input = match (pipeline.is_generated(), &io.input) {
        (true, Some(_)) => anyhow::bail!("`{}` makes its own image; drop --input", steps[0]),
        (true, None) => Vec::new(),
        (false, _) => read_input(input_path()?, &limits)?,
    };
    let encode = final_encode(io.format.as_deref(), io.quality, io.output.as_deref())?;
    if pipeline.needs_final_output() && io.output.is_none() {
        anyhow::bail!("--output is required (or end the chain with `output name=FILE`)");
    }
    let inputs = read_named_inputs(&pipeline, &limits)?;
    let opts = RunOptions { limits, foreign, final_output: Some(&encode), inputs: Some(&inputs), deadline: None };
    let renditions = pipeline.run(&input, &opts)?;
    let unnamed_frames = renditions.iter().filter(|r| r.name.is_none() && r.frame.is_some()).count();
    for r in renditions {
        let path = match (&r.name, &io.output) {
            (Some(name), _) => PathBuf::from(name),
            (None, Some(out)) => match r.frame {
                Some(pos) => {
                    let template = out.to_string_lossy();
                    if unnamed_frames > 1 && !pixflow_imageops::sequence::names_frames(&template) {
                        anyhow::bail!(
                            "{unnamed_frames} frames were picked: put {{n}} (frame number) or {{ms}} (time) in --output"
                        );
                    }
                    PathBuf::from(pixflow_imageops::sequence::frame_name(&template, pos))
                }
                None => out.clone(),
            },
            (None, None) => unreachable!("checked above"),
        };
        if !r.cues.is_empty() && path == Path::new("-") {
            anyhow::bail!("sprite vtt=true writes the WebVTT file beside the sheet; give --output a file name");
        }
        write_output(&path, &r.bytes)?;
        if path != Path::new("-") {
            eprintln!("{}: {}x{} {} {} bytes", path.display(), r.width, r.height, r.format.mime(), r.bytes.len());
        }
        if !r.cues.is_empty() {
            // The storyboard sits beside the sheet and refers to it by file name.
            let vtt = path.with_extension("vtt");
            let url = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            write_output(&vtt, pixflow_imageops::sequence::webvtt(&r.cues, &url).as_bytes())?;
            eprintln!("{}: {} cues", vtt.display(), r.cues.len());
        }
    }
    Ok(())
}
