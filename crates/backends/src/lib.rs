//! Data I/O adapters. Today: the node's state and embedded durable invocation queue in one
//! SQLite file ([`state::Store`]). Object storage, NATS JetStream and PostgreSQL adapters join
//! here, each behind a cargo feature, with the local default needing no external service.

pub mod state;

pub use state::{Claimed, InvocationRow, NewInvocation, Status, Store, StoreError};
