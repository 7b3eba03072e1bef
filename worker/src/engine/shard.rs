//! ZeRO-1's host-side pieces, shared by the engines: a sharded optimizer keeps `m` and `v` of
//! its own [`Shard`] only, so a checkpoint (which holds them whole, whatever the world size,
//! so a job can resume on another number of ranks) needs them gathered first, and a
//! checkpoint's whole moments are cut to the shard when loaded.

use std::sync::{Mutex, PoisonError};

use crate::collective::{Collective, CollectiveError, Shard};
use crate::error::{EngineError, Result};

/// A sharded optimizer's moments as the last [`Gathered::gather`] left them: whole on rank 0,
/// which writes checkpoints, until the checkpoint takes them ([`Gathered::take`]); the other
/// ranks take part in the gather and drop the result at once, so no rank holds `2·n` host
/// floats between checkpoints.
#[derive(Debug, Default)]
pub struct Gathered(Mutex<Option<Moments>>);

/// The update `t` they were gathered at, then whole `m` and `v`.
type Moments = (u64, Vec<f32>, Vec<f32>);

impl Gathered {
    /// All-gathers `own` (this rank's `m` and `v` of `shard.range(n)`) over `coll` into whole
    /// `n`-element moments, kept on rank 0 as those of update `t`.
    ///
    /// # Errors
    /// The collective fails, or is not the group the shard was made for.
    pub fn gather(&mut self, shard: Shard, n: usize, own: (&[f32], &[f32]), t: u64, coll: &mut dyn Collective) -> Result<(), CollectiveError> {
        shard.check(coll)?;
        let keep = coll.rank() == 0;
        let slot = self.0.get_mut().unwrap_or_else(PoisonError::into_inner);
        *slot = None;
        let r = shard.range(n);
        let mut whole = |part: &[f32]| -> Result<Vec<f32>, CollectiveError> {
            let mut full = vec![0.0f32; n];
            full[r.clone()].copy_from_slice(part);
            coll.all_gather(&mut full)?;
            Ok(full)
        };
        let m = whole(own.0)?;
        // Off rank 0 each gathered vector is dropped before the next one is made.
        let m = if keep { m } else { Vec::new() };
        let v = whole(own.1)?;
        if keep {
            *slot = Some((t, m, v));
        }
        Ok(())
    }

    /// The moments gathered at update `t`, moved out: a checkpoint's save reads them once.
    ///
    /// # Errors
    /// None were gathered at `t`, or this is not rank 0 (every rank must call
    /// `gather_moments` before a checkpoint; rank 0 writes it), or they were taken already.
    pub fn take(&self, t: u64) -> Result<(Vec<f32>, Vec<f32>)> {
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match slot.take() {
            Some((at, m, v)) if at == t => Ok((m, v)),
            other => {
                *slot = other;
                Err(EngineError::InvalidConfig {
                    field: "optimizer moments",
                    reason: format!(
                        "the optimizer is sharded and its moments of update {t} are not here: every rank gathers them before a checkpoint, rank 0 keeps them, and its save takes them once"
                    ),
                })
            }
        }
    }
}

/// This rank's part of whole moments `(m, v)` of `n` elements (a checkpoint's).
///
/// # Errors
/// Either is not `n` long.
pub fn own_part<'a>(shard: Shard, n: usize, m: &'a [f32], v: &'a [f32]) -> Result<(&'a [f32], &'a [f32])> {
    for (what, x) in [("optimizer m", m), ("optimizer v", v)] {
        if x.len() != n {
            return Err(EngineError::BadLength { what, expected: n, got: x.len() });
        }
    }
    let r = shard.range(n);
    Ok((&m[r.clone()], &v[r]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::Local;

    #[test]
    fn moments_are_gathered_per_update_and_cut_to_the_shard() {
        let shard = Shard { rank: 0, world: 1 };
        let mut g = Gathered::default();
        assert!(g.take(0).is_err(), "nothing gathered yet");
        g.gather(shard, 3, (&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]), 7, &mut Local).unwrap();
        let err = g.take(8).unwrap_err().to_string();
        assert!(err.contains("moments of update 8 are not here"), "{err}");
        assert_eq!(g.take(7).unwrap(), (vec![1.0, 2.0, 3.0], vec![4.0, 5.0, 6.0]), "a wrong update leaves them");
        assert!(g.take(7).is_err(), "taken once");
        let wrong = Shard { rank: 1, world: 2 }.check(&Local).unwrap_err().to_string();
        assert!(wrong.contains("rank 1 of 2") && wrong.contains("rank 0 of 1"), "{wrong}");
        let (m, v) = own_part(Shard { rank: 1, world: 2 }, 4, &[1.0, 2.0, 3.0, 4.0], &[5.0, 6.0, 7.0, 8.0]).unwrap();
        assert_eq!((m, v), (&[3.0, 4.0][..], &[7.0, 8.0][..]));
        assert!(own_part(shard, 4, &[1.0], &[1.0; 4]).is_err());
    }
}
