//! Getting a new peer's first WireGuard handshake done in milliseconds, not seconds (pure).
//!
//! When two sites configure each other at the same moment, both send a handshake initiation;
//! each answers the other's, which overwrites its own pending initiation, so both responses
//! are refused and neither side has a confirmed session. WireGuard sends at most one
//! initiation per peer every 5 s (REKEY_TIMEOUT), so the mesh would wait 5 s. The same wait
//! happens when an initiation reaches a site that does not know the sender yet.
//!
//! The fix is a tie-break: of the two ends of a path, the one with the smaller public key
//! "kicks" a peer that has no handshake shortly after it was configured, by removing and
//! re-adding it (which resets WireGuard's rate limit and starts a fresh initiation). Only one
//! end kicks, so the kicks themselves never cross. This module decides when; the run loop
//! observes handshakes and performs the kicks.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// First kick this long after the peer was configured: longer than a handshake round trip
/// on any sane WAN, far shorter than WireGuard's own 5 s retry.
pub const FIRST_KICK_AFTER: Duration = Duration::from_millis(300);
/// Later kicks back off: 300 ms, then 600 ms, 1.2 s after the previous one.
pub const MAX_KICKS: u32 = 3;
/// After this, WireGuard's own retries take over and the peer is forgotten here.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(6);

/// One path's peer on one interface.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerSlot {
    pub interface: String,
    pub peer_key: [u8; 32],
}

#[derive(Debug, Clone)]
struct Pending {
    added: Instant,
    next_kick: Instant,
    kicks: u32,
}

/// New peers waiting for their first handshake.
#[derive(Debug, Default)]
pub struct Kicker {
    local_key: [u8; 32],
    pending: BTreeMap<PeerSlot, Pending>,
}

impl Kicker {
    pub fn new(local_public_key: [u8; 32]) -> Self {
        Self {
            local_key: local_public_key,
            pending: BTreeMap::new(),
        }
    }

    /// This site's key changed (a rotation committed): later peers are tie-broken with the
    /// new one, as the peers themselves do once their intents name it.
    pub fn set_local_key(&mut self, local_public_key: [u8; 32]) {
        self.local_key = local_public_key;
    }

    /// Whether this end of a path is the one that kicks.
    pub fn kicks_for(&self, peer_key: &[u8; 32]) -> bool {
        self.local_key < *peer_key
    }

    /// Peers just configured (added or changed) at `now`.
    pub fn configured(&mut self, now: Instant, slots: impl IntoIterator<Item = PeerSlot>) {
        for slot in slots {
            if !self.kicks_for(&slot.peer_key) {
                continue;
            }
            self.pending.insert(
                slot,
                Pending {
                    added: now,
                    next_kick: now + FIRST_KICK_AFTER,
                    kicks: 0,
                },
            );
        }
    }

    /// Given which pending peers have a handshake now, the peers to kick at `now`.
    pub fn poll(
        &mut self,
        now: Instant,
        has_handshake: impl Fn(&PeerSlot) -> bool,
    ) -> Vec<PeerSlot> {
        let mut kick = Vec::new();
        self.pending.retain(|slot, pending| {
            if has_handshake(slot) || now.duration_since(pending.added) >= GIVE_UP_AFTER {
                return false;
            }
            if now >= pending.next_kick {
                if pending.kicks >= MAX_KICKS {
                    return false;
                }
                pending.kicks += 1;
                pending.next_kick = now + FIRST_KICK_AFTER * 2u32.pow(pending.kicks);
                kick.push(slot.clone());
            }
            true
        });
        kick
    }

    /// When `poll` next has something to do; `None` when nothing is pending.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.next_kick).min()
    }

    /// The peers still waiting.
    pub fn pending_slots(&self) -> Vec<PeerSlot> {
        self.pending.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn slot(i: u8, key: u8) -> PeerSlot {
        PeerSlot {
            interface: format!("pw0000000{i}-00"),
            peer_key: [key; 32],
        }
    }

    #[test]
    fn a_new_local_key_moves_the_tie_break() {
        let t0 = Instant::now();
        let mut k = Kicker::new([5; 32]);
        assert!(k.kicks_for(&[7; 32]));
        k.set_local_key([8; 32]);
        assert!(!k.kicks_for(&[7; 32]));
        k.configured(t0, [slot(1, 7)]);
        assert_eq!(k.next_deadline(), None);
    }

    #[test]
    fn the_smaller_key_kicks_after_300_ms_and_backs_off() {
        let t0 = Instant::now();
        let mut k = Kicker::new([5; 32]);
        k.configured(t0, [slot(1, 9)]);
        assert!(k
            .poll(t0 + Duration::from_millis(299), |_| false)
            .is_empty());
        assert_eq!(k.next_deadline(), Some(t0 + FIRST_KICK_AFTER));
        assert_eq!(k.poll(t0 + FIRST_KICK_AFTER, |_| false), vec![slot(1, 9)]);
        // Next one 600 ms later, then 1.2 s, then none.
        let t1 = t0 + FIRST_KICK_AFTER;
        assert!(k
            .poll(t1 + Duration::from_millis(599), |_| false)
            .is_empty());
        assert_eq!(k.poll(t1 + Duration::from_millis(600), |_| false).len(), 1);
        let t2 = t1 + Duration::from_millis(600);
        assert_eq!(k.poll(t2 + Duration::from_millis(1200), |_| false).len(), 1);
        let t3 = t2 + Duration::from_millis(1200);
        assert!(k.poll(t3 + Duration::from_secs(3), |_| false).is_empty());
        assert!(k.pending.is_empty());
    }

    #[test]
    fn the_larger_key_never_kicks() {
        let t0 = Instant::now();
        let mut k = Kicker::new([9; 32]);
        k.configured(t0, [slot(1, 5)]);
        assert!(k.pending.is_empty());
        assert!(k.poll(t0 + Duration::from_secs(1), |_| false).is_empty());
    }

    #[test]
    fn a_handshake_ends_the_wait() {
        let t0 = Instant::now();
        let mut k = Kicker::new([1; 32]);
        k.configured(t0, [slot(1, 9), slot(2, 9)]);
        let done = slot(1, 9);
        let kicked = k.poll(t0 + Duration::from_secs(1), |s| *s == done);
        assert_eq!(kicked, vec![slot(2, 9)]);
        assert_eq!(k.pending.len(), 1);
    }

    proptest! {
        /// Against the rule it implements: only peers with a larger key are ever kicked, at
        /// most MAX_KICKS times each, never before FIRST_KICK_AFTER nor after GIVE_UP_AFTER,
        /// and never once a handshake was seen.
        #[test]
        fn kicks_follow_the_rule(
            local in any::<u8>(),
            peers in proptest::collection::vec((0u8..4, any::<u8>()), 1..6),
            steps in proptest::collection::vec((1u64..900, any::<bool>()), 1..40),
        ) {
            let t0 = Instant::now();
            let mut k = Kicker::new([local; 32]);
            let slots: Vec<PeerSlot> = peers.iter().map(|&(i, key)| slot(i, key)).collect();
            k.configured(t0, slots.clone());
            let mut kicks: BTreeMap<PeerSlot, u32> = BTreeMap::new();
            let mut shaken: std::collections::BTreeSet<PeerSlot> = Default::default();
            let mut now = t0;
            for (advance, handshake) in steps {
                now += Duration::from_millis(advance);
                // A random peer completes its handshake at this step.
                if handshake {
                    if let Some(s) = slots.get(advance as usize % slots.len()) {
                        shaken.insert(s.clone());
                    }
                }
                for kicked in k.poll(now, |s| shaken.contains(s)) {
                    prop_assert!(kicked.peer_key > [local; 32]);
                    prop_assert!(!shaken.contains(&kicked));
                    prop_assert!(now.duration_since(t0) >= FIRST_KICK_AFTER);
                    prop_assert!(now.duration_since(t0) < GIVE_UP_AFTER);
                    let n = kicks.entry(kicked).or_default();
                    *n += 1;
                    prop_assert!(*n <= MAX_KICKS);
                }
            }
        }
    }
}
