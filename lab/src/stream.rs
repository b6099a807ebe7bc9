//! `patronus-lab udp-stream send|recv` (hidden): a steady UDP stream with sequence numbers and
//! send times, for `bench failover`, run inside a namespace through `ip netns exec`.
//!
//! Each datagram starts with [`MAGIC`], the sequence (u64) and the send time (u64 ns of
//! `CLOCK_MONOTONIC`, which every namespace of the host shares), big-endian, padded to the
//! requested size. The sender keeps an absolute schedule (datagram k leaves at start + k /
//! rate), so a late wake-up delays one datagram, never the rest. The receiver prints one line
//! per datagram, `<seq> <sent ns> <received ns>`, flushed at once, so whoever reads it sees
//! arrivals as they happen.

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{ensure, Context};

pub const MAGIC: [u8; 4] = *b"PLUS";
/// Magic, sequence, send time.
pub const HEADER_LEN: usize = 20;

/// `CLOCK_MONOTONIC` in nanoseconds (the same clock in every namespace of the host).
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `now`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64) * 1_000_000_000 + now.tv_nsec as u64
}

/// One datagram of the stream (pure).
pub fn encode(seq: u64, sent_ns: u64, size: usize, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&sent_ns.to_be_bytes());
    out.resize(size.max(HEADER_LEN), 0);
}

/// `(sequence, send time)` of a datagram of the stream, `None` for anything else (pure).
pub fn decode(datagram: &[u8]) -> Option<(u64, u64)> {
    if datagram.len() < HEADER_LEN || datagram[..4] != MAGIC {
        return None;
    }
    let word = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&datagram[at..at + 8]);
        u64::from_be_bytes(b)
    };
    Some((word(4), word(12)))
}

/// One received datagram, as the receiver prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    pub seq: u64,
    pub sent_ns: u64,
    pub received_ns: u64,
}

/// Parse one line of the receiver's output (pure).
pub fn parse_line(line: &str) -> Option<Arrival> {
    let mut fields = line.split_whitespace().map(|f| f.parse::<u64>().ok());
    Some(Arrival {
        seq: fields.next()??,
        sent_ns: fields.next()??,
        received_ns: fields.next()??,
    })
}

/// Send `rate` datagrams per second of `size` bytes to `to`, for `seconds` (forever if none).
pub fn send(to: SocketAddr, rate: u32, size: usize, seconds: Option<u64>) -> anyhow::Result<()> {
    ensure!((1..=100_000).contains(&rate), "--rate must be 1-100000");
    ensure!(
        (HEADER_LEN..=9000).contains(&size),
        "--size must be {HEADER_LEN}-9000"
    );
    let bind: SocketAddr = if to.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind).context("binding the sender's socket")?;
    socket
        .connect(to)
        .with_context(|| format!("connecting to {to}"))?;
    let period_ns = 1_000_000_000 / u64::from(rate);
    let start = monotonic_ns();
    let end = seconds.map(|s| start + s * 1_000_000_000);
    let mut out = Vec::with_capacity(size);
    let mut seq = 0u64;
    loop {
        let due = start + seq * period_ns;
        let now = monotonic_ns();
        if end.is_some_and(|end| due >= end) {
            return Ok(());
        }
        if due > now {
            std::thread::sleep(Duration::from_nanos(due - now));
        }
        encode(seq, monotonic_ns(), size, &mut out);
        // No route for a moment (an uplink cut, a path being replaced) is what is measured,
        // not a reason to stop.
        let _ = socket.send(&out);
        seq += 1;
    }
}

/// Print every datagram of the stream received on `listen` until stdout closes.
pub fn recv(listen: SocketAddr) -> anyhow::Result<()> {
    let socket = UdpSocket::bind(listen).with_context(|| format!("binding {listen}"))?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut buffer = vec![0u8; 65_536];
    loop {
        let len = socket.recv(&mut buffer).context("receiving")?;
        let received_ns = monotonic_ns();
        let Some((seq, sent_ns)) = decode(&buffer[..len]) else {
            continue;
        };
        // Whoever reads stopped reading: done.
        if writeln!(out, "{seq} {sent_ns} {received_ns}")
            .and_then(|()| out.flush())
            .is_err()
        {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_round_trips_and_junk_is_refused() {
        let mut out = Vec::new();
        encode(42, 7_000_000_123, 100, &mut out);
        assert_eq!(out.len(), 100);
        assert_eq!(decode(&out), Some((42, 7_000_000_123)));
        encode(1, 2, 3, &mut out);
        assert_eq!(out.len(), HEADER_LEN, "never shorter than the header");
        assert_eq!(decode(&out[..HEADER_LEN - 1]), None);
        assert_eq!(decode(b"JUNKaaaaaaaabbbbbbbb"), None, "a wrong magic");
    }

    #[test]
    fn receiver_lines_parse() {
        assert_eq!(
            parse_line("3 100 250"),
            Some(Arrival {
                seq: 3,
                sent_ns: 100,
                received_ns: 250
            })
        );
        assert_eq!(parse_line("3 100"), None);
        assert_eq!(parse_line("x 1 2"), None);
    }
}
