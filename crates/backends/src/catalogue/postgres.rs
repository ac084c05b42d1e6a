//! The catalogue in PostgreSQL, shared by every node on the same database. Upserts are single
//! statements (`ON CONFLICT ... DO UPDATE`), so nodes writing the same name at once end with
//! one of their writes, never an error; names sort byte-wise (`COLLATE "C"`), as in SQLite.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::PgPool;

use super::Backend;
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

pub(crate) struct PgCatalogue {
    db: PgPool,
}

impl PgCatalogue {
    pub(crate) fn new(db: PgPool) -> PgCatalogue {
        PgCatalogue { db }
    }
}

/// Inserts or replaces a token row (one statement, run alone or in a transaction).
const UPSERT_TOKEN: &str = "INSERT INTO tokens (hash, role, label, created_ms) VALUES ($1, $2, $3, $4)
     ON CONFLICT (hash) DO UPDATE SET role = EXCLUDED.role, label = EXCLUDED.label, created_ms = EXCLUDED.created_ms";

#[async_trait]
impl Backend for PgCatalogue {
    async fn save_function(&self, name: &str, version: &str, manifest: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO functions (name, version, manifest, updated_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE SET version = EXCLUDED.version, manifest = EXCLUDED.manifest,
             updated_ms = EXCLUDED.updated_ms",
        )
        .bind(name)
        .bind(version)
        .bind(manifest)
        .bind(now_ms())
        .execute(&self.db)
        .await?;
        Ok(())
    }

    async fn delete_function(&self, name: &str) -> Result<()> {
        sqlx::query("DELETE FROM functions WHERE name = $1").bind(name).execute(&self.db).await?;
        Ok(())
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

    async fn token_role(&self, hash: &[u8]) -> Result<Option<String>> {
        let r = sqlx::query("SELECT role FROM tokens WHERE hash = $1").bind(hash).fetch_optional(&self.db).await?;
        Ok(r.map(|r| r.get("role")))
    }

    async fn has_role(&self, role: &str) -> Result<bool> {
        let r = sqlx::query("SELECT 1 AS one FROM tokens WHERE role = $1 LIMIT 1")
            .bind(role)
            .fetch_optional(&self.db)
            .await?;
        Ok(r.is_some())
    }
}
