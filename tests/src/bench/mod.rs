//! `cargo xtask bench`: the data path, the control plane and the whole system, measured side by
//! side in one run (see the `xdplb-bench` binary).
//!
//! Every headline figure is a ratio or a difference between measurements taken in the same run,
//! round by round, reported as min / median / max over the rounds: these machines are shared and
//! noisy, so absolute numbers from different runs are not comparable, ratios from one run are.
//!
//! Modules:
//! - [`datapath`]: ns per packet of the real program with `BPF_PROG_TEST_RUN`, every iteration on
//!   a fresh copy of the frame, next to two floor programs from the same object;
//! - [`control`]: Maglev build time, memory, balance and disruption; time for a change to be live;
//! - [`e2e`]: client -> load balancer -> 3 backends in namespaces: xdplb, nftables DNAT, HAProxy
//!   and no load balancer, same topology and workload;
//! - [`failover`]: the client-visible outage when the VRRP master dies, xdplb's `[ha]` against
//!   keepalived, at the default advert interval and at 100 ms;
//! - [`report`]: the terminal table, the JSON file and the SVG chart.

pub mod control;
pub mod datapath;
pub mod e2e;
pub mod failover;
pub mod report;

use std::collections::BTreeMap;

use serde::Serialize;

/// min / median / max of one figure over the rounds of a run, with the samples themselves.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Stats {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

impl Stats {
    /// Summary of `samples` (in the order they were taken). Empty input gives all zeros.
    pub fn of(samples: Vec<f64>) -> Stats {
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        if n == 0 {
            return Stats::default();
        }
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Stats {
            min: sorted[0],
            median,
            max: sorted[n - 1],
            samples,
        }
    }

    /// `min / median / max` with `digits` decimals.
    pub fn show(&self, digits: usize) -> String {
        format!(
            "{:.d$} / {:.d$} / {:.d$}",
            self.min,
            self.median,
            self.max,
            d = digits
        )
    }
}

/// The `q` quantile (0..=1) of `values` by nearest rank; 0 for no values.
pub fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = (q * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

/// Pins the calling thread (only) to `cpu`; threads it starts afterwards inherit the pinning.
pub fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes within it; sched_setaffinity(0, ..)
    // changes the calling thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            anyhow::bail!(
                "cannot pin to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// One target of the issue, checked against a figure of this run.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// What is compared, e.g. "new TCP flow, cost above the XDP_TX floor".
    pub name: String,
    /// The target, e.g. "<= 120 ns".
    pub target: String,
    /// The figure, e.g. "83 ns (median of 5 rounds)".
    pub measured: String,
    pub holds: bool,
}

/// Where the run happened.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub memory_gib: f64,
    /// `git rev-parse --short HEAD` (with `-dirty` if the tree has changes), if available.
    pub commit: String,
    /// UTC, RFC 3339.
    pub date: String,
}

/// Everything one `xdplb-bench` run measured. Sections not run are `None`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub quick: bool,
    pub datapath: Option<datapath::DatapathReport>,
    pub control: Option<control::ControlReport>,
    pub e2e: Option<e2e::E2eReport>,
    pub failover: Option<failover::FailoverReport>,
    /// Every target, in the order of the issue.
    pub checks: Vec<Check>,
    /// Free-form remarks worth reading next to the figures (e.g. a peer that could not run).
    pub notes: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_summarise_odd_and_even_rounds() {
        let s = Stats::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
        assert_eq!(s.samples, [3.0, 1.0, 2.0]);
        let s = Stats::of(vec![4.0, 1.0, 2.0, 3.0]);
        assert_eq!(s.median, 2.5);
        assert_eq!(Stats::of(vec![]), Stats::default());
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&mut v, 0.5), 50.0);
        assert_eq!(quantile(&mut v, 0.99), 99.0);
        assert_eq!(quantile(&mut v, 1.0), 100.0);
        assert_eq!(quantile(&mut v, 0.0), 1.0);
        assert_eq!(quantile(&mut [], 0.5), 0.0);
    }
}
