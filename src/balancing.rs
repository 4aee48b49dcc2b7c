//! Sticky, consistent choice of a worker within a pool: rendezvous (highest
//! random weight) hashing.
//!
//! Every member scores each key; the highest score wins. Membership comes from
//! configuration and is never rebuilt from health: a down worker is merely
//! skipped at pick time, so only its own keys move (to each key's next-best
//! worker) and they come back when it does. Scores depend only on the key and
//! the worker's name, hashed with a fixed seed, so every edge instance given
//! the same config, and every restart, chooses the same worker.

use std::sync::atomic::{AtomicU64, Ordering};

use smallvec::SmallVec;
use xxhash_rust::xxh3::{Xxh3, xxh3_64_with_seed};

use crate::topology::{Topology, WorkerId, WorkerPool};

/// Fixed seed: never `RandomState`, or instances and restarts would disagree.
const SEED: u64 = 0x5359_4e41_5053_4531;

/// The hash of a worker's stable identity (its Synapse `worker_name`).
pub fn identity_hash(name: &str) -> u64 {
    xxh3_64_with_seed(name.as_bytes(), SEED)
}

/// The hash of a sticky key's bytes.
pub fn key_hash(bytes: &[u8]) -> u64 {
    xxh3_64_with_seed(bytes, SEED)
}

/// The hash of percent-encoded bytes as if they had been decoded first, so
/// `%21room%3Aserver` and `!room:server` hash alike, without allocating.
pub fn key_hash_percent_decoded(raw: &[u8]) -> u64 {
    if !raw.contains(&b'%') {
        return key_hash(raw);
    }
    let mut hasher = Xxh3::with_seed(SEED);
    let mut buf = [0u8; 64];
    let mut n = 0;
    for b in percent_encoding::percent_decode(raw) {
        buf[n] = b;
        n += 1;
        if n == buf.len() {
            hasher.update(&buf);
            n = 0;
        }
    }
    hasher.update(&buf[..n]);
    hasher.digest()
}

/// The score of a worker for a key; the highest score owns the key.
#[inline]
fn score(key: u64, identity: u64) -> u64 {
    xxh3_64_with_seed(&key.to_le_bytes(), identity)
}

/// Whether a worker may be picked now. Health is kept apart from selection.
pub trait Health {
    fn is_up(&self, worker: WorkerId) -> bool;
}

/// Every worker is up (no health checks yet, and the CLI's explanations).
#[derive(Debug, Clone, Copy, Default)]
pub struct AllUp;

impl Health for AllUp {
    fn is_up(&self, _: WorkerId) -> bool {
        true
    }
}

impl<F: Fn(WorkerId) -> bool> Health for F {
    fn is_up(&self, worker: WorkerId) -> bool {
        self(worker)
    }
}

/// A source of keys for routes that want requests spread, not stuck.
static SPREAD: AtomicU64 = AtomicU64::new(0);

/// A fresh key for spreading requests over a pool.
pub fn spread_key() -> u64 {
    // Successive counter values hash to unrelated scores, so this spreads
    // evenly while staying on the one rendezvous code path.
    key_hash(&SPREAD.fetch_add(1, Ordering::Relaxed).to_le_bytes())
}

/// The members of a pool in the order a key prefers them: the first is the
/// key's owner, the next its failover, and so on.
pub type Candidates = SmallVec<[WorkerId; 16]>;

/// Chooses workers for keys. Stateless: the topology is the data.
pub struct Selector<'t> {
    topology: &'t Topology,
}

impl<'t> Selector<'t> {
    pub fn new(topology: &'t Topology) -> Self {
        Selector { topology }
    }

    /// The key's owner among the pool's live members, or `None` when none
    /// is up.
    pub fn pick(&self, pool: &WorkerPool, key: u64, health: &impl Health) -> Option<WorkerId> {
        let mut best: Option<(u64, WorkerId)> = None;
        for &id in &pool.members {
            if !health.is_up(id) {
                continue;
            }
            let s = score(key, self.topology.worker(id).identity);
            if best.is_none_or(|(b, _)| s > b) {
                best = Some((s, id));
            }
        }
        best.map(|(_, id)| id)
    }

    /// All members, best first, regardless of health (for failover).
    pub fn candidates(&self, pool: &WorkerPool, key: u64) -> Candidates {
        let mut scored: SmallVec<[(u64, WorkerId); 16]> = pool
            .members
            .iter()
            .map(|&id| (score(key, self.topology.worker(id).identity), id))
            .collect();
        scored.sort_unstable_by_key(|&(s, _)| std::cmp::Reverse(s));
        scored.into_iter().map(|(_, id)| id).collect()
    }
}
