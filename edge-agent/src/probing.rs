//! Path probing (I/O around the pure [`crate::monitor`]): a thread of its own that probes
//! every path inside its tunnel, answers the peers' probes, and tells the run loop what it
//! learns.
//!
//! Every tunnel interface (local uplink l, remote uplink r) gets one UDP socket on the
//! overlay address, port [`PROBE_PORT`], bound to the interface (`SO_BINDTODEVICE`): a probe
//! sent on it to a peer's overlay address leaves through that tunnel, so it measures exactly
//! the path (l, peer, r), and the peer's reflector answers on its own socket for (r, l), so
//! the reply comes back the same way. Probes are signed with the site pair's key from the
//! intent; a datagram that does not decode, is unsigned or badly signed, comes from no known
//! peer, or repeats a request sequence (sliding window per peer and tunnel) is dropped and
//! counted by reason.
//!
//! The thread runs its own single-threaded runtime, so probing at 10–20 ms never waits for
//! the run loop (which blocks on `ip` while it applies an intent). It sends the run loop
//! [`Update`]s: path views when a path's state, failback eligibility or SLA standing
//! changes (the run loop rewrites the data plane's class → path entries: the failover),
//! events (`PathFailed`, `PathDegraded`, `PathEstablished`), and per-path samples for the
//! metrics batches.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use patronus_proto::events::SdwanEvent;
use patronus_proto::intent::{FailoverSettings, ProbeSettings};
use patronus_proto::metrics::{PathMetrics, PathSample};
use patronus_proto::policy::Sla;
use patronus_proto::probe::{self, ProbeKind, ProbePacket};
use patronus_proto::{PathId, ProbeKey, SiteId, SiteIntent};

use crate::classifier::Compiled;
use crate::monitor::pmtu::{self, PmtuState};
use crate::monitor::{
    health_score, Health, HealthConfig, Liveness, PathHealth, PathProber, ProberConfig,
    ReplayWindow, ReplyOutcome, SlaGate,
};
use crate::steering::PathView;

/// UDP port of probes and reflectors on the overlay (inside the tunnels only).
pub const PROBE_PORT: u16 = 51999;

/// Largest datagram read (probes are 88 bytes; MTU probes up to the interface MTU).
const RECV_BUFFER: usize = 9216;

/// Path tag of the full-size probes that make the kernel learn the path MTU (even: an
/// agent's tag; operators' runs use odd ones).
pub const MTU_PROBE_TAG: u32 = 2;

/// How often per-path samples go to the run loop for the metrics batch (and how often the
/// path MTU is read and full-size probes are sent).
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// How often views are re-sent even without a state change, so ranking by measured latency
/// follows the measurements (state changes are sent at once).
const VIEW_REFRESH: Duration = Duration::from_secs(10);

/// One path to probe: (local uplink, peer, remote uplink) through tunnel `interface`.
#[derive(Debug, Clone)]
pub struct Target {
    pub path: PathId,
    pub local_uplink: u8,
    pub peer: SiteId,
    pub peer_overlay: IpAddr,
    pub key: ProbeKey,
    pub interface: String,
    /// The peer's WireGuard endpoint on the remote uplink (outer destination), for reading
    /// the path MTU the kernel learnt toward it.
    pub endpoint: Option<SocketAddr>,
    /// The firewall mark of the tunnel's encrypted packets (selects the local uplink).
    pub uplink_mark: u32,
    /// How often this path is probed: the site's interval, or less where a routing policy
    /// whose traffic can take the path asks for less ([`probe_interval_ms`]).
    pub interval_ms: u32,
}

/// What the thread probes, from the applied intent.
#[derive(Debug, Clone)]
pub struct ProbePlan {
    pub site: SiteId,
    pub overlay: IpAddr,
    pub targets: Vec<Target>,
    pub settings: ProbeSettings,
    pub failover: FailoverSettings,
    /// Each class's SLA (its policy's, else the intent's default).
    pub class_slas: BTreeMap<u16, Sla>,
    /// Local uplinks: interface and capacity (Mbit/s, from the intent), for the passive
    /// available-bandwidth estimate.
    pub uplinks: BTreeMap<u8, (String, Option<u32>)>,
    /// The tunnels' MTU (full-size MTU probes are this large inside the tunnel).
    pub tunnel_mtu: u16,
}

/// What the run loop learns from the thread.
#[derive(Debug)]
pub enum Update {
    Views(BTreeMap<PathId, PathView>),
    Event(SdwanEvent),
    Samples(Vec<PathSample>),
}

/// What `patronus-edge status` shows of the monitor (`monitor.json` in the state directory,
/// written by the run loop whenever a path's view changes).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MonitorReport {
    pub updated_at_unix_ms: u64,
    pub paths: Vec<PathReport>,
    /// Probe datagrams dropped, by reason (unsigned, bad_signature, replayed, ...).
    pub drops: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PathReport {
    pub path: PathId,
    pub peer: String,
    pub local_uplink: u8,
    pub remote_uplink: u8,
    pub status: patronus_proto::metrics::PathStatus,
    pub preferred: bool,
    pub latency_ms: Option<f64>,
    pub jitter_ms: Option<f64>,
    pub loss_pct: Option<f64>,
    /// Classes that may not use the path now (SLA not met, or not yet for the hold-down).
    pub sla_blocked: Vec<u16>,
}

pub const MONITOR_FILE: &str = "monitor.json";

/// The report of `views` for `intent` (pure).
pub fn report(
    intent: &SiteIntent,
    views: &BTreeMap<PathId, PathView>,
    drops: &Drops,
    now_unix_ms: u64,
) -> MonitorReport {
    let paths = intent
        .paths
        .iter()
        .filter_map(|p| {
            let view = views.get(&p.id)?;
            let peer = intent.peers.iter().find(|x| x.site == p.remote_site)?;
            Some(PathReport {
                path: p.id,
                peer: peer.name.clone(),
                local_uplink: p.local_uplink,
                remote_uplink: p.remote_uplink,
                status: view.status,
                preferred: view.preferred,
                latency_ms: view.latency_ms,
                jitter_ms: view.jitter_ms,
                loss_pct: view.loss_pct,
                sla_blocked: view.sla_blocked.iter().copied().collect(),
            })
        })
        .collect();
    let drops = drops
        .lock()
        .map(|d| d.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect())
        .unwrap_or_default();
    MonitorReport {
        updated_at_unix_ms: now_unix_ms,
        paths,
        drops,
    }
}

/// How often the paths toward `peer` are probed (pure): the site's `probe.interval_ms`, or
/// the smallest `probe_interval_ms` of the enabled routing policies whose traffic can go to
/// that peer (no destination prefixes, or one overlapping the peer's overlay address, LANs or
/// transit prefixes).
pub fn probe_interval_ms(intent: &SiteIntent, peer: &patronus_proto::intent::Peer) -> u32 {
    let overlaps = |a: &ipnet::IpNet, b: &ipnet::IpNet| a.contains(b) || b.contains(a);
    let reaches = |policy: &patronus_proto::policy::RoutingPolicy| {
        let dst = &policy.match_rules.dst_prefixes;
        dst.is_empty()
            || dst.iter().any(|d| {
                d.contains(&peer.overlay_address)
                    || peer
                        .lan_prefixes
                        .iter()
                        .chain(&peer.transit_prefixes)
                        .any(|p| overlaps(d, p))
            })
    };
    intent
        .policies
        .routing
        .iter()
        .filter(|p| p.enabled && reaches(p))
        .filter_map(|p| p.probe_interval_ms)
        .fold(intent.probe.interval_ms, u32::min)
}

/// The probe plan of an intent (pure); `uplinks` as found on the system.
pub fn plan(
    intent: &SiteIntent,
    compiled: Option<&Compiled>,
    uplinks: &[crate::desired::UplinkRoute],
) -> ProbePlan {
    let mut targets = Vec::new();
    for path in &intent.paths {
        let Some(peer) = intent.peers.iter().find(|p| p.site == path.remote_site) else {
            continue;
        };
        let endpoint = peer
            .endpoints
            .iter()
            .find(|e| e.uplink_index == path.remote_uplink)
            .zip(patronus_proto::intent::tunnel_port(
                peer.listen_port_base,
                path.remote_uplink,
                path.local_uplink,
            ))
            .map(|(e, port)| SocketAddr::new(e.ip, port));
        let interval_ms = probe_interval_ms(intent, peer);
        targets.push(Target {
            path: path.id,
            local_uplink: path.local_uplink,
            peer: peer.site,
            peer_overlay: peer.overlay_address,
            key: ProbeKey(peer.probe_key.0),
            interface: crate::desired::interface_name(
                intent.site,
                path.local_uplink,
                path.remote_uplink,
            ),
            endpoint,
            uplink_mark: crate::desired::UPLINK_BASE + u32::from(path.local_uplink),
            interval_ms,
        });
    }
    let mut class_slas = BTreeMap::new();
    if let Some(compiled) = compiled {
        for class in &compiled.classes {
            let sla = if class.sla == Sla::default() {
                intent.failover.default_sla
            } else {
                class.sla
            };
            class_slas.insert(class.id, sla);
        }
    }
    ProbePlan {
        site: intent.site,
        overlay: intent.overlay.address,
        targets,
        settings: intent.probe.clone(),
        failover: intent.failover.clone(),
        class_slas,
        uplinks: uplinks
            .iter()
            .map(|u| {
                let capacity = intent
                    .uplinks
                    .iter()
                    .find(|x| x.index == u.index)
                    .and_then(|x| x.bandwidth_mbps);
                (u.index, (u.dev.clone(), capacity))
            })
            .collect(),
        tunnel_mtu: intent.wireguard.mtu,
    }
}

/// Passive available bandwidth of an uplink (pure): its capacity less what it sent over the
/// window, never below 0; unknown without a capacity or a window.
pub fn available_mbps(capacity_mbps: Option<u32>, tx_bytes: u64, window: Duration) -> Option<f64> {
    let capacity = f64::from(capacity_mbps?);
    let seconds = window.as_secs_f64();
    if seconds <= 0.0 {
        return None;
    }
    let used = tx_bytes as f64 * 8.0 / seconds / 1e6;
    Some((capacity - used).max(0.0))
}

/// An interface's transmitted bytes (sysfs of the agent's network namespace).
fn tx_bytes(interface: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/sys/class/net/{interface}/statistics/tx_bytes"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Drop counters by reason, shared by the receive tasks.
pub type Drops = Arc<Mutex<BTreeMap<&'static str, u64>>>;

fn count(drops: &Drops, reason: &'static str) {
    if let Ok(mut d) = drops.lock() {
        *d.entry(reason).or_default() += 1;
    }
}

/// The handle the run loop keeps.
pub struct Prober {
    plans: tokio::sync::mpsc::UnboundedSender<ProbePlan>,
    pub drops: Drops,
}

impl Prober {
    /// Probe what `plan` says from now on.
    pub fn set_plan(&self, plan: ProbePlan) {
        let _ = self.plans.send(plan);
    }
}

/// Start the probing thread; it re-steers through `steerer` itself on every view change.
pub fn start(
    updates: tokio::sync::mpsc::UnboundedSender<Update>,
    steerer: crate::steerer::SharedSteerer,
) -> std::io::Result<Prober> {
    let (plans_tx, plans_rx) = tokio::sync::mpsc::unbounded_channel();
    let drops: Drops = Arc::default();
    let thread_drops = drops.clone();
    std::thread::Builder::new()
        .name("patronus-probe".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("probe: cannot start its runtime ({e}); paths are not probed");
                    return;
                }
            };
            runtime.block_on(run(plans_rx, updates, thread_drops, steerer));
        })?;
    Ok(Prober {
        plans: plans_tx,
        drops,
    })
}

/// A UDP socket on `overlay:PROBE_PORT` bound to `interface`.
fn open_socket(interface: &str, overlay: IpAddr) -> std::io::Result<tokio::net::UdpSocket> {
    tokio::net::UdpSocket::from_std(bound_socket(interface, overlay, PROBE_PORT)?)
}

/// A non-blocking UDP socket on `overlay:port` bound to `interface` (port 0: an ephemeral
/// one, for `patronus-edge probe`).
fn bound_socket(
    interface: &str,
    overlay: IpAddr,
    port: u16,
) -> std::io::Result<std::net::UdpSocket> {
    let family = if overlay.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the descriptor is owned by the UdpSocket below or closed on
    // every error path by the guard.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own; from here the UdpSocket closes it.
    let socket = unsafe { std::net::UdpSocket::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let set = |level, name, value: *const libc::c_void, len: usize| -> std::io::Result<()> {
        // SAFETY: value points at `len` readable bytes for the duration of the call.
        let rc = unsafe { libc::setsockopt(fd, level, name, value, len as libc::socklen_t) };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // Every tunnel has a socket on the same address and port, told apart by the device.
    set(
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        (&one as *const libc::c_int).cast(),
        std::mem::size_of::<libc::c_int>(),
    )?;
    set(
        libc::SOL_SOCKET,
        libc::SO_BINDTODEVICE,
        interface.as_ptr().cast(),
        interface.len(),
    )?;
    bind(fd, SocketAddr::new(overlay, port))?;
    Ok(socket)
}

/// bind(2) on a raw socket (std binds only sockets it creates itself).
fn bind(fd: libc::c_int, address: SocketAddr) -> std::io::Result<()> {
    // SAFETY: sockaddr_in/sockaddr_in6 are plain C structs; zeroed is a valid value, and
    // the pointer passed to bind(2) covers exactly the length given.
    let rc = unsafe {
        match address {
            SocketAddr::V4(v4) => {
                let mut sa: libc::sockaddr_in = std::mem::zeroed();
                sa.sin_family = libc::AF_INET as libc::sa_family_t;
                sa.sin_port = v4.port().to_be();
                sa.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
                libc::bind(
                    fd,
                    (&sa as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
            SocketAddr::V6(v6) => {
                let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
                sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sa.sin6_port = v6.port().to_be();
                sa.sin6_addr.s6_addr = v6.ip().octets();
                libc::bind(
                    fd,
                    (&sa as *const libc::sockaddr_in6).cast(),
                    std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        }
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// What a receive task hands over: a reply to one of our probes, or the news that the peer
/// probed the path itself (evidence between our probes; see `PathProber::on_peer_probe`).
enum Incoming {
    Reply(Reply),
    PeerProbe {
        interface: String,
        from: IpAddr,
        at: Duration,
    },
}

/// A reply as a receive task hands it over.
struct Reply {
    interface: String,
    from: IpAddr,
    /// 0 for the liveness probes; [`MTU_PROBE_TAG`] for the full-size ones.
    path_tag: u32,
    sequence: u64,
    hold: Duration,
    at: Duration,
}

/// The reflector's replay windows, one per (sender, path tag). The agent's own probes carry
/// even tags (0 for liveness, [`MTU_PROBE_TAG`] for full-size probes); `patronus-edge probe`
/// picks a random odd tag per run, so an operator's probes (whose
/// sequences come from another clock) neither shift the agent's window (which would make the
/// agent's next probes "too old" and its path look dead) nor are refused by it. The tag is
/// covered by the signature, so a replayed probe always lands in its original's window.
#[derive(Default)]
struct ReplayWindows {
    windows: BTreeMap<(IpAddr, u32), (ReplayWindow, u64)>,
    uses: u64,
}

impl ReplayWindows {
    /// Windows of operator runs kept per socket; past that the least recently used one
    /// (never an agent's: even tags) is forgotten.
    const MAX_TAGGED: usize = 64;

    fn window(&mut self, from: IpAddr, tag: u32) -> &mut ReplayWindow {
        self.uses += 1;
        let key = (from, tag);
        let operator = |tag: u32| tag & 1 == 1;
        if !self.windows.contains_key(&key) && operator(tag) {
            let tagged = self.windows.keys().filter(|(_, t)| operator(*t)).count();
            if tagged >= Self::MAX_TAGGED {
                let oldest = self
                    .windows
                    .iter()
                    .filter(|((_, t), _)| operator(*t))
                    .min_by_key(|(_, (_, used))| *used)
                    .map(|(k, _)| *k);
                if let Some(oldest) = oldest {
                    self.windows.remove(&oldest);
                }
            }
        }
        let uses = self.uses;
        let entry = self.windows.entry(key).or_default();
        entry.1 = uses;
        &mut entry.0
    }
}

/// Receive on one tunnel's socket: answer requests, hand replies over.
async fn receive(
    interface: String,
    socket: Arc<tokio::net::UdpSocket>,
    keys: Arc<RwLock<BTreeMap<IpAddr, ProbeKey>>>,
    replies: tokio::sync::mpsc::UnboundedSender<Incoming>,
    drops: Drops,
    epoch: Instant,
) {
    let mut buffer = vec![0u8; RECV_BUFFER];
    let mut windows = ReplayWindows::default();
    let mut out = Vec::with_capacity(128);
    loop {
        let (len, from) = match socket.recv_from(&mut buffer).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("probe: receiving on {interface} failed: {e}; stopped");
                return;
            }
        };
        let received = epoch.elapsed();
        let decoded = match probe::decode(&buffer[..len]) {
            Ok(d) => d,
            Err(e) => {
                count(&drops, e.reason());
                continue;
            }
        };
        let key = keys.read().ok().and_then(|k| k.get(&from.ip()).cloned());
        let Some(key) = key else {
            count(&drops, "unknown_peer");
            continue;
        };
        if let Err(e) = decoded.verify(&key) {
            count(&drops, e.reason());
            continue;
        }
        let packet = decoded.packet;
        match packet.kind {
            ProbeKind::Request => {
                if let Err(e) = windows
                    .window(from.ip(), packet.path_tag)
                    .check_and_set(packet.sequence)
                {
                    count(&drops, e.reason());
                    continue;
                }
                let hold = epoch.elapsed().saturating_sub(received);
                let reply = packet.reply(
                    epoch.elapsed().as_nanos() as u64,
                    u32::try_from(hold.as_nanos()).unwrap_or(u32::MAX),
                    rand::random(),
                );
                if reply.encode_into(Some(&key), &mut out).is_ok() {
                    let _ = socket.send_to(&out, from).await;
                }
                if packet.path_tag == 0 {
                    let _ = replies.send(Incoming::PeerProbe {
                        interface: interface.clone(),
                        from: from.ip(),
                        at: received,
                    });
                }
            }
            ProbeKind::Reply => {
                let _ = replies.send(Incoming::Reply(Reply {
                    interface: interface.clone(),
                    from: from.ip(),
                    path_tag: packet.path_tag,
                    sequence: packet.sequence,
                    hold: Duration::from_nanos(u64::from(packet.reflector_hold_ns)),
                    at: received,
                }));
            }
        }
    }
}

/// One probed path.
struct Probed {
    target: Target,
    prober: PathProber,
    health: PathHealth,
    gates: BTreeMap<u16, SlaGate>,
    view: PathView,
    /// Totals at the last sample (samples carry the window's difference).
    sampled: (u64, u64),
    pmtu: PmtuState,
    /// Full-size probes sent (their own sequence space, under [`MTU_PROBE_TAG`]).
    mtu_probes: u64,
    /// A sibling on the same local uplink went down and this path has not answered since.
    suspect: bool,
}

/// Sequence numbers start from the wall clock in microseconds, so a restarted agent's
/// requests are above what the peers' replay windows saw from its previous run.
fn sequence_base() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct State {
    plan: Option<ProbePlan>,
    paths: BTreeMap<PathId, Probed>,
    sockets: BTreeMap<String, (Arc<tokio::net::UdpSocket>, tokio::task::JoinHandle<()>)>,
    keys: Arc<RwLock<BTreeMap<IpAddr, ProbeKey>>>,
    updates: tokio::sync::mpsc::UnboundedSender<Update>,
    replies: tokio::sync::mpsc::UnboundedSender<Incoming>,
    drops: Drops,
    epoch: Instant,
    base: u64,
    out: Vec<u8>,
    views_dirty: bool,
    steerer: crate::steerer::SharedSteerer,
    /// Each uplink's transmitted bytes at the last sample.
    uplink_tx: BTreeMap<u8, (Instant, u64)>,
}

impl State {
    fn configure(&mut self, plan: ProbePlan) {
        let now = self.epoch.elapsed();
        let site_config = ProberConfig::from(&plan.settings);
        let health_config = HealthConfig::from(&plan.failover);
        if let Ok(mut keys) = self.keys.write() {
            *keys = plan
                .targets
                .iter()
                .map(|t| (t.peer_overlay, ProbeKey(t.key.0)))
                .collect();
        }
        let wanted: BTreeSet<PathId> = plan.targets.iter().map(|t| t.path).collect();
        self.paths.retain(|id, _| wanted.contains(id));
        for target in &plan.targets {
            let prober_config = ProberConfig {
                interval: Duration::from_millis(u64::from(target.interval_ms)),
                loss_window: ProberConfig::loss_window_for(target.interval_ms),
                ..site_config
            };
            match self.paths.get_mut(&target.path) {
                Some(p) => {
                    p.target = target.clone();
                    p.prober.set_config(prober_config, now);
                    p.health.set_config(health_config);
                }
                None => {
                    self.paths.insert(
                        target.path,
                        Probed {
                            target: target.clone(),
                            prober: PathProber::new(prober_config, now),
                            health: PathHealth::new(health_config),
                            gates: BTreeMap::new(),
                            view: PathView::default(),
                            sampled: (0, 0),
                            pmtu: PmtuState::default(),
                            mtu_probes: 0,
                            suspect: false,
                        },
                    );
                }
            }
        }
        let interfaces: BTreeSet<&str> =
            plan.targets.iter().map(|t| t.interface.as_str()).collect();
        self.sockets.retain(|name, (_, task)| {
            let keep = interfaces.contains(name.as_str());
            if !keep {
                task.abort();
            }
            keep
        });
        self.plan = Some(plan);
        self.open_missing_sockets();
        self.views_dirty = true;
    }

    /// Open the sockets of tunnels that exist now (a new tunnel's interface may appear only
    /// after the apply; retried at every tick).
    fn open_missing_sockets(&mut self) {
        let Some(plan) = &self.plan else {
            return;
        };
        let overlay = plan.overlay;
        let missing: BTreeSet<String> = plan
            .targets
            .iter()
            .map(|t| t.interface.clone())
            .filter(|i| !self.sockets.contains_key(i))
            .collect();
        for interface in missing {
            match open_socket(&interface, overlay) {
                Ok(socket) => {
                    let socket = Arc::new(socket);
                    let task = tokio::spawn(receive(
                        interface.clone(),
                        socket.clone(),
                        self.keys.clone(),
                        self.replies.clone(),
                        self.drops.clone(),
                        self.epoch,
                    ));
                    self.sockets.insert(interface, (socket, task));
                }
                // ENODEV: the tunnel is not there yet; EADDRNOTAVAIL: no overlay address yet.
                Err(_) => continue,
            }
        }
    }

    fn next_deadline(&self) -> Duration {
        self.paths
            .values()
            .map(|p| p.prober.next_deadline())
            .min()
            .unwrap_or(self.epoch.elapsed() + Duration::from_secs(1))
    }

    /// Send due probes and expire lost ones.
    async fn tick(&mut self) {
        let now = self.epoch.elapsed();
        let ids: Vec<PathId> = self.paths.keys().copied().collect();
        for id in ids {
            let Some(p) = self.paths.get_mut(&id) else {
                continue;
            };
            let poll = p.prober.poll(now);
            if let Some(sequence) = poll.send {
                let request = ProbePacket {
                    kind: ProbeKind::Request,
                    mtu_probe: false,
                    path_tag: 0,
                    sequence: self.base.wrapping_add(sequence),
                    sent_ns: now.as_nanos() as u64,
                    echo_sent_ns: 0,
                    reflector_hold_ns: 0,
                    nonce: rand::random(),
                    pad_len: 0,
                };
                if let (Some((socket, _)), Ok(())) = (
                    self.sockets.get(&p.target.interface),
                    request.encode_into(Some(&p.target.key), &mut self.out),
                ) {
                    // A send error (tunnel gone) is a lost probe, found by its timeout.
                    let _ = socket
                        .send_to(
                            &self.out,
                            SocketAddr::new(p.target.peer_overlay, PROBE_PORT),
                        )
                        .await;
                }
            }
            if poll.lost > 0 || poll.liveness_changed.is_some() {
                self.evaluate(id, now);
            }
        }
    }

    /// The peer probed one of our paths: evidence for the prober of that path.
    fn on_peer_probe(&mut self, interface: &str, from: IpAddr, at: Duration) {
        if let Some(p) = self
            .paths
            .values_mut()
            .find(|p| p.target.interface == interface && p.target.peer_overlay == from)
        {
            p.prober.on_peer_probe(at);
        }
    }

    fn on_reply(&mut self, reply: Reply) {
        if reply.path_tag != 0 {
            // A full-size probe came back: it only exists to make the kernel learn the path
            // MTU (the MTU is read from the kernel), and its timing is not a liveness sample.
            return;
        }
        let Some(id) = self
            .paths
            .iter()
            .find(|(_, p)| {
                p.target.interface == reply.interface && p.target.peer_overlay == reply.from
            })
            .map(|(id, _)| *id)
        else {
            count(&self.drops, "unknown_path");
            return;
        };
        let Some(p) = self.paths.get_mut(&id) else {
            return;
        };
        let Some(sequence) = reply.sequence.checked_sub(self.base) else {
            count(&self.drops, "unknown_sequence");
            return;
        };
        match p.prober.on_reply(reply.at, sequence, reply.hold) {
            ReplyOutcome::Accepted { .. } => {
                p.suspect = false;
                self.evaluate(id, reply.at)
            }
            ReplyOutcome::Late => count(&self.drops, "late"),
            ReplyOutcome::Duplicate => count(&self.drops, "duplicate_reply"),
            ReplyOutcome::Unknown => count(&self.drops, "unknown_sequence"),
        }
    }

    /// Recompute one path's health and view; report transitions.
    fn evaluate(&mut self, id: PathId, now: Duration) {
        let Some(plan) = &self.plan else {
            return;
        };
        let hold_down = Duration::from_millis(u64::from(plan.failover.failback_hold_down_ms));
        let Some(p) = self.paths.get_mut(&id) else {
            return;
        };
        let stats = p.prober.stats();
        let measured = p.prober.liveness() != Liveness::Unknown;
        let score = health_score(&stats);
        // The local uplink whose other paths become suspect (this one just went down).
        let mut suspects = None;
        if let Some(transition) = p.health.update(
            now,
            p.prober.liveness(),
            score,
            p.prober.consecutive_losses(),
        ) {
            let event = match transition.to {
                Health::Down => Some(SdwanEvent::PathFailed {
                    path: id,
                    reason: transition.reason.clone(),
                }),
                Health::Degraded => Some(SdwanEvent::PathDegraded {
                    path: id,
                    metrics: metrics_of(&stats, score),
                }),
                Health::Up if transition.from != Health::Unknown => {
                    Some(SdwanEvent::PathEstablished {
                        path: id,
                        src: plan.site,
                        dst: p.target.peer,
                    })
                }
                _ => None,
            };
            eprintln!(
                "probe: path {id} via {} {:?} -> {:?}: {}",
                p.target.interface, transition.from, transition.to, transition.reason
            );
            if let Some(event) = event {
                let _ = self.updates.send(Update::Event(event));
            }
            if transition.to == Health::Down {
                suspects = Some(p.target.local_uplink);
            }
        }
        let mut blocked = BTreeSet::new();
        for (class, sla) in &plan.class_slas {
            let meets = !measured || crate::monitor::meets_sla(sla, &stats);
            let gate = p.gates.entry(*class).or_default();
            if !gate.update(now, meets, hold_down) {
                blocked.insert(*class);
            }
        }
        let view = PathView {
            status: p.health.health().as_status(),
            preferred: p.health.preferred(now) || p.health.health() == Health::Unknown,
            latency_ms: measured.then_some(stats.latency_ms),
            jitter_ms: measured.then_some(stats.jitter_ms),
            loss_pct: measured.then_some(stats.loss_pct),
            sla_blocked: blocked,
            suspect: p.suspect,
        };
        if view.status != p.view.status
            || view.preferred != p.view.preferred
            || view.sla_blocked != p.view.sla_blocked
            || view.suspect != p.view.suspect
        {
            self.views_dirty = true;
        }
        p.view = view;
        // The uplink may have failed as a whole: its other live paths prove otherwise by
        // answering a probe sent now, and serve only as a last resort until they do.
        if let Some(uplink) = suspects {
            for (other, q) in self.paths.iter_mut() {
                if *other != id
                    && q.target.local_uplink == uplink
                    && q.prober.liveness() == Liveness::Alive
                {
                    q.suspect = true;
                    q.view.suspect = true;
                    q.prober.probe_now(now);
                    self.views_dirty = true;
                }
            }
        }
    }

    /// Steer with the current views (the failover, from this thread), then tell the run
    /// loop.
    fn send_views(&mut self) {
        let views: BTreeMap<PathId, PathView> = self
            .paths
            .iter()
            .map(|(id, p)| (*id, p.view.clone()))
            .collect();
        self.steerer.lock().set_views(views.clone());
        let _ = self.updates.send(Update::Views(views));
        self.views_dirty = false;
    }

    fn samples(&mut self) -> Vec<PathSample> {
        let mut samples = Vec::new();
        let now_ms = unix_ms();
        let mut available: BTreeMap<u8, f64> = BTreeMap::new();
        if let Some(plan) = &self.plan {
            for (index, (dev, capacity)) in &plan.uplinks {
                let Some(now_tx) = tx_bytes(dev) else {
                    continue;
                };
                let at = Instant::now();
                if let Some((then, before)) = self.uplink_tx.insert(*index, (at, now_tx)) {
                    if let Some(mbps) = available_mbps(
                        *capacity,
                        now_tx.saturating_sub(before),
                        at.duration_since(then),
                    ) {
                        available.insert(*index, mbps);
                    }
                }
            }
        }
        for (id, p) in &mut self.paths {
            if p.prober.liveness() == Liveness::Unknown && p.prober.stats().sent == 0 {
                continue;
            }
            let stats = p.prober.stats();
            let sent = stats.sent.saturating_sub(p.sampled.0);
            let lost = stats.lost.saturating_sub(p.sampled.1).min(sent);
            p.sampled = (stats.sent, stats.lost);
            let score = health_score(&stats);
            let mut metrics = metrics_of(&stats, score);
            metrics.measured_at_unix_ms = now_ms;
            metrics.bandwidth_mbps = available.get(&p.target.local_uplink).copied();
            metrics.mtu = p.pmtu.current();
            samples.push(PathSample {
                path: *id,
                status: p.health.health().as_status(),
                metrics,
                probes_sent: u32::try_from(sent).unwrap_or(u32::MAX),
                probes_lost: u32::try_from(lost).unwrap_or(u32::MAX),
            });
        }
        samples
    }
}

impl State {
    /// Read each path's MTU from the kernel (what the last full-size probes taught it) and
    /// log changes.
    fn read_path_mtus(&mut self) {
        let Some(plan) = &self.plan else {
            return;
        };
        if !plan.settings.mtu_discovery {
            return;
        }
        let tunnel_mtu = plan.tunnel_mtu;
        for (id, p) in &mut self.paths {
            let Some(endpoint) = p.target.endpoint else {
                continue;
            };
            let reading = match outer_path_mtu(endpoint, p.target.uplink_mark) {
                Ok(outer) => pmtu::inner_mtu(outer, endpoint.is_ipv6(), tunnel_mtu),
                Err(e) => {
                    count(&self.drops, "pmtu_read_failed");
                    if p.pmtu.current().is_some() {
                        eprintln!(
                            "probe: path {id}: cannot read the path MTU toward {endpoint}: {e}"
                        );
                    }
                    None
                }
            };
            if let Some(previous) = p.pmtu.observe(reading) {
                eprintln!(
                    "probe: path {id} via {} MTU {} (was {}; outer path toward {endpoint})",
                    p.target.interface,
                    reading.map_or("unknown".into(), |m| m.to_string()),
                    previous.map_or("unknown".into(), |m| m.to_string()),
                );
            }
        }
    }

    /// Send one probe per path padded to the tunnel MTU, with the agent's MTU tag.
    async fn send_mtu_probes(&mut self) {
        let Some(plan) = &self.plan else {
            return;
        };
        if !plan.settings.mtu_discovery {
            return;
        }
        let (tunnel_mtu, overlay_v6) = (plan.tunnel_mtu, plan.overlay.is_ipv6());
        let now = self.epoch.elapsed();
        for p in self.paths.values_mut() {
            let Some((socket, _)) = self.sockets.get(&p.target.interface) else {
                continue;
            };
            p.mtu_probes += 1;
            let mut request = ProbePacket {
                kind: ProbeKind::Request,
                mtu_probe: true,
                path_tag: MTU_PROBE_TAG,
                sequence: self.base.wrapping_add(p.mtu_probes),
                sent_ns: now.as_nanos() as u64,
                echo_sent_ns: 0,
                reflector_hold_ns: 0,
                nonce: rand::random(),
                pad_len: 0,
            };
            let unpadded = probe::V1_HEADER_LEN + probe::MAC_LEN;
            request.pad_len =
                u16::try_from(pmtu::probe_padding(tunnel_mtu, overlay_v6, unpadded)).unwrap_or(0);
            if request
                .encode_into(Some(&p.target.key), &mut self.out)
                .is_ok()
            {
                // Lost or refused (EMSGSIZE) full-size probes are expected: the kernel learns
                // from the ICMP answer, not from the reply.
                let _ = socket
                    .send_to(
                        &self.out,
                        SocketAddr::new(p.target.peer_overlay, PROBE_PORT),
                    )
                    .await;
            }
        }
    }
}

/// The path MTU the kernel holds toward `endpoint` for packets with firewall mark `mark`
/// (the route WireGuard's encrypted packets take): the outgoing device's MTU, lowered by
/// what "fragmentation needed" answers taught it (`IP_MTU` / `IPV6_MTU` on a connected
/// socket; nothing is sent).
/// Give the socket `fd` the firewall mark `mark` (`SO_MARK`: its packets then follow the
/// `ip rule` for that mark; needs CAP_NET_ADMIN).
pub(crate) fn set_mark(fd: libc::c_int, mark: u32) -> std::io::Result<()> {
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
    Ok(())
}

fn outer_path_mtu(endpoint: SocketAddr, mark: u32) -> std::io::Result<u32> {
    let (family, level, option) = if endpoint.is_ipv4() {
        (libc::AF_INET, libc::IPPROTO_IP, libc::IP_MTU)
    } else {
        (libc::AF_INET6, libc::IPPROTO_IPV6, libc::IPV6_MTU)
    };
    // SAFETY: plain socket(2); the descriptor is owned by the UdpSocket right after.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own; the UdpSocket closes it on every path.
    let socket = unsafe { std::net::UdpSocket::from_raw_fd(fd) };
    set_mark(fd, mark)?;
    socket.connect(endpoint)?;
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `mtu`, a c_int.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            option,
            (&mut mtu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    u32::try_from(mtu).map_err(|_| std::io::Error::other(format!("kernel reported MTU {mtu}")))
}

fn metrics_of(stats: &crate::monitor::ProbeStats, score: u8) -> PathMetrics {
    let clean = |v: f64| if v.is_finite() && v >= 0.0 { v } else { 0.0 };
    PathMetrics {
        latency_ms: clean(stats.latency_ms),
        jitter_ms: clean(stats.jitter_ms),
        packet_loss_pct: clean(stats.loss_pct).min(100.0),
        bandwidth_mbps: None,
        mtu: None,
        score: score.min(100),
        measured_at_unix_ms: unix_ms(),
    }
}

async fn run(
    mut plans: tokio::sync::mpsc::UnboundedReceiver<ProbePlan>,
    updates: tokio::sync::mpsc::UnboundedSender<Update>,
    drops: Drops,
    steerer: crate::steerer::SharedSteerer,
) {
    let (replies_tx, mut replies) = tokio::sync::mpsc::unbounded_channel();
    let epoch = Instant::now();
    let mut state = State {
        plan: None,
        paths: BTreeMap::new(),
        sockets: BTreeMap::new(),
        keys: Arc::default(),
        updates,
        replies: replies_tx,
        drops,
        epoch,
        base: sequence_base(),
        out: Vec::with_capacity(128),
        views_dirty: false,
        steerer,
        uplink_tx: BTreeMap::new(),
    };
    let mut sample = tokio::time::interval(SAMPLE_EVERY);
    let mut refresh = tokio::time::interval(VIEW_REFRESH);
    let mut sockets_retry = tokio::time::interval(Duration::from_millis(500));
    loop {
        let deadline = tokio::time::Instant::from_std(epoch + state.next_deadline());
        tokio::select! {
            plan = plans.recv() => match plan {
                Some(plan) => state.configure(plan),
                None => return, // the run loop is gone
            },
            Some(incoming) = replies.recv() => match incoming {
                Incoming::Reply(reply) => state.on_reply(reply),
                Incoming::PeerProbe { interface, from, at } => {
                    state.on_peer_probe(&interface, from, at)
                }
            },
            _ = tokio::time::sleep_until(deadline) => state.tick().await,
            _ = sample.tick() => {
                state.read_path_mtus();
                let samples = state.samples();
                if !samples.is_empty() {
                    let _ = state.updates.send(Update::Samples(samples));
                }
                state.send_mtu_probes().await;
            }
            _ = refresh.tick() => state.views_dirty = true,
            _ = sockets_retry.tick() => state.open_missing_sockets(),
        }
        if state.views_dirty {
            state.send_views();
        }
    }
}

/// How `patronus-edge probe` signs its requests. Everything but `Signed` exists to exercise
/// the peer's checks (hidden test flags): the peer is expected to drop those and count them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeMode {
    /// Signed with the site pair's key, as the agent does.
    Signed,
    /// Signed with a random key: the peer counts `bad_signature`.
    BadKey,
    /// Not signed: the peer counts `unsigned`.
    Unsigned,
    /// Every signed request sent twice: the peer answers the first and counts `replayed`.
    Replay,
}

/// What `patronus-edge probe` is asked to do.
#[derive(Debug, Clone)]
pub struct ProbeRequest {
    /// The peer's site name (or id).
    pub peer: String,
    pub uplink: Option<u8>,
    pub remote_uplink: Option<u8>,
    pub count: u32,
    pub interval: Duration,
    pub mode: ProbeMode,
}

/// One request's fate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProbeResult {
    /// 1, 2, ... in sending order.
    pub seq: u32,
    /// Round-trip time minus the reflector's hold time; `None`: no reply within the timeout.
    pub rtt_ms: Option<f64>,
}

/// The run's summary (`--json` prints it).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProbeSummary {
    pub peer: String,
    pub peer_overlay: IpAddr,
    pub interface: String,
    pub local_uplink: u8,
    pub remote_uplink: u8,
    pub mode: String,
    pub sent: u32,
    pub received: u32,
    pub results: Vec<ProbeResult>,
    pub rtt_min_ms: Option<f64>,
    pub rtt_avg_ms: Option<f64>,
    pub rtt_max_ms: Option<f64>,
}

/// Probe one path to `request.peer` from the operator's shell, as the agent probes it: a
/// socket on this site's overlay address (an ephemeral port) bound to the path's tunnel,
/// requests signed with the site pair's key from the applied intent, answered by the peer's
/// reflector through the same tunnel. `each` sees every result as it is known. Needs the
/// site's namespace and CAP_NET_RAW (SO_BINDTODEVICE), like the agent.
pub fn probe_peer(
    state: &crate::state::StateDir,
    request: &ProbeRequest,
    mut each: impl FnMut(&ProbeSummary, &ProbeResult),
) -> anyhow::Result<ProbeSummary> {
    use anyhow::Context;
    let text = state.read(crate::run::INTENT_FILE).context(
        "no applied intent in the state directory (`patronus-edge run` stores the one it applies)",
    )?;
    let intent: SiteIntent = patronus_proto::codec::decode(text.as_bytes())
        .context("the stored intent does not decode")?;
    let peer = intent
        .peers
        .iter()
        .find(|p| p.name == request.peer || p.site.0.to_string() == request.peer)
        .with_context(|| {
            let names: Vec<&str> = intent.peers.iter().map(|p| p.name.as_str()).collect();
            format!(
                "no peer {:?} in the applied intent (peers: {})",
                request.peer,
                names.join(", ")
            )
        })?;
    let path = intent
        .paths
        .iter()
        .filter(|p| p.remote_site == peer.site)
        .filter(|p| request.uplink.is_none_or(|u| p.local_uplink == u))
        .filter(|p| request.remote_uplink.is_none_or(|r| p.remote_uplink == r))
        .min_by_key(|p| (p.local_uplink, p.remote_uplink))
        .with_context(|| {
            format!(
                "no path to {} from uplink {:?} to its uplink {:?} in the applied intent",
                peer.name, request.uplink, request.remote_uplink
            )
        })?;
    let interface =
        crate::desired::interface_name(intent.site, path.local_uplink, path.remote_uplink);
    let socket = bound_socket(&interface, intent.overlay.address, 0).with_context(|| {
        format!(
            "cannot open a probe socket on {interface} (run it as root in the site's \
             namespace, with the agent's tunnels up)"
        )
    })?;
    socket.set_nonblocking(false)?;
    let key = ProbeKey(peer.probe_key.0);
    let signing = match request.mode {
        ProbeMode::Signed | ProbeMode::Replay => Some(ProbeKey(peer.probe_key.0)),
        ProbeMode::BadKey => Some(ProbeKey(rand::random())),
        ProbeMode::Unsigned => None,
    };
    let mut summary = ProbeSummary {
        peer: peer.name.clone(),
        peer_overlay: peer.overlay_address,
        interface,
        local_uplink: path.local_uplink,
        remote_uplink: path.remote_uplink,
        mode: format!("{:?}", request.mode).to_lowercase(),
        sent: 0,
        received: 0,
        results: Vec::new(),
        rtt_min_ms: None,
        rtt_avg_ms: None,
        rtt_max_ms: None,
    };
    let to = SocketAddr::new(peer.overlay_address, PROBE_PORT);
    let timeout = request.interval.max(Duration::from_secs(1));
    // A tag of its own, so the peer keeps a replay window for this run apart from the
    // agent's (see `ReplayWindows`).
    let tag = rand::random::<u32>() | 1;
    let base = sequence_base();
    let epoch = Instant::now();
    // Sequence offset → (sent at, since epoch).
    let mut pending: BTreeMap<u32, Duration> = BTreeMap::new();
    let mut results: BTreeMap<u32, Option<f64>> = BTreeMap::new();
    let mut out = Vec::with_capacity(128);
    let mut buffer = vec![0u8; RECV_BUFFER];
    let mut next = 0u32;
    let resolve = |summary: &mut ProbeSummary,
                   results: &mut BTreeMap<u32, Option<f64>>,
                   seq: u32,
                   rtt: Option<f64>,
                   each: &mut dyn FnMut(&ProbeSummary, &ProbeResult)| {
        results.insert(seq, rtt);
        if rtt.is_some() {
            summary.received += 1;
        }
        each(summary, &ProbeResult { seq, rtt_ms: rtt });
    };
    while next < request.count || !pending.is_empty() {
        let now = epoch.elapsed();
        if next < request.count && now >= request.interval * next {
            next += 1;
            let sent_at = epoch.elapsed();
            let packet = ProbePacket {
                kind: ProbeKind::Request,
                mtu_probe: false,
                path_tag: tag,
                sequence: base.wrapping_add(u64::from(next)),
                sent_ns: sent_at.as_nanos() as u64,
                echo_sent_ns: 0,
                reflector_hold_ns: 0,
                nonce: rand::random(),
                pad_len: 0,
            };
            packet
                .encode_into(signing.as_ref(), &mut out)
                .map_err(|e| anyhow::anyhow!("encoding a probe: {e}"))?;
            socket
                .send_to(&out, to)
                .with_context(|| format!("sending a probe to {to}"))?;
            if request.mode == ProbeMode::Replay {
                socket
                    .send_to(&out, to)
                    .with_context(|| format!("sending a probe to {to} again"))?;
            }
            summary.sent += 1;
            pending.insert(next, sent_at);
            continue;
        }
        // Expire what waited too long, then wait for a reply until the next thing to do.
        let expired: Vec<u32> = pending
            .iter()
            .filter(|(_, sent)| now >= **sent + timeout)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in expired {
            pending.remove(&seq);
            resolve(&mut summary, &mut results, seq, None, &mut each);
        }
        let next_send = (next < request.count).then(|| request.interval * next);
        let next_expiry = pending.values().map(|sent| *sent + timeout).min();
        let Some(wake) = [next_send, next_expiry].into_iter().flatten().min() else {
            break;
        };
        let wait = wake.saturating_sub(epoch.elapsed());
        if wait.is_zero() {
            continue;
        }
        socket.set_read_timeout(Some(wait))?;
        let (len, from) = match socket.recv_from(&mut buffer) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(e).context("receiving replies"),
        };
        let at = epoch.elapsed();
        let Ok(decoded) = probe::decode(&buffer[..len]) else {
            continue;
        };
        if from.ip() != peer.overlay_address || decoded.verify(&key).is_err() {
            continue;
        }
        let reply = decoded.packet;
        if reply.kind != ProbeKind::Reply || reply.path_tag != tag {
            continue;
        }
        let Some(seq) = reply
            .sequence
            .checked_sub(base)
            .and_then(|s| u32::try_from(s).ok())
        else {
            continue;
        };
        if let Some(sent_at) = pending.remove(&seq) {
            let rtt = at
                .saturating_sub(sent_at)
                .saturating_sub(Duration::from_nanos(u64::from(reply.reflector_hold_ns)));
            resolve(
                &mut summary,
                &mut results,
                seq,
                Some(rtt.as_secs_f64() * 1000.0),
                &mut each,
            );
        }
    }
    let rtts: Vec<f64> = results.values().flatten().copied().collect();
    if !rtts.is_empty() {
        summary.rtt_min_ms = rtts.iter().copied().reduce(f64::min);
        summary.rtt_max_ms = rtts.iter().copied().reduce(f64::max);
        summary.rtt_avg_ms = Some(rtts.iter().sum::<f64>() / rtts.len() as f64);
    }
    summary.results = results
        .into_iter()
        .map(|(seq, rtt_ms)| ProbeResult { seq, rtt_ms })
        .collect();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_has_one_target_per_path_on_its_tunnel() {
        let intent: SiteIntent = serde_json::from_value(serde_json::json!({
            "schema_version": "1.0", "tenant": uuid::Uuid::nil(), "site": uuid::Uuid::from_u128(0xab),
            "site_name": "a", "revision": 1, "generated_at_unix_ms": 0,
            "overlay": {"address": "100.64.0.1", "network": "100.64.0.0/16", "lan_prefixes": []},
            "uplinks": [{"index": 0, "name": "wan0", "kind": "fiber", "cost_per_gb": 0.0, "metered": false}],
            "wireguard": {"public_key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "listen_port_base": 51820, "mtu": 1420, "persistent_keepalive_s": 25},
            "peers": [{"site": uuid::Uuid::from_u128(2), "name": "b", "public_key": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
                       "overlay_address": "100.64.0.2", "lan_prefixes": [], "endpoints": [{"uplink_index": 1, "ip": "198.18.0.9"}],
                       "listen_port_base": 51820, "probe_key": "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI="}],
            "paths": [{"id": uuid::Uuid::from_u128(7), "local_uplink": 0, "remote_site": uuid::Uuid::from_u128(2), "remote_uplink": 1},
                      {"id": uuid::Uuid::from_u128(8), "local_uplink": 0, "remote_site": uuid::Uuid::from_u128(3), "remote_uplink": 0}]
        }))
        .expect("an intent");
        let plan = plan(&intent, None, &[]);
        assert_eq!(
            plan.targets.len(),
            1,
            "a path to an unknown peer is skipped"
        );
        let t = &plan.targets[0];
        assert_eq!(t.path, PathId(uuid::Uuid::from_u128(7)));
        assert_eq!(t.peer_overlay, "100.64.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(
            t.interface,
            crate::desired::interface_name(intent.site, 0, 1)
        );
        assert_eq!(t.key.0, [2; 32]);
        // The outer destination and mark the path MTU is read with: the peer's uplink 1 at
        // its tunnel port toward our uplink 0, and our uplink 0's mark.
        assert_eq!(
            t.endpoint,
            Some(SocketAddr::new(
                "198.18.0.9".parse().unwrap(),
                patronus_proto::intent::tunnel_port(51820, 1, 0).unwrap()
            ))
        );
        assert_eq!(t.uplink_mark, crate::desired::UPLINK_BASE);
        assert_eq!((t.interval_ms, plan.tunnel_mtu), (1000, 1420));
    }

    #[test]
    fn a_policy_probes_the_paths_its_traffic_can_take_faster() {
        let peer = |n: u128, lan: &str| {
            serde_json::json!({"site": uuid::Uuid::from_u128(n), "name": format!("p{n}"),
                "public_key": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
                "overlay_address": format!("100.64.0.{n}"), "lan_prefixes": [lan], "endpoints": [],
                "listen_port_base": 51820, "probe_key": "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI="})
        };
        let policy = |n: u128, dst: &[&str], interval: Option<u32>, enabled: bool| {
            serde_json::json!({"id": uuid::Uuid::from_u128(n), "name": format!("p{n}"), "priority": 10,
                "enabled": enabled, "match": {"dst_prefixes": dst}, "app_class": "voip",
                "path_preference": {"kind": "lowest_latency"}, "probe_interval_ms": interval})
        };
        let intent = |routing: Vec<serde_json::Value>| -> SiteIntent {
            serde_json::from_value(serde_json::json!({
                "schema_version": "1.0", "tenant": uuid::Uuid::nil(), "site": uuid::Uuid::from_u128(1),
                "site_name": "a", "revision": 1, "generated_at_unix_ms": 0,
                "overlay": {"address": "100.64.0.1", "network": "100.64.0.0/16", "lan_prefixes": []},
                "uplinks": [],
                "wireguard": {"public_key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "listen_port_base": 51820, "mtu": 1420, "persistent_keepalive_s": 25},
                "peers": [peer(2, "10.2.0.0/24"), peer(3, "10.3.0.0/24")],
                "paths": [],
                "policies": {"routing": routing}
            }))
            .expect("an intent")
        };
        let intervals = |i: &SiteIntent| -> Vec<u32> {
            i.peers.iter().map(|p| probe_interval_ms(i, p)).collect()
        };
        assert_eq!(intervals(&intent(vec![])), [1000, 1000]);
        // No destination prefixes: every peer.
        assert_eq!(
            intervals(&intent(vec![policy(1, &[], Some(20), true)])),
            [20, 20]
        );
        // Only the peer whose LAN the policy's destination covers (or lies inside).
        assert_eq!(
            intervals(&intent(vec![policy(1, &["10.2.0.0/16"], Some(20), true)])),
            [20, 1000]
        );
        assert_eq!(
            intervals(&intent(vec![policy(1, &["10.3.0.128/25"], Some(50), true)])),
            [1000, 50]
        );
        // The smallest wins; a disabled policy and one without an interval do not count;
        // a policy never slows the site's own interval down.
        assert_eq!(
            intervals(&intent(vec![
                policy(1, &[], Some(100), true),
                policy(2, &["10.2.0.0/24"], Some(10), false),
                policy(3, &["10.3.0.0/24"], None, true),
                policy(4, &["10.3.0.0/24"], Some(5000), true),
            ])),
            [100, 100]
        );
    }

    #[test]
    fn available_bandwidth_is_capacity_less_what_was_sent() {
        // 100 Mbit/s uplink that sent 25 MB in 4 s (50 Mbit/s).
        assert_eq!(
            available_mbps(Some(100), 25_000_000, Duration::from_secs(4)),
            Some(50.0)
        );
        assert_eq!(
            available_mbps(Some(10), 25_000_000, Duration::from_secs(4)),
            Some(0.0)
        );
        assert_eq!(available_mbps(None, 1, Duration::from_secs(1)), None);
        assert_eq!(available_mbps(Some(10), 1, Duration::ZERO), None);
    }

    #[test]
    fn operator_probes_keep_a_replay_window_apart_from_the_agents() {
        let peer: IpAddr = "100.64.0.2".parse().unwrap();
        let mut windows = ReplayWindows::default();
        // The agent's probes: sequences from its start time, rising slowly.
        for seq in 1_000..1_010 {
            assert!(windows.window(peer, 0).check_and_set(seq).is_ok());
        }
        // An operator's run with sequences far above (another clock) and its own tag.
        assert!(windows.window(peer, 7).check_and_set(9_000_000).is_ok());
        assert_eq!(
            windows.window(peer, 7).check_and_set(9_000_000),
            Err(crate::monitor::ReplayError::Replayed)
        );
        // ... did not move the agent's window: its next probe is still fresh.
        assert!(windows.window(peer, 0).check_and_set(1_010).is_ok());
        assert_eq!(
            windows.window(peer, 0).check_and_set(1_005),
            Err(crate::monitor::ReplayError::Replayed)
        );
    }

    #[test]
    fn operator_windows_are_bounded_and_never_evict_the_agents() {
        let peer: IpAddr = "100.64.0.2".parse().unwrap();
        let mut windows = ReplayWindows::default();
        assert!(windows.window(peer, 0).check_and_set(5).is_ok());
        assert!(windows.window(peer, MTU_PROBE_TAG).check_and_set(7).is_ok());
        // Operators' runs use odd tags.
        for run in 0..(ReplayWindows::MAX_TAGGED as u32 * 3) {
            assert!(windows.window(peer, 2 * run + 1).check_and_set(1).is_ok());
        }
        assert_eq!(windows.windows.len(), ReplayWindows::MAX_TAGGED + 2);
        assert_eq!(
            windows.window(peer, 0).check_and_set(5),
            Err(crate::monitor::ReplayError::Replayed),
            "the agent's window was forgotten"
        );
        assert_eq!(
            windows.window(peer, MTU_PROBE_TAG).check_and_set(7),
            Err(crate::monitor::ReplayError::Replayed),
            "the agent's full-size probe window was forgotten"
        );
    }
}
