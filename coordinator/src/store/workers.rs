//! Workers: registration (one row per worker process, found again by its instance id), group
//! membership (job, phase, rank, generation), death and pruning. Leases are not here: they live
//! in memory ([`crate::membership`]) and only a death is written.

use rusqlite::{OptionalExtension, params};

use super::{Result, Store, now_ms};

#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRow {
    pub id: u64,
    pub hostname: String,
    pub device: String,
    pub ring_address: String,
    /// idle | busy | draining | drained | dead
    pub state: String,
    /// Registration time, then the last heartbeat before the worker was declared dead.
    pub last_heartbeat_ms: u64,
    pub job_id: u64,
    pub phase_idx: u32,
    pub rank: u32,
    pub generation: u64,
    /// The worker process's instance id (its secret is derived from it and the worker id).
    pub instance: String,
    /// Memory the worker offers a phase, bytes (0: not reported).
    pub memory_bytes: u64,
}

/// What a worker says about itself when it registers.
#[derive(Debug, Clone, PartialEq)]
pub struct NewWorker {
    pub instance: String,
    pub hostname: String,
    pub device: String,
    pub ring_address: String,
    pub memory_bytes: u64,
}

const WORKER_COLS: &str = "id, hostname, device, ring_address, state, last_heartbeat_ms, job_id, phase_idx, rank, generation, instance, memory_bytes";

fn worker_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<WorkerRow> {
    Ok(WorkerRow {
        id: r.get::<_, i64>(0)? as u64,
        hostname: r.get(1)?,
        device: r.get(2)?,
        ring_address: r.get(3)?,
        state: r.get(4)?,
        last_heartbeat_ms: r.get::<_, i64>(5)? as u64,
        job_id: r.get::<_, i64>(6)? as u64,
        phase_idx: r.get::<_, i64>(7)? as u32,
        rank: r.get::<_, i64>(8)? as u32,
        generation: r.get::<_, i64>(9)? as u64,
        instance: r.get(10)?,
        memory_bytes: r.get::<_, i64>(11)? as u64,
    })
}

impl Store {
    /// Registers a worker process. A known instance keeps its row and id (a retried Register,
    /// or one after the coordinator said "register again"); a dead or drained one becomes idle.
    /// Returns the id and whether the row is new.
    pub fn register_worker(&self, w: &NewWorker) -> Result<(u64, bool)> {
        let now = now_ms() as i64;
        let known: Option<i64> = self.conn.query_row("SELECT id FROM workers WHERE instance = ?1 ORDER BY id LIMIT 1", [&w.instance], |r| r.get(0)).optional()?;
        if let Some(id) = known {
            self.conn.execute(
                "UPDATE workers SET hostname = ?2, device = ?3, ring_address = ?4, memory_bytes = ?5, last_heartbeat_ms = ?6, state = CASE WHEN state IN ('dead', 'drained') THEN 'idle' ELSE state END WHERE id = ?1",
                params![id, w.hostname, w.device, w.ring_address, w.memory_bytes as i64, now],
            )?;
            return Ok((id as u64, false));
        }
        self.conn.execute(
            "INSERT INTO workers (hostname, device, ring_address, state, lease_until_ms, last_heartbeat_ms, registered_ms, instance, memory_bytes) VALUES (?1, ?2, ?3, 'idle', 0, ?4, ?4, ?5, ?6)",
            params![w.hostname, w.device, w.ring_address, now, w.instance, w.memory_bytes as i64],
        )?;
        Ok((self.conn.last_insert_rowid() as u64, true))
    }

    pub fn worker(&self, id: u64) -> Result<Option<WorkerRow>> {
        Ok(self.conn.prepare_cached(&format!("SELECT {WORKER_COLS} FROM workers WHERE id = ?1"))?.query_row([id as i64], worker_row).optional()?)
    }

    /// Every worker by id (the scheduler's re-form; pages for everything user-facing).
    pub fn workers(&self) -> Result<Vec<WorkerRow>> {
        self.workers_page(None, usize::MAX >> 1)
    }

    /// Up to `limit` workers with ids above `after`, by id.
    pub fn workers_page(&self, after: Option<u64>, limit: usize) -> Result<Vec<WorkerRow>> {
        let mut st = self.conn.prepare_cached(&format!("SELECT {WORKER_COLS} FROM workers WHERE id > ?1 ORDER BY id LIMIT ?2"))?;
        let rows = st.query_map(params![after.unwrap_or(0) as i64, limit.min(i64::MAX as usize) as i64], worker_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Workers in `state`, by id.
    pub fn workers_in_state(&self, state: &str) -> Result<Vec<WorkerRow>> {
        let mut st = self.conn.prepare_cached(&format!("SELECT {WORKER_COLS} FROM workers WHERE state = ?1 ORDER BY id"))?;
        let rows = st.query_map([state], worker_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// How many workers are in each state.
    pub fn worker_counts(&self) -> Result<Vec<(String, u64)>> {
        let mut st = self.conn.prepare_cached("SELECT state, COUNT(*) FROM workers GROUP BY state")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The workers holding (job, phase, generation), by rank.
    pub fn group_members(&self, job_id: u64, idx: u32, generation: u64) -> Result<Vec<WorkerRow>> {
        let mut st = self.conn.prepare_cached(&format!("SELECT {WORKER_COLS} FROM workers WHERE job_id = ?1 AND phase_idx = ?2 AND generation = ?3 ORDER BY rank"))?;
        let rows = st.query_map(params![job_id as i64, idx as i64, generation as i64], worker_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Workers not declared dead, with their instance ids (a restarted coordinator gives them
    /// fresh leases).
    pub fn live_workers(&self) -> Result<Vec<(u64, String)>> {
        let mut st = self.conn.prepare("SELECT id, instance FROM workers WHERE state != 'dead' AND instance != '' ORDER BY id")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Declares a worker dead (its lease ran out at `last_heartbeat_ms`). Returns its row as it
    /// was, or None when it was already dead, drained or unknown.
    pub fn mark_dead(&self, id: u64, last_heartbeat_ms: u64) -> Result<Option<WorkerRow>> {
        let Some(w) = self.worker(id)? else { return Ok(None) };
        if matches!(w.state.as_str(), "dead" | "drained") {
            return Ok(None);
        }
        self.conn.execute("UPDATE workers SET state = 'dead', last_heartbeat_ms = ?2 WHERE id = ?1", params![id as i64, last_heartbeat_ms as i64])?;
        Ok(Some(w))
    }

    /// Deletes dead and drained workers last heard of before `before_ms`; returns how many.
    pub fn prune_workers(&self, before_ms: u64) -> Result<usize> {
        Ok(self.conn.execute("DELETE FROM workers WHERE state IN ('dead', 'drained') AND last_heartbeat_ms < ?1", [before_ms as i64])?)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(instance: &str) -> NewWorker {
        NewWorker { instance: instance.into(), hostname: "h".into(), device: "cpu".into(), ring_address: "127.0.0.1:1".into(), memory_bytes: 1 << 30 }
    }

    #[test]
    fn one_instance_is_one_worker() {
        let s = Store::in_memory().unwrap();
        let (a, fresh) = s.register_worker(&new("aaaa")).unwrap();
        assert!(fresh);
        let (again, fresh) = s.register_worker(&NewWorker { ring_address: "127.0.0.1:2".into(), ..new("aaaa") }).unwrap();
        assert_eq!((again, fresh), (a, false), "a retried Register is the same worker");
        assert_eq!(s.worker(a).unwrap().unwrap().ring_address, "127.0.0.1:2");
        let (b, _) = s.register_worker(&new("bbbb")).unwrap();
        assert_ne!(a, b);
        assert_eq!(s.workers().unwrap().len(), 2);
    }

    #[test]
    fn death_revival_and_pruning() {
        let s = Store::in_memory().unwrap();
        let (a, _) = s.register_worker(&new("aaaa")).unwrap();
        let (b, _) = s.register_worker(&new("bbbb")).unwrap();
        assert_eq!(s.mark_dead(a, 10).unwrap().map(|w| w.state), Some("idle".into()));
        assert_eq!(s.mark_dead(a, 10).unwrap(), None, "already dead");
        assert_eq!(s.live_workers().unwrap().iter().map(|w| w.0).collect::<Vec<_>>(), [b]);
        assert_eq!(s.register_worker(&new("aaaa")).unwrap(), (a, false), "a dead worker's process comes back as itself");
        assert_eq!(s.worker(a).unwrap().unwrap().state, "idle");
        s.mark_dead(a, 10).unwrap();
        assert_eq!(s.prune_workers(11).unwrap(), 1);
        assert_eq!(s.worker(a).unwrap(), None);
        assert_eq!(s.worker_counts().unwrap(), vec![("idle".to_string(), 1)]);
        assert_eq!(s.workers_page(Some(0), 10).unwrap().len(), 1);
    }
}
