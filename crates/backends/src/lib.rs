//! Data I/O adapters. Today: the node's state ([`State`], opened on SQLite or PostgreSQL) as one
//! handle per concern, the [`Catalogue`], the [`InvocationLog`] and the durable [`Queue`] (in
//! the state's database, or NATS JetStream); object storage ([`objects::Objects`]: the embedded
//! store, a SQLite catalogue over write-once blob files, or any S3-compatible service with the
//! `s3` feature) and its change feed ([`feed::Feed`]); and the CDN's edge cache
//! ([`edge_cache::EdgeCache`]: memory over disk, LRU). What they write is readable by the
//! node's user only ([`files`]: folders `0700`, files `0600`). PostgreSQL and NATS JetStream are
//! behind the cargo features `postgres` and `nats`; the local defaults need no external service.

#[cfg(feature = "postgres")]
mod batch;
pub mod catalogue;
pub mod edge_cache;
pub mod feed;
pub mod files;
pub mod invocation_log;
pub mod objects;
#[cfg(feature = "postgres")]
mod pg;
pub mod queue;
mod sqlite_writer;
pub mod state;

pub use catalogue::{Catalogue, Change as CatalogueChange};
pub use edge_cache::{EdgeCache, Entry as CachedEntry};
pub use feed::{Actor, ActorKind, ChangeKind, ChangeRecord, Feed, FeedError, Retention};
pub use invocation_log::{InvocationLog, InvocationRow, NewInvocation, Status};
pub use objects::{
    Bucket, BucketConfig, Condition, Listed, Listing, ObjectError, ObjectMeta, Objects, Reader, Resume, S3Config,
    Upload,
};
pub use queue::{Delivery, Lease, Queue, QueueError, QueueStats};
pub use state::{State, StateError};
