//! The controller's requests on `sdwan.<tenant>.<site>.cmd` (I/O): an on-demand path test
//! (`POST /api/v1/paths/{id}/test`), a re-probe, a state dump.
//!
//! The path test measures the bandwidth a path gives now: a TCP connection marked for the
//! path's tunnel (`SO_MARK`) to the peer agent's discard sink ([`PATH_TEST_PORT`] on its
//! overlay address) carries as much as it can for the requested seconds; the bytes the peer
//! acknowledged over the time taken are the figure, reported with the path's current probe
//! measurements. The sink accepts only the overlay addresses of the site's peers and runs one
//! test at a time (two at once would share the link and both measure half): later tests wait
//! in a short queue ([`SINK_QUEUE`] deep, each at most [`SINK_TURN_WAIT`]) and the sink sends
//! one [`SINK_READY`] byte when a test's turn comes, so the client times only its own turn.
//! Each test lasts at most [`MAX_PATH_TEST_SECONDS`] plus a margin; the data is thrown away.
//! The client ends with a reset rather than a FIN, so bytes still queued on a slow path do
//! not keep the sink busy after the test is over.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::mpsc::{sync_channel, TrySendError};
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

/// Tests waiting for the sink beyond the one it serves; more are refused (connection closed).
pub const SINK_QUEUE: usize = 4;

/// The longest a test waits for its turn at the sink (within the controller's
/// [`patronus_proto::command::PATH_TEST_SETUP_SECONDS`]).
pub const SINK_TURN_WAIT: Duration = Duration::from_secs(5);

/// The byte the sink sends when it starts serving a test.
pub const SINK_READY: u8 = 0x01;

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
        sink: SocketAddr::new(peer.overlay_address, PATH_TEST_PORT),
    })
}

/// Where a path test goes: the peer's overlay address through the path's tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTarget {
    /// The tunnel (for messages).
    pub interface: String,
    /// The firewall mark whose rule sends packets to the tunnel's table (0: none).
    pub mark: u32,
    /// The peer's sink: its overlay address and [`PATH_TEST_PORT`].
    pub sink: SocketAddr,
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
    if mark != 0 {
        crate::probing::set_mark(fd, mark)?;
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

/// Run a bandwidth test of `seconds` through `target`'s tunnel to the peer's sink; Mbit/s.
pub fn path_test(target: &PathTarget, seconds: u32) -> Result<f64, String> {
    let seconds = seconds.clamp(1, MAX_PATH_TEST_SECONDS);
    let interface = &target.interface;
    let mut stream = connect_through(target.mark, target.sink, Duration::from_secs(3))
        .map_err(|e| format!("cannot reach the peer's test sink through {interface}: {e}"))?;
    wait_for_turn(&mut stream).map_err(|e| format!("{e} (through {interface})"))?;
    stream
        .set_write_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    let chunk = vec![0x5a_u8; 64 * 1024];
    let started = Instant::now();
    let until = started + Duration::from_secs(u64::from(seconds));
    let mut written: u64 = 0;
    let outcome = loop {
        if Instant::now() >= until {
            break Ok(());
        }
        match stream.write(&chunk) {
            Ok(n) => written += n as u64,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => {
                break Err(format!(
                    "the test connection broke after {written} bytes: {e}"
                ))
            }
        }
    };
    let acknowledged = written.saturating_sub(unacknowledged(&stream));
    let elapsed = started.elapsed().as_secs_f64().max(0.001);
    abort(&stream);
    outcome.map(|()| acknowledged as f64 * 8.0 / elapsed / 1e6)
}

/// Wait (at most [`SINK_TURN_WAIT`]) for the sink's [`SINK_READY`] byte.
fn wait_for_turn(stream: &mut TcpStream) -> Result<(), String> {
    stream
        .set_read_timeout(Some(SINK_TURN_WAIT))
        .map_err(|e| e.to_string())?;
    let mut ready = [0u8; 1];
    match stream.read(&mut ready) {
        Ok(1) if ready[0] == SINK_READY => Ok(()),
        Ok(_) => Err(
            "the peer's test sink closed the connection: it refuses this site or \
                      has too many tests waiting; try again in a few seconds"
                .into(),
        ),
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            Err(format!(
                "the peer's test sink stayed busy with other tests for {SINK_TURN_WAIT:?}; \
                 try again when they are done"
            ))
        }
        Err(e) => Err(format!("the peer's test sink did not start the test: {e}")),
    }
}

/// Close `stream` with a reset: the test is over, and bytes still queued on a slow path would
/// otherwise keep the sink's side open while they drain.
fn abort(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the value points at a linger struct for the duration of the call.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// The discard sink peers test against: accepts from `peers` only and serves one test at a
/// time, the others waiting their turn in a short queue. Listens on `address` (the overlay
/// address and [`PATH_TEST_PORT`]); the address it listens on.
pub fn start_sink(address: SocketAddr, peers: Peers) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(address)?;
    let bound = listener.local_addr()?;
    let (queue, waiting) = sync_channel::<(TcpStream, Instant)>(SINK_QUEUE);
    std::thread::Builder::new()
        .name("patronus-test-sink".into())
        .spawn(move || {
            for (stream, arrived) in waiting {
                // The client gave up waiting; its connection is dead weight.
                if arrived.elapsed() >= SINK_TURN_WAIT {
                    continue;
                }
                serve_test(stream);
            }
        })?;
    std::thread::Builder::new()
        .name("patronus-test-sink-accept".into())
        .spawn(move || {
            for connection in listener.incoming() {
                let Ok(stream) = connection else {
                    continue;
                };
                let allowed = stream
                    .peer_addr()
                    .ok()
                    .is_some_and(|a| peers.read().is_ok_and(|p| p.contains(&a.ip())));
                if !allowed {
                    continue; // dropped: closes the connection
                }
                match queue.try_send((stream, Instant::now())) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => {} // dropped: too many waiting
                    Err(TrySendError::Disconnected(_)) => break,
                }
            }
        })?;
    Ok(bound)
}

/// Tell the client to start, then read and discard until it closes or the longest test plus a
/// margin is over.
fn serve_test(mut stream: TcpStream) {
    if stream.write_all(&[SINK_READY]).is_err() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(u64::from(MAX_PATH_TEST_SECONDS) + 5);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buffer = vec![0u8; 64 * 1024];
    while Instant::now() < deadline {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
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

    fn loopback_sink(allowed: &[IpAddr]) -> PathTarget {
        let peers: Peers = Arc::new(RwLock::new(allowed.iter().copied().collect()));
        let sink = start_sink(SocketAddr::from(([127, 0, 0, 1], 0)), peers)
            .expect("a sink on the loopback");
        PathTarget {
            interface: "lo".into(),
            mark: 0,
            sink,
        }
    }

    #[test]
    fn tests_at_one_sink_take_turns_and_each_measures_its_own_second() {
        let target = loopback_sink(&[IpAddr::from([127, 0, 0, 1])]);
        let started = Instant::now();
        let tests: Vec<_> = (0..2)
            .map(|_| {
                let target = target.clone();
                std::thread::spawn(move || path_test(&target, 1))
            })
            .collect();
        for test in tests {
            let mbps = test.join().expect("test thread").expect("both tests run");
            assert!(mbps > 0.0, "a loopback test measured {mbps} Mbit/s");
        }
        // One at a time: the second waited for the first's turn to end.
        assert!(
            started.elapsed() >= Duration::from_secs(2),
            "two 1 s tests ended after {:?}",
            started.elapsed()
        );
        // And one right after them is served at once (the first ended with a reset, not a
        // drain of its queued bytes).
        assert!(path_test(&target, 1).is_ok());
    }

    #[test]
    fn a_sink_refuses_an_address_that_is_not_a_peer() {
        let target = loopback_sink(&[IpAddr::from([100, 64, 0, 9])]);
        let error = path_test(&target, 1).expect_err("refused");
        assert!(error.contains("refuses this site"), "{error}");
    }
}
