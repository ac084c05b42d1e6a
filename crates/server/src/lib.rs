//! The composition root: the only crate with HTTP and JSON wire types. [`App::start`] opens the
//! node's state (the backend its [`Config`] names) and object store, loads functions (from the
//! catalogue, then from a folder, GitOps style),
//! creates the admin token on first start and runs the asynchronous workers; [`router`] is the
//! versioned API; [`serve`] runs it on a listener until a shutdown future resolves, then drains.

pub mod auth;
mod callback;
pub mod cdn;
pub mod conn;
mod delivery;
mod dispatch;
pub mod fetch;
mod functions;
mod health;
mod invocations;
mod invoke;
mod objects;
pub mod problem;
pub mod s3;
mod supervisor;

pub use dispatch::spool::DEFAULT_BUCKET as DEFAULT_SPOOL_BUCKET;
pub use pixflow_backends::objects::DEFAULT_MAX_UPLOADS;
pub use pixflow_backends::queue::check_namespace as check_queue_namespace;
pub use pixflow_backends::{QueueError, S3Config, StateError};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::routing::{get, post};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use pixflow_backends::{Catalogue, InvocationLog, Objects, State};
use pixflow_runtime::{Node, NodeLimits, Registry, RegistryOptions};

/// Asynchronous workers of a node with `cpus` CPUs: 4 per CPU, at least 16. A worker spends
/// most of an invocation waiting for its state writes (claim, start, outcome, settlement) and,
/// when the function is busy, for a slot behind synchronous callers; more of them than CPUs
/// keep the CPUs busy and let the writes share commits (decision 021).
pub fn default_async_workers(cpus: usize) -> usize {
    cpus.saturating_mul(4).max(16)
}

/// How a node runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the SQLite state file, a generated admin token and (by default) the objects and
    /// the edge cache live.
    pub data_dir: PathBuf,
    /// Manifests deployed at start (`*.yaml`, `*.yml`, `*.json`).
    pub functions_dir: Option<PathBuf>,
    pub node: NodeLimits,
    /// Autoscaler sampling period.
    pub tick: Duration,
    /// Longest a shutdown waits for in-flight work.
    pub shutdown_grace: Duration,
    /// Asynchronous invocations claimed at once (0: this node only queues them); see
    /// [`default_async_workers`].
    pub async_workers: usize,
    /// An admin token to accept (besides generated ones), e.g. from `PIXFLOW_ADMIN_TOKEN`.
    pub admin_token: Option<String>,
    /// Where the node's state lives: the catalogue, the invocation log and the queue.
    pub state: StateBackend,
    /// Where the queues live: in the state's own database, or in NATS JetStream.
    pub queue: QueueBackend,
    /// This node's name among the nodes sharing a PostgreSQL state: its queue leases are
    /// recorded under it, so its next start takes back at once what this run held. Keep it
    /// stable across restarts and different on every node (default: the host name).
    pub node_name: String,
    /// Keep a SQLite state in memory, and write no admin token or signing key to the data
    /// folder (tests).
    pub in_memory: bool,
    /// Asynchronous invocations waiting or running before new ones get 503.
    pub max_async_queued: u64,
    /// How long finished asynchronous invocations (results, dead letters) are kept.
    pub async_retention: Duration,
    /// What the object store's change feed keeps for readers that fall behind (the CDN's
    /// purges, triggers): at most this many changes, none older than this.
    pub feed_retention: pixflow_backends::Retention,
    /// `host:port` destinations completion callbacks may go to (none by default).
    pub callback_allow: Vec<String>,
    /// The embedded object store's folder (default: `objects/` in the data folder); with an
    /// S3 service, where uploads spool.
    pub objects_dir: Option<PathBuf>,
    /// Objects in this S3-compatible service instead of the embedded store.
    pub objects_s3: Option<pixflow_backends::S3Config>,
    /// Largest object one PUT may store.
    pub max_object_bytes: u64,
    /// Object uploads (native PUTs, S3 objects and parts) under way at once; beyond it, 503.
    pub max_uploads: usize,
    /// The reserved bucket of large queued payloads and kept results (see `dispatch::spool`).
    pub spool_bucket: String,
    /// Base of the URLs handed out for stored objects (`{public_url}/cdn/{bucket}/{key}`).
    pub public_url: String,
    /// `Cache-Control` of CDN answers for buckets that set none.
    pub cdn_cache_control: String,
    /// Key of ad-hoc CDN URL signatures (default: generated at first start, kept in the data
    /// folder; nodes behind one CDN must share it).
    pub cdn_signing_key: Option<String>,
    /// Accept `_` instead of a signature in ad-hoc CDN URLs.
    pub cdn_allow_unsigned: bool,
    /// Public buckets whose active types (HTML, SVG, XML, JavaScript) `/cdn` serves inline
    /// instead of as downloads (run the CDN on an origin of its own first: `--cdn-listen`).
    pub cdn_inline_active: Vec<String>,
    /// Formats `auto` may pick, in order of preference, when `Accept` allows them.
    pub cdn_auto_formats: Vec<pixflow_imageops::OutFormat>,
    /// Engine limits of ad-hoc CDN transformations.
    pub cdn_limits: pixflow_imageops::Limits,
    /// Longest an ad-hoc CDN transformation may run.
    pub cdn_timeout: Duration,
    /// The edge cache's folder (default: `cdn-cache/` in the data folder) and sizes.
    pub cdn_cache_dir: Option<PathBuf>,
    pub cdn_cache_memory: u64,
    pub cdn_cache_disk: u64,
    /// Origins URL sources may be fetched from (none by default: URL sources are off).
    pub url_policy: fetch::UrlPolicy,
    /// The key pair S3 clients sign with (SigV4) on the S3-compatible endpoint.
    pub s3_access_key: Option<String>,
    pub s3_secret_key: Option<String>,
    /// A folder of secrets process functions reference by name (one file per secret).
    pub secrets_dir: Option<PathBuf>,
    /// Also take secrets from the node's environment (`PIXFLOW_SECRET_<NAME>`).
    pub secrets_from_env: bool,
    /// Deadlines of slow clients (headers, bodies) and how much of a refused body is drained.
    pub client_deadlines: conn::ClientDeadlines,
}

impl Config {
    pub fn new(data_dir: impl Into<PathBuf>) -> Config {
        let node = NodeLimits::default();
        Config {
            data_dir: data_dir.into(),
            functions_dir: None,
            async_workers: default_async_workers(node.cpus),
            node,
            tick: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(30),
            admin_token: None,
            state: StateBackend::Sqlite,
            queue: QueueBackend::Embedded,
            node_name: host_name(),
            in_memory: false,
            max_async_queued: 10_000,
            async_retention: Duration::from_secs(7 * 86_400),
            feed_retention: pixflow_backends::Retention::default(),
            callback_allow: Vec::new(),
            objects_dir: None,
            objects_s3: None,
            max_object_bytes: 5 << 30,
            max_uploads: pixflow_backends::objects::DEFAULT_MAX_UPLOADS,
            spool_bucket: DEFAULT_SPOOL_BUCKET.to_owned(),
            public_url: "http://127.0.0.1:8080".into(),
            cdn_cache_control: "public, max-age=3600".into(),
            s3_access_key: None,
            s3_secret_key: None,
            url_policy: fetch::UrlPolicy::default(),
            cdn_signing_key: None,
            cdn_allow_unsigned: false,
            cdn_inline_active: Vec::new(),
            cdn_auto_formats: vec![pixflow_imageops::OutFormat::Avif, pixflow_imageops::OutFormat::Webp],
            cdn_limits: pixflow_imageops::Limits::default(),
            cdn_timeout: Duration::from_secs(30),
            cdn_cache_dir: None,
            cdn_cache_memory: 256 << 20,
            cdn_cache_disk: 10 << 30,
            client_deadlines: conn::ClientDeadlines::default(),
            secrets_dir: None,
            secrets_from_env: true,
        }
    }
}

/// Where a node keeps its state.
#[derive(Clone, PartialEq, Eq)]
pub enum StateBackend {
    /// A SQLite file in the data folder (`state.db`; in memory with [`Config::in_memory`]),
    /// owned by this one node.
    Sqlite,
    /// A PostgreSQL database shared by every node of a deployment
    /// (`postgres://user:password@host:5432/database`).
    Postgres { url: String },
}

impl std::fmt::Debug for StateBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateBackend::Sqlite => f.write_str("Sqlite"),
            // The URL may hold a password.
            StateBackend::Postgres { .. } => f.debug_struct("Postgres").finish_non_exhaustive(),
        }
    }
}

/// Where a node's queues live.
#[derive(Clone, PartialEq, Eq)]
pub enum QueueBackend {
    /// In the state's database (a table of the SQLite file, or of the shared PostgreSQL).
    Embedded,
    /// NATS JetStream (`nats://host:4222`), shared by every node that connects there; in
    /// `namespace`, apart from other deployments on the same server (every node sharing a
    /// state names the same one).
    Nats { url: String, namespace: Option<String> },
}

impl std::fmt::Debug for QueueBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueueBackend::Embedded => f.write_str("Embedded"),
            // The URL may hold credentials.
            QueueBackend::Nats { .. } => f.debug_struct("Nats").finish_non_exhaustive(),
        }
    }
}

/// Opens the JetStream queues, their leases as long as the workers' ([`dispatch::LEASE`]), their
/// names in `namespace`. A failure is the `QueueError` itself, for the caller to name the
/// setting at fault.
#[cfg(feature = "nats")]
async fn open_nats(url: &str, namespace: Option<&str>, holder: &str) -> Result<pixflow_backends::Queue> {
    let options = pixflow_backends::queue::NatsOptions {
        ack_wait: dispatch::LEASE,
        namespace: namespace.map(str::to_owned),
        ..Default::default()
    };
    Ok(pixflow_backends::Queue::nats(url, options, holder).await?)
}

#[cfg(not(feature = "nats"))]
async fn open_nats(_url: &str, _namespace: Option<&str>, _holder: &str) -> Result<pixflow_backends::Queue> {
    anyhow::bail!("this pixflow was built without the `nats` feature: the queue is in the state's database")
}

/// The machine's host name (`/proc/sys/kernel/hostname`, else `HOSTNAME`), else `pixflow`: the
/// default [`Config::node_name`].
pub fn host_name() -> String {
    let from_kernel = std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    from_kernel
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "pixflow".to_owned())
}

/// One running node.
pub struct App {
    pub registry: Arc<Registry>,
    pub node: Arc<Node>,
    /// Functions deployed through the API, token hashes, bucket settings of an S3 service.
    pub catalogue: Catalogue,
    /// Asynchronous invocations: requests, attempts, outcomes.
    pub invocations: InvocationLog,
    /// The state store the handles are on (closed at shutdown).
    state: State,
    pub objects: Objects,
    pub cdn: cdn::Cdn,
    pub config: Config,
    foreign: Option<Arc<dyn pixflow_imageops::ForeignDecoder + Send + Sync>>,
    metrics: PrometheusHandle,
    ready: AtomicBool,
    stopping: AtomicBool,
    /// The queues (asynchronous invocations today).
    pub queue: pixflow_backends::Queue,
    /// The depth of the invocations' queue as admission sees it.
    backlog: dispatch::Backlog,
    /// Cancelled when the node stops: the stop signal of background loops and listeners.
    stop: tokio_util::sync::CancellationToken,
    /// Connections of the S3 endpoint; a shutdown waits for them before closing the store.
    connections: tokio_util::task::TaskTracker,
    /// Serialises deploys and removals (registry and catalogue change together).
    deploys: tokio::sync::Mutex<()>,
    /// The background loops: queue workers, retention, the edge's purge follower, the backend
    /// probe.
    loops: supervisor::Supervisor,
    /// Whether the state store and the queue answer (the backend probe's findings).
    health: health::Health,
}

/// What [`App::start`] has to tell the operator.
pub struct Started {
    pub app: Arc<App>,
    /// An admin token created on this start (printed once; also written to the data folder).
    pub new_admin_token: Option<String>,
}

fn metrics_handle() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
            let builder = PrometheusBuilder::new();
            let builder = builder.set_buckets(&buckets).unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Only the first recorder of the process is installed; later apps (tests) share it.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

impl App {
    /// Opens state, deploys functions, starts workers. Call inside a tokio runtime.
    pub async fn start(
        config: Config,
        foreign: Option<Arc<dyn pixflow_imageops::ForeignDecoder + Send + Sync>>,
    ) -> Result<Started> {
        if !config.in_memory {
            // Private objects, payloads and results live here: the node's user only.
            let narrowed = pixflow_backends::files::private_dir(&config.data_dir)
                .with_context(|| format!("creating {}", config.data_dir.display()))?;
            if let Some(mode) = narrowed {
                tracing::warn!(
                    dir = %config.data_dir.display(),
                    was = format_args!("{mode:o}"),
                    "the data folder was open to other users; narrowed to 0700"
                );
            }
        }
        // A failure to open is returned as the `StateError` itself, for the caller to name the
        // setting at fault.
        let state = match &config.state {
            StateBackend::Sqlite if config.in_memory => State::memory().await?,
            StateBackend::Sqlite => State::sqlite(&config.data_dir.join("state.db")).await?,
            StateBackend::Postgres { url } => State::postgres(url).await?,
        };
        let (catalogue, invocations) = (state.catalogue(), state.invocations());
        let new_admin_token = admin_token(&catalogue, &config).await?;
        let queue = match &config.queue {
            QueueBackend::Embedded => state.queue(&config.node_name).await.context("opening the queue")?,
            QueueBackend::Nats { url, namespace } => open_nats(url, namespace.as_deref(), &config.node_name).await?,
        };
        let objects_dir = config.objects_dir.clone().unwrap_or_else(|| config.data_dir.join("objects"));
        let objects = match &config.objects_s3 {
            None => Objects::open(&objects_dir)
                .await
                .with_context(|| format!("opening the object store in {}", objects_dir.display()))?,
            Some(s3) => open_s3(s3, &catalogue, &objects_dir.join("spool")).await?,
        }
        .with_max_uploads(config.max_uploads)
        .with_feed_retention(config.feed_retention)
        .with_reserved_bucket(&config.spool_bucket);
        dispatch::spool::prepare(&objects, &config.spool_bucket).await?;
        let cache_dir = config.cdn_cache_dir.clone().unwrap_or_else(|| config.data_dir.join("cdn-cache"));
        let cache = pixflow_backends::EdgeCache::open(&cache_dir, config.cdn_cache_memory, config.cdn_cache_disk)
            .with_context(|| format!("opening the edge cache in {}", cache_dir.display()))?;
        let cdn = cdn::Cdn::new(cache, signing_key(&config)?);
        let node_tag = node_tag(&config)?;
        // Children of an earlier run of this node that ended abruptly (SIGKILL, power loss)
        // would hold ports and memory: stop them before starting new ones.
        let tag = node_tag.clone();
        let reaped = tokio::task::spawn_blocking(move || pixflow_runtime::process::reap_orphans(&tag)).await?;
        if reaped > 0 {
            tracing::warn!(reaped, "process-function children left by an earlier run of this node were stopped");
        }
        let health = health::Health::new(state.backend(), queue.kind(), objects.kind());
        let stop = tokio_util::sync::CancellationToken::new();
        let app = Arc::new(App {
            registry: Registry::new(RegistryOptions {
                tick: config.tick,
                secrets: Arc::new(pixflow_runtime::Secrets {
                    dir: config.secrets_dir.clone(),
                    from_env: config.secrets_from_env,
                }),
                node_tag: Some(node_tag.clone()),
            }),
            node: Node::new(config.node),
            catalogue,
            invocations,
            state,
            objects,
            cdn,
            foreign,
            metrics: metrics_handle(),
            ready: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            queue,
            backlog: dispatch::Backlog::default(),
            connections: tokio_util::task::TaskTracker::new(),
            deploys: tokio::sync::Mutex::new(()),
            loops: supervisor::Supervisor::new(stop.clone()),
            health,
            stop,
            config,
        });
        // Subscribed before loading, so a deploy through another node in between is not missed.
        let catalogue_changes = app.catalogue.changes();
        app.load_functions().await?;
        // Whatever the last run left running was cut short: run it again now, not after its lease.
        dispatch::reconcile(&app).await.context("taking back queued asynchronous invocations")?;
        for _ in 0..app.config.async_workers {
            let a = app.clone();
            app.loops.spawn("invocation-worker", move || dispatch::worker(a.clone()));
        }
        let (a, b, c) = (app.clone(), app.clone(), app.clone());
        app.loops.spawn("invocation-retention", move || dispatch::retention(a.clone()));
        app.loops.spawn("cdn-purge-follower", move || cdn::follow_changes(b.clone()));
        app.loops.spawn("backend-probe", move || health::probe(c.clone()));
        if let Some(first) = catalogue_changes {
            // The first run follows from the subscription made before the functions were read;
            // a run started again after a failure subscribes anew and reads them all again.
            let (a, first) = (app.clone(), std::sync::Mutex::new(Some(first)));
            app.loops.spawn("catalogue-follower", move || {
                let resumed = first.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
                functions::follow_catalogue(a.clone(), resumed)
            });
        }
        // Blobs a crash left without an object (renamed, never committed) are collected once.
        let (objects, started) = (app.objects.clone(), std::time::SystemTime::now());
        tokio::spawn(async move {
            match objects.collect_garbage(started).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "unreferenced object blobs removed"),
                Err(e) => tracing::warn!(error = %e, "collecting unreferenced object blobs"),
            }
        });
        app.ready.store(true, Ordering::Release);
        Ok(Started { app, new_admin_token })
    }

    async fn load_functions(&self) -> Result<()> {
        for (name, manifest) in self.catalogue.functions().await? {
            match pixflow_runtime::parse(&manifest) {
                Ok(d) => {
                    self.registry.deploy(d, manifest, &self.config.data_dir)?;
                }
                Err(e) => tracing::error!(function = %name, error = %e, "a stored manifest no longer validates"),
            }
        }
        if let Some(dir) = &self.config.functions_dir {
            for (path, text) in read_manifests(dir)? {
                let d = pixflow_runtime::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                let name = d.name.clone();
                let outcome =
                    self.registry.deploy(d, text, dir).with_context(|| format!("deploying {}", path.display()))?;
                tracing::info!(function = %name, file = %path.display(), ?outcome, "deployed from folder");
            }
        }
        Ok(())
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Resolves once the node is stopping (at once if it already is): the stop signal of the
    /// background loops.
    async fn stopped(&self) {
        self.stop.cancelled().await;
    }

    /// The node's stop signal, for loops that outlive a borrow of the app.
    fn stop_token(&self) -> tokio_util::sync::CancellationToken {
        self.stop.clone()
    }

    /// Stops taking work: readiness turns 503, workers stop claiming.
    fn begin_shutdown(&self) {
        self.ready.store(false, Ordering::Release);
        self.stopping.store(true, Ordering::Release);
        self.stop.cancel();
    }

    /// Shuts down: no new work, in-flight work finishes within the grace period, state is
    /// flushed. Queued asynchronous work stays in the state store for the next start.
    pub async fn shutdown(&self) {
        self.begin_shutdown();
        let grace = self.config.shutdown_grace;
        let left = self.registry.drain(grace).await;
        if left > 0 {
            tracing::warn!(left, "requests still running at the shutdown deadline");
        }
        // Process functions' children stop with the node.
        for f in self.registry.list() {
            if let Some(p) = &f.processes {
                p.stop_all();
            }
        }
        // One deadline for all background loops together; an attempt cut here comes back when
        // its lease runs out (or at once at this node's next start).
        let end = tokio::time::Instant::now() + grace;
        let aborted = self.loops.join(end).await;
        if aborted > 0 {
            tracing::warn!(aborted, "background work was cut at the shutdown deadline");
        }
        // S3 connections finish their requests (they were told to stop after the current one).
        self.connections.close();
        if tokio::time::timeout_at(end, self.connections.wait()).await.is_err() {
            tracing::warn!("S3 connections still open at the shutdown deadline were cut");
        }
        self.state.close().await;
        self.objects.close().await;
    }
}

/// The tag that marks this node's children: the same for every run on one data folder (so a
/// restart finds what an abrupt end left), random for a node with state in memory.
fn node_tag(config: &Config) -> Result<String> {
    use sha2::Digest as _;
    if config.in_memory {
        return auth::generate().context("generating the node's tag");
    }
    let dir = config.data_dir.canonicalize().with_context(|| format!("resolving {}", config.data_dir.display()))?;
    let digest = sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes());
    Ok(hex::encode(&digest[..12]))
}

/// Ensures an admin token exists; returns one created now.
async fn admin_token(catalogue: &Catalogue, config: &Config) -> Result<Option<String>> {
    if let Some(token) = &config.admin_token {
        anyhow::ensure!(token.len() >= 16, "the configured admin token is too short: use at least 16 characters");
        // A token configured before (and since replaced) stops working.
        catalogue.replace_labelled_token("configured", &auth::digest(token), auth::Role::Admin.as_str()).await?;
        return Ok(None);
    }
    if catalogue.has_role(auth::Role::Admin.as_str()).await? {
        return Ok(None);
    }
    let token = auth::generate().context("generating the admin token")?;
    catalogue.add_token(&auth::digest(&token), auth::Role::Admin.as_str(), "generated at first start").await?;
    if !config.in_memory {
        write_secret(&config.data_dir.join("admin-token"), &token)?;
    }
    Ok(Some(token))
}

/// The CDN signing key: configured, else kept in the data folder (made on first start).
fn signing_key(config: &Config) -> Result<Vec<u8>> {
    if let Some(k) = &config.cdn_signing_key {
        anyhow::ensure!(k.len() >= 16, "the CDN signing key is too short: use at least 16 characters");
        return Ok(k.as_bytes().to_vec());
    }
    let path = config.data_dir.join("cdn-signing-key");
    if !config.in_memory
        && let Ok(k) = std::fs::read_to_string(&path)
        && k.trim().len() >= 16
    {
        return Ok(k.trim().as_bytes().to_vec());
    }
    let key = auth::generate().context("generating the CDN signing key")?;
    if !config.in_memory {
        std::fs::create_dir_all(&config.data_dir)?;
        write_secret(&path, &key)?;
    }
    Ok(key.into_bytes())
}

/// Writes a file only its owner can read, without ever leaving it readable by others.
fn write_secret(path: &Path, secret: &str) -> Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path).with_context(|| format!("writing {}", path.display()))?;
    f.write_all(secret.as_bytes())
        .and_then(|()| f.write_all(b"\n"))
        .with_context(|| format!("writing {}", path.display()))
}

/// Manifests in a folder (not recursive), sorted by file name.
fn read_manifests(dir: &Path) -> Result<Vec<(PathBuf, String)>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let len = std::fs::metadata(&p).with_context(|| format!("reading {}", p.display()))?.len();
            anyhow::ensure!(
                len <= pixflow_runtime::manifest::MAX_MANIFEST_BYTES as u64,
                "{}: {len} bytes; a manifest is at most {} bytes",
                p.display(),
                pixflow_runtime::manifest::MAX_MANIFEST_BYTES
            );
            let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            Ok((p, text))
        })
        .collect()
}

/// The HTTP API, with the CDN routes.
pub fn router(app: Arc<App>) -> Router {
    let api = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/functions", get(functions::list))
        .route("/v1/functions/{name}", get(functions::show).put(functions::deploy).delete(functions::remove))
        .route("/v1/functions/{name}/invoke", post(invoke::invoke))
        .route("/v1/invocations/{id}", get(invocations::status))
        .route("/v1/invocations/{id}/result", get(invocations::result))
        .route("/v1/invocations/{id}/redrive", post(invocations::redrive))
        .route("/v1/dead-letters", get(invocations::dead_letters))
        .route("/v1/tokens", post(functions::create_token))
        .route("/v1/buckets", get(objects::list_buckets))
        .route(
            "/v1/buckets/{bucket}",
            get(objects::show_bucket).put(objects::put_bucket).delete(objects::delete_bucket),
        )
        .route("/v1/buckets/{bucket}/objects", get(objects::list_objects))
        .route(
            "/v1/buckets/{bucket}/objects/{*key}",
            get(objects::get_object).put(objects::put_object).delete(objects::delete_object),
        )
        .route("/v1/cdn/purge", post(cdn::purge))
        .route("/v1/cdn/sign", post(cdn::sign));
    with_fallbacks(api.merge(cdn_routes())).with_state(app)
}

/// The CDN routes and health checks alone (what `--cdn-listen` serves on its own origin).
pub fn cdn_router(app: Arc<App>) -> Router {
    with_fallbacks(cdn_routes()).with_state(app)
}

fn cdn_routes() -> Router<Arc<App>> {
    Router::new()
        .route("/healthz", get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/cdn/{bucket}/{*key}", get(cdn::get))
        .route("/cdn/p/{preset}/{bucket}/{*key}", get(cdn::preset))
        .route("/cdn/t/{signature}/{ops}/{bucket}/{*key}", get(cdn::adhoc))
}

/// Unknown paths and methods answered as problems.
fn with_fallbacks(routes: Router<Arc<App>>) -> Router<Arc<App>> {
    routes
        .fallback(|| async { problem::Problem::not_found("not_found", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            problem::Problem::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method",
            )
        })
}

async fn readyz(axum::extract::State(app): axum::extract::State<Arc<App>>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let ready = app.ready.load(Ordering::Acquire);
    let loops = app.loops.health();
    let down: Vec<&str> = loops.iter().filter(|l| !l.running).map(|l| l.name).collect();
    let lost = app.health.down();
    if ready && !lost.is_empty() {
        // Requests that need it answer 503 until it is back; the node reconnects by itself.
        let named: Vec<String> = lost
            .iter()
            .map(|s| format!("{} ({}, for {} s)", s.backend.name(), s.kind, s.since.elapsed().as_secs()))
            .collect();
        problem::Problem::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "backend_unavailable",
            format!("out of reach: {}; requests that need it answer 503 until it is back", named.join(", ")),
        )
        .retry_after(health::PERIOD)
        .into_response()
    } else if ready && app.node.saturated() {
        // A load balancer should send image work elsewhere until the overdue work ends.
        problem::Problem::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "saturated",
            "every CPU is busy with work past its deadline",
        )
        .into_response()
    } else if ready && !down.is_empty() {
        // A loop failed and waits to be started again: its work (queued invocations, purges)
        // is not being done meanwhile.
        problem::Problem::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "background_failed",
            format!("background work failed and is being restarted: {}", down.join(", ")),
        )
        .into_response()
    } else if ready {
        let restarts: u64 = loops.iter().map(|l| l.restarts).sum();
        let backends: serde_json::Map<String, serde_json::Value> = app
            .health
            .statuses()
            .iter()
            .map(|s| (s.backend.name().to_owned(), serde_json::json!({"kind": s.kind, "up": s.up})))
            .collect();
        axum::Json(serde_json::json!({
            "status": "ready",
            "backends": backends,
            "background": {"loops": loops.len(), "restarts": restarts},
        }))
        .into_response()
    } else {
        problem::Problem::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the node is starting or stopping",
        )
        .into_response()
    }
}

async fn metrics(axum::extract::State(app): axum::extract::State<Arc<App>>) -> axum::response::Response {
    use axum::response::IntoResponse;
    // A queue out of reach would hold the scrape until its timeout; its gauges keep their last values.
    if app.health.is_up(health::Backend::Queue)
        && let Ok(stats) = app.queue.stats(dispatch::QUEUE).await
    {
        metrics::gauge!("pixflow_async_queue_depth").set(stats.depth as f64);
        metrics::gauge!("pixflow_async_queue_leased").set(stats.leased as f64);
        metrics::gauge!("pixflow_async_queue_oldest_age_seconds").set(stats.oldest_age.as_secs_f64());
    }
    metrics::gauge!("pixflow_node_requests").set(app.node.requests() as f64);
    metrics::gauge!("pixflow_engine_overdue").set(app.node.overdue() as f64);
    let cache = app.cdn.cache.stats();
    metrics::gauge!("pixflow_edge_cache_entries").set(cache.entries as f64);
    metrics::gauge!("pixflow_edge_cache_bytes", "tier" => "memory").set(cache.memory_bytes as f64);
    metrics::gauge!("pixflow_edge_cache_bytes", "tier" => "disk").set(cache.disk_bytes as f64);
    metrics::counter!("pixflow_cdn_transformations_total").absolute(app.cdn.transformations());
    metrics::counter!("pixflow_cdn_coalesced_total").absolute(app.cdn.coalesced());
    app.metrics.run_upkeep();
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}

#[cfg(feature = "s3")]
async fn open_s3(s3: &pixflow_backends::S3Config, catalogue: &Catalogue, spool: &Path) -> anyhow::Result<Objects> {
    Objects::open_s3(s3, catalogue.clone(), spool).await.context("connecting to the S3 service")
}

#[cfg(not(feature = "s3"))]
async fn open_s3(_: &pixflow_backends::S3Config, _: &Catalogue, _: &Path) -> anyhow::Result<Objects> {
    anyhow::bail!("this pixflow was built without the `s3` feature: only the embedded object store is available")
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting, lets in-flight
/// requests finish (up to the grace period) and shuts the app down.
pub async fn serve(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let stop = tokio_util::sync::CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    let accepting = tokio::spawn(conn::serve(
        listener,
        conn::router_handler(router(app.clone())),
        app.config.client_deadlines,
        tracker.clone(),
        stop.clone(),
    ));
    shutdown.await;
    app.begin_shutdown();
    stop.cancel();
    accepting.await.context("the accept loop")?;
    tracker.close();
    if tokio::time::timeout(app.config.shutdown_grace, tracker.wait()).await.is_err() {
        tracing::warn!("connections still open at the shutdown deadline were closed");
    }
    app.shutdown().await;
    Ok(())
}

/// Serves only the CDN routes (`/cdn/...`, health) on their own listener, an origin of their
/// own for stored content, until the node stops; the node's shutdown waits for its connections.
pub async fn serve_cdn(app: Arc<App>, listener: tokio::net::TcpListener) {
    let handler = conn::router_handler(cdn_router(app.clone()).layer(axum::Extension(cdn::OwnOrigin)));
    let (deadlines, tracker) = (app.config.client_deadlines, app.connections.clone());
    conn::serve(listener, handler, deadlines, tracker, app.stop_token()).await;
}
