//! The invocation log in the node's SQLite state file (table `invocations`, created and
//! migrated with the rest of the file's schema by [`crate::state`]). SQLite runs one writer at
//! a time, so each lease-checked update sees the row as the last writer left it.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::sqlite::SqlitePool;

use super::{Backend, InvocationRow, NewInvocation, read_row, row_columns};
use crate::state::{Result, now_ms};

pub(crate) struct SqliteLog {
    db: SqlitePool,
}

impl SqliteLog {
    pub(crate) fn new(db: SqlitePool) -> SqliteLog {
        SqliteLog { db }
    }
}

#[async_trait]
impl Backend for SqliteLog {
    async fn insert(&self, inv: &NewInvocation) -> Result<()> {
        sqlx::query(
            "INSERT INTO invocations (id, function, status, max_attempts, meta, payload, callback, created_ms, updated_ms,
             next_ms, message)
             VALUES (?1, ?2, 'queued', ?3, ?4, ?5, ?6, ?7, ?7, ?7, ?1)",
        )
        .bind(&inv.id)
        .bind(&inv.function)
        .bind(i64::from(inv.max_attempts))
        .bind(&inv.meta)
        .bind(&inv.payload)
        .bind(&inv.callback)
        .bind(now_ms())
        .execute(&self.db)
        .await?;
        Ok(())
    }

    async fn start(&self, id: &str, lease: &str) -> Result<Option<(InvocationRow, Vec<u8>)>> {
        let r = sqlx::query(concat!(
            "UPDATE invocations SET status = 'running', attempts = attempts + 1, claim = ?1, updated_ms = ?2
             WHERE id = ?3 AND status IN ('queued', 'running')
             RETURNING ",
            row_columns!(),
            ", payload"
        ))
        .bind(lease)
        .bind(now_ms())
        .bind(id)
        .fetch_optional(&self.db)
        .await?;
        Ok(r.map(|r| (read_row(&r), r.get("payload"))))
    }

    async fn finish(&self, id: &str, lease: &str, result_meta: &str, result: &[u8]) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE invocations SET status = 'succeeded', result_meta = ?, result = ?, error = NULL,
             payload = x'', claim = NULL, updated_ms = ? WHERE id = ? AND claim = ? AND status = 'running'",
        )
        .bind(result_meta)
        .bind(result)
        .bind(now_ms())
        .bind(id)
        .bind(lease)
        .execute(&self.db)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn retry_at(&self, id: &str, lease: &str, error: &str, next_ms: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE invocations SET status = 'queued', error = ?, next_ms = ?, claim = NULL, updated_ms = ?
             WHERE id = ? AND claim = ? AND status = 'running'",
        )
        .bind(error)
        .bind(next_ms)
        .bind(now_ms())
        .bind(id)
        .bind(lease)
        .execute(&self.db)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn bury(&self, id: &str, lease: &str, error: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE invocations SET status = 'dead', error = ?, claim = NULL, updated_ms = ?
             WHERE id = ? AND claim = ? AND status = 'running'",
        )
        .bind(error)
        .bind(now_ms())
        .bind(id)
        .bind(lease)
        .execute(&self.db)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn redrive(&self, id: &str, message: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE invocations SET status = 'queued', attempts = 0, next_ms = ?1, updated_ms = ?1, message = ?2
             WHERE id = ?3 AND status = 'dead'",
        )
        .bind(now_ms())
        .bind(message)
        .bind(id)
        .execute(&self.db)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn delete(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM invocations WHERE id = ?").bind(id).execute(&self.db).await?;
        Ok(())
    }

    async fn unsettled(&self) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query(
            "SELECT id, COALESCE(message, id) AS message FROM invocations WHERE status IN ('queued', 'running')
             ORDER BY created_ms",
        )
        .fetch_all(&self.db)
        .await?;
        Ok(rows.iter().map(|r| (r.get("id"), r.get("message"))).collect())
    }

    async fn get(&self, id: &str) -> Result<Option<InvocationRow>> {
        let r = sqlx::query(concat!("SELECT ", row_columns!(), " FROM invocations WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.db)
            .await?;
        Ok(r.as_ref().map(read_row))
    }

    async fn result(&self, id: &str) -> Result<Option<Vec<u8>>> {
        let r = sqlx::query("SELECT result FROM invocations WHERE id = ? AND status = 'succeeded'")
            .bind(id)
            .fetch_optional(&self.db)
            .await?;
        Ok(r.map(|r| r.get("result")))
    }

    async fn dead_letters(&self, after: &str, limit: u32) -> Result<Vec<InvocationRow>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            row_columns!(),
            " FROM invocations WHERE status = 'dead' AND id > ? ORDER BY id LIMIT ?"
        ))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.db)
        .await?;
        Ok(rows.iter().map(read_row).collect())
    }

    async fn purge_finished(&self, before_ms: i64) -> Result<u64> {
        let done = sqlx::query("DELETE FROM invocations WHERE status IN ('succeeded', 'dead') AND updated_ms < ?")
            .bind(before_ms)
            .execute(&self.db)
            .await?;
        Ok(done.rows_affected())
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.db).await?;
        Ok(())
    }
}
