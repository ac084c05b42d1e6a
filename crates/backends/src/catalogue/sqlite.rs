//! The catalogue in the node's SQLite state file (tables `functions`, `tokens`, `buckets`,
//! created with the rest of the file's schema by [`crate::state`]).

use async_trait::async_trait;
use sqlx::Row;
use sqlx::sqlite::SqlitePool;

use super::Backend;
use crate::objects::{Bucket, BucketConfig};
use crate::state::{Result, now_ms};

pub(crate) struct SqliteCatalogue {
    db: SqlitePool,
}

impl SqliteCatalogue {
    pub(crate) fn new(db: SqlitePool) -> SqliteCatalogue {
        SqliteCatalogue { db }
    }
}

/// Bucket settings rows (`name, public, cache_control, created_ms`): the state file keeps them
/// for an S3 service's buckets, the embedded object store's catalogue for its own.
pub(crate) mod bucket_rows {
    use sqlx::Row;
    use sqlx::sqlite::SqlitePool;

    use crate::objects::{Bucket, BucketConfig};
    use crate::state::now_ms;

    /// Inserts or updates; `true` when the row is new.
    pub(crate) async fn save(db: &SqlitePool, name: &str, config: &BucketConfig) -> sqlx::Result<bool> {
        let created = sqlx::query(
            "INSERT INTO buckets (name, public, cache_control, created_ms) VALUES (?, ?, ?, ?)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(config.public)
        .bind(&config.cache_control)
        .bind(now_ms())
        .execute(db)
        .await?
        .rows_affected()
            == 1;
        if !created {
            sqlx::query("UPDATE buckets SET public = ?, cache_control = ? WHERE name = ?")
                .bind(config.public)
                .bind(&config.cache_control)
                .bind(name)
                .execute(db)
                .await?;
        }
        Ok(created)
    }

    /// The rows named `name` (all when `None`), by name.
    pub(crate) async fn find(db: &SqlitePool, name: Option<&str>) -> sqlx::Result<Vec<Bucket>> {
        let rows = sqlx::query(
            "SELECT name, public, cache_control, created_ms FROM buckets WHERE ?1 IS NULL OR name = ?1 ORDER BY name",
        )
        .bind(name)
        .fetch_all(db)
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
}

#[async_trait]
impl Backend for SqliteCatalogue {
    async fn save_function(&self, name: &str, version: &str, manifest: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO functions (name, version, manifest, updated_ms) VALUES (?, ?, ?, ?)
             ON CONFLICT (name) DO UPDATE SET version = excluded.version, manifest = excluded.manifest,
             updated_ms = excluded.updated_ms",
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
        sqlx::query("DELETE FROM functions WHERE name = ?").bind(name).execute(&self.db).await?;
        Ok(())
    }

    async fn functions(&self) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query("SELECT name, manifest FROM functions ORDER BY name").fetch_all(&self.db).await?;
        Ok(rows.iter().map(|r| (r.get("name"), r.get("manifest"))).collect())
    }

    async fn function(&self, name: &str) -> Result<Option<String>> {
        let r =
            sqlx::query("SELECT manifest FROM functions WHERE name = ?").bind(name).fetch_optional(&self.db).await?;
        Ok(r.map(|r| r.get("manifest")))
    }

    async fn save_bucket(&self, name: &str, config: &BucketConfig) -> Result<bool> {
        Ok(bucket_rows::save(&self.db, name, config).await?)
    }

    async fn buckets(&self, name: Option<&str>) -> Result<Vec<Bucket>> {
        Ok(bucket_rows::find(&self.db, name).await?)
    }

    async fn delete_bucket(&self, name: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM buckets WHERE name = ?").bind(name).execute(&self.db).await?;
        Ok(r.rows_affected() == 1)
    }

    async fn add_token(&self, hash: &[u8], role: &str, label: &str) -> Result<()> {
        sqlx::query("INSERT OR REPLACE INTO tokens (hash, role, label, created_ms) VALUES (?, ?, ?, ?)")
            .bind(hash)
            .bind(role)
            .bind(label)
            .bind(now_ms())
            .execute(&self.db)
            .await?;
        Ok(())
    }

    async fn replace_labelled_token(&self, label: &str, hash: &[u8], role: &str) -> Result<()> {
        let mut tx = self.db.begin().await?;
        sqlx::query("DELETE FROM tokens WHERE label = ?").bind(label).execute(&mut *tx).await?;
        sqlx::query("INSERT OR REPLACE INTO tokens (hash, role, label, created_ms) VALUES (?, ?, ?, ?)")
            .bind(hash)
            .bind(role)
            .bind(label)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn token(&self, hash: &[u8]) -> Result<Option<(String, String)>> {
        let r =
            sqlx::query("SELECT role, label FROM tokens WHERE hash = ?").bind(hash).fetch_optional(&self.db).await?;
        Ok(r.map(|r| (r.get("role"), r.get("label"))))
    }

    async fn has_role(&self, role: &str) -> Result<bool> {
        let r = sqlx::query("SELECT 1 AS one FROM tokens WHERE role = ? LIMIT 1")
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
