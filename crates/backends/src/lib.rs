//! Data I/O adapters. Today: the node's state and embedded durable invocation queue in one
//! SQLite file ([`state::Store`]); object storage ([`objects::Objects`]: the embedded store, a
//! SQLite catalogue over write-once blob files, or any S3-compatible service with the `s3`
//! feature) and its change feed ([`feed::Feed`]); and the CDN's edge cache
//! ([`edge_cache::EdgeCache`]: memory over disk, LRU). What they write is readable by the
//! node's user only ([`files`]: folders `0700`, files `0600`). The NATS JetStream and
//! PostgreSQL adapters join here, each behind a cargo feature; the local defaults need no
//! external service.

pub mod edge_cache;
pub mod feed;
pub mod files;
pub mod objects;
#[cfg(feature = "postgres")]
pub mod pg;
pub mod queue;
pub mod state;

pub use edge_cache::{EdgeCache, Entry as CachedEntry};
pub use feed::{Actor, ActorKind, ChangeKind, ChangeRecord, Feed, FeedError, Retention};
pub use objects::{
    Bucket, BucketConfig, Condition, Listed, Listing, ObjectError, ObjectMeta, Objects, Reader, Resume, S3Config,
    Upload,
};
#[cfg(feature = "postgres")]
pub use pg::Postgres;
pub use queue::{Delivery, Lease, Queue, QueueError, QueueStats};
pub use state::{InvocationRow, NewInvocation, Status, Store, StoreError};
