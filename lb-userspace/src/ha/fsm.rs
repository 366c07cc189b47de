//! The VRRP state machine of RFC 5798 section 6.4 (RFC 9568 for version 3), as a pure function of
//! its state, the time and one event. It owns its two timers as deadlines, so that the runner only
//! sleeps until [`Machine::deadline`] and feeds back the event it names; every transition the RFC
//! defines is a unit test below, with no sockets or clocks.
//!
//! Beyond the RFC, and why:
//! - **Fault**: a node whose tracking says it cannot forward (data path detached, interface down,
//!   a tracked VIP with every backend down) must never hold the VIPs. At effective priority 0 it
//!   resigns like a shutdown (advert with priority 0) and waits in `Fault`, ignoring the
//!   master-down timer, until tracking clears.
//! - **Preempt delay** (keepalived's `preempt_delay`): for that long after start-up a backup
//!   accepts lower-priority masters, so a node that just booted does not grab the VIPs before its
//!   health checks have run.
//! - **Handover**: an operator moves mastership away on purpose. The master resigns (priority 0,
//!   so the backup takes over after only its skew time) and stays backup without preempting until
//!   resumed; if no other node takes over, its master-down timer fires and it takes the VIPs back,
//!   since a VIP nobody holds is worse than one not handed over.
//! - **Split brain**: a master that hears another master of lower precedence answers at once
//!   instead of waiting for its timer, so the other steps down within one round trip. A master
//!   that steps down for another says so with a priority-0 advert (RFC 5798 only sends one on
//!   shutdown), so that the winner learns of the other master even when the loser heard the
//!   winner first. The winner counts a split brain when it hears either while it has been master
//!   for longer than one advert interval: adverts of a master it just preempted are still in
//!   flight for that long, so a normal preemption is not counted.

use std::{fmt, net::Ipv4Addr, time::Duration};

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Initialize,
    Backup,
    Master,
    Fault,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Initialize => "initialize",
            State::Backup => "backup",
            State::Master => "master",
            State::Fault => "fault",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the machine is configured with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    /// This node's primary address: the tie-break between equal priorities.
    pub address: Ipv4Addr,
    /// Configured priority (1 to 255).
    pub priority: u8,
    /// Our Advertisement_Interval, centiseconds.
    pub interval_cs: u16,
    pub preempt: bool,
    pub preempt_delay: Duration,
}

/// A master as this node knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Peer {
    pub address: Ipv4Addr,
    pub priority: u8,
    pub interval_cs: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Startup,
    /// Start-up of an agent that replaces one that was master and stopped without resigning
    /// (`xdplb run --replace`): the VIPs are still on the interface and the backups still
    /// count on adverts from this node, so it starts as master and advertises at once instead
    /// of waiting as backup (which would let a backup take over).
    StartupAsMaster,
    Shutdown,
    /// An accepted advertisement, from the master (or would-be master) it describes.
    Advert(Peer),
    MasterDownTimer,
    AdverTimer,
    /// Tracking changed the effective priority; 0 means the node cannot forward.
    Priority(u8),
    Handover,
    Resume,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    SendAdvert {
        priority: u8,
    },
    /// Add the VIPs to the interface and announce them (gratuitous ARP).
    TakeVips,
    /// Remove the VIPs from the interface.
    ReleaseVips,
    Transition {
        from: State,
        to: State,
        reason: String,
    },
    /// Another master was heard while this one had been master for a while.
    SplitBrain {
        peer: Peer,
    },
}

#[derive(Clone, Debug)]
pub struct Machine {
    params: Params,
    state: State,
    /// Priority after tracking; 0 while the node cannot forward.
    effective: u8,
    master_interval_cs: u16,
    master: Option<Peer>,
    held: bool,
    started: Duration,
    master_since: Duration,
    adver_timer: Option<Duration>,
    master_down_timer: Option<Duration>,
    /// Why the master-down timer is armed, for the transition's reason.
    down_cause: DownCause,
    /// The last other master heard while master, and when: one split brain shows as several
    /// adverts (its adverts in flight, then its goodbye), and is counted once.
    last_split: Option<(Ipv4Addr, Duration)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DownCause {
    Silence,
    Resigned(Ipv4Addr),
    Preempting(Peer),
}

impl Machine {
    pub fn new(params: Params) -> Machine {
        Machine {
            effective: params.priority,
            master_interval_cs: params.interval_cs,
            params,
            state: State::Initialize,
            master: None,
            held: false,
            started: Duration::ZERO,
            master_since: Duration::ZERO,
            adver_timer: None,
            master_down_timer: None,
            down_cause: DownCause::Silence,
            last_split: None,
        }
    }

    /// A split brain with `peer` is new unless that peer was heard as master moments ago.
    fn split_brain(&mut self, now: Duration, peer: Peer, fx: &mut Vec<Effect>) {
        if now < self.master_since + self.advert_interval() {
            return;
        }
        let repeat = self
            .last_split
            .is_some_and(|(a, at)| a == peer.address && now < at + 2 * self.master_down_interval());
        self.last_split = Some((peer.address, now));
        if !repeat {
            fx.push(Effect::SplitBrain { peer });
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn effective_priority(&self) -> u8 {
        self.effective
    }

    /// The current master as last heard (this node itself while master).
    pub fn master(&self) -> Option<Peer> {
        match self.state {
            State::Master => Some(Peer {
                address: self.params.address,
                priority: self.effective,
                interval_cs: self.params.interval_cs,
            }),
            _ => self.master,
        }
    }

    pub fn held(&self) -> bool {
        self.held
    }

    /// Master_Adver_Interval as learned from the master (RFC 5798 6.1), centiseconds.
    pub fn master_interval_cs(&self) -> u16 {
        self.master_interval_cs
    }

    /// Skew_Time: lower priorities wait longer, so the best backup wins without a tie.
    pub fn skew_time(&self) -> Duration {
        let cs =
            (256 - u32::from(self.effective.max(1))) * u32::from(self.master_interval_cs) / 256;
        Duration::from_millis(u64::from(cs) * 10)
    }

    /// Master_Down_Interval: three missed adverts plus the skew.
    pub fn master_down_interval(&self) -> Duration {
        Duration::from_millis(u64::from(self.master_interval_cs) * 30) + self.skew_time()
    }

    fn advert_interval(&self) -> Duration {
        Duration::from_millis(u64::from(self.params.interval_cs) * 10)
    }

    /// The next timer to fire: when, and the event to step with then.
    pub fn deadline(&self) -> Option<(Duration, Event)> {
        match (self.adver_timer, self.master_down_timer) {
            (Some(a), _) => Some((a, Event::AdverTimer)),
            (None, Some(d)) => Some((d, Event::MasterDownTimer)),
            (None, None) => None,
        }
    }

    fn preempts(&self, now: Duration) -> bool {
        self.params.preempt && !self.held && now >= self.started + self.params.preempt_delay
    }

    fn go(&mut self, to: State, reason: String, fx: &mut Vec<Effect>) {
        let from = self.state;
        self.state = to;
        self.adver_timer = None;
        self.master_down_timer = None;
        fx.push(Effect::Transition { from, to, reason });
    }

    fn become_master(&mut self, now: Duration, reason: String, fx: &mut Vec<Effect>) {
        self.go(State::Master, reason, fx);
        // A handover that nobody took is over: this node holds the VIPs again.
        self.held = false;
        self.master_since = now;
        self.master = None;
        fx.push(Effect::SendAdvert {
            priority: self.effective,
        });
        fx.push(Effect::TakeVips);
        self.adver_timer = Some(now + self.advert_interval());
    }

    fn become_backup(&mut self, now: Duration, reason: String, fx: &mut Vec<Effect>) {
        self.go(State::Backup, reason, fx);
        fx.push(Effect::ReleaseVips);
        self.down_cause = DownCause::Silence;
        self.master_down_timer = Some(now + self.master_down_interval());
    }

    fn describe(p: &Peer) -> String {
        format!("{} (priority {})", p.address, p.priority)
    }

    pub fn step(&mut self, now: Duration, event: Event) -> Vec<Effect> {
        let mut fx = Vec::new();
        match (self.state, event) {
            (State::Initialize, ev @ (Event::Startup | Event::StartupAsMaster)) => {
                self.started = now;
                self.master_interval_cs = self.params.interval_cs;
                if self.effective == 0 {
                    self.go(
                        State::Fault,
                        "started while unable to forward (tracking)".into(),
                        &mut fx,
                    );
                    fx.push(Effect::ReleaseVips);
                } else if self.effective == 255 {
                    self.become_master(
                        now,
                        "started as the address owner (priority 255)".into(),
                        &mut fx,
                    );
                } else if ev == Event::StartupAsMaster {
                    self.become_master(
                        now,
                        "took over mastership from the agent this one replaced".into(),
                        &mut fx,
                    );
                } else {
                    self.become_backup(now, "started".into(), &mut fx);
                }
            }
            (State::Initialize, Event::Priority(p)) => self.effective = p,
            (State::Initialize, _) => {}

            (state, Event::Shutdown) => {
                if state == State::Master {
                    fx.push(Effect::SendAdvert { priority: 0 });
                }
                if state != State::Initialize {
                    self.go(State::Initialize, "shutting down".into(), &mut fx);
                    fx.push(Effect::ReleaseVips);
                }
            }

            (State::Backup, Event::MasterDownTimer) => {
                let reason = match self.down_cause {
                    DownCause::Silence => format!(
                        "no advertisement from the master{} for {:?} (master down interval)",
                        self.master
                            .map(|p| format!(" {}", p.address))
                            .unwrap_or_default(),
                        self.master_down_interval()
                    ),
                    DownCause::Resigned(a) => format!("master {a} resigned (priority 0)"),
                    DownCause::Preempting(p) => {
                        format!("preempted lower-priority master {}", Self::describe(&p))
                    }
                };
                self.become_master(now, reason, &mut fx);
            }
            (State::Backup, Event::Advert(peer)) => {
                let (src, priority, interval_cs) = (peer.address, peer.priority, peer.interval_cs);
                if priority == 0 {
                    // Only our master's resignation matters: a priority 0 from another node is
                    // a master that just stepped down for a better one (its goodbye), or a stale
                    // node, and taking over on it would fight the real master.
                    if self.master.is_none_or(|m| m.address == src) {
                        self.down_cause = DownCause::Resigned(src);
                        self.master_down_timer = Some(now + self.skew_time());
                    }
                } else if !self.preempts(now) || priority >= self.effective {
                    self.master = Some(peer);
                    self.master_interval_cs = interval_cs;
                    self.down_cause = DownCause::Silence;
                    self.master_down_timer = Some(now + self.master_down_interval());
                } else {
                    // Discarded (RFC 5798 6.4.2): its silence, as far as we are concerned, makes
                    // the master-down timer fire and this node take over.
                    self.master = Some(peer);
                    self.down_cause = DownCause::Preempting(peer);
                }
            }
            (State::Backup, Event::Priority(p)) => {
                self.effective = p;
                if p == 0 {
                    self.go(
                        State::Fault,
                        "cannot forward (tracking); giving up the right to become master".into(),
                        &mut fx,
                    );
                }
            }
            (State::Backup, Event::Handover) => self.held = true,
            (State::Backup, Event::Resume) => self.held = false,
            (State::Backup, Event::AdverTimer)
            | (State::Backup, Event::Startup | Event::StartupAsMaster) => {}

            (State::Master, Event::AdverTimer) => {
                fx.push(Effect::SendAdvert {
                    priority: self.effective,
                });
                self.adver_timer = Some(now + self.advert_interval());
            }
            (State::Master, Event::Advert(peer)) => {
                let (src, priority, interval_cs) = (peer.address, peer.priority, peer.interval_cs);
                if priority == 0 {
                    // Only a master resigns: if we had been master for a while, there were two.
                    self.split_brain(now, peer, &mut fx);
                    fx.push(Effect::SendAdvert {
                        priority: self.effective,
                    });
                    self.adver_timer = Some(now + self.advert_interval());
                } else if priority > self.effective
                    || (priority == self.effective && src > self.params.address)
                {
                    // Say goodbye with priority 0: the winner may never have heard us (in a
                    // healed split brain whoever hears the other first decides), and this is
                    // how it learns that there were two masters.
                    fx.push(Effect::SendAdvert { priority: 0 });
                    self.master_interval_cs = interval_cs;
                    self.become_backup(
                        now,
                        format!("master {} has precedence", Self::describe(&peer)),
                        &mut fx,
                    );
                    self.master = Some(peer);
                } else {
                    self.split_brain(now, peer, &mut fx);
                    fx.push(Effect::SendAdvert {
                        priority: self.effective,
                    });
                    self.adver_timer = Some(now + self.advert_interval());
                }
            }
            (State::Master, Event::Priority(p)) => {
                let old = self.effective;
                self.effective = p;
                if p == 0 {
                    fx.push(Effect::SendAdvert { priority: 0 });
                    self.go(
                        State::Fault,
                        "cannot forward (tracking); resigned mastership".into(),
                        &mut fx,
                    );
                    fx.push(Effect::ReleaseVips);
                } else if p != old {
                    // Tell backups now: a lower priority may let one preempt.
                    fx.push(Effect::SendAdvert { priority: p });
                    self.adver_timer = Some(now + self.advert_interval());
                }
            }
            (State::Master, Event::Handover) => {
                fx.push(Effect::SendAdvert { priority: 0 });
                self.held = true;
                self.master_interval_cs = self.params.interval_cs;
                self.become_backup(now, "handed over by the operator".into(), &mut fx);
            }
            (State::Master, Event::Resume) => self.held = false,
            (State::Master, Event::MasterDownTimer)
            | (State::Master, Event::Startup | Event::StartupAsMaster) => {}

            (State::Fault, Event::Priority(p)) => {
                self.effective = p;
                if p == 255 {
                    self.become_master(now, "can forward again (address owner)".into(), &mut fx);
                } else if p > 0 {
                    self.master_interval_cs = self.params.interval_cs;
                    self.become_backup(now, "can forward again".into(), &mut fx);
                }
            }
            (State::Fault, Event::Advert(peer)) => {
                self.master = (peer.priority > 0).then_some(peer);
            }
            (State::Fault, Event::Handover) => self.held = true,
            (State::Fault, Event::Resume) => self.held = false,
            (State::Fault, _) => {}
        }
        fx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const LOWER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const HIGHER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn machine(priority: u8, preempt: bool) -> Machine {
        Machine::new(Params {
            address: ME,
            priority,
            interval_cs: 100,
            preempt,
            preempt_delay: Duration::ZERO,
        })
    }

    fn advert(src: Ipv4Addr, priority: u8) -> Event {
        Event::Advert(Peer {
            address: src,
            priority,
            interval_cs: 100,
        })
    }

    fn transitioned(fx: &[Effect]) -> Option<State> {
        fx.iter().find_map(|e| match e {
            Effect::Transition { to, .. } => Some(*to),
            _ => None,
        })
    }

    fn reason(fx: &[Effect]) -> String {
        fx.iter()
            .find_map(|e| match e {
                Effect::Transition { reason, .. } => Some(reason.clone()),
                _ => None,
            })
            .unwrap()
    }

    fn master_at(m: &mut Machine, now: Duration) {
        m.step(now, Event::Startup);
        let (at, ev) = m.deadline().unwrap();
        assert_eq!(ev, Event::MasterDownTimer);
        m.step(at.max(now), ev);
        assert_eq!(m.state(), State::Master);
    }

    #[test]
    fn timers_follow_rfc_5798_formulas() {
        // Priority 100, 1 s: skew = (256-100)*100/256 = 60 cs, down = 300 + 60 cs.
        let m = machine(100, true);
        assert_eq!(m.skew_time(), ms(600));
        assert_eq!(m.master_down_interval(), ms(3600));
        // keepalived's default takeover (priority 100, 1 s) is the same 3.6 s.
        let mut fast = machine(200, true);
        fast.params.interval_cs = 10;
        fast.master_interval_cs = 10;
        assert_eq!(fast.skew_time(), ms(20));
        assert_eq!(fast.master_down_interval(), ms(320));
    }

    #[test]
    fn startup_goes_backup_and_arms_master_down() {
        let mut m = machine(100, true);
        let fx = m.step(ms(5), Event::Startup);
        assert_eq!(transitioned(&fx), Some(State::Backup));
        assert!(fx.contains(&Effect::ReleaseVips));
        assert!(!fx.iter().any(|e| matches!(e, Effect::SendAdvert { .. })));
        assert_eq!(m.deadline(), Some((ms(3605), Event::MasterDownTimer)));
    }

    #[test]
    fn owner_starts_as_master() {
        let mut m = machine(255, true);
        let fx = m.step(ms(0), Event::Startup);
        assert_eq!(transitioned(&fx), Some(State::Master));
        assert!(fx.contains(&Effect::SendAdvert { priority: 255 }));
        assert!(fx.contains(&Effect::TakeVips));
        assert_eq!(m.deadline(), Some((ms(1000), Event::AdverTimer)));
    }

    #[test]
    fn a_replacing_agent_starts_as_master_unless_it_cannot_forward() {
        let mut m = machine(100, true);
        let fx = m.step(ms(0), Event::StartupAsMaster);
        assert_eq!(transitioned(&fx), Some(State::Master));
        assert!(fx.contains(&Effect::SendAdvert { priority: 100 }), "{fx:?}");
        assert!(fx.contains(&Effect::TakeVips), "{fx:?}");
        assert_eq!(m.deadline(), Some((ms(1000), Event::AdverTimer)));

        let mut m = machine(100, true);
        m.step(ms(0), Event::Priority(0));
        let fx = m.step(ms(0), Event::StartupAsMaster);
        assert_eq!(transitioned(&fx), Some(State::Fault));
        assert!(!fx.iter().any(|f| matches!(f, Effect::SendAdvert { .. })));
    }

    #[test]
    fn backup_becomes_master_when_the_master_goes_silent() {
        let mut m = machine(100, true);
        m.step(ms(0), Event::Startup);
        m.step(ms(500), advert(HIGHER_IP, 150));
        assert_eq!(m.master().unwrap().address, HIGHER_IP);
        // Each advert pushes the timer out.
        assert_eq!(m.deadline(), Some((ms(4100), Event::MasterDownTimer)));
        let fx = m.step(ms(4100), Event::MasterDownTimer);
        assert_eq!(transitioned(&fx), Some(State::Master));
        assert!(reason(&fx).contains("no advertisement from the master 10.0.0.3"));
        assert_eq!(
            &fx[1..],
            &[Effect::SendAdvert { priority: 100 }, Effect::TakeVips]
        );
        assert_eq!(m.deadline(), Some((ms(5100), Event::AdverTimer)));
    }

    #[test]
    fn backup_adopts_the_masters_interval() {
        let mut m = machine(100, true);
        m.step(ms(0), Event::Startup);
        m.step(
            ms(0),
            Event::Advert(Peer {
                address: HIGHER_IP,
                priority: 150,
                interval_cs: 10,
            }),
        );
        assert_eq!(m.master_interval_cs(), 10);
        assert_eq!(m.deadline(), Some((ms(300 + 60), Event::MasterDownTimer)));
    }

    #[test]
    fn priority_zero_makes_the_backup_take_over_after_skew_time() {
        let mut m = machine(100, true);
        m.step(ms(0), Event::Startup);
        m.step(ms(100), advert(HIGHER_IP, 150));
        m.step(ms(200), advert(HIGHER_IP, 0));
        assert_eq!(m.deadline(), Some((ms(800), Event::MasterDownTimer)));
        let fx = m.step(ms(800), Event::MasterDownTimer);
        assert!(reason(&fx).contains("master 10.0.0.3 resigned"));
    }

    #[test]
    fn priority_zero_from_another_node_than_the_master_is_ignored() {
        let mut m = machine(100, true);
        m.step(ms(0), Event::Startup);
        // A third router became master; the node it replaced says goodbye with priority 0.
        m.step(ms(100), advert(LOWER_IP, 250));
        let before = m.deadline();
        m.step(ms(110), advert(HIGHER_IP, 0));
        assert_eq!(m.deadline(), before);
        assert_eq!(m.master().unwrap().address, LOWER_IP);
    }

    #[test]
    fn preempting_backup_discards_lower_adverts() {
        let mut m = machine(200, true);
        m.step(ms(0), Event::Startup);
        let before = m.deadline();
        m.step(ms(1000), advert(HIGHER_IP, 100));
        // Discarded: the timer is not pushed out.
        assert_eq!(m.deadline(), before);
        let (at, ev) = m.deadline().unwrap();
        let fx = m.step(at, ev);
        assert_eq!(transitioned(&fx), Some(State::Master));
        assert!(reason(&fx).contains("preempted lower-priority master 10.0.0.3 (priority 100)"));
    }

    #[test]
    fn without_preempt_a_lower_master_is_accepted() {
        let mut m = machine(200, false);
        m.step(ms(0), Event::Startup);
        m.step(ms(1000), advert(HIGHER_IP, 100));
        assert_eq!(m.deadline().unwrap().0, ms(1000) + m.master_down_interval());
    }

    #[test]
    fn preempt_delay_holds_preemption_after_startup() {
        let mut m = machine(200, true);
        m.params.preempt_delay = ms(5000);
        m.step(ms(0), Event::Startup);
        m.step(ms(1000), advert(HIGHER_IP, 100));
        assert_eq!(m.deadline().unwrap().0, ms(1000) + m.master_down_interval());
        m.step(ms(5000), advert(HIGHER_IP, 100));
        assert_eq!(m.deadline().unwrap().0, ms(1000) + m.master_down_interval());
    }

    #[test]
    fn equal_priority_is_accepted_by_a_backup() {
        let mut m = machine(100, true);
        m.step(ms(0), Event::Startup);
        m.step(ms(1000), advert(LOWER_IP, 100));
        assert_eq!(m.deadline().unwrap().0, ms(1000) + m.master_down_interval());
    }

    #[test]
    fn master_sends_adverts_on_its_timer() {
        let mut m = machine(100, true);
        master_at(&mut m, ms(0));
        let (at, ev) = m.deadline().unwrap();
        assert_eq!(ev, Event::AdverTimer);
        let fx = m.step(at, ev);
        assert_eq!(fx, vec![Effect::SendAdvert { priority: 100 }]);
        assert_eq!(m.deadline().unwrap().0, at + ms(1000));
    }

    #[test]
    fn master_yields_to_higher_priority() {
        let mut m = machine(100, true);
        master_at(&mut m, ms(0));
        let fx = m.step(ms(10_000), advert(LOWER_IP, 101));
        assert_eq!(transitioned(&fx), Some(State::Backup));
        assert!(fx.contains(&Effect::ReleaseVips));
        assert_eq!(fx[0], Effect::SendAdvert { priority: 0 });
        assert_eq!(m.master().unwrap().address, LOWER_IP);
        assert_eq!(
            m.deadline(),
            Some((
                ms(10_000) + m.master_down_interval(),
                Event::MasterDownTimer
            ))
        );
    }

    #[test]
    fn equal_priority_is_decided_by_the_higher_address() {
        let mut m = machine(100, true);
        master_at(&mut m, ms(0));
        let fx = m.step(ms(10_000), advert(LOWER_IP, 100));
        assert_eq!(transitioned(&fx), None);
        assert_eq!(m.state(), State::Master);
        let fx = m.step(ms(10_100), advert(HIGHER_IP, 100));
        assert_eq!(transitioned(&fx), Some(State::Backup));
    }

    #[test]
    fn split_brain_is_answered_at_once_and_counted() {
        let mut m = machine(200, true);
        master_at(&mut m, ms(0));
        let since = m.deadline().unwrap().0 - ms(1000);
        // An advert still in flight from a master we just preempted: answered, not counted.
        let fx = m.step(since + ms(50), advert(HIGHER_IP, 100));
        assert_eq!(fx, vec![Effect::SendAdvert { priority: 200 }]);
        // Much later: two masters heard each other again.
        let fx = m.step(since + ms(60_000), advert(HIGHER_IP, 100));
        assert!(matches!(fx[0], Effect::SplitBrain { peer } if peer.address == HIGHER_IP));
        assert_eq!(fx[1], Effect::SendAdvert { priority: 200 });
        assert_eq!(m.deadline().unwrap().0, since + ms(61_000));
        // The same episode: its next advert and its goodbye are not counted again.
        let fx = m.step(since + ms(60_100), advert(HIGHER_IP, 100));
        assert_eq!(fx, vec![Effect::SendAdvert { priority: 200 }]);
        let fx = m.step(since + ms(60_150), advert(HIGHER_IP, 0));
        assert_eq!(fx, vec![Effect::SendAdvert { priority: 200 }]);
        // A new partition much later is.
        let fx = m.step(since + ms(200_000), advert(HIGHER_IP, 100));
        assert!(matches!(fx[0], Effect::SplitBrain { .. }));
    }

    #[test]
    fn master_answers_a_resigning_master_and_counts_the_split_brain() {
        let mut m = machine(100, true);
        master_at(&mut m, ms(0));
        let since = m.deadline().unwrap().0 - ms(1000);
        // The master we just preempted resigns: normal.
        let fx = m.step(since + ms(20), advert(HIGHER_IP, 0));
        assert_eq!(fx, vec![Effect::SendAdvert { priority: 100 }]);
        // Another master resigns long after we became master: there were two.
        let fx = m.step(since + ms(20_000), advert(HIGHER_IP, 0));
        assert!(matches!(fx[0], Effect::SplitBrain { peer } if peer.priority == 0));
        assert_eq!(fx[1], Effect::SendAdvert { priority: 100 });
        assert_eq!(m.state(), State::Master);
    }

    #[test]
    fn shutdown_resigns_with_priority_zero() {
        let mut m = machine(100, true);
        master_at(&mut m, ms(0));
        let fx = m.step(ms(20_000), Event::Shutdown);
        assert_eq!(fx[0], Effect::SendAdvert { priority: 0 });
        assert_eq!(transitioned(&fx), Some(State::Initialize));
        assert!(fx.contains(&Effect::ReleaseVips));
        assert_eq!(m.deadline(), None);
        // A backup shuts down silently.
        let mut b = machine(100, true);
        b.step(ms(0), Event::Startup);
        let fx = b.step(ms(1), Event::Shutdown);
        assert!(!fx.iter().any(|e| matches!(e, Effect::SendAdvert { .. })));
        assert_eq!(b.state(), State::Initialize);
    }

    #[test]
    fn tracking_failure_makes_the_master_resign_into_fault() {
        let mut m = machine(200, true);
        master_at(&mut m, ms(0));
        let fx = m.step(ms(9_000), Event::Priority(0));
        assert_eq!(fx[0], Effect::SendAdvert { priority: 0 });
        assert_eq!(transitioned(&fx), Some(State::Fault));
        assert!(fx.contains(&Effect::ReleaseVips));
        assert_eq!(m.deadline(), None);
        // Adverts and timers do not bring it back; recovery does, as a backup.
        assert!(m.step(ms(9_500), advert(HIGHER_IP, 100)).is_empty());
        assert_eq!(m.master().unwrap().address, HIGHER_IP);
        let fx = m.step(ms(10_000), Event::Priority(200));
        assert_eq!(transitioned(&fx), Some(State::Backup));
        assert_eq!(m.deadline().unwrap().1, Event::MasterDownTimer);
    }

    #[test]
    fn tracking_penalty_is_advertised_at_once() {
        let mut m = machine(200, true);
        master_at(&mut m, ms(0));
        let fx = m.step(ms(9_000), Event::Priority(150));
        assert_eq!(fx, vec![Effect::SendAdvert { priority: 150 }]);
        assert_eq!(m.state(), State::Master);
        // Same priority again: nothing to say.
        assert!(m.step(ms(9_100), Event::Priority(150)).is_empty());
    }

    #[test]
    fn backup_in_fault_never_takes_over() {
        let mut m = machine(200, true);
        m.step(ms(0), Event::Startup);
        let fx = m.step(ms(100), Event::Priority(0));
        assert_eq!(transitioned(&fx), Some(State::Fault));
        assert_eq!(m.deadline(), None);
        // Started unable to forward: straight to fault.
        let mut s = machine(200, true);
        s.step(ms(0), Event::Priority(0));
        let fx = s.step(ms(0), Event::Startup);
        assert_eq!(transitioned(&fx), Some(State::Fault));
    }

    #[test]
    fn handover_resigns_and_holds_back_preemption_until_resumed() {
        let mut m = machine(200, true);
        master_at(&mut m, ms(0));
        let fx = m.step(ms(10_000), Event::Handover);
        assert_eq!(fx[0], Effect::SendAdvert { priority: 0 });
        assert_eq!(transitioned(&fx), Some(State::Backup));
        assert!(reason(&fx).contains("operator"));
        assert!(m.held());
        // The peer (lower priority) takes over; we accept it instead of preempting.
        m.step(ms(10_500), advert(HIGHER_IP, 100));
        assert_eq!(
            m.deadline().unwrap().0,
            ms(10_500) + m.master_down_interval()
        );
        // Resumed: its next advert is discarded, so we preempt.
        m.step(ms(11_000), Event::Resume);
        let before = m.deadline();
        m.step(ms(11_500), advert(HIGHER_IP, 100));
        assert_eq!(m.deadline(), before);
    }

    #[test]
    fn handover_with_nobody_to_take_over_takes_the_vips_back() {
        let mut m = machine(200, true);
        master_at(&mut m, ms(0));
        m.step(ms(10_000), Event::Handover);
        let (at, ev) = m.deadline().unwrap();
        let fx = m.step(at, ev);
        assert_eq!(transitioned(&fx), Some(State::Master));
        assert!(!m.held());
    }
}
