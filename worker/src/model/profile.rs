//! Optional per-op wall-clock accounting for benchmarks (`liandan bench train --profile`).
//! Off by default; when off, timing costs one branch per op call.

use std::time::{Duration, Instant};

/// Accumulated time per op name (`fwd.matmul`, `bwd.attention`, …), in first-seen order.
#[derive(Debug, Default, Clone)]
pub struct OpProfile {
    entries: Vec<(&'static str, Duration, u64)>,
}

impl OpProfile {
    pub fn add(&mut self, op: &'static str, d: Duration) {
        match self.entries.iter_mut().find(|e| e.0 == op) {
            Some(e) => {
                e.1 += d;
                e.2 += 1;
            }
            None => self.entries.push((op, d, 1)),
        }
    }

    /// `(op, total time, calls)` in first-seen order.
    pub fn entries(&self) -> &[(&'static str, Duration, u64)] {
        &self.entries
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

/// Runs `f`, charging its wall time to `op` when profiling is on.
#[inline]
pub fn timed<R>(prof: &mut Option<OpProfile>, op: &'static str, f: impl FnOnce() -> R) -> R {
    match prof {
        None => f(),
        Some(p) => {
            let t = Instant::now();
            let r = f();
            p.add(op, t.elapsed());
            r
        }
    }
}
