//! The coordinator's state in SQLite (WAL mode, versioned migrations). Everything that matters
//! is here — jobs, phases, workers and their group membership, per-step metrics, committed
//! checkpoints, datasets, comparisons — so a restarted coordinator carries on where it stopped.
//! (Worker leases live in memory, [`crate::membership`]: a restart renews them all anyway.)
//!
//! # Layout
//! - [`schema`]: the migrations and the file's application id.
//! - `jobs`: jobs, phases, metrics (non-finite values kept), checkpoints, datasets.
//! - `workers`: registration by instance, group assignment, death and pruning.
//! - `comparisons`: human-labelled comparisons.
//! - `samples`: RL phases' sampled answers, for a phase's latest steps.
//!
//! One coordinator per store: [`Store::open`] takes an exclusive lock on `PATH.lock` for the
//! life of the process, refuses a file that is another program's SQLite database, and
//! [`Store::probe`] tells whether the store can still be written (the health check).

mod comparisons;
mod jobs;
mod samples;
pub mod schema;
mod workers;

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

pub use comparisons::{ComparisonRow, NewComparison};
pub use jobs::{CheckpointRow, JobRow, MetricRow, PhaseRow, json_f64};
pub use samples::SampleRow;
pub use workers::{NewWorker, WorkerRow};

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Open { path: String, source: rusqlite::Error },
    #[error("store {path}: another coordinator is using this store (it holds {lock}); run one coordinator per store")]
    Locked { path: String, lock: String },
    #[error("store {path}: not a liandan store: {detail}")]
    Foreign { path: String, detail: String },
    #[error("store {path}: {reason}")]
    Unusable { path: String, reason: String },
    #[error("store: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A file the coordinator writes from the store (exported comparisons).
    #[error("{0}")]
    Io(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The SQLite store.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    /// The database file and its inode at open (None in memory): the probe notices a store
    /// deleted or replaced under a running coordinator.
    file: Option<(PathBuf, u64)>,
    /// Held for the life of the store: the exclusive lock that keeps a second coordinator out.
    _lock: Option<std::fs::File>,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn inode(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.ino())
}

impl Store {
    /// Opens (creating if needed) the store at `path`, locks it for this process and runs
    /// pending migrations.
    ///
    /// # Errors
    /// [`StoreError::Locked`] when another process holds the store, [`StoreError::Foreign`] for a
    /// file that is not a liandan store, [`StoreError::Open`] for SQLite's own errors.
    pub fn open(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let open_err = |source| StoreError::Open { path: shown.clone(), source };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| StoreError::Unusable { path: shown.clone(), reason: format!("cannot create {}: {e}", parent.display()) })?;
        }
        let lock = lock(path)?;
        let conn = Connection::open(path).map_err(open_err)?;
        check_ownership(&conn, &shown)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(open_err)?;
        let ino = inode(path).map_err(|e| StoreError::Unusable { path: shown.clone(), reason: e.to_string() })?;
        let mut store = Store { conn, file: Some((path.to_path_buf(), ino)), _lock: Some(lock) };
        store.migrate()?;
        Ok(store)
    }

    /// Opens an existing store read-only, without the lock (to inspect a store a running
    /// coordinator holds: tests, tools). Every write fails.
    pub fn open_read_only(path: &Path) -> Result<Self> {
        use rusqlite::OpenFlags;
        let shown = path.display().to_string();
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(|source| StoreError::Open { path: shown.clone(), source })?;
        check_ownership(&conn, &shown)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(|source| StoreError::Open { path: shown, source })?;
        Ok(Store { conn, file: None, _lock: None })
    }

    /// An in-memory store, for tests.
    pub fn in_memory() -> Result<Self> {
        let mut store = Store { conn: Connection::open_in_memory()?, file: None, _lock: None };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<()> {
        let version: i64 = self.conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, sql) in schema::MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        self.conn.pragma_update(None, "application_id", schema::APPLICATION_ID)?;
        Ok(())
    }

    /// Schema version (number of migrations applied).
    pub fn schema_version(&self) -> Result<i64> {
        Ok(self.conn.pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    /// Runs `f` in one transaction: the scheduler's decisions land together or not at all.
    pub fn transaction<T>(&mut self, f: impl FnOnce(&Store) -> Result<T>) -> Result<T> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        match f(self) {
            Ok(v) => {
                self.conn.execute_batch("COMMIT")?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// A value of the `meta` table.
    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self.conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional()?)
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.conn.execute("INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2", params![key, value])?;
        Ok(())
    }

    /// Whether the store can still be written: the file is still the one opened (not deleted
    /// or replaced) and a write commits.
    ///
    /// # Errors
    /// [`StoreError::Unusable`] saying what is wrong.
    pub fn probe(&mut self) -> Result<()> {
        if let Some((path, ino)) = &self.file {
            match inode(path) {
                Ok(now) if now == *ino => {}
                Ok(_) => return Err(StoreError::Unusable { path: path.display().to_string(), reason: "the file was replaced under the running coordinator".into() }),
                Err(e) => return Err(StoreError::Unusable { path: path.display().to_string(), reason: format!("the file is gone: {e}") }),
            }
        }
        let at = now_ms().to_string();
        self.transaction(|s| s.set_meta("probe_ms", &at))
    }
}

/// Takes the exclusive lock on `PATH.lock` (created if needed; never removed, so two processes
/// always lock the same file).
fn lock(path: &Path) -> Result<std::fs::File> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let shown = path.display().to_string();
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StoreError::Unusable { path: shown.clone(), reason: format!("cannot open the lock file {}: {e}", lock_path.display()) })?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked { path: shown, lock: lock_path.display().to_string() }),
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Unusable { path: shown, reason: format!("cannot lock {}: {e}", lock_path.display()) }),
    }
}

/// Refuses a file that is another program's SQLite database (or not one at all), and a store
/// written by a newer liandan. An empty file, or a liandan store from before the application
/// id was set, is accepted.
fn check_ownership(conn: &Connection, path: &str) -> Result<()> {
    let foreign = |detail: String| StoreError::Foreign { path: path.to_string(), detail };
    let app: i64 = conn.pragma_query_value(None, "application_id", |r| r.get(0)).map_err(|e| match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::NotADatabase => foreign("the file is not an SQLite database".into()),
        other => StoreError::Open { path: path.to_string(), source: other },
    })?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let mut st = conn.prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")?;
    let tables: Vec<String> = st.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
    let known = schema::MIGRATIONS.len() as i64;
    if app == schema::APPLICATION_ID || (app == 0 && tables.is_empty()) {
        if version > known {
            return Err(StoreError::Unusable { path: path.to_string(), reason: format!("written by a newer liandan (schema version {version}; this one knows {known})") });
        }
        return Ok(());
    }
    let ours = ["jobs", "phases", "workers", "metrics", "checkpoints", "datasets"].iter().all(|t| tables.iter().any(|x| x == t));
    if app == 0 && ours && (1..=known).contains(&version) {
        return Ok(());
    }
    let mut listed = tables.iter().take(8).cloned().collect::<Vec<_>>().join(", ");
    if tables.len() > 8 {
        listed.push_str(", …");
    }
    Err(foreign(format!("an SQLite database of another program (application_id {app:#x}, user_version {version}, tables: {listed}); give --store a new path")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("liandan-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn one_coordinator_per_store() {
        let d = tmp("lock");
        let path = d.join("s.db");
        let first = Store::open(&path).unwrap();
        let e = Store::open(&path).unwrap_err().to_string();
        assert!(e.contains("another coordinator is using this store") && e.contains("s.db.lock"), "{e}");
        drop(first);
        Store::open(&path).expect("the lock is released with the store");
    }

    #[test]
    fn a_foreign_database_and_a_non_database_are_refused() {
        let d = tmp("foreign");
        let other = d.join("other.db");
        let c = Connection::open(&other).unwrap();
        c.execute_batch("CREATE TABLE recipes (name TEXT); INSERT INTO recipes VALUES ('dumplings');").unwrap();
        drop(c);
        let e = Store::open(&other).unwrap_err().to_string();
        assert!(e.contains("not a liandan store") && e.contains("another program") && e.contains("recipes"), "{e}");
        let c = Connection::open(&other).unwrap();
        let n: i64 = c.query_row("SELECT COUNT(*) FROM recipes", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 1, "the foreign file is left as it was");
        let text = d.join("notes.db");
        std::fs::write(&text, "this is a text file, not SQLite, and long enough to have a header").unwrap();
        let e = Store::open(&text).unwrap_err().to_string();
        assert!(e.contains("not an SQLite database"), "{e}");
    }

    #[test]
    fn the_probe_notices_a_deleted_store() {
        let d = tmp("probe");
        let path = d.join("s.db");
        let mut s = Store::open(&path).unwrap();
        s.probe().unwrap();
        std::fs::remove_file(&path).unwrap();
        let e = s.probe().unwrap_err().to_string();
        assert!(e.contains("the file is gone"), "{e}");
    }

    #[test]
    fn the_scheduler_s_frequent_queries_use_indexes() {
        let s = Store::in_memory().unwrap();
        for sql in [
            "SELECT id FROM workers WHERE state = 'idle'",
            "SELECT id FROM workers WHERE instance = 'x'",
            "SELECT id FROM workers WHERE job_id = 1 AND phase_idx = 0 AND generation = 2 ORDER BY rank",
            "SELECT idx FROM phases WHERE state = 'running'",
            "SELECT id FROM jobs WHERE state = 'queued'",
            "SELECT step FROM metrics WHERE job_id = 1 AND phase_idx = 0 ORDER BY step DESC LIMIT 20",
        ] {
            let mut st = s.conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let plan: Vec<String> = st.query_map([], |r| r.get::<_, String>(3)).unwrap().map(|r| r.unwrap()).collect();
            assert!(plan.iter().any(|p| p.contains("USING INDEX") || p.contains("USING PRIMARY KEY") || p.contains("USING COVERING INDEX")), "{sql}: {plan:?}");
            assert!(!plan.iter().any(|p| p.starts_with("SCAN")), "{sql} scans a table: {plan:?}");
        }
    }

    #[test]
    fn migrations_set_the_application_id() {
        let s = Store::in_memory().unwrap();
        assert_eq!(s.schema_version().unwrap(), schema::MIGRATIONS.len() as i64);
        let app: i64 = s.conn.pragma_query_value(None, "application_id", |r| r.get(0)).unwrap();
        assert_eq!(app, schema::APPLICATION_ID);
    }
}
