//! Who the workers are and whether they are alive, in memory.
//!
//! Identity: at Register the coordinator issues each worker a secret,
//! `HMAC-SHA256(store key, worker id ‖ instance id)`, where the store key is random, made once
//! and kept in the store, and the instance id is the worker process's own random id. Every later
//! worker call carries the secret; it is checked here, in constant time, before anything else.
//! Deriving instead of storing secrets means a restarted coordinator still knows every worker's
//! secret, and a Register retried with the same instance gets the same secret back.
//!
//! Liveness: each heartbeat renews the worker's lease here, not in the store: 10,000 workers
//! heartbeating twice a second would otherwise be 20,000 writes a second. Only a death (a lease
//! that ran out) is written. A restarted coordinator gives every worker it knows a fresh lease,
//! which is what it did when leases were in the store.
//!
//! Pacing: the coordinator tells each worker, at Register and in every heartbeat reply, how long
//! to wait before its next heartbeat. The interval is the configured one until the workers would
//! send more than `max_heartbeats_per_s` between them; beyond that it grows with their number
//! (10,000 workers at 5,000 a second: every 2 s), so the heartbeat load stays bounded however
//! large the cluster grows. Each lease is renewed for the interval just handed out plus the
//! configured grace (`lease − heartbeat`), so a worker that follows the reply is never late.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use liandan_proto::auth::{constant_time_eq, mac};

use crate::store::now_ms;

/// Why a worker's credential was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// The id has no lease: never registered, declared dead, or pruned.
    Unknown,
    /// The id is known but the secret is not its secret.
    WrongSecret,
}

#[derive(Debug)]
struct Lease {
    secret: [u8; 32],
    until: Instant,
    last_ms: u64,
}

/// How often workers heartbeat and how long a heartbeat keeps one alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pacing {
    /// A heartbeat keeps a worker alive this long at the base interval, milliseconds.
    pub lease_ms: u64,
    /// The base heartbeat interval, milliseconds.
    pub heartbeat_ms: u64,
    /// Most heartbeats per second all workers together are asked to send (0: no limit).
    pub max_heartbeats_per_s: u64,
}

impl Pacing {
    /// The interval to hand out with `live` workers, and the lease that goes with it.
    pub fn at(&self, live: usize) -> (Duration, Duration) {
        let spread = if self.max_heartbeats_per_s == 0 { 0 } else { (live as u64).saturating_mul(1000).div_ceil(self.max_heartbeats_per_s) };
        let every = self.heartbeat_ms.max(spread);
        let grace = self.lease_ms.saturating_sub(self.heartbeat_ms);
        (Duration::from_millis(every), Duration::from_millis(every.saturating_add(grace)))
    }
}

/// What a worker is told at Register and in each heartbeat reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewed {
    /// Wait this long before the next heartbeat.
    pub heartbeat_ms: u64,
    /// The lease just granted.
    pub lease_ms: u64,
}

/// Worker secrets and leases.
#[derive(Debug)]
pub struct Membership {
    key: [u8; 32],
    pacing: Pacing,
    live: Mutex<HashMap<u64, Lease>>,
}

impl Membership {
    /// `key`: the store's worker key; `pacing`: heartbeat interval and lease.
    pub fn new(key: [u8; 32], pacing: Pacing) -> Self {
        Membership { key, pacing, live: Mutex::default() }
    }

    /// Renews `lease` (inserted or found) for the interval `live` workers get.
    fn grant(&self, lease: &mut Lease, live: usize) -> Renewed {
        let (every, lease_for) = self.pacing.at(live);
        lease.until = Instant::now() + lease_for;
        lease.last_ms = now_ms();
        Renewed { heartbeat_ms: every.as_millis() as u64, lease_ms: lease_for.as_millis() as u64 }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Lease>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The secret of worker `id` registered by process `instance`.
    pub fn secret(&self, id: u64, instance: &str) -> [u8; 32] {
        mac(&self.key, &[b"liandan worker secret v1", &id.to_le_bytes(), instance.as_bytes()])
    }

    /// Gives worker `id` a fresh lease; returns its secret and its pacing.
    pub fn admit(&self, id: u64, instance: &str) -> ([u8; 32], Renewed) {
        let secret = self.secret(id, instance);
        let mut live = self.live();
        let n = live.len() + usize::from(!live.contains_key(&id));
        let lease = live.entry(id).or_insert(Lease { secret, until: Instant::now(), last_ms: 0 });
        lease.secret = secret;
        let renewed = self.grant(lease, n);
        (secret, renewed)
    }

    /// After a restart: a fresh lease for every worker the store knows, at the interval all of
    /// them together get (they may be heartbeating that slowly already).
    pub fn restore(&self, known: &[(u64, String)]) {
        let mut live = self.live();
        for (id, instance) in known {
            live.insert(*id, Lease { secret: self.secret(*id, instance), until: Instant::now(), last_ms: 0 });
        }
        let n = live.len();
        for lease in live.values_mut() {
            self.grant(lease, n);
        }
    }

    /// Checks a worker's credential without renewing its lease.
    pub fn check(&self, id: u64, presented: &[u8]) -> Result<(), Denied> {
        let live = self.live();
        let lease = live.get(&id).ok_or(Denied::Unknown)?;
        if constant_time_eq(&lease.secret, presented) { Ok(()) } else { Err(Denied::WrongSecret) }
    }

    /// A heartbeat: checks the credential and renews the lease.
    pub fn renew(&self, id: u64, presented: &[u8]) -> Result<Renewed, Denied> {
        let mut live = self.live();
        let n = live.len();
        let lease = live.get_mut(&id).ok_or(Denied::Unknown)?;
        if !constant_time_eq(&lease.secret, presented) {
            return Err(Denied::WrongSecret);
        }
        Ok(self.grant(lease, n))
    }

    /// The workers whose lease ran out, with their last heartbeat time. They keep their entry
    /// until [`forget_overdue`](Self::forget_overdue), called once their death is in the store.
    pub fn overdue(&self) -> Vec<(u64, u64)> {
        let now = Instant::now();
        self.live().iter().filter(|(_, l)| l.until < now).map(|(id, l)| (*id, l.last_ms)).collect()
    }

    /// Removes the entries of `dead` that are still overdue (one renewed meanwhile stays).
    pub fn forget_overdue(&self, dead: &[(u64, u64)]) {
        let now = Instant::now();
        let mut live = self.live();
        for (id, _) in dead {
            if live.get(id).is_some_and(|l| l.until < now) {
                live.remove(id);
            }
        }
    }

    /// When worker `id` was last heard from (None: no lease).
    pub fn last_heartbeat_ms(&self, id: u64) -> Option<u64> {
        self.live().get(&id).map(|l| l.last_ms)
    }

    /// Workers with a lease.
    pub fn len(&self) -> usize {
        self.live().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lease of `ms` at a 1 ms base interval, no rate limit.
    fn pacing(ms: u64) -> Pacing {
        Pacing { lease_ms: ms, heartbeat_ms: 1, max_heartbeats_per_s: 0 }
    }

    #[test]
    fn the_interval_grows_with_the_cluster_past_the_rate_limit() {
        let p = Pacing { lease_ms: 3000, heartbeat_ms: 500, max_heartbeats_per_s: 5000 };
        assert_eq!(p.at(1), (Duration::from_millis(500), Duration::from_millis(3000)));
        assert_eq!(p.at(2500), (Duration::from_millis(500), Duration::from_millis(3000)), "2,500 workers at 500 ms send exactly the limit");
        assert_eq!(p.at(10_000), (Duration::from_millis(2000), Duration::from_millis(4500)), "the grace (lease − interval) is kept");
        assert_eq!(p.at(10_001).0, Duration::from_millis(2001), "rounded up, never over the limit");
        let m = Membership::new([3; 32], Pacing { max_heartbeats_per_s: 2, ..p });
        let (a, first) = m.admit(1, "a");
        assert_eq!(first, Renewed { heartbeat_ms: 500, lease_ms: 3000 });
        m.admit(2, "b");
        m.admit(3, "c");
        assert_eq!(m.renew(1, &a), Ok(Renewed { heartbeat_ms: 1500, lease_ms: 4000 }), "3 workers at 2 a second: every 1.5 s");
    }

    #[test]
    fn secrets_are_per_worker_and_per_instance() {
        let m = Membership::new([7; 32], pacing(60_000));
        let a = m.admit(1, "instance-a").0;
        assert_eq!(m.check(1, &a), Ok(()));
        assert_eq!(m.admit(1, "instance-a").0, a, "the same worker and instance get the same secret back");
        assert_ne!(m.secret(1, "instance-b"), a);
        assert_ne!(m.secret(2, "instance-a"), a);
        assert_ne!(Membership::new([8; 32], pacing(1)).secret(1, "instance-a"), a, "another store's key gives other secrets");
        assert_eq!(m.check(1, &m.secret(2, "instance-a")), Err(Denied::WrongSecret));
        assert_eq!(m.renew(1, b""), Err(Denied::WrongSecret));
        assert_eq!(m.check(2, &a), Err(Denied::Unknown));
    }

    #[test]
    fn leases_run_out_unless_renewed() {
        let m = Membership::new([1; 32], pacing(30));
        let a = m.admit(1, "a").0;
        let b = m.admit(2, "b").0;
        for _ in 0..4 {
            std::thread::sleep(Duration::from_millis(10));
            m.renew(1, &a).unwrap();
        }
        let dead = m.overdue();
        assert_eq!(dead.iter().map(|d| d.0).collect::<Vec<_>>(), [2]);
        assert_eq!(m.check(2, &b), Ok(()), "overdue, but not forgotten before its death is stored");
        m.forget_overdue(&dead);
        assert_eq!(m.check(2, &b), Err(Denied::Unknown), "a dead worker must register again");
        assert_eq!(m.len(), 1);
    }
}
