//! The Controller's SQLite database (`shoal.db` in the state directory):
//! devices, jobs with their per-device steps, and agent logs.
//!
//! The schema is a list of migrations ([`MIGRATIONS`]); `PRAGMA
//! user_version` counts those applied, and each start applies the rest in
//! one immediate transaction. A database newer than this build is refused.
//!
//! [`Db`] is synchronous; the async server goes through [`Store`], which
//! runs each call on tokio's blocking pool under a mutex held only for that
//! call. Submodules: `devices.rs` (records and identity matching),
//! `jobs.rs` (job engine transitions), `logs.rs`, `users.rs` (admin API
//! users, token hashes, settings).

mod devices;
mod jobs;
mod logs;
mod users;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use rusqlite::{Connection, TransactionBehavior};

use crate::model::{DeviceState, EnrolmentState, JobState, StepState};

pub use devices::{normal_macs, normal_uuid, HelloFacts, Recognised};
pub use jobs::{Finish, Finished, JobCancel, NextStep};
pub use users::{token_sha256, User, IMAGES_DIR_SETTING};

/// The schema, one migration per entry; never edit an entry once released,
/// append a new one.
pub const MIGRATIONS: &[&str] = &[
    // 1: devices, jobs, job steps, logs.
    "CREATE TABLE devices (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        uuid           TEXT,
        serial         TEXT,
        macs           TEXT NOT NULL DEFAULT '[]',
        inventory      TEXT,
        state          TEXT NOT NULL DEFAULT 'offline',
        enrolment      TEXT NOT NULL,
        last_seen      INTEGER,
        last_peer      TEXT,
        agent_key      TEXT,
        agent_version  TEXT,
        assigned_image TEXT,
        created_at     INTEGER NOT NULL
    );
    CREATE INDEX devices_uuid ON devices(uuid);
    CREATE TABLE jobs (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        steps      TEXT NOT NULL,
        state      TEXT NOT NULL DEFAULT 'queued'
    );
    CREATE TABLE job_steps (
        job         INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        device      INTEGER NOT NULL,
        step        INTEGER NOT NULL,
        kind        TEXT NOT NULL,
        args        TEXT NOT NULL,
        timeout_ms  INTEGER NOT NULL,
        state       TEXT NOT NULL DEFAULT 'queued',
        started_at  INTEGER,
        finished_at INTEGER,
        progress    TEXT,
        output      TEXT,
        reason      TEXT,
        PRIMARY KEY (job, device, step)
    ) WITHOUT ROWID;
    CREATE INDEX job_steps_device ON job_steps(device, state, job, step);
    CREATE TABLE logs (
        id     INTEGER PRIMARY KEY AUTOINCREMENT,
        device INTEGER,
        time   INTEGER NOT NULL,
        level  TEXT NOT NULL,
        text   TEXT NOT NULL
    );
    CREATE INDEX logs_device ON logs(device, id);",
    // 2: admin API users (the image store's ACLs name them) and settings.
    "CREATE TABLE users (
        name         TEXT PRIMARY KEY,
        role         TEXT NOT NULL,
        token_sha256 TEXT NOT NULL UNIQUE,
        created_at   INTEGER NOT NULL
    );
    CREATE TABLE settings (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );",
];

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot open the database {0}")]
    Open(PathBuf, #[source] rusqlite::Error),
    #[error("the database has schema version {found}, newer than this controller's {known}")]
    TooNew { found: u32, known: u32 },
    #[error("cannot migrate the database to schema version {version}")]
    Migrate {
        version: usize,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database: cannot {what}")]
    Query {
        what: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database: stored {what} is not valid JSON")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("database task panicked or was cancelled")]
    Task,
}

/// Names the failed query in a `DbError`.
pub(crate) trait Ctx<T> {
    fn ctx(self, what: &'static str) -> Result<T, DbError>;
}

impl<T> Ctx<T> for rusqlite::Result<T> {
    fn ctx(self, what: &'static str) -> Result<T, DbError> {
        self.map_err(|source| DbError::Query { what, source })
    }
}

macro_rules! sql_enum {
    ($($t:ty),+) => {$(
        impl ToSql for $t {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }
        impl FromSql for $t {
            fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
                let s = v.as_str()?;
                <$t>::parse(s).ok_or_else(|| {
                    FromSqlError::Other(format!("unknown {} {s:?}", stringify!($t)).into())
                })
            }
        }
    )+};
}

sql_enum!(DeviceState, EnrolmentState, StepState, JobState);

/// A JSON column as a value, or a conversion error rusqlite reports.
pub(crate) fn json_col<T: serde::de::DeserializeOwned>(
    row: &rusqlite::Row<'_>,
    idx: usize,
) -> rusqlite::Result<T> {
    let text: String = row.get(idx)?;
    serde_json::from_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
    })
}

pub(crate) fn time_col(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<Option<String>> {
    Ok(row.get::<_, Option<i64>>(idx)?.map(crate::time::rfc3339))
}

/// The database connection.
#[derive(Debug)]
pub struct Db {
    conn: Connection,
}

impl Db {
    /// Opens (creating) the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let conn = Connection::open(path).map_err(|e| DbError::Open(path.into(), e))?;
        Db::setup(conn).map_err(|e| match e {
            DbError::Query { source, .. } => DbError::Open(path.into(), source),
            other => other,
        })
    }

    /// A private in-memory database (tests).
    pub fn open_in_memory() -> Result<Db, DbError> {
        let conn = Connection::open_in_memory().map_err(|e| DbError::Open(":memory:".into(), e))?;
        Db::setup(conn)
    }

    fn setup(conn: Connection) -> Result<Db, DbError> {
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA foreign_keys = ON;
             PRAGMA busy_timeout = 5000;",
        )
        .ctx("set the connection's pragmas")?;
        let mut db = Db { conn };
        db.migrate()?;
        Ok(db)
    }

    /// Applies the migrations not yet applied; returns the schema version.
    pub fn migrate(&mut self) -> Result<u32, DbError> {
        let known = MIGRATIONS.len() as u32;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .ctx("begin the migration")?;
        let found: u32 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .ctx("read the schema version")?;
        if found > known {
            return Err(DbError::TooNew { found, known });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let version = i + 1;
            tx.execute_batch(sql)
                .and_then(|()| tx.pragma_update(None, "user_version", version as u32))
                .map_err(|source| DbError::Migrate { version, source })?;
        }
        tx.commit().ctx("commit the migration")?;
        Ok(known)
    }

    /// The database file (`None` in memory).
    pub fn path(&self) -> Option<PathBuf> {
        self.conn
            .path()
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
    }

    pub fn schema_version(&self) -> Result<u32, DbError> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .ctx("read the schema version")
    }
}

/// The database shared by the async server: each call runs on the
/// blocking pool, holding the connection only for that call.
#[derive(Debug, Clone)]
pub struct Store {
    db: Arc<Mutex<Db>>,
}

impl Store {
    pub fn new(db: Db) -> Store {
        Store {
            db: Arc::new(Mutex::new(db)),
        }
    }

    pub async fn call<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Db) -> Result<T, DbError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = db.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|_| DbError::Task)?
    }

    /// Runs `f` on the calling thread (for code already on the blocking
    /// pool, such as the image store's role lookups). Keep `f` short.
    pub fn blocking<T>(&self, f: impl FnOnce(&mut Db) -> Result<T, DbError>) -> Result<T, DbError> {
        let mut guard = self.db.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_apply_once_and_a_newer_schema_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("shoal.db");
        let db = Db::open(&path).unwrap();
        assert_eq!(db.schema_version().unwrap(), MIGRATIONS.len() as u32);
        drop(db);
        // Reopening applies nothing and keeps the data.
        let mut db = Db::open(&path).unwrap();
        assert_eq!(db.migrate().unwrap(), MIGRATIONS.len() as u32);
        db.conn.pragma_update(None, "user_version", 99u32).unwrap();
        drop(db);
        match Db::open(&path) {
            Err(DbError::TooNew { found: 99, .. }) => {}
            other => panic!("expected TooNew, got {other:?}"),
        }
    }

    #[test]
    fn a_failed_migration_leaves_the_version_alone() {
        let mut db = Db::open_in_memory().unwrap();
        db.conn.pragma_update(None, "user_version", 0u32).unwrap();
        // Re-running migration 1 on tables that exist fails and rolls back.
        assert!(matches!(
            db.migrate(),
            Err(DbError::Migrate { version: 1, .. })
        ));
        assert_eq!(db.schema_version().unwrap(), 0);
    }
}
