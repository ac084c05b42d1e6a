//! What the suites that need outside services share: names no other test or run uses, the
//! service a variable names (skipped with a note when unset; `.ci/run` always sets them, and a
//! set variable whose service does not answer fails the test), and a PostgreSQL schema of each
//! test's own, so tests, runs and branches on one database neither see each other's rows nor
//! share their migrations.

use sqlx::Connection;

/// A name no other test (or run) uses.
pub fn unique(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() % 1_000_000;
    format!("{prefix}-{}-{ms}-{n}", std::process::id())
}

/// The address of the service `var` names, if any; says what is skipped on standard error when
/// there is none.
pub fn service(var: &str, example: &str, what: &str) -> Option<String> {
    let url = std::env::var(var).ok().filter(|u| !u.is_empty());
    if url.is_none() {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "note: skipped {what} (set {var}={example})");
    }
    url
}

/// A schema made for one test; `url` connects with it first on the search path.
pub struct Schema {
    server: String,
    name: String,
    pub url: String,
}

impl Schema {
    /// Creates a fresh schema on the server at `server`. Panics when the server does not answer.
    pub async fn create(server: &str) -> Schema {
        let name = unique("pixflow_node_test").replace('-', "_");
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
