//! The catalogue in PostgreSQL, shared by every node on the same database. Upserts are single
//! statements (`ON CONFLICT ... DO UPDATE`), so nodes writing the same name at once end with
//! one of their writes, never an error; names sort byte-wise (`COLLATE "C"`), as in SQLite.
//!
//! A write to a function sends `NOTIFY pixflow_catalogue` with the writer's origin (one per
//! opened state) and the function's name, in the same statement, so it goes out with the
//! commit and only when a row changed. Each opened state listens ([`Feed`]) and hands the
//! names other origins wrote to its subscribers; a listener that lost its connection tells
//! them [`Change::Missed`] once it listens again, since what was notified meanwhile is gone.

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::broadcast;

use super::{Backend, Change};
use crate::objects::{Bucket, BucketConfig};
use crate::state::{Result, now_ms};

/// The schema, as a migration step of [`crate::pg`].
pub(crate) const MIGRATION: &str = r#"
    CREATE TABLE functions (
        name TEXT COLLATE "C" PRIMARY KEY, version TEXT NOT NULL, manifest TEXT NOT NULL,
        updated_ms BIGINT NOT NULL);
    CREATE TABLE tokens (
        hash BYTEA PRIMARY KEY, role TEXT NOT NULL, label TEXT NOT NULL, created_ms BIGINT NOT NULL);
    CREATE INDEX tokens_role ON tokens (role);
    CREATE INDEX tokens_label ON tokens (label);
    CREATE TABLE buckets (
        name TEXT COLLATE "C" PRIMARY KEY, public BOOLEAN NOT NULL, cache_control TEXT,
        created_ms BIGINT NOT NULL);
"#;

/// The channel catalogue writes notify; the payload is `<origin> <function name>`.
const CHANNEL: &str = "pixflow_catalogue";

/// Announcements of other nodes' changes, for one opened state: its origin and its listener.
pub(crate) struct Feed {
    origin: String,
    sender: broadcast::Sender<Change>,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl Feed {
    /// Starts listening before returning, so no change committed after this is missed.
    pub(crate) async fn start(db: &PgPool) -> Result<Arc<Feed>> {
        let mut bytes = [0u8; 12];
        getrandom::fill(&mut bytes).map_err(|e| crate::state::StateError::Unavailable(e.to_string()))?;
        let origin = hex::encode(bytes);
        let mut listener = PgListener::connect_with(db).await?;
        listener.listen(CHANNEL).await?;
        let (sender, _) = broadcast::channel(256);
        let listener = tokio::spawn(listen(db.clone(), listener, origin.clone(), sender.clone()));
        Ok(Arc::new(Feed { origin, sender, listener }))
    }
}

async fn listen(db: PgPool, mut listener: PgListener, origin: String, sender: broadcast::Sender<Change>) {
    loop {
        // Sends fail only when nobody subscribes, which is nothing to report.
        match listener.try_recv().await {
            Ok(Some(n)) => {
                if let Some((from, name)) = n.payload().split_once(' ')
                    && from != origin
                {
                    let _ = sender.send(Change::Function(name.to_owned()));
                }
            }
            // The connection dropped and the listener made a new one, listening again.
            Ok(None) => {
                let _ = sender.send(Change::Missed);
            }
            // The state is closing: give the connection back.
            Err(sqlx::Error::PoolClosed) => return,
            // The connection could not be made again (the server is out of reach), or failed in
            // a way the listener does not take for a lost one: a new listener once the server
            // answers, and only then the subscribers read everything again (a read before that
            // could miss a change notified to nobody).
            Err(e) => {
                tracing::warn!(error = %e, "catalogue notifications from PostgreSQL lost; listening again when it answers");
                drop(listener);
                let Some(again) = crate::pg::relisten(&db, CHANNEL).await else { return };
                listener = again;
                tracing::info!("catalogue notifications from PostgreSQL resumed");
                let _ = sender.send(Change::Missed);
            }
        }
    }
}

pub(crate) struct PgCatalogue {
    db: PgPool,
    feed: Arc<Feed>,
}

impl PgCatalogue {
    pub(crate) fn new(db: PgPool, feed: Arc<Feed>) -> PgCatalogue {
        PgCatalogue { db, feed }
    }
}

/// Inserts or replaces a token row (one statement, run alone or in a transaction).
const UPSERT_TOKEN: &str = "INSERT INTO tokens (hash, role, label, created_ms) VALUES ($1, $2, $3, $4)
     ON CONFLICT (hash) DO UPDATE SET role = EXCLUDED.role, label = EXCLUDED.label, created_ms = EXCLUDED.created_ms";

#[async_trait]
impl Backend for PgCatalogue {
    async fn save_function(&self, name: &str, version: &str, manifest: &str) -> Result<()> {
        sqlx::query(
            "WITH saved AS (
                 INSERT INTO functions (name, version, manifest, updated_ms) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name) DO UPDATE SET version = EXCLUDED.version, manifest = EXCLUDED.manifest,
                 updated_ms = EXCLUDED.updated_ms
                 RETURNING name)
             SELECT pg_notify($5, concat($6::TEXT, ' ', name)) FROM saved",
        )
        .bind(name)
        .bind(version)
        .bind(manifest)
        .bind(now_ms())
        .bind(CHANNEL)
        .bind(&self.feed.origin)
        .execute(&self.db)
        .await?;
        Ok(())
    }

    async fn delete_function(&self, name: &str) -> Result<()> {
        sqlx::query(
            "WITH gone AS (DELETE FROM functions WHERE name = $1 RETURNING name)
             SELECT pg_notify($2, concat($3::TEXT, ' ', name)) FROM gone",
        )
        .bind(name)
        .bind(CHANNEL)
        .bind(&self.feed.origin)
        .execute(&self.db)
        .await?;
        Ok(())
    }

    async fn function(&self, name: &str) -> Result<Option<String>> {
        let r =
            sqlx::query("SELECT manifest FROM functions WHERE name = $1").bind(name).fetch_optional(&self.db).await?;
        Ok(r.map(|r| r.get("manifest")))
    }

    fn changes(&self) -> Option<broadcast::Receiver<Change>> {
        Some(self.feed.sender.subscribe())
    }

    async fn functions(&self) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query("SELECT name, manifest FROM functions ORDER BY name").fetch_all(&self.db).await?;
        Ok(rows.iter().map(|r| (r.get("name"), r.get("manifest"))).collect())
    }

    async fn save_bucket(&self, name: &str, config: &BucketConfig) -> Result<bool> {
        // `xmax = 0`: the row version was made by an insert, not by the update of a conflict.
        let r = sqlx::query(
            "INSERT INTO buckets (name, public, cache_control, created_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE SET public = EXCLUDED.public, cache_control = EXCLUDED.cache_control
             RETURNING (xmax = 0) AS created",
        )
        .bind(name)
        .bind(config.public)
        .bind(&config.cache_control)
        .bind(now_ms())
        .fetch_one(&self.db)
        .await?;
        Ok(r.get("created"))
    }

    async fn buckets(&self, name: Option<&str>) -> Result<Vec<Bucket>> {
        let rows = sqlx::query(
            "SELECT name, public, cache_control, created_ms FROM buckets
             WHERE $1::TEXT IS NULL OR name = $1 ORDER BY name",
        )
        .bind(name)
        .fetch_all(&self.db)
        .await?;
        Ok(rows
            .iter()
            .map(|r| Bucket {
                name: r.get("name"),
                config: BucketConfig { public: r.get("public"), cache_control: r.get("cache_control") },
                created_ms: r.get("created_ms"),
            })
            .collect())
    }

    async fn delete_bucket(&self, name: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM buckets WHERE name = $1").bind(name).execute(&self.db).await?;
        Ok(r.rows_affected() == 1)
    }

    async fn add_token(&self, hash: &[u8], role: &str, label: &str) -> Result<()> {
        sqlx::query(UPSERT_TOKEN).bind(hash).bind(role).bind(label).bind(now_ms()).execute(&self.db).await?;
        Ok(())
    }

    async fn replace_labelled_token(&self, label: &str, hash: &[u8], role: &str) -> Result<()> {
        // Readers see the old rows until the commit, then the new one; two nodes doing this at
        // once both end with the row (the upsert takes the other's insert in its stride).
        let mut tx = self.db.begin().await?;
        sqlx::query("DELETE FROM tokens WHERE label = $1").bind(label).execute(&mut *tx).await?;
        sqlx::query(UPSERT_TOKEN).bind(hash).bind(role).bind(label).bind(now_ms()).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn token(&self, hash: &[u8]) -> Result<Option<(String, String)>> {
        let r =
            sqlx::query("SELECT role, label FROM tokens WHERE hash = $1").bind(hash).fetch_optional(&self.db).await?;
        Ok(r.map(|r| (r.get("role"), r.get("label"))))
    }

    async fn has_role(&self, role: &str) -> Result<bool> {
        let r = sqlx::query("SELECT 1 AS one FROM tokens WHERE role = $1 LIMIT 1")
            .bind(role)
            .fetch_optional(&self.db)
            .await?;
        Ok(r.is_some())
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.db).await?;
        Ok(())
    }
}
