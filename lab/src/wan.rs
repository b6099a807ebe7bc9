//! The WAN emulator's decisions, with no I/O: given an uplink's impairment, a packet's
//! direction, its size, the time and a random source, drop it or say when to deliver it.
//!
//! Semantics (per uplink, changeable at run time):
//! - `delay_ms`: round-trip time the uplink adds; half is applied to each direction, so a ping
//!   across one impaired uplink sees `delay_ms` more RTT.
//! - `jitter_ms`: each direction's delay varies uniformly within ± `jitter_ms / 2`.
//! - `loss_pct`: probability of losing a packet, independently in each direction.
//! - `rate_mbit`: a token bucket per direction (burst of 10 ms at the rate); a packet that
//!   would wait more than [`MAX_QUEUE_DELAY`] is dropped (a tail drop, like a full queue).
//! - `cut`: everything is dropped.
//!
//! A packet between two lab uplinks crosses both: the sender's uplink upstream, the receiver's
//! downstream, and their effects add up.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest a rate-limited packet may queue before it is dropped instead.
pub const MAX_QUEUE_DELAY: Duration = Duration::from_millis(200);

/// What one uplink suffers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Impairment {
    pub delay_ms: f64,
    pub jitter_ms: f64,
    pub loss_pct: f64,
    pub rate_mbit: Option<f64>,
    pub cut: bool,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ImpairmentError {
    #[error("delay must be 0-10000 ms")]
    Delay,
    #[error("jitter must be 0-10000 ms and at most the delay")]
    Jitter,
    #[error("loss must be 0-100 %")]
    Loss,
    #[error("rate must be 0.01-100000 Mbit/s")]
    Rate,
}

impl Impairment {
    pub fn validate(&self) -> Result<(), ImpairmentError> {
        if !(0.0..=10_000.0).contains(&self.delay_ms) {
            return Err(ImpairmentError::Delay);
        }
        if !(0.0..=10_000.0).contains(&self.jitter_ms) || self.jitter_ms > self.delay_ms {
            return Err(ImpairmentError::Jitter);
        }
        if !(0.0..=100.0).contains(&self.loss_pct) {
            return Err(ImpairmentError::Loss);
        }
        if let Some(rate) = self.rate_mbit {
            if !(0.01..=100_000.0).contains(&rate) {
                return Err(ImpairmentError::Rate);
            }
        }
        Ok(())
    }
}

/// Which way a packet crosses an uplink.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the site to the internet.
    Up,
    /// From the internet to the site.
    Down,
}

/// Why a packet was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    Cut,
    Loss,
    Queue,
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// When the link is next free (nanoseconds on the emulator's clock).
    free_at_ns: u64,
}

/// Impairments and rate state of every uplink, keyed by the uplink's site-side address.
#[derive(Debug, Default)]
pub struct Wan {
    impairments: HashMap<Ipv4Addr, Impairment>,
    buckets: HashMap<(Ipv4Addr, Direction), Bucket>,
}

/// A uniform random number in [0, 1), supplied by the caller (tests seed it).
pub trait Uniform {
    fn next_f64(&mut self) -> f64;
}

impl Wan {
    pub fn set(&mut self, uplink: Ipv4Addr, impairment: Impairment) {
        if impairment == Impairment::default() {
            self.impairments.remove(&uplink);
        } else {
            self.impairments.insert(uplink, impairment);
        }
    }

    pub fn get(&self, uplink: Ipv4Addr) -> Impairment {
        self.impairments.get(&uplink).copied().unwrap_or_default()
    }

    /// One crossing of one uplink: `Ok(extra delay in ns)` or the drop.
    fn cross(
        &mut self,
        uplink: Ipv4Addr,
        direction: Direction,
        bytes: usize,
        now_ns: u64,
        rng: &mut impl Uniform,
    ) -> Result<u64, Drop> {
        let Some(imp) = self.impairments.get(&uplink).copied() else {
            return Ok(0);
        };
        if imp.cut {
            return Err(Drop::Cut);
        }
        if imp.loss_pct > 0.0 && rng.next_f64() * 100.0 < imp.loss_pct {
            return Err(Drop::Loss);
        }
        let half_ms = imp.delay_ms / 2.0 + (rng.next_f64() - 0.5) * imp.jitter_ms / 2.0;
        let mut delay_ns = (half_ms.max(0.0) * 1e6) as u64;
        if let Some(rate) = imp.rate_mbit {
            let bucket = self.buckets.entry((uplink, direction)).or_default();
            let start = bucket.free_at_ns.max(now_ns);
            let queued = start - now_ns;
            if queued > MAX_QUEUE_DELAY.as_nanos() as u64 {
                return Err(Drop::Queue);
            }
            let serialise_ns = (bytes as f64 * 8.0 / (rate * 1e6) * 1e9) as u64;
            bucket.free_at_ns = start + serialise_ns;
            delay_ns += queued + serialise_ns;
        }
        Ok(delay_ns)
    }

    /// A packet from uplink `src` to uplink `dst` (either may be outside the lab's uplinks, in
    /// which case it has no effect): when to deliver it, relative to `now_ns`, or the drop.
    pub fn decide(
        &mut self,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        bytes: usize,
        now_ns: u64,
        rng: &mut impl Uniform,
    ) -> Result<u64, Drop> {
        let up = self.cross(src, Direction::Up, bytes, now_ns, rng)?;
        let down = self.cross(dst, Direction::Down, bytes, now_ns + up, rng)?;
        Ok(up + down)
    }
}

/// A small, fast PRNG (xorshift64*), enough for loss and jitter.
pub struct XorShift(pub u64);

impl Uniform for XorShift {
    fn next_f64(&mut self) -> f64 {
        let mut x = self.0.max(1);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
    const B: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);

    #[test]
    fn an_unimpaired_wan_passes_everything_at_once() {
        let mut wan = Wan::default();
        let mut rng = XorShift(7);
        assert_eq!(wan.decide(A, B, 1500, 0, &mut rng), Ok(0));
    }

    #[test]
    fn delay_is_half_per_direction_so_a_round_trip_sees_all_of_it() {
        let mut wan = Wan::default();
        wan.set(
            A,
            Impairment {
                delay_ms: 40.0,
                ..Default::default()
            },
        );
        let mut rng = XorShift(7);
        let there = wan.decide(A, B, 100, 0, &mut rng).unwrap();
        let back = wan.decide(B, A, 100, 0, &mut rng).unwrap();
        assert_eq!(there + back, 40_000_000);
    }

    #[test]
    fn jitter_stays_within_its_band_and_loss_hits_its_rate() {
        let mut wan = Wan::default();
        wan.set(
            A,
            Impairment {
                delay_ms: 40.0,
                jitter_ms: 10.0,
                loss_pct: 10.0,
                ..Default::default()
            },
        );
        let mut rng = XorShift(42);
        let (mut lost, n) = (0, 100_000);
        for _ in 0..n {
            match wan.decide(A, B, 100, 0, &mut rng) {
                Ok(d) => assert!((17_500_000..=22_500_000).contains(&d), "{d}"),
                Err(Drop::Loss) => lost += 1,
                Err(other) => panic!("{other:?}"),
            }
        }
        let pct = lost as f64 * 100.0 / n as f64;
        assert!((9.5..=10.5).contains(&pct), "{pct}");
    }

    #[test]
    fn a_rate_limit_spaces_packets_and_drops_past_the_queue() {
        let mut wan = Wan::default();
        // 1 Mbit/s: a 1250-byte packet takes 10 ms.
        wan.set(
            A,
            Impairment {
                rate_mbit: Some(1.0),
                ..Default::default()
            },
        );
        let mut rng = XorShift(1);
        assert_eq!(wan.decide(A, B, 1250, 0, &mut rng), Ok(10_000_000));
        assert_eq!(wan.decide(A, B, 1250, 0, &mut rng), Ok(20_000_000));
        let mut dropped = false;
        for _ in 0..30 {
            if wan.decide(A, B, 1250, 0, &mut rng) == Err(Drop::Queue) {
                dropped = true;
            }
        }
        assert!(dropped, "the queue never filled");
        // Later, the link is free again.
        assert_eq!(
            wan.decide(A, B, 1250, 10_000_000_000, &mut rng),
            Ok(10_000_000)
        );
    }

    #[test]
    fn a_cut_uplink_drops_both_ways_and_restoring_clears_it() {
        let mut wan = Wan::default();
        wan.set(
            B,
            Impairment {
                cut: true,
                ..Default::default()
            },
        );
        let mut rng = XorShift(3);
        assert_eq!(wan.decide(A, B, 100, 0, &mut rng), Err(Drop::Cut));
        assert_eq!(wan.decide(B, A, 100, 0, &mut rng), Err(Drop::Cut));
        wan.set(B, Impairment::default());
        assert_eq!(wan.decide(A, B, 100, 0, &mut rng), Ok(0));
    }

    #[test]
    fn out_of_range_impairments_are_refused() {
        for bad in [
            Impairment {
                delay_ms: -1.0,
                ..Default::default()
            },
            Impairment {
                delay_ms: 10.0,
                jitter_ms: 20.0,
                ..Default::default()
            },
            Impairment {
                loss_pct: 101.0,
                ..Default::default()
            },
            Impairment {
                rate_mbit: Some(0.0),
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
