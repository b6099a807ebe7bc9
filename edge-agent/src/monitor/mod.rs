//! Path monitoring, the pure core (sans-IO): probe schedules, measurements, scores and path
//! health. Nothing here opens a socket, reads a clock, spawns or awaits; every call takes
//! `now` (a monotonic `Duration` since an epoch the caller chooses, e.g. the agent's start
//! `Instant`) and its inputs, and returns what to do. That keeps every timing rule testable
//! to the millisecond, and property-tested against plain reference models.
//!
//! - [`prober`]: one path's probes (BFD-like): when to send, which sequence, when silence
//!   counts as loss, RTT/jitter/loss, and liveness (dead after `down_after_losses`
//!   consecutive losses, alive at the next answer).
//! - [`estimate`]: the estimators the prober uses (RFC 3550 jitter, loss and RTT windows)
//!   and a bounded [`History`] for per-path samples.
//! - [`score`]: the seed score and the multi-factor weighted score (0..=100, monotonic,
//!   total), the weights of each path preference, and the score health is judged by.
//! - [`health`]: Up / Degraded / Down with hysteresis and failback hold-down, and the same
//!   hold-down per (path, class SLA).
//! - [`replay`]: the receiver-side anti-replay window for authenticated probes.
//! - [`pmtu`]: the usable path MTU from the kernel's outer path MTU, and the padding of the
//!   full-size probes that let the kernel learn it.
//!
//! How the I/O side drives it, per path (one [`PathProber`] + one [`PathHealth`]):
//!
//! 1. Sleep until the earliest [`PathProber::next_deadline`] of all paths, then
//!    [`PathProber::poll`] each due path. For `send: Some(seq)`, encode and send a probe with
//!    that sequence; `lost` and `liveness_changed` report what expired.
//! 2. On a reply (after decoding and authenticating it), call [`PathProber::on_reply`] with
//!    the reply's sequence and the reflector's hold time; only `Accepted` carries an RTT.
//! 3. On the reflector side, run each sender's sequences through a [`ReplayWindow`] before
//!    answering.
//! 4. After a poll or reply that changed something (or on a tick), take
//!    [`PathProber::stats`], compute [`score::health_score`], and feed
//!    [`PathHealth::update`] with the prober's liveness, that score and its consecutive
//!    losses. A returned [`Transition`] is an event; [`PathHealth::usable`] and
//!    [`PathHealth::preferred`] decide steering: fail over at once, fail back only to
//!    preferred paths. Per class, [`meets_sla`] through a [`SlaGate`] decides whether the
//!    class may use the path, and [`weighted_score`] with [`profile_for`] the class's
//!    preference ranks the paths it may use.
//! 5. On a new intent, [`PathProber::set_config`] and [`PathHealth::set_config`] from its
//!    `probe` and `failover` settings; measurements are kept.

// Wired into run by the prober I/O.
#![allow(dead_code)]

pub mod estimate;
pub mod health;
pub mod pmtu;
pub mod prober;
pub mod replay;
pub mod score;

// The API the prober I/O uses; unused until it is wired in, like the items above.
#[allow(unused_imports)]
pub use estimate::{History, Jitter, LossWindow, RttWindow};
#[allow(unused_imports)]
pub use health::{meets_sla, Health, HealthConfig, PathHealth, SlaGate, Transition};
#[allow(unused_imports)]
pub use prober::{
    Liveness, PathProber, Poll, ProbeStats, ProberConfig, ReplyOutcome, MAX_OUTSTANDING,
};
#[allow(unused_imports)]
pub use replay::{ReplayError, ReplayWindow};
#[allow(unused_imports)]
pub use score::{health_score, profile_for, seed_score, weighted_score, ScoreInputs};
