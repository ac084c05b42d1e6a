//! `pixflow serve`: one node on embedded defaults (state and queue in a SQLite file, objects in
//! the embedded store, both in the data folder) or one of many sharing PostgreSQL (`--state
//! postgres`) and an S3 service (`--objects-backend s3`), functions from a folder and the API,
//! until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// YAML (or JSON) file of settings keyed by these flags' long names; flags and environment
    /// variables override it. Check one with `pixflow config check FILE`.
    #[arg(long, env = "PIXFLOW_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "PIXFLOW_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Folder for the node's state (SQLite), its generated admin token and, by default, the
    /// embedded object store and the edge cache.
    #[arg(long, env = "PIXFLOW_DATA_DIR", default_value = "pixflow-data")]
    data_dir: PathBuf,
    /// Where the node's state lives (functions deployed through the API, tokens, bucket
    /// settings, asynchronous invocations and their queue): `sqlite` (a file in the data
    /// folder, one node) or `postgres` (one database every node shares; needs --state-url).
    #[arg(long, env = "PIXFLOW_STATE", default_value = "sqlite", value_parser = ["sqlite", "postgres"])]
    state: String,
    /// The PostgreSQL database of `--state postgres`:
    /// postgres://user:password@host:5432/database (plain TCP: keep the database on a private
    /// network).
    #[arg(long, env = "PIXFLOW_STATE_URL", hide_env_values = true, value_name = "URL")]
    state_url: Option<String>,
    /// Where the queues live (asynchronous invocations): `embedded` (in the state's database) or
    /// `nats` (NATS JetStream, shared by every node that connects there; needs --queue-url).
    #[arg(long, env = "PIXFLOW_QUEUE", default_value = "embedded", value_parser = ["embedded", "nats"])]
    queue: String,
    /// The NATS server of `--queue nats`: nats://host:4222 (JetStream enabled).
    #[arg(long, env = "PIXFLOW_QUEUE_URL", hide_env_values = true, value_name = "URL")]
    queue_url: Option<String>,
    /// Keeps this deployment's JetStream streams, subjects and lease bucket apart from other
    /// deployments' on the same NATS server (`PIXFLOW-NAME_Q_...` instead of `PIXFLOW_Q_...`):
    /// 1 to 32 characters a-z, 0-9 and `-`, the same on every node sharing the state.
    #[arg(long, env = "PIXFLOW_QUEUE_NAMESPACE", value_name = "NAME")]
    queue_namespace: Option<String>,
    /// This node's name among the nodes sharing a state: its queue leases are recorded under it,
    /// so its next start takes back at once what it held. Keep it stable across restarts and
    /// different on every node (default: the host name).
    #[arg(long, env = "PIXFLOW_NODE_NAME")]
    node_name: Option<String>,
    /// Folder of function manifests deployed at start (GitOps style).
    #[arg(long, env = "PIXFLOW_FUNCTIONS")]
    functions: Option<PathBuf>,
    /// Image work running at once (default: one per CPU).
    #[arg(long)]
    cpus: Option<usize>,
    /// Asynchronous invocations claimed at once (default: 4 per CPU, at least 16). They wait for
    /// a function's capacity behind synchronous callers, so more workers than CPUs overlap
    /// their state writes without crowding out requests.
    #[arg(long)]
    async_workers: Option<usize>,
    /// Requests admitted at once over all functions, running or queued; beyond it, 503.
    #[arg(long, default_value_t = 1024)]
    max_requests: u64,
    /// Request bytes admitted requests may hold in memory, e.g. 1Gi; beyond it, 503.
    #[arg(long, default_value = "1Gi", value_parser = parse_bytes)]
    max_held_bytes: u64,
    /// Longest a shutdown waits for in-flight work, e.g. 30s.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    shutdown_grace: Duration,
    /// `host:port` an asynchronous invocation's `X-Callback-Url` may point at (repeatable).
    #[arg(long = "callback-allow", env = "PIXFLOW_CALLBACK_ALLOW", value_delimiter = ',')]
    callback_allow: Vec<String>,
    /// Changes the object store's change feed keeps for readers that fall behind (the CDN's
    /// purges); a reader further behind is told so and starts again from the oldest kept.
    #[arg(long, default_value_t = pixflow_backends::feed::DEFAULT_MAX_RECORDS)]
    feed_keep_changes: u64,
    /// Longest the change feed keeps a change, e.g. 24h (at most 168h).
    #[arg(long, default_value = "168h", value_parser = parse_duration)]
    feed_keep_for: Duration,
    /// Folder of the embedded object store (default: `objects/` in the data folder).
    #[arg(long, env = "PIXFLOW_OBJECTS_DIR")]
    objects_dir: Option<PathBuf>,
    /// Object uploads (API PUTs, S3 objects and parts) under way at once; beyond it, 503.
    #[arg(long, default_value_t = pixflow_server::DEFAULT_MAX_UPLOADS)]
    max_uploads: usize,
    /// The bucket the node keeps large queued payloads and results in (reserved: clients cannot
    /// name it). Created in the embedded store; with `--objects-backend s3`, create it in the
    /// service first. The same on every node sharing the state.
    #[arg(long, env = "PIXFLOW_SPOOL_BUCKET", default_value = pixflow_server::DEFAULT_SPOOL_BUCKET)]
    spool_bucket: String,
    /// Largest object one PUT may store, e.g. 5Gi.
    #[arg(long, default_value = "5Gi", value_parser = parse_bytes)]
    max_object_bytes: u64,
    /// Base of the CDN URLs handed out for stored objects (default: http://LISTEN).
    #[arg(long, env = "PIXFLOW_PUBLIC_URL")]
    public_url: Option<String>,
    /// `Cache-Control` of CDN answers for buckets that set none.
    #[arg(long, default_value = "public, max-age=3600")]
    cdn_cache_control: String,
    /// Key of ad-hoc CDN URL signatures, at least 16 characters (default: generated at first
    /// start and kept in the data folder; nodes behind one CDN must share one).
    #[arg(long, env = "PIXFLOW_CDN_SIGNING_KEY", hide_env_values = true)]
    cdn_signing_key: Option<String>,
    /// Accept `_` instead of a signature in ad-hoc CDN URLs (`/cdn/t/_/...`).
    #[arg(long)]
    cdn_allow_unsigned: bool,
    /// Formats `format=auto` may pick, in order of preference, when `Accept` allows them.
    #[arg(long, default_value = "avif,webp", value_delimiter = ',', value_parser = parse_format)]
    cdn_auto_formats: Vec<pixflow_imageops::OutFormat>,
    /// Memory the edge cache may hold, e.g. 256Mi.
    #[arg(long, default_value = "256Mi", value_parser = parse_bytes)]
    cdn_cache_memory: u64,
    /// Disk the edge cache may fill, e.g. 10Gi.
    #[arg(long, default_value = "10Gi", value_parser = parse_bytes)]
    cdn_cache_disk: u64,
    /// Folder of the edge cache (default: `cdn-cache/` in the data folder).
    #[arg(long)]
    cdn_cache_dir: Option<PathBuf>,
    /// Origins URL sources (`{"url": ...}` inputs) may be fetched from: `host`, `host:port`,
    /// `*.example.com` (repeatable). None by default: URL sources are off.
    #[arg(long = "url-allow", env = "PIXFLOW_URL_ALLOW", value_delimiter = ',')]
    url_allow: Vec<String>,
    /// Non-public address ranges URL sources may still reach, e.g. 10.1.0.0/16 (repeatable).
    #[arg(long = "url-allow-private", value_delimiter = ',')]
    url_allow_private: Vec<pixflow_server::fetch::Cidr>,
    /// Where objects live: `embedded` (local disk) or `s3` (any S3-compatible service; its
    /// buckets are registered with `PUT /v1/buckets/{name}`, settings kept in the state store).
    #[arg(long, env = "PIXFLOW_OBJECTS_BACKEND", default_value = "embedded", value_parser = ["embedded", "s3"])]
    objects_backend: String,
    /// The S3 service's URL, e.g. http://127.0.0.1:9000 (default: AWS, from the region).
    #[arg(long, env = "PIXFLOW_OBJECTS_S3_ENDPOINT")]
    objects_s3_endpoint: Option<String>,
    /// The S3 service's region (default: `AWS_REGION`, else us-east-1).
    #[arg(long, env = "PIXFLOW_OBJECTS_S3_REGION")]
    objects_s3_region: Option<String>,
    /// Access key for the S3 service (default: `AWS_ACCESS_KEY_ID` and the rest of the AWS
    /// environment).
    #[arg(long, env = "PIXFLOW_OBJECTS_S3_ACCESS_KEY", requires = "objects_s3_secret_key")]
    objects_s3_access_key: Option<String>,
    /// Secret key for the S3 service.
    #[arg(long, env = "PIXFLOW_OBJECTS_S3_SECRET_KEY", hide_env_values = true, requires = "objects_s3_access_key")]
    objects_s3_secret_key: Option<String>,
    /// Address buckets as `{bucket}.{endpoint host}` (AWS's default) instead of `{endpoint}/{bucket}`.
    #[arg(long)]
    objects_s3_virtual_hosted: bool,
    /// More CA certificates (a PEM file) that `https` URL sources may chain to, besides
    /// Mozilla's roots.
    #[arg(long, env = "PIXFLOW_URL_CA")]
    url_ca: Option<PathBuf>,
    /// Also serve the object store as an S3-compatible endpoint on this address (path-style,
    /// SigV4 with the key pair below).
    #[arg(long, env = "PIXFLOW_S3_LISTEN", requires_all = ["s3_access_key", "s3_secret_key"])]
    s3_listen: Option<SocketAddr>,
    /// Access key S3 clients sign with.
    #[arg(long, env = "PIXFLOW_S3_ACCESS_KEY")]
    s3_access_key: Option<String>,
    /// Secret key S3 clients sign with (at least 16 characters).
    #[arg(long, env = "PIXFLOW_S3_SECRET_KEY", hide_env_values = true)]
    s3_secret_key: Option<String>,
    /// Serve the CDN routes (`/cdn/...`) also on this address: an origin of their own for
    /// stored content, apart from the API's (point --public-url at it).
    #[arg(long, env = "PIXFLOW_CDN_LISTEN")]
    cdn_listen: Option<SocketAddr>,
    /// Public bucket whose HTML, SVG, XML and JavaScript objects `/cdn` serves inline instead of
    /// as downloads (repeatable); only with the CDN on its own origin.
    #[arg(long = "cdn-inline-active", value_delimiter = ',')]
    cdn_inline_active: Vec<String>,
    /// Longest a client may take to send a request's head; also how long an idle kept-alive
    /// connection stays open.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    header_read_timeout: Duration,
    /// Longest a request body may pause before the request is answered 408.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    body_idle_timeout: Duration,
    /// Bytes per second a request body must average once it has been arriving for the idle
    /// timeout, e.g. 1Ki.
    #[arg(long, default_value = "1Ki", value_parser = parse_bytes)]
    body_min_rate: u64,
    /// Folder of secrets that process functions reference by name (`process.secrets`): one
    /// file per secret, named after it, as Kubernetes and Docker mount them. Secrets are also
    /// read from the node's environment as `PIXFLOW_SECRET_<NAME>`.
    #[arg(long, env = "PIXFLOW_SECRETS_DIR")]
    secrets_dir: Option<PathBuf>,
    /// Accept this admin token (instead of generating one on first start).
    #[arg(long, env = "PIXFLOW_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    pixflow_runtime::manifest::parse_bytes(s).ok_or_else(|| format!("`{s}` is not a size like 512Mi or 1Gi"))
}

fn parse_format(s: &str) -> Result<pixflow_imageops::OutFormat, String> {
    match pixflow_imageops::OutFormat::from_name(s.trim()) {
        Some(f @ (pixflow_imageops::OutFormat::Avif | pixflow_imageops::OutFormat::Webp)) => Ok(f),
        _ => Err(format!("`{s}`: auto may pick avif or webp")),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    pixflow_runtime::manifest::parse_duration(s).ok_or_else(|| format!("`{s}` is not a duration like 30s"))
}

/// A setting that contradicts another, by the flag it names.
pub struct Contradiction {
    pub field: &'static str,
    pub message: String,
}

impl ServeArgs {
    /// The `--config` file, if any.
    pub fn config_file(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    /// Every contradiction between settings that each parsed well; no I/O (reading files
    /// such as `--url-ca` happens when the node starts).
    pub fn validate(&self) -> Vec<Contradiction> {
        let mut found = Vec::new();
        let mut refuse = |field, message: &str| found.push(Contradiction { field, message: message.to_owned() });
        let s3_options = self.objects_s3_endpoint.is_some()
            || self.objects_s3_region.is_some()
            || self.objects_s3_access_key.is_some()
            || self.objects_s3_virtual_hosted;
        if self.objects_backend != "s3" && s3_options {
            refuse(
                "objects-backend",
                "--objects-s3-* options need --objects-backend s3 (objects are in the embedded store otherwise)",
            );
        }
        if self.objects_backend == "s3" && self.s3_listen.is_some() {
            refuse(
                "s3-listen",
                "--s3-listen serves the embedded store; with --objects-backend s3, S3 clients use the service itself",
            );
        }
        if self.s3_secret_key.as_ref().is_some_and(|secret| secret.len() < 16) {
            refuse("s3-secret-key", "--s3-secret-key: use at least 16 characters");
        }
        if self.state == "postgres" && self.state_url.is_none() {
            refuse("state", "--state postgres needs --state-url (postgres://user:password@host:5432/database)");
        }
        if self.state != "postgres" && self.state_url.is_some() {
            refuse(
                "state-url",
                "--state-url names a PostgreSQL database: it needs --state postgres \
                 (the SQLite state is a file in the data folder)",
            );
        }
        if self.queue == "nats" && self.queue_url.is_none() {
            refuse("queue", "--queue nats needs --queue-url (nats://host:4222)");
        }
        if self.queue != "nats" && self.queue_url.is_some() {
            refuse("queue-url", "--queue-url names a NATS server: it needs --queue nats");
        }
        if let Some(namespace) = &self.queue_namespace {
            if self.queue != "nats" {
                refuse(
                    "queue-namespace",
                    "--queue-namespace names streams on a NATS server: it needs --queue nats \
                     (the embedded queue is apart already, in the state's database)",
                );
            } else if let Err(e) = pixflow_server::check_queue_namespace(namespace) {
                refuse("queue-namespace", &format!("--queue-namespace: {e}"));
            }
        }
        if let Err(e) = pixflow_backends::objects::check_bucket(&self.spool_bucket) {
            refuse("spool-bucket", &format!("--spool-bucket: {e}"));
        }
        if let Some(name) = &self.node_name
            && (name.is_empty() || name.len() > 200 || !name.bytes().all(|b| b.is_ascii_graphic()))
        {
            refuse("node-name", "--node-name: use 1 to 200 visible ASCII characters (no spaces)");
        }
        if !self.cdn_inline_active.is_empty() && self.cdn_listen.is_none() {
            refuse(
                "cdn-inline-active",
                "--cdn-inline-active needs --cdn-listen: active content is served inline only on the CDN's own origin",
            );
        }
        found
    }
}

pub fn run(args: ServeArgs) -> Result<()> {
    let contradictions = args.validate();
    if !contradictions.is_empty() {
        anyhow::bail!("{}", contradictions.into_iter().map(|c| c.message).collect::<Vec<_>>().join("; "));
    }
    // s3s reports every refused client request (bad signatures, missing keys) at ERROR; the
    // endpoint logs its own failures, so s3s stays quiet unless RUST_LOG asks for it.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,s3s=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> Result<()> {
    let mut config = pixflow_server::Config::new(&args.data_dir);
    config.functions_dir = args.functions;
    if let Some(url) = args.state_url.clone().filter(|_| args.state == "postgres") {
        config.state = pixflow_server::StateBackend::Postgres { url };
    }
    if let Some(url) = args.queue_url.clone().filter(|_| args.queue == "nats") {
        config.queue = pixflow_server::QueueBackend::Nats { url, namespace: args.queue_namespace.clone() };
    }
    if let Some(name) = args.node_name {
        config.node_name = name;
    }
    if let Some(n) = args.cpus {
        config.node.cpus = n.max(1);
        config.async_workers = pixflow_server::default_async_workers(n.max(1));
    }
    if let Some(n) = args.async_workers {
        config.async_workers = n;
    }
    config.callback_allow = args.callback_allow;
    config.node.max_requests = args.max_requests;
    config.node.max_held_bytes = args.max_held_bytes;
    config.shutdown_grace = args.shutdown_grace;
    config.feed_retention =
        pixflow_backends::Retention { max_records: args.feed_keep_changes, max_age: args.feed_keep_for };
    config.admin_token = args.admin_token;
    config.objects_dir = args.objects_dir;
    config.secrets_dir = args.secrets_dir;
    if args.objects_backend == "s3" {
        config.objects_s3 = Some(pixflow_server::S3Config {
            endpoint: args.objects_s3_endpoint,
            region: args.objects_s3_region,
            access_key: args.objects_s3_access_key,
            secret_key: args.objects_s3_secret_key,
            virtual_hosted: args.objects_s3_virtual_hosted,
        });
    }
    config.max_object_bytes = args.max_object_bytes;
    config.max_uploads = args.max_uploads;
    config.spool_bucket = args.spool_bucket;
    config.cdn_cache_control = args.cdn_cache_control;
    config.url_policy = pixflow_server::fetch::UrlPolicy {
        hosts: args.url_allow.iter().map(|h| h.trim().to_ascii_lowercase()).collect(),
        private: args.url_allow_private,
        tls: match &args.url_ca {
            None => pixflow_server::fetch::Tls::default(),
            Some(path) => {
                let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                pixflow_server::fetch::Tls::with_roots(&pem)
                    .map_err(|e| anyhow::anyhow!("--url-ca {}: {e}", path.display()))?
            }
        },
    };
    config.cdn_signing_key = args.cdn_signing_key;
    config.cdn_allow_unsigned = args.cdn_allow_unsigned;
    config.cdn_inline_active = args.cdn_inline_active;
    config.client_deadlines.header_read = args.header_read_timeout;
    config.client_deadlines.body_idle = args.body_idle_timeout;
    config.client_deadlines.body_min_rate = args.body_min_rate;
    config.cdn_auto_formats = args.cdn_auto_formats;
    config.cdn_cache_memory = args.cdn_cache_memory;
    config.cdn_cache_disk = args.cdn_cache_disk;
    config.cdn_cache_dir = args.cdn_cache_dir;
    config.s3_access_key = args.s3_access_key;
    config.s3_secret_key = args.s3_secret_key;
    config.public_url = args.public_url.unwrap_or_else(|| format!("http://{}", args.listen));
    let foreign: Arc<dyn pixflow_imageops::ForeignDecoder + Send + Sync> = Arc::new(crate::ffmpeg::Ffmpeg::new());
    let started = pixflow_server::App::start(config, Some(foreign)).await.map_err(name_the_state_setting)?;
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let shutdown = shutdown_signal();
    if let Some(token) = &started.new_admin_token {
        eprintln!("admin token (shown once; also in {}): {token}", args.data_dir.join("admin-token").display());
    }
    let state = match args.state.as_str() {
        "postgres" => format!("state in PostgreSQL, as node {}", started.app.config.node_name),
        _ => format!("state in {}", args.data_dir.display()),
    };
    let state = match &started.app.config.queue {
        pixflow_server::QueueBackend::Nats { namespace: None, .. } => format!("{state}; queue in NATS JetStream"),
        pixflow_server::QueueBackend::Nats { namespace: Some(ns), .. } => {
            format!("{state}; queue in NATS JetStream, namespace {ns}")
        }
        pixflow_server::QueueBackend::Embedded => state,
    };
    eprintln!("pixflow serving on http://{addr} ({} functions; {state})", started.app.registry.list().len());
    let s3 = match args.s3_listen {
        Some(at) => {
            let l = tokio::net::TcpListener::bind(at).await.with_context(|| format!("listening on {at}"))?;
            eprintln!("S3-compatible endpoint on http://{}", l.local_addr()?);
            Some(tokio::spawn(pixflow_server::s3::serve(started.app.clone(), l)))
        }
        None => None,
    };
    let cdn = match args.cdn_listen {
        Some(at) => {
            let l = tokio::net::TcpListener::bind(at).await.with_context(|| format!("listening on {at}"))?;
            eprintln!("CDN origin on http://{}", l.local_addr()?);
            Some(tokio::spawn(pixflow_server::serve_cdn(started.app.clone(), l)))
        }
        None => None,
    };
    pixflow_server::serve(started.app, listener, shutdown).await?;
    if let Some(cdn) = cdn {
        cdn.await.context("the CDN listener")?;
    }
    if let Some(s3) = s3 {
        s3.await.context("the S3 endpoint")??;
    }
    Ok(())
}

/// A state store that cannot be opened for its address, as one line naming the setting:
/// `--state-url: cannot connect to PostgreSQL at 127.0.0.1:5999: connection refused` (the
/// messages never hold the URL's password).
fn name_the_state_setting(e: anyhow::Error) -> anyhow::Error {
    use pixflow_server::StateError;
    match e.downcast_ref::<StateError>() {
        Some(state @ (StateError::Connect { .. } | StateError::InvalidUrl(_))) => {
            anyhow::anyhow!("--state-url: {state}")
        }
        Some(state @ StateError::Unsupported(_)) => anyhow::anyhow!("--state: {state}"),
        _ => match e.downcast_ref::<pixflow_server::QueueError>() {
            Some(queue) => anyhow::anyhow!("--queue-url: cannot use the NATS server: {queue}"),
            None => e,
        },
    }
}

/// Resolves at SIGINT or SIGTERM. The handlers are installed when this is called, not when the
/// future is first polled, so a signal right after the "serving" line still drains the node
/// instead of killing it.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let signals = {
        use tokio::signal::unix::{SignalKind, signal};
        signal(SignalKind::interrupt()).and_then(|int| Ok((int, signal(SignalKind::terminate())?)))
    };
    async move {
        #[cfg(unix)]
        match signals {
            Ok((mut int, mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot watch SIGTERM; stop with Ctrl-C");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("stopping: finishing in-flight work");
    }
}
