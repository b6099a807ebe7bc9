//! Path scores from measurements (pure).
//!
//! Two scores, both "higher is better" in 0..=100:
//!
//! - [`seed_score`] is the seed design's formula over latency, jitter and loss. It is kept
//!   as the fallback when a weighting gives no factor any weight, and because operators
//!   already know its numbers.
//! - [`weighted_score`] is the multi-factor score a routing policy chooses paths by: every
//!   factor is first mapped onto 0..=100 (so weights mean what they say regardless of units),
//!   then averaged with the policy's [`ScoringWeights`].
//!
//! Both are monotonic: a path that is worse in one factor and equal in the others never
//! scores higher, so ranking by score never prefers the worse of two otherwise equal paths.
//! Both are total: NaN or infinite inputs give a score in range instead of a panic or a NaN
//! that would poison a sort. A NaN measurement counts as the worst value of its factor (a
//! path whose numbers make no sense must not win); negative values count as the best.

use patronus_proto::policy::{PathPreference, ScoringWeights};

use super::prober::ProbeStats;

/// Latency at and beyond which the latency factor is 0: 300 ms round trip is ITU-T G.114's
/// 150 ms one-way limit for interactive voice, past which a path is no better than "bad".
pub const LATENCY_ZERO_MS: f64 = 300.0;
/// Jitter at and beyond which the jitter factor is 0 (a jitter buffer this deep is already
/// audible).
pub const JITTER_ZERO_MS: f64 = 50.0;
/// Points of the loss factor lost per percent of loss: TCP throughput collapses long before
/// 10 % loss, so 10 % already scores 0.
pub const LOSS_POINTS_PER_PCT: f64 = 10.0;
/// The bandwidth factor of a path whose bandwidth nobody knows: the middle, so an unknown
/// link is neither chosen over a known fast one nor dropped for a known slow one.
pub const UNKNOWN_BANDWIDTH_FACTOR: f64 = 50.0;

/// `value` limited to `lo..=hi`, with NaN mapped to `nan_as`.
fn clamp_or(value: f64, lo: f64, hi: f64, nan_as: f64) -> f64 {
    if value.is_nan() {
        nan_as
    } else {
        value.clamp(lo, hi)
    }
}

/// The seed design's score: `((200 - min(lat, 200)) / 2 + (50 - min(jit, 50)) / 0.5 +
/// (100 - loss)) / 3`, each term worth at most 100, rounded and clamped to 0..=100.
pub fn seed_score(latency_ms: f64, jitter_ms: f64, loss_pct: f64) -> u8 {
    let latency = clamp_or(latency_ms, 0.0, 200.0, 200.0);
    let jitter = clamp_or(jitter_ms, 0.0, 50.0, 50.0);
    let loss = clamp_or(loss_pct, 0.0, 100.0, 100.0);
    let score = ((200.0 - latency) / 2.0 + (50.0 - jitter) / 0.5 + (100.0 - loss)) / 3.0;
    // Every term is in 0..=100, so the clamp only guards against rounding.
    score.round().clamp(0.0, 100.0) as u8
}

/// What [`weighted_score`] scores one path on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreInputs {
    /// Round-trip time, milliseconds.
    pub latency_ms: f64,
    pub jitter_ms: f64,
    /// 0..=100.
    pub loss_pct: f64,
    /// The path's bandwidth (the intent's uplink bandwidth until it is measured); `None`
    /// when unknown.
    pub bandwidth_mbps: Option<f64>,
    /// Price of a gigabyte over this path, in the tenant's currency units (0 = unmetered).
    pub cost_per_gb: f64,
}

/// Latency factor: linear from 100 at 0 ms to 0 at [`LATENCY_ZERO_MS`]. Linear rather than a
/// curve so the weights keep their plain meaning ("half the score is latency") and operators
/// can compute a score by hand.
pub fn latency_factor(latency_ms: f64) -> f64 {
    let l = clamp_or(latency_ms, 0.0, LATENCY_ZERO_MS, LATENCY_ZERO_MS);
    100.0 * (1.0 - l / LATENCY_ZERO_MS)
}

/// Jitter factor: linear from 100 at 0 ms to 0 at [`JITTER_ZERO_MS`].
pub fn jitter_factor(jitter_ms: f64) -> f64 {
    let j = clamp_or(jitter_ms, 0.0, JITTER_ZERO_MS, JITTER_ZERO_MS);
    100.0 * (1.0 - j / JITTER_ZERO_MS)
}

/// Loss factor: `100 - 10 × loss %`, so 10 % loss scores 0.
pub fn loss_factor(loss_pct: f64) -> f64 {
    let l = clamp_or(loss_pct, 0.0, 100.0, 100.0);
    (100.0 - LOSS_POINTS_PER_PCT * l).clamp(0.0, 100.0)
}

/// Bandwidth factor on a log scale: 1 Mbit/s (or less) scores 0, 10 Mbit/s 25, 100 Mbit/s
/// 50, 1 Gbit/s 75, 10 Gbit/s (or more) 100. Logarithmic because doubling a 10 Mbit/s DSL
/// line matters as much as doubling a 1 Gbit/s fibre. Unknown scores
/// [`UNKNOWN_BANDWIDTH_FACTOR`]; NaN scores 0.
pub fn bandwidth_factor(bandwidth_mbps: Option<f64>) -> f64 {
    match bandwidth_mbps {
        None => UNKNOWN_BANDWIDTH_FACTOR,
        Some(b) if b.is_nan() => 0.0,
        // log10 of 0 or a negative is -inf or NaN: anything at or below 1 Mbit/s is 0.
        Some(b) if b <= 1.0 => 0.0,
        Some(b) => (25.0 * b.log10()).clamp(0.0, 100.0),
    }
}

/// Cost factor: `100 / (1 + cost per GB)`: free scores 100, 1 unit per GB 50, 9 units 10.
/// Never quite 0, so among expensive paths the cheaper still ranks first.
pub fn cost_factor(cost_per_gb: f64) -> f64 {
    let c = clamp_or(cost_per_gb, 0.0, f64::INFINITY, f64::INFINITY);
    (100.0 / (1.0 + c)).clamp(0.0, 100.0)
}

/// A weight usable in a mean: NaN, infinite and negative weights count as 0 (they fail
/// intent validation anyway; here they must not break the bounds).
fn sane_weight(w: f64) -> f64 {
    if w.is_finite() && w > 0.0 {
        w
    } else {
        0.0
    }
}

/// The weighted mean of the five factors, in 0..=100. Weights are relative (divided by
/// their sum); if none is positive the score is the [`seed_score`].
pub fn weighted_score(inputs: &ScoreInputs, weights: &ScoringWeights) -> f64 {
    let raw = [
        weights.latency,
        weights.jitter,
        weights.loss,
        weights.bandwidth,
        weights.cost,
    ]
    .map(sane_weight);
    let max = raw.iter().copied().fold(0.0_f64, f64::max);
    if max <= 0.0 {
        return f64::from(seed_score(
            inputs.latency_ms,
            inputs.jitter_ms,
            inputs.loss_pct,
        ));
    }
    // Scaled into 0..=1 first so that even absurd (but finite) weights cannot overflow the
    // sum; the ratios, which are all that matter, stay the same.
    let w = raw.map(|w| w / max);
    let factors = [
        latency_factor(inputs.latency_ms),
        jitter_factor(inputs.jitter_ms),
        loss_factor(inputs.loss_pct),
        bandwidth_factor(inputs.bandwidth_mbps),
        cost_factor(inputs.cost_per_gb),
    ];
    let total: f64 = w.iter().sum();
    let sum: f64 = w.iter().zip(factors).map(|(w, f)| w * f).sum();
    let score = sum / total;
    if score.is_nan() {
        0.0
    } else {
        score.clamp(0.0, 100.0)
    }
}

/// The weights a path preference ranks by. The single-metric preferences use the latency
/// profile: it is the one where that metric dominates, and a path that is only better in
/// jitter but far worse in latency should not win either.
pub fn profile_for(preference: &PathPreference) -> ScoringWeights {
    match preference {
        PathPreference::LowestLatency
        | PathPreference::LowestJitter
        | PathPreference::LowestLoss
        | PathPreference::PreferUplink { .. } => ScoringWeights::LATENCY_SENSITIVE,
        PathPreference::HighestBandwidth => ScoringWeights::THROUGHPUT_FOCUSED,
        PathPreference::LowestCost => ScoringWeights::COST_OPTIMIZED,
        PathPreference::Weighted { weights } => *weights,
    }
}

/// The score [`super::health::PathHealth`] judges a path by: the latency-sensitive weighted
/// score of what the probes measured, without bandwidth or cost. Health is about whether a
/// path carries packets well, not about its price; the latency profile lets loss and jitter
/// count (the seed score still gives 96 to a path losing 10 % of its packets).
pub fn health_score(stats: &ProbeStats) -> u8 {
    let inputs = ScoreInputs {
        latency_ms: stats.latency_ms,
        jitter_ms: stats.jitter_ms,
        loss_pct: stats.loss_pct,
        bandwidth_mbps: None,
        cost_per_gb: 0.0,
    };
    weighted_score(&inputs, &ScoringWeights::LATENCY_SENSITIVE)
        .round()
        .clamp(0.0, 100.0) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PROFILES: [ScoringWeights; 3] = [
        ScoringWeights::LATENCY_SENSITIVE,
        ScoringWeights::THROUGHPUT_FOCUSED,
        ScoringWeights::COST_OPTIMIZED,
    ];

    fn inputs(lat: f64, jit: f64, loss: f64, bw: Option<f64>, cost: f64) -> ScoreInputs {
        ScoreInputs {
            latency_ms: lat,
            jitter_ms: jit,
            loss_pct: loss,
            bandwidth_mbps: bw,
            cost_per_gb: cost,
        }
    }

    #[test]
    fn the_seed_case_scores_above_80() {
        let s = weighted_score(
            &inputs(25.0, 5.0, 0.1, Some(1000.0), 0.0),
            &ScoringWeights::LATENCY_SENSITIVE,
        );
        assert!(s > 80.0, "{s}");
        // And the seed formula agrees that this is a good path.
        assert!(seed_score(25.0, 5.0, 0.1) > 80);
    }

    #[test]
    fn seed_score_matches_the_formula() {
        assert_eq!(seed_score(0.0, 0.0, 0.0), 100);
        assert_eq!(seed_score(200.0, 50.0, 100.0), 0);
        // (180/2 + 40/0.5 + 99) / 3 = (90 + 80 + 99) / 3 = 89.67
        assert_eq!(seed_score(20.0, 10.0, 1.0), 90);
        assert_eq!(seed_score(f64::NAN, f64::NAN, f64::NAN), 0);
        assert_eq!(seed_score(-5.0, -1.0, -3.0), 100);
        assert_eq!(seed_score(f64::INFINITY, 0.0, 0.0), 67);
    }

    #[test]
    fn factors_hit_their_anchor_points() {
        assert_eq!(latency_factor(0.0), 100.0);
        assert_eq!(latency_factor(150.0), 50.0);
        assert_eq!(latency_factor(300.0), 0.0);
        assert_eq!(latency_factor(1e9), 0.0);
        assert_eq!(jitter_factor(25.0), 50.0);
        assert_eq!(jitter_factor(50.0), 0.0);
        assert_eq!(loss_factor(0.0), 100.0);
        assert_eq!(loss_factor(5.0), 50.0);
        assert_eq!(loss_factor(10.0), 0.0);
        assert_eq!(loss_factor(50.0), 0.0);
        assert_eq!(bandwidth_factor(Some(1.0)), 0.0);
        assert!((bandwidth_factor(Some(100.0)) - 50.0).abs() < 1e-9);
        assert!((bandwidth_factor(Some(10_000.0)) - 100.0).abs() < 1e-9);
        assert_eq!(bandwidth_factor(Some(1e12)), 100.0);
        assert_eq!(bandwidth_factor(None), 50.0);
        assert_eq!(cost_factor(0.0), 100.0);
        assert_eq!(cost_factor(1.0), 50.0);
        assert_eq!(cost_factor(f64::INFINITY), 0.0);
    }

    #[test]
    fn zero_weights_fall_back_to_the_seed_score() {
        let zero = ScoringWeights {
            latency: 0.0,
            jitter: 0.0,
            loss: 0.0,
            bandwidth: 0.0,
            cost: 0.0,
        };
        let i = inputs(20.0, 10.0, 1.0, Some(10.0), 3.0);
        assert_eq!(weighted_score(&i, &zero), 90.0);
        let garbage = ScoringWeights {
            latency: f64::NAN,
            jitter: -1.0,
            loss: f64::NEG_INFINITY,
            bandwidth: f64::INFINITY,
            cost: 0.0,
        };
        assert_eq!(weighted_score(&i, &garbage), 90.0);
    }

    #[test]
    fn weights_are_relative() {
        let i = inputs(30.0, 5.0, 0.5, Some(500.0), 0.2);
        let w = ScoringWeights::COST_OPTIMIZED;
        let doubled = ScoringWeights {
            latency: w.latency * 1e300,
            jitter: w.jitter * 1e300,
            loss: w.loss * 1e300,
            bandwidth: w.bandwidth * 1e300,
            cost: w.cost * 1e300,
        };
        let a = weighted_score(&i, &w);
        let b = weighted_score(&i, &doubled);
        assert!((a - b).abs() < 1e-9, "{a} {b}");
    }

    #[test]
    fn profiles_follow_the_preference() {
        use PathPreference::*;
        let ls = ScoringWeights::LATENCY_SENSITIVE;
        for p in [
            LowestLatency,
            LowestJitter,
            LowestLoss,
            PreferUplink {
                uplink: "wan0".into(),
            },
        ] {
            assert_eq!(profile_for(&p), ls);
        }
        assert_eq!(
            profile_for(&HighestBandwidth),
            ScoringWeights::THROUGHPUT_FOCUSED
        );
        assert_eq!(profile_for(&LowestCost), ScoringWeights::COST_OPTIMIZED);
        let custom = ScoringWeights {
            latency: 0.1,
            jitter: 0.2,
            loss: 0.3,
            bandwidth: 0.4,
            cost: 0.5,
        };
        assert_eq!(profile_for(&Weighted { weights: custom }), custom);
    }

    #[test]
    fn health_score_lets_loss_hurt() {
        let mut stats = ProbeStats {
            latency_ms: 20.0,
            jitter_ms: 2.0,
            loss_pct: 0.0,
            sent: 100,
            lost: 0,
            received: 100,
            last_rtt_ms: Some(20.0),
        };
        let clean = health_score(&stats);
        assert!(clean > 90, "{clean}");
        stats.loss_pct = 10.0;
        assert!(health_score(&stats) <= clean - 20);
    }

    /// Any f64 at all, including NaN, infinities and subnormals.
    fn any_f64() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<f64>(),
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            -1e3..1e6f64,
        ]
    }

    fn any_weights() -> impl Strategy<Value = ScoringWeights> {
        (any_f64(), any_f64(), any_f64(), any_f64(), any_f64()).prop_map(
            |(latency, jitter, loss, bandwidth, cost)| ScoringWeights {
                latency,
                jitter,
                loss,
                bandwidth,
                cost,
            },
        )
    }

    fn valid_weights() -> impl Strategy<Value = ScoringWeights> {
        prop_oneof![
            Just(ScoringWeights::LATENCY_SENSITIVE),
            Just(ScoringWeights::THROUGHPUT_FOCUSED),
            Just(ScoringWeights::COST_OPTIMIZED),
            (
                0.0..=1.0f64,
                0.0..=1.0f64,
                0.0..=1.0f64,
                0.0..=1.0f64,
                0.0..=1.0f64
            )
                .prop_map(|(latency, jitter, loss, bandwidth, cost)| ScoringWeights {
                    latency,
                    jitter,
                    loss,
                    bandwidth,
                    cost,
                }),
        ]
    }

    /// Finite, plausible-and-beyond measurements (negative included).
    fn measurement() -> impl Strategy<Value = f64> {
        prop_oneof![-10.0..1e4f64, 0.0..400.0f64, Just(0.0), Just(f64::INFINITY)]
    }

    proptest! {
        #[test]
        fn scores_stay_in_bounds(
            lat in any_f64(), jit in any_f64(), loss in any_f64(),
            bw in proptest::option::of(any_f64()), cost in any_f64(),
            weights in any_weights(),
        ) {
            let s = seed_score(lat, jit, loss);
            prop_assert!(s <= 100);
            let w = weighted_score(&inputs(lat, jit, loss, bw, cost), &weights);
            prop_assert!((0.0..=100.0).contains(&w), "{w}");
            for p in PROFILES {
                let w = weighted_score(&inputs(lat, jit, loss, bw, cost), &p);
                prop_assert!((0.0..=100.0).contains(&w), "{w}");
            }
        }

        /// Making one factor worse (and keeping the others) never raises the score, for
        /// every profile and any valid weighting.
        #[test]
        fn worse_never_scores_higher(
            lat in measurement(), jit in measurement(), loss in measurement(),
            bw in proptest::option::of(measurement()), cost in measurement(),
            worse in 0.0..1e4f64,
            weights in valid_weights(),
        ) {
            let base = inputs(lat, jit, loss, bw, cost);
            let score = |i: &ScoreInputs| weighted_score(i, &weights);
            let s = score(&base);
            let cases = [
                ScoreInputs { latency_ms: lat + worse, ..base },
                ScoreInputs { jitter_ms: jit + worse, ..base },
                ScoreInputs { loss_pct: loss + worse, ..base },
                ScoreInputs { cost_per_gb: cost + worse, ..base },
                ScoreInputs { bandwidth_mbps: bw.map(|b| b - worse), ..base },
            ];
            for (i, c) in cases.iter().enumerate() {
                let w = score(c);
                prop_assert!(w <= s, "case {i}: {w} > {s}");
            }
            prop_assert!(seed_score(lat + worse, jit, loss) <= seed_score(lat, jit, loss));
            prop_assert!(seed_score(lat, jit + worse, loss) <= seed_score(lat, jit, loss));
            prop_assert!(seed_score(lat, jit, loss + worse) <= seed_score(lat, jit, loss));
        }
    }
}
