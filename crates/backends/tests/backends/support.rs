//! What the behaviour suites share: names no other case or run uses, and a PostgreSQL schema of
//! each case's own when `PIXFLOW_TEST_POSTGRES_URL` names a server (`.ci/run` sets it; a
//! configured server that does not answer fails the suite). A schema of its own keeps a case
//! apart from other cases, runs and branches on the same database, migrations included.

#![allow(dead_code, reason = "each suite uses part of the support")]

use std::sync::atomic::{AtomicU32, Ordering};

use pixflow_backends::state::now_ms;
use sqlx::Connection;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name no other case (or run) uses.
pub fn fresh(prefix: &str) -> String {
    format!("{prefix}-{}-{}-{}", std::process::id(), now_ms() % 1_000_000, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The PostgreSQL server to test against, if any; says so on standard error when there is none.
pub fn postgres_url(what: &str) -> Option<String> {
    let url = std::env::var("PIXFLOW_TEST_POSTGRES_URL").ok().filter(|u| !u.is_empty());
    if url.is_none() {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "note: skipped the PostgreSQL {what} backend (set PIXFLOW_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test)"
        );
    }
    url
}

/// The service a variable names, if any; says so on standard error when there is none.
pub fn service(var: &str, example: &str) -> Option<String> {
    let url = std::env::var(var).ok().filter(|u| !u.is_empty());
    if url.is_none() {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "note: skipped a backend (set {var}={example})");
    }
    url
}

/// A schema made for one case; [`Schema::url`] connects with it first on the search path.
pub struct Schema {
    server: String,
    name: String,
    pub url: String,
}

impl Schema {
    /// Creates a fresh schema on the server at `server`. Panics when the server does not answer.
    pub async fn create(server: &str) -> Schema {
        let name = fresh("pixflow_test").replace('-', "_");
        let mut conn = sqlx::PgConnection::connect(server)
            .await
            .unwrap_or_else(|e| panic!("PIXFLOW_TEST_POSTGRES_URL is set but unreachable: {e}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}"))).execute(&mut conn).await.unwrap();
        conn.close().await.unwrap();
        let joint = if server.contains('?') { '&' } else { '?' };
        let url = format!("{server}{joint}options=-c%20search_path%3D{name}");
        Schema { server: server.to_owned(), name, url }
    }

    /// Drops the schema and everything in it.
    pub async fn drop(self) {
        let mut conn = sqlx::PgConnection::connect(&self.server).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {} CASCADE", self.name)))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
    }
}
