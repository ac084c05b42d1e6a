//! PostgreSQL, shared by every node of a deployment (cargo feature `postgres`): the connection
//! pool and the versioned schema. Migrations run at open, in order, each once, recorded in
//! `_sqlx_migrations` with a checksum; sqlx's migrator holds an advisory lock while it runs, so
//! nodes starting together apply each step once. A new step is appended to [`MIGRATIONS`],
//! never edited once released (the checksum refuses an edited one).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use sqlx::SqlSafeStr;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::queue::{Queue, Wakers};
use crate::state::StoreError;

/// `(version, description, SQL)`, oldest first.
const MIGRATIONS: &[(i64, &str, &str)] = &[(1, "queue messages", crate::queue::postgres::MIGRATION)];

/// A connection pool to the deployment's database, its schema up to date.
#[derive(Clone)]
pub struct Postgres {
    db: PgPool,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres").finish_non_exhaustive()
    }
}

impl Postgres {
    /// Connects to `url` (`postgres://user@host:port/database`) and brings the schema up to
    /// date. Fails within a few seconds when the server does not answer.
    pub async fn open(url: &str) -> Result<Postgres, StoreError> {
        let opts: PgConnectOptions = url.parse()?;
        let db = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(opts.application_name("pixflow"))
            .await?;
        let migrator = Migrator {
            migrations: Cow::Owned(
                MIGRATIONS
                    .iter()
                    .map(|(version, description, sql)| {
                        Migration::new(
                            *version,
                            Cow::Borrowed(*description),
                            MigrationType::Simple,
                            sql.into_sql_str(),
                            false,
                        )
                    })
                    .collect(),
            ),
            ..Migrator::DEFAULT
        };
        migrator.run(&db).await.map_err(|e| StoreError::from(sqlx::Error::from(e)))?;
        Ok(Postgres { db })
    }

    /// The queues in this database; `holder` names this node's leases (see
    /// [`Queue::release_held`]), so it should stay the same across the node's restarts.
    pub async fn queue(&self, holder: &str) -> Result<Queue, crate::queue::QueueError> {
        let wakers = Arc::new(Wakers::default());
        let backend = crate::queue::postgres::PgQueue::new(self.db.clone(), wakers.clone()).await?;
        Ok(Queue::new(Arc::new(backend), wakers, holder))
    }

    pub async fn close(&self) {
        self.db.close().await;
    }
}
