//! PostgreSQL, shared by every node of a deployment (cargo feature `postgres`): the connection
//! pool, the versioned schema, and the handles of the state over it (opened through
//! [`crate::State::postgres`]). Migrations run at open, in order, each once, recorded in
//! `_sqlx_migrations` with a checksum; sqlx's migrator holds an advisory lock while it runs, so
//! nodes starting together apply each step once. A new step is appended to [`MIGRATIONS`],
//! never edited once released (the checksum refuses an edited one); a database migrated by a
//! newer version is refused by an older one (it does not know the newer steps).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions};
use sqlx::{Connection, SqlSafeStr};

use crate::catalogue::Catalogue;
use crate::invocation_log::InvocationLog;
use crate::queue::{Queue, QueueError, Wakers};
use crate::state::StateError;

/// `(version, description, SQL)`, oldest first.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "queue messages", crate::queue::postgres::MIGRATION),
    (2, "catalogue", crate::catalogue::postgres::MIGRATION),
    (3, "invocation log", crate::invocation_log::postgres::MIGRATION),
];

/// How long the first connection may take before the server counts as not answering.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection pool to the deployment's database, its schema up to date.
#[derive(Clone)]
pub(crate) struct Postgres {
    db: PgPool,
    /// Other nodes' catalogue changes, shared by this state's catalogue handles.
    feed: Arc<crate::catalogue::postgres::Feed>,
    /// Which pool this is, for handles that may write together in one transaction (an
    /// invocation's row and its queue message).
    pool: Arc<()>,
    /// The queue handles' announcers, sent out before the pool closes.
    announcers: Arc<std::sync::Mutex<Vec<std::sync::Weak<crate::queue::postgres::Announcer>>>>,
}

impl Postgres {
    /// Connects to `url` (`postgres://user:password@host:port/database`) and brings the schema
    /// up to date. Errors name the server and the reason, never the password.
    pub(crate) async fn open(url: &str) -> Result<Postgres, StateError> {
        let opts = parse(url)?;
        let at = format!("{}:{}", opts.get_host(), opts.get_port());
        let refused = |reason: String| StateError::Connect { backend: "PostgreSQL", at: at.clone(), reason };
        // One connection first, for its own error: the pool retries a refused connection until
        // its timeout and then reports only the timeout.
        match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&opts)).await {
            Err(_) => return Err(refused(format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()))),
            Ok(Err(e)) => return Err(refused(redact(&reason(&e), url))),
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
            }
        }
        let db = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(opts.application_name("pixflow"))
            .await
            .map_err(|e| refused(redact(&reason(&e), url)))?;
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
        migrator.run(&db).await.map_err(|e| {
            StateError::Unavailable(redact(&format!("bringing the PostgreSQL schema up to date: {e}"), url))
        })?;
        let feed = crate::catalogue::postgres::Feed::start(&db).await?;
        Ok(Postgres { db, feed, pool: Arc::new(()), announcers: Arc::default() })
    }

    pub(crate) fn catalogue(&self) -> Catalogue {
        Catalogue::new(Arc::new(crate::catalogue::postgres::PgCatalogue::new(self.db.clone(), self.feed.clone())))
    }

    pub(crate) fn invocations(&self) -> InvocationLog {
        InvocationLog::new(Arc::new(crate::invocation_log::postgres::PgLog::new(self.db.clone(), self.pool.clone())))
    }

    /// The queues in this database; `holder` names this node's leases (see
    /// [`Queue::release_held`]), so it should stay the same across the node's restarts.
    pub(crate) async fn queue(&self, holder: &str) -> Result<Queue, QueueError> {
        let wakers = Arc::new(Wakers::default());
        let backend = crate::queue::postgres::PgQueue::new(self.db.clone(), wakers.clone(), self.pool.clone()).await?;
        let mut announcers = self.announcers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        announcers.retain(|a| a.strong_count() > 0);
        announcers.push(backend.announcer());
        drop(announcers);
        Ok(Queue::new(Arc::new(backend), wakers, holder))
    }

    /// Sends what the queues still have to announce (for at most 2 s), then closes the pool.
    pub(crate) async fn close(&self) {
        let announcers: Vec<_> = self
            .announcers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        let flushed = async {
            for a in announcers {
                a.flush(&self.db).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), flushed).await;
        self.db.close().await;
    }
}

/// A listener on `channel` over a fresh connection of `db`, for one whose connection failed in a
/// way it does not mend by itself: tried again every second until the server answers, so that
/// it returns only once it is listening (what was notified before that is the caller's to make
/// up for). `None` once the pool is closed (the state is closing).
pub(crate) async fn relisten(db: &PgPool, channel: &str) -> Option<PgListener> {
    loop {
        if db.is_closed() {
            return None;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let attempt = async {
            let mut listener = PgListener::connect_with(db).await?;
            listener.listen(channel).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        match attempt.await {
            Ok(listener) => return Some(listener),
            Err(sqlx::Error::PoolClosed) => return None,
            Err(e) => tracing::debug!(error = %e, channel, "listening to PostgreSQL again"),
        }
    }
}

/// The connection options of a `postgres://` URL.
fn parse(url: &str) -> Result<PgConnectOptions, StateError> {
    const FORM: &str = "postgres://user:password@host:5432/database";
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(StateError::InvalidUrl(format!("not a PostgreSQL URL (expected {FORM})")));
    }
    url.parse::<PgConnectOptions>()
        .map_err(|e| StateError::InvalidUrl(redact(&format!("not a valid PostgreSQL URL ({FORM}): {e}"), url)))
}

/// Why a connection failed, in a few words: the operating system's for network errors
/// (`connection refused`), the server's for refusals (`password authentication failed ...`).
fn reason(e: &sqlx::Error) -> String {
    let text = match e {
        sqlx::Error::Io(io) => io.to_string(),
        sqlx::Error::Database(db) => db.message().to_owned(),
        sqlx::Error::Tls(tls) => format!("TLS: {tls}"),
        sqlx::Error::PoolTimedOut => "no connection within 5 s".to_owned(),
        other => other.to_string(),
    };
    // `Connection refused (os error 111)` -> `connection refused`.
    let text = match text.rfind(" (os error ") {
        Some(at) if text.ends_with(')') => text[..at].to_owned(),
        _ => text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) if chars.clone().next().is_some_and(char::is_lowercase) => {
            first.to_lowercase().chain(chars).collect()
        }
        _ => text,
    }
}

/// `text` with the URL's password (as written, and percent-decoded) replaced by `***`.
fn redact(text: &str, url: &str) -> String {
    let Some(password) = password(url) else { return text.to_owned() };
    let mut out = text.replace(password, "***");
    if let Ok(decoded) = percent_decode(password)
        && !decoded.is_empty()
    {
        out = out.replace(&decoded, "***");
    }
    out
}

/// The password part of `scheme://user:password@host...`, if any.
fn password(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let userinfo = rest.rsplit_once('@')?.0;
    let password = userinfo.split_once(':')?.1;
    (!password.is_empty()).then_some(password)
}

fn percent_decode(s: &str) -> Result<String, std::string::FromUtf8Error> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push(u8::try_from(hi * 16 + lo).unwrap_or(b'?'));
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_a_message() {
        let url = "postgres://pixflow:s%40cret@db.internal:5432/pixflow";
        assert_eq!(password(url), Some("s%40cret"));
        assert_eq!(redact("login as pixflow:s%40cret or s@cret failed", url), "login as pixflow:*** or *** failed");
        assert_eq!(password("postgres://db.internal/pixflow"), None);
        assert_eq!(password("postgres://user@db.internal/pixflow"), None);
        let Err(e) = parse("mysql://root:hunter2@db/x") else { panic!("a MySQL URL was taken") };
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let Err(e) = parse("postgres://root:hunter2@db:notaport/x") else { panic!("a bad port was taken") };
        assert!(matches!(e, StateError::InvalidUrl(_)) && !e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn reasons_are_short() {
        let refused = std::io::Error::from_raw_os_error(111);
        let text = reason(&sqlx::Error::Io(refused));
        assert!(!text.contains("os error"), "{text}");
        assert!(text.chars().next().is_some_and(char::is_lowercase), "{text}");
    }
}
