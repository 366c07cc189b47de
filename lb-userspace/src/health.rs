//! Health checking: the per-backend state machine (pure, in [`Tracker`]) and the tasks that run
//! the probes on a schedule ([`Scheduler`]).
//!
//! Contract:
//! - A backend starts [`Health::Unknown`] and counts as healthy, so an agent (re)start never
//!   empties a table before the first checks ran; the first result decides at once (a first
//!   failure takes it down, a first success confirms it up). After that, `fall` consecutive
//!   failures take an up backend down and `rise` consecutive successes bring a down one back.
//!   A result that agrees with the current state resets the opposite streak, so a flapping
//!   backend changes state only when a full streak completes.
//! - Each check runs on a fixed period of `interval`, measured from the start of one check to
//!   the start of the next, so a dead backend is out within `fall x interval + timeout`. The
//!   first check of each backend starts at a random point within its first interval, so that
//!   thousands of backends do not fire together.
//! - Probe tasks never touch the maps: they send [`Report`]s, and the agent hands them to the
//!   reconciler. A report from a check that has since been stopped or replaced (its backend
//!   removed, its settings changed) is recognised by its id and ignored.

use std::{
    collections::HashMap,
    hash::{BuildHasher as _, RandomState},
    net::IpAddr,
    time::Duration,
};

use serde::Serialize;
use tokio::{sync::mpsc, task::JoinHandle};

use crate::{
    config::{HealthCheck, Protocol},
    probe::{self, Outcome, Probe, Target},
};

/// What the checks say about a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// No result yet; counts as healthy.
    Unknown,
    Up,
    Down,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Up => "up",
            Health::Down => "down",
        }
    }

    /// May take traffic, as far as the checks know.
    pub fn healthy(self) -> bool {
        self != Health::Down
    }
}

/// A change of [`Health`], with the streak that caused it (`streak` of `needed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: Health,
    pub to: Health,
    pub streak: u32,
    pub needed: u32,
}

/// The rise/fall state machine of one backend.
#[derive(Clone, Debug)]
pub struct Tracker {
    state: Health,
    /// Consecutive results that disagree with `state`.
    streak: u32,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            state: Health::Unknown,
            streak: 0,
        }
    }
}

impl Tracker {
    pub fn state(&self) -> Health {
        self.state
    }

    /// Consecutive results against the current state (successes while down, failures while
    /// up).
    pub fn streak(&self) -> u32 {
        self.streak
    }

    /// Takes one result into account; returns the transition it caused, if any.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<Transition> {
        let (to, needed) = match (self.state, ok) {
            (Health::Unknown, true) => (Health::Up, 1),
            (Health::Unknown, false) => (Health::Down, 1),
            (Health::Up, true) | (Health::Down, false) => {
                self.streak = 0;
                return None;
            }
            (Health::Up, false) => (Health::Down, fall.max(1)),
            (Health::Down, true) => (Health::Up, rise.max(1)),
        };
        self.streak += 1;
        if self.streak < needed {
            return None;
        }
        let t = Transition {
            from: self.state,
            to,
            streak: self.streak,
            needed,
        };
        self.state = to;
        self.streak = 0;
        Some(t)
    }
}

/// Identifies one backend of one VIP: the VIP's (address, port, protocol) and the backend.
pub type CheckKey = ((IpAddr, u16, Protocol), IpAddr);

/// One backend to check, as the reconciler describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckSpec {
    pub key: CheckKey,
    pub target: Target,
    pub check: HealthCheck,
}

/// One result of one check.
#[derive(Debug)]
pub struct Report {
    pub id: u64,
    pub key: CheckKey,
    pub outcome: Outcome,
}

struct Running {
    id: u64,
    spec: CheckSpec,
    task: JoinHandle<()>,
}

/// Runs one task per checked backend and keeps the set of tasks equal to what it is told.
pub struct Scheduler {
    running: HashMap<CheckKey, Running>,
    tx: mpsc::Sender<Report>,
    next_id: u64,
    random: RandomState,
}

impl Scheduler {
    pub fn new(tx: mpsc::Sender<Report>) -> Scheduler {
        Scheduler {
            running: HashMap::new(),
            tx,
            next_id: 1,
            random: RandomState::new(),
        }
    }

    /// Starts checks that are new or whose settings changed, and stops those no longer wanted.
    /// Backends with `kind = "none"` get no task. A restarted check does not reset its
    /// backend's state, which the reconciler keeps: a down backend stays down until it rises.
    pub fn sync(&mut self, wanted: Vec<CheckSpec>) {
        let mut wanted: HashMap<CheckKey, CheckSpec> = wanted
            .into_iter()
            .filter(|s| s.check.probe != Probe::None)
            .map(|s| (s.key, s))
            .collect();
        self.running.retain(|key, r| {
            let keep = wanted.get(key) == Some(&r.spec);
            if keep {
                wanted.remove(key);
            } else {
                r.task.abort();
            }
            keep
        });
        for (key, spec) in wanted {
            let id = self.next_id;
            self.next_id += 1;
            let jitter = spec
                .check
                .interval
                .mul_f64(self.random.hash_one(id) as f64 / u64::MAX as f64);
            let task = tokio::spawn(check_loop(id, spec.clone(), jitter, self.tx.clone()));
            self.running.insert(key, Running { id, spec, task });
        }
    }

    /// Whether `report` comes from the check currently running for its backend.
    pub fn is_current(&self, report: &Report) -> bool {
        self.running
            .get(&report.key)
            .is_some_and(|r| r.id == report.id)
    }

    pub fn len(&self) -> usize {
        self.running.len()
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    pub fn stop_all(&mut self) {
        for (_, r) in self.running.drain() {
            r.task.abort();
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.stop_all();
    }
}

async fn check_loop(id: u64, spec: CheckSpec, jitter: Duration, tx: mpsc::Sender<Report>) {
    let start = tokio::time::Instant::now() + jitter;
    let mut ticks = tokio::time::interval_at(start, spec.check.interval);
    // A check that overran (only possible if the runtime stalled, since timeout <= interval)
    // pushes the schedule back rather than firing a burst.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let outcome = probe::run(&spec.check.probe, &spec.target, spec.check.timeout).await;
        let report = Report {
            id,
            key: spec.key,
            outcome,
        };
        if tx.send(report).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(t: &mut Tracker, results: &str, rise: u32, fall: u32) -> Vec<Health> {
        results
            .chars()
            .map(|c| {
                t.record(c == '+', rise, fall);
                t.state()
            })
            .collect()
    }

    #[test]
    fn the_first_result_decides() {
        let mut t = Tracker::default();
        assert_eq!(t.state(), Health::Unknown);
        assert!(t.state().healthy());
        let tr = t.record(false, 2, 3).unwrap();
        assert_eq!((tr.from, tr.to), (Health::Unknown, Health::Down));
        let mut t = Tracker::default();
        assert_eq!(t.record(true, 2, 3).unwrap().to, Health::Up);
    }

    #[test]
    fn fall_consecutive_failures_take_it_down_and_rise_successes_bring_it_back() {
        use Health::{Down, Up};
        let mut t = Tracker::default();
        assert_eq!(run(&mut t, "+--", 2, 3), [Up, Up, Up]);
        let tr = t.record(false, 2, 3).unwrap();
        assert_eq!((tr.to, tr.streak, tr.needed), (Down, 3, 3));
        assert_eq!(run(&mut t, "+", 2, 3), [Down]);
        let tr = t.record(true, 2, 3).unwrap();
        assert_eq!((tr.to, tr.streak, tr.needed), (Up, 2, 2));
    }

    #[test]
    fn flapping_never_completes_a_streak() {
        let mut t = Tracker::default();
        t.record(true, 2, 3);
        // Alternating results: every success resets the failure streak.
        for state in run(&mut t, "-+--+--+-+--+", 2, 3) {
            assert_eq!(state, Health::Up);
        }
        // Down, then alternating: every failure resets the success streak.
        run(&mut t, "---", 2, 3);
        assert_eq!(t.state(), Health::Down);
        for state in run(&mut t, "+-+-+-", 2, 3) {
            assert_eq!(state, Health::Down);
        }
    }

    #[test]
    fn rise_and_fall_of_one_switch_on_every_change() {
        use Health::{Down, Up};
        let mut t = Tracker::default();
        assert_eq!(run(&mut t, "+-+-", 1, 1), [Up, Down, Up, Down]);
    }
}
