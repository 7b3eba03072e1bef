//! The sample ledger: which training sequences each rank reads at each step.
//!
//! The training split is cut into sequences of `T + 1` tokens at multiples of `T` (the extra
//! token is the last target). Step `s` consumes global samples `[s·B, (s+1)·B)` of a seeded
//! permutation of the epoch's sequences (`B` is the global batch); rank `r` of `w` takes the
//! contiguous share `[⌊r·B/w⌋, ⌊(r+1)·B/w⌋)`. The ledger is a pure function of
//! `(seed, step, rank, world)`, so a checkpoint's step is the whole data cursor: after any change
//! of world size the group continues exactly where it stopped, no sample skipped, none twice.

use crate::rng::Rng;

/// Sequences of one epoch and their permutation.
#[derive(Debug, Clone)]
pub struct Ledger {
    n_seq: usize,
    /// Tokens between the starts of consecutive sequences.
    stride: usize,
    global_batch: usize,
    seed: u64,
    /// Permutation of the epoch cached last.
    cached: Option<(u64, Vec<u32>)>,
}

impl Ledger {
    /// A ledger over `train_tokens` tokens. `None` if not even one sequence fits.
    pub fn new(train_tokens: usize, seq_len: usize, global_batch: usize, seed: u64) -> Option<Self> {
        let n_seq = train_tokens.saturating_sub(1) / seq_len.max(1);
        (n_seq > 0 && global_batch > 0).then_some(Ledger { n_seq, stride: seq_len, global_batch, seed, cached: None })
    }

    /// A ledger over `rows` prepared rows of `row_len` tokens each, stored back to back (packed
    /// SFT examples). `None` if there are no rows.
    pub fn over_rows(rows: usize, row_len: usize, global_batch: usize, seed: u64) -> Option<Self> {
        (rows > 0 && global_batch > 0).then_some(Ledger { n_seq: rows, stride: row_len, global_batch, seed, cached: None })
    }

    /// Sequences per epoch.
    pub fn sequences(&self) -> usize {
        self.n_seq
    }

    /// The half-open range of the step's global batch that `rank` of `world` takes.
    pub fn share(global_batch: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
        (rank * global_batch / world)..((rank + 1) * global_batch / world)
    }

    /// Start offsets (in tokens) of the sequences `rank` reads at `step`.
    pub fn rank_offsets(&mut self, step: u64, rank: usize, world: usize) -> Vec<usize> {
        Self::share(self.global_batch, rank, world).map(|j| self.sequence(step * self.global_batch as u64 + j as u64) * self.stride).collect()
    }

    /// Start offsets of the whole global batch of `step` (every rank can compute the global loss
    /// denominator from them).
    pub fn step_offsets(&mut self, step: u64) -> Vec<usize> {
        self.rank_offsets(step, 0, 1)
    }

    /// The sequence index of global sample `g`.
    fn sequence(&mut self, g: u64) -> usize {
        let epoch = g / self.n_seq as u64;
        let within = (g % self.n_seq as u64) as usize;
        if self.cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut perm: Vec<u32> = (0..self.n_seq as u32).collect();
            let mut rng = Rng::new(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for i in (1..perm.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                perm.swap(i, j);
            }
            self.cached = Some((epoch, perm));
        }
        // The cache was filled just above for this epoch.
        self.cached.as_ref().map_or(within, |(_, p)| p[within] as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_the_global_batch_once_for_any_world() {
        let mut l = Ledger::new(10_000, 10, 7, 3).unwrap();
        let all: Vec<usize> = l.rank_offsets(5, 0, 1);
        for world in 1..=7 {
            let mut union = Vec::new();
            for r in 0..world {
                union.extend(l.rank_offsets(5, r, world));
            }
            assert_eq!(union, all, "world {world}");
        }
    }

    #[test]
    fn an_epoch_visits_every_sequence_once() {
        let mut l = Ledger::new(1001, 10, 4, 9).unwrap();
        assert_eq!(l.sequences(), 100);
        let mut seen: Vec<usize> = (0..25).flat_map(|s| l.rank_offsets(s, 0, 1)).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..100).map(|i| i * 10).collect::<Vec<_>>());
    }
}
