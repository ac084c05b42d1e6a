//! Data I/O adapters. Today: the node's state and embedded durable invocation queue in one
//! SQLite file ([`state::Store`]), and the embedded object store ([`objects::Objects`]: a
//! SQLite catalogue over write-once blob files), and the CDN's edge cache
//! ([`edge_cache::EdgeCache`]: memory over disk, LRU). The S3, NATS JetStream and PostgreSQL
//! adapters join here, each behind a cargo feature; the local defaults need no external service.

pub mod edge_cache;
pub mod objects;
pub mod state;

pub use edge_cache::{EdgeCache, Entry as CachedEntry};
pub use objects::{Bucket, BucketConfig, Change, Condition, Listing, ObjectError, ObjectMeta, Objects, Resume, Upload};
pub use state::{Claimed, InvocationRow, NewInvocation, Status, Store, StoreError};
