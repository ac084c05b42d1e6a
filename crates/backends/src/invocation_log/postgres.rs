//! The invocation log in PostgreSQL, shared by every node on the same database. Every
//! operation is one statement; `start` is the same `UPDATE ... RETURNING` as in SQLite, and the
//! lease-checked updates (`finish`, `retry_at`, `bury`) name the lease in their `WHERE`: under
//! concurrent writers PostgreSQL re-checks that condition on the row's latest version before
//! it updates, so an outcome is recorded only for the lease that holds the row then.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::PgPool;

use super::{Backend, InvocationRow, NewInvocation, read_row, row_columns};
use crate::state::{Result, StateError, now_ms};

/// The schema, as a migration step of [`crate::pg`]. Ids sort byte-wise (`COLLATE "C"`), as in
/// SQLite, so dead letters page alike.
pub(crate) const MIGRATION: &str = r#"
    CREATE TABLE invocations (
        id TEXT COLLATE "C" PRIMARY KEY, function TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'dead')),
        attempts BIGINT NOT NULL DEFAULT 0, max_attempts BIGINT NOT NULL,
        meta TEXT NOT NULL, payload BYTEA NOT NULL, callback TEXT,
        result_meta TEXT, result BYTEA, error TEXT,
        created_ms BIGINT NOT NULL, updated_ms BIGINT NOT NULL, next_ms BIGINT NOT NULL,
        claim TEXT, message TEXT);
    CREATE INDEX invocations_unsettled ON invocations (created_ms) WHERE status IN ('queued', 'running');
    CREATE INDEX invocations_finished ON invocations (updated_ms) WHERE status IN ('succeeded', 'dead');
    CREATE INDEX invocations_dead ON invocations (id) WHERE status = 'dead';
"#;

pub(crate) struct PgLog {
    db: PgPool,
    /// Which pool `db` is (see `crate::pg::Postgres`).
    pool: std::sync::Arc<()>,
}

impl PgLog {
    pub(crate) fn new(db: PgPool, pool: std::sync::Arc<()>) -> PgLog {
        PgLog { db, pool }
    }
}

async fn insert_on(conn: &mut sqlx::PgConnection, inv: &NewInvocation) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO invocations (id, function, status, max_attempts, meta, payload, callback, created_ms, updated_ms,
         next_ms, message)
         VALUES ($1, $2, 'queued', $3, $4, $5, $6, $7, $7, $7, $1)",
    )
    .bind(&inv.id)
    .bind(&inv.function)
    .bind(i64::from(inv.max_attempts))
    .bind(&inv.meta)
    .bind(&inv.payload)
    .bind(&inv.callback)
    .bind(now_ms())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[async_trait]
impl Backend for PgLog {
    async fn insert(&self, inv: &NewInvocation) -> Result<()> {
        let mut conn = self.db.acquire().await?;
        Ok(insert_on(&mut conn, inv).await?)
    }

    async fn insert_queued(
        &self,
        inv: &NewInvocation,
        queue: &dyn crate::queue::Backend,
        name: &str,
    ) -> Option<Result<()>> {
        queue.postgres().filter(|q| q.on(&self.pool))?;
        let recorded = async {
            let mut tx = self.db.begin().await?;
            insert_on(&mut tx, inv).await?;
            crate::queue::postgres::enqueue_on(&mut tx, name, &inv.id, inv.id.as_bytes(), std::time::Duration::ZERO)
                .await?;
            tx.commit().await
        };
        Some(recorded.await.map_err(StateError::from))
    }

    async fn start(&self, id: &str, lease: &str) -> Result<Option<(InvocationRow, Vec<u8>)>> {
        let r = sqlx::query(concat!(
            "UPDATE invocations SET status = 'running', attempts = attempts + 1, claim = $1, updated_ms = $2
             WHERE id = $3 AND status IN ('queued', 'running')
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
            "UPDATE invocations SET status = 'succeeded', result_meta = $1, result = $2, error = NULL,
             payload = ''::BYTEA, claim = NULL, updated_ms = $3 WHERE id = $4 AND claim = $5 AND status = 'running'",
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
            "UPDATE invocations SET status = 'queued', error = $1, next_ms = $2, claim = NULL, updated_ms = $3
             WHERE id = $4 AND claim = $5 AND status = 'running'",
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
            "UPDATE invocations SET status = 'dead', error = $1, claim = NULL, updated_ms = $2
             WHERE id = $3 AND claim = $4 AND status = 'running'",
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
            "UPDATE invocations SET status = 'queued', attempts = 0, next_ms = $1, updated_ms = $1, message = $2
             WHERE id = $3 AND status = 'dead'",
        )
        .bind(now_ms())
        .bind(message)
        .bind(id)
        .execute(&self.db)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn delete(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM invocations WHERE id = $1").bind(id).execute(&self.db).await?;
        Ok(())
    }

    async fn unsettled(&self) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query(
            "SELECT id, COALESCE(message, id) AS message FROM invocations WHERE status IN ('queued', 'running')
             ORDER BY created_ms, id",
        )
        .fetch_all(&self.db)
        .await?;
        Ok(rows.iter().map(|r| (r.get("id"), r.get("message"))).collect())
    }

    async fn get(&self, id: &str) -> Result<Option<InvocationRow>> {
        let r = sqlx::query(concat!("SELECT ", row_columns!(), " FROM invocations WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.db)
            .await?;
        Ok(r.as_ref().map(read_row))
    }

    async fn result(&self, id: &str) -> Result<Option<Vec<u8>>> {
        let r = sqlx::query("SELECT result FROM invocations WHERE id = $1 AND status = 'succeeded'")
            .bind(id)
            .fetch_optional(&self.db)
            .await?;
        Ok(r.map(|r| r.get("result")))
    }

    async fn dead_letters(&self, after: &str, limit: u32) -> Result<Vec<InvocationRow>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            row_columns!(),
            " FROM invocations WHERE status = 'dead' AND id > $1 ORDER BY id LIMIT $2"
        ))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.db)
        .await?;
        Ok(rows.iter().map(read_row).collect())
    }

    async fn purge_finished(&self, before_ms: i64) -> Result<u64> {
        let done = sqlx::query("DELETE FROM invocations WHERE status IN ('succeeded', 'dead') AND updated_ms < $1")
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
