//! Process functions: user programs in any language, each instance a child process serving
//! HTTP on a port the platform assigns (`$PORT`, OpenFaaS of-watchdog's HTTP mode). The
//! runtime speaks HTTP only to these children, on loopback.
//!
//! - Start: a free loopback port is chosen, the program starts in the manifest's folder with
//!   the manifest's environment plus the port, and is ready once the port accepts connections.
//!   The time from spawn to ready is the instance's cold start.
//! - Memory: enforced by the OS. With a writable cgroup v2 hierarchy that delegates the memory
//!   controller, each instance gets its own cgroup with `memory.max` (and no swap); otherwise
//!   the address-space rlimit is set through `prlimit(1)` before the program starts
//!   (`RLIMIT_AS`, which also counts memory a runtime only reserves).
//! - Timeout: a request that outlives the function's timeout is answered 504 and its instance
//!   is killed (it may be stuck) and replaced.
//! - Crashes: an instance that exits, or fails to answer a request at the HTTP level, is taken
//!   out of service at once and replaced; a program that keeps exiting or fails to start is
//!   restarted with exponential backoff (100 ms doubling to 30 s).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::function::{InvokeError, Reply};
use crate::manifest::ProcessSpec;
use crate::pool::Pool;

/// Longest a new instance may take to open its port.
const START_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// An instance up this long resets the backoff when it exits.
const STABLE_UPTIME: Duration = Duration::from_secs(10);
/// A request with less time left than this is not sent (it could only time out).
const MIN_SEND_BUDGET: Duration = Duration::from_millis(5);

/// How memory limits are enforced on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryLimiter {
    /// cgroup v2: one child cgroup per instance under this directory.
    Cgroup(PathBuf),
    /// `prlimit --as` before exec.
    Rlimit,
}

impl MemoryLimiter {
    /// cgroup v2 when `/sys/fs/cgroup` is a writable v2 hierarchy with the memory controller
    /// delegated to children, else rlimits.
    pub fn detect() -> MemoryLimiter {
        let root = Path::new("/sys/fs/cgroup");
        let delegated = std::fs::read_to_string(root.join("cgroup.subtree_control"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
        let dir = root.join(format!("pixflow-{}", std::process::id()));
        if delegated && std::fs::create_dir_all(&dir).is_ok() {
            // Children of this directory need the controller too.
            if std::fs::write(dir.join("cgroup.subtree_control"), "+memory").is_ok() {
                return MemoryLimiter::Cgroup(dir);
            }
            let _ = std::fs::remove_dir(&dir);
        }
        MemoryLimiter::Rlimit
    }
}

/// What every process function of a node shares: how memory is limited, where secrets come
/// from, and the tag that marks the node's children.
#[derive(Debug, Clone)]
pub struct Context {
    pub limiter: MemoryLimiter,
    pub secrets: Arc<crate::secrets::Secrets>,
    pub node_tag: Option<String>,
}

/// The environment variable that carries a node's tag into its children.
pub const NODE_TAG_ENV: &str = "PIXFLOW_NODE";

/// Whether `setpriv(1)` (util-linux) can set the parent-death signal here.
static HAS_SETPRIV: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
    let found = std::process::Command::new("setpriv")
        .args(["--pdeathsig", "KILL", "--", "true"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        tracing::warn!(
            "setpriv (util-linux) is missing: process functions' children are stopped at shutdown and at the next start, but not at once if the node is killed"
        );
    }
    found
});

/// Sends SIGKILL to the process group `pgid` (an instance and whatever it started), without
/// blocking the runtime's thread.
async fn kill_group(pgid: u32) {
    let _ = tokio::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await;
}

/// Stops every process carrying `tag` in its environment: the children (and their children) of
/// an earlier run of this node that ended without stopping them. Returns how many there were.
/// Linux only (it reads `/proc`); elsewhere it finds none.
pub fn reap_orphans(tag: &str) -> usize {
    let needle = format!("{NODE_TAG_ENV}={tag}");
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    let pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|var| var == needle.as_bytes()))
        })
        .collect();
    if pids.is_empty() {
        return 0;
    }
    let _ = std::process::Command::new("kill")
        .arg("-KILL")
        .arg("--")
        .args(pids.iter().map(u32::to_string))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    // Wait (briefly) until they are gone, so their ports are free for the new instances.
    let gone = |pid: &u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_or(true, |stat| stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
    };
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while !pids.iter().all(gone) && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    pids.len()
}

/// Longest line of a program's standard error kept as its last word.
const MAX_STDERR_LINE: usize = 1024;

/// Copies a program's standard error into the node's log, a line at a time (each line cut at
/// 1 KiB), and keeps the last line for start errors.
async fn relay_stderr(mut err: tokio::process::ChildStderr, function: String, last: Arc<Mutex<String>>) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 8192];
    let mut line = Vec::new();
    let emit = |line: &mut Vec<u8>| {
        let text = String::from_utf8_lossy(line).trim_end().to_owned();
        line.clear();
        if !text.is_empty() {
            tracing::info!(function = %function, "{text}");
            *last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = text;
        }
    };
    loop {
        let n = match err.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for part in buf[..n].split_inclusive(|&b| b == b'\n') {
            let room = MAX_STDERR_LINE.saturating_sub(line.len());
            line.extend_from_slice(&part[..part.len().min(room)]);
            if part.ends_with(b"\n") {
                emit(&mut line);
            }
        }
    }
    emit(&mut line);
}

/// One running child.
struct Instance {
    port: u16,
    started: Instant,
    in_flight: AtomicU32,
    kill: Notify,
    killed: AtomicBool,
}

/// The instances of one process function.
pub struct Processes {
    name: String,
    spec: ProcessSpec,
    workdir: PathBuf,
    memory_bytes: u64,
    context: Context,
    live: Mutex<Vec<Arc<Instance>>>,
    starting: AtomicU32,
    /// Set by `stop_all`: starts still under way kill their child instead of adding it.
    stopped: AtomicBool,
    failures: AtomicU32,
    /// Why the last start failed; cleared by a start that succeeds.
    last_error: Mutex<Option<String>>,
    next_start: Mutex<Instant>,
    client: Client<HttpConnector, Full<Bytes>>,
    /// The function's pool: its ready count follows the live instances.
    pool: Arc<Pool>,
    /// Wakes the autoscaler when an instance dies.
    pub(crate) changed: Notify,
}

impl Processes {
    pub fn new(
        name: &str,
        spec: ProcessSpec,
        workdir: PathBuf,
        memory_bytes: u64,
        context: Context,
        pool: Arc<Pool>,
    ) -> Processes {
        Processes {
            pool,
            name: name.to_owned(),
            spec,
            workdir,
            memory_bytes,
            context,
            live: Mutex::new(Vec::new()),
            starting: AtomicU32::new(0),
            stopped: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            last_error: Mutex::new(None),
            next_start: Mutex::new(Instant::now()),
            client: Client::builder(TokioExecutor::new()).build_http(),
            changed: Notify::new(),
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Instance>>> {
        // Only whole instances are pushed or removed, so a poisoned list is still consistent.
        self.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Live instances.
    pub fn count(&self) -> u32 {
        u32::try_from(self.live().len()).unwrap_or(u32::MAX)
    }

    /// Sets the pool's ready count to the live instances.
    fn publish(&self, live: usize) {
        self.pool.set_ready(u32::try_from(live).unwrap_or(u32::MAX));
    }

    /// Takes an instance out of service and kills it; the autoscaler starts a replacement.
    fn replace(&self, instance: &Arc<Instance>, reason: &'static str) {
        instance.killed.store(true, Ordering::Release);
        instance.kill.notify_one();
        let was_live = {
            let mut list = self.live();
            let before = list.len();
            list.retain(|i| !Arc::ptr_eq(i, instance));
            let removed = list.len() != before;
            if removed {
                self.publish(list.len());
            }
            removed
        };
        if was_live {
            tracing::warn!(function = %self.name, reason, "process function instance replaced");
            metrics::counter!("pixflow_instance_restarts_total", "function" => self.name.clone(), "reason" => reason)
                .increment(1);
            self.changed.notify_one();
        }
    }

    /// Starts or stops instances toward `want`; the pool's ready count follows live instances.
    pub fn scale(self: &Arc<Self>, want: u32) {
        let live = self.count();
        let starting = self.starting.load(Ordering::Acquire);
        if want > live + starting {
            let now = Instant::now();
            let not_before = *self.next_start.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if now < not_before {
                return;
            }
            for _ in 0..(want - live - starting) {
                self.starting.fetch_add(1, Ordering::AcqRel);
                let me = self.clone();
                tokio::spawn(async move { me.start().await });
            }
        } else if want < live {
            // Idle instances go first; busy ones finish their requests.
            let mut list = self.live();
            let mut extra = (live - want) as usize;
            list.retain(|i| {
                if extra > 0 && i.in_flight.load(Ordering::Acquire) == 0 {
                    extra -= 1;
                    i.killed.store(true, Ordering::Release);
                    i.kill.notify_one();
                    false
                } else {
                    true
                }
            });
            self.publish(list.len());
        }
    }

    /// Stops every instance, including ones still starting.
    pub fn stop_all(&self) {
        let mut list = self.live();
        self.stopped.store(true, Ordering::Release);
        for i in list.drain(..) {
            i.killed.store(true, Ordering::Release);
            i.kill.notify_one();
        }
    }

    async fn start(self: Arc<Self>) {
        let started = Instant::now();
        let result = self.spawn().await;
        self.starting.fetch_sub(1, Ordering::AcqRel);
        match result {
            Ok(instance) => {
                *self.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                {
                    let mut list = self.live();
                    if self.stopped.load(Ordering::Acquire) {
                        instance.killed.store(true, Ordering::Release);
                        instance.kill.notify_one();
                        return;
                    }
                    list.push(instance);
                    self.publish(list.len());
                }
                let name = self.name.clone();
                metrics::counter!("pixflow_cold_starts_total", "function" => name.clone()).increment(1);
                metrics::histogram!("pixflow_cold_start_seconds", "function" => name)
                    .record(started.elapsed().as_secs_f64());
            }
            Err(e) => {
                tracing::warn!(function = %self.name, error = %e, "process function instance failed to start");
                *self.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
                if self.live().is_empty() {
                    // Nothing will serve the requests waiting for this start: tell them now.
                    self.pool.fail_waiters();
                }
                self.back_off();
            }
        }
    }

    /// The last start error while no instance runs: the function cannot serve now.
    pub fn failing(&self) -> Option<String> {
        let error = self.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()?;
        self.live().is_empty().then_some(error)
    }

    fn back_off(&self) {
        let failures = self.failures.fetch_add(1, Ordering::AcqRel).min(16);
        let delay = BACKOFF_FIRST.saturating_mul(1 << failures).min(BACKOFF_MAX);
        *self.next_start.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now() + delay;
        metrics::counter!("pixflow_instance_failures_total", "function" => self.name.clone()).increment(1);
        self.changed.notify_one();
    }

    /// Starts one child and waits for its port.
    async fn spawn(self: &Arc<Self>) -> Result<Arc<Instance>, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("finding a free port: {e}"))?
            .port();
        // The program dies with the node even when the node is killed outright: `setpriv`
        // sets the parent-death signal before it executes the rest (`prlimit`, then the
        // program). Its own process group lets a restarted node stop what it left behind.
        let mut argv: Vec<String> = Vec::new();
        if *HAS_SETPRIV {
            argv.extend(["setpriv", "--pdeathsig", "KILL", "--"].map(String::from));
        }
        if self.context.limiter == MemoryLimiter::Rlimit {
            argv.extend(["prlimit".to_owned(), format!("--as={}", self.memory_bytes), "--".to_owned()]);
        }
        argv.extend(self.spec.command.iter().cloned());
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        // Only what the manifest gives (and PATH): never the node's own secrets.
        cmd.current_dir(&self.workdir).env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        for (var, name) in &self.spec.secrets {
            let value = self.context.secrets.get(name).map_err(|e| format!("process.secrets.{var}: {e}"))?;
            cmd.env(var, value.expose());
        }
        if let Some(tag) = &self.context.node_tag {
            cmd.env(NODE_TAG_ENV, tag);
        }
        cmd.envs(&self.spec.env)
            .env(&self.spec.port_env, port.to_string())
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| format!("starting {:?}: {e}", self.spec.command))?;
        // Also the process group's id (`process_group(0)`).
        let pid = child.id();
        let last_line = Arc::new(Mutex::new(String::new()));
        let stderr =
            child.stderr.take().map(|err| tokio::spawn(relay_stderr(err, self.name.clone(), last_line.clone())));
        // Why a start failed, with the program's last word on standard error.
        let failed = |what: String, stderr: Option<tokio::task::JoinHandle<()>>| async move {
            if let Some(relay) = stderr {
                // The pipe closes when the program exits; give the relay a moment to finish.
                let _ = tokio::time::timeout(Duration::from_millis(500), relay).await;
            }
            let line = last_line.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
            if line.is_empty() { what } else { format!("{what}: {line}") }
        };
        let cgroup = match (&self.context.limiter, pid) {
            (MemoryLimiter::Cgroup(root), Some(pid)) => {
                let dir = root.join(format!("{}-{port}", self.name));
                let placed = std::fs::create_dir_all(&dir)
                    .and_then(|()| std::fs::write(dir.join("memory.max"), self.memory_bytes.to_string()))
                    .and_then(|()| std::fs::write(dir.join("memory.swap.max"), "0").or(Ok(())))
                    .and_then(|()| std::fs::write(dir.join("cgroup.procs"), pid.to_string()));
                if let Err(e) = placed {
                    let _ = child.start_kill();
                    kill_group(pid).await;
                    return Err(format!("placing the instance in cgroup {}: {e}", dir.display()));
                }
                Some(dir)
            }
            _ => None,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(failed(format!("exited before opening port {port} ({status})"), stderr).await);
            }
            if Instant::now() >= deadline {
                let _ = child.start_kill();
                if let Some(pid) = pid {
                    kill_group(pid).await;
                }
                return Err(failed(format!("did not open port {port} within {START_TIMEOUT:?}"), None).await);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let instance = Arc::new(Instance {
            port,
            started: Instant::now(),
            in_flight: AtomicU32::new(0),
            kill: Notify::new(),
            killed: AtomicBool::new(false),
        });
        let (me, watched) = (self.clone(), instance.clone());
        tokio::spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status.ok(),
                () = watched.kill.notified() => {
                    if let Some(pid) = pid {
                        kill_group(pid).await;
                    }
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    None
                }
            };
            if let Some(dir) = cgroup {
                let _ = std::fs::remove_dir(dir);
            }
            if !watched.killed.load(Ordering::Acquire) {
                tracing::warn!(function = %me.name, ?status, "process function instance exited");
                // Only a program that stayed up a while earns a fresh backoff.
                if watched.started.elapsed() >= STABLE_UPTIME {
                    me.failures.store(0, Ordering::Release);
                }
                me.replace(&watched, "exited");
                // A program that keeps dying is restarted ever more slowly.
                me.back_off();
            }
        });
        Ok(instance)
    }

    /// Sends one request to the least busy instance with `left` of the function's `timeout`
    /// remaining. An instance is killed only when a request has run (nearly) the whole timeout
    /// on it.
    pub async fn call(
        &self,
        body: Vec<u8>,
        params: &[(String, String)],
        content_type: Option<&str>,
        left: Duration,
        timeout: Duration,
        max_response: u64,
    ) -> Result<Reply, InvokeError> {
        if left < MIN_SEND_BUDGET {
            return Err(InvokeError::Timeout(timeout));
        }
        let instance = {
            let list = self.live();
            let picked = list
                .iter()
                .min_by_key(|i| i.in_flight.load(Ordering::Acquire))
                .cloned()
                .ok_or_else(|| InvokeError::Unavailable("no instance of the function is running".into()))?;
            // Counted under the lock, so a scale-down never picks it as idle.
            picked.in_flight.fetch_add(1, Ordering::AcqRel);
            picked
        };
        struct Busy(Arc<Instance>);
        impl Drop for Busy {
            fn drop(&mut self) {
                self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _busy = Busy(instance.clone());
        let mut url = format!("http://127.0.0.1:{}/", instance.port);
        if !params.is_empty() {
            url.push('?');
            url.push_str(&serde_urlencoded::to_string(params).map_err(|e| InvokeError::Internal(e.to_string()))?);
        }
        let req = hyper::Request::post(&url)
            .header(hyper::header::CONTENT_TYPE, content_type.unwrap_or("application/octet-stream"))
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| InvokeError::Internal(e.to_string()))?;
        let exchange = async {
            let resp = match self.client.request(req).await {
                Ok(resp) => resp,
                Err(e) => {
                    // It crashed or dropped the request: it is not trusted with another one.
                    self.replace(&instance, "failed");
                    return Err(InvokeError::FunctionFailed(format!("the function's process did not answer: {e}")));
                }
            };
            let status = resp.status().as_u16();
            let content_type = resp
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/octet-stream")
                .to_owned();
            let limit = usize::try_from(max_response).unwrap_or(usize::MAX);
            let bytes = match http_body_util::Limited::new(resp.into_body(), limit).collect().await {
                Ok(b) => b.to_bytes().to_vec(),
                Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
                    return Err(InvokeError::ResponseTooLarge { limit: max_response, actual: max_response + 1 });
                }
                Err(e) => return Err(InvokeError::FunctionFailed(format!("reading the function's answer: {e}"))),
            };
            Ok(Reply { status, content_type, bytes })
        };
        match tokio::time::timeout(left, exchange).await {
            Ok(result) => result,
            Err(_) => {
                // A request that ran (nearly) the whole timeout on the instance found it
                // stuck: kill and replace it. One that spent a tenth of its time queueing
                // first only times out.
                if left.as_secs_f64() >= timeout.as_secs_f64() * 0.9 {
                    self.replace(&instance, "timeout");
                }
                Err(InvokeError::Timeout(timeout))
            }
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        self.stop_all();
    }
}
