//! The catalogue: what the operator configured through the API and every node must see alike —
//! functions deployed through the API (their manifests), API tokens (SHA-256 hashes only) and
//! the settings of an S3 service's buckets. One handle, [`Catalogue`], over a crate-private
//! [`Backend`] trait, the way [`crate::Queue`] is one handle over its backends; [`crate::State`]
//! opens the backend (SQLite: the node's state file; PostgreSQL: shared by every node).
//!
//! The contract every backend keeps (the behaviour suite in `tests/catalogue.rs` runs against
//! each): a write is committed when it returns and seen by every handle on the same store, the
//! handle of another node included; names are compared byte for byte and listed in byte order.
//! A backend other nodes write to also announces their changes to functions
//! ([`Catalogue::changes`]: PostgreSQL by LISTEN/NOTIFY), so a node can keep its registry in
//! step without a restart; SQLite has one node, which makes every change itself.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::objects::{Bucket, BucketConfig};
use crate::state::Result;

#[cfg(feature = "postgres")]
pub(crate) mod postgres;
pub(crate) mod sqlite;

/// A change another node made to the catalogue (see [`Catalogue::changes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The function of this name was saved or deleted: read it again.
    Function(String),
    /// Announcements may have been lost (a connection dropped): read every function again.
    Missed,
}

/// What a backend does; [`Catalogue`] documents each operation.
#[async_trait]
pub(crate) trait Backend: Send + Sync {
    async fn save_function(&self, name: &str, version: &str, manifest: &str) -> Result<()>;
    async fn delete_function(&self, name: &str) -> Result<()>;
    async fn functions(&self) -> Result<Vec<(String, String)>>;
    async fn function(&self, name: &str) -> Result<Option<String>>;
    /// Announcements of other nodes' changes; `None` when no other node writes.
    fn changes(&self) -> Option<broadcast::Receiver<Change>> {
        None
    }
    async fn save_bucket(&self, name: &str, config: &BucketConfig) -> Result<bool>;
    async fn buckets(&self, name: Option<&str>) -> Result<Vec<Bucket>>;
    async fn delete_bucket(&self, name: &str) -> Result<bool>;
    async fn add_token(&self, hash: &[u8], role: &str, label: &str) -> Result<()>;
    async fn replace_labelled_token(&self, label: &str, hash: &[u8], role: &str) -> Result<()>;
    /// The role and label of the token with this hash.
    async fn token(&self, hash: &[u8]) -> Result<Option<(String, String)>>;
    async fn has_role(&self, role: &str) -> Result<bool>;
    /// One trivial round trip to the store.
    async fn ping(&self) -> Result<()>;
}

/// A handle on the catalogue; cheap to clone.
#[derive(Clone)]
pub struct Catalogue {
    backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for Catalogue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalogue").finish_non_exhaustive()
    }
}

impl Catalogue {
    pub(crate) fn new(backend: Arc<dyn Backend>) -> Catalogue {
        Catalogue { backend }
    }

    // ---- functions deployed through the API ----

    /// Records a function's manifest (replacing the one stored under its name).
    pub async fn save_function(&self, name: &str, version: &str, manifest: &str) -> Result<()> {
        self.backend.save_function(name, version, manifest).await
    }

    /// Forgets a function (nothing happens when there is none).
    pub async fn delete_function(&self, name: &str) -> Result<()> {
        self.backend.delete_function(name).await
    }

    /// `(name, manifest)` of every function deployed through the API, by name.
    pub async fn functions(&self) -> Result<Vec<(String, String)>> {
        self.backend.functions().await
    }

    /// The manifest of the function deployed through the API under `name`, if there is one.
    pub async fn function(&self, name: &str) -> Result<Option<String>> {
        self.backend.function(name).await
    }

    /// Changes to functions that other nodes make from now on, for as long as the receiver
    /// lives (not this node's own). `None`: no other node writes to this catalogue (SQLite).
    /// Subscribe before reading the functions, so that no change falls between the two.
    pub fn changes(&self) -> Option<broadcast::Receiver<Change>> {
        self.backend.changes()
    }

    // ---- settings of the buckets of an S3 service ----

    /// Saves a bucket's settings; `true` when the bucket was new.
    pub async fn save_bucket(&self, name: &str, config: &BucketConfig) -> Result<bool> {
        self.backend.save_bucket(name, config).await
    }

    /// The buckets whose name is `name` (all of them when `None`), by name.
    pub async fn buckets(&self, name: Option<&str>) -> Result<Vec<Bucket>> {
        self.backend.buckets(name).await
    }

    /// Forgets a bucket; `false` when there was none.
    pub async fn delete_bucket(&self, name: &str) -> Result<bool> {
        self.backend.delete_bucket(name).await
    }

    // ---- API tokens (SHA-256 hashes; the tokens themselves are never stored) ----

    /// Records a token's hash with its role (replacing a token of the same hash).
    pub async fn add_token(&self, hash: &[u8], role: &str, label: &str) -> Result<()> {
        self.backend.add_token(hash, role, label).await
    }

    /// Forgets every token labelled `label` and records this one under it, in one transaction:
    /// a configured admin token replaced by another, without a moment in which neither works
    /// (nodes sharing the store start one after the other with the same setting).
    pub async fn replace_labelled_token(&self, label: &str, hash: &[u8], role: &str) -> Result<()> {
        self.backend.replace_labelled_token(label, hash, role).await
    }

    /// The role of the token with this hash.
    pub async fn token_role(&self, hash: &[u8]) -> Result<Option<String>> {
        Ok(self.backend.token(hash).await?.map(|(role, _)| role))
    }

    /// The role and label of the token with this hash (who a change is recorded under).
    pub async fn token_role_and_label(&self, hash: &[u8]) -> Result<Option<(String, String)>> {
        self.backend.token(hash).await
    }

    /// Whether any token has `role`.
    pub async fn has_role(&self, role: &str) -> Result<bool> {
        self.backend.has_role(role).await
    }

    /// Answers once the store did (a trivial query): a health probe.
    /// [`crate::StateError::Unavailable`] while it is out of reach.
    pub async fn ping(&self) -> Result<()> {
        self.backend.ping().await
    }
}
