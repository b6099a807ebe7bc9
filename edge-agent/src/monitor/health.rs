//! A path's health state machine and per-class SLA eligibility (pure).
//!
//! [`PathHealth`] turns a prober's liveness and a score into Up / Degraded / Down, with two
//! brakes against flapping, because every change moves flows and a path that flaps takes
//! its flows with it:
//!
//! - hysteresis: a path leaves a worse state only with a score `recover_margin` above the
//!   threshold that put it there, so a score wobbling around a threshold changes nothing;
//! - failback hold-down: a path that failed takes traffic back ([`PathHealth::preferred`])
//!   only after being Up continuously for `failback_hold_down`. Failing over is immediate,
//!   failing back is patient.
//!
//! [`SlaGate`] applies the same hold-down to one class's SLA on one path: a path breaking a
//! class's SLA loses that class at once and gets it back only once it has met the SLA for
//! the hold-down.

use std::time::Duration;

use patronus_proto::intent::FailoverSettings;
use patronus_proto::metrics::PathStatus;
use patronus_proto::policy::Sla;

use super::prober::{Liveness, ProbeStats};

/// A path's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Health {
    /// Not measured yet.
    #[default]
    Unknown,
    Up,
    /// Works, but scores under `degrade_below_score`: used only when nothing better is up.
    Degraded,
    /// Does not answer, or scores under `down_below_score`: not used.
    Down,
}

impl Health {
    pub fn as_status(self) -> PathStatus {
        match self {
            Health::Unknown => PathStatus::Unknown,
            Health::Up => PathStatus::Up,
            Health::Degraded => PathStatus::Degraded,
            Health::Down => PathStatus::Down,
        }
    }
}

/// Thresholds of [`PathHealth`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    /// Under this score (0..=100) a path is Degraded.
    pub degrade_below_score: u8,
    /// Under this score a path is Down even though probes return (taken as at most
    /// `degrade_below_score`).
    pub down_below_score: u8,
    /// Points above a threshold a path needs to leave the state that threshold put it in.
    pub recover_margin: u8,
    /// How long a recovered path must stay Up before traffic moves back to it.
    pub failback_hold_down: Duration,
}

impl HealthConfig {
    /// 5 points: more than a score's usual wobble from one probe to the next, small enough
    /// that a path that really recovered is not held back.
    pub const DEFAULT_RECOVER_MARGIN: u8 = 5;
}

impl From<&FailoverSettings> for HealthConfig {
    fn from(s: &FailoverSettings) -> Self {
        Self {
            degrade_below_score: s.degrade_below_score,
            down_below_score: s.down_below_score,
            recover_margin: Self::DEFAULT_RECOVER_MARGIN,
            failback_hold_down: Duration::from_millis(u64::from(s.failback_hold_down_ms)),
        }
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self::from(&FailoverSettings::default())
    }
}

/// A change of a path's health, for events and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub from: Health,
    pub to: Health,
    /// Human-readable cause, e.g. "3 consecutive probes lost", "score 42 < 60".
    pub reason: String,
}

/// One path's health.
#[derive(Debug, Clone, Default)]
pub struct PathHealth {
    config: HealthConfig,
    health: Health,
    /// Whether the current Down is for the score (leaving it then needs the margin) rather
    /// than for lost probes (an answer is enough).
    down_for_score: bool,
    /// Whether the path has ever been Degraded or Down: only then does failback wait.
    ever_failed: bool,
    /// When the path last became Up.
    up_since: Option<Duration>,
    /// The latest `now` seen; earlier ones are raised to it.
    now: Duration,
}

impl PathHealth {
    pub fn new(config: HealthConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    /// New thresholds; they apply from the next update (and the hold-down at once).
    pub fn set_config(&mut self, config: HealthConfig) {
        self.config = config;
    }

    pub fn config(&self) -> &HealthConfig {
        &self.config
    }

    /// The (degrade, down, up) thresholds, made consistent: scores above 100 do not exist,
    /// down is at most degrade, and Up is reachable even with a threshold near 100.
    fn thresholds(&self) -> (u8, u8, u8) {
        let degrade = self.config.degrade_below_score.min(100);
        let down = self.config.down_below_score.min(degrade);
        let up = degrade.saturating_add(self.config.recover_margin).min(100);
        (degrade, down, up)
    }

    /// Feed the latest measurement: the prober's liveness and consecutive losses, and the
    /// path's score (see `score::health_score`). Returns the transition, if any.
    pub fn update(
        &mut self,
        now: Duration,
        liveness: Liveness,
        score: u8,
        consecutive_losses: u32,
    ) -> Option<Transition> {
        self.now = self.now.max(now);
        let score = score.min(100);
        let (degrade, down, up) = self.thresholds();
        let from = self.health;
        let (to, reason) = match liveness {
            // Only a new prober says Unknown; before the first measurement the path stays
            // Unknown, afterwards a restarted prober must not make it look unmeasured.
            Liveness::Unknown => return None,
            Liveness::Dead => {
                self.down_for_score = false;
                (
                    Health::Down,
                    format!("{consecutive_losses} consecutive probes lost"),
                )
            }
            Liveness::Alive => {
                // What it takes to be Up or Degraded depends on where the path comes from.
                let up_needs = match from {
                    Health::Unknown | Health::Up => degrade,
                    Health::Degraded | Health::Down => up,
                };
                let degraded_needs = if from == Health::Down && self.down_for_score {
                    down.saturating_add(self.config.recover_margin)
                } else {
                    down
                };
                if score >= up_needs {
                    let reason = match from {
                        Health::Down if !self.down_for_score => {
                            format!("probes answered again (score {score})")
                        }
                        Health::Unknown => format!("first measurement: score {score}"),
                        _ => format!("score {score} >= {up_needs}"),
                    };
                    (Health::Up, reason)
                } else if score >= degraded_needs {
                    let reason = match from {
                        Health::Down if !self.down_for_score => {
                            format!("probes answered again, but score {score} < {up_needs}")
                        }
                        Health::Down => format!("score {score} >= {degraded_needs}"),
                        _ => format!("score {score} < {degrade}"),
                    };
                    (Health::Degraded, reason)
                } else {
                    if from != Health::Down {
                        self.down_for_score = true;
                    }
                    (Health::Down, format!("score {score} < {down}"))
                }
            }
        };
        if to == from {
            return None;
        }
        self.health = to;
        match to {
            Health::Up => self.up_since = Some(self.now),
            Health::Degraded | Health::Down => {
                self.up_since = None;
                self.ever_failed = true;
            }
            Health::Unknown => self.up_since = None,
        }
        Some(Transition { from, to, reason })
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Whether traffic may move (back) to this path: Up, and either it never failed (a new
    /// path is preferred at its first Up) or it has been Up continuously for the failback
    /// hold-down since it last recovered.
    pub fn preferred(&self, now: Duration) -> bool {
        if self.health != Health::Up {
            return false;
        }
        if !self.ever_failed {
            return true;
        }
        let now = self.now.max(now);
        self.up_since
            .is_some_and(|since| now.saturating_sub(since) >= self.config.failback_hold_down)
    }

    /// Whether the path may carry traffic at all: measured and not Down (Degraded paths are
    /// the last resort when nothing better is up).
    pub fn usable(&self) -> bool {
        matches!(self.health, Health::Up | Health::Degraded)
    }
}

/// Whether one class may use one path, given its SLA, with failback hold-down.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlaGate {
    /// Whether the SLA was ever broken: until then the class may use the path at once.
    ever_broken: bool,
    /// Since when the SLA has been met continuously (after a break).
    good_since: Option<Duration>,
    allowed: bool,
    now: Duration,
}

impl SlaGate {
    pub fn new() -> Self {
        Self {
            allowed: true,
            ..Self::default()
        }
    }

    /// Whether the class may use the path now, given whether it `meets` the SLA now. False at
    /// once when the SLA is broken; true again only after it has been met continuously for
    /// `hold_down` (and immediately if it was never broken).
    pub fn update(&mut self, now: Duration, meets: bool, hold_down: Duration) -> bool {
        self.now = self.now.max(now);
        if !meets {
            self.ever_broken = true;
            self.good_since = None;
            self.allowed = false;
        } else if !self.ever_broken {
            self.allowed = true;
        } else {
            let since = *self.good_since.get_or_insert(self.now);
            self.allowed = self.now.saturating_sub(since) >= hold_down;
        }
        self.allowed
    }

    /// The answer of the last update (true before any).
    pub fn allowed(&self) -> bool {
        self.allowed
    }
}

/// Whether measurements respect every limit the SLA sets (an unset limit is no limit). A NaN
/// measurement respects nothing. The caller asks only for usable paths: an unmeasured path's
/// zero latency proves nothing.
pub fn meets_sla(sla: &Sla, stats: &ProbeStats) -> bool {
    let within = |limit: Option<f64>, value: f64| limit.is_none_or(|l| value <= l);
    within(sla.max_latency_ms, stats.latency_ms)
        && within(sla.max_jitter_ms, stats.jitter_ms)
        && within(sla.max_loss_pct, stats.loss_pct)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use Health::*;
    use Liveness::{Alive, Dead};

    fn s(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    fn config() -> HealthConfig {
        HealthConfig {
            degrade_below_score: 60,
            down_below_score: 20,
            recover_margin: 5,
            failback_hold_down: Duration::from_secs(10),
        }
    }

    /// (time s, liveness, score, losses, expected transition (from, to, reason), health after)
    type Row = (
        f64,
        Liveness,
        u8,
        u32,
        Option<(Health, Health, &'static str)>,
        Health,
    );

    fn run(h: &mut PathHealth, rows: &[Row]) {
        for (i, &(at, liveness, score, losses, expected, after)) in rows.iter().enumerate() {
            let got = h.update(s(at), liveness, score, losses);
            let got = got.map(|t| (t.from, t.to, t.reason));
            let expected = expected.map(|(f, t, r)| (f, t, r.to_string()));
            assert_eq!(got, expected, "row {i} at {at}s");
            assert_eq!(h.health(), after, "row {i}");
        }
    }

    #[test]
    fn transitions() {
        let mut h = PathHealth::new(config());
        assert!(!h.usable() && !h.preferred(s(0.0)));
        run(
            &mut h,
            &[
                (0.0, Liveness::Unknown, 0, 0, None, Unknown),
                (
                    1.0,
                    Alive,
                    90,
                    0,
                    Some((Unknown, Up, "first measurement: score 90")),
                    Up,
                ),
            ],
        );
        // Never failed: preferred at once.
        assert!(h.preferred(s(1.0)) && h.usable());
        run(
            &mut h,
            &[
                (
                    2.0,
                    Alive,
                    50,
                    0,
                    Some((Up, Degraded, "score 50 < 60")),
                    Degraded,
                ),
                // Above 60 but not 65: stays Degraded.
                (3.0, Alive, 62, 0, None, Degraded),
                (
                    4.0,
                    Alive,
                    65,
                    0,
                    Some((Degraded, Up, "score 65 >= 65")),
                    Up,
                ),
            ],
        );
        assert!(h.usable());
        // Recovered at 4 s: not preferred before 14 s.
        run(&mut h, &[(13.9, Alive, 90, 0, None, Up)]);
        assert!(!h.preferred(s(13.9)));
        assert!(h.preferred(s(14.0)));
        run(
            &mut h,
            &[
                (
                    15.0,
                    Dead,
                    90,
                    3,
                    Some((Up, Down, "3 consecutive probes lost")),
                    Down,
                ),
                (
                    16.0,
                    Alive,
                    50,
                    0,
                    Some((Down, Degraded, "probes answered again, but score 50 < 65")),
                    Degraded,
                ),
                (
                    17.0,
                    Alive,
                    10,
                    0,
                    Some((Degraded, Down, "score 10 < 20")),
                    Down,
                ),
                // Down for its score: leaving needs 20 + 5.
                (18.0, Alive, 22, 0, None, Down),
                (
                    19.0,
                    Alive,
                    25,
                    0,
                    Some((Down, Degraded, "score 25 >= 25")),
                    Degraded,
                ),
                (
                    20.0,
                    Dead,
                    25,
                    4,
                    Some((Degraded, Down, "4 consecutive probes lost")),
                    Down,
                ),
                (
                    21.0,
                    Alive,
                    70,
                    0,
                    Some((Down, Up, "probes answered again (score 70)")),
                    Up,
                ),
            ],
        );
        assert!(!h.preferred(s(30.9)));
        assert!(h.preferred(s(31.0)));
        // A prober restarted (Unknown) does not make a measured path Unknown.
        run(&mut h, &[(32.0, Liveness::Unknown, 0, 0, None, Up)]);
        // Time going backwards stands still.
        assert!(h.preferred(s(0.0)));
    }

    #[test]
    fn a_path_that_starts_bad_waits_for_the_hold_down() {
        let mut h = PathHealth::new(config());
        run(
            &mut h,
            &[
                (
                    0.0,
                    Alive,
                    40,
                    0,
                    Some((Unknown, Degraded, "score 40 < 60")),
                    Degraded,
                ),
                (
                    1.0,
                    Alive,
                    80,
                    0,
                    Some((Degraded, Up, "score 80 >= 65")),
                    Up,
                ),
            ],
        );
        assert!(!h.preferred(s(10.9)));
        assert!(h.preferred(s(11.0)));
        let mut h = PathHealth::new(config());
        run(
            &mut h,
            &[(
                0.0,
                Dead,
                0,
                3,
                Some((Unknown, Down, "3 consecutive probes lost")),
                Down,
            )],
        );
    }

    #[test]
    fn a_flapping_path_is_not_preferred_until_stable_for_the_hold_down() {
        let mut h = PathHealth::new(config());
        h.update(s(0.0), Alive, 90, 0);
        assert!(h.preferred(s(0.0)));
        // Good and bad in turn every second for a minute.
        for second in 1..=60 {
            let t = s(f64::from(second));
            if second % 2 == 1 {
                h.update(t, Dead, 90, 3);
            } else {
                h.update(t, Alive, 90, 0);
            }
            assert!(!h.preferred(t), "preferred at {second}s");
            assert!(!h.preferred(t + s(0.99)), "preferred at {second}.99s");
        }
        // Up since 60 s and then stable.
        for tenth in 600..=700 {
            let t = s(f64::from(tenth) / 10.0);
            h.update(t, Alive, 90, 0);
            assert_eq!(h.preferred(t), tenth >= 700, "at {t:?}");
        }
    }

    #[test]
    fn a_score_oscillating_around_the_threshold_does_not_flap() {
        let mut h = PathHealth::new(config());
        h.update(s(0.0), Alive, 70, 0);
        let mut transitions = Vec::new();
        for i in 1..100 {
            let score = if i % 2 == 0 { 58 } else { 61 };
            transitions.extend(h.update(s(f64::from(i)), Alive, score, 0));
        }
        assert_eq!(transitions.len(), 1, "{transitions:?}");
        assert_eq!((transitions[0].from, transitions[0].to), (Up, Degraded));
        // And around the down threshold.
        let mut transitions = Vec::new();
        for i in 100..200 {
            let score = if i % 2 == 0 { 18 } else { 21 };
            transitions.extend(h.update(s(f64::from(i)), Alive, score, 0));
        }
        assert_eq!(transitions.len(), 1, "{transitions:?}");
        assert_eq!((transitions[0].from, transitions[0].to), (Degraded, Down));
    }

    #[test]
    fn statuses_and_config() {
        assert_eq!(Up.as_status(), PathStatus::Up);
        assert_eq!(Degraded.as_status(), PathStatus::Degraded);
        assert_eq!(Down.as_status(), PathStatus::Down);
        assert_eq!(Unknown.as_status(), PathStatus::Unknown);
        let c = HealthConfig::from(&FailoverSettings::default());
        assert_eq!(c, config());
        assert_eq!(HealthConfig::default(), c);
    }

    #[test]
    fn thresholds_near_100_stay_reachable() {
        let mut h = PathHealth::new(HealthConfig {
            degrade_below_score: 100,
            down_below_score: 100,
            recover_margin: 50,
            failback_hold_down: Duration::ZERO,
        });
        assert_eq!(h.update(s(0.0), Alive, 99, 0).map(|t| t.to), Some(Down));
        assert_eq!(h.update(s(1.0), Alive, 200, 0).map(|t| t.to), Some(Up));
        assert!(h.preferred(s(1.0)));
    }

    #[test]
    fn sla_gate_holds_down() {
        let hold = Duration::from_secs(10);
        let mut g = SlaGate::new();
        assert!(g.allowed());
        // Never broken: allowed at once.
        assert!(g.update(s(0.0), true, hold));
        // Broken: not allowed at once.
        assert!(!g.update(s(1.0), false, hold));
        assert!(!g.update(s(2.0), true, hold));
        assert!(!g.update(s(11.9), true, hold));
        assert!(g.update(s(12.0), true, hold));
        // A single bad sample restarts the wait.
        assert!(!g.update(s(13.0), false, hold));
        assert!(!g.update(s(14.0), true, hold));
        assert!(!g.update(s(20.0), true, hold));
        assert!(!g.update(s(21.0), false, hold));
        assert!(!g.update(s(22.0), true, hold));
        assert!(g.update(s(32.0), true, hold));
        assert!(g.allowed());
        // A zero hold-down allows as soon as the SLA is met.
        let mut g = SlaGate::new();
        assert!(!g.update(s(0.0), false, Duration::ZERO));
        assert!(g.update(s(0.0), true, Duration::ZERO));
    }

    #[test]
    fn sla_limits() {
        let stats = ProbeStats {
            latency_ms: 30.0,
            jitter_ms: 5.0,
            loss_pct: 1.0,
            ..ProbeStats::default()
        };
        assert!(meets_sla(&Sla::default(), &stats));
        let sla = |lat, jit, loss| Sla {
            max_latency_ms: lat,
            max_jitter_ms: jit,
            max_loss_pct: loss,
        };
        assert!(meets_sla(&sla(Some(30.0), Some(5.0), Some(1.0)), &stats));
        assert!(!meets_sla(&sla(Some(29.9), None, None), &stats));
        assert!(!meets_sla(&sla(None, Some(4.9), None), &stats));
        assert!(!meets_sla(&sla(None, None, Some(0.5)), &stats));
        let nan = ProbeStats {
            latency_ms: f64::NAN,
            ..stats.clone()
        };
        assert!(!meets_sla(&sla(Some(100.0), None, None), &nan));
        assert!(meets_sla(&sla(None, Some(10.0), None), &nan));
    }

    /// The reference model: what each state needs, stated per state, and the failback rule
    /// from the whole history.
    #[derive(Debug, Default)]
    struct Model {
        health: Health,
        down_for_score: bool,
        /// Every (time, health) after each update.
        history: Vec<(Duration, Health)>,
    }

    impl Model {
        fn update(&mut self, c: &HealthConfig, now: Duration, l: Liveness, score: u8) {
            let score = score.min(100);
            let degrade = c.degrade_below_score;
            let down = c.down_below_score;
            let margin = c.recover_margin;
            let next = match l {
                Liveness::Unknown => self.health,
                Dead => {
                    self.down_for_score = false;
                    Down
                }
                Alive => {
                    let up_needs = if matches!(self.health, Up | Unknown) {
                        degrade
                    } else {
                        (degrade + margin).min(100)
                    };
                    let degraded_needs = if self.health == Down && self.down_for_score {
                        down + margin
                    } else {
                        down
                    };
                    if score >= up_needs {
                        Up
                    } else if score >= degraded_needs {
                        Degraded
                    } else {
                        if self.health != Down {
                            self.down_for_score = true;
                        }
                        Down
                    }
                }
            };
            self.health = next;
            let now = self.history.last().map_or(now, |&(t, _)| t.max(now));
            self.history.push((now, next));
        }

        fn preferred(&self, c: &HealthConfig, now: Duration) -> bool {
            if self.health != Up {
                return false;
            }
            let failed = |h: Health| matches!(h, Down | Degraded);
            let Some(last_failure) = self.history.iter().rposition(|&(_, h)| failed(h)) else {
                return true;
            };
            // Up since the first update after the last failure.
            let since = self.history[last_failure + 1].0;
            let now = self.history.last().map_or(now, |&(t, _)| t.max(now));
            now - since >= c.failback_hold_down
        }
    }

    fn valid_config() -> impl Strategy<Value = HealthConfig> {
        (0u8..=100, 0u8..=100, 0u8..20, 0u64..20).prop_map(|(a, b, margin, hold)| HealthConfig {
            degrade_below_score: a.max(b),
            down_below_score: a.min(b),
            recover_margin: margin,
            failback_hold_down: Duration::from_secs(hold),
        })
    }

    fn liveness() -> impl Strategy<Value = Liveness> {
        prop_oneof![
            1 => Just(Liveness::Unknown),
            6 => Just(Alive),
            2 => Just(Dead),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Against the model, plus the invariants: a dead path is Down, an Up path scores at
        /// least `degrade_below_score`, a transition is reported exactly when the state
        /// changes, and Unknown never comes back.
        #[test]
        fn matches_the_reference_model(
            c in valid_config(),
            steps in proptest::collection::vec((0u64..3000, liveness(), 0u8..=110, 0u32..10), 1..120),
        ) {
            let mut h = PathHealth::new(c);
            let mut m = Model::default();
            let mut now = Duration::ZERO;
            let mut measured = false;
            for (advance, l, score, losses) in steps {
                now += Duration::from_millis(advance);
                let before = h.health();
                let t = h.update(now, l, score, losses);
                m.update(&c, now, l, score);
                prop_assert_eq!(h.health(), m.health);
                match &t {
                    Some(t) => {
                        prop_assert_eq!(t.from, before);
                        prop_assert_eq!(t.to, h.health());
                        prop_assert!(t.from != t.to);
                        prop_assert!(!t.reason.is_empty());
                    }
                    None => prop_assert_eq!(h.health(), before),
                }
                measured |= l != Liveness::Unknown;
                prop_assert_eq!(h.health() == Unknown, !measured);
                if l == Dead {
                    prop_assert_eq!(h.health(), Down);
                }
                if l == Alive && h.health() == Up {
                    prop_assert!(score >= c.degrade_below_score);
                }
                for later in [0, 1, 5_000, 10_000, 30_000] {
                    let at = now + Duration::from_millis(later);
                    prop_assert_eq!(h.preferred(at), m.preferred(&c, at), "at {:?}", at);
                }
                prop_assert_eq!(h.usable(), matches!(h.health(), Up | Degraded));
            }
        }

        /// Against the rule it implements, with the whole history as the model.
        #[test]
        fn sla_gate_matches_its_rule(
            hold in 0u64..5000,
            steps in proptest::collection::vec((0u64..3000, any::<bool>()), 1..100),
        ) {
            let hold = Duration::from_millis(hold);
            let mut g = SlaGate::new();
            let mut now = Duration::ZERO;
            let mut history: Vec<(Duration, bool)> = Vec::new();
            for (advance, meets) in steps {
                now += Duration::from_millis(advance);
                history.push((now, meets));
                let expected = match history.iter().rposition(|&(_, m)| !m) {
                    None => true,
                    Some(i) if i + 1 == history.len() => false,
                    Some(i) => now - history[i + 1].0 >= hold,
                };
                prop_assert_eq!(g.update(now, meets, hold), expected);
            }
        }

        /// Any thresholds, scores and times: no panic, and the state stays consistent.
        #[test]
        fn survives_any_input(
            c in (any::<u8>(), any::<u8>(), any::<u8>(), any::<u64>()),
            steps in proptest::collection::vec(
                (any::<u64>(), liveness(), any::<u8>(), any::<u32>()), 1..60),
        ) {
            let mut h = PathHealth::new(HealthConfig {
                degrade_below_score: c.0,
                down_below_score: c.1,
                recover_margin: c.2,
                failback_hold_down: Duration::from_secs(c.3),
            });
            for (at, l, score, losses) in steps {
                let now = Duration::from_secs(at);
                let _ = h.update(now, l, score, losses);
                let _ = h.preferred(now);
                let _ = h.preferred(Duration::MAX);
                prop_assert!(!h.usable() || h.health() != Down);
            }
        }
    }
}
