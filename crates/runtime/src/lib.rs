//! The function runtime: manifests become validated deployments; deployed functions get
//! instances, admission (bounded queues, node limits) and a KPA-style autoscaler, and run
//! requests on a bounded CPU pool. Knows nothing of HTTP; the server crate drives it.

pub mod autoscaler;
pub mod function;
pub mod manifest;
pub mod pool;
pub mod registry;

pub use function::{Function, Invocation, InvokeError, Node, NodeLimits, Output, invoke};
pub use manifest::{AuthMode, Deployment, Diagnostic, Invalid, Manifest, Quota, Retry, Runnable, Scaling, parse};
pub use pool::{Pool, PoolStats, Rejected};
pub use registry::{DeployError, Deployed, Registry, RegistryOptions};
