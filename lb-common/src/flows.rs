//! The connection table's semantics: what the data path counts and when it may insert.
//!
//! The table ([`crate::maps::FLOWS`]) remembers the backend each flow was sent to, so a flow
//! stays on its backend when the Maglev table changes (a backend added, drained, weighted or
//! removed). [`crate::packet::process`] applies these rules:
//! - A TCP SYN (without ACK) is a new connection: it is decided by the Maglev table and its entry
//!   written, replacing whatever an earlier connection on the same 5-tuple left. So a drained
//!   backend gets no new connection even from a client that reuses a port.
//! - Any other packet looks its flow up. A hit is honoured while the remembered backend's entry
//!   is ready, belongs to the same VIP and is not marked down (failed its health checks and out
//!   of the table), and, for UDP, the entry is younger than the idle timeout. A hit that is not
//!   honoured is remapped: decided by the table and rewritten ([`FlowStat::Remapped`],
//!   [`FlowStat::Expired`]). A miss is decided by the table and remembered ([`FlowStat::Miss`]),
//!   so a flow that predates the table (an agent restart, an evicted entry) sticks from then on.
//! - Inserts are bounded per CPU and second ([`admit`]), as Katran does: a flood of new flows
//!   then cannot evict every established entry within a second. Flows past the bound are still
//!   forwarded by the table, only not remembered ([`FlowStat::RateLimited`]).
//! - Established flows survive a table change only through the table: the Maglev table alone
//!   moves about 1/N of flows when N backends change.

/// Connection-table events, counted per CPU in [`crate::maps::FLOW_STATS`] at their index.
/// The discriminant is part of the map layout shared with the agent: values are only appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum FlowStat {
    /// A lookup found a live entry: the packet went to the remembered backend.
    Hit = 0,
    /// A lookup found nothing: the table decided.
    Miss = 1,
    /// A TCP SYN: a new connection, decided by the table without a lookup.
    Syn = 2,
    /// An entry was written.
    Insert = 3,
    /// An entry was not written because the CPU's insert budget for the second was spent.
    RateLimited = 4,
    /// A lookup found an entry whose backend is gone, failed or belongs to another VIP: the
    /// table decided again.
    Remapped = 5,
    /// A lookup found a UDP entry idle past the timeout: the table decided again.
    Expired = 6,
    /// Writing an entry failed (the kernel refused the update).
    InsertFailed = 7,
}

impl FlowStat {
    /// Number of events: the size of the `FLOW_STATS` map.
    pub const COUNT: u32 = 8;

    /// Every event in index order.
    pub const ALL: [FlowStat; Self::COUNT as usize] = [
        FlowStat::Hit,
        FlowStat::Miss,
        FlowStat::Syn,
        FlowStat::Insert,
        FlowStat::RateLimited,
        FlowStat::Remapped,
        FlowStat::Expired,
        FlowStat::InsertFailed,
    ];

    /// Stable snake_case name used in status output, JSON and Prometheus labels.
    pub const fn name(self) -> &'static str {
        match self {
            FlowStat::Hit => "hit",
            FlowStat::Miss => "miss",
            FlowStat::Syn => "syn",
            FlowStat::Insert => "insert",
            FlowStat::RateLimited => "insert_rate_limited",
            FlowStat::Remapped => "remapped",
            FlowStat::Expired => "expired",
            FlowStat::InsertFailed => "insert_failed",
        }
    }
}

/// Longest a live UDP entry's `atime` lags its last packet. Refreshing on every datagram
/// wrote the entry on every packet, which cost more than the lookup (entries are shared by all
/// CPUs); a refresh when due keeps expiry exact enough and the writes rare.
pub const ATIME_REFRESH_MAX_NS: u64 = 1_000_000_000;

/// Whether a UDP hit on an entry idle for `idle` ns refreshes its `atime`, given the idle
/// `timeout` (0: never expires). At most every [`ATIME_REFRESH_MAX_NS`], and at most every
/// eighth of the timeout, so a flow that keeps sending never looks idle for longer than that.
#[inline(always)]
pub fn atime_refresh_due(idle: u64, timeout: u64) -> bool {
    let every = if timeout == 0 {
        ATIME_REFRESH_MAX_NS
    } else {
        let eighth = timeout >> 3;
        if eighth < ATIME_REFRESH_MAX_NS {
            eighth
        } else {
            ATIME_REFRESH_MAX_NS
        }
    };
    idle >= every
}

/// Length of an insert-rate window.
pub const RATE_WINDOW_NS: u64 = 1_000_000_000;

/// Whether a CPU may insert one more entry at `now` with at most `limit` inserts per second
/// (0: no bound), given its window `state`, which it updates. The window starts at the first
/// insert after the previous one ended, so it needs no clock alignment.
#[inline(always)]
pub fn admit(state: &mut crate::maps::FlowRate, now: u64, limit: u32) -> bool {
    if limit == 0 {
        return true;
    }
    if now.wrapping_sub(state.window_start) >= RATE_WINDOW_NS {
        state.window_start = now;
        state.count = 0;
    }
    if state.count >= limit as u64 {
        return false;
    }
    state.count += 1;
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::FlowRate;

    #[test]
    fn atime_is_refreshed_when_due() {
        let s = 1_000_000_000;
        // 30 s timeout: every second.
        assert!(!atime_refresh_due(s - 1, 30 * s));
        assert!(atime_refresh_due(s, 30 * s));
        // 2 s timeout: every 250 ms, so a flow sending every 300 ms never expires.
        assert!(!atime_refresh_due(249_999_999, 2 * s));
        assert!(atime_refresh_due(250_000_000, 2 * s));
        // No timeout: every second, for `xdplb flows`.
        assert!(!atime_refresh_due(s / 2, 0));
        assert!(atime_refresh_due(s, 0));
    }

    #[test]
    fn all_is_in_index_order() {
        for (i, s) in FlowStat::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i, "{}", s.name());
        }
    }

    #[test]
    fn admit_bounds_each_window() {
        let mut st = FlowRate::default();
        let t0 = 5 * RATE_WINDOW_NS;
        let admitted = (0..10).filter(|i| admit(&mut st, t0 + i, 3)).count();
        assert_eq!(admitted, 3);
        // Still the same window just before it ends.
        assert!(!admit(&mut st, t0 + RATE_WINDOW_NS - 1, 3));
        // A new window once a second has passed since it started.
        assert!(admit(&mut st, t0 + RATE_WINDOW_NS, 3));
        assert_eq!(st.count, 1);
    }

    #[test]
    fn admit_without_limit_always_admits() {
        let mut st = FlowRate::default();
        assert!((0..1000).all(|i| admit(&mut st, i, 0)));
        assert_eq!(st, FlowRate::default(), "no bound, no bookkeeping");
    }

    #[test]
    fn admit_first_window_starts_at_first_insert() {
        // A CPU that never inserted has window_start 0; a clock far past it starts a window.
        let mut st = FlowRate::default();
        assert!(admit(&mut st, 123, 1));
        assert_eq!(
            st.window_start, 0,
            "123 ns after boot is still the first window"
        );
        assert!(!admit(&mut st, 124, 1));
        let mut st = FlowRate::default();
        assert!(admit(&mut st, 10 * RATE_WINDOW_NS + 7, 1));
        assert_eq!(st.window_start, 10 * RATE_WINDOW_NS + 7);
    }
}
