//! Estimators over probe results (pure): jitter, loss over a window, RTT over a window, and
//! a bounded history.
//!
//! All are fixed-size once created, so a path that is probed for months holds no more memory
//! than one probed for a minute, and every operation is O(window) at worst.

use std::collections::VecDeque;
use std::time::Duration;

/// Milliseconds of a duration as f64 (exact enough: f64 holds every nanosecond up to
/// 104 days exactly, and is finite for any `Duration`).
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// RFC 3550 §6.4.1 interarrival jitter, applied to successive round-trip times:
/// `J += (|D| - J) / 16`, `D` the difference between two consecutive RTTs.
///
/// RFC 3550 measures one-way transit differences; RTT differences are what a prober without
/// synchronised clocks has, and they capture the same thing (queueing variation) for both
/// directions at once. The gain of 1/16 is the RFC's: it smooths single outliers while still
/// following a lasting change within a few dozen samples.
///
/// The value is kept and returned in milliseconds as `f64` (what `PathMetrics::jitter_ms`
/// carries), not as a `Duration`, so the estimate is not rounded to whole nanoseconds at
/// every step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Jitter {
    jitter_ms: f64,
    last_rtt_ms: Option<f64>,
}

impl Jitter {
    pub fn new() -> Self {
        Self::default()
    }

    /// One more RTT sample. The first sample only sets the reference.
    pub fn observe(&mut self, rtt: Duration) {
        let rtt_ms = ms(rtt);
        if let Some(last) = self.last_rtt_ms {
            let d = (rtt_ms - last).abs();
            self.jitter_ms += (d - self.jitter_ms) / 16.0;
        }
        self.last_rtt_ms = Some(rtt_ms);
    }

    /// The current estimate, milliseconds (0 before two samples).
    pub fn value(&self) -> f64 {
        self.jitter_ms
    }

    /// Forget everything (as new).
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

/// Outcomes (received or lost) of the last `capacity` resolved probes, oldest evicted first.
///
/// Only resolved probes count: a probe still waiting for its reply is neither, so loss is not
/// overstated while replies are in flight.
#[derive(Debug, Clone, PartialEq)]
pub struct LossWindow {
    /// `true` = lost.
    outcomes: VecDeque<bool>,
    capacity: usize,
    lost: usize,
}

impl LossWindow {
    /// A window of `capacity` outcomes; 0 counts as 1, so loss can never be hidden by a
    /// window that remembers nothing.
    pub fn new(capacity: u16) -> Self {
        let capacity = usize::from(capacity.max(1));
        Self {
            outcomes: VecDeque::with_capacity(capacity),
            capacity,
            lost: 0,
        }
    }

    pub fn record(&mut self, lost: bool) {
        if self.outcomes.len() >= self.capacity {
            self.evict_oldest();
        }
        self.outcomes.push_back(lost);
        if lost {
            self.lost += 1;
        }
    }

    fn evict_oldest(&mut self) {
        if let Some(true) = self.outcomes.pop_front() {
            self.lost = self.lost.saturating_sub(1);
        }
    }

    /// Lost share of the window in percent, 0..=100; 0 when nothing was resolved yet.
    pub fn loss_pct(&self) -> f64 {
        if self.outcomes.is_empty() {
            return 0.0;
        }
        (100.0 * self.lost as f64 / self.outcomes.len() as f64).clamp(0.0, 100.0)
    }

    /// Outcomes in the window.
    pub fn len(&self) -> usize {
        self.outcomes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.outcomes.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// (resolved, lost) in the window: the raw counts behind [`Self::loss_pct`].
    pub fn sent_lost(&self) -> (u32, u32) {
        let n = u32::try_from(self.outcomes.len()).unwrap_or(u32::MAX);
        let lost = u32::try_from(self.lost).unwrap_or(u32::MAX);
        (n, lost)
    }

    /// A new capacity (0 counts as 1), keeping the newest outcomes that fit.
    pub fn resize(&mut self, capacity: u16) {
        self.capacity = usize::from(capacity.max(1));
        while self.outcomes.len() > self.capacity {
            self.evict_oldest();
        }
    }

    pub fn clear(&mut self) {
        self.outcomes.clear();
        self.lost = 0;
    }
}

/// The last `capacity` RTT samples: their mean (what a path's latency is reported as), the
/// minimum (the path's base delay without queueing) and the last one.
#[derive(Debug, Clone, PartialEq)]
pub struct RttWindow {
    samples: VecDeque<Duration>,
    capacity: usize,
    /// Sum of the samples in nanoseconds: u128 holds 65 535 × `Duration::MAX` without
    /// overflow, so the mean is exact and O(1).
    sum_nanos: u128,
}

impl RttWindow {
    /// A window of `capacity` samples; 0 counts as 1.
    pub fn new(capacity: u16) -> Self {
        let capacity = usize::from(capacity.max(1));
        Self {
            samples: VecDeque::with_capacity(capacity),
            capacity,
            sum_nanos: 0,
        }
    }

    pub fn push(&mut self, rtt: Duration) {
        if self.samples.len() >= self.capacity {
            self.evict_oldest();
        }
        self.samples.push_back(rtt);
        self.sum_nanos = self.sum_nanos.saturating_add(rtt.as_nanos());
    }

    fn evict_oldest(&mut self) {
        if let Some(old) = self.samples.pop_front() {
            self.sum_nanos = self.sum_nanos.saturating_sub(old.as_nanos());
        }
    }

    /// Mean of the window; `None` when empty.
    pub fn mean(&self) -> Option<Duration> {
        let n = u128::try_from(self.samples.len()).ok().filter(|&n| n > 0)?;
        let mean = self.sum_nanos / n;
        let secs = u64::try_from(mean / 1_000_000_000).unwrap_or(u64::MAX);
        let nanos = u32::try_from(mean % 1_000_000_000).unwrap_or(0);
        Some(Duration::new(secs, nanos))
    }

    /// Smallest sample in the window; `None` when empty.
    pub fn min(&self) -> Option<Duration> {
        self.samples.iter().copied().min()
    }

    /// Newest sample; `None` when empty.
    pub fn last(&self) -> Option<Duration> {
        self.samples.back().copied()
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// A new capacity (0 counts as 1), keeping the newest samples that fit.
    pub fn resize(&mut self, capacity: u16) {
        self.capacity = usize::from(capacity.max(1));
        while self.samples.len() > self.capacity {
            self.evict_oldest();
        }
    }

    pub fn clear(&mut self) {
        self.samples.clear();
        self.sum_nanos = 0;
    }
}

/// The last `capacity` values of anything (per-path metric samples for `status` and reports;
/// the intent's `probe.history_len`, seed: 60), oldest evicted first.
#[derive(Debug, Clone, PartialEq)]
pub struct History<T> {
    items: VecDeque<T>,
    capacity: usize,
}

impl<T> History<T> {
    /// The seed's history length.
    pub const DEFAULT_CAPACITY: usize = 60;

    /// A history of `capacity` items; a capacity of 0 keeps nothing.
    pub fn new(capacity: usize) -> Self {
        Self {
            // Not `with_capacity(capacity)`: a huge configured length must not allocate up
            // front; the deque grows to what is actually pushed.
            items: VecDeque::new(),
            capacity,
        }
    }

    pub fn push(&mut self, item: T) {
        if self.capacity == 0 {
            return;
        }
        while self.items.len() >= self.capacity {
            self.items.pop_front();
        }
        self.items.push_back(item);
    }

    /// Oldest to newest.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &T> + ExactSizeIterator + '_ {
        self.items.iter()
    }

    pub fn last(&self) -> Option<&T> {
        self.items.back()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// A new capacity, keeping the newest items that fit.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        while self.items.len() > capacity {
            self.items.pop_front();
        }
    }
}

impl<T> Default for History<T> {
    fn default() -> Self {
        Self::new(Self::DEFAULT_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn millis(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn constant_rtt_has_no_jitter() {
        let mut j = Jitter::new();
        for _ in 0..100 {
            j.observe(millis(30));
        }
        assert_eq!(j.value(), 0.0);
    }

    #[test]
    fn jitter_decays_to_zero_once_rtt_settles() {
        let mut j = Jitter::new();
        for rtt in [10, 50, 10, 50] {
            j.observe(millis(rtt));
        }
        assert!(j.value() > 5.0);
        for _ in 0..300 {
            j.observe(millis(30));
        }
        assert!(j.value() < 0.01, "{}", j.value());
    }

    #[test]
    fn alternating_10_20_ms_converges_to_10_ms() {
        let mut j = Jitter::new();
        for i in 0..400 {
            j.observe(millis(if i % 2 == 0 { 10 } else { 20 }));
        }
        assert!((j.value() - 10.0).abs() < 0.01, "{}", j.value());
    }

    #[test]
    fn jitter_follows_the_rfc_recurrence_exactly() {
        // RTTs 10, 14, 12 ms: D = 4 then 2. J1 = 4/16 = 0.25; J2 = 0.25 + (2 - 0.25)/16.
        let mut j = Jitter::new();
        j.observe(millis(10));
        assert_eq!(j.value(), 0.0);
        j.observe(millis(14));
        assert!((j.value() - 0.25).abs() < 1e-12);
        j.observe(millis(12));
        assert!((j.value() - (0.25 + 1.75 / 16.0)).abs() < 1e-12);
        j.reset();
        assert_eq!(j, Jitter::new());
        j.observe(millis(100));
        assert_eq!(j.value(), 0.0);
    }

    #[test]
    fn jitter_survives_extreme_samples() {
        let mut j = Jitter::new();
        j.observe(Duration::ZERO);
        j.observe(Duration::MAX);
        j.observe(Duration::ZERO);
        assert!(j.value().is_finite() && j.value() > 0.0);
    }

    #[test]
    fn a_known_loss_pattern_gives_the_exact_percentage() {
        let mut w = LossWindow::new(10);
        assert_eq!(w.loss_pct(), 0.0);
        assert!(w.is_empty());
        // 3 of 8 lost.
        for lost in [false, true, false, false, true, false, true, false] {
            w.record(lost);
        }
        assert_eq!(w.sent_lost(), (8, 3));
        assert_eq!(w.loss_pct(), 37.5);
        // Two more received fill the window: 3 of 10.
        w.record(false);
        w.record(false);
        assert_eq!(w.len(), 10);
        assert_eq!(w.loss_pct(), 30.0);
        // The next evicts the oldest (received): one more lost makes 4 of 10.
        w.record(true);
        assert_eq!(w.sent_lost(), (10, 4));
        // The next evicts a lost one and adds a received one: 3 of 10.
        w.record(false);
        assert_eq!(w.sent_lost(), (10, 3));
    }

    #[test]
    fn loss_window_resize_keeps_the_newest() {
        let mut w = LossWindow::new(0);
        assert_eq!(w.capacity(), 1);
        w.record(true);
        w.record(false);
        assert_eq!(w.sent_lost(), (1, 0));
        let mut w = LossWindow::new(100);
        for i in 0..100 {
            w.record(i < 50);
        }
        assert_eq!(w.loss_pct(), 50.0);
        w.resize(10);
        assert_eq!(w.sent_lost(), (10, 0));
        w.clear();
        assert_eq!(w.sent_lost(), (0, 0));
    }

    #[test]
    fn rtt_window_mean_min_last_and_eviction() {
        let mut w = RttWindow::new(3);
        assert_eq!((w.mean(), w.min(), w.last()), (None, None, None));
        w.push(millis(10));
        w.push(millis(40));
        w.push(millis(20));
        assert_eq!(w.mean(), Some(Duration::from_nanos(23_333_333)));
        assert_eq!(w.min(), Some(millis(10)));
        assert_eq!(w.last(), Some(millis(20)));
        // 10 is evicted.
        w.push(millis(30));
        assert_eq!(w.len(), 3);
        assert_eq!(w.mean(), Some(millis(30)));
        assert_eq!(w.min(), Some(millis(20)));
        w.resize(1);
        assert_eq!(w.mean(), Some(millis(30)));
        w.clear();
        assert!(w.is_empty() && w.mean().is_none());
    }

    #[test]
    fn rtt_window_handles_the_largest_durations() {
        let mut w = RttWindow::new(u16::MAX);
        for _ in 0..1000 {
            w.push(Duration::MAX);
        }
        assert_eq!(w.mean(), Some(Duration::MAX));
    }

    #[test]
    fn history_keeps_the_last_n_oldest_first() {
        let mut h = History::new(3);
        for i in 0..5 {
            h.push(i);
        }
        assert_eq!(h.iter().copied().collect::<Vec<_>>(), vec![2, 3, 4]);
        assert_eq!(h.last(), Some(&4));
        assert_eq!(h.len(), 3);
        h.set_capacity(2);
        assert_eq!(h.iter().copied().collect::<Vec<_>>(), vec![3, 4]);
        let mut none = History::new(0);
        none.push(1);
        assert!(none.is_empty());
        assert_eq!(History::<u8>::default().capacity(), 60);
    }

    proptest! {
        /// Against a plain recount of the last `capacity` outcomes.
        #[test]
        fn loss_window_matches_a_recount(
            capacity in 0u16..20,
            outcomes in proptest::collection::vec(any::<bool>(), 0..80),
        ) {
            let mut w = LossWindow::new(capacity);
            for (i, &lost) in outcomes.iter().enumerate() {
                w.record(lost);
                let cap = usize::from(capacity.max(1));
                let start = (i + 1).saturating_sub(cap);
                let tail = &outcomes[start..=i];
                let lost_n = tail.iter().filter(|&&l| l).count();
                prop_assert_eq!(w.sent_lost(), (tail.len() as u32, lost_n as u32));
                let pct = 100.0 * lost_n as f64 / tail.len() as f64;
                prop_assert!((w.loss_pct() - pct).abs() < 1e-9);
            }
        }

        /// Against a recount; jitter stays finite and non-negative.
        #[test]
        fn rtt_window_matches_a_recount(
            capacity in 1u16..10,
            rtts in proptest::collection::vec(0u64..10_000_000_000, 1..50),
        ) {
            let mut w = RttWindow::new(capacity);
            let mut j = Jitter::new();
            for (i, &rtt) in rtts.iter().enumerate() {
                w.push(Duration::from_nanos(rtt));
                j.observe(Duration::from_nanos(rtt));
                prop_assert!(j.value() >= 0.0 && j.value().is_finite());
                let start = (i + 1).saturating_sub(usize::from(capacity));
                let tail = &rtts[start..=i];
                let sum: u128 = tail.iter().map(|&r| u128::from(r)).sum();
                let mean = (sum / tail.len() as u128) as u64;
                prop_assert_eq!(w.mean(), Some(Duration::from_nanos(mean)));
                prop_assert_eq!(w.min(), tail.iter().min().map(|&m| Duration::from_nanos(m)));
                prop_assert_eq!(w.last(), Some(Duration::from_nanos(rtt)));
            }
        }
    }
}
