//! The functions deployed on this node, by name, and each one's autoscaler loop.
//!
//! Deploying a new version swaps the name to a new [`Function`] with its own pool; the old
//! version is retired: it takes no new requests, but the requests it holds (running or queued)
//! keep their instances until they finish, so a rollover drops nothing. The new version starts
//! with at least as many ready instances as the old one had, so traffic does not stall on cold
//! starts.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::autoscaler::Kpa;
use crate::function::Function;
use crate::manifest::Deployment;
use crate::process::MemoryLimiter;

/// What a deploy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deployed {
    Created,
    /// A new version replaced `previous`.
    Updated {
        previous: String,
    },
    /// The same version with the same content was already deployed.
    Unchanged,
}

/// A deploy that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeployError {
    #[error("version {version} of `{name}` is already deployed with different content; give the change a new version")]
    VersionConflict { name: String, version: String },
    /// A process function names a secret the node's store cannot give.
    #[error("process.secrets.{var}: {source}")]
    Secret { var: String, source: crate::secrets::SecretError },
}

/// Registry settings.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// How often each autoscaler samples its function (Knative: 2 s).
    pub tick: Duration,
    /// Where process functions' secrets come from.
    pub secrets: Arc<crate::secrets::Secrets>,
    /// Marks this node's children (`PIXFLOW_NODE` in their environment), so a restarted node
    /// finds and stops the ones an abrupt end left behind.
    pub node_tag: Option<String>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions { tick: Duration::from_secs(2), secrets: Arc::default(), node_tag: None }
    }
}

/// Deployed functions by name.
pub struct Registry {
    functions: RwLock<BTreeMap<String, Arc<Function>>>,
    options: RegistryOptions,
    limiter: MemoryLimiter,
}

impl Registry {
    pub fn new(options: RegistryOptions) -> Arc<Registry> {
        Arc::new(Registry { functions: RwLock::new(BTreeMap::new()), options, limiter: MemoryLimiter::detect() })
    }

    /// How process functions' memory is limited on this node.
    pub fn memory_limiter(&self) -> &MemoryLimiter {
        &self.limiter
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Function>>> {
        // Writers only insert or remove whole entries, so a poisoned map is still consistent.
        self.functions.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Function>>> {
        self.functions.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Deploys `deployment` (from `manifest`, whose folder is `workdir`: a process function's
    /// programs run there); must be called inside a tokio runtime, which runs the function's
    /// autoscaler.
    pub fn deploy(
        &self,
        deployment: Deployment,
        manifest: String,
        workdir: &std::path::Path,
    ) -> Result<Deployed, DeployError> {
        if let crate::manifest::Runnable::Process(p) = &deployment.runnable {
            for (var, name) in &p.secrets {
                self.options.secrets.get(name).map_err(|source| DeployError::Secret { var: var.clone(), source })?;
            }
        }
        let mut map = self.write();
        let previous = map.get(&deployment.name).cloned();
        if let Some(old) = &previous
            && old.deployment.version == deployment.version
        {
            return if old.deployment == deployment {
                Ok(Deployed::Unchanged)
            } else {
                Err(DeployError::VersionConflict { name: deployment.name, version: deployment.version })
            };
        }
        // A new version starts with at least as many instances as the old one has.
        let s = &deployment.scaling;
        let initial = s.initial.max(previous.as_ref().map_or(0, |old| old.pool.stats().ready.min(s.max)));
        let context = crate::process::Context {
            limiter: self.limiter.clone(),
            secrets: self.options.secrets.clone(),
            node_tag: self.options.node_tag.clone(),
        };
        let f = Function::new(deployment, manifest, workdir, &context, initial);
        tokio::spawn(scale(f.clone(), self.options.tick));
        map.insert(f.name().to_owned(), f.clone());
        drop(map);
        Ok(match previous {
            Some(old) => {
                old.retire();
                Deployed::Updated { previous: old.deployment.version.clone() }
            }
            None => Deployed::Created,
        })
    }

    /// Removes a function; its in-flight requests finish. Returns whether it existed.
    pub fn remove(&self, name: &str) -> bool {
        let removed = self.write().remove(name);
        if let Some(f) = &removed {
            f.retire();
        }
        removed.is_some()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Function>> {
        self.read().get(name).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Function>> {
        self.read().values().cloned().collect()
    }

    /// Stops taking requests everywhere and waits (up to `deadline`) for running and queued
    /// ones to finish. Returns how many were still running at the deadline.
    pub async fn drain(&self, deadline: Duration) -> u32 {
        let functions = self.list();
        let end = Instant::now() + deadline;
        loop {
            let busy: u32 = functions.iter().map(|f| f.pool.stats()).map(|s| s.in_flight + s.queued).sum();
            if busy == 0 || Instant::now() >= end {
                for f in &functions {
                    f.pool.close();
                }
                return busy;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The autoscaler loop of one function version: samples its pool every tick (or at once when a
/// request waits at zero), asks the KPA, and starts or stops instances. A retired version keeps
/// its instances until its last request is done.
async fn scale(f: Arc<Function>, tick: Duration) {
    let name = f.name().to_owned();
    let mut kpa = Kpa::new(f.deployment.scaling.clone());
    let gauge_instances = metrics::gauge!("pixflow_instances", "function" => name.clone());
    let gauge_queued = metrics::gauge!("pixflow_queue_depth", "function" => name.clone());
    let gauge_in_flight = metrics::gauge!("pixflow_in_flight", "function" => name.clone());
    // Process functions start their initial instances now; built-ins have them already.
    if let Some(p) = &f.processes {
        p.scale(f.initial);
    }
    loop {
        if f.is_retired() {
            tokio::select! {
                () = tokio::time::sleep(tick.min(Duration::from_millis(100))) => {}
                () = f.pool.demand() => {}
            }
        } else {
            tokio::select! {
                () = tokio::time::sleep(tick) => {}
                () = f.pool.demand() => {}
                () = f.retired() => {}
                () = processes_changed(&f) => {}
            }
        }
        let stats = f.pool.stats();
        if f.is_retired() {
            if stats.in_flight + stats.queued == 0 {
                f.pool.close();
                f.pool.set_ready(0);
                if let Some(p) = &f.processes {
                    p.stop_all();
                }
                return;
            }
            // Keep serving what it holds; a waiter at zero still needs an instance.
            if stats.ready == 0 && stats.queued > 0 {
                start_instances(&f, 1);
            }
            continue;
        }
        let (avg, last_active) = f.pool.sample();
        let now = Instant::now();
        kpa.record(now.into_std(), avg);
        let want = kpa.desired(now.into_std(), stats.ready, last_active.into_std(), stats.queued > 0);
        if want > stats.ready {
            start_instances(&f, want);
        } else if want < stats.ready {
            match &f.processes {
                Some(p) => p.scale(want),
                None => f.pool.set_ready(want),
            }
        }
        let after = f.pool.stats();
        gauge_instances.set(f64::from(after.ready));
        gauge_queued.set(f64::from(after.queued));
        gauge_in_flight.set(f64::from(after.in_flight));
    }
}

/// Resolves when a process function's instance died or failed to start.
async fn processes_changed(f: &Function) {
    match &f.processes {
        Some(p) => p.changed.notified().await,
        None => std::future::pending().await,
    }
}

/// Brings the function to `want` ready instances. A built-in instance is a warm slot on the
/// node's CPU pool: starting one is building its pipeline, timed as its cold start. A process
/// function's instances are child processes, ready when their port opens.
fn start_instances(f: &Arc<Function>, want: u32) {
    if let Some(p) = &f.processes {
        p.scale(want);
        return;
    }
    let started = Instant::now();
    let before = f.pool.stats().ready;
    // Building the pipeline again checks the deployment still resolves in the engine.
    let _ = f.pipeline(&[]);
    f.pool.set_ready(want);
    let elapsed = started.elapsed().as_secs_f64();
    let name = f.name().to_owned();
    for _ in before..want {
        metrics::counter!("pixflow_cold_starts_total", "function" => name.clone()).increment(1);
        metrics::histogram!("pixflow_cold_start_seconds", "function" => name.clone()).record(elapsed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::function::{Invocation, Node, NodeLimits, invoke};
    use crate::pool::Rejected;

    fn manifest(version: &str, extra: &str) -> (Deployment, String) {
        let text = format!("name: thumb\nversion: '{version}'\nbuiltin: resize\nparams: {{width: 8}}\n{extra}");
        (crate::manifest::parse(&text).unwrap(), text)
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[tokio::test]
    async fn same_version_is_a_no_op_and_a_changed_one_conflicts() {
        let reg = Registry::new(RegistryOptions::default());
        let (d, t) = manifest("1", "");
        assert_eq!(reg.deploy(d.clone(), t.clone(), std::path::Path::new(".")), Ok(Deployed::Created));
        assert_eq!(reg.deploy(d, t, std::path::Path::new(".")), Ok(Deployed::Unchanged));
        let (d2, t2) = manifest("1", "quota: {concurrency: 2}\n");
        assert!(matches!(reg.deploy(d2, t2, std::path::Path::new(".")), Err(DeployError::VersionConflict { .. })));
        let (d3, t3) = manifest("2", "");
        assert_eq!(
            reg.deploy(d3.clone(), t3.clone(), std::path::Path::new(".")),
            Ok(Deployed::Updated { previous: "1".into() })
        );
        assert_eq!(reg.get("thumb").unwrap().deployment.version, "2");
        // Redeploying what runs after a rollover is still a no-op.
        assert_eq!(reg.deploy(d3, t3, std::path::Path::new(".")), Ok(Deployed::Unchanged));
    }

    #[tokio::test]
    async fn a_rollover_finishes_requests_held_by_the_old_version() {
        let reg = Registry::new(RegistryOptions::default());
        let node = Node::new(NodeLimits::default());
        let (d, t) = manifest("1", "quota: {concurrency: 1}\nscaling: {min: 1, max: 1}\n");
        reg.deploy(d, t, std::path::Path::new(".")).unwrap();
        let old = reg.get("thumb").unwrap();
        // Occupy the old version's only slot, queue a request behind it, then roll over.
        let held = old.pool.acquire(Duration::from_secs(5)).await.unwrap();
        let queued = {
            let (node, old) = (node.clone(), old.clone());
            tokio::spawn(async move {
                invoke(&node, &old, Invocation { input: png(32, 16), ..Default::default() }, None, None).await
            })
        };
        while old.pool.stats().queued == 0 {
            tokio::task::yield_now().await;
        }
        let (d2, t2) = manifest("2", "quota: {concurrency: 1}\nscaling: {min: 1, max: 1}\n");
        reg.deploy(d2, t2, std::path::Path::new(".")).unwrap();
        // New requests go to version 2 while version 1 still holds one.
        let new = reg.get("thumb").unwrap();
        let out =
            invoke(&node, &new, Invocation { input: png(32, 16), ..Default::default() }, None, None).await.unwrap();
        assert_eq!((out.renditions()[0].width, out.renditions()[0].height), (8, 4));
        assert!(matches!(
            invoke(&node, &old, Invocation { input: png(4, 4), ..Default::default() }, None, None).await,
            Err(crate::function::InvokeError::Rejected(Rejected::Closed))
        ));
        drop(held);
        let out = queued.await.unwrap().unwrap();
        assert_eq!(out.renditions()[0].width, 8);
    }

    #[tokio::test(start_paused = true)]
    async fn scales_from_zero_on_demand_and_back_to_zero_when_idle() {
        let reg = Registry::new(RegistryOptions { tick: Duration::from_secs(2), ..RegistryOptions::default() });
        let node = Node::new(NodeLimits::default());
        let (d, t) = manifest(
            "1",
            "scaling: {min: 0, initial: 0, scale_to_zero_after: 10s, stable_window: 6s, scale_down_delay: 2s}\n",
        );
        reg.deploy(d, t, std::path::Path::new(".")).unwrap();
        let f = reg.get("thumb").unwrap();
        assert_eq!(f.pool.stats().ready, 0);
        // A request at zero waits for a cold start rather than failing.
        let out = invoke(&node, &f, Invocation { input: png(16, 16), ..Default::default() }, None, None).await.unwrap();
        assert_eq!(out.renditions()[0].width, 8);
        assert_eq!(f.pool.stats().ready, 1);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(f.pool.stats().ready, 0);
    }

    #[tokio::test]
    async fn overrides_are_limited_to_what_the_manifest_allows() {
        let reg = Registry::new(RegistryOptions::default());
        let node = Node::new(NodeLimits::default());
        let (d, t) = manifest("1", "overridable: [width, format]\n");
        reg.deploy(d, t, std::path::Path::new(".")).unwrap();
        let f = reg.get("thumb").unwrap();
        let req = |params: &[(&str, &str)]| Invocation {
            input: png(40, 20),
            params: params.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            ..Default::default()
        };
        let out = invoke(&node, &f, req(&[("width", "20"), ("format", "webp")]), None, None).await.unwrap();
        let r = &out.renditions()[0];
        assert_eq!((r.width, r.height, r.format), (20, 10, pixflow_imageops::OutFormat::Webp));
        let err = invoke(&node, &f, req(&[("height", "5")]), None, None).await.unwrap_err();
        assert_eq!(err.code(), "bad_parameter");
        assert!(err.to_string().contains("callers may set width, format"), "{err}");
        let err = invoke(&node, &f, req(&[("width", "-3")]), None, None).await.unwrap_err();
        assert_eq!(err.code(), "bad_parameter");
    }

    #[tokio::test]
    async fn quota_and_node_limits_refuse_before_any_work() {
        let reg = Registry::new(RegistryOptions::default());
        let (d, t) = manifest("1", "quota: {max_request_bytes: 100}\n");
        reg.deploy(d, t, std::path::Path::new(".")).unwrap();
        let f = reg.get("thumb").unwrap();
        let node = Node::new(NodeLimits::default());
        let err =
            invoke(&node, &f, Invocation { input: png(64, 64), ..Default::default() }, None, None).await.unwrap_err();
        assert_eq!(err.code(), "request_too_large");
        let (d, t) = manifest("2", "");
        reg.deploy(d, t, std::path::Path::new(".")).unwrap();
        let f = reg.get("thumb").unwrap();
        let tiny = Node::new(NodeLimits { cpus: 1, max_held_bytes: 10, max_requests: 10 });
        let err =
            invoke(&tiny, &f, Invocation { input: png(8, 8), ..Default::default() }, None, None).await.unwrap_err();
        assert_eq!(err.code(), "overloaded");
        assert_eq!(tiny.requests(), 0);
    }
}
