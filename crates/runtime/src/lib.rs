//! The function runtime: manifests become validated deployments; deployed functions get
//! instances, admission (bounded queues, node limits) and a KPA-style autoscaler, and run
//! requests on a bounded CPU pool; process functions run as child processes it speaks HTTP to
//! on loopback. No API wire types: the server crate drives it.

pub mod autoscaler;
pub mod function;
pub mod manifest;
pub mod output;
pub mod pool;
pub mod process;
pub mod registry;
pub mod secrets;

pub use function::{
    EngineJob, EngineRun, Function, Invocation, InvokeError, Node, NodeLimits, Output, Produced, Reply, invoke,
    run_engine,
};
pub use manifest::{
    AuthMode, CdnPreset, Deployment, Diagnostic, Invalid, Manifest, Quota, Retry, Runnable, Scaling, parse,
};
pub use output::{KeyTemplate, KeyVars, OutputSpec, OutputTarget};
pub use pool::{Pool, PoolStats, Rejected};
pub use process::MemoryLimiter;
pub use registry::{DeployError, Deployed, Registry, RegistryOptions};
pub use secrets::Secrets;
