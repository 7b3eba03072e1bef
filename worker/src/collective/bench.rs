//! Bandwidth of the ring all-reduce over loopback, and of a plain memory copy to compare it with.
//!
//! Numbers follow nccl-tests so they can be read next to published NCCL results:
//! - algbw = data size / time, where the data size is the bytes of one rank's buffer;
//! - busbw = algbw · 2(n−1)/n, the rate each rank's link actually carries in a ring
//!   all-reduce, comparable across world sizes and against the link's hardware speed.
//!
//! GB means 10⁹ bytes, as in nccl-tests. All ranks run as threads of this process, so on
//! loopback the "link" is the kernel's socket copy and the ranks share the machine's cores and
//! memory bandwidth; the result is an upper bound for what the same code does across hosts only
//! when the network, not the copy, is the bottleneck there.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::{Collective, CollectiveError, RingListener, RingOptions, TcpRing};

/// One measurement of [`ring_busbw`].
#[derive(Debug, Clone, PartialEq)]
pub struct BenchResult {
    pub world: usize,
    /// Bytes of each rank's buffer (the requested size rounded down to whole f32s).
    pub bytes: usize,
    pub iters: usize,
    /// Mean time of one all-reduce, seconds (the slowest rank's total over `iters`).
    pub seconds_per_iter: f64,
    /// `bytes / seconds_per_iter`, GB/s.
    pub algbw_gbps: f64,
    /// `algbw · 2(world−1)/world`, GB/s (0 for world 1, where nothing moves).
    pub busbw_gbps: f64,
}

/// Runs `world` ranks as threads over loopback, each all-reducing a buffer of `bytes` bytes
/// `iters` times after one warm-up, and reports nccl-tests' algbw and busbw.
pub fn ring_busbw(world: usize, bytes: usize, iters: usize) -> Result<BenchResult, CollectiveError> {
    if world == 0 || iters == 0 {
        return Err(CollectiveError::Config { reason: format!("ring_busbw needs world >= 1 and iters >= 1, got world {world}, iters {iters}") });
    }
    let elems = bytes / 4;
    let listeners: Vec<RingListener> = (0..world).map(|_| TcpRing::listen("127.0.0.1:0")).collect::<Result<_, _>>()?;
    let peers: Vec<String> = listeners.iter().map(|l| l.local_addr().to_string()).collect();
    // A rank that fails raises the flag, so the others stop within ~100 ms instead of timing out.
    let abort = Arc::new(AtomicBool::new(false));
    let opts = RingOptions { abort: Some(abort.clone()), ..RingOptions::default() };

    let results: Vec<Result<Duration, CollectiveError>> = thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let (peers, opts, abort) = (&peers, opts.clone(), &abort);
                s.spawn(move || {
                    let r = run_rank(listener, rank, peers, opts, elems, iters);
                    if r.is_err() {
                        abort.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(CollectiveError::Protocol { reason: "a benchmark rank thread panicked".into() }))).collect()
    });

    let mut slowest = Duration::ZERO;
    let mut aborted = None;
    for r in results {
        match r {
            Ok(d) => slowest = slowest.max(d),
            // Only the rank that failed first has the real error; the others were aborted by it.
            Err(e @ CollectiveError::Aborted { .. }) => aborted = Some(e),
            Err(e) => return Err(e),
        }
    }
    if let Some(e) = aborted {
        return Err(e);
    }
    let bytes = elems * 4;
    let seconds_per_iter = slowest.as_secs_f64() / iters as f64;
    let algbw_gbps = if seconds_per_iter > 0.0 { bytes as f64 / seconds_per_iter / 1e9 } else { 0.0 };
    let busbw_gbps = algbw_gbps * 2.0 * (world - 1) as f64 / world as f64;
    Ok(BenchResult { world, bytes, iters, seconds_per_iter, algbw_gbps, busbw_gbps })
}

/// One rank of [`ring_busbw`]: connect, warm up, line up with a barrier, time `iters` ops.
fn run_rank(listener: RingListener, rank: usize, peers: &[String], opts: RingOptions, elems: usize, iters: usize) -> Result<Duration, CollectiveError> {
    let mut ring = TcpRing::connect(&listener, rank, peers, 0, opts)?;
    // Values grow by ×world per op and may reach inf; timing does not depend on them.
    let mut buf = vec![1.0f32; elems];
    ring.all_reduce_sum(&mut buf)?;
    ring.barrier()?;
    let start = Instant::now();
    for _ in 0..iters {
        ring.all_reduce_sum(&mut buf)?;
    }
    Ok(start.elapsed())
}

/// GB/s (10⁹ bytes/s) of `copy_from_slice` between two `bytes`-byte buffers, single-threaded,
/// counting each byte copied ONCE, the mean over `iters` copies after one warm-up.
///
/// nccl-tests counts busbw on the data size, once per byte, while a copy reads every byte and
/// writes it: the memory traffic is twice the number reported here (three times on machines
/// that read a cache line before writing it). Counted once, the figure is directly comparable
/// to algbw/busbw: a loopback ring cannot move data faster than the kernel can copy it.
pub fn memcpy_bandwidth(bytes: usize, iters: usize) -> f64 {
    if bytes == 0 || iters == 0 {
        return 0.0;
    }
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src);
    let start = Instant::now();
    for _ in 0..iters {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
    }
    let seconds = start.elapsed().as_secs_f64();
    if seconds > 0.0 { (bytes * iters) as f64 / seconds / 1e9 } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_benchmark_runs() {
        let r = ring_busbw(3, 4096 + 2, 2).expect("loopback benchmark");
        assert_eq!((r.world, r.bytes, r.iters), (3, 4096, 2));
        assert!(r.algbw_gbps > 0.0 && (r.busbw_gbps - r.algbw_gbps * 4.0 / 3.0).abs() < 1e-9, "{r:?}");
        let one = ring_busbw(1, 1024, 1).expect("world 1");
        assert_eq!(one.busbw_gbps, 0.0);
        assert!(ring_busbw(0, 1024, 1).is_err());
        assert!(memcpy_bandwidth(1 << 16, 2) > 0.0);
        assert_eq!(memcpy_bandwidth(0, 2), 0.0);
    }

    /// `cargo test --release -p liandan-worker collective::bench -- --ignored --nocapture`
    #[test]
    #[ignore = "a benchmark: seconds of loopback traffic"]
    fn print_loopback_bandwidth() {
        for bytes in [1 << 20, 16 << 20, 64 << 20] {
            for world in [2, 3, 4] {
                let iters = if bytes <= 1 << 20 { 50 } else { 5 };
                let r = ring_busbw(world, bytes, iters).expect("loopback benchmark");
                println!(
                    "allreduce world {world} {:>4} MiB: {:8.3} ms/op  algbw {:6.2} GB/s  busbw {:6.2} GB/s",
                    bytes >> 20,
                    r.seconds_per_iter * 1e3,
                    r.algbw_gbps,
                    r.busbw_gbps
                );
            }
        }
        for bytes in [1 << 20, 16 << 20, 64 << 20] {
            println!("memcpy {:>4} MiB: {:6.2} GB/s (bytes copied, once)", bytes >> 20, memcpy_bandwidth(bytes, 20));
        }
    }
}
