//! Jobs, their phases, per-step metrics, committed checkpoints and datasets.
//!
//! Metrics keep non-finite values: SQLite turns a NaN REAL into NULL, so NaN is stored as the
//! text `NaN` (infinities are REALs), and phase values are JSON in which non-finite numbers are
//! the strings `"NaN"`, `"inf"`, `"-inf"`. A diverged step is stored and shown as what it was.

use std::collections::BTreeMap;

use rusqlite::types::{Value, ValueRef};
use rusqlite::{OptionalExtension, params};

use super::{Result, Store, now_ms};

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
    /// The current generation's ring key, hex (given to its members with the assignment).
    pub ring_secret: String,
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
    pub values: BTreeMap<String, f64>,
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

const PHASE_COLS: &str = "job_id, idx, name, state, plan_json, total_steps, step, generation, world, min_workers, max_workers, checkpoint_dir, input_checkpoint, last_checkpoint, last_checkpoint_step, error, ring_secret";
const JOB_COLS: &str = "id, name, state, error, created_ms";
const METRIC_COLS: &str = "step, loss, lr, grad_norm, tokens, step_ms, world, generation, values_json";

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
        ring_secret: r.get(16)?,
    })
}

fn metric_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MetricRow> {
    Ok(MetricRow {
        step: r.get::<_, i64>(0)? as u64,
        loss: read_f64(r, 1)?,
        lr: read_f64(r, 2)?,
        grad_norm: read_f64(r, 3)?,
        tokens: r.get::<_, i64>(4)? as u64,
        step_ms: r.get::<_, i64>(5)? as u64,
        world: r.get::<_, i64>(6)? as u32,
        generation: r.get::<_, i64>(7)? as u64,
        values: decode_values(&r.get::<_, String>(8)?).map_err(|e| rusqlite::Error::FromSqlConversionFailure(8, rusqlite::types::Type::Text, e.into()))?,
    })
}

/// A float as SQLite keeps it: NaN as the text `NaN` (SQLite would make it NULL).
pub(crate) fn sql_f64(x: f64) -> Value {
    if x.is_nan() { Value::Text("NaN".into()) } else { Value::Real(x) }
}

pub(crate) fn read_f64(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<f64> {
    match r.get_ref(i)? {
        ValueRef::Real(x) => Ok(x),
        ValueRef::Integer(n) => Ok(n as f64),
        ValueRef::Text(b"NaN") => Ok(f64::NAN),
        other => Err(rusqlite::Error::InvalidColumnType(i, format!("metric column {i}"), other.data_type())),
    }
}

/// A non-finite number's JSON form in the store (and in the HTTP API).
pub fn non_finite_name(x: f64) -> Option<&'static str> {
    match x {
        _ if x.is_nan() => Some("NaN"),
        f64::INFINITY => Some("inf"),
        f64::NEG_INFINITY => Some("-inf"),
        _ => None,
    }
}

/// A float as JSON: a number, or the name of a non-finite value.
pub fn json_f64(x: f64) -> serde_json::Value {
    match non_finite_name(x) {
        Some(name) => serde_json::Value::from(name),
        None => serde_json::Value::from(x),
    }
}

pub(crate) fn encode_values(values: &BTreeMap<String, f64>) -> String {
    serde_json::Value::Object(values.iter().map(|(k, v)| (k.clone(), json_f64(*v))).collect()).to_string()
}

pub(crate) fn decode_values(text: &str) -> std::result::Result<BTreeMap<String, f64>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("values_json: {e}"))?;
    let serde_json::Value::Object(map) = v else { return Err("values_json is not an object".into()) };
    map.into_iter()
        .map(|(k, v)| {
            let x = match &v {
                serde_json::Value::Number(n) => n.as_f64(),
                serde_json::Value::String(s) => match s.as_str() {
                    "NaN" => Some(f64::NAN),
                    "inf" => Some(f64::INFINITY),
                    "-inf" => Some(f64::NEG_INFINITY),
                    _ => None,
                },
                _ => None,
            };
            x.map(|x| (k.clone(), x)).ok_or_else(|| format!("values_json.{k}: {v} is not a number"))
        })
        .collect()
}

impl Store {
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
        Ok(self.conn.query_row(&format!("SELECT {JOB_COLS} FROM jobs WHERE id = ?1"), [id as i64], job_row).optional()?)
    }

    /// Up to `limit` jobs older than job `before` (None: from the newest), newest first.
    pub fn jobs_page(&self, before: Option<u64>, limit: usize) -> Result<Vec<JobRow>> {
        let mut st = self.conn.prepare(&format!("SELECT {JOB_COLS} FROM jobs WHERE id < ?1 ORDER BY id DESC LIMIT ?2"))?;
        let rows = st.query_map(params![before.map_or(i64::MAX, |b| b as i64), limit as i64], job_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// How many jobs are in each state.
    pub fn job_counts(&self) -> Result<Vec<(String, u64)>> {
        let mut st = self.conn.prepare_cached("SELECT state, COUNT(*) FROM jobs GROUP BY state")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
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
        Ok(self
            .conn
            .prepare_cached(&format!("SELECT {PHASE_COLS} FROM phases WHERE job_id = ?1 AND idx = ?2"))?
            .query_row(params![job_id as i64, idx as i64], phase_row)
            .optional()?)
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
        self.conn
            .execute(&format!("UPDATE phases SET state = ?3, error = ?4, {time_col} = ?5 WHERE job_id = ?1 AND idx = ?2"), params![job_id as i64, idx as i64, state, error, now])?;
        Ok(())
    }

    /// Records a new group: generation, world size, the step it resumes from and the
    /// generation's ring key (hex).
    pub fn set_phase_group(&self, job_id: u64, idx: u32, generation: u64, world: u32, step: u64, ring_secret: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE phases SET generation = ?3, world = ?4, step = ?5, ring_secret = ?6 WHERE job_id = ?1 AND idx = ?2",
            params![job_id as i64, idx as i64, generation as i64, world as i64, step as i64, ring_secret],
        )?;
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
                sql_f64(m.loss),
                sql_f64(m.lr),
                sql_f64(m.grad_norm),
                m.tokens as i64,
                m.step_ms as i64,
                m.world as i64,
                m.generation as i64,
                now_ms() as i64,
                encode_values(&m.values)
            ],
        )?;
        Ok(n == 1)
    }

    /// The most recent `n` metrics of a phase, newest first.
    pub fn recent_metrics(&self, job_id: u64, idx: u32, n: usize) -> Result<Vec<MetricRow>> {
        let mut st = self.conn.prepare_cached(&format!("SELECT {METRIC_COLS} FROM metrics WHERE job_id = ?1 AND phase_idx = ?2 ORDER BY step DESC LIMIT ?3"))?;
        let rows = st.query_map(params![job_id as i64, idx as i64, n.min(i64::MAX as usize) as i64], metric_row)?;
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

    pub fn register_dataset(&self, path: &str, vocab_size: usize, train_tokens: u64, tokenizer_sha256: &str) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO datasets (path, vocab_size, train_tokens, tokenizer_sha256, registered_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![path, vocab_size as i64, train_tokens as i64, tokenizer_sha256, now_ms() as i64],
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotent_metrics_and_checkpoints() {
        let mut s = Store::in_memory().unwrap();
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
    fn non_finite_values_are_stored_and_read_back() {
        let mut s = Store::in_memory().unwrap();
        let id = s.insert_job("j", "toml", &[("pretrain".into(), "{}".into(), 10)], 1, 2, "/tmp/c").unwrap();
        let values = [("kl".to_string(), f64::INFINITY), ("reward".to_string(), f64::NAN), ("ok".to_string(), 1.5)].into_iter().collect();
        let m = MetricRow { step: 3, loss: f64::NAN, lr: 0.1, grad_norm: f64::INFINITY, tokens: 10, step_ms: 5, world: 1, generation: 1, values };
        assert!(s.insert_metric(id, 0, &m).unwrap());
        let back = &s.metrics(id, 0).unwrap()[0];
        assert!(back.loss.is_nan(), "NaN loss kept, not dropped");
        assert_eq!(back.grad_norm, f64::INFINITY);
        assert!(back.values["reward"].is_nan());
        assert_eq!((back.values["kl"], back.values["ok"]), (f64::INFINITY, 1.5));
    }

    #[test]
    fn pages_of_jobs_newest_first() {
        let mut s = Store::in_memory().unwrap();
        let ids: Vec<u64> = (0..5).map(|i| s.insert_job(&format!("j{i}"), "", &[], 1, 1, "/tmp").unwrap()).collect();
        let first = s.jobs_page(None, 2).unwrap();
        assert_eq!(first.iter().map(|j| j.id).collect::<Vec<_>>(), [ids[4], ids[3]]);
        let next = s.jobs_page(Some(ids[3]), 10).unwrap();
        assert_eq!(next.iter().map(|j| j.id).collect::<Vec<_>>(), [ids[2], ids[1], ids[0]]);
    }
}
