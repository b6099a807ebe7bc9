//! Receiver-side anti-replay for probes (pure), as IPsec (RFC 4303 §3.4.3) and WireGuard do
//! it: the highest sequence accepted plus a bitmap of the 1024 sequences just below it.
//!
//! A probe's HMAC proves who sent it, not that it is fresh: without this check anyone on the
//! path could record probes and replay them later, making a dead path look alive to the
//! reflector or skewing its counters. A window (rather than "must rise") is needed because
//! UDP reorders: a probe overtaken by its successor is still genuine.

/// How far below the highest accepted sequence a sequence may still be accepted.
pub const WINDOW: u64 = 1024;
const WORDS: usize = (WINDOW / 64) as usize;

/// Why a sequence was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ReplayError {
    /// Within the window and already accepted once.
    #[error("sequence already seen (replayed)")]
    Replayed,
    /// [`WINDOW`] or more below the highest accepted: whether it was seen is no longer
    /// known, so it is refused.
    #[error("sequence too old for the replay window")]
    TooOld,
}

impl ReplayError {
    /// A short label for counters and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            ReplayError::Replayed => "replayed",
            ReplayError::TooOld => "too_old",
        }
    }
}

/// One sender's replay state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    /// Highest accepted sequence; `None` before the first.
    highest: Option<u64>,
    /// Bit `i` (word `i / 64`, bit `i % 64`) set = sequence `highest - i` was accepted.
    bitmap: [u64; WORDS],
}

impl ReplayWindow {
    pub fn new() -> Self {
        Self::default()
    }

    /// Accept `seq` (and remember it) unless it was accepted before or is too old to tell.
    /// Every sequence, 0 included, is valid once.
    pub fn check_and_set(&mut self, seq: u64) -> Result<(), ReplayError> {
        let Some(highest) = self.highest else {
            self.highest = Some(seq);
            self.bitmap = [0; WORDS];
            self.bitmap[0] = 1;
            return Ok(());
        };
        if seq > highest {
            self.shift(seq - highest);
            self.highest = Some(seq);
            self.bitmap[0] |= 1;
            return Ok(());
        }
        let behind = highest - seq;
        if behind >= WINDOW {
            return Err(ReplayError::TooOld);
        }
        // behind < 1024, so the index is in range.
        let (word, bit) = ((behind / 64) as usize, behind % 64);
        let mask = 1u64 << bit;
        if self.bitmap[word] & mask != 0 {
            return Err(ReplayError::Replayed);
        }
        self.bitmap[word] |= mask;
        Ok(())
    }

    /// The highest sequence accepted so far.
    pub fn highest(&self) -> Option<u64> {
        self.highest
    }

    /// Forget everything (for a new sender key or a restarted sender).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Move every bit `by` positions further from `highest` (bit i becomes bit i + by).
    fn shift(&mut self, by: u64) {
        if by >= WINDOW {
            self.bitmap = [0; WORDS];
            return;
        }
        let words = (by / 64) as usize;
        let bits = (by % 64) as u32;
        let old = self.bitmap;
        for i in 0..WORDS {
            let from = i.checked_sub(words).map(|j| old[j]).unwrap_or(0);
            let carry = if bits == 0 {
                0
            } else {
                i.checked_sub(words + 1)
                    .map(|j| old[j] >> (64 - bits))
                    .unwrap_or(0)
            };
            self.bitmap[i] = (from << bits) | carry;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn table() {
        use ReplayError::*;
        // (sequence, expected), applied in order to one window.
        let cases: &[(u64, Result<(), ReplayError>)] = &[
            (0, Ok(())),
            (0, Err(Replayed)),
            (1, Ok(())),
            (5, Ok(())),
            (3, Ok(())),
            (3, Err(Replayed)),
            (4, Ok(())),
            (2, Ok(())),
            (5, Err(Replayed)),
            (1023, Ok(())),
            // 1023 - 0 = 1023 < 1024: still in the window, and seen.
            (0, Err(Replayed)),
            (1024, Ok(())),
            // Now 0 is 1024 behind; 1 is 1023 behind and was seen.
            (0, Err(TooOld)),
            (1, Err(Replayed)),
            // 1000 is in the window and new.
            (1000, Ok(())),
            (1025, Ok(())),
            (1, Err(TooOld)),
            (6, Ok(())),
            (6, Err(Replayed)),
            // A jump past the whole window forgets everything below.
            (10_000, Ok(())),
            (10_000 - 1023, Ok(())),
            (10_000 - 1024, Err(TooOld)),
            (9_999, Ok(())),
            (9_999, Err(Replayed)),
            (u64::MAX, Ok(())),
            (u64::MAX, Err(Replayed)),
            (u64::MAX - 1023, Ok(())),
            (u64::MAX - 1024, Err(TooOld)),
            (0, Err(TooOld)),
        ];
        let mut w = ReplayWindow::new();
        for (i, &(seq, expected)) in cases.iter().enumerate() {
            assert_eq!(w.check_and_set(seq), expected, "case {i}: seq {seq}");
        }
        assert_eq!(w.highest(), Some(u64::MAX));
        w.reset();
        assert_eq!(w.check_and_set(0), Ok(()));
    }

    #[test]
    fn reasons() {
        assert_eq!(ReplayError::Replayed.reason(), "replayed");
        assert_eq!(ReplayError::TooOld.reason(), "too_old");
    }

    #[test]
    fn shifts_across_word_boundaries_keep_every_bit() {
        for jump in [1u64, 2, 63, 64, 65, 127, 128, 129, 500, 1023, 1024, 1025] {
            let mut w = ReplayWindow::new();
            let mut accepted = HashSet::new();
            for s in (0..=300u64).filter(|s| s % 3 == 0 || s % 7 == 0) {
                assert_eq!(w.check_and_set(s), Ok(()));
                accepted.insert(s);
            }
            let top = 300 + jump;
            assert_eq!(w.check_and_set(top), Ok(()));
            accepted.insert(top);
            for s in 0..=top {
                let expected = if top - s >= WINDOW {
                    Err(ReplayError::TooOld)
                } else if accepted.contains(&s) {
                    Err(ReplayError::Replayed)
                } else {
                    Ok(())
                };
                assert_eq!(w.clone().check_and_set(s), expected, "jump {jump}, seq {s}");
            }
        }
    }

    /// Sequences near one another (so the window matters) with occasional far jumps.
    fn sequences() -> impl Strategy<Value = Vec<u64>> {
        proptest::collection::vec(
            prop_oneof![
                8 => 0u64..3000,
                1 => any::<u64>(),
                1 => (u64::MAX - 3000)..=u64::MAX,
            ],
            1..400,
        )
    }

    proptest! {
        /// Against the model: accept iff never accepted and `seq + 1024 > max accepted`.
        #[test]
        fn matches_the_reference_model(seqs in sequences()) {
            let mut w = ReplayWindow::new();
            let mut accepted: HashSet<u64> = HashSet::new();
            let mut max: Option<u64> = None;
            for seq in seqs {
                let in_window = max.is_none_or(|m| u128::from(seq) + 1024 > u128::from(m));
                let expected = if !in_window {
                    Err(ReplayError::TooOld)
                } else if accepted.contains(&seq) {
                    Err(ReplayError::Replayed)
                } else {
                    Ok(())
                };
                prop_assert_eq!(w.check_and_set(seq), expected, "seq {}", seq);
                if expected.is_ok() {
                    accepted.insert(seq);
                    max = Some(max.map_or(seq, |m| m.max(seq)));
                }
                prop_assert_eq!(w.highest(), max);
            }
        }
    }
}
