//! The coordinator's state in SQLite (WAL mode, versioned migrations). Everything that matters
//! is here — jobs, phases, workers with their leases and group membership, per-step metrics,
//! committed checkpoints, datasets — so a restarted coordinator carries on where it stopped.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE jobs (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    spec_toml   TEXT NOT NULL,
    state       TEXT NOT NULL,          -- queued | running | succeeded | failed | cancelled
    error       TEXT NOT NULL DEFAULT '',
    created_ms  INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL
);
CREATE TABLE phases (
    job_id               INTEGER NOT NULL REFERENCES jobs(id),
    idx                  INTEGER NOT NULL,
    name                 TEXT NOT NULL,
    state                TEXT NOT NULL,  -- queued | running | succeeded | failed | cancelled
    plan_json            TEXT NOT NULL,
    total_steps          INTEGER NOT NULL,
    step                 INTEGER NOT NULL DEFAULT 0,
    generation           INTEGER NOT NULL DEFAULT 0,
    world                INTEGER NOT NULL DEFAULT 0,
    min_workers          INTEGER NOT NULL,
    max_workers          INTEGER NOT NULL,
    checkpoint_dir       TEXT NOT NULL,
    input_checkpoint     TEXT NOT NULL DEFAULT '',
    last_checkpoint      TEXT NOT NULL DEFAULT '',
    last_checkpoint_step INTEGER NOT NULL DEFAULT 0,
    error                TEXT NOT NULL DEFAULT '',
    started_ms           INTEGER NOT NULL DEFAULT 0,
    finished_ms          INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, idx)
);
CREATE TABLE workers (
    id                INTEGER PRIMARY KEY,
    hostname          TEXT NOT NULL,
    device            TEXT NOT NULL,
    ring_address      TEXT NOT NULL,
    state             TEXT NOT NULL,     -- idle | busy | draining | drained | dead
    lease_until_ms    INTEGER NOT NULL,
    last_heartbeat_ms INTEGER NOT NULL,
    job_id            INTEGER NOT NULL DEFAULT 0,
    phase_idx         INTEGER NOT NULL DEFAULT 0,
    rank              INTEGER NOT NULL DEFAULT 0,
    generation        INTEGER NOT NULL DEFAULT 0,
    registered_ms     INTEGER NOT NULL
);
CREATE TABLE metrics (
    job_id     INTEGER NOT NULL,
    phase_idx  INTEGER NOT NULL,
    step       INTEGER NOT NULL,
    loss       REAL NOT NULL,
    lr         REAL NOT NULL,
    grad_norm  REAL NOT NULL,
    tokens     INTEGER NOT NULL,
    step_ms    INTEGER NOT NULL,
    world      INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    at_ms      INTEGER NOT NULL,
    PRIMARY KEY (job_id, phase_idx, step)
);
CREATE TABLE checkpoints (
    job_id       INTEGER NOT NULL,
    phase_idx    INTEGER NOT NULL,
    step         INTEGER NOT NULL,
    path         TEXT NOT NULL,
    generation   INTEGER NOT NULL,
    committed_ms INTEGER NOT NULL,
    PRIMARY KEY (job_id, phase_idx, step)
);
CREATE TABLE datasets (
    path            TEXT PRIMARY KEY,
    vocab_size      INTEGER NOT NULL,
    train_tokens    INTEGER NOT NULL,
    tokenizer_sha256 TEXT NOT NULL,
    registered_ms   INTEGER NOT NULL
);
"#, r#"
ALTER TABLE metrics ADD COLUMN values_json TEXT NOT NULL DEFAULT '{}';
"#, r#"
CREATE TABLE comparisons (
    id          INTEGER PRIMARY KEY,
    job_id      INTEGER NOT NULL,
    prompt      TEXT NOT NULL,
    task        TEXT NOT NULL DEFAULT '',
    answer_a    TEXT NOT NULL,
    answer_b    TEXT NOT NULL,
    checkpoint  TEXT NOT NULL,
    choice      TEXT NOT NULL DEFAULT '',
    labeler     TEXT NOT NULL DEFAULT '',
    created_ms  INTEGER NOT NULL,
    answered_ms INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX comparisons_open ON comparisons (job_id, choice);
"#];

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Open { path: String, source: rusqlite::Error },
    #[error("store: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A file the coordinator writes from the store (exported comparisons).
    #[error("{0}")]
    Io(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub id: u64,
    pub name: String,
    pub state: String,
    pub error: String,
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PhaseRow {
    pub job_id: u64,
    pub idx: u32,
    pub name: String,
    pub state: String,
    pub plan_json: String,
    pub total_steps: u64,
    pub step: u64,
    pub generation: u64,
    pub world: u32,
    pub min_workers: u32,
    pub max_workers: u32,
    pub checkpoint_dir: String,
    pub input_checkpoint: String,
    pub last_checkpoint: String,
    pub last_checkpoint_step: u64,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRow {
    pub id: u64,
    pub hostname: String,
    pub device: String,
    pub ring_address: String,
    pub state: String,
    pub lease_until_ms: u64,
    pub last_heartbeat_ms: u64,
    pub job_id: u64,
    pub phase_idx: u32,
    pub rank: u32,
    pub generation: u64,
}

/// A step's metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricRow {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    pub step_ms: u64,
    pub world: u32,
    pub generation: u64,
    /// Phase-specific values (ppo: reward, kl, …), by name.
    pub values: std::collections::BTreeMap<String, f64>,
}

/// A comparison to store: a prompt and two sampled answers.
#[derive(Debug, Clone, PartialEq)]
pub struct NewComparison {
    pub job_id: u64,
    pub prompt: String,
    pub task: String,
    pub answer_a: String,
    pub answer_b: String,
    /// The checkpoint that sampled the answers.
    pub checkpoint: String,
}

/// A stored comparison; `choice` is `""` until labelled, then `a`, `b`, `tie` or `skip`.
#[derive(Debug, Clone, PartialEq)]
pub struct ComparisonRow {
    pub id: u64,
    pub new: NewComparison,
    pub choice: String,
    pub labeler: String,
}

const COMPARISON_COLS: &str = "id, job_id, prompt, task, answer_a, answer_b, checkpoint, choice, labeler";

fn comparison_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ComparisonRow> {
    Ok(ComparisonRow {
        id: r.get::<_, i64>(0)? as u64,
        new: NewComparison { job_id: r.get::<_, i64>(1)? as u64, prompt: r.get(2)?, task: r.get(3)?, answer_a: r.get(4)?, answer_b: r.get(5)?, checkpoint: r.get(6)? },
        choice: r.get(7)?,
        labeler: r.get(8)?,
    })
}

/// The SQLite store.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

const PHASE_COLS: &str = "job_id, idx, name, state, plan_json, total_steps, step, generation, world, min_workers, max_workers, checkpoint_dir, input_checkpoint, last_checkpoint, last_checkpoint_step, error";
const WORKER_COLS: &str = "id, hostname, device, ring_address, state, lease_until_ms, last_heartbeat_ms, job_id, phase_idx, rank, generation";

fn job_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    Ok(JobRow { id: r.get::<_, i64>(0)? as u64, name: r.get(1)?, state: r.get(2)?, error: r.get(3)?, created_ms: r.get::<_, i64>(4)? as u64 })
}

fn phase_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PhaseRow> {
    Ok(PhaseRow {
        job_id: r.get::<_, i64>(0)? as u64,
        idx: r.get::<_, i64>(1)? as u32,
        name: r.get(2)?,
        state: r.get(3)?,
        plan_json: r.get(4)?,
        total_steps: r.get::<_, i64>(5)? as u64,
        step: r.get::<_, i64>(6)? as u64,
        generation: r.get::<_, i64>(7)? as u64,
        world: r.get::<_, i64>(8)? as u32,
        min_workers: r.get::<_, i64>(9)? as u32,
        max_workers: r.get::<_, i64>(10)? as u32,
        checkpoint_dir: r.get(11)?,
        input_checkpoint: r.get(12)?,
        last_checkpoint: r.get(13)?,
        last_checkpoint_step: r.get::<_, i64>(14)? as u64,
        error: r.get(15)?,
    })
}

fn worker_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<WorkerRow> {
    Ok(WorkerRow {
        id: r.get::<_, i64>(0)? as u64,
        hostname: r.get(1)?,
        device: r.get(2)?,
        ring_address: r.get(3)?,
        state: r.get(4)?,
        lease_until_ms: r.get::<_, i64>(5)? as u64,
        last_heartbeat_ms: r.get::<_, i64>(6)? as u64,
        job_id: r.get::<_, i64>(7)? as u64,
        phase_idx: r.get::<_, i64>(8)? as u32,
        rank: r.get::<_, i64>(9)? as u32,
        generation: r.get::<_, i64>(10)? as u64,
    })
}

impl Store {
    /// Opens (creating if needed) the store at `path` and runs pending migrations.
    pub fn open(path: &Path) -> Result<Self> {
        let open_err = |source| StoreError::Open { path: path.display().to_string(), source };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| open_err(rusqlite::Error::InvalidPath(parent.join(e.to_string()))))?;
        }
        let conn = Connection::open(path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(open_err)?;
        let mut store = Store { conn };
        store.migrate()?;
        Ok(store)
    }

    /// An in-memory store, for tests.
    pub fn in_memory() -> Result<Self> {
        let mut store = Store { conn: Connection::open_in_memory()? };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<()> {
        let version: i64 = self.conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
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

    // ---- jobs and phases ----

    /// Inserts a job and its phases (queued). `phases` are `(name, plan_json, steps)`.
    pub fn insert_job(&mut self, name: &str, spec_toml: &str, phases: &[(String, String, u64)], min_workers: u32, max_workers: u32, checkpoint_root: &str) -> Result<u64> {
        self.transaction(|s| {
            let now = now_ms() as i64;
            s.conn.execute("INSERT INTO jobs (name, spec_toml, state, created_ms, updated_ms) VALUES (?1, ?2, 'queued', ?3, ?3)", params![name, spec_toml, now])?;
            let id = s.conn.last_insert_rowid();
            for (i, (pname, plan, steps)) in phases.iter().enumerate() {
                let dir = format!("{checkpoint_root}/job-{id}/{i}-{pname}");
                s.conn.execute(
                    "INSERT INTO phases (job_id, idx, name, state, plan_json, total_steps, min_workers, max_workers, checkpoint_dir) VALUES (?1, ?2, ?3, 'queued', ?4, ?5, ?6, ?7, ?8)",
                    params![id, i as i64, pname, plan, *steps as i64, min_workers, max_workers, dir],
                )?;
            }
            Ok(id as u64)
        })
    }

    pub fn job(&self, id: u64) -> Result<Option<JobRow>> {
        Ok(self
            .conn
            .query_row("SELECT id, name, state, error, created_ms FROM jobs WHERE id = ?1", [id as i64], job_row)
            .optional()?)
    }

    pub fn jobs(&self) -> Result<Vec<JobRow>> {
        let mut st = self.conn.prepare("SELECT id, name, state, error, created_ms FROM jobs ORDER BY id DESC")?;
        let rows = st.query_map([], job_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn jobs_in_state(&self, state: &str) -> Result<Vec<u64>> {
        let mut st = self.conn.prepare("SELECT id FROM jobs WHERE state = ?1 ORDER BY id")?;
        let rows = st.query_map([state], |r| r.get::<_, i64>(0))?;
        Ok(rows.map(|r| r.map(|v| v as u64)).collect::<rusqlite::Result<_>>()?)
    }

    pub fn set_job_state(&self, id: u64, state: &str, error: &str) -> Result<()> {
        self.conn.execute("UPDATE jobs SET state = ?2, error = ?3, updated_ms = ?4 WHERE id = ?1", params![id as i64, state, error, now_ms() as i64])?;
        Ok(())
    }

    pub fn phases(&self, job_id: u64) -> Result<Vec<PhaseRow>> {
        let mut st = self.conn.prepare(&format!("SELECT {PHASE_COLS} FROM phases WHERE job_id = ?1 ORDER BY idx"))?;
        let rows = st.query_map([job_id as i64], phase_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn phase(&self, job_id: u64, idx: u32) -> Result<Option<PhaseRow>> {
        Ok(self.conn.query_row(&format!("SELECT {PHASE_COLS} FROM phases WHERE job_id = ?1 AND idx = ?2"), params![job_id as i64, idx as i64], phase_row).optional()?)
    }

    pub fn running_phases(&self) -> Result<Vec<PhaseRow>> {
        let mut st = self.conn.prepare(&format!("SELECT {PHASE_COLS} FROM phases WHERE state = 'running' ORDER BY job_id, idx"))?;
        let rows = st.query_map([], phase_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Sets a phase's state (and times), keeping the rest.
    pub fn set_phase_state(&self, job_id: u64, idx: u32, state: &str, error: &str) -> Result<()> {
        let now = now_ms() as i64;
        let time_col = if state == "running" { "started_ms" } else { "finished_ms" };
        self.conn.execute(&format!("UPDATE phases SET state = ?3, error = ?4, {time_col} = ?5 WHERE job_id = ?1 AND idx = ?2"), params![job_id as i64, idx as i64, state, error, now])?;
        Ok(())
    }

    /// Records a new group: generation, world size, and the step it resumes from.
    pub fn set_phase_group(&self, job_id: u64, idx: u32, generation: u64, world: u32, step: u64) -> Result<()> {
        self.conn.execute("UPDATE phases SET generation = ?3, world = ?4, step = ?5 WHERE job_id = ?1 AND idx = ?2", params![job_id as i64, idx as i64, generation as i64, world as i64, step as i64])?;
        Ok(())
    }

    pub fn set_phase_input(&self, job_id: u64, idx: u32, checkpoint: &str) -> Result<()> {
        self.conn.execute("UPDATE phases SET input_checkpoint = ?3 WHERE job_id = ?1 AND idx = ?2", params![job_id as i64, idx as i64, checkpoint])?;
        Ok(())
    }

    /// Advances a phase's progress to `step` (never backwards).
    pub fn advance_phase(&self, job_id: u64, idx: u32, step: u64) -> Result<()> {
        self.conn.execute("UPDATE phases SET step = MAX(step, ?3) WHERE job_id = ?1 AND idx = ?2", params![job_id as i64, idx as i64, step as i64])?;
        Ok(())
    }

    // ---- metrics and checkpoints ----

    /// Records a step's metrics; a replayed step is ignored. Returns whether it was new.
    pub fn insert_metric(&self, job_id: u64, idx: u32, m: &MetricRow) -> Result<bool> {
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO metrics (job_id, phase_idx, step, loss, lr, grad_norm, tokens, step_ms, world, generation, at_ms, values_json) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                job_id as i64,
                idx as i64,
                m.step as i64,
                m.loss,
                m.lr,
                m.grad_norm,
                m.tokens as i64,
                m.step_ms as i64,
                m.world as i64,
                m.generation as i64,
                now_ms() as i64,
                serde_json::to_string(&m.values).unwrap_or_else(|_| "{}".into())
            ],
        )?;
        Ok(n == 1)
    }

    /// The most recent `n` metrics of a phase, newest first.
    pub fn recent_metrics(&self, job_id: u64, idx: u32, n: usize) -> Result<Vec<MetricRow>> {
        let mut st = self.conn.prepare("SELECT step, loss, lr, grad_norm, tokens, step_ms, world, generation, values_json FROM metrics WHERE job_id = ?1 AND phase_idx = ?2 ORDER BY step DESC LIMIT ?3")?;
        let rows = st.query_map(params![job_id as i64, idx as i64, n as i64], |r| {
            Ok(MetricRow {
                step: r.get::<_, i64>(0)? as u64,
                loss: r.get(1)?,
                lr: r.get(2)?,
                grad_norm: r.get(3)?,
                tokens: r.get::<_, i64>(4)? as u64,
                step_ms: r.get::<_, i64>(5)? as u64,
                world: r.get::<_, i64>(6)? as u32,
                generation: r.get::<_, i64>(7)? as u64,
                // Written by this store from a map of numbers; unreadable JSON reads as none.
                values: serde_json::from_str(&r.get::<_, String>(8)?).unwrap_or_default(),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every metric of a phase in step order.
    pub fn metrics(&self, job_id: u64, idx: u32) -> Result<Vec<MetricRow>> {
        let mut v = self.recent_metrics(job_id, idx, usize::MAX >> 1)?;
        v.reverse();
        Ok(v)
    }

    /// Deletes metrics of steps after `step` (they will be computed again after a re-form).
    pub fn delete_metrics_after(&self, job_id: u64, idx: u32, step: u64) -> Result<()> {
        self.conn.execute("DELETE FROM metrics WHERE job_id = ?1 AND phase_idx = ?2 AND step > ?3", params![job_id as i64, idx as i64, step as i64])?;
        Ok(())
    }

    /// Commits a checkpoint as the phase's resume point (idempotent per step).
    pub fn commit_checkpoint(&self, job_id: u64, idx: u32, step: u64, path: &str, generation: u64) -> Result<()> {
        self.conn.execute(
            "INSERT OR IGNORE INTO checkpoints (job_id, phase_idx, step, path, generation, committed_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![job_id as i64, idx as i64, step as i64, path, generation as i64, now_ms() as i64],
        )?;
        self.conn.execute(
            "UPDATE phases SET last_checkpoint = ?3, last_checkpoint_step = ?4 WHERE job_id = ?1 AND idx = ?2 AND last_checkpoint_step <= ?4",
            params![job_id as i64, idx as i64, path, step as i64],
        )?;
        Ok(())
    }

    // ---- human comparisons ----

    /// Stores a new comparison to label; returns its id.
    pub fn insert_comparison(&self, c: &NewComparison) -> Result<u64> {
        self.conn.execute(
            "INSERT INTO comparisons (job_id, prompt, task, answer_a, answer_b, checkpoint, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![c.job_id as i64, c.prompt, c.task, c.answer_a, c.answer_b, c.checkpoint, now_ms() as i64],
        )?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    pub fn comparison(&self, id: u64) -> Result<Option<ComparisonRow>> {
        Ok(self.conn.query_row(&format!("SELECT {COMPARISON_COLS} FROM comparisons WHERE id = ?1"), [id as i64], comparison_row).optional()?)
    }

    /// The oldest comparison of a job nobody has labelled yet.
    pub fn open_comparison(&self, job_id: u64) -> Result<Option<ComparisonRow>> {
        Ok(self
            .conn
            .query_row(&format!("SELECT {COMPARISON_COLS} FROM comparisons WHERE job_id = ?1 AND choice = '' ORDER BY id LIMIT 1"), [job_id as i64], comparison_row)
            .optional()?)
    }

    /// Records a label (`a`, `b`, `tie`, `skip`) on an open comparison. Returns false when the
    /// comparison was already labelled (nothing changes then).
    pub fn label_comparison(&self, id: u64, choice: &str, labeler: &str) -> Result<bool> {
        let n = self.conn.execute(
            "UPDATE comparisons SET choice = ?2, labeler = ?3, answered_ms = ?4 WHERE id = ?1 AND choice = ''",
            params![id as i64, choice, labeler, now_ms() as i64],
        )?;
        Ok(n == 1)
    }

    /// Every labelled comparison with a winner (`a` or `b`), oldest first.
    pub fn decided_comparisons(&self) -> Result<Vec<ComparisonRow>> {
        let mut st = self.conn.prepare(&format!("SELECT {COMPARISON_COLS} FROM comparisons WHERE choice IN ('a', 'b') ORDER BY id"))?;
        let rows = st.query_map([], comparison_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Comparisons of a job: `(total, labelled)`.
    pub fn comparison_counts(&self, job_id: u64) -> Result<(u64, u64)> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(choice != ''), 0) FROM comparisons WHERE job_id = ?1",
            [job_id as i64],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )?)
    }

    pub fn register_dataset(&self, path: &str, vocab_size: usize, train_tokens: u64, tokenizer_sha256: &str) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO datasets (path, vocab_size, train_tokens, tokenizer_sha256, registered_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![path, vocab_size as i64, train_tokens as i64, tokenizer_sha256, now_ms() as i64],
        )?;
        Ok(())
    }

    // ---- workers ----

    /// Registers a worker (or re-registers `previous_id` if known) as idle with a fresh lease.
    pub fn register_worker(&self, previous_id: u64, hostname: &str, device: &str, ring_address: &str, lease_ms: u64) -> Result<u64> {
        let now = now_ms();
        if previous_id != 0 && self.worker(previous_id)?.is_some() {
            self.conn.execute(
                "UPDATE workers SET hostname = ?2, device = ?3, ring_address = ?4, lease_until_ms = ?5, last_heartbeat_ms = ?6, state = CASE WHEN state IN ('dead', 'drained') THEN 'idle' ELSE state END WHERE id = ?1",
                params![previous_id as i64, hostname, device, ring_address, (now + lease_ms) as i64, now as i64],
            )?;
            return Ok(previous_id);
        }
        self.conn.execute(
            "INSERT INTO workers (hostname, device, ring_address, state, lease_until_ms, last_heartbeat_ms, registered_ms) VALUES (?1, ?2, ?3, 'idle', ?4, ?5, ?5)",
            params![hostname, device, ring_address, (now + lease_ms) as i64, now as i64],
        )?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    pub fn worker(&self, id: u64) -> Result<Option<WorkerRow>> {
        Ok(self.conn.query_row(&format!("SELECT {WORKER_COLS} FROM workers WHERE id = ?1"), [id as i64], worker_row).optional()?)
    }

    pub fn workers(&self) -> Result<Vec<WorkerRow>> {
        let mut st = self.conn.prepare(&format!("SELECT {WORKER_COLS} FROM workers ORDER BY id"))?;
        let rows = st.query_map([], worker_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Renews a worker's lease. Returns the row (None for an unknown id).
    pub fn heartbeat(&self, id: u64, lease_ms: u64) -> Result<Option<WorkerRow>> {
        let now = now_ms();
        self.conn.execute(
            "UPDATE workers SET lease_until_ms = ?2, last_heartbeat_ms = ?3 WHERE id = ?1 AND state NOT IN ('dead')",
            params![id as i64, (now + lease_ms) as i64, now as i64],
        )?;
        self.worker(id)
    }

    /// Gives every live worker a fresh lease (after a coordinator restart, so workers are not
    /// declared dead for the coordinator's own downtime).
    pub fn renew_all_leases(&self, lease_ms: u64) -> Result<()> {
        self.conn.execute("UPDATE workers SET lease_until_ms = ?1 WHERE state NOT IN ('dead', 'drained')", [(now_ms() + lease_ms) as i64])?;
        Ok(())
    }

    /// Marks workers whose lease ran out as dead; returns them.
    pub fn expire_workers(&self) -> Result<Vec<WorkerRow>> {
        let now = now_ms() as i64;
        let mut st = self.conn.prepare(&format!("SELECT {WORKER_COLS} FROM workers WHERE lease_until_ms < ?1 AND state NOT IN ('dead', 'drained')"))?;
        let dead: Vec<WorkerRow> = st.query_map([now], worker_row)?.collect::<rusqlite::Result<_>>()?;
        for w in &dead {
            self.conn.execute("UPDATE workers SET state = 'dead' WHERE id = ?1", [w.id as i64])?;
        }
        Ok(dead)
    }

    pub fn set_worker_state(&self, id: u64, state: &str) -> Result<()> {
        self.conn.execute("UPDATE workers SET state = ?2 WHERE id = ?1", params![id as i64, state])?;
        Ok(())
    }

    /// Puts a worker in a group (busy) or takes it out (`job_id` 0: idle).
    pub fn assign_worker(&self, id: u64, job_id: u64, idx: u32, rank: u32, generation: u64) -> Result<()> {
        let state = if job_id == 0 { "idle" } else { "busy" };
        self.conn.execute(
            "UPDATE workers SET job_id = ?2, phase_idx = ?3, rank = ?4, generation = ?5, state = CASE WHEN state = 'draining' THEN 'draining' ELSE ?6 END WHERE id = ?1",
            params![id as i64, job_id as i64, idx as i64, rank as i64, generation as i64, state],
        )?;
        Ok(())
    }

    /// Every committed checkpoint of a job, by phase and step (the dashboard's lineage view).
    pub fn checkpoints(&self, job_id: u64) -> Result<Vec<CheckpointRow>> {
        let mut st = self.conn.prepare("SELECT phase_idx, step, path, generation, committed_ms FROM checkpoints WHERE job_id = ?1 ORDER BY phase_idx, step")?;
        let rows = st.query_map(params![job_id as i64], |r| {
            Ok(CheckpointRow {
                phase_idx: r.get::<_, i64>(0)? as u32,
                step: r.get::<_, i64>(1)? as u64,
                path: r.get(2)?,
                generation: r.get::<_, i64>(3)? as u64,
                committed_ms: r.get::<_, i64>(4)? as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

/// A committed checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointRow {
    pub phase_idx: u32,
    pub step: u64,
    pub path: String,
    pub generation: u64,
    pub committed_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_and_idempotent_metrics() {
        let mut s = Store::in_memory().unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
        let id = s.insert_job("j", "toml", &[("pretrain".into(), "{}".into(), 10)], 1, 2, "/tmp/c").unwrap();
        let values = [("kl".to_string(), 0.25)].into_iter().collect();
        let m = MetricRow { step: 1, loss: 2.0, lr: 0.1, grad_norm: 1.0, tokens: 10, step_ms: 5, world: 1, generation: 1, values };
        assert!(s.insert_metric(id, 0, &m).unwrap());
        assert!(!s.insert_metric(id, 0, &MetricRow { loss: 9.0, ..m.clone() }).unwrap(), "a replayed step is a no-op");
        assert_eq!(s.metrics(id, 0).unwrap()[0].loss, 2.0);
        assert_eq!(s.metrics(id, 0).unwrap()[0].values["kl"], 0.25, "phase-specific values round-trip");
        s.commit_checkpoint(id, 0, 5, "/c/5", 1).unwrap();
        s.commit_checkpoint(id, 0, 3, "/c/3", 1).unwrap();
        assert_eq!(s.phase(id, 0).unwrap().unwrap().last_checkpoint, "/c/5", "an older commit never moves the resume point back");
        assert_eq!(s.checkpoints(id).unwrap().iter().map(|c| c.step).collect::<Vec<_>>(), [3, 5]);
    }

    #[test]
    fn a_comparison_is_labelled_once() {
        let s = Store::in_memory().unwrap();
        let c = NewComparison { job_id: 4, prompt: "p".into(), task: "poem".into(), answer_a: "a".into(), answer_b: "b".into(), checkpoint: "/c".into() };
        let id = s.insert_comparison(&c).unwrap();
        assert_eq!(s.open_comparison(4).unwrap().unwrap().id, id);
        assert!(s.label_comparison(id, "b", "ann").unwrap());
        assert!(!s.label_comparison(id, "a", "bob").unwrap(), "a second label is refused");
        let row = s.comparison(id).unwrap().unwrap();
        assert_eq!((row.choice.as_str(), row.labeler.as_str()), ("b", "ann"));
        assert_eq!(s.open_comparison(4).unwrap(), None);
        assert_eq!(s.comparison_counts(4).unwrap(), (1, 1));
        assert_eq!(s.decided_comparisons().unwrap().len(), 1);
    }

    #[test]
    fn leases_expire() {
        let s = Store::in_memory().unwrap();
        let a = s.register_worker(0, "h", "cpu", "127.0.0.1:1", 0).unwrap();
        let b = s.register_worker(0, "h", "cpu", "127.0.0.1:2", 60_000).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let dead = s.expire_workers().unwrap();
        assert_eq!(dead.iter().map(|w| w.id).collect::<Vec<_>>(), [a]);
        assert_eq!(s.worker(b).unwrap().unwrap().state, "idle");
        assert_eq!(s.register_worker(a, "h", "cpu", "x", 1000).unwrap(), a, "a known id re-registers");
        assert_eq!(s.worker(a).unwrap().unwrap().state, "idle");
    }
}
