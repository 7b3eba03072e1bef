//! Ring all-reduce over plain TCP: every rank talks to two neighbours only, so the bytes each
//! rank sends do not grow with the world size, and nothing beyond std has to be installed.
//!
//! # Setup
//! A rank binds its listener first ([`TcpRing::listen`]) so the address can be published to the
//! coordinator before the peers are known. Once it has everyone's address, [`TcpRing::connect`]
//! connects to the right neighbour (`rank + 1 mod world`) while a second thread accepts the left
//! one (`rank − 1 mod world`). Each connection starts with a handshake that proves both ends
//! are members of this generation:
//!
//! ```text
//! hello (40 bytes, little-endian): magic "LDRG" | version u32 | generation u64 | rank u32 | world u32 | nonce [16]
//! connecting → accepting: hello_c
//! accepting → connecting: hello_a | MAC(key, "accept",  hello_a, hello_c)   (32 bytes)
//! connecting → accepting:           MAC(key, "connect", hello_c, hello_a)   (32 bytes)
//! ```
//!
//! `key` is the generation's ring key, which the coordinator gives only to the generation's
//! members (HMAC-SHA256; fresh nonces on both sides, so a recorded handshake cannot be replayed).
//! Both ends check magic, version, generation, world, that the peer is the neighbour they expect
//! and its MAC; the accepting end also checks that the connection comes from the left
//! neighbour's advertised address. The connecting end fails at once on a mismatch (with both
//! sides' values in the error); the accepting end drops that connection and keeps listening, with
//! each incoming handshake on its own thread under a short deadline, so a stranger, a silent
//! connection or a stale process of an old generation cannot break a new ring or delay it. Data
//! then flows one way on each connection: this rank writes to the right one and reads from the
//! left one.
//!
//! # All-reduce
//! The buffer of `len` values is cut into `world` segments, segment `s` being
//! `s·len/world .. (s+1)·len/world` (uneven when `world` does not divide `len`, empty when
//! `len < world`). With `n = world` and `r = rank`:
//!
//! ```text
//! reduce-scatter, step t = 0..n−1:  send segment (r−t) mod n, receive segment (r−t−1) mod n and add it in
//! all-gather,     step t = n−1..2n−2: send segment (r−t) mod n, receive segment (r−t−1) mod n and copy it
//! ```
//!
//! After the reduce-scatter rank `r` holds the full sum of segment `r+1`; the all-gather passes
//! each finished segment once around the ring. The reduce-scatter and the all-gather also run
//! alone (a sharded optimizer's two halves); they shift every segment index by `n−1`, so that
//! rank `r` owns segment `r`, the [`shard`](super::shard) the other collectives agree on. Each rank sends and receives `2(n−1)/n · len`
//! values, the bandwidth optimum. The segment received at step `t` is the one sent at step `t+1`,
//! so the exchange is pipelined in pieces of [`RingOptions::chunk_bytes`]: a piece is read from
//! the left, reduced, and handed at once to a sender thread that writes it to the right, while
//! this thread reads the next piece. Sending and receiving overlap and a step does not wait for
//! the previous one to finish.
//!
//! # Determinism
//! Segment `s` is summed as `((x_s + x_{s+1}) + …) + x_{s−1}` (ranks mod `world`), in f32. The
//! order depends only on the world size, never on `chunk_bytes` or timing, so a rerun reproduces
//! the bits; the all-gather copies the finished sums, so every rank ends with identical bits.
//! Scalars are gathered whole and summed in f64 in rank order `0..world` on every rank.
//!
//! # Wire
//! f32 and f64 values are little-endian. Every op starts with a 24-byte header (sequence number,
//! op, length) that the receiver compares with its own, so ranks that call different ops or pass
//! different lengths get [`CollectiveError::Protocol`] instead of summing garbage.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use super::{Collective, CollectiveError};

/// Version of the ring's wire format, exchanged in the hello.
pub const PROTOCOL_VERSION: u32 = 2;

const MAGIC: [u8; 4] = *b"LDRG";
const HELLO_LEN: usize = 40;
const MAC_LEN: usize = 32;
/// Longest one incoming handshake may take (capped by the ring's timeout): a connection that
/// says nothing is dropped after this, while other handshakes go on beside it.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Incoming handshakes in flight at once; more connections wait in the listener's backlog.
const HANDSHAKES_MAX: usize = 32;
const HEADER_LEN: usize = 24;
/// Longest a blocked socket op waits before looking at the abort flag and its deadline again.
const POLL: Duration = Duration::from_millis(100);
/// Pause between two non-blocking `accept`s that found nobody.
const ACCEPT_POLL: Duration = Duration::from_millis(5);
/// Pause between two refused connection attempts (the peer's process may still be starting).
const CONNECT_RETRY: Duration = Duration::from_millis(20);
/// First and longest single connection attempt. Attempts start at [`POLL`], so the abort flag
/// is looked at while dialling, and double after each one that timed out, so a link whose
/// round trip exceeds 100 ms still connects.
const CONNECT_ATTEMPT_MAX: Duration = Duration::from_secs(2);
/// Send buffers kept between ops.
const POOL_MAX: usize = 16;
/// Refused connections listed in a handshake error.
const REFUSED_MAX: usize = 4;

/// How a ring moves data and how long it waits.
#[derive(Debug, Clone)]
pub struct RingOptions {
    /// Pipelining granularity of [`TcpRing::all_reduce_sum`], in bytes (at least 4, one f32).
    /// Ranks may use different values: the wire carries no chunk framing.
    pub chunk_bytes: usize,
    /// Longest a socket op may go without progress (and the longest connecting may take) before
    /// the op returns [`CollectiveError::Timeout`].
    pub timeout: Duration,
    /// Raised by the runtime when the generation changes: every op, blocked or not, then returns
    /// [`CollectiveError::Aborted`] within about 100 ms.
    pub abort: Option<Arc<AtomicBool>>,
    /// The generation's ring key from the coordinator; handshakes carry a MAC under it. Empty
    /// (tests and benchmarks inside one process) proves nothing: the runtime always sets it.
    pub key: Vec<u8>,
}

impl Default for RingOptions {
    fn default() -> Self {
        RingOptions { chunk_bytes: 1 << 20, timeout: Duration::from_secs(30), abort: None, key: Vec::new() }
    }
}

/// A rank's bound listener, waiting for the peer addresses. Its address is what the rank
/// publishes; [`TcpRing::connect`] borrows it, so one listener serves every generation's ring.
#[derive(Debug)]
pub struct RingListener {
    listener: TcpListener,
    addr: SocketAddr,
}

impl RingListener {
    /// The bound address (with the port the OS picked for `:0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// One rank of a connected ring. See the module docs for the algorithm and the wire format.
#[derive(Debug)]
pub struct TcpRing {
    rank: usize,
    world: usize,
    generation: u64,
    opts: RingOptions,
    /// `None` for world 1, which needs no sockets.
    links: Option<Links>,
    /// Sequence number of the next op, carried in its header.
    seq: u64,
    /// Why the ring cannot be used any more.
    broken: Option<String>,
    /// Send buffers reused across ops.
    pool: Vec<Vec<u8>>,
}

/// The two connections of a rank: this rank writes to `right` and reads from `left`.
#[derive(Debug)]
struct Links {
    right: TcpStream,
    left: TcpStream,
    right_name: String,
    left_name: String,
}

impl TcpRing {
    /// Binds this rank's listener (`127.0.0.1:0` or a given address) BEFORE peers are known, so
    /// the address can be published to the coordinator: returns the bound address with it.
    pub fn listen(addr: &str) -> Result<RingListener, CollectiveError> {
        let peer = format!("listen address {addr}");
        let listener = TcpListener::bind(addr).map_err(|source| CollectiveError::Io { peer: peer.clone(), source })?;
        let addr = listener.local_addr().map_err(|source| CollectiveError::Io { peer, source })?;
        Ok(RingListener { listener, addr })
    }

    /// Connects the ring: `peers[r]` is rank r's listener address; this rank connects to
    /// rank+1 (mod world) and accepts from rank-1; a handshake exchanges (magic, protocol
    /// version, generation, rank, world) and refuses a peer from another generation/world.
    /// World 1 (`peers.len() == 1`) opens no socket.
    pub fn connect(listener: &RingListener, rank: usize, peers: &[String], generation: u64, opts: RingOptions) -> Result<TcpRing, CollectiveError> {
        let world = peers.len();
        let config = |reason: String| CollectiveError::Config { reason };
        if world == 0 {
            return Err(config("no peers: a ring needs at least one rank".into()));
        }
        if rank >= world {
            return Err(config(format!("rank {rank} is outside a world of {world} ranks")));
        }
        if u32::try_from(world).is_err() {
            return Err(config(format!("a world of {world} ranks does not fit the handshake")));
        }
        if opts.timeout < Duration::from_millis(1) {
            return Err(config(format!("timeout must be at least 1 ms, got {:?}", opts.timeout)));
        }
        if opts.chunk_bytes < 4 {
            return Err(config(format!("chunk_bytes must be at least 4 (one f32), got {}", opts.chunk_bytes)));
        }
        let mut ring = TcpRing { rank, world, generation, opts, links: None, seq: 0, broken: None, pool: Vec::new() };
        if world == 1 {
            return Ok(ring);
        }
        let abort = ring.opts.abort.as_deref();
        if abort.is_some_and(|a| a.load(Ordering::Relaxed)) {
            return Err(CollectiveError::Aborted { generation });
        }

        let right = (rank + 1) % world;
        let left = (rank + world - 1) % world;
        let right_name = format!("right neighbour rank {right} ({})", peers[right]);
        let left_name = format!("left neighbour rank {left} ({})", peers[left]);
        let right_addrs: Vec<SocketAddr> = peers[right].to_socket_addrs().map_err(|e| config(format!("peers[{right}] = {:?}: {e}", peers[right])))?.collect();
        if right_addrs.is_empty() {
            return Err(config(format!("peers[{right}] = {:?} resolves to no address", peers[right])));
        }
        // The left neighbour must connect from its advertised address (any port).
        let left_ips: Vec<std::net::IpAddr> = peers[left].to_socket_addrs().map_err(|e| config(format!("peers[{left}] = {:?}: {e}", peers[left])))?.map(|a| a.ip()).collect();
        let nonce = liandan_proto::auth::random_bytes::<16>().map_err(|e| config(format!("no random nonce for the handshake: {e}")))?;
        let hello = Hello { generation, rank, world, nonce }.encode();
        let key = ring.opts.key.clone();
        let timeout = ring.opts.timeout;
        let stop = AtomicBool::new(false);

        let (connected, accepted) = thread::scope(|s| {
            let acceptor = s.spawn(|| {
                let w = Waiter { op: "accept", timeout, abort, stop: Some(&stop), generation };
                let expect = Expect { generation, world, peer_rank: left, key: &key };
                let r = accept_left(&listener.listener, &left_name, &left_ips, &hello, &expect, &w);
                if r.is_err() {
                    stop.store(true, Ordering::Relaxed);
                }
                r
            });
            let w = Waiter { op: "connect", timeout, abort, stop: Some(&stop), generation };
            let expect = Expect { generation, world, peer_rank: right, key: &key };
            let connected = connect_right(&right_addrs, &right_name, &hello, &expect, &w);
            if connected.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            let accepted = acceptor.join().unwrap_or_else(|_| Err(protocol("the accepting thread panicked")));
            (connected, accepted)
        });
        let (right_stream, left_stream) = match (connected, accepted) {
            (Ok(r), Ok(l)) => (r, l),
            // The connecting side's error first: it is the one that fails fast with a reason.
            (Err(Fail::Error(e)), _) | (_, Err(Fail::Error(e))) => return Err(e),
            _ => return Err(CollectiveError::Protocol { reason: "ring setup stopped without an error".into() }),
        };
        ring.links = Some(Links { right: right_stream, left: left_stream, right_name, left_name });
        Ok(ring)
    }

    /// The generation this ring was connected in.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Checks that the ring can run an op; returns the op's sequence number.
    fn begin(&mut self) -> Result<u64, CollectiveError> {
        if let Some(why) = &self.broken {
            return Err(CollectiveError::Protocol { reason: format!("the ring is broken by an earlier error ({why}); connect a new one") });
        }
        if self.opts.abort.as_deref().is_some_and(|a| a.load(Ordering::Relaxed)) {
            self.broken = Some(format!("generation {} aborted", self.generation));
            return Err(CollectiveError::Aborted { generation: self.generation });
        }
        let seq = self.seq;
        self.seq += 1;
        Ok(seq)
    }

    /// Marks the ring broken on error: the bytes still in flight are unknown.
    fn finish<T>(&mut self, result: Result<T, Fail>) -> Result<T, CollectiveError> {
        let result = result.map_err(|f| match f {
            Fail::Error(e) => e,
            Fail::Stopped => CollectiveError::Protocol { reason: "op stopped without an error".into() },
        });
        if let Err(e) = &result {
            self.broken = Some(e.to_string());
        }
        result
    }

    /// Runs the ring steps of `op` (a sum, a reduce-scatter or an all-gather) over `buf`.
    fn ring_op(&mut self, op: Op, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let seq = self.begin()?;
        let Some(links) = &self.links else { return Ok(()) };
        let header = Header { seq, op, len: buf.len() as u64 };
        let result = ring_all_reduce(links, &mut self.pool, buf, header, self.rank, self.world, &self.opts, self.generation);
        self.finish(result)
    }

    /// Gathers one f64 per rank, in rank order, on every rank.
    fn gather(&mut self, op: Op, x: f64) -> Result<Vec<f64>, CollectiveError> {
        let seq = self.begin()?;
        let Some(links) = &self.links else { return Ok(vec![x]) };
        let header = Header { seq, op, len: u64::from(op == Op::Scalar) };
        let w = Waiter { op: op.name(), timeout: self.opts.timeout, abort: self.opts.abort.as_deref(), stop: None, generation: self.generation };
        let result = gather_scalars(links, header, self.rank, self.world, x, &w);
        self.finish(result)
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.ring_op(Op::Sum, buf)
    }

    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.ring_op(Op::ReduceScatter, buf)
    }

    fn all_gather(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.ring_op(Op::AllGather, buf)
    }

    fn all_reduce_scalar(&mut self, x: f64) -> Result<f64, CollectiveError> {
        // Summed in rank order on every rank: same bits everywhere.
        Ok(self.gather(Op::Scalar, x)?.iter().sum())
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        // Nobody can finish a gather before every rank has contributed its value.
        self.gather(Op::Barrier, 0.0).map(|_| ())
    }
}

// ---------------------------------------------------------------------------------------------
// The ops.

/// The ring steps of `header.op` over `buf` (see the module docs): reduce-scatter + all-gather
/// for a sum, or one of the two. This thread receives and reduces; a scoped sender thread writes
/// what it is handed to the right neighbour.
fn ring_all_reduce(links: &Links, pool: &mut Vec<Vec<u8>>, buf: &mut [f32], header: Header, rank: usize, world: usize, opts: &RingOptions, generation: u64) -> Result<(), Fail> {
    let stop = AtomicBool::new(false);
    let w = Waiter { op: header.op.name(), timeout: opts.timeout, abort: opts.abort.as_deref(), stop: Some(&stop), generation };
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let (back_tx, back_rx) = mpsc::channel::<Vec<u8>>();
    let result = thread::scope(|s| {
        let sender = s.spawn(|| {
            let r = send_loop(&links.right, &links.right_name, rx, back_tx, &w);
            if r.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            r
        });
        let chunk = (opts.chunk_bytes / 4).max(1);
        let received = receive_and_reduce(links, tx, &back_rx, pool, buf, header, rank, world, chunk, &w);
        if received.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        // `tx` is gone with `receive_and_reduce`: the sender ends once the queued pieces are out.
        let sent = sender.join().unwrap_or_else(|_| Err(protocol("the sending thread panicked")));
        match (received, sent) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(Fail::Error(e)), _) | (_, Err(Fail::Error(e))) => Err(Fail::Error(e)),
            _ => Err(protocol(&format!("{} stopped without an error", header.op.name()))),
        }
    });
    pool.extend(back_rx.try_iter().take(POOL_MAX.saturating_sub(pool.len())));
    result
}

/// The receiving half of [`ring_all_reduce`]: queues this rank's own segment for the sender,
/// then for every step reads the incoming segment piece by piece, adds (reduce-scatter) or copies
/// (all-gather) it into `buf`, and queues it for the next step.
fn receive_and_reduce(
    links: &Links,
    tx: mpsc::Sender<Vec<u8>>,
    back: &mpsc::Receiver<Vec<u8>>,
    pool: &mut Vec<Vec<u8>>,
    buf: &mut [f32],
    header: Header,
    rank: usize,
    n: usize,
    chunk: usize,
    w: &Waiter,
) -> Result<(), Fail> {
    // A failed send means the sender thread has ended, which it only does on error.
    let queue = |msg: Vec<u8>| tx.send(msg).map_err(|_| Fail::Stopped);
    let len = buf.len();
    let (shift, steps) = header.op.steps(n);
    queue(header.encode().to_vec())?;
    // Step t sends segment (r + shift − t) mod n, so the first step sends this one.
    for piece in buf[segment(len, n, (rank + shift + 2 * n - steps.start) % n)].chunks(chunk) {
        let mut out = take(back, pool, piece.len() * 4);
        encode(piece, &mut out);
        queue(out)?;
    }

    let mut got = [0u8; HEADER_LEN];
    read_full(&links.left, &mut got, &links.left_name, w)?;
    header.check(&got, &links.left_name)?;

    let mut incoming = vec![0u8; chunk.min(len.div_ceil(n)) * 4];
    for t in steps.clone() {
        // Segment (r + shift − t − 1) mod n; t < 2n − 1, so the sum stays positive.
        let seg = segment(len, n, (rank + shift + 2 * n - 1 - t) % n);
        let reduce = t < n - 1;
        let forward = t + 1 < steps.end;
        for piece in buf[seg].chunks_mut(chunk) {
            let bytes = piece.len() * 4;
            if reduce {
                let incoming = &mut incoming[..bytes];
                read_full(&links.left, incoming, &links.left_name, w)?;
                let mut out = take(back, pool, bytes);
                add_into(piece, incoming, &mut out);
                if forward {
                    queue(out)?;
                } else if pool.len() < POOL_MAX {
                    pool.push(out);
                }
            } else {
                let mut msg = take(back, pool, bytes);
                read_full(&links.left, &mut msg, &links.left_name, w)?;
                decode_into(piece, &msg);
                if forward {
                    queue(msg)?;
                } else if pool.len() < POOL_MAX {
                    pool.push(msg);
                }
            }
        }
    }
    Ok(())
}

/// The sending half of [`ring_all_reduce`]: writes every queued message in order and hands the
/// buffer back for reuse.
fn send_loop(stream: &TcpStream, peer: &str, rx: mpsc::Receiver<Vec<u8>>, back: mpsc::Sender<Vec<u8>>, w: &Waiter) -> Result<(), Fail> {
    // No look at the flags between messages: after a failure the queued messages (the header
    // first) still go out while the socket takes them, so the neighbour reads why this rank
    // stopped (a header mismatch) instead of a closed connection. A full socket ends it.
    for msg in rx {
        write_full(stream, &msg, peer, w)?;
        // The receiving end lives until after this thread is joined; a lost buffer is only freed.
        let _ = back.send(msg);
    }
    Ok(())
}

/// All-gather of one f64 per rank in `n − 1` steps. Messages are a few bytes, far below any
/// socket buffer, so writing before reading cannot block the ring.
fn gather_scalars(links: &Links, header: Header, rank: usize, n: usize, x: f64, w: &Waiter) -> Result<Vec<f64>, Fail> {
    write_full(&links.right, &header.encode(), &links.right_name, w)?;
    let mut got = [0u8; HEADER_LEN];
    read_full(&links.left, &mut got, &links.left_name, w)?;
    header.check(&got, &links.left_name)?;
    let mut values = vec![0.0f64; n];
    values[rank] = x;
    for t in 0..n - 1 {
        let send = (rank + n - t) % n;
        let recv = (rank + n - 1 - t) % n;
        write_full(&links.right, &values[send].to_le_bytes(), &links.right_name, w)?;
        let mut b = [0u8; 8];
        read_full(&links.left, &mut b, &links.left_name, w)?;
        values[recv] = f64::from_le_bytes(b);
    }
    Ok(values)
}

/// Elements `s·len/n .. (s+1)·len/n`: rank `s`'s [`shard`](super::shard).
fn segment(len: usize, n: usize, s: usize) -> Range<usize> {
    super::shard(len, s, n)
}

/// A send buffer of `len` bytes: one the sender returned, one kept from an earlier op, or new.
fn take(back: &mpsc::Receiver<Vec<u8>>, pool: &mut Vec<Vec<u8>>, len: usize) -> Vec<u8> {
    let mut v = back.try_recv().ok().or_else(|| pool.pop()).unwrap_or_default();
    v.resize(len, 0);
    v
}

/// `out[4i..4i+4] = src[i]` little-endian. `out.len() == 4·src.len()`.
fn encode(src: &[f32], out: &mut [u8]) {
    let (out, _) = out.as_chunks_mut::<4>();
    for (o, v) in out.iter_mut().zip(src) {
        *o = v.to_le_bytes();
    }
}

/// `dst[i] = f32 at bytes[4i..4i+4]`. `bytes.len() == 4·dst.len()`.
fn decode_into(dst: &mut [f32], bytes: &[u8]) {
    let (bytes, _) = bytes.as_chunks::<4>();
    for (d, b) in dst.iter_mut().zip(bytes) {
        *d = f32::from_le_bytes(*b);
    }
}

/// `acc[i] = incoming[i] + acc[i]`, also written little-endian to `out` for the next step.
fn add_into(acc: &mut [f32], incoming: &[u8], out: &mut [u8]) {
    let (incoming, _) = incoming.as_chunks::<4>();
    let (out, _) = out.as_chunks_mut::<4>();
    for ((a, i), o) in acc.iter_mut().zip(incoming).zip(out) {
        let s = f32::from_le_bytes(*i) + *a;
        *a = s;
        *o = s.to_le_bytes();
    }
}

// ---------------------------------------------------------------------------------------------
// Headers and hellos.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Sum = 1,
    Scalar = 2,
    Barrier = 3,
    ReduceScatter = 4,
    AllGather = 5,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Sum => "all_reduce_sum",
            Op::Scalar => "all_reduce_scalar",
            Op::Barrier => "barrier",
            Op::ReduceScatter => "reduce_scatter_sum",
            Op::AllGather => "all_gather",
        }
    }

    fn from_code(code: u32) -> Option<Op> {
        [Op::Sum, Op::Scalar, Op::Barrier, Op::ReduceScatter, Op::AllGather].into_iter().find(|op| *op as u32 == code)
    }

    /// A buffer op's `(shift, steps)` in a ring of `n` (see the module docs). The sum keeps the
    /// rotation it always had; the reduce-scatter and the all-gather alone turn the ring by one
    /// more segment so rank `r` owns segment `r` ([`super::shard`]).
    fn steps(self, n: usize) -> (usize, Range<usize>) {
        match self {
            Op::ReduceScatter => (n - 1, 0..n - 1),
            Op::AllGather => (n - 1, n - 1..2 * (n - 1)),
            _ => (0, 0..2 * (n - 1)),
        }
    }
}

/// What each op sends first: `seq u64 | op u32 | reserved u32 | len u64`.
#[derive(Debug, Clone, Copy)]
struct Header {
    seq: u64,
    op: Op,
    len: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8..12].copy_from_slice(&(self.op as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Ok when the left neighbour announced the same op; otherwise says what each side is doing.
    fn check(&self, got: &[u8; HEADER_LEN], peer: &str) -> Result<(), CollectiveError> {
        if *got == self.encode() {
            return Ok(());
        }
        let (seq, code, len) = (le_u64(got, 0), le_u32(got, 8), le_u64(got, 16));
        let theirs = Op::from_code(code).map_or("an unknown op", Op::name);
        Err(CollectiveError::Protocol {
            reason: format!("{peer} is in op #{seq} {theirs} over {len} values, this rank in op #{} {} over {} values", self.seq, self.op.name(), self.len),
        })
    }
}

/// This rank's side of the handshake.
#[derive(Debug, Clone, Copy)]
struct Hello {
    generation: u64,
    rank: usize,
    world: usize,
    nonce: [u8; 16],
}

impl Hello {
    fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&self.generation.to_le_bytes());
        // `connect` checked that world (and so rank) fits u32.
        b[16..20].copy_from_slice(&(self.rank as u32).to_le_bytes());
        b[20..24].copy_from_slice(&(self.world as u32).to_le_bytes());
        b[24..40].copy_from_slice(&self.nonce);
        b
    }
}

/// What a hello from the neighbour must say, and the key its MAC is under.
#[derive(Debug, Clone, Copy)]
struct Expect<'a> {
    generation: u64,
    world: usize,
    peer_rank: usize,
    key: &'a [u8],
}

impl Expect<'_> {
    fn check(&self, got: &[u8; HELLO_LEN]) -> Result<(), String> {
        if got[0..4] != MAGIC {
            return Err(format!("not a liandan ring peer (first bytes {:02x?})", &got[0..4]));
        }
        let version = le_u32(got, 4);
        if version != PROTOCOL_VERSION {
            return Err(format!("peer speaks ring protocol version {version}, this rank version {PROTOCOL_VERSION}"));
        }
        let generation = le_u64(got, 8);
        if generation != self.generation {
            return Err(format!("peer is in generation {generation}, this rank in generation {}", self.generation));
        }
        let world = le_u32(got, 20) as usize;
        if world != self.world {
            return Err(format!("peer is in a world of {world} ranks, this rank in a world of {}", self.world));
        }
        let rank = le_u32(got, 16) as usize;
        if rank != self.peer_rank {
            return Err(format!("peer is rank {rank}, this rank expects rank {} there", self.peer_rank));
        }
        Ok(())
    }

    /// The MAC one side sends: `role` is "accept" or "connect", `own` its hello, `theirs` the
    /// other's.
    fn mac(&self, role: &str, own: &[u8], theirs: &[u8]) -> [u8; MAC_LEN] {
        liandan_proto::auth::mac(self.key, &[b"liandan ring", role.as_bytes(), own, theirs])
    }

    fn mac_ok(&self, role: &str, own: &[u8], theirs: &[u8], tag: &[u8]) -> Result<(), String> {
        if liandan_proto::auth::mac_ok(self.key, &[b"liandan ring", role.as_bytes(), own, theirs], tag) {
            Ok(())
        } else {
            Err("the handshake's MAC is wrong: not a member of this generation (no or another ring key)".into())
        }
    }
}

fn le_u32<const N: usize>(b: &[u8; N], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64<const N: usize>(b: &[u8; N], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

// ---------------------------------------------------------------------------------------------
// Connecting.

/// Dials the right neighbour until it answers or `w.timeout` passes, then exchanges hellos.
fn connect_right(addrs: &[SocketAddr], name: &str, hello: &[u8; HELLO_LEN], expect: &Expect, w: &Waiter) -> Result<TcpStream, Fail> {
    let start = Instant::now();
    let mut last: Option<io::Error> = None;
    let mut attempt = POLL;
    let stream = 'dial: loop {
        for addr in addrs {
            let left = w.timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                break;
            }
            match TcpStream::connect_timeout(addr, left.min(attempt)) {
                Ok(s) => break 'dial s,
                Err(e) => {
                    if e.kind() == io::ErrorKind::TimedOut {
                        attempt = (attempt * 2).min(CONNECT_ATTEMPT_MAX);
                    }
                    last = Some(e);
                }
            }
        }
        w.interrupted()?;
        if start.elapsed() >= w.timeout {
            let after_ms = millis(start.elapsed());
            return Err(Fail::Error(match last {
                Some(e) => CollectiveError::Io { peer: name.to_string(), source: io::Error::new(e.kind(), format!("no connection within {after_ms} ms, last error: {e}")) },
                None => CollectiveError::Timeout { op: w.op, peer: name.to_string(), after_ms },
            }));
        }
        thread::sleep(CONNECT_RETRY);
    };
    configure(&stream, w.timeout, name)?;
    let refuse = |reason: String| Fail::Error(CollectiveError::Handshake { peer: name.to_string(), reason });
    write_full(&stream, hello, name, w)?;
    let mut got = [0u8; HELLO_LEN];
    read_full(&stream, &mut got, name, w)?;
    expect.check(&got).map_err(refuse)?;
    let mut tag = [0u8; MAC_LEN];
    read_full(&stream, &mut tag, name, w)?;
    expect.mac_ok("accept", &got, hello, &tag).map_err(refuse)?;
    write_full(&stream, &expect.mac("connect", hello, &got), name, w)?;
    Ok(stream)
}

/// Accepts connections until one is the expected left neighbour. Each incoming connection is
/// handshaken on its own thread (at most [`HANDSHAKES_MAX`] at once, each within
/// [`HANDSHAKE_TIMEOUT`]); one from another address is dropped unread. A refused connection is
/// logged and listed in a later timeout error, never taken for the neighbour.
fn accept_left(listener: &TcpListener, name: &str, allowed: &[std::net::IpAddr], hello: &[u8; HELLO_LEN], expect: &Expect, w: &Waiter) -> Result<TcpStream, Fail> {
    // Non-blocking so the loop can look at the abort flag and the deadline.
    listener.set_nonblocking(true).map_err(|source| io_error(name, source))?;
    let start = Instant::now();
    let done = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<(SocketAddr, Result<TcpStream, Fail>)>();
    let mut refused: Vec<String> = Vec::new();
    let mut in_flight = 0usize;
    let result = thread::scope(|s| {
        let result = 'accept: loop {
            while let Ok((from, r)) = rx.try_recv() {
                in_flight -= 1;
                match r {
                    Ok(stream) => break 'accept Ok(stream),
                    Err(Fail::Error(e @ CollectiveError::Aborted { .. })) => break 'accept Err(Fail::Error(e)),
                    Err(Fail::Stopped) => {}
                    Err(Fail::Error(e)) => {
                        log_refused(from, name, &e);
                        if refused.len() < REFUSED_MAX {
                            refused.push(format!("{from}: {e}"));
                        }
                    }
                }
            }
            let accepted = if in_flight < HANDSHAKES_MAX { listener.accept() } else { Err(io::Error::from(io::ErrorKind::WouldBlock)) };
            match accepted {
                Ok((stream, from)) if !allowed.contains(&from.ip()) => {
                    tracing::warn!("ring: dropped a connection from {from}: the {name} connects from {allowed:?}");
                    if refused.len() < REFUSED_MAX {
                        refused.push(format!("{from}: not the neighbour's address"));
                    }
                    drop(stream);
                }
                Ok((stream, from)) => {
                    in_flight += 1;
                    let tx = tx.clone();
                    let hw = Waiter { op: "handshake", timeout: w.timeout.min(HANDSHAKE_TIMEOUT), abort: w.abort, stop: Some(&done), generation: w.generation };
                    s.spawn(move || {
                        let r = handshake_incoming(stream, name, hello, expect, &hw);
                        let _ = tx.send((from, r));
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(f) = w.interrupted() {
                        break Err(f);
                    }
                    if start.elapsed() >= w.timeout {
                        let after_ms = millis(start.elapsed());
                        break Err(Fail::Error(if refused.is_empty() {
                            CollectiveError::Timeout { op: w.op, peer: name.to_string(), after_ms }
                        } else {
                            CollectiveError::Handshake { peer: name.to_string(), reason: format!("did not connect within {after_ms} ms; dropped {}", refused.join("; ")) }
                        }));
                    }
                    thread::sleep(ACCEPT_POLL);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(io_error(name, e).into()),
            }
        };
        // Stop the handshakes still running; the scope waits for them (within one poll).
        done.store(true, Ordering::Relaxed);
        result
    });
    // Every connection that was not the neighbour is logged, including those whose handshake
    // was still running (or had just been refused) when the neighbour's went through. An abort
    // is the result's own error; the handshakes it ended are not strangers.
    for (from, r) in rx.try_iter() {
        match r {
            Ok(_) => tracing::warn!("ring: dropped a second connection from {from} that handshook as the {name}"),
            Err(Fail::Stopped) => tracing::warn!("ring: dropped a connection from {from}: its handshake was unfinished when the {name} connected"),
            Err(Fail::Error(CollectiveError::Aborted { .. })) => {}
            Err(Fail::Error(e)) => log_refused(from, name, &e),
        }
    }
    result
}

fn log_refused(from: SocketAddr, name: &str, e: &CollectiveError) {
    tracing::warn!("ring: dropped a connection from {from} while waiting for the {name}: {e}");
}

/// The accepting end of a handshake: read the peer's hello, answer with ours and our MAC (even
/// when refusing, so the peer can report a mismatch itself), then check its hello and its MAC.
fn handshake_incoming(stream: TcpStream, name: &str, hello: &[u8; HELLO_LEN], expect: &Expect, w: &Waiter) -> Result<TcpStream, Fail> {
    stream.set_nonblocking(false).map_err(|source| io_error(name, source))?;
    configure(&stream, w.timeout, name)?;
    let refuse = |reason: String| Fail::Error(CollectiveError::Handshake { peer: name.to_string(), reason });
    let mut got = [0u8; HELLO_LEN];
    read_full(&stream, &mut got, name, w)?;
    let mut answer = [0u8; HELLO_LEN + MAC_LEN];
    answer[..HELLO_LEN].copy_from_slice(hello);
    answer[HELLO_LEN..].copy_from_slice(&expect.mac("accept", hello, &got));
    write_full(&stream, &answer, name, w)?;
    expect.check(&got).map_err(refuse)?;
    let mut tag = [0u8; MAC_LEN];
    read_full(&stream, &mut tag, name, w)?;
    expect.mac_ok("connect", &got, hello, &tag).map_err(refuse)?;
    Ok(stream)
}

/// No Nagle delay (pieces and headers go out at once); short socket timeouts so blocked ops
/// wake up to look at the abort flag.
fn configure(stream: &TcpStream, timeout: Duration, name: &str) -> Result<(), CollectiveError> {
    let poll = POLL.min(timeout);
    stream.set_nodelay(true).map_err(|source| io_error(name, source))?;
    stream.set_read_timeout(Some(poll)).map_err(|source| io_error(name, source))?;
    stream.set_write_timeout(Some(poll)).map_err(|source| io_error(name, source))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Blocking reads and writes that can be aborted.

/// Why an internal op ended early: an error to report, or `Stopped` because the other thread
/// of the same op failed (its error is the one reported).
enum Fail {
    Error(CollectiveError),
    Stopped,
}

impl From<CollectiveError> for Fail {
    fn from(e: CollectiveError) -> Self {
        Fail::Error(e)
    }
}

fn protocol(reason: &str) -> Fail {
    Fail::Error(CollectiveError::Protocol { reason: reason.to_string() })
}

fn io_error(peer: &str, source: io::Error) -> CollectiveError {
    CollectiveError::Io { peer: peer.to_string(), source }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// When a blocked op must give up: the abort flag, the other thread's failure, or no progress
/// for `timeout`.
struct Waiter<'a> {
    op: &'static str,
    timeout: Duration,
    abort: Option<&'a AtomicBool>,
    stop: Option<&'a AtomicBool>,
    generation: u64,
}

impl Waiter<'_> {
    /// Err when the abort flag or the stop flag is up. Relaxed loads: the flags carry no data.
    fn interrupted(&self) -> Result<(), Fail> {
        if self.abort.is_some_and(|a| a.load(Ordering::Relaxed)) {
            return Err(CollectiveError::Aborted { generation: self.generation }.into());
        }
        if self.stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            return Err(Fail::Stopped);
        }
        Ok(())
    }

    /// Called when an op would block: Err when it must end, `since` being its last progress.
    fn check(&self, since: Instant, peer: &str) -> Result<(), Fail> {
        self.interrupted()?;
        if since.elapsed() >= self.timeout {
            return Err(CollectiveError::Timeout { op: self.op, peer: peer.to_string(), after_ms: millis(since.elapsed()) }.into());
        }
        Ok(())
    }
}

/// Moves `len` bytes with `step` (one read or write at offset `done`), waiting out socket
/// timeouts through `w`; `closed` describes a peer that makes no more progress.
fn transfer(len: usize, peer: &str, w: &Waiter, closed: (io::ErrorKind, &str), mut step: impl FnMut(usize) -> io::Result<usize>) -> Result<(), Fail> {
    let mut done = 0;
    let mut since = Instant::now();
    while done < len {
        match step(done) {
            Ok(0) => return Err(io_error(peer, io::Error::new(closed.0, closed.1)).into()),
            Ok(k) => {
                done += k;
                since = Instant::now();
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => w.check(since, peer)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(peer, e).into()),
        }
    }
    Ok(())
}

fn read_full(stream: &TcpStream, buf: &mut [u8], peer: &str, w: &Waiter) -> Result<(), Fail> {
    let mut stream = stream;
    let len = buf.len();
    transfer(len, peer, w, (io::ErrorKind::UnexpectedEof, "connection closed by the peer"), |done| stream.read(&mut buf[done..]))
}

fn write_full(stream: &TcpStream, buf: &[u8], peer: &str, w: &Waiter) -> Result<(), Fail> {
    let mut stream = stream;
    transfer(buf.len(), peer, w, (io::ErrorKind::WriteZero, "the connection accepts no more bytes"), |done| stream.write(&buf[done..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    const LENS: [usize; 5] = [0, 1, 3, 1000, (1 << 20) + 7];

    fn opts(timeout_ms: u64) -> RingOptions {
        RingOptions { timeout: Duration::from_millis(timeout_ms), ..RingOptions::default() }
    }

    /// Binds `world` loopback listeners, then runs `body(rank, connect result)` on one thread
    /// per rank and returns what each returned, in rank order.
    fn with_ring<T: Send>(
        world: usize,
        generation: impl Fn(usize) -> u64 + Sync,
        options: impl Fn(usize) -> RingOptions + Sync,
        body: impl Fn(usize, Result<TcpRing, CollectiveError>) -> T + Sync,
    ) -> Vec<T> {
        let listeners: Vec<RingListener> = (0..world).map(|_| TcpRing::listen("127.0.0.1:0").expect("binding loopback")).collect();
        let peers: Vec<String> = listeners.iter().map(|l| l.local_addr().to_string()).collect();
        thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, listener)| {
                    let (peers, generation, options, body) = (&peers, &generation, &options, &body);
                    s.spawn(move || body(rank, TcpRing::connect(&listener, rank, peers, generation(rank), options(rank))))
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
        })
    }

    /// Deterministic, rank-dependent values of both signs.
    fn value(rank: usize, i: usize) -> f32 {
        let h = (i as u64).wrapping_mul(2_654_435_761).wrapping_add(rank as u64 * 97) % 2001;
        (h as f32 - 1000.0) / 256.0 + rank as f32 * 0.5
    }

    fn input(rank: usize, len: usize) -> Vec<f32> {
        (0..len).map(|i| value(rank, i)).collect()
    }

    /// Every rank's result against the f64 sum (relative to the sum of magnitudes, the scale of
    /// f32 rounding error), and every rank bit-identical to rank 0.
    fn check_sums(world: usize, len: usize, outs: &[Vec<f32>]) {
        for (rank, out) in outs.iter().enumerate() {
            assert_eq!(out.len(), len, "world {world} len {len} rank {rank}");
            for (i, &got) in out.iter().enumerate() {
                let exact: f64 = (0..world).map(|r| value(r, i) as f64).sum();
                let scale: f64 = (0..world).map(|r| (value(r, i) as f64).abs()).sum::<f64>().max(1e-30);
                assert!((got as f64 - exact).abs() <= 1e-5 * scale, "world {world} len {len} rank {rank} [{i}]: {got} vs {exact}");
            }
            let bits: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
            let bits0: Vec<u32> = outs[0].iter().map(|v| v.to_bits()).collect();
            assert!(bits == bits0, "world {world} len {len}: rank {rank} differs from rank 0");
        }
    }

    #[test]
    fn all_reduce_matches_f64_sum_bit_identical_on_every_rank() {
        for world in [2, 3, 4] {
            let results = with_ring(
                world,
                |_| 7,
                |_| opts(30_000),
                |rank, ring| {
                    let mut ring = ring?;
                    assert_eq!((ring.rank(), ring.world(), ring.generation()), (rank, world, 7));
                    let mut outs = Vec::new();
                    for len in LENS {
                        let mut buf = input(rank, len);
                        ring.all_reduce_sum(&mut buf)?;
                        outs.push(buf);
                    }
                    let scalar = ring.all_reduce_scalar(rank as f64 + 0.25)?;
                    ring.barrier()?;
                    Ok::<_, CollectiveError>((outs, scalar))
                },
            );
            let results: Vec<_> = results.into_iter().map(|r| r.unwrap_or_else(|e| panic!("world {world}: {e}"))).collect();
            for (k, &len) in LENS.iter().enumerate() {
                let outs: Vec<Vec<f32>> = results.iter().map(|(outs, _)| outs[k].clone()).collect();
                check_sums(world, len, &outs);
            }
            let expected: f64 = (0..world).map(|r| r as f64 + 0.25).sum();
            for (rank, (_, scalar)) in results.iter().enumerate() {
                assert_eq!(scalar.to_bits(), expected.to_bits(), "world {world} rank {rank}");
            }
        }
    }

    #[test]
    fn reduce_scatter_then_all_gather_is_the_sum_on_every_rank() {
        for world in [2, 3, 4] {
            let results = with_ring(
                world,
                |_| 3,
                |_| opts(30_000),
                |rank, ring| {
                    let mut ring = ring?;
                    let mut outs = Vec::new();
                    for len in LENS {
                        let mut buf = input(rank, len);
                        ring.reduce_scatter_sum(&mut buf)?;
                        let own = buf[crate::collective::shard(len, rank, world)].to_vec();
                        ring.all_gather(&mut buf)?;
                        assert_eq!(&buf[crate::collective::shard(len, rank, world)], &own[..], "the all-gather keeps the owner's shard");
                        outs.push(buf);
                    }
                    Ok::<_, CollectiveError>(outs)
                },
            );
            let results: Vec<_> = results.into_iter().map(|r| r.unwrap_or_else(|e| panic!("world {world}: {e}"))).collect();
            for (k, &len) in LENS.iter().enumerate() {
                let outs: Vec<Vec<f32>> = results.iter().map(|outs| outs[k].clone()).collect();
                check_sums(world, len, &outs);
            }
        }
    }

    #[test]
    fn all_gather_copies_each_owners_shard_bit_for_bit() {
        let (world, len) = (3, 1001);
        let results = with_ring(
            world,
            |_| 4,
            |rank| RingOptions { chunk_bytes: [4, 64, 1 << 20][rank], ..opts(30_000) },
            |rank, ring| {
                let mut ring = ring?;
                // Only the owner's shard is meaningful; the rest is overwritten.
                let mut buf: Vec<f32> = (0..len).map(|i| if crate::collective::shard(len, rank, world).contains(&i) { value(7, i) } else { f32::NAN }).collect();
                ring.all_gather(&mut buf)?;
                Ok::<_, CollectiveError>(buf)
            },
        );
        for (rank, r) in results.into_iter().enumerate() {
            let got = r.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
            assert!(got.iter().enumerate().all(|(i, v)| v.to_bits() == value(7, i).to_bits()), "rank {rank} differs");
        }
    }

    #[test]
    fn result_bits_do_not_depend_on_chunk_size() {
        let world = 3;
        let len = 1001;
        let run = |chunk: [usize; 3]| {
            with_ring(
                world,
                |_| 1,
                |rank| RingOptions { chunk_bytes: chunk[rank], ..opts(30_000) },
                |rank, ring| {
                    let mut ring = ring.expect("connect");
                    let mut buf = input(rank, len);
                    ring.all_reduce_sum(&mut buf).expect("all_reduce_sum");
                    buf
                },
            )
        };
        let default = run([1 << 20; 3]);
        // Different piece sizes on different ranks, several not a multiple of 4.
        let odd = run([4, 13, 64]);
        check_sums(world, len, &default);
        check_sums(world, len, &odd);
        let bits = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&default[0]), bits(&odd[0]));
    }

    #[test]
    fn world_one_needs_no_sockets() {
        let listener = TcpRing::listen("127.0.0.1:0").expect("binding loopback");
        let peers = [listener.local_addr().to_string()];
        let mut ring = TcpRing::connect(&listener, 0, &peers, 3, RingOptions::default()).expect("world 1");
        let mut buf = input(0, 5);
        ring.all_reduce_sum(&mut buf).expect("world 1 all-reduce");
        assert_eq!(buf, input(0, 5));
        assert_eq!(ring.all_reduce_scalar(2.5).expect("world 1 scalar"), 2.5);
        ring.barrier().expect("world 1 barrier");
    }

    #[test]
    fn bad_setup_is_an_error() {
        let bind = || TcpRing::listen("127.0.0.1:0").expect("binding loopback");
        let err = TcpRing::connect(&bind(), 0, &[], 0, RingOptions::default()).unwrap_err();
        assert!(matches!(err, CollectiveError::Config { .. }), "{err}");
        let peers = ["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
        let err = TcpRing::connect(&bind(), 2, &peers, 0, RingOptions::default()).unwrap_err();
        assert!(err.to_string().contains("rank 2 is outside a world of 2"), "{err}");
        let err = TcpRing::connect(&bind(), 0, &peers, 0, RingOptions { chunk_bytes: 2, ..RingOptions::default() }).unwrap_err();
        assert!(err.to_string().contains("chunk_bytes"), "{err}");
        let bad = ["127.0.0.1:1".to_string(), "not an address".to_string()];
        let err = TcpRing::connect(&bind(), 0, &bad, 0, RingOptions::default()).unwrap_err();
        assert!(matches!(err, CollectiveError::Config { .. }), "{err}");
    }

    #[test]
    fn peer_from_another_generation_is_refused() {
        let start = Instant::now();
        let results = with_ring(2, |rank| [1, 2][rank], |_| opts(10_000), |_, ring| ring.map(|_| ()));
        let elapsed = start.elapsed();
        let errors: Vec<CollectiveError> = results.into_iter().map(|r| r.expect_err("mismatched ring connected")).collect();
        // The connecting side fails at once; the other may see that side hang up instead.
        let handshake = errors.iter().find(|e| matches!(e, CollectiveError::Handshake { .. })).unwrap_or_else(|| panic!("no handshake error among {errors:?}"));
        let msg = handshake.to_string();
        assert!(msg.contains("generation 1") && msg.contains("generation 2"), "{msg}");
        assert!(elapsed < Duration::from_secs(5), "refusal took {elapsed:?}");
    }

    #[test]
    fn mismatched_lengths_are_a_protocol_error() {
        let results = with_ring(
            2,
            |_| 0,
            |_| opts(10_000),
            |rank, ring| {
                let mut ring = ring.expect("connect");
                let mut buf = input(rank, 10 + rank);
                ring.all_reduce_sum(&mut buf)
            },
        );
        for r in results {
            let err = r.expect_err("lengths differ");
            assert!(matches!(err, CollectiveError::Protocol { .. }), "{err}");
            assert!(err.to_string().contains("over 10 values") && err.to_string().contains("over 11 values"), "{err}");
        }
    }

    #[test]
    fn stranger_on_the_listener_is_refused_and_the_ring_still_forms() {
        let listeners: Vec<RingListener> = (0..2).map(|_| TcpRing::listen("127.0.0.1:0").expect("binding loopback")).collect();
        let peers: Vec<String> = listeners.iter().map(|l| l.local_addr().to_string()).collect();
        // Queued in rank 0's backlog before rank 1 can dial, so rank 0 accepts it first.
        let mut stranger = TcpStream::connect(listeners[0].local_addr()).expect("stranger connects");
        stranger.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").expect("stranger writes");
        let results: Vec<Result<f64, CollectiveError>> = thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, l)| {
                    let peers = &peers;
                    s.spawn(move || TcpRing::connect(&l, rank, peers, 0, opts(10_000))?.all_reduce_scalar(1.0))
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
        });
        for r in results {
            assert_eq!(r.expect("ring with a stranger"), 2.0);
        }
        drop(stranger);
    }

    /// A hello that says all the right things (generation, world, the expected rank) but whose
    /// MAC is not under the ring key is answered, then refused for its MAC, and named in the
    /// error when the real neighbour never comes.
    #[test]
    fn a_forged_hello_with_the_right_rank_is_refused_for_its_mac() {
        let listener = TcpRing::listen("127.0.0.1:0").expect("binding loopback");
        let addr = listener.local_addr();
        let forger = thread::spawn(move || {
            let mut c = TcpStream::connect(addr).expect("forger connects");
            let forged = Hello { generation: 3, rank: 1, world: 2, nonce: [7; 16] }.encode();
            c.write_all(&forged).expect("forger writes its hello");
            let mut answer = [0u8; HELLO_LEN + MAC_LEN];
            c.read_exact(&mut answer).expect("the listener answers a well-formed hello");
            c.write_all(&[0x5a; MAC_LEN]).expect("forger writes a made-up MAC");
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest);
        });
        let hello = Hello { generation: 3, rank: 0, world: 2, nonce: [1; 16] }.encode();
        let expect = Expect { generation: 3, world: 2, peer_rank: 1, key: b"the generation's ring key" };
        let w = Waiter { op: "accept", timeout: Duration::from_millis(1500), abort: None, stop: None, generation: 3 };
        let loopback = [std::net::IpAddr::from([127, 0, 0, 1])];
        let r = accept_left(&listener.listener, "left neighbour rank 1", &loopback, &hello, &expect, &w);
        let Err(Fail::Error(e)) = r else { panic!("the forger was taken for the neighbour") };
        assert!(matches!(e, CollectiveError::Handshake { .. }), "{e}");
        assert!(e.to_string().contains("MAC is wrong"), "{e}");
        forger.join().expect("forger thread");
    }

    #[test]
    fn abort_ends_a_blocked_all_reduce_promptly() {
        let flag = Arc::new(AtomicBool::new(false));
        let done = Barrier::new(2);
        let results = with_ring(
            2,
            |_| 5,
            |rank| RingOptions { abort: (rank == 0).then(|| flag.clone()), ..opts(30_000) },
            |rank, ring| {
                let mut ring = ring.expect("connect");
                let outcome = (rank == 0).then(|| {
                    thread::scope(|s| {
                        s.spawn(|| {
                            // The point of the test: the flag goes up while rank 0 is blocked.
                            thread::sleep(Duration::from_millis(200));
                            flag.store(true, Ordering::Relaxed);
                        });
                        let start = Instant::now();
                        let mut buf = input(0, 1000);
                        let r = ring.all_reduce_sum(&mut buf);
                        let again = ring.all_reduce_sum(&mut buf);
                        (r, again, start.elapsed())
                    })
                });
                // Rank 1 stays connected but never calls all_reduce, until rank 0 is done.
                done.wait();
                drop(ring);
                outcome
            },
        );
        let (r, again, elapsed) = results.into_iter().next().flatten().expect("rank 0 outcome");
        assert!(matches!(r, Err(CollectiveError::Aborted { generation: 5 })), "{r:?}");
        assert!(matches!(again, Err(CollectiveError::Aborted { .. } | CollectiveError::Protocol { .. })), "{again:?}");
        assert!(elapsed >= Duration::from_millis(150) && elapsed < Duration::from_secs(3), "aborted after {elapsed:?}");
    }

    #[test]
    fn silent_peer_times_out_naming_the_op() {
        let done = Barrier::new(2);
        let results = with_ring(
            2,
            |_| 0,
            |_| opts(300),
            |rank, ring| {
                let mut ring = ring.expect("connect");
                let outcome = (rank == 0).then(|| {
                    let start = Instant::now();
                    let mut buf = input(0, 1000);
                    let r = ring.all_reduce_sum(&mut buf);
                    let elapsed = start.elapsed();
                    (r, ring.barrier(), elapsed)
                });
                // Rank 1 stays connected, silent, until rank 0 is done.
                done.wait();
                drop(ring);
                outcome
            },
        );
        let (r, next, elapsed) = results.into_iter().next().flatten().expect("rank 0 outcome");
        match r {
            Err(CollectiveError::Timeout { op, after_ms, .. }) => {
                assert_eq!(op, "all_reduce_sum");
                assert!(after_ms >= 300, "{after_ms}");
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(elapsed < Duration::from_secs(3), "timed out after {elapsed:?}");
        let next = next.expect_err("a broken ring refuses further ops");
        assert!(next.to_string().contains("broken"), "{next}");
    }
}
