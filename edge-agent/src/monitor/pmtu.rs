//! Path MTU (pure): from what the kernel knows of a path's outer route to the largest packet
//! the site's traffic can send through the tunnel without fragmenting.
//!
//! How the I/O side finds the outer path MTU (classic path MTU discovery, RFC 1191 / 8201):
//! every few seconds it sends one probe per path inside the tunnel padded to exactly the
//! tunnel MTU ([`probe_padding`]), so WireGuard's encrypted datagram is as large as the
//! tunnel can ever make it; WireGuard's socket sends with DF (the kernel default), so a
//! router before a smaller link answers "fragmentation needed" and the kernel records the
//! lower MTU for that destination. A socket with the tunnel's firewall mark connected to the
//! peer's endpoint then reads it back (`IP_MTU`: the local device's MTU, lowered by what was
//! learnt). A raise is seen when the kernel's learnt entry expires (10 minutes by default),
//! a drop at the next probe.

/// What WireGuard adds to an inner packet over IPv4: IP 20 + UDP 8 + data header 16 +
/// authentication tag 16.
pub const WG_OVERHEAD_V4: u32 = 60;
/// The same over IPv6 (40-byte IP header).
pub const WG_OVERHEAD_V6: u32 = 80;

/// Inner IP + UDP headers of a probe (IPv4 / IPv6 overlay).
const PROBE_HEADERS_V4: usize = 28;
const PROBE_HEADERS_V6: usize = 48;

/// The MTU traffic inside the tunnel can use (pure): the tunnel's configured MTU, lowered
/// to what the outer path carries after WireGuard's overhead; `None` when the outer MTU is
/// too small to say anything sensible (below the IPv4 minimum of 68 after the overhead).
pub fn inner_mtu(outer_path_mtu: u32, outer_ipv6: bool, tunnel_mtu: u16) -> Option<u16> {
    let overhead = if outer_ipv6 {
        WG_OVERHEAD_V6
    } else {
        WG_OVERHEAD_V4
    };
    let usable = outer_path_mtu.checked_sub(overhead)?;
    if usable < 68 {
        return None;
    }
    Some(u16::try_from(usable).unwrap_or(u16::MAX).min(tunnel_mtu))
}

/// Padding that makes a signed probe's inner IP packet exactly `tunnel_mtu` bytes, given the
/// probe's own size without padding; 0 when the tunnel is smaller than a probe.
pub fn probe_padding(tunnel_mtu: u16, overlay_ipv6: bool, probe_len: usize) -> usize {
    let headers = if overlay_ipv6 {
        PROBE_HEADERS_V6
    } else {
        PROBE_HEADERS_V4
    };
    usize::from(tunnel_mtu).saturating_sub(headers + probe_len)
}

/// One path's known MTU and whether a new reading changes it (for a log line).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PmtuState {
    current: Option<u16>,
}

impl PmtuState {
    pub fn current(&self) -> Option<u16> {
        self.current
    }

    /// Take a reading; returns the previous value when it changed.
    pub fn observe(&mut self, reading: Option<u16>) -> Option<Option<u16>> {
        if reading == self.current {
            return None;
        }
        let previous = self.current;
        self.current = reading;
        Some(previous)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_plain_ethernet_path_leaves_the_tunnel_mtu() {
        assert_eq!(inner_mtu(1500, false, 1420), Some(1420));
        assert_eq!(inner_mtu(1500, true, 1420), Some(1420));
        assert_eq!(inner_mtu(9000, false, 1420), Some(1420));
    }

    #[test]
    fn a_smaller_outer_path_lowers_it_by_wireguards_overhead() {
        assert_eq!(inner_mtu(1300, false, 1420), Some(1240));
        assert_eq!(inner_mtu(1300, true, 1420), Some(1220));
        // PPPoE's 1492 leaves 1432 over IPv4: still above a 1420 tunnel.
        assert_eq!(inner_mtu(1492, false, 1420), Some(1420));
        assert_eq!(inner_mtu(1460, false, 1420), Some(1400));
    }

    #[test]
    fn nonsense_outer_values_say_nothing() {
        assert_eq!(inner_mtu(0, false, 1420), None);
        assert_eq!(inner_mtu(100, false, 1420), None);
        assert_eq!(inner_mtu(128, false, 1420), Some(68));
    }

    #[test]
    fn the_padded_probe_fills_the_tunnel_exactly() {
        // 56-byte header + 32-byte MAC.
        assert_eq!(28 + 88 + probe_padding(1420, false, 88), 1420);
        assert_eq!(48 + 88 + probe_padding(1420, true, 88), 1420);
        assert_eq!(probe_padding(100, false, 88), 0);
    }

    #[test]
    fn changes_are_reported_once() {
        let mut state = PmtuState::default();
        assert_eq!(state.observe(Some(1420)), Some(None));
        assert_eq!(state.observe(Some(1420)), None);
        assert_eq!(state.observe(Some(1240)), Some(Some(1420)));
        assert_eq!(state.current(), Some(1240));
        assert_eq!(state.observe(None), Some(Some(1240)));
    }

    proptest! {
        /// Never above the tunnel, never above what the outer path carries, and a smaller
        /// outer path never gives a larger inner MTU.
        #[test]
        fn bounded_and_monotonic(outer in 0u32..20_000, lower in 0u32..20_000, v6: bool, tunnel in 1280u16..=9000) {
            if let Some(mtu) = inner_mtu(outer, v6, tunnel) {
                prop_assert!(mtu <= tunnel);
                let overhead = if v6 { WG_OVERHEAD_V6 } else { WG_OVERHEAD_V4 };
                prop_assert!(u32::from(mtu) + overhead <= outer);
                let smaller = lower.min(outer);
                if let Some(less) = inner_mtu(smaller, v6, tunnel) {
                    prop_assert!(less <= mtu);
                }
            }
        }
    }
}
