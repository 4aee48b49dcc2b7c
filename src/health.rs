//! Worker health, kept apart from selection (as pingora-load-balancing
//! does): membership comes from configuration, health is a flag per worker
//! read at pick time. Active checks (`GET /health`) flip a worker down after
//! N consecutive failures and up after M consecutive successes, so a
//! flapping worker does not bounce its rooms back and forth; a failed
//! connect marks it down at once (passive detection).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use serde::Deserialize;

use crate::balancing::Health;
use crate::topology::{Topology, WorkerId};

/// Health-check settings (`health:` in edge.yaml).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSettings {
    /// Time between checks of each worker.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// How long a check may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive failed checks before a worker is taken out.
    pub unhealthy_after: u32,
    /// Consecutive good checks before a worker that was out takes its keys back.
    pub healthy_after: u32,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            interval: Duration::from_secs(3),
            timeout: Duration::from_secs(2),
            unhealthy_after: 2,
            healthy_after: 2,
        }
    }
}

#[derive(Debug)]
struct WorkerHealth {
    up: AtomicBool,
    fails: AtomicU32,
    oks: AtomicU32,
}

/// A change of a worker's state, to be logged once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Down,
    Up,
}

/// Health of every worker of one topology, indexed by `WorkerId`.
#[derive(Debug)]
pub struct HealthTable {
    workers: Vec<WorkerHealth>,
}

impl Health for HealthTable {
    fn is_up(&self, worker: WorkerId) -> bool {
        self.workers
            .get(worker.0 as usize)
            .is_some_and(|w| w.up.load(Ordering::Relaxed))
    }
}

impl HealthTable {
    /// Every worker up (a worker is trusted until it fails).
    pub fn new(topology: &Topology) -> HealthTable {
        HealthTable {
            workers: topology
                .workers
                .iter()
                .map(|_| WorkerHealth {
                    up: AtomicBool::new(true),
                    fails: AtomicU32::new(0),
                    oks: AtomicU32::new(0),
                })
                .collect(),
        }
    }

    /// For a reloaded topology: workers that existed keep their state (by
    /// name), new ones start up.
    pub fn carried_over(
        topology: &Topology,
        old: &HealthTable,
        old_topology: &Topology,
    ) -> HealthTable {
        let table = HealthTable::new(topology);
        for (i, w) in topology.workers.iter().enumerate() {
            if let Some(old_id) = old_topology.worker_id(&w.name)
                && let Some(prev) = old.workers.get(old_id.0 as usize)
            {
                let cur = &table.workers[i];
                cur.up
                    .store(prev.up.load(Ordering::Relaxed), Ordering::Relaxed);
                cur.fails
                    .store(prev.fails.load(Ordering::Relaxed), Ordering::Relaxed);
                cur.oks
                    .store(prev.oks.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
        table
    }

    /// Records one active check's result.
    pub fn observe(
        &self,
        worker: WorkerId,
        ok: bool,
        settings: &HealthSettings,
    ) -> Option<Transition> {
        let w = self.workers.get(worker.0 as usize)?;
        if ok {
            w.fails.store(0, Ordering::Relaxed);
            let oks = w.oks.fetch_add(1, Ordering::Relaxed) + 1;
            (oks >= settings.healthy_after && !w.up.swap(true, Ordering::Relaxed))
                .then_some(Transition::Up)
        } else {
            w.oks.store(0, Ordering::Relaxed);
            let fails = w.fails.fetch_add(1, Ordering::Relaxed) + 1;
            (fails >= settings.unhealthy_after && w.up.swap(false, Ordering::Relaxed))
                .then_some(Transition::Down)
        }
    }

    /// A request could not connect: out at once; checks bring it back.
    pub fn mark_down(&self, worker: WorkerId) -> Option<Transition> {
        let w = self.workers.get(worker.0 as usize)?;
        w.oks.store(0, Ordering::Relaxed);
        w.up.swap(false, Ordering::Relaxed)
            .then_some(Transition::Down)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(n: usize) -> HealthTable {
        HealthTable {
            workers: (0..n)
                .map(|_| WorkerHealth {
                    up: AtomicBool::new(true),
                    fails: AtomicU32::new(0),
                    oks: AtomicU32::new(0),
                })
                .collect(),
        }
    }

    #[test]
    fn down_after_n_failures_up_after_m_successes() {
        let s = HealthSettings::default();
        let t = table(2);
        let w = WorkerId(1);
        assert_eq!(t.observe(w, false, &s), None);
        assert!(t.is_up(w), "one failed check is not enough");
        assert_eq!(t.observe(w, false, &s), Some(Transition::Down));
        assert!(!t.is_up(w));
        assert_eq!(t.observe(w, false, &s), None, "the change is reported once");
        assert_eq!(t.observe(w, true, &s), None);
        assert!(!t.is_up(w), "hold-down: one good check is not enough");
        assert_eq!(t.observe(w, false, &s), None);
        assert_eq!(t.observe(w, true, &s), None);
        assert_eq!(t.observe(w, true, &s), Some(Transition::Up));
        assert!(t.is_up(w));
        assert!(t.is_up(WorkerId(0)));
    }

    #[test]
    fn a_failed_connect_takes_a_worker_out_at_once() {
        let s = HealthSettings::default();
        let t = table(1);
        assert_eq!(t.mark_down(WorkerId(0)), Some(Transition::Down));
        assert_eq!(t.mark_down(WorkerId(0)), None);
        assert_eq!(t.observe(WorkerId(0), true, &s), None);
        assert_eq!(t.observe(WorkerId(0), true, &s), Some(Transition::Up));
    }
}
