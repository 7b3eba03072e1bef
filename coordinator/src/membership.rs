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

/// Worker secrets and leases.
#[derive(Debug)]
pub struct Membership {
    key: [u8; 32],
    lease: Duration,
    live: Mutex<HashMap<u64, Lease>>,
}

impl Membership {
    /// `key`: the store's worker key; `lease_ms`: how long a heartbeat keeps a worker alive.
    pub fn new(key: [u8; 32], lease_ms: u64) -> Self {
        Membership { key, lease: Duration::from_millis(lease_ms), live: Mutex::default() }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Lease>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The secret of worker `id` registered by process `instance`.
    pub fn secret(&self, id: u64, instance: &str) -> [u8; 32] {
        mac(&self.key, &[b"liandan worker secret v1", &id.to_le_bytes(), instance.as_bytes()])
    }

    /// Gives worker `id` a fresh lease; returns its secret.
    pub fn admit(&self, id: u64, instance: &str) -> [u8; 32] {
        let secret = self.secret(id, instance);
        self.live().insert(id, Lease { secret, until: Instant::now() + self.lease, last_ms: now_ms() });
        secret
    }

    /// Checks a worker's credential without renewing its lease.
    pub fn check(&self, id: u64, presented: &[u8]) -> Result<(), Denied> {
        let live = self.live();
        let lease = live.get(&id).ok_or(Denied::Unknown)?;
        if constant_time_eq(&lease.secret, presented) { Ok(()) } else { Err(Denied::WrongSecret) }
    }

    /// A heartbeat: checks the credential and renews the lease.
    pub fn renew(&self, id: u64, presented: &[u8]) -> Result<(), Denied> {
        let mut live = self.live();
        let lease = live.get_mut(&id).ok_or(Denied::Unknown)?;
        if !constant_time_eq(&lease.secret, presented) {
            return Err(Denied::WrongSecret);
        }
        lease.until = Instant::now() + self.lease;
        lease.last_ms = now_ms();
        Ok(())
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

    #[test]
    fn secrets_are_per_worker_and_per_instance() {
        let m = Membership::new([7; 32], 60_000);
        let a = m.admit(1, "instance-a");
        assert_eq!(m.check(1, &a), Ok(()));
        assert_eq!(m.admit(1, "instance-a"), a, "the same worker and instance get the same secret back");
        assert_ne!(m.secret(1, "instance-b"), a);
        assert_ne!(m.secret(2, "instance-a"), a);
        assert_ne!(Membership::new([8; 32], 1).secret(1, "instance-a"), a, "another store's key gives other secrets");
        assert_eq!(m.check(1, &m.secret(2, "instance-a")), Err(Denied::WrongSecret));
        assert_eq!(m.renew(1, b""), Err(Denied::WrongSecret));
        assert_eq!(m.check(2, &a), Err(Denied::Unknown));
    }

    #[test]
    fn leases_run_out_unless_renewed() {
        let m = Membership::new([1; 32], 30);
        let a = m.admit(1, "a");
        let b = m.admit(2, "b");
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
