//! Escalation: the schedule on which a container gets allocator probes. The always-on tier
//! (page faults, anonymous memory) says where memory grows; a container that grows gets
//! the exact tier's probes for a bounded window (`--escalate-for`), then loses them again,
//! keeping what was learned. While it keeps growing it is escalated again, each time after
//! a longer pause (back-off), so a container that grows for a reason the exact tier does
//! not explain does not pay for probes all the time.
use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use crate::metrics::{ContainerLabels, Metrics};

/// The longest pause between two windows, in windows (2^6).
const MAX_BACKOFF_SHIFT: u32 = 6;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// No probes; the next window may start at `not_before`.
    Watching { not_before: Instant, windows: u32 },
    /// Probes attached until `until`.
    Escalated { until: Instant, windows: u32 },
}

/// A change of a container's escalation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Started,
    Ended,
}

/// A watched container, as escalation judges it at one interval.
pub struct Candidate<'a> {
    pub id: u64,
    pub labels: &'a ContainerLabels,
    /// Its memory grows the way a leak does (the always-on tier says so).
    pub growing: bool,
    /// Its pod asks for the probes (`memtrace.io/escalate: "true"`).
    pub requested: bool,
}

pub struct Escalation {
    window: Duration,
    states: HashMap<u64, State>,
}

impl Escalation {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            states: HashMap::new(),
        }
    }

    /// Moves container `id` along its schedule at `now`; `wanted` says whether it should
    /// be escalated (its memory grows, or its pod asks for it).
    pub fn update(&mut self, id: u64, now: Instant, wanted: bool) -> Option<Change> {
        let state = self.states.entry(id).or_insert(State::Watching {
            not_before: now,
            windows: 0,
        });
        match *state {
            State::Escalated { until, windows } if now >= until => {
                let pause = self.window * (1 << windows.min(MAX_BACKOFF_SHIFT));
                *state = State::Watching {
                    not_before: now + pause,
                    windows,
                };
                Some(Change::Ended)
            }
            State::Watching {
                not_before,
                windows,
            } if wanted && now >= not_before => {
                *state = State::Escalated {
                    until: now + self.window,
                    windows: windows + 1,
                };
                Some(Change::Started)
            }
            _ => None,
        }
    }

    /// Moves every watched container along its schedule at `now`, says each change in one
    /// line, and publishes `memtrace_escalated` and `memtrace_escalations_total`. Returns
    /// the containers watched but not escalated: their stacks keep what was learned.
    pub fn advance<'a>(
        &mut self,
        candidates: impl IntoIterator<Item = Candidate<'a>>,
        now: Instant,
        metrics: &Metrics,
    ) -> HashSet<u64> {
        let mut frozen = HashSet::new();
        for c in candidates {
            let values = c.labels.values();
            match self.update(c.id, now, c.growing || c.requested) {
                Some(Change::Started) => {
                    log::info!(
                        "{}: {}; allocator probes on for {:?}",
                        c.labels.container,
                        if c.growing {
                            "memory grows"
                        } else {
                            "its pod asks for probes (memtrace.io/escalate)"
                        },
                        self.window
                    );
                    metrics.escalations.with_label_values(&values).inc();
                }
                Some(Change::Ended) => log::info!(
                    "{}: escalation window over; allocator probes off",
                    c.labels.container
                ),
                None => {}
            }
            let escalated = self.is_escalated(c.id);
            metrics
                .escalated
                .with_label_values(&values)
                .set(i64::from(escalated));
            if !escalated {
                frozen.insert(c.id);
            }
        }
        frozen
    }

    pub fn is_escalated(&self, id: u64) -> bool {
        matches!(self.states.get(&id), Some(State::Escalated { .. }))
    }

    /// Forgets a container that is gone.
    pub fn forget(&mut self, id: u64) {
        self.states.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(600);

    #[test]
    fn a_growing_container_is_escalated_for_a_window_then_backs_off() {
        let mut escalation = Escalation::new(WINDOW);
        let t0 = Instant::now();
        assert_eq!(escalation.update(1, t0, false), None);
        assert!(!escalation.is_escalated(1));
        assert_eq!(escalation.update(1, t0, true), Some(Change::Started));
        assert!(escalation.is_escalated(1));
        // Still within the window: no change, growing or not.
        assert_eq!(escalation.update(1, t0 + WINDOW / 2, false), None);
        assert_eq!(escalation.update(1, t0 + WINDOW, true), Some(Change::Ended));
        assert!(!escalation.is_escalated(1));
        // After the first window the pause is two windows (2^1).
        let ended = t0 + WINDOW;
        assert_eq!(escalation.update(1, ended + WINDOW, true), None);
        assert_eq!(
            escalation.update(1, ended + 2 * WINDOW, true),
            Some(Change::Started)
        );
        // The second window ends; the pause doubles.
        let ended = ended + 3 * WINDOW;
        assert_eq!(escalation.update(1, ended, true), Some(Change::Ended));
        assert_eq!(escalation.update(1, ended + 3 * WINDOW, true), None);
        assert_eq!(
            escalation.update(1, ended + 4 * WINDOW, true),
            Some(Change::Started)
        );
    }

    #[test]
    fn a_quiet_container_is_never_escalated() {
        let mut escalation = Escalation::new(WINDOW);
        let t0 = Instant::now();
        for i in 0..100 {
            assert_eq!(escalation.update(7, t0 + WINDOW * i, false), None);
        }
        assert!(!escalation.is_escalated(7));
    }

    #[test]
    fn containers_are_independent() {
        let mut escalation = Escalation::new(WINDOW);
        let t0 = Instant::now();
        assert_eq!(escalation.update(1, t0, true), Some(Change::Started));
        assert_eq!(escalation.update(2, t0, false), None);
        assert!(escalation.is_escalated(1) && !escalation.is_escalated(2));
        escalation.forget(1);
        assert!(!escalation.is_escalated(1));
    }
}
