//! The controller's requests on `sdwan.<tenant>.<site>.cmd` (I/O): an on-demand path test
//! (`POST /api/v1/paths/{id}/test`), a re-probe, a state dump.
//!
//! The path test measures the bandwidth a path gives now: a TCP connection bound to the
//! path's tunnel (`SO_BINDTODEVICE`) to the peer agent's discard sink ([`PATH_TEST_PORT`] on
//! its overlay address) carries as much as it can for the requested seconds; the bytes the
//! peer acknowledged over the time taken are the figure, reported with the path's current
//! probe measurements. The sink accepts only the overlay addresses of the site's peers, one
//! test at a time, each for at most [`MAX_PATH_TEST_SECONDS`] plus a margin, and throws the
//! data away.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use patronus_proto::command::{
    Command, CommandReply, CommandRequest, CommandResult, MAX_PATH_TEST_SECONDS,
};
use patronus_proto::metrics::PathMetrics;
use patronus_proto::{PathId, SiteIntent, SCHEMA_VERSION};

use crate::steering::PathView;

/// TCP port of the path-test sink on the overlay (inside the tunnels only).
pub const PATH_TEST_PORT: u16 = 51998;

/// The overlay addresses the sink accepts (the applied intent's peers).
pub type Peers = Arc<RwLock<BTreeSet<IpAddr>>>;

/// The answer to `request`, given what the agent knows; `None` for a path test, which the
/// caller runs off the loop with [`path_test`].
pub fn immediate(
    request: &CommandRequest,
    intent: Option<&SiteIntent>,
    views: &std::collections::BTreeMap<PathId, PathView>,
    monitor: Option<&crate::probing::MonitorReport>,
) -> Option<CommandResult> {
    match &request.command {
        Command::PathTest { .. } => None,
        Command::DumpState => Some(CommandResult::State {
            applied_revision: intent.map_or(0, |i| i.revision),
            state: serde_json::json!({
                "paths": monitor.map(|m| serde_json::to_value(m).unwrap_or_default()),
                "paths_up": views
                    .values()
                    .filter(|v| v.status == patronus_proto::metrics::PathStatus::Up)
                    .count(),
            }),
        }),
        // Probing restarts with every new plan; a re-probe request is acknowledged and the
        // next samples carry fresh measurements.
        Command::Reprobe { .. } => Some(CommandResult::Accepted),
        Command::Unknown => Some(CommandResult::Failed {
            error: "this edge does not know that command; upgrade it".into(),
        }),
    }
}

pub fn reply(request_id: &str, result: CommandResult) -> CommandReply {
    CommandReply {
        schema_version: SCHEMA_VERSION,
        request_id: request_id.to_owned(),
        result,
    }
}

/// What a path test needs from the intent: the tunnel, its mark and the peer's overlay
/// address.
pub fn path_target(intent: &SiteIntent, path: PathId) -> Option<PathTarget> {
    let spec = intent.paths.iter().find(|p| p.id == path)?;
    let peer = intent.peers.iter().find(|p| p.site == spec.remote_site)?;
    Some(PathTarget {
        interface: crate::desired::interface_name(
            intent.site,
            spec.local_uplink,
            spec.remote_uplink,
        ),
        mark: crate::desired::table_of(spec.local_uplink, spec.remote_uplink),
        peer: peer.overlay_address,
    })
}

/// Where a path test goes: the peer's overlay address through the path's tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTarget {
    /// The tunnel (for messages).
    pub interface: String,
    /// The firewall mark whose rule sends packets to the tunnel's table.
    pub mark: u32,
    pub peer: IpAddr,
}

fn sockaddr(address: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; zeroed is valid and large enough for both
    // families, written field by field below.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match address {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is at least as large and aligned as sockaddr_in.
            let sa = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in) };
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_port = v4.port().to_be();
            sa.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            // SAFETY: as above, for sockaddr_in6.
            let sa = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in6) };
            sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sa.sin6_port = v6.port().to_be();
            sa.sin6_addr.s6_addr = v6.ip().octets();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// A TCP connection to `to` leaving through `interface` only.
/// A TCP connection to `to` whose packets carry `mark`, so they leave by the path's tunnel.
/// Not `SO_BINDTODEVICE`: the peer answers by its own routing, which may bring the SYN-ACK
/// and ACKs back through another tunnel, and a socket bound to a device ignores packets that
/// arrive on any other (the connect would time out). The test measures the path's forward
/// direction, which is the data's.
fn connect_through(mark: u32, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let family = if to.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the TcpStream below owns the descriptor from here.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket this function owns.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    // SAFETY: the value points at a u32 for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mark as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // connect(2) blocks; bound it with the send timeout, which Linux applies to connect (it
    // then fails with EINPROGRESS, said as a timeout below).
    stream.set_write_timeout(Some(timeout))?;
    let (address, len) = sockaddr(to);
    // SAFETY: address/len describe a valid sockaddr for the socket's family.
    let rc = unsafe { libc::connect(fd, (&address as *const libc::sockaddr_storage).cast(), len) };
    if rc < 0 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EINPROGRESS) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            ));
        }
        return Err(error);
    }
    Ok(stream)
}

/// Bytes written to `stream` that the peer has not acknowledged yet (SIOCOUTQ).
fn unacknowledged(stream: &TcpStream) -> u64 {
    let mut pending: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (= SIOCOUTQ) writes one int.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut pending) };
    if rc < 0 {
        0
    } else {
        u64::try_from(pending).unwrap_or(0)
    }
}

/// Run a bandwidth test of `seconds` through `interface` to `peer`'s sink; Mbit/s.
pub fn path_test(target: &PathTarget, seconds: u32) -> Result<f64, String> {
    let seconds = seconds.clamp(1, MAX_PATH_TEST_SECONDS);
    let interface = &target.interface;
    let mut stream = connect_through(
        target.mark,
        SocketAddr::new(target.peer, PATH_TEST_PORT),
        Duration::from_secs(3),
    )
    .map_err(|e| format!("cannot reach the peer's test sink through {interface}: {e}"))?;
    stream
        .set_write_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    let chunk = vec![0x5a_u8; 64 * 1024];
    let started = Instant::now();
    let until = started + Duration::from_secs(u64::from(seconds));
    let mut written: u64 = 0;
    while Instant::now() < until {
        match stream.write(&chunk) {
            Ok(n) => written += n as u64,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => {
                return Err(format!(
                    "the test connection broke after {written} bytes: {e}"
                ))
            }
        }
    }
    let acknowledged = written.saturating_sub(unacknowledged(&stream));
    let elapsed = started.elapsed().as_secs_f64().max(0.001);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    Ok(acknowledged as f64 * 8.0 / elapsed / 1e6)
}

/// The discard sink peers test against: accepts from `peers` only, one test at a time.
pub fn start_sink(overlay: IpAddr, peers: Peers) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(SocketAddr::new(overlay, PATH_TEST_PORT))?;
    let busy = Arc::new(AtomicBool::new(false));
    std::thread::Builder::new()
        .name("patronus-test-sink".into())
        .spawn(move || {
            for connection in listener.incoming() {
                let Ok(mut stream) = connection else {
                    continue;
                };
                let allowed = stream
                    .peer_addr()
                    .ok()
                    .is_some_and(|a| peers.read().is_ok_and(|p| p.contains(&a.ip())));
                if !allowed || busy.swap(true, Ordering::AcqRel) {
                    continue; // dropped: closes the connection
                }
                let busy = busy.clone();
                let _ = std::thread::Builder::new()
                    .name("patronus-test-sink-conn".into())
                    .spawn(move || {
                        let deadline = Instant::now()
                            + Duration::from_secs(u64::from(MAX_PATH_TEST_SECONDS) + 5);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buffer = vec![0u8; 64 * 1024];
                        while Instant::now() < deadline {
                            match stream.read(&mut buffer) {
                                Ok(0) | Err(_) => break,
                                Ok(_) => {}
                            }
                        }
                        busy.store(false, Ordering::Release);
                    });
            }
        })?;
    Ok(())
}

/// The reply metrics of a path test: the probes' latest view plus the measured bandwidth.
pub fn test_metrics(view: Option<&PathView>, bandwidth_mbps: f64, now_ms: u64) -> PathMetrics {
    let latency = view.and_then(|v| v.latency_ms).unwrap_or(0.0);
    let jitter = view.and_then(|v| v.jitter_ms).unwrap_or(0.0);
    let loss = view
        .and_then(|v| v.loss_pct)
        .unwrap_or(0.0)
        .clamp(0.0, 100.0);
    let stats = crate::monitor::ProbeStats {
        latency_ms: latency,
        jitter_ms: jitter,
        loss_pct: loss,
        ..Default::default()
    };
    PathMetrics {
        latency_ms: latency,
        jitter_ms: jitter,
        packet_loss_pct: loss,
        bandwidth_mbps: Some(bandwidth_mbps.max(0.0)),
        mtu: None,
        score: crate::monitor::health_score(&stats),
        measured_at_unix_ms: now_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn immediate_answers_and_path_tests_go_off_the_loop() {
        let request = |command| CommandRequest {
            schema_version: SCHEMA_VERSION,
            request_id: "r1".into(),
            command,
        };
        let views = std::collections::BTreeMap::new();
        assert!(immediate(
            &request(Command::PathTest {
                path: PathId(uuid::Uuid::nil()),
                duration_s: 1
            }),
            None,
            &views,
            None
        )
        .is_none());
        assert_eq!(
            immediate(
                &request(Command::Reprobe { path: None }),
                None,
                &views,
                None
            ),
            Some(CommandResult::Accepted)
        );
        assert!(matches!(
            immediate(&request(Command::DumpState), None, &views, None),
            Some(CommandResult::State {
                applied_revision: 0,
                ..
            })
        ));
        assert!(matches!(
            immediate(&request(Command::Unknown), None, &views, None),
            Some(CommandResult::Failed { .. })
        ));
    }

    #[test]
    fn test_metrics_carry_the_bandwidth_and_a_valid_score() {
        let m = test_metrics(None, 123.4, 5);
        assert_eq!(m.bandwidth_mbps, Some(123.4));
        assert!(m.validate("m").is_ok());
    }
}
