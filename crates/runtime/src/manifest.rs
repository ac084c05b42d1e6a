//! Function manifests: what a user writes to deploy a function (YAML or JSON), and the
//! validated [`Deployment`] the runtime runs. Parsing refuses unknown fields with their line and
//! column; validation collects every problem (not just the first) with the field it concerns,
//! and resolves built-in functions and pipelines against the engine's own schemas, so a
//! manifest that deploys cannot fail later on a parameter.

use std::collections::BTreeMap;
use std::time::Duration;

use pixflow_imageops::{Limits, Pipeline};
use serde::Deserialize;

use crate::output::{OutputSpec, OutputTarget};

/// Largest manifest accepted, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 256 << 10;

/// A manifest as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Service name: lowercase letters, digits and `-`, 1-63 characters, starting with a letter
    /// (a DNS label, as Knative service names are).
    pub name: String,
    /// Version label; deploying the same name and version again changes nothing.
    pub version: String,
    #[serde(default)]
    pub description: String,
    /// A built-in operation (`resize`, `watermark`, ...) with fixed parameters.
    pub builtin: Option<String>,
    /// A pipeline of engine steps (the `pixflow run` chain as a list).
    pub pipeline: Option<Vec<StepSpec>>,
    /// A user program serving HTTP on the port the platform assigns.
    pub process: Option<ProcessSpec>,
    /// Fixed parameters of `builtin`.
    #[serde(default)]
    pub params: BTreeMap<String, ParamValue>,
    /// Parameters a caller may set per request (query string), overriding `params`.
    #[serde(default)]
    pub overridable: Vec<String>,
    #[serde(default)]
    pub quota: QuotaSpec,
    #[serde(default)]
    pub scaling: ScalingSpec,
    /// Who may invoke: `token` (default: any API token) or `none` (open to anyone who can reach
    /// the gateway). The management API always needs an admin token.
    #[serde(default)]
    pub auth: AuthMode,
    /// Retries of asynchronous invocations.
    #[serde(default)]
    pub retry: RetrySpec,
    /// Where results are stored (bucket and key template); the caller then gets references
    /// and CDN URLs back instead of bytes.
    pub output: Option<OutputSpec>,
    /// Serve this function as a CDN preset: `/cdn/p/{name}/{bucket}/{key}` transforms public
    /// objects on the fly, cached at the edge.
    pub cdn: Option<CdnSpec>,
}

/// A CDN preset as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdnSpec {
    /// Pick AVIF, WebP or the pipeline's own format per request from `Accept` (`Vary: Accept`).
    #[serde(default)]
    pub auto_format: bool,
    /// `Cache-Control` of the preset's answers (default: the node's).
    pub cache_control: Option<String>,
}

/// A validated CDN preset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CdnPreset {
    pub auto_format: bool,
    pub cache_control: Option<String>,
}

/// Who may invoke a function.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    #[default]
    Token,
    None,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Token => "token",
            AuthMode::None => "none",
        }
    }
}

/// Retry policy of asynchronous invocations as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts in all, the first included (1 = no retry).
    pub attempts: Option<u32>,
    /// Wait before the first retry; doubles per attempt.
    pub backoff: Option<String>,
    /// Longest wait between attempts.
    pub max_backoff: Option<String>,
}

/// One pipeline step: an operation and its parameters.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    pub op: String,
    #[serde(default)]
    pub params: BTreeMap<String, ParamValue>,
}

/// A parameter value as YAML gives it; the engine's schema decides its type.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ParamValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl ParamValue {
    pub(crate) fn as_text(&self) -> String {
        match self {
            ParamValue::Bool(b) => b.to_string(),
            ParamValue::Int(i) => i.to_string(),
            ParamValue::Float(f) => f.to_string(),
            ParamValue::Text(s) => s.clone(),
        }
    }
}

/// How to start a process function (the of-watchdog model: an HTTP server on `$PORT`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    /// Program and arguments; relative paths resolve against the manifest's folder.
    pub command: Vec<String>,
    /// Plain settings passed to the program (shown to admins with the manifest).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Environment variables whose values come from the node's secret store, by secret name:
    /// `{DB_PASSWORD: db-password}`. Only the child sees the values.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
    /// Name of the environment variable that carries the assigned port.
    #[serde(default = "default_port_env")]
    pub port_env: String,
}

fn default_port_env() -> String {
    "PORT".into()
}

/// Resource quota as written (sizes like `256Mi`, durations like `30s`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaSpec {
    /// Memory limit per instance (process functions: enforced by the OS).
    pub memory: Option<String>,
    /// Longest a request may run.
    pub timeout: Option<String>,
    /// Largest request body (inline bytes); larger inputs go by object reference.
    pub max_request_bytes: Option<String>,
    pub max_response_bytes: Option<String>,
    /// Largest input the function reads, inline or from object storage (default: the larger
    /// of 64Mi and `max_request_bytes`).
    pub max_input_bytes: Option<String>,
    /// Requests one instance serves at once.
    pub concurrency: Option<u32>,
    /// Engine limits for this function's images.
    pub max_pixels: Option<u64>,
    pub max_frames: Option<u64>,
    /// Requests that may wait for a free slot before new ones get 429.
    pub max_queue: Option<u32>,
}

/// Scaling policy as written (Knative KPA's knobs).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScalingSpec {
    pub min: Option<u32>,
    pub max: Option<u32>,
    /// Concurrent requests per instance the autoscaler aims for.
    pub target_concurrency: Option<f64>,
    pub initial: Option<u32>,
    /// Wait before removing an instance once load drops.
    pub scale_down_delay: Option<String>,
    /// Idle time after which the function scales to zero (when `min` is 0).
    pub scale_to_zero_after: Option<String>,
    /// Averaging window for steady load.
    pub stable_window: Option<String>,
    /// Short window that reacts to bursts.
    pub panic_window: Option<String>,
}

/// What a validated function runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Runnable {
    /// An engine pipeline (a built-in is a one-step pipeline); `overridable` parameters may be
    /// set per request.
    Pipeline {
        steps: Vec<StepSpec>,
        overridable: Vec<String>,
    },
    Process(ProcessSpec),
}

/// Resolved quota.
#[derive(Debug, Clone, PartialEq)]
pub struct Quota {
    pub memory_bytes: u64,
    pub timeout: Duration,
    pub max_request_bytes: u64,
    pub max_response_bytes: u64,
    pub concurrency: u32,
    pub max_queue: u32,
    pub limits: Limits,
}

/// Resolved retry policy of asynchronous invocations.
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    pub attempts: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Retry {
    /// Wait before attempt `next` (2 = the first retry): `backoff * 2^(next-2)`, capped.
    pub fn delay(&self, next: u32) -> Duration {
        let doublings = next.saturating_sub(2).min(30);
        self.backoff.saturating_mul(1 << doublings).min(self.max_backoff)
    }
}

/// Resolved scaling policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Scaling {
    pub min: u32,
    pub max: u32,
    pub target_concurrency: f64,
    pub initial: u32,
    pub scale_down_delay: Duration,
    pub scale_to_zero_after: Duration,
    pub stable_window: Duration,
    pub panic_window: Duration,
}

/// A manifest that passed validation: what the runtime deploys.
#[derive(Debug, Clone, PartialEq)]
pub struct Deployment {
    pub name: String,
    pub version: String,
    pub description: String,
    pub runnable: Runnable,
    pub quota: Quota,
    pub scaling: Scaling,
    pub auth: AuthMode,
    pub retry: Retry,
    pub output: Option<OutputTarget>,
    pub cdn: Option<CdnPreset>,
}

/// One thing wrong with a manifest: the field it concerns (`scaling.max`, `pipeline[1].params`)
/// and why; `line`/`column` when the parser knows them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}{}", location(*line, *column))]
pub struct Diagnostic {
    pub field: String,
    pub message: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(" (line {l}, column {c})"),
        _ => String::new(),
    }
}

/// Every problem found in one manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid manifest: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct Invalid(pub Vec<Diagnostic>);

fn diag(field: impl Into<String>, message: impl Into<String>) -> Diagnostic {
    Diagnostic { field: field.into(), message: message.into(), line: None, column: None }
}

/// Parses and validates a manifest (YAML, of which JSON is a subset).
pub fn parse(text: &str) -> Result<Deployment, Invalid> {
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(Invalid(vec![diag("manifest", format!("{} bytes; at most {MAX_MANIFEST_BYTES}", text.len()))]));
    }
    let manifest: Manifest = yaml_serde::from_str(text).map_err(|e| {
        let (line, column) = e.location().map_or((None, None), |l| (Some(l.line()), Some(l.column())));
        let message = e.to_string();
        // The parser's own message repeats the location; keep the part before it.
        let message = message.split(" at line ").next().unwrap_or(&message).to_owned();
        Invalid(vec![Diagnostic { field: "manifest".into(), message, line, column }])
    })?;
    manifest.validate()
}

/// `500ms`, `30s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.')?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok().filter(|n: &f64| n.is_finite() && *n >= 0.0)?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    (secs <= 7.0 * 86_400.0).then(|| Duration::from_secs_f64(secs))
}

/// `1048576`, `512Ki`, `256Mi`, `2Gi`, `10M`, `1G` (Kubernetes quantities).
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mult: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

impl Manifest {
    /// Checks everything that can be checked without I/O and resolves defaults.
    pub fn validate(self) -> Result<Deployment, Invalid> {
        let mut problems = Vec::new();
        let name_ok = (1..=63).contains(&self.name.len())
            && self.name.starts_with(|c: char| c.is_ascii_lowercase())
            && self.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !self.name.ends_with('-');
        if !name_ok {
            problems.push(diag(
                "name",
                "1-63 lowercase letters, digits or '-', starting with a letter, not ending with '-'",
            ));
        }
        if self.version.trim().is_empty() || self.version.len() > 64 {
            problems.push(diag("version", "1-64 characters"));
        }
        let kinds = [self.builtin.is_some(), self.pipeline.is_some(), self.process.is_some()];
        if kinds.iter().filter(|k| **k).count() != 1 {
            problems.push(diag("builtin", "give exactly one of `builtin`, `pipeline` or `process`"));
        }
        if self.builtin.is_none() && !self.params.is_empty() {
            problems.push(diag("params", "only a `builtin` takes `params`; pipeline steps carry their own"));
        }
        let quota = self.quota(&mut problems);
        let scaling = self.scaling(&mut problems);
        let runnable = self.runnable(&mut problems);
        let retry = self.retry(&mut problems);
        let output = self.output.as_ref().and_then(|o| match OutputTarget::parse(o) {
            Ok(t) => Some(t),
            Err(e) => {
                problems.push(diag("output", e));
                None
            }
        });
        let cdn = self.cdn.as_ref().map(|c| {
            if self.process.is_some() {
                problems.push(diag("cdn", "only built-ins and pipelines can be CDN presets"));
            }
            if let Some(cc) = &c.cache_control
                && (cc.is_empty() || cc.len() > 255 || !cc.bytes().all(|b| (0x20..0x7f).contains(&b)))
            {
                problems.push(diag("cdn.cache_control", "1 to 255 visible ASCII characters"));
            }
            CdnPreset { auto_format: c.auto_format, cache_control: c.cache_control.clone() }
        });
        match (runnable, problems.is_empty()) {
            (Some(runnable), true) => Ok(Deployment {
                name: self.name,
                version: self.version,
                description: self.description,
                runnable,
                quota,
                scaling,
                auth: self.auth,
                retry,
                output,
                cdn,
            }),
            _ => Err(Invalid(problems)),
        }
    }

    fn runnable(&self, problems: &mut Vec<Diagnostic>) -> Option<Runnable> {
        let steps = match (&self.builtin, &self.pipeline, &self.process) {
            (Some(op), None, None) => vec![StepSpec { op: op.clone(), params: self.params.clone() }],
            (None, Some(steps), None) => steps.clone(),
            (None, None, Some(p)) => {
                if p.command.is_empty() || p.command[0].trim().is_empty() {
                    problems.push(diag("process.command", "name the program to start"));
                }
                if !self.overridable.is_empty() {
                    problems.push(diag("overridable", "process functions read their own request parameters"));
                }
                let env_name = |n: &str| {
                    n.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                        && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                };
                for (var, secret) in &p.secrets {
                    let field = format!("process.secrets.{var}");
                    if !env_name(var) {
                        problems.push(diag(field, "an environment variable name: letters, digits and `_`"));
                    } else if p.env.contains_key(var) || *var == p.port_env {
                        problems.push(diag(field, "also set by `env` or `port_env`: give it one source"));
                    } else if !crate::secrets::valid_name(secret) {
                        problems.push(diag(
                            field,
                            "a secret name: 1 to 128 of letters, digits, `.`, `_`, `-`, starting with a letter or digit",
                        ));
                    }
                }
                return Some(Runnable::Process(p.clone()));
            }
            _ => return None,
        };
        if steps.is_empty() {
            problems.push(diag("pipeline", "needs at least one step"));
            return None;
        }
        // The engine validates every step as it will run it; overridable parameters must be
        // ones the steps know.
        let text: Vec<(String, Vec<(String, String)>)> = steps
            .iter()
            .map(|s| (s.op.clone(), s.params.iter().map(|(k, v)| (k.clone(), v.as_text())).collect()))
            .collect();
        let groups = text.iter().map(|(op, ps)| (op.as_str(), ps.iter().map(|(k, v)| (k.as_str(), v.as_str()))));
        if let Err(e) = Pipeline::from_steps(groups) {
            let field = if self.builtin.is_some() { "params".to_owned() } else { "pipeline".to_owned() };
            problems.push(diag(field, e.to_string()));
        }
        for name in &self.overridable {
            // Output encoding parameters (quality, format, ...) apply to every pipeline.
            let known = steps.iter().any(|s| {
                pixflow_imageops::ops::spec(&s.op).is_some_and(|spec| spec.params.iter().any(|p| p.name == name))
            }) || pixflow_imageops::encode::SPEC.params.iter().any(|p| p.name == name);
            if !known {
                problems.push(diag("overridable", format!("`{name}` is not a parameter of any step")));
            }
        }
        Some(Runnable::Pipeline { steps, overridable: self.overridable.clone() })
    }

    fn quota(&self, problems: &mut Vec<Diagnostic>) -> Quota {
        let q = &self.quota;
        let bytes = |field: &str, v: &Option<String>, default: u64, problems: &mut Vec<Diagnostic>| match v {
            None => default,
            Some(s) => parse_bytes(s).filter(|b| *b > 0).unwrap_or_else(|| {
                problems.push(diag(format!("quota.{field}"), format!("`{s}` is not a size like 256Mi or 10M")));
                default
            }),
        };
        let timeout = match &q.timeout {
            None => Duration::from_secs(30),
            Some(s) => parse_duration(s).filter(|d| !d.is_zero()).unwrap_or_else(|| {
                problems.push(diag("quota.timeout", format!("`{s}` is not a duration like 500ms, 30s or 5m")));
                Duration::from_secs(30)
            }),
        };
        let concurrency = q.concurrency.unwrap_or(4);
        if !(1..=1000).contains(&concurrency) {
            problems.push(diag("quota.concurrency", "between 1 and 1000"));
        }
        let mut limits = Limits::default();
        if let Some(p) = q.max_pixels {
            limits.max_source_pixels = p;
        }
        if let Some(f) = q.max_frames {
            limits.max_frames = f;
        }
        let max_queue = q.max_queue.unwrap_or(100);
        if max_queue > 100_000 {
            problems.push(diag("quota.max_queue", "at most 100000"));
        }
        let max_request_bytes = bytes("max_request_bytes", &q.max_request_bytes, 32 << 20, problems);
        limits.max_input_bytes =
            bytes("max_input_bytes", &q.max_input_bytes, limits.max_input_bytes.max(max_request_bytes), problems);
        limits.max_op_millis = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        Quota {
            memory_bytes: bytes("memory", &q.memory, 512 << 20, problems),
            timeout,
            max_request_bytes,
            max_response_bytes: bytes("max_response_bytes", &q.max_response_bytes, 64 << 20, problems),
            concurrency: concurrency.clamp(1, 1000),
            max_queue: max_queue.min(100_000),
            limits,
        }
    }

    fn retry(&self, problems: &mut Vec<Diagnostic>) -> Retry {
        let r = &self.retry;
        let attempts = r.attempts.unwrap_or(3);
        if !(1..=100).contains(&attempts) {
            problems.push(diag("retry.attempts", "between 1 and 100"));
        }
        let dur = |field: &str, v: &Option<String>, default: Duration, problems: &mut Vec<Diagnostic>| match v {
            None => default,
            Some(t) => parse_duration(t).unwrap_or_else(|| {
                problems.push(diag(format!("retry.{field}"), format!("`{t}` is not a duration like 1s")));
                default
            }),
        };
        let backoff = dur("backoff", &r.backoff, Duration::from_secs(1), problems);
        let max_backoff = dur("max_backoff", &r.max_backoff, Duration::from_secs(300), problems);
        if backoff > max_backoff {
            problems.push(diag("retry.backoff", "must not be longer than retry.max_backoff"));
        }
        Retry { attempts: attempts.clamp(1, 100), backoff, max_backoff }
    }

    fn scaling(&self, problems: &mut Vec<Diagnostic>) -> Scaling {
        let s = &self.scaling;
        let dur = |field: &str, v: &Option<String>, default: u64, problems: &mut Vec<Diagnostic>| match v {
            None => Duration::from_secs(default),
            Some(t) => parse_duration(t).unwrap_or_else(|| {
                problems.push(diag(format!("scaling.{field}"), format!("`{t}` is not a duration like 30s")));
                Duration::from_secs(default)
            }),
        };
        let (min, max) = (s.min.unwrap_or(0), s.max.unwrap_or(10));
        if max == 0 || max > 10_000 {
            problems.push(diag("scaling.max", "between 1 and 10000"));
        }
        if min > max {
            problems.push(diag("scaling.min", format!("{min} is above scaling.max ({max})")));
        }
        let initial = s.initial.unwrap_or(min.max(1).min(max.max(1)));
        if initial < min || initial > max.max(1) {
            problems.push(diag("scaling.initial", format!("{initial} is outside min..=max ({min}..={max})")));
        }
        let concurrency = f64::from(self.quota.concurrency.unwrap_or(4));
        let target = s.target_concurrency.unwrap_or(concurrency * 0.7);
        if !(target > 0.0 && target <= concurrency) {
            problems.push(diag(
                "scaling.target_concurrency",
                format!("{target} must be above 0 and at most quota.concurrency ({concurrency})"),
            ));
        }
        if min == 0 && self.quota.max_queue == Some(0) {
            problems.push(diag(
                "quota.max_queue",
                "0 leaves nowhere to wait for a cold start; give scaling.min >= 1 or a queue",
            ));
        }
        let stable_window = dur("stable_window", &s.stable_window, 60, problems);
        let panic_window = dur("panic_window", &s.panic_window, 6, problems);
        if panic_window > stable_window {
            problems.push(diag("scaling.panic_window", "must not be longer than scaling.stable_window"));
        }
        Scaling {
            min,
            max,
            target_concurrency: target,
            initial,
            scale_down_delay: dur("scale_down_delay", &s.scale_down_delay, 30, problems),
            scale_to_zero_after: dur("scale_to_zero_after", &s.scale_to_zero_after, 60, problems),
            stable_window,
            panic_window,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match parse(text) {
            Ok(d) => panic!("deployed: {d:?}"),
            Err(Invalid(v)) => v.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn builtin_and_pipeline_manifests_resolve_with_defaults() {
        let d = parse("name: thumbnail-800\nversion: '1'\nbuiltin: resize\nparams: {width: 800, height: 800}\noverridable: [quality]\n")
            .unwrap();
        assert_eq!(d.name, "thumbnail-800");
        match &d.runnable {
            Runnable::Pipeline { steps, overridable } => {
                assert_eq!(steps[0].op, "resize");
                assert_eq!(steps[0].params["width"], ParamValue::Int(800));
                assert_eq!(overridable, &["quality"]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            (d.quota.concurrency, d.quota.timeout, d.scaling.min, d.scaling.max),
            (4, Duration::from_secs(30), 0, 10)
        );
        assert_eq!(d.quota.limits.max_op_millis, 30_000);
        assert_eq!((d.auth, d.retry.attempts, d.quota.max_queue), (AuthMode::Token, 3, 100));
        assert_eq!(d.retry.delay(2), Duration::from_secs(1));
        assert_eq!(d.retry.delay(4), Duration::from_secs(4));
        assert_eq!(d.retry.delay(40), Duration::from_secs(300));
        let json = r#"{"name": "poster", "version": "2", "pipeline": [{"op": "resize", "params": {"width": 400}}, {"op": "convert", "params": {"format": "webp"}}],
                       "quota": {"memory": "256Mi", "timeout": "10s", "concurrency": 2, "max_pixels": 1000000},
                       "scaling": {"min": 1, "max": 5, "target_concurrency": 1.5, "scale_to_zero_after": "5m"},
                       "auth": "none", "retry": {"attempts": 1}}"#;
        let d = parse(json).unwrap();
        assert_eq!(d.quota.memory_bytes, 256 << 20);
        assert_eq!(d.quota.limits.max_source_pixels, 1_000_000);
        assert_eq!((d.scaling.min, d.scaling.initial, d.scaling.scale_to_zero_after), (1, 1, Duration::from_secs(300)));
        assert_eq!((d.auth, d.retry.attempts), (AuthMode::None, 1));
    }

    #[test]
    fn unknown_fields_are_refused_with_line_and_column() {
        let p = problems("name: a\nversion: '1'\nbuiltin: flip\nscalling: {max: 3}\n");
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("unknown field `scalling`") && p[0].contains("line 4, column 1"), "{p:?}");
        let p = problems("name: a\nversion: '1'\nbuiltin: flip\nscaling: {max: 3, mni: 1}\n");
        assert!(p[0].contains("unknown field `mni`") && p[0].contains("line 4"), "{p:?}");
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let p = problems(
            "name: Bad_Name\nversion: '1'\nbuiltin: resize\nparams: {width: -5}\noverridable: [nope]\n\
             quota: {timeout: soon, concurrency: 0, memory: lots}\nscaling: {min: 5, max: 2, panic_window: 2m}\n\
             retry: {attempts: 0, backoff: 10m, max_backoff: 1m}\n",
        );
        let joined = p.join("\n");
        for field in [
            "name:",
            "params: bad parameter `width`",
            "overridable: `nope`",
            "quota.timeout",
            "quota.concurrency",
            "quota.memory",
            "scaling.min: 5 is above",
            "scaling.panic_window",
            "retry.attempts",
            "retry.backoff",
        ] {
            assert!(joined.contains(field), "missing {field} in:\n{joined}");
        }
        let p = problems("name: a\nversion: '1'\nbuiltin: flip\nprocess: {command: [x]}\n");
        assert!(p[0].contains("exactly one of"), "{p:?}");
        let p = problems("name: a\nversion: '1'\npipeline: [{op: explode}]\n");
        assert!(p[0].contains("unknown operation"), "{p:?}");
        let p = problems("name: a\nversion: '1'\nprocess: {command: []}\n");
        assert!(p[0].contains("process.command"), "{p:?}");
        let p = problems(
            "name: a\nversion: '1'\nprocess: {command: [x], env: {A: '1'}, \
             secrets: {A: s, 9X: s, OK: ../etc/passwd, PORT: s, FINE: db-password}}\n",
        )
        .join("\n");
        for field in
            ["process.secrets.A: also set", "process.secrets.9X: an environment", "process.secrets.OK: a secret name"]
        {
            assert!(p.contains(field), "missing {field} in:\n{p}");
        }
        assert!(p.contains("process.secrets.PORT") && !p.contains("FINE"), "{p}");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_bytes("256Mi"), Some(256 << 20));
        assert_eq!(parse_bytes("10M"), Some(10_000_000));
        assert_eq!(parse_bytes("1048576"), Some(1 << 20));
        assert_eq!(parse_bytes("99999999999999999999Gi"), None);
        assert_eq!(parse_bytes("12 MB"), None);
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("8d"), None);
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("1e400s"), None);
        assert!(parse(&"x".repeat(MAX_MANIFEST_BYTES + 1)).is_err());
    }
}
