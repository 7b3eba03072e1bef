//! Optional per-op wall-clock accounting for benchmarks (`liandan bench train --profile`).
//! Off by default; when off, timing costs one branch per op call.
//!
//! With [`Peaks`] the profile also keeps each op's roofline: the least time its FLOPs and
//! memory traffic ([`Cost`]) can take at the device's peak compute and bandwidth,
//! `max(flops / peak FLOP/s, bytes / peak bytes/s)` per call, summed over the calls.

use std::time::{Duration, Instant};

/// The work of one op call: the FLOPs of its math (not of recomputation a kernel chooses to
/// do) and the bytes it must move between memory and the chip at least once (each operand
/// read once, each result written once, in the element types the op uses).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Cost {
    pub flops: f64,
    pub bytes: f64,
}

impl Cost {
    pub fn new(flops: f64, bytes: f64) -> Self {
        Cost { flops, bytes }
    }
}

impl std::ops::Add for Cost {
    type Output = Cost;
    fn add(self, o: Cost) -> Cost {
        Cost { flops: self.flops + o.flops, bytes: self.bytes + o.bytes }
    }
}

/// A device's peak compute (for the precision the matmuls run at) and memory bandwidth.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peaks {
    pub flops_per_s: f64,
    pub bytes_per_s: f64,
}

impl Peaks {
    /// The least time `cost` can take at these peaks, in seconds.
    pub fn bound(&self, cost: Cost) -> f64 {
        (cost.flops / self.flops_per_s).max(cost.bytes / self.bytes_per_s)
    }
}

/// One op's totals.
#[derive(Debug, Clone, PartialEq)]
pub struct OpEntry {
    pub op: &'static str,
    pub time: Duration,
    pub calls: u64,
    /// Σ of the calls' [`Cost`].
    pub cost: Cost,
    /// Σ of the calls' roofline time (seconds), when the profile has [`Peaks`].
    pub bound_s: f64,
}

/// Accumulated time per op name (`fwd.matmul`, `bwd.attention`, …), in first-seen order.
#[derive(Debug, Default, Clone)]
pub struct OpProfile {
    entries: Vec<OpEntry>,
    peaks: Option<Peaks>,
}

impl OpProfile {
    /// A profile that also sums each call's roofline at `peaks`.
    pub fn with_peaks(peaks: Peaks) -> Self {
        OpProfile { entries: Vec::new(), peaks: Some(peaks) }
    }

    pub fn peaks(&self) -> Option<Peaks> {
        self.peaks
    }

    pub fn add(&mut self, op: &'static str, d: Duration) {
        self.add_cost(op, d, Cost::default());
    }

    /// One call of `op` that took `d` and did `cost`.
    pub fn add_cost(&mut self, op: &'static str, d: Duration, cost: Cost) {
        let bound_s = self.peaks.map_or(0.0, |p| p.bound(cost));
        match self.entries.iter_mut().find(|e| e.op == op) {
            Some(e) => {
                e.time += d;
                e.calls += 1;
                e.cost = e.cost + cost;
                e.bound_s += bound_s;
            }
            None => self.entries.push(OpEntry { op, time: d, calls: 1, cost, bound_s }),
        }
    }

    /// Every op's totals, in first-seen order.
    pub fn entries(&self) -> &[OpEntry] {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_roofline_is_the_slower_of_compute_and_memory_per_call() {
        let peaks = Peaks { flops_per_s: 100.0, bytes_per_s: 10.0 };
        let mut p = OpProfile::with_peaks(peaks);
        // Compute-bound call: 1000 FLOPs take 10 s, 20 bytes 2 s.
        p.add_cost("mm", Duration::from_secs(20), Cost::new(1000.0, 20.0));
        // Memory-bound call of the same op: 100 bytes take 10 s.
        p.add_cost("mm", Duration::from_secs(30), Cost::new(10.0, 100.0));
        let e = &p.entries()[0];
        assert_eq!((e.calls, e.time), (2, Duration::from_secs(50)));
        assert_eq!(e.cost, Cost::new(1010.0, 120.0));
        // Per call, not from the totals (which would give max(10.1, 12) = 12).
        assert!((e.bound_s - 20.0).abs() < 1e-12, "{}", e.bound_s);
        let mut plain = OpProfile::default();
        plain.add("x", Duration::from_millis(1));
        assert_eq!(plain.entries()[0].bound_s, 0.0);
        assert_eq!(plain.peaks(), None);
    }
}
