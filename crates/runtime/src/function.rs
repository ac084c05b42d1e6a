//! One deployed function version and how a request runs on it: the request's size is checked
//! against the quota, the node admits it (or answers "overloaded"), the function's pool gives
//! it a slot (or "queue full"), and the engine runs on the node's bounded CPU pool under the
//! function's timeout. Every outcome is counted in the metrics.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use pixflow_imageops::{Pipeline, Rendition, RunOptions};
use tokio::sync::{Notify, Semaphore};

use crate::manifest::{Deployment, Runnable, StepSpec};
use crate::pool::{Pool, Rejected};
use crate::process::Processes;

/// Why an invocation failed; the server maps each to one HTTP status and problem type.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error(transparent)]
    Rejected(#[from] Rejected),
    /// The node holds as much work as it may.
    #[error("the node is overloaded ({0}); retry later")]
    Overloaded(&'static str),
    #[error(transparent)]
    Engine(#[from] pixflow_imageops::Error),
    /// A request parameter the function does not let callers set.
    #[error("parameter `{param}` cannot be set on `{function}`: {reason}")]
    Parameter { function: String, param: String, reason: String },
    #[error("the function ran longer than its timeout of {0:?}")]
    Timeout(Duration),
    #[error("the request is {actual} bytes; this function accepts at most {limit}")]
    RequestTooLarge { limit: u64, actual: u64 },
    #[error("the function's result is {actual} bytes; its quota allows at most {limit}")]
    ResponseTooLarge { limit: u64, actual: u64 },
    /// The function cannot run here (e.g. a process function on a node without them).
    #[error("{0}")]
    Unavailable(String),
    /// A process function's program failed to answer (crashed, closed the connection).
    #[error("{0}")]
    FunctionFailed(String),
    /// A process function's program does not start; its last start error.
    #[error("the function's program does not start: {0}")]
    StartFailed(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl InvokeError {
    /// Stable name for metrics labels and problem types.
    pub fn code(&self) -> &'static str {
        match self {
            InvokeError::Rejected(Rejected::QueueFull { .. }) => "queue_full",
            InvokeError::Rejected(Rejected::WaitTimeout(_)) => "queue_timeout",
            InvokeError::Rejected(Rejected::Closed) => "shutting_down",
            InvokeError::Rejected(Rejected::NoInstance) | InvokeError::StartFailed(_) => "instance_start_failed",
            InvokeError::Overloaded(_) => "overloaded",
            InvokeError::Engine(e) => e.code(),
            InvokeError::Parameter { .. } => "bad_parameter",
            InvokeError::Timeout(_) => "timeout",
            InvokeError::RequestTooLarge { .. } => "request_too_large",
            InvokeError::ResponseTooLarge { .. } => "response_too_large",
            InvokeError::Unavailable(_) => "unavailable",
            InvokeError::FunctionFailed(_) => "function_failed",
            InvokeError::Internal(_) => "internal",
        }
    }

    /// Whether running the same request again could succeed (asynchronous retries).
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            InvokeError::Rejected(_)
                | InvokeError::Overloaded(_)
                | InvokeError::Timeout(_)
                | InvokeError::Unavailable(_)
                | InvokeError::FunctionFailed(_)
                | InvokeError::StartFailed(_)
                | InvokeError::Internal(_)
        )
    }
}

/// What a caller sends.
#[derive(Debug, Clone, Default)]
pub struct Invocation {
    /// The image (or video) bytes; empty for functions that make their own image.
    pub input: Vec<u8>,
    /// Per-request parameters; each must be one the manifest lists as `overridable`.
    pub params: Vec<(String, String)>,
    /// Extra named inputs (logos, fonts) the pipeline refers to.
    pub inputs: BTreeMap<String, Vec<u8>>,
    /// The caller's content type (passed on to process functions).
    pub content_type: Option<String>,
    /// How many of the input bytes came from object storage rather than the request itself;
    /// only the rest counts against `max_request_bytes` (the engine's input limit bounds all).
    pub referenced_bytes: u64,
    /// Encoding parameters the platform itself sets (the CDN's negotiated format); unlike
    /// `params` they need not be `overridable`.
    pub platform_params: Vec<(String, String)>,
    /// Background work (an asynchronous invocation's attempt): it waits for a slot behind
    /// every caller that waits for an answer, beyond `max_queue` and for as long as it takes
    /// ([`crate::Pool::acquire_background`]), and its timeout starts once it has one.
    pub background: bool,
}

impl Invocation {
    fn bytes(&self) -> u64 {
        self.input.len() as u64 + self.inputs.values().map(|v| v.len() as u64).sum::<u64>()
    }
}

/// Node-wide limits shared by every function: the CPU pool and the memory held by admitted
/// requests.
pub struct Node {
    cpu: Arc<Semaphore>,
    cpus: usize,
    held_bytes: AtomicU64,
    max_held_bytes: u64,
    requests: AtomicU64,
    max_requests: u64,
    /// Engine runs still going after their caller's deadline (each holds a CPU).
    overdue: AtomicU64,
}

/// Node limits.
#[derive(Debug, Clone, Copy)]
pub struct NodeLimits {
    /// Image work running at once (default: one per CPU).
    pub cpus: usize,
    /// Request bytes held in memory by admitted requests, running or queued.
    pub max_held_bytes: u64,
    /// Requests admitted at once, running or queued, over all functions.
    pub max_requests: u64,
}

impl Default for NodeLimits {
    fn default() -> Self {
        NodeLimits {
            cpus: std::thread::available_parallelism().map_or(2, usize::from),
            max_held_bytes: 1 << 30,
            max_requests: 1024,
        }
    }
}

/// Bytes and a request slot held on the node until dropped.
pub struct NodeTicket {
    node: Arc<Node>,
    bytes: u64,
}

impl NodeTicket {
    /// Holds `bytes` more (inputs read from object storage after admission), or answers that
    /// the node is overloaded; on refusal the ticket holds what it held before.
    pub fn grow(&mut self, bytes: u64) -> Result<(), InvokeError> {
        let before = self.node.held_bytes.fetch_add(bytes, Ordering::AcqRel);
        if before.saturating_add(bytes) > self.node.max_held_bytes {
            self.node.held_bytes.fetch_sub(bytes, Ordering::AcqRel);
            return Err(InvokeError::Overloaded("too many request bytes held in memory"));
        }
        self.bytes += bytes;
        Ok(())
    }
}

impl Drop for NodeTicket {
    fn drop(&mut self) {
        self.node.held_bytes.fetch_sub(self.bytes, Ordering::AcqRel);
        self.node.requests.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Node {
    pub fn new(limits: NodeLimits) -> Arc<Node> {
        let cpus = limits.cpus.max(1);
        Arc::new(Node {
            cpu: Arc::new(Semaphore::new(cpus)),
            cpus,
            held_bytes: AtomicU64::new(0),
            max_held_bytes: limits.max_held_bytes,
            requests: AtomicU64::new(0),
            max_requests: limits.max_requests,
            overdue: AtomicU64::new(0),
        })
    }

    /// Admits a request holding `bytes` in memory, or answers that the node is overloaded.
    /// Front ends call it before reading a body, with the size they are about to hold.
    pub fn admit(self: &Arc<Self>, bytes: u64) -> Result<NodeTicket, InvokeError> {
        if self.requests.fetch_add(1, Ordering::AcqRel) >= self.max_requests {
            self.requests.fetch_sub(1, Ordering::AcqRel);
            return Err(InvokeError::Overloaded("too many requests in progress"));
        }
        let before = self.held_bytes.fetch_add(bytes, Ordering::AcqRel);
        if before.saturating_add(bytes) > self.max_held_bytes {
            self.held_bytes.fetch_sub(bytes, Ordering::AcqRel);
            self.requests.fetch_sub(1, Ordering::AcqRel);
            return Err(InvokeError::Overloaded("too many request bytes held in memory"));
        }
        Ok(NodeTicket { node: self.clone(), bytes })
    }

    /// Requests admitted right now (running or queued), over all functions.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Acquire)
    }

    pub fn cpus(&self) -> usize {
        self.cpus
    }

    /// Engine runs still going after their caller's deadline (the engine cannot be interrupted
    /// inside one operation; its costs are bounded before it starts instead).
    pub fn overdue(&self) -> u64 {
        self.overdue.load(Ordering::Acquire)
    }

    /// Every CPU is held by work whose caller already gave up: new engine work would only wait
    /// for them, so it is refused at once.
    pub fn saturated(&self) -> bool {
        self.overdue() >= self.cpus as u64
    }
}

/// One deployed version of a function.
pub struct Function {
    pub deployment: Deployment,
    /// The manifest as deployed (for `GET` and persistence).
    pub manifest: String,
    pub deployed_at: SystemTime,
    pub pool: Arc<Pool>,
    /// The pipeline without per-request overrides, built once.
    base: Option<Pipeline>,
    /// The child processes of a process function.
    pub processes: Option<Arc<Processes>>,
    /// Instances started at deploy.
    pub initial: u32,
    retired: AtomicBool,
    retire: Notify,
}

impl Function {
    /// A function version; a process function's programs run in `workdir` (the manifest's
    /// folder) in the node's `context` (memory limits, secrets). `initial` instances start at once (at least
    /// the manifest's; a rollover passes the old version's count).
    pub fn new(
        deployment: Deployment,
        manifest: String,
        workdir: &std::path::Path,
        context: &crate::process::Context,
        initial: u32,
    ) -> Arc<Function> {
        // Built-in instances are ready at once; process instances when their port opens.
        let is_process = matches!(deployment.runnable, Runnable::Process(_));
        let ready = if is_process { 0 } else { initial };
        let pool = Pool::new(deployment.quota.concurrency, deployment.quota.max_queue, ready);
        let (base, processes) = match &deployment.runnable {
            Runnable::Pipeline { steps, .. } => (build(steps).ok(), None),
            Runnable::Process(spec) => {
                let p = Processes::new(
                    &deployment.name,
                    spec.clone(),
                    workdir.to_path_buf(),
                    deployment.quota.memory_bytes,
                    context.clone(),
                    pool.clone(),
                );
                (None, Some(Arc::new(p)))
            }
        };
        Arc::new(Function {
            deployment,
            manifest,
            deployed_at: SystemTime::now(),
            pool,
            base,
            processes,
            initial,
            retired: AtomicBool::new(false),
            retire: Notify::new(),
        })
    }

    pub fn name(&self) -> &str {
        &self.deployment.name
    }

    /// Marks this version as replaced or removed: it takes no new requests; the ones it holds
    /// finish.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.retire.notify_waiters();
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    pub(crate) async fn retired(&self) {
        let wait = self.retire.notified();
        if !self.is_retired() {
            wait.await;
        }
    }

    /// The pipeline for one request: the manifest's steps with the caller's overrides.
    pub fn pipeline(&self, params: &[(String, String)]) -> Result<Pipeline, InvokeError> {
        self.pipeline_with(params, &[])
    }

    /// The pipeline with the caller's `params` (each must be `overridable`) and encoding
    /// parameters the platform sets, which apply to every output.
    pub fn pipeline_with(
        &self,
        params: &[(String, String)],
        platform: &[(String, String)],
    ) -> Result<Pipeline, InvokeError> {
        let Runnable::Pipeline { steps, overridable } = &self.deployment.runnable else {
            return Err(InvokeError::Unavailable("not a pipeline function".into()));
        };
        if params.is_empty()
            && platform.is_empty()
            && let Some(p) = &self.base
        {
            return Ok(p.clone());
        }
        let mut steps = as_text(steps);
        let mut encode: Vec<(String, String)> = Vec::new();
        for (key, value) in params {
            if !overridable.contains(key) {
                let reason = if overridable.is_empty() {
                    "this function takes no request parameters".to_owned()
                } else {
                    format!("callers may set {}", overridable.join(", "))
                };
                return Err(InvokeError::Parameter { function: self.name().to_owned(), param: key.clone(), reason });
            }
            let mut placed = false;
            for (op, step_params) in &mut steps {
                let takes = pixflow_imageops::ops::spec(op).is_some_and(|s| s.params.iter().any(|p| p.name == key));
                if takes {
                    step_params.retain(|(k, _)| k != key);
                    step_params.push((key.clone(), value.clone()));
                    placed = true;
                }
            }
            if !placed {
                encode.push((key.clone(), value.clone()));
            }
        }
        encode.extend(platform.iter().cloned());
        if !encode.is_empty() {
            // Encoding overrides apply to every output: before the first named output, else last.
            let at = steps.iter().position(|(op, _)| op == "output").unwrap_or(steps.len());
            steps.insert(at, ("convert".into(), encode));
        }
        Ok(from_text(&steps)?)
    }
}

type StepText = Vec<(String, Vec<(String, String)>)>;

fn as_text(steps: &[StepSpec]) -> StepText {
    steps.iter().map(|s| (s.op.clone(), s.params.iter().map(|(k, v)| (k.clone(), v.as_text())).collect())).collect()
}

fn from_text(steps: &StepText) -> pixflow_imageops::Result<Pipeline> {
    Pipeline::from_steps(steps.iter().map(|(op, ps)| (op.as_str(), ps.iter().map(|(k, v)| (k.as_str(), v.as_str())))))
}

fn build(steps: &[StepSpec]) -> pixflow_imageops::Result<Pipeline> {
    from_text(&as_text(steps))
}

/// A process function's HTTP answer, relayed as it came.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub bytes: Vec<u8>,
}

/// What a function produced.
#[derive(Debug)]
pub enum Produced {
    /// The engine's renditions (built-ins and pipelines).
    Renditions(Vec<Rendition>),
    /// A process function's answer.
    Reply(Reply),
}

/// What a successful invocation produced.
#[derive(Debug)]
pub struct Output {
    pub produced: Produced,
    /// Time spent waiting for a slot.
    pub queued: Duration,
    /// CPU time of the engine work (zero for process functions, whose CPU is their own).
    pub cpu: Duration,
}

impl Output {
    /// The engine's renditions; none for a process function.
    pub fn renditions(&self) -> &[Rendition] {
        match &self.produced {
            Produced::Renditions(r) => r,
            Produced::Reply(_) => &[],
        }
    }
}

/// Runs one request on `f`: admission, a slot, the engine on the CPU pool, under the timeout.
/// `ticket` is the node admission a front end took before reading the request (else it is
/// taken here).
pub async fn invoke(
    node: &Arc<Node>,
    f: &Arc<Function>,
    req: Invocation,
    foreign: Option<Arc<dyn pixflow_imageops::ForeignDecoder + Send + Sync>>,
    ticket: Option<NodeTicket>,
) -> Result<Output, InvokeError> {
    let name = f.name().to_owned();
    let started = tokio::time::Instant::now();
    let result = invoke_inner(node, f, req, foreign, ticket).await;
    let outcome = match &result {
        Ok(Output { produced: Produced::Reply(r), .. }) if r.status >= 400 => "function_error",
        Ok(_) => "ok",
        Err(e) => e.code(),
    };
    metrics::counter!("pixflow_invocations_total", "function" => name.clone(), "outcome" => outcome).increment(1);
    metrics::histogram!("pixflow_invocation_duration_seconds", "function" => name.clone())
        .record(started.elapsed().as_secs_f64());
    if let Ok(out) = &result {
        let bytes: u64 = match &out.produced {
            Produced::Renditions(r) => r.iter().map(|r| r.bytes.len() as u64).sum(),
            Produced::Reply(r) => r.bytes.len() as u64,
        };
        let pixels: u64 = out.renditions().iter().map(|r| u64::from(r.width) * u64::from(r.height)).sum();
        metrics::counter!("pixflow_bytes_out_total", "function" => name.clone()).increment(bytes);
        metrics::counter!("pixflow_pixels_processed_total", "function" => name.clone()).increment(pixels);
        metrics::histogram!("pixflow_invocation_cpu_seconds", "function" => name).record(out.cpu.as_secs_f64());
    }
    result
}

async fn invoke_inner(
    node: &Arc<Node>,
    f: &Arc<Function>,
    req: Invocation,
    foreign: Option<Arc<dyn pixflow_imageops::ForeignDecoder + Send + Sync>>,
    ticket: Option<NodeTicket>,
) -> Result<Output, InvokeError> {
    let quota = &f.deployment.quota;
    let bytes = req.bytes();
    metrics::counter!("pixflow_bytes_in_total", "function" => f.name().to_owned()).increment(bytes);
    let inline = bytes.saturating_sub(req.referenced_bytes);
    if inline > quota.max_request_bytes {
        return Err(InvokeError::RequestTooLarge { limit: quota.max_request_bytes, actual: inline });
    }
    if f.is_retired() {
        return Err(Rejected::Closed.into());
    }
    let pipeline = match &f.processes {
        Some(_) => None,
        None => Some(f.pipeline_with(&req.params, &req.platform_params)?),
    };
    let ticket = match ticket {
        Some(t) => t,
        None => node.admit(bytes)?,
    };
    let waited = tokio::time::Instant::now();
    let deadline = waited + quota.timeout;
    // A program that does not start is reported at once, not after the whole timeout; the
    // request still asks for an instance, so a fixed program is picked up.
    let start_failed = |p: &Processes| {
        p.failing().map(|e| {
            f.pool.want_instance();
            InvokeError::StartFailed(e)
        })
    };
    if let Some(e) = f.processes.as_deref().and_then(start_failed) {
        return Err(e);
    }
    let acquired = if req.background { f.pool.acquire_background().await } else { f.pool.acquire(quota.timeout).await };
    let permit = match acquired {
        Ok(p) => p,
        Err(Rejected::NoInstance) => {
            return Err(f.processes.as_deref().and_then(start_failed).unwrap_or(Rejected::NoInstance.into()));
        }
        Err(e) => return Err(e.into()),
    };
    // Background work's wait for a slot is not part of its run.
    let deadline = if req.background { tokio::time::Instant::now() + quota.timeout } else { deadline };
    let Some(pipeline) = pipeline else {
        let queued = waited.elapsed();
        let processes = f.processes.as_ref().ok_or_else(|| InvokeError::Internal("no processes".into()))?;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let reply = processes
            .call(req.input, &req.params, req.content_type.as_deref(), left, quota.timeout, quota.max_response_bytes)
            .await;
        drop((permit, ticket));
        return Ok(Output { produced: Produced::Reply(reply?), queued, cpu: Duration::ZERO });
    };
    let job = EngineJob {
        pipeline,
        input: req.input,
        inputs: req.inputs,
        limits: quota.limits,
        deadline,
        timeout: quota.timeout,
        max_response_bytes: quota.max_response_bytes,
        foreign,
    };
    let run = run_engine(node, job, (permit, ticket)).await?;
    let queued = run.started.saturating_duration_since(waited);
    Ok(Output { produced: Produced::Renditions(run.renditions), queued, cpu: run.cpu })
}

/// One run of the engine on the node's CPU pool.
pub struct EngineJob {
    pub pipeline: Pipeline,
    pub input: Vec<u8>,
    pub inputs: BTreeMap<String, Vec<u8>>,
    pub limits: pixflow_imageops::Limits,
    /// When the caller stops waiting (queueing for a CPU counts against it).
    pub deadline: tokio::time::Instant,
    /// The timeout the deadline came from (for the error).
    pub timeout: Duration,
    pub max_response_bytes: u64,
    pub foreign: Option<Arc<dyn pixflow_imageops::ForeignDecoder + Send + Sync>>,
}

/// What one engine run gave.
pub struct EngineRun {
    pub renditions: Vec<pixflow_imageops::Rendition>,
    /// CPU time of the run.
    pub cpu: Duration,
    /// When it got a CPU.
    pub started: tokio::time::Instant,
}

/// Runs a pipeline on one of the node's CPUs under the job's deadline. `held` (slots, node admission) is kept until the engine actually
/// stops, even after the caller stopped waiting, so the node never runs or holds more than it
/// admitted. Front ends without a function (the CDN's ad-hoc transformations) call it directly.
pub async fn run_engine(node: &Arc<Node>, job: EngineJob, held: impl Send + 'static) -> Result<EngineRun, InvokeError> {
    let EngineJob { pipeline, input, inputs, mut limits, deadline, timeout, max_response_bytes, foreign } = job;
    if node.saturated() {
        metrics::counter!("pixflow_engine_refused_total", "reason" => "overdue").increment(1);
        return Err(InvokeError::Overloaded("every CPU is busy with work past its deadline"));
    }
    // Waiting for a CPU counts against the timeout too.
    let cpu_permit = match tokio::time::timeout_at(deadline, node.cpu.clone().acquire_owned()).await {
        Ok(Ok(p)) => p,
        Ok(Err(_)) => return Err(InvokeError::Internal("CPU pool closed".into())),
        Err(_) => return Err(InvokeError::Timeout(timeout)),
    };
    let started = tokio::time::Instant::now();
    let left = deadline.saturating_duration_since(started);
    // The time spent queueing counts against the timeout.
    limits.max_op_millis = u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1);
    let engine_deadline = deadline.into_std();
    let mut work = tokio::task::spawn_blocking(move || {
        let _held = (held, cpu_permit);
        let clock = cpu_time::ThreadTime::now();
        let opts = RunOptions {
            limits,
            foreign: foreign.as_deref().map(|f| f as &dyn pixflow_imageops::ForeignDecoder),
            final_output: None,
            inputs: Some(&inputs),
            deadline: Some(engine_deadline),
        };
        let renditions = pipeline.run(&input, &opts);
        (renditions, clock.elapsed())
    });
    let (renditions, cpu) = match tokio::time::timeout(left, &mut work).await {
        Ok(Ok(done)) => done,
        Ok(Err(join)) => return Err(InvokeError::Internal(format!("the engine stopped: {join}"))),
        Err(_) => {
            watch_overdue(node.clone(), work, started + left);
            return Err(InvokeError::Timeout(timeout));
        }
    };
    let renditions = renditions.map_err(|e| match e {
        pixflow_imageops::Error::Timeout { .. } => InvokeError::Timeout(timeout),
        e => InvokeError::Engine(e),
    })?;
    let out_bytes: u64 = renditions.iter().map(|r| r.bytes.len() as u64).sum();
    if out_bytes > max_response_bytes {
        return Err(InvokeError::ResponseTooLarge { limit: max_response_bytes, actual: out_bytes });
    }
    Ok(EngineRun { renditions, cpu, started })
}

/// Counts an engine run that outlived its deadline until it stops (it keeps its CPU until
/// then): the `pixflow_engine_overdue` gauge, how far past the deadline it ran, and a warning.
fn watch_overdue<T: Send + 'static>(node: Arc<Node>, work: tokio::task::JoinHandle<T>, deadline: tokio::time::Instant) {
    node.overdue.fetch_add(1, Ordering::AcqRel);
    metrics::counter!("pixflow_engine_overdue_total").increment(1);
    metrics::gauge!("pixflow_engine_overdue").set(node.overdue() as f64);
    tokio::spawn(async move {
        let _ = work.await;
        let late = deadline.elapsed();
        node.overdue.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("pixflow_engine_overdue").set(node.overdue() as f64);
        metrics::histogram!("pixflow_engine_overdue_seconds").record(late.as_secs_f64());
        if late > Duration::from_secs(1) {
            tracing::warn!(late_ms = late.as_millis() as u64, "engine work ran past its deadline");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_grow_up_to_the_node_limit_and_give_everything_back() {
        let node = Node::new(NodeLimits { cpus: 1, max_held_bytes: 100, max_requests: 10 });
        let mut t = node.admit(60).unwrap();
        // One byte past the limit is refused and leaves the ticket as it was.
        assert!(matches!(t.grow(41), Err(InvokeError::Overloaded(_))));
        assert_eq!(node.held_bytes.load(Ordering::Acquire), 60);
        t.grow(40).unwrap();
        assert_eq!(node.held_bytes.load(Ordering::Acquire), 100);
        assert!(node.admit(1).is_err());
        drop(t);
        assert_eq!((node.held_bytes.load(Ordering::Acquire), node.requests()), (0, 0));
    }

    /// A decoder that blocks until the test lets it go: engine work that cannot be interrupted.
    struct Gate(std::sync::Mutex<std::sync::mpsc::Receiver<()>>);

    impl pixflow_imageops::ForeignDecoder for Gate {
        fn decode(
            &self,
            _: pixflow_imageops::Format,
            _: &[u8],
            _: &pixflow_imageops::Limits,
        ) -> pixflow_imageops::Result<Option<image::DynamicImage>> {
            let _ = self.0.lock().unwrap().recv();
            Ok(Some(image::DynamicImage::new_rgb8(8, 8)))
        }
    }

    fn heif_8x8() -> Vec<u8> {
        let mut b = b"\0\0\0\x14ftypavif\0\0\0\0mif1".to_vec();
        b.extend_from_slice(b"\0\0\0\x14ispe\0\0\0\0");
        b.extend_from_slice(&8u32.to_be_bytes());
        b.extend_from_slice(&8u32.to_be_bytes());
        b
    }

    #[tokio::test]
    async fn work_past_its_deadline_is_counted_and_a_saturated_pool_refuses_more() {
        let node = Node::new(NodeLimits { cpus: 1, max_held_bytes: 1 << 20, max_requests: 10 });
        let (release, gate) = std::sync::mpsc::channel();
        let foreign: Arc<dyn pixflow_imageops::ForeignDecoder + Send + Sync> =
            Arc::new(Gate(std::sync::Mutex::new(gate)));
        let job = |timeout: Duration| EngineJob {
            pipeline: Pipeline::from_steps([("flip", std::iter::empty::<(&str, &str)>())]).unwrap(),
            input: heif_8x8(),
            inputs: BTreeMap::new(),
            limits: pixflow_imageops::Limits::default(),
            deadline: tokio::time::Instant::now() + timeout,
            timeout,
            max_response_bytes: 1 << 20,
            foreign: Some(foreign.clone()),
        };
        let first = run_engine(&node, job(Duration::from_millis(50)), ()).await;
        assert!(matches!(first, Err(InvokeError::Timeout(_))), "{:?}", first.err());
        // The decoder is still blocked: the run holds the only CPU past its deadline.
        assert_eq!(node.overdue(), 1);
        assert!(node.saturated());
        let second = run_engine(&node, job(Duration::from_secs(5)), ()).await;
        assert!(matches!(second, Err(InvokeError::Overloaded(_))), "{:?}", second.err());
        // Once it stops, the CPU is free again and work is admitted.
        release.send(()).unwrap();
        while node.overdue() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        release.send(()).unwrap();
        let third = run_engine(&node, job(Duration::from_secs(30)), ()).await;
        assert!(third.is_ok(), "{:?}", third.err());
    }
}
