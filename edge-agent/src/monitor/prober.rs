//! One path's probe schedule and measurements (pure, BFD-like).
//!
//! A [`PathProber`] decides when the next probe of its path goes out, which sequence it
//! carries, when an unanswered probe counts as lost, and what the replies say about the path
//! (RTT, jitter, loss, liveness). It never touches a socket or a clock: the caller passes
//! `now` (a monotonic [`Duration`] since any epoch it likes) and does the sending.
//!
//! Liveness follows BFD (RFC 5880): a path is declared dead after `down_after_losses`
//! consecutive probes went unanswered for `timeout` (the detect multiplier), and alive again
//! at the first answered probe. Measurements keep flowing while dead, so a path that comes
//! back is judged on fresh numbers.
//!
//! Time that goes backwards (a caller mixing clocks, or two events observed out of order) is
//! treated as standing still, so nothing here can underflow or reorder probes.

use std::collections::BTreeMap;
use std::time::Duration;

use patronus_proto::intent::ProbeSettings;

use super::estimate::{ms, Jitter, LossWindow, RttWindow};

/// Most probes waiting for a reply at once. Only reached when the timeout is hundreds of
/// intervals long; the oldest is then counted as lost, so memory stays bounded whatever the
/// configuration.
pub const MAX_OUTSTANDING: usize = 256;
/// Shortest interval used, whatever is configured: a zero interval would make the next send
/// due forever and spin the caller's loop.
pub const MIN_INTERVAL: Duration = Duration::from_millis(1);
/// How many sequences below the next one the prober remembers as answered or lost, to tell
/// [`ReplyOutcome::Duplicate`] from [`ReplyOutcome::Late`]. Older replies are reported as
/// late: either way they change nothing.
const REMEMBERED: u64 = 1024;
const REMEMBERED_WORDS: usize = (REMEMBERED / 64) as usize;

/// How one path is probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProberConfig {
    /// Time between probes.
    pub interval: Duration,
    /// A probe unanswered this long after it was sent is lost.
    pub timeout: Duration,
    /// Consecutive losses that make the path dead (0 counts as 1).
    pub down_after_losses: u8,
    /// Resolved probes the loss percentage is computed over.
    pub loss_window: u16,
    /// RTT samples the latency is averaged over.
    pub rtt_window: u16,
    /// Fast detection (what the agent runs; the plain BFD-like schedule without it): a probe
    /// counts as lost after the smaller of `timeout` and an RTO learnt from the path
    /// (`2·SRTT + 4·RTTVAR`, at least [`ADAPTIVE_TIMEOUT_FLOOR`], once
    /// [`ADAPTIVE_MIN_SAMPLES`] replies came back), and after a loss the path is re-probed
    /// at once, a quarter of that timeout apart, until it answers or is dead. With 1 s probes
    /// a cut is found one probe interval plus ~125 ms after it happens at worst, instead of
    /// three intervals plus the timeout.
    pub fast_detection: bool,
}

/// The adaptive timeout never goes below this: queueing bursts on a WAN last tens of
/// milliseconds, and three of them in a row must not look like a dead path.
pub const ADAPTIVE_TIMEOUT_FLOOR: Duration = Duration::from_millis(50);
/// Replies needed before the adaptive timeout replaces the configured one.
pub const ADAPTIVE_MIN_SAMPLES: u64 = 5;

impl ProberConfig {
    /// 100 probes: 1 % loss resolution, and at the default 1 s interval a loss burst fades
    /// from the percentage within two minutes.
    pub const DEFAULT_LOSS_WINDOW: u16 = 100;
    /// 20 samples: smooths single slow replies without hiding a lasting change for long.
    pub const DEFAULT_RTT_WINDOW: u16 = 20;
}

impl From<&ProbeSettings> for ProberConfig {
    fn from(s: &ProbeSettings) -> Self {
        Self {
            interval: Duration::from_millis(u64::from(s.interval_ms)),
            timeout: Duration::from_millis(u64::from(s.timeout_ms)),
            down_after_losses: s.down_after_losses,
            loss_window: Self::loss_window_for(s.interval_ms),
            rtt_window: Self::DEFAULT_RTT_WINDOW,
            fast_detection: true,
        }
    }
}

impl ProberConfig {
    /// The loss window covers about [`Self::LOSS_WINDOW_SPAN_MS`] of probes, between 20 and
    /// [`Self::DEFAULT_LOSS_WINDOW`]: at 1 s probes a burst of loss fades from the health
    /// score in 20 s instead of 100 s, and at 20 ms probes the window still holds 100.
    pub fn loss_window_for(interval_ms: u32) -> u16 {
        let probes = Self::LOSS_WINDOW_SPAN_MS / u64::from(interval_ms.max(1));
        probes.clamp(20, u64::from(Self::DEFAULT_LOSS_WINDOW)) as u16
    }

    pub const LOSS_WINDOW_SPAN_MS: u64 = 10_000;
}

impl Default for ProberConfig {
    fn default() -> Self {
        Self::from(&ProbeSettings::default())
    }
}

/// Whether the path answers at all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Liveness {
    /// No reply yet and fewer than `down_after_losses` losses: too early to say.
    #[default]
    Unknown,
    Alive,
    Dead,
}

/// What [`PathProber::poll`] asks the caller to do and tells it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Poll {
    /// Send a probe with this sequence now.
    pub send: Option<u64>,
    /// Probes that counted as lost in this call.
    pub lost: u32,
    /// The new liveness, if it changed in this call.
    pub liveness_changed: Option<Liveness>,
}

/// What a reply was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyOutcome {
    /// A reply to a probe still waiting: measured.
    Accepted {
        rtt: Duration,
        liveness_changed: Option<Liveness>,
    },
    /// To a probe already counted as lost: it stays lost (counting it now would make loss
    /// depend on when the caller polled).
    Late,
    /// To a probe already answered.
    Duplicate,
    /// To a sequence this prober never sent (a stale reply from before a restart, or junk
    /// that passed authentication with another key epoch).
    Unknown,
}

/// A path's measurements, as reported and scored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProbeStats {
    /// Mean RTT of the RTT window, milliseconds; 0 when nothing was measured yet (see
    /// `last_rtt_ms`).
    pub latency_ms: f64,
    /// RFC 3550 jitter of the RTTs, milliseconds.
    pub jitter_ms: f64,
    /// Lost share of the loss window, 0..=100.
    pub loss_pct: f64,
    /// Totals since creation (the caller diffs them per report window).
    pub sent: u64,
    pub lost: u64,
    pub received: u64,
    /// The newest RTT, milliseconds; `None` before the first reply.
    pub last_rtt_ms: Option<f64>,
}

/// One path's prober.
#[derive(Debug, Clone)]
pub struct PathProber {
    config: ProberConfig,
    /// The latest `now` seen; earlier ones are raised to it.
    now: Duration,
    next_send: Duration,
    /// The schedule slot `next_send` was computed from (`next_send = basis + interval`), so
    /// a new interval can be applied from the last send; `None` before the first send.
    basis: Option<Duration>,
    next_seq: u64,
    /// Sequence → send time. Sequences rise with send times, so the first is the earliest
    /// to expire.
    outstanding: BTreeMap<u64, (Duration, u32)>,
    /// The last probes that expired unanswered (sequence, send time): a reply that comes
    /// late still teaches the adaptive timeout the path's real RTT.
    expired: std::collections::VecDeque<(u64, Duration)>,
    /// Bit `seq % REMEMBERED` set = that sequence was answered (cleared when sent).
    answered: [u64; REMEMBERED_WORDS],
    liveness: Liveness,
    consecutive_losses: u32,
    loss: LossWindow,
    rtt: RttWindow,
    jitter: Jitter,
    sent: u64,
    lost: u64,
    received: u64,
    /// RFC 6298 smoothed RTT and its variation (for the adaptive timeout).
    srtt: Option<Duration>,
    rttvar: Duration,
    /// While confirming a loss (fast detection): the spacing of the confirmation probes,
    /// and how many are still to send (the detect multiplier less the first loss).
    confirm_spacing: Option<Duration>,
    confirms_left: u32,
    /// The peer's own probes of this path (fast detection): when the last one arrived, the
    /// gap before it, and whether its lateness already made us probe.
    peer_last: Option<Duration>,
    peer_gap: Option<Duration>,
    peer_overdue_probed: bool,
}

impl PathProber {
    /// A prober whose first probe is due at `now`.
    pub fn new(config: ProberConfig, now: Duration) -> Self {
        Self {
            config,
            now,
            next_send: now,
            basis: None,
            next_seq: 1,
            outstanding: BTreeMap::new(),
            expired: std::collections::VecDeque::new(),
            answered: [0; REMEMBERED_WORDS],
            liveness: Liveness::Unknown,
            consecutive_losses: 0,
            loss: LossWindow::new(config.loss_window),
            rtt: RttWindow::new(config.rtt_window),
            jitter: Jitter::new(),
            sent: 0,
            lost: 0,
            received: 0,
            srtt: None,
            rttvar: Duration::ZERO,
            confirm_spacing: None,
            confirms_left: 0,
            peer_last: None,
            peer_gap: None,
            peer_overdue_probed: false,
        }
    }

    /// The peer's own probe of this path arrived at `now` (its request, authenticated and
    /// not replayed). With fast detection it is evidence between our probes
    /// (interleaved bidirectional probing):
    /// - while the path is alive and the peer probes at about our interval, our next probe
    ///   moves halfway between the peer's (both ends doing so settle half an interval apart),
    ///   so something crosses the path every half interval;
    /// - a peer probe overdue by the timeout (see [`Self::poll`]) makes us probe at once, which
    ///   starts the usual loss confirmation if the path is cut: a cut is found about half an
    ///   interval sooner at worst;
    /// - a dead path the peer reaches again is probed at once.
    pub fn on_peer_probe(&mut self, now: Duration) {
        let now = self.advance(now);
        if !self.config.fast_detection {
            return;
        }
        if let Some(last) = self.peer_last {
            let gap = now.saturating_sub(last);
            if !gap.is_zero() {
                self.peer_gap = Some(gap);
            }
        }
        self.peer_last = Some(now);
        self.peer_overdue_probed = false;
        match self.liveness {
            Liveness::Dead => self.next_send = self.next_send.min(now),
            Liveness::Alive if self.confirm_spacing.is_none() && self.outstanding.is_empty() => {
                let interval = self.interval();
                if self
                    .peer_gap
                    .is_some_and(|gap| gap.abs_diff(interval) <= interval / 4)
                {
                    let halfway = now.saturating_add(interval / 2);
                    self.next_send = halfway;
                    self.basis = Some(halfway.saturating_sub(interval));
                }
            }
            _ => {}
        }
    }

    /// Probe now (if alive and nothing is waiting): another path sharing this one's local
    /// uplink just went down, and this one should prove it is not cut too.
    pub fn probe_now(&mut self, now: Duration) {
        let now = self.advance(now);
        if self.liveness == Liveness::Alive && self.outstanding.is_empty() {
            self.next_send = self.next_send.min(now);
        }
    }

    /// When the peer's next probe counts as overdue, if that is still to be acted on.
    fn peer_overdue_at(&self) -> Option<Duration> {
        if !self.config.fast_detection
            || self.peer_overdue_probed
            || self.liveness != Liveness::Alive
            || self.confirm_spacing.is_some()
        {
            return None;
        }
        let (last, gap) = (self.peer_last?, self.peer_gap?);
        Some(last.saturating_add(gap).saturating_add(self.timeout()))
    }

    /// A new configuration, keeping every measurement. A changed interval applies from the
    /// next send: it goes out one new interval after the previous send's slot (at once if
    /// that is already past), so shortening the interval does not wait out the old one. A
    /// changed timeout applies to the probes already waiting; a lower `down_after_losses`
    /// takes effect at the next poll.
    pub fn set_config(&mut self, config: ProberConfig, now: Duration) {
        let now = self.advance(now);
        let interval_changed = config.interval != self.config.interval;
        self.config = config;
        self.loss.resize(config.loss_window);
        self.rtt.resize(config.rtt_window);
        if interval_changed {
            if let Some(basis) = self.basis {
                self.next_send = basis.saturating_add(self.interval()).max(now);
            }
        }
    }

    pub fn config(&self) -> &ProberConfig {
        &self.config
    }

    /// When [`Self::poll`] next has something to do: the next send or the earliest expiry
    /// of a waiting probe, whichever is first. May be in the past (poll at once).
    pub fn next_deadline(&self) -> Duration {
        let next = self
            .outstanding
            .values()
            .map(|&(sent_at, factor)| self.expiry(sent_at, factor))
            .min()
            .map_or(self.next_send, |expiry| expiry.min(self.next_send));
        self.peer_overdue_at().map_or(next, |at| at.min(next))
    }

    /// Expire waiting probes whose timeout has passed, then allocate the next probe if its
    /// time has come. Call at [`Self::next_deadline`] (calling earlier or more often is
    /// harmless).
    pub fn poll(&mut self, now: Duration) -> Poll {
        let now = self.advance(now);
        let mut out = Poll::default();
        let expired: Vec<(u64, Duration)> = self
            .outstanding
            .iter()
            .filter(|(_, &(sent_at, factor))| self.expiry(sent_at, factor) <= now)
            .map(|(&seq, &(sent_at, _))| (seq, sent_at))
            .collect();
        for (seq, sent_at) in expired {
            self.outstanding.remove(&seq);
            self.remember_expired(seq, sent_at);
            self.count_loss(&mut out);
        }
        // Fast detection: a loss on a live path is confirmed (or not) right away rather than
        // at the regular cadence.
        if self.config.fast_detection
            && out.lost > 0
            && self.consecutive_losses < self.down_after()
            && self.liveness != Liveness::Dead
            && self.confirm_spacing.is_none()
        {
            let spacing = (self.timeout() / 4).max(MIN_INTERVAL);
            self.next_send = self.next_send.min(now);
            self.confirm_spacing = Some(spacing);
            self.confirms_left = self.down_after().saturating_sub(1).max(1);
        }
        // The peer's probe is overdue: probe now (a lost one starts the confirmation).
        if self.peer_overdue_at().is_some_and(|at| now >= at) {
            self.peer_overdue_probed = true;
            if self.outstanding.is_empty() {
                self.next_send = self.next_send.min(now);
            }
        }
        if now >= self.next_send {
            self.send(now, &mut out);
        }
        if self.consecutive_losses >= self.down_after() && self.liveness != Liveness::Dead {
            self.liveness = Liveness::Dead;
            out.liveness_changed = Some(Liveness::Dead);
        }
        out
    }

    /// A reply to probe `sequence` arrived at `now`; the reflector held it for
    /// `reflector_hold` before answering (subtracted from the RTT). A reply to a waiting
    /// probe is accepted even after its timeout if no poll has expired it yet: it is proof
    /// the path works, and the timeout only decides when silence means loss.
    pub fn on_reply(
        &mut self,
        now: Duration,
        sequence: u64,
        reflector_hold: Duration,
    ) -> ReplyOutcome {
        let now = self.advance(now);
        if let Some((sent_at, _)) = self.outstanding.remove(&sequence) {
            let rtt = now.saturating_sub(sent_at).saturating_sub(reflector_hold);
            if self.received == 0 {
                // Probes lost before the path ever answered were sent while the tunnel was
                // still being set up; they say nothing about the path's quality.
                self.loss.clear();
            }
            self.set_answered(sequence);
            self.received = self.received.saturating_add(1);
            self.consecutive_losses = 0;
            self.loss.record(false);
            self.rtt.push(rtt);
            self.jitter.observe(rtt);
            self.learn_rtt(rtt);
            if self.confirm_spacing.take().is_some() {
                // Alive after all: back to the regular cadence from the last probe sent.
                if let Some(basis) = self.basis {
                    self.next_send = basis.saturating_add(self.interval());
                }
            }
            let liveness_changed = (self.liveness != Liveness::Alive).then(|| {
                self.liveness = Liveness::Alive;
                Liveness::Alive
            });
            return ReplyOutcome::Accepted {
                rtt,
                liveness_changed,
            };
        }
        if sequence == 0 || sequence >= self.next_seq {
            return ReplyOutcome::Unknown;
        }
        if self.next_seq - sequence > REMEMBERED || !self.is_answered(sequence) {
            if let Some(i) = self.expired.iter().position(|&(seq, _)| seq == sequence) {
                let (_, sent_at) = self.expired.remove(i).unwrap_or((sequence, now));
                self.learn_rtt(now.saturating_sub(sent_at).saturating_sub(reflector_hold));
            }
            ReplyOutcome::Late
        } else {
            ReplyOutcome::Duplicate
        }
    }

    pub fn liveness(&self) -> Liveness {
        self.liveness
    }

    /// Probes lost since the last accepted reply.
    pub fn consecutive_losses(&self) -> u32 {
        self.consecutive_losses
    }

    /// Probes sent and neither answered nor lost yet.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    pub fn stats(&self) -> ProbeStats {
        ProbeStats {
            latency_ms: self.rtt.mean().map(ms).unwrap_or(0.0),
            jitter_ms: self.jitter.value(),
            loss_pct: self.loss.loss_pct(),
            sent: self.sent,
            lost: self.lost,
            received: self.received,
            last_rtt_ms: self.rtt.last().map(ms),
        }
    }

    /// The smallest RTT in the window: the path's base delay, without queueing.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.rtt.min()
    }

    fn advance(&mut self, now: Duration) -> Duration {
        self.now = self.now.max(now);
        self.now
    }

    fn interval(&self) -> Duration {
        self.config.interval.max(MIN_INTERVAL)
    }

    fn down_after(&self) -> u32 {
        u32::from(self.config.down_after_losses.max(1))
    }

    /// When a probe sent at `sent_at` counts as lost; confirmation probes (`factor` 2) wait
    /// twice the timeout, so an RTT that merely jumped is learnt from them (and from the
    /// late reply to the first) instead of killing the path.
    fn expiry(&self, sent_at: Duration, factor: u32) -> Duration {
        sent_at.saturating_add(self.timeout().saturating_mul(factor.max(1)))
    }

    fn remember_expired(&mut self, seq: u64, sent_at: Duration) {
        if self.config.fast_detection {
            if self.expired.len() >= 64 {
                self.expired.pop_front();
            }
            self.expired.push_back((seq, sent_at));
        }
    }

    /// The timeout in force: the configured one, or with fast detection the learnt RTO when
    /// it is smaller.
    pub fn timeout(&self) -> Duration {
        match (self.config.fast_detection, self.srtt) {
            (true, Some(srtt)) if self.received >= ADAPTIVE_MIN_SAMPLES => {
                let rto = srtt
                    .saturating_mul(2)
                    .saturating_add(self.rttvar.saturating_mul(4))
                    .max(ADAPTIVE_TIMEOUT_FLOOR);
                rto.min(self.config.timeout)
            }
            _ => self.config.timeout,
        }
    }

    /// RFC 6298 §2: SRTT and RTTVAR from one more sample.
    fn learn_rtt(&mut self, rtt: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let deviation = srtt.abs_diff(rtt);
                self.rttvar = self.rttvar.saturating_mul(3).saturating_add(deviation) / 4;
                self.srtt = Some(srtt.saturating_mul(7).saturating_add(rtt) / 8);
            }
        }
    }

    fn send(&mut self, now: Duration, out: &mut Poll) {
        let seq = self.next_seq;
        let Some(after) = seq.checked_add(1) else {
            // 2^64 probes later: stop rather than reuse a sequence.
            self.next_send = Duration::MAX;
            return;
        };
        self.next_seq = after;
        let confirming = self.confirm_spacing.is_some()
            && self.consecutive_losses > 0
            && self.liveness != Liveness::Dead;
        // Confirmations wait twice the learnt RTO (an RTT that jumped past it is learnt
        // from them); a timeout the operator configured below the RTO floor is kept as is.
        let factor = if confirming && self.timeout() < self.config.timeout {
            2
        } else {
            1
        };
        self.outstanding.insert(seq, (now, factor));
        self.clear_answered(seq);
        self.sent = self.sent.saturating_add(1);
        out.send = Some(seq);
        if self.outstanding.len() > MAX_OUTSTANDING {
            if let Some((seq, (sent_at, _))) = self.outstanding.pop_first() {
                self.remember_expired(seq, sent_at);
            }
            self.count_loss(out);
        }
        // Confirming a loss: the next probe follows closely, until an answer or death
        // (checked at the next poll) ends the confirmation; the regular cadence restarts
        // from the last confirmation probe.
        if let Some(spacing) = self.confirm_spacing {
            if self.consecutive_losses > 0 && self.liveness != Liveness::Dead {
                self.basis = Some(now);
                self.confirms_left = self.confirms_left.saturating_sub(1);
                if self.confirms_left > 0 {
                    self.next_send = now.saturating_add(spacing.min(self.interval()));
                } else {
                    // Enough confirmations are on their way; their expiry decides.
                    self.next_send = now.saturating_add(self.interval());
                    self.confirm_spacing = None;
                }
                return;
            }
            self.confirm_spacing = None;
        }
        // Keep the cadence (slot + interval) when on time or a little late; when a whole
        // interval or more behind, restart it from now instead of sending a burst.
        let interval = self.interval();
        let slot = self.next_send;
        let basis = if slot.saturating_add(interval) > now {
            slot
        } else {
            now
        };
        self.basis = Some(basis);
        self.next_send = basis.saturating_add(interval);
    }

    fn count_loss(&mut self, out: &mut Poll) {
        self.lost = self.lost.saturating_add(1);
        self.consecutive_losses = self.consecutive_losses.saturating_add(1);
        self.loss.record(true);
        out.lost = out.lost.saturating_add(1);
    }

    fn bit(seq: u64) -> (usize, u64) {
        let i = seq % REMEMBERED;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    fn set_answered(&mut self, seq: u64) {
        let (word, mask) = Self::bit(seq);
        self.answered[word] |= mask;
    }

    fn clear_answered(&mut self, seq: u64) {
        let (word, mask) = Self::bit(seq);
        self.answered[word] &= !mask;
    }

    fn is_answered(&self, seq: u64) -> bool {
        let (word, mask) = Self::bit(seq);
        self.answered[word] & mask != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn t(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn config(interval: u64, timeout: u64, down_after: u8) -> ProberConfig {
        ProberConfig {
            interval: t(interval),
            timeout: t(timeout),
            down_after_losses: down_after,
            loss_window: 100,
            rtt_window: 20,
            fast_detection: false,
        }
    }

    /// One step of a table: what the caller does at a time, and what it must get back.
    enum Step {
        PollAt(u64, Poll),
        ReplyAt(u64, u64, u64, ReplyOutcome),
        DeadlineIs(u64),
    }
    use Step::*;

    fn send(seq: u64) -> Poll {
        Poll {
            send: Some(seq),
            ..Poll::default()
        }
    }

    fn nothing() -> Poll {
        Poll::default()
    }

    fn accepted(rtt: u64, changed: Option<Liveness>) -> ReplyOutcome {
        ReplyOutcome::Accepted {
            rtt: t(rtt),
            liveness_changed: changed,
        }
    }

    fn run(p: &mut PathProber, steps: &[Step]) {
        for (i, step) in steps.iter().enumerate() {
            match *step {
                PollAt(at, expected) => assert_eq!(p.poll(t(at)), expected, "step {i}: poll {at}"),
                ReplyAt(at, seq, hold, expected) => assert_eq!(
                    p.on_reply(t(at), seq, t(hold)),
                    expected,
                    "step {i}: reply {seq} at {at}"
                ),
                DeadlineIs(at) => assert_eq!(p.next_deadline(), t(at), "step {i}: deadline"),
            }
        }
    }

    #[test]
    fn all_answered() {
        let mut p = PathProber::new(config(1000, 1000, 3), t(0));
        run(
            &mut p,
            &[
                DeadlineIs(0),
                PollAt(0, send(1)),
                // Waiting for 1 (expires at 1000) and the next send at 1000.
                DeadlineIs(1000),
                ReplyAt(20, 1, 0, accepted(20, Some(Liveness::Alive))),
                DeadlineIs(1000),
                PollAt(999, nothing()),
                PollAt(1000, send(2)),
                ReplyAt(1030, 2, 0, accepted(30, None)),
                PollAt(2000, send(3)),
                ReplyAt(2010, 3, 0, accepted(10, None)),
            ],
        );
        let s = p.stats();
        assert_eq!((s.sent, s.received, s.lost), (3, 3, 0));
        assert_eq!(s.loss_pct, 0.0);
        assert!((s.latency_ms - 20.0).abs() < 1e-9);
        // D = 10 then 20: 10/16, then + (20 - 0.625)/16.
        let j = 0.625 + (20.0 - 0.625) / 16.0;
        assert!((s.jitter_ms - j).abs() < 1e-9);
        assert_eq!(s.last_rtt_ms, Some(10.0));
        assert_eq!(p.min_rtt(), Some(t(10)));
        assert_eq!(p.liveness(), Liveness::Alive);
        assert_eq!(p.outstanding(), 0);
    }

    #[test]
    fn three_consecutive_losses_make_it_dead_at_the_third_expiry() {
        let lost = |n| Poll {
            lost: n,
            ..Poll::default()
        };
        let mut p = PathProber::new(config(1000, 500, 3), t(0));
        run(
            &mut p,
            &[
                PollAt(0, send(1)),
                DeadlineIs(500),
                PollAt(499, nothing()),
                PollAt(500, lost(1)),
                PollAt(1000, send(2)),
                PollAt(1500, lost(1)),
                PollAt(2000, send(3)),
                PollAt(2499, nothing()),
                DeadlineIs(2500),
                PollAt(
                    2500,
                    Poll {
                        send: None,
                        lost: 1,
                        liveness_changed: Some(Liveness::Dead),
                    },
                ),
                // Stays dead without repeating the change.
                PollAt(3000, send(4)),
                PollAt(3500, lost(1)),
                // A reply brings it back.
                PollAt(4000, send(5)),
                ReplyAt(4040, 5, 0, accepted(40, Some(Liveness::Alive))),
                // Replies to probes already lost are late and change nothing.
                ReplyAt(4050, 1, 0, ReplyOutcome::Late),
                ReplyAt(4050, 4, 0, ReplyOutcome::Late),
                ReplyAt(4060, 5, 0, ReplyOutcome::Duplicate),
                ReplyAt(4060, 0, 0, ReplyOutcome::Unknown),
                ReplyAt(4060, 6, 0, ReplyOutcome::Unknown),
                ReplyAt(4060, u64::MAX, 0, ReplyOutcome::Unknown),
            ],
        );
        assert_eq!(p.liveness(), Liveness::Alive);
        assert_eq!(p.consecutive_losses(), 0);
        let s = p.stats();
        assert_eq!((s.sent, s.received, s.lost), (5, 1, 4));
        // The four losses came before the path ever answered (a tunnel being set up): the
        // totals keep them, the loss window starts at the first reply.
        assert_eq!(s.loss_pct, 0.0);
    }

    #[test]
    fn losses_when_timeout_equals_interval() {
        // Expiry and the next send fall on the same instant: both in one poll.
        let mut p = PathProber::new(config(1000, 1000, 2), t(0));
        run(
            &mut p,
            &[
                PollAt(0, send(1)),
                PollAt(
                    1000,
                    Poll {
                        send: Some(2),
                        lost: 1,
                        liveness_changed: None,
                    },
                ),
                PollAt(
                    2000,
                    Poll {
                        send: Some(3),
                        lost: 1,
                        liveness_changed: Some(Liveness::Dead),
                    },
                ),
            ],
        );
        assert_eq!(p.consecutive_losses(), 2);
    }

    #[test]
    fn a_reply_before_the_poll_wins_over_the_timeout() {
        let mut p = PathProber::new(config(1000, 500, 3), t(0));
        run(
            &mut p,
            &[
                PollAt(0, send(1)),
                ReplyAt(700, 1, 0, accepted(700, Some(Liveness::Alive))),
                PollAt(700, nothing()),
            ],
        );
        assert_eq!(p.stats().lost, 0);
    }

    #[test]
    fn reflector_hold_is_not_path_delay() {
        let mut p = PathProber::new(config(1000, 1000, 3), t(0));
        run(
            &mut p,
            &[
                PollAt(0, send(1)),
                ReplyAt(50, 1, 10, accepted(40, Some(Liveness::Alive))),
                PollAt(1000, send(2)),
                // A hold longer than the whole round trip gives 0, not an underflow.
                ReplyAt(1050, 2, 100, accepted(0, None)),
            ],
        );
    }

    #[test]
    fn a_late_poll_keeps_the_cadence_and_a_very_late_one_sends_no_burst() {
        let mut p = PathProber::new(config(1000, 10_000, 3), t(0));
        run(
            &mut p,
            &[
                PollAt(0, send(1)),
                // 10 ms late: the next slot is still 2000.
                PollAt(1010, send(2)),
                DeadlineIs(2000),
                PollAt(2000, send(3)),
                // 3.5 intervals late: one probe, then one interval from now.
                PollAt(6500, send(4)),
                PollAt(6500, nothing()),
                PollAt(7499, nothing()),
                PollAt(7500, send(5)),
            ],
        );
    }

    #[test]
    fn an_interval_change_applies_from_the_next_send() {
        let mut p = PathProber::new(config(1000, 1000, 3), t(0));
        run(&mut p, &[PollAt(0, send(1))]);
        let before = p.stats();
        // Shorter: the next probe 200 ms after the last one, not at 1000.
        p.set_config(config(200, 1000, 3), t(100));
        run(
            &mut p,
            &[
                DeadlineIs(200),
                PollAt(200, send(2)),
                DeadlineIs(400),
                ReplyAt(210, 1, 0, accepted(210, Some(Liveness::Alive))),
            ],
        );
        // Longer: 5 s after the last slot; the waiting probe's expiry comes first.
        p.set_config(config(5000, 1000, 3), t(300));
        run(
            &mut p,
            &[
                DeadlineIs(1200),
                ReplyAt(350, 2, 0, accepted(150, None)),
                DeadlineIs(5200),
                PollAt(5199, nothing()),
                PollAt(5200, send(3)),
            ],
        );
        // Shorter again, but the new slot is already past: due at once.
        p.set_config(config(100, 1000, 3), t(5500));
        run(&mut p, &[DeadlineIs(5500), PollAt(5500, send(4))]);
        // Measurements were kept throughout.
        let s = p.stats();
        assert_eq!(before.sent, 1);
        assert_eq!((s.sent, s.received), (4, 2));
        // An unchanged interval keeps the schedule.
        let next = p.next_deadline();
        p.set_config(config(100, 1000, 3), t(5550));
        assert_eq!(p.next_deadline(), next);
    }

    #[test]
    fn a_lower_detect_multiplier_applies_at_the_next_poll() {
        let mut p = PathProber::new(config(1000, 500, 3), t(0));
        run(
            &mut p,
            &[
                PollAt(0, send(1)),
                PollAt(
                    500,
                    Poll {
                        lost: 1,
                        ..nothing()
                    },
                ),
            ],
        );
        p.set_config(config(1000, 500, 1), t(600));
        assert_eq!(
            p.poll(t(600)).liveness_changed,
            Some(Liveness::Dead),
            "one loss is enough now"
        );
    }

    #[test]
    fn time_going_backwards_stands_still() {
        let mut p = PathProber::new(config(1000, 1000, 3), t(5000));
        run(
            &mut p,
            &[
                PollAt(5000, send(1)),
                PollAt(0, nothing()),
                ReplyAt(100, 1, 0, accepted(0, Some(Liveness::Alive))),
                PollAt(6000, send(2)),
                ReplyAt(5500, 2, 0, accepted(0, None)),
            ],
        );
    }

    #[test]
    fn outstanding_probes_are_bounded() {
        let mut p = PathProber::new(config(1, 3_600_000, 3), t(0));
        let mut lost = 0;
        for ms in 0..300 {
            let out = p.poll(t(ms));
            assert_eq!(out.send, Some(ms + 1));
            lost += out.lost;
        }
        assert_eq!(p.outstanding(), MAX_OUTSTANDING);
        assert_eq!(lost, 300 - MAX_OUTSTANDING as u32);
        assert_eq!(p.liveness(), Liveness::Dead);
        // The evicted ones are late, the waiting ones still count.
        assert_eq!(p.on_reply(t(300), 1, t(0)), ReplyOutcome::Late);
        assert!(matches!(
            p.on_reply(t(300), 300, t(0)),
            ReplyOutcome::Accepted { .. }
        ));
    }

    #[test]
    fn defaults_come_from_the_intent() {
        let c = ProberConfig::from(&ProbeSettings::default());
        assert_eq!(c.interval, t(1000));
        assert_eq!(c.timeout, t(1000));
        assert_eq!(c.down_after_losses, 3);
        // 10 s of 1 s probes, at least 20.
        assert_eq!((c.loss_window, c.rtt_window), (20, 20));
        assert_eq!(ProberConfig::loss_window_for(100), 100);
        assert_eq!(ProberConfig::loss_window_for(20), 100);
        assert_eq!(ProberConfig::loss_window_for(60_000), 20);
        assert_eq!(ProberConfig::default(), c);
    }

    fn fast(interval: u64, timeout: u64, down_after: u8) -> ProberConfig {
        ProberConfig {
            fast_detection: true,
            ..config(interval, timeout, down_after)
        }
    }

    /// Answer every probe after `rtt` ms until `until`; returns the time of the last poll.
    fn answer_all(p: &mut PathProber, from: u64, until: u64, rtt: u64) -> u64 {
        let mut now = from;
        while now < until {
            if let Some(seq) = p.poll(t(now)).send {
                assert!(matches!(
                    p.on_reply(t(now + rtt), seq, t(0)),
                    ReplyOutcome::Accepted { .. }
                ));
            }
            now = p.next_deadline().as_millis() as u64;
        }
        now
    }

    /// A live prober at 1 s probes that has learnt a short RTO (2 ms answers).
    fn live_at_1s() -> (PathProber, u64) {
        let mut p = PathProber::new(fast(1000, 1000, 3), t(0));
        let now = answer_all(&mut p, 0, 10_000, 2);
        assert_eq!(p.liveness(), Liveness::Alive);
        assert!(p.timeout() <= t(60), "learnt RTO {:?}", p.timeout());
        (p, now)
    }

    #[test]
    fn our_probes_move_halfway_between_the_peers() {
        let (mut p, now) = live_at_1s();
        // The peer probes at now+100, now+1100: ours settle at peer + 500.
        p.on_peer_probe(t(now + 100));
        p.on_peer_probe(t(now + 1100));
        assert_eq!(p.next_deadline(), t(now + 1600));
        let seq = p.poll(t(now + 1600)).send.expect("a probe halfway");
        assert!(matches!(
            p.on_reply(t(now + 1602), seq, t(0)),
            ReplyOutcome::Accepted { .. }
        ));
        // Next: the peer's probe due at now+2100, checked one RTO later (our own slot is
        // now+2600).
        let next = p.next_deadline();
        assert!(next > t(now + 2100) && next <= t(now + 2160), "{next:?}");
    }

    #[test]
    fn a_peer_probing_at_another_rate_does_not_move_ours() {
        let (mut p, now) = live_at_1s();
        let due = p.next_deadline();
        for k in 0..10 {
            p.on_peer_probe(t(now + 20 * k));
        }
        assert_eq!(
            p.next_deadline(),
            due,
            "20 ms peer probes must not shift 1 s probes"
        );
    }

    #[test]
    fn an_overdue_peer_probe_makes_us_probe_at_once_and_a_cut_is_found_sooner() {
        let (mut p, now) = live_at_1s();
        p.on_peer_probe(t(now + 100));
        p.on_peer_probe(t(now + 1100));
        // Our probe halfway (now+1600) is answered; then the path is cut at now+1700.
        let seq = p.poll(t(now + 1600)).send.unwrap();
        p.on_reply(t(now + 1602), seq, t(0));
        // The peer's probe due at now+2100 never comes: at 2100 + RTO we probe at once,
        // before our own slot at 2600.
        let overdue = p.next_deadline();
        assert!(
            overdue > t(now + 2100) && overdue <= t(now + 2160),
            "{overdue:?}"
        );
        let poll = p.poll(overdue);
        assert!(poll.send.is_some(), "no probe on the overdue peer probe");
        // Nothing answers: the loss is confirmed and the path is dead well before the slot
        // our cadence alone would have probed at (2600) plus its own confirmation.
        let mut at = overdue;
        while p.liveness() == Liveness::Alive {
            at = p.next_deadline();
            p.poll(at);
            assert!(at < t(now + 2600), "still alive at {at:?}");
        }
        assert_eq!(p.liveness(), Liveness::Dead);
        // Overdue acts once per peer probe: a dead path is not probed faster because of it.
        p.on_peer_probe(at + t(5));
        assert!(
            p.next_deadline() <= at + t(5),
            "a peer reaching us again is probed at once"
        );
    }

    #[test]
    fn without_fast_detection_peer_probes_change_nothing() {
        let mut p = PathProber::new(config(1000, 1000, 3), t(0));
        let now = answer_all(&mut p, 0, 5000, 2);
        let due = p.next_deadline();
        p.on_peer_probe(t(now + 100));
        p.on_peer_probe(t(now + 1100));
        assert_eq!(p.next_deadline(), due);
    }

    #[test]
    fn fast_detection_learns_a_short_timeout_and_confirms_a_loss_at_once() {
        let mut p = PathProber::new(fast(1000, 1000, 3), t(0));
        assert_eq!(
            p.timeout(),
            t(1000),
            "the configured timeout until RTTs are known"
        );
        // Ten answered probes at 4 ms: the timeout falls to the 50 ms floor.
        let now = answer_all(&mut p, 0, 10_000, 4);
        assert_eq!(p.timeout(), ADAPTIVE_TIMEOUT_FLOOR);
        // The path is cut just after the probe at `now`: it is sent and never answered.
        assert!(p.poll(t(now)).send.is_some());
        assert_eq!(p.next_deadline(), t(now + 50), "its expiry comes first");
        let first = p.poll(t(now + 50));
        // Lost, and a confirmation probe goes out at once.
        assert_eq!((first.lost, first.send.is_some()), (1, true));
        // The next confirmation a quarter of the timeout later.
        assert_eq!(
            p.next_deadline(),
            t(now + 50) + Duration::from_micros(12_500)
        );
        let mut dead_at = None;
        for _ in 0..20 {
            let at = p.next_deadline();
            if p.poll(at).liveness_changed == Some(Liveness::Dead) {
                dead_at = Some(at.as_millis() as u64);
                break;
            }
        }
        let dead_at = dead_at.expect("the path never died");
        // First loss at +50, confirmations (twice the timeout each) at +50 and +62.5.
        assert!(
            dead_at - now <= 50 + 13 + 100,
            "dead {} ms after the cut",
            dead_at - now
        );
        // Dead: back to the regular cadence.
        // Dead: back to the regular cadence (no probe for most of an interval).
        for ms in (dead_at + 1..dead_at + 800).step_by(5) {
            assert!(
                p.poll(t(ms)).send.is_none(),
                "probing a dead path fast at {ms}"
            );
        }
    }

    #[test]
    fn a_confirmed_single_loss_returns_to_the_cadence() {
        let mut p = PathProber::new(fast(1000, 1000, 3), t(0));
        let now = answer_all(&mut p, 0, 10_000, 4);
        assert!(p.poll(t(now)).send.is_some()); // lost
        let confirm = p.poll(t(now + 50));
        let seq = confirm.send.expect("a confirmation probe");
        assert!(matches!(
            p.on_reply(t(now + 54), seq, t(0)),
            ReplyOutcome::Accepted { .. }
        ));
        assert_eq!(p.liveness(), Liveness::Alive);
        assert_eq!(
            p.next_deadline(),
            t(now + 50 + 1000),
            "cadence from the last probe"
        );
    }

    #[test]
    fn a_sudden_rtt_jump_is_learnt_not_taken_for_a_dead_path() {
        let mut p = PathProber::new(fast(1000, 1000, 3), t(0));
        let now = answer_all(&mut p, 0, 10_000, 4);
        // From now on the path answers after 70 ms, above the learnt 50 ms timeout.
        let first = p.poll(t(now)).send.expect("a probe");
        let lost = p.poll(t(now + 50));
        assert_eq!(lost.lost, 1);
        let confirm = lost.send.expect("a confirmation probe");
        // The first reply comes late and is learnt from.
        assert_eq!(p.on_reply(t(now + 70), first, t(0)), ReplyOutcome::Late);
        assert!(
            p.timeout() > t(70),
            "the timeout did not learn: {:?}",
            p.timeout()
        );
        // The confirmation, given twice the timeout, is answered: alive, never dead.
        let outcome = p.on_reply(t(now + 120), confirm, t(0));
        assert!(
            matches!(outcome, ReplyOutcome::Accepted { .. }),
            "{outcome:?}"
        );
        assert_eq!(p.liveness(), Liveness::Alive);
        assert_eq!(p.consecutive_losses(), 0);
    }

    #[test]
    fn without_fast_detection_the_configured_timeout_stays() {
        let mut p = PathProber::new(config(1000, 1000, 3), t(0));
        answer_all(&mut p, 0, 10_000, 4);
        assert_eq!(p.timeout(), t(1000));
    }

    #[test]
    fn zero_settings_do_not_spin_or_panic() {
        let zero = ProberConfig {
            interval: Duration::ZERO,
            timeout: Duration::ZERO,
            down_after_losses: 0,
            loss_window: 0,
            rtt_window: 0,
            fast_detection: true,
        };
        let mut p = PathProber::new(zero, t(0));
        assert_eq!(p.poll(t(0)).send, Some(1));
        // The interval is at least 1 ms, and a zero timeout expires at the next poll.
        assert_eq!(p.next_deadline(), t(0));
        let out = p.poll(t(0));
        assert_eq!((out.send, out.lost), (None, 1));
        assert_eq!(out.liveness_changed, Some(Liveness::Dead));
        assert_eq!(p.next_deadline(), t(1));
    }

    #[test]
    fn a_reply_older_than_the_memory_is_late() {
        let mut p = PathProber::new(config(10, 5, 3), t(0));
        for i in 0..1100u64 {
            let now = t(i * 10);
            if let Some(seq) = p.poll(now).send {
                assert!(matches!(
                    p.on_reply(now, seq, t(0)),
                    ReplyOutcome::Accepted { .. }
                ));
            }
        }
        assert_eq!(p.stats().received, 1100);
        assert_eq!(p.on_reply(t(11_000), 1090, t(0)), ReplyOutcome::Duplicate);
        // Answered too, but 1098 sequences ago: no longer remembered.
        assert_eq!(p.on_reply(t(11_000), 3, t(0)), ReplyOutcome::Late);
    }

    /// The reference model: the same rules written as plainly as possible, with unbounded
    /// sets instead of bitmaps and a list of every resolved outcome.
    #[derive(Debug)]
    struct Model {
        config: ProberConfig,
        now: Duration,
        next_send: Duration,
        next_seq: u64,
        outstanding: Vec<(u64, Duration)>,
        lost: HashSet<u64>,
        answered: HashSet<u64>,
        /// Every resolved probe in order, `true` = lost.
        outcomes: Vec<bool>,
        /// Where the loss window's history starts: losses before the first reply ever do
        /// not count (the tunnel was being set up).
        window_start: usize,
        replied: bool,
        sent: u64,
    }

    impl Model {
        fn new(config: ProberConfig, now: Duration) -> Self {
            Self {
                config,
                now,
                next_send: now,
                next_seq: 1,
                outstanding: Vec::new(),
                lost: HashSet::new(),
                answered: HashSet::new(),
                outcomes: Vec::new(),
                window_start: 0,
                replied: false,
                sent: 0,
            }
        }

        fn down_after(&self) -> usize {
            usize::from(self.config.down_after_losses.max(1))
        }

        fn liveness(&self) -> Liveness {
            let n = self.down_after();
            let tail_lost = self.outcomes.len() >= n
                && self.outcomes[self.outcomes.len() - n..].iter().all(|&l| l);
            if tail_lost {
                Liveness::Dead
            } else if self.replied {
                Liveness::Alive
            } else {
                Liveness::Unknown
            }
        }

        fn lose_first(&mut self) {
            let (seq, _) = self.outstanding.remove(0);
            self.lost.insert(seq);
            self.outcomes.push(true);
        }

        fn poll(&mut self, now: Duration) -> Poll {
            self.now = self.now.max(now);
            let before = self.liveness();
            let mut lost = 0;
            while let Some(&(_, at)) = self.outstanding.first() {
                if at + self.config.timeout > self.now {
                    break;
                }
                self.lose_first();
                lost += 1;
            }
            let mut send = None;
            if self.now >= self.next_send {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.sent += 1;
                self.outstanding.push((seq, self.now));
                if self.outstanding.len() > MAX_OUTSTANDING {
                    self.lose_first();
                    lost += 1;
                }
                send = Some(seq);
                let next = self.next_send + self.config.interval;
                self.next_send = if next > self.now {
                    next
                } else {
                    self.now + self.config.interval
                };
            }
            let after = self.liveness();
            Poll {
                send,
                lost,
                liveness_changed: (after != before).then_some(after),
            }
        }

        fn reply(&mut self, now: Duration, seq: u64, hold: Duration) -> ReplyOutcome {
            self.now = self.now.max(now);
            if let Some(i) = self.outstanding.iter().position(|&(s, _)| s == seq) {
                let before = self.liveness();
                let (_, at) = self.outstanding.remove(i);
                if self.answered.is_empty() {
                    self.window_start = self.outcomes.len();
                }
                self.answered.insert(seq);
                self.outcomes.push(false);
                self.replied = true;
                let after = self.liveness();
                ReplyOutcome::Accepted {
                    rtt: self.now.saturating_sub(at).saturating_sub(hold),
                    liveness_changed: (after != before).then_some(after),
                }
            } else if self.lost.contains(&seq) {
                ReplyOutcome::Late
            } else if self.answered.contains(&seq) {
                ReplyOutcome::Duplicate
            } else {
                ReplyOutcome::Unknown
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Advance by this many ms, then poll.
        Advance(u64),
        /// Poll at the prober's own next deadline (what the I/O loop does).
        PollAtDeadline,
        /// Advance by `delay` ms, then deliver a reply to the `k`-th sequence counting from
        /// 0 (which is never sent) to a few beyond the last one sent, with `hold` ms hold.
        Reply { k: u64, delay: u64, hold: u64 },
        /// Poll or reply with a time this far in the past.
        Backwards { by: u64, reply: bool },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u64..3000).prop_map(Op::Advance),
            4 => Just(Op::PollAtDeadline),
            5 => (any::<u64>(), 0u64..800, 0u64..50)
                .prop_map(|(k, delay, hold)| Op::Reply { k, delay, hold }),
            1 => (0u64..10_000, any::<bool>()).prop_map(|(by, reply)| Op::Backwards { by, reply }),
        ]
    }

    fn any_config() -> impl Strategy<Value = ProberConfig> {
        (10u64..2000, 1u64..5000, 1u8..6, 1u16..50, 1u16..20).prop_map(
            |(interval, timeout, down, loss_window, rtt_window)| ProberConfig {
                interval: t(interval),
                timeout: t(timeout),
                down_after_losses: down,
                loss_window,
                rtt_window,
                // The reference model is the plain schedule; fast detection has its own
                // table tests and the any-input test below.
                fast_detection: false,
            },
        )
    }

    fn check_invariants(p: &PathProber) -> Result<(), TestCaseError> {
        let s = p.stats();
        prop_assert_eq!(s.received + s.lost + p.outstanding() as u64, s.sent);
        prop_assert!((0.0..=100.0).contains(&s.loss_pct));
        prop_assert!(s.latency_ms >= 0.0 && s.latency_ms.is_finite());
        prop_assert!(s.jitter_ms >= 0.0 && s.jitter_ms.is_finite());
        prop_assert!(p.outstanding() <= MAX_OUTSTANDING);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Against the reference model: every poll and reply gives the model's answer, the
        /// counters and liveness agree, and the invariants hold after every step.
        #[test]
        fn matches_the_reference_model(
            config in any_config(),
            start in 0u64..1_000_000,
            ops in proptest::collection::vec(op(), 1..150),
        ) {
            let mut p = PathProber::new(config, t(start));
            let mut m = Model::new(config, t(start));
            let mut now = t(start);
            let mut last_seq = 0;
            for op in ops {
                match op {
                    Op::Advance(d) => {
                        now += t(d);
                        let got = p.poll(now);
                        prop_assert_eq!(got, m.poll(now), "poll at {:?}", now);
                        if let Some(seq) = got.send {
                            prop_assert!(seq > last_seq);
                            last_seq = seq;
                        }
                        prop_assert!(p.next_deadline() > now);
                    }
                    Op::PollAtDeadline => {
                        now = now.max(p.next_deadline());
                        let got = p.poll(now);
                        prop_assert_eq!(got, m.poll(now), "poll at {:?}", now);
                        if let Some(seq) = got.send {
                            prop_assert!(seq > last_seq);
                            last_seq = seq;
                        }
                        prop_assert!(p.next_deadline() > now);
                    }
                    Op::Reply { k, delay, hold } => {
                        now += t(delay);
                        let seq = k % (m.next_seq + 3);
                        prop_assert_eq!(
                            p.on_reply(now, seq, t(hold)),
                            m.reply(now, seq, t(hold)),
                            "reply {} at {:?}", seq, now
                        );
                    }
                    Op::Backwards { by, reply } => {
                        let then = now.saturating_sub(t(by));
                        if reply {
                            let seq = m.next_seq.saturating_sub(1);
                            prop_assert_eq!(
                                p.on_reply(then, seq, t(0)),
                                m.reply(then, seq, t(0))
                            );
                        } else {
                            let got = p.poll(then);
                            prop_assert_eq!(got, m.poll(then));
                            if let Some(seq) = got.send {
                                prop_assert!(seq > last_seq);
                                last_seq = seq;
                            }
                        }
                    }
                }
                check_invariants(&p)?;
                let s = p.stats();
                prop_assert_eq!(s.sent, m.sent);
                prop_assert_eq!(s.lost as usize, m.lost.len());
                prop_assert_eq!(s.received as usize, m.answered.len());
                prop_assert_eq!(p.outstanding(), m.outstanding.len());
                prop_assert_eq!(p.liveness(), m.liveness());
                let window = usize::from(config.loss_window);
                let counted = &m.outcomes[m.window_start..];
                let tail = &counted[counted.len().saturating_sub(window)..];
                let pct = if tail.is_empty() {
                    0.0
                } else {
                    100.0 * tail.iter().filter(|&&l| l).count() as f64 / tail.len() as f64
                };
                prop_assert!((s.loss_pct - pct).abs() < 1e-9, "{} vs {}", s.loss_pct, pct);
                let trailing = m.outcomes.iter().rev().take_while(|&&l| l).count();
                prop_assert_eq!(p.consecutive_losses() as usize, trailing);
            }
        }

        /// Nothing panics and the bookkeeping holds for any times, holds, sequences and
        /// configurations, including `Duration::MAX`, zero settings and clocks jumping back.
        #[test]
        fn survives_any_input(
            ops in proptest::collection::vec(
                (0u8..4, any::<u64>(), any::<u64>(), any::<u64>(), any::<u16>()),
                1..120,
            ),
        ) {
            let mut p = PathProber::new(ProberConfig::default(), Duration::ZERO);
            let mut last_seq = 0;
            let huge = |v: u64| Duration::new(v, (v % 1_000_000_000) as u32);
            for (kind, a, b, c, small) in ops {
                match kind {
                    0 => {
                        if let Some(seq) = p.poll(huge(a)).send {
                            prop_assert!(seq > last_seq);
                            last_seq = seq;
                        }
                    }
                    1 => {
                        let _ = p.on_reply(huge(a), b, huge(c));
                    }
                    2 => {
                        let _ = p.poll(Duration::from_nanos(a));
                        let _ = p.on_reply(Duration::from_nanos(b), u64::from(small), Duration::ZERO);
                    }
                    _ => {
                        let cfg = ProberConfig {
                            interval: huge(a % 4),
                            timeout: huge(b),
                            down_after_losses: (small % 256) as u8,
                            loss_window: small,
                            rtt_window: small.rotate_left(3),
                            fast_detection: small % 2 == 0,
                        };
                        p.set_config(cfg, huge(c));
                    }
                }
                let _ = p.next_deadline();
                check_invariants(&p)?;
            }
        }
    }
}
