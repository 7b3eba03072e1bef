//! Collectives: how data-parallel ranks agree on one gradient.
//!
//! Data-parallel training runs the same model on `world` ranks, each on its own micro-batches.
//! Before every optimizer step each rank needs the *sum* of all ranks' gradients, and every rank
//! must end with exactly the same bits: replicas that differ by one rounding drift apart step by
//! step and a checkpoint written by rank 0 would no longer describe rank 3. [`Collective`] is that
//! contract; the runtime holds a `Box<dyn Collective>` and does not care how it is met.
//!
//! - [`Local`]: world 1, every op a no-op, so single-process training pays nothing.
//! - [`TcpRing`]: the ranks form a ring over plain TCP (std only, no MPI or NCCL to install) and
//!   sum with the bandwidth-optimal ring all-reduce. Its wire format is private to this module; a
//!   handshake refuses peers of another protocol version, generation or world.
//! - [`Nccl`]: NCCL through cudarc for GPU workers, one rank per GPU; gradients are summed on the
//!   device, bucket by bucket on a side stream while the backward goes on
//!   ([`Nccl::all_reduce_buckets`]), and the trait's host-buffer ops stage through
//!   a device bucket. Rank 0's unique id travels through a rendezvous function the caller supplies
//!   (the coordinator's `PublishRendezvous`); an abort flag ends a stuck op with `ncclCommAbort`.
//! - [`shard`] and [`Shard`]: which part of a buffer each rank owns in a reduce-scatter and an
//!   all-gather, the two halves of a sum that a sharded optimizer (ZeRO-1) runs apart.
//! - [`bench`](mod@bench): loopback bandwidth of the ring and of a plain memory copy, for `liandan bench`.
//!
//! # Failure model
//! Ops return [`CollectiveError`] instead of panicking or hanging: every blocking socket op gives
//! up after [`RingOptions::timeout`] without progress, and returns [`CollectiveError::Aborted`]
//! within about 100 ms once the runtime raises the abort flag (the coordinator moved to a new
//! generation). After any error a ring is broken for good: the bytes in flight are unknown, so
//! the runtime drops it and connects a new ring in the next generation.

use std::ops::Range;

pub mod bench;
mod local;
mod nccl;
mod tcp_ring;

pub use local::Local;
pub use nccl::{Nccl, NcclId, NcclOptions};
pub use tcp_ring::{PROTOCOL_VERSION, RingListener, RingOptions, TcpRing};

/// The ops data-parallel training needs. Every rank calls the same ops in the same order with
/// buffers of the same length; a ring detects a mismatch and returns [`CollectiveError::Protocol`].
pub trait Collective: Send {
    /// This rank, `0..world`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world(&self) -> usize;
    /// In-place sum over all ranks; every rank ends with the same bits.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    /// Sum of one f64 per rank (losses, token counts), same result on every rank.
    fn all_reduce_scalar(&mut self, x: f64) -> Result<f64, CollectiveError>;
    /// Returns once every rank has entered the barrier.
    fn barrier(&mut self) -> Result<(), CollectiveError>;
    /// Sum over all ranks of this rank's [`shard`] of `buf`, left in place; the rest of `buf`
    /// is left unspecified. Every rank's shard ends with the bits every other rank would see
    /// after the [`all_gather`](Collective::all_gather) that usually follows. The default sums
    /// the whole buffer, which meets the contract at the cost of the full all-reduce.
    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_reduce_sum(buf)
    }
    /// Every rank's [`shard`] of `buf` copied from its owner to every rank, bit for bit.
    fn all_gather(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    /// The NCCL communicator, when this collective is one: a GPU replica then sums its
    /// gradients on the device instead of staging them through the host.
    fn as_nccl(&mut self) -> Option<&mut Nccl> {
        None
    }
}

/// The part of a `len`-element buffer rank `rank` of `world` owns in a reduce-scatter and an
/// all-gather (and whose optimizer state it keeps when the optimizer is sharded): elements
/// `rank·len/world .. (rank+1)·len/world`, uneven when `world` does not divide `len`.
pub fn shard(len: usize, rank: usize, world: usize) -> Range<usize> {
    let at = |k: usize| (k as u128 * len as u128 / world.max(1) as u128) as usize;
    at(rank)..at(rank + 1)
}

/// The elements two ranges share (empty, at `a`'s clamped start, when they do not meet).
pub fn overlap(a: &Range<usize>, b: &Range<usize>) -> Range<usize> {
    let start = a.start.max(b.start);
    start..a.end.min(b.end).max(start)
}

/// Which part of the optimizer state a replica keeps: all of it (`world` 1), or with the
/// optimizer sharded over the data-parallel group (ZeRO stage 1), rank `rank`'s [`shard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    /// The whole state: an unsharded optimizer.
    pub const WHOLE: Shard = Shard { rank: 0, world: 1 };

    /// This rank's elements of a `len`-element buffer.
    pub fn range(&self, len: usize) -> Range<usize> {
        shard(len, self.rank, self.world)
    }

    pub fn is_whole(&self) -> bool {
        self.world <= 1
    }

    /// Refuses a collective of another rank or world than the shard was made for.
    pub fn check(&self, coll: &dyn Collective) -> Result<(), CollectiveError> {
        if (coll.rank(), coll.world()) == (self.rank, self.world) {
            return Ok(());
        }
        Err(CollectiveError::Protocol {
            reason: format!("the optimizer is sharded for rank {} of {}, the group is rank {} of {}", self.rank, self.world, coll.rank(), coll.world()),
        })
    }
}

impl std::fmt::Debug for dyn Collective + '_ {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Collective(rank {} of {})", self.rank(), self.world())
    }
}

/// Errors of the collectives. Each names the peer and the op so a person can tell which rank or
/// link to look at.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// Bad arguments to set up a ring (rank out of range, unresolvable address, zero timeout).
    #[error("invalid ring setup: {reason}")]
    Config { reason: String },

    /// A socket error on the link with `peer`.
    #[error("{peer}: {source}")]
    Io { peer: String, source: std::io::Error },

    /// `op` made no progress with `peer` for `after_ms` milliseconds.
    #[error("{op}: no progress with {peer} for {after_ms} ms")]
    Timeout { op: &'static str, peer: String, after_ms: u64 },

    /// The runtime raised the abort flag: `generation` is over.
    #[error("aborted: generation {generation} is over")]
    Aborted { generation: u64 },

    /// The peer at `peer` is not the neighbour this rank expects (another generation, world,
    /// protocol version, rank, or not a liandan ring at all).
    #[error("handshake with {peer} refused: {reason}")]
    Handshake { peer: String, reason: String },

    /// The GPU side failed: NCCL or the CUDA driver returned an error (`op` names the call).
    #[error("{op}: {reason}")]
    Device { op: &'static str, reason: String },

    /// The ranks disagree on what they are doing (different ops or buffer lengths), or the ring
    /// is broken by an earlier error.
    #[error("protocol error: {reason}")]
    Protocol { reason: String },
}
