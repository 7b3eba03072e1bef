//! Comparisons of two sampled answers, labelled once by a person.

use rusqlite::{OptionalExtension, params};

use super::{Result, Store, now_ms};

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

impl Store {
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
        let n = self
            .conn
            .execute("UPDATE comparisons SET choice = ?2, labeler = ?3, answered_ms = ?4 WHERE id = ?1 AND choice = ''", params![id as i64, choice, labeler, now_ms() as i64])?;
        Ok(n == 1)
    }

    /// Every labelled comparison with a winner (`a` or `b`), oldest first.
    /// Up to `limit` of them with ids above `after`, so an export never holds them all.
    pub fn decided_comparisons(&self, after: u64, limit: usize) -> Result<Vec<ComparisonRow>> {
        let mut st = self.conn.prepare_cached(&format!("SELECT {COMPARISON_COLS} FROM comparisons WHERE choice IN ('a', 'b') AND id > ?1 ORDER BY id LIMIT ?2"))?;
        let rows = st.query_map(params![after as i64, limit.min(i64::MAX as usize) as i64], comparison_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Comparisons of a job: `(total, labelled)`.
    pub fn comparison_counts(&self, job_id: u64) -> Result<(u64, u64)> {
        Ok(self.conn.query_row("SELECT COUNT(*), COALESCE(SUM(choice != ''), 0) FROM comparisons WHERE job_id = ?1", [job_id as i64], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
        })?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(s.decided_comparisons(0, 10).unwrap().len(), 1);
        assert!(s.decided_comparisons(id, 10).unwrap().is_empty());
    }
}
