//! The function runtime: manifests become validated deployments; (next) instances, admission,
//! autoscaling and invocation. Knows nothing of HTTP; the server crate drives it.

pub mod manifest;

pub use manifest::{Deployment, Diagnostic, Invalid, Manifest, Quota, Runnable, Scaling, parse};
