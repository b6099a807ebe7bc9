//! The I/O side of [`crate::desired`]: observe this site's tunnels, routes and rules in the
//! current network namespace, and execute [`Action`]s.
//!
//! WireGuard interfaces are the kernel's (an rtnetlink `wireguard` link) where the module
//! exists, otherwise `wireguard-go` processes ([`WgBackend`], chosen by configuration, `auto`
//! probing once). Either way `wireguard-control` configures them: through the UAPI socket of
//! a userspace interface, through netlink for a kernel one ([`api_for`] tells which an
//! interface is). Links, addresses, routes and rules go through route netlink
//! ([`crate::netlink`]). Only objects named with this site's interface prefix (and the
//! agent's tables and marks) are observed or touched.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipnet::IpNet;
use patronus_proto::{SiteId, WgPublicKey};
use wireguard_control::{Backend, Device, DeviceUpdate, InterfaceName, Key, PeerConfigBuilder};

use crate::desired::{
    Action, InterfaceState, MarkRule, NetState, PeerState, Route, UplinkRoute, TABLE_BASE,
    UPLINK_BASE,
};
use crate::netlink::{Netlink, RouteSpec, RuleEntry};
use crate::state::Identity;

/// How new WireGuard interfaces are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WgBackend {
    Kernel,
    Userspace,
}

/// What the configuration asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    Auto,
    Kernel,
    Userspace,
}

/// Decide the backend: `auto` tries to create (and deletes) a kernel WireGuard interface.
pub fn resolve_backend(netlink: &Netlink, choice: BackendChoice) -> anyhow::Result<WgBackend> {
    let kernel_works = || {
        let probe = format!("pwprobe{}", std::process::id() % 100_000);
        let made = netlink.add_wireguard(&probe).is_ok();
        if made {
            let _ = netlink.delete_link(&probe);
        }
        made
    };
    match choice {
        BackendChoice::Userspace => Ok(WgBackend::Userspace),
        BackendChoice::Kernel if kernel_works() => Ok(WgBackend::Kernel),
        BackendChoice::Kernel => bail!(
            "wireguard.backend = kernel, but this kernel cannot create WireGuard interfaces (no module); use auto or userspace"
        ),
        BackendChoice::Auto if kernel_works() => Ok(WgBackend::Kernel),
        BackendChoice::Auto => {
            eprintln!("wireguard: the kernel has no WireGuard module; using userspace wireguard-go");
            Ok(WgBackend::Userspace)
        }
    }
}

/// The API an existing interface answers on: a userspace one has a UAPI socket.
pub fn api_for(name: &str) -> Backend {
    if std::path::Path::new(&format!("/var/run/wireguard/{name}.sock")).exists() {
        Backend::Userspace
    } else {
        Backend::Kernel
    }
}

/// `pw<site 8 hex>-`: every interface of this site starts so.
pub fn prefix(site: SiteId) -> String {
    crate::desired::interface_name(site, 0, 0)
        .trim_end_matches("00")
        .to_owned()
}

fn iface(name: &str) -> anyhow::Result<InterfaceName> {
    name.parse()
        .map_err(|e| anyhow::anyhow!("interface name {name:?}: {e:?}"))
}

/// Interface names by index.
fn names(netlink: &Netlink) -> anyhow::Result<BTreeMap<u32, String>> {
    Ok(netlink
        .links()?
        .into_iter()
        .map(|l| (l.index, l.name))
        .collect())
}

/// The interfaces holding an address inside one of `prefixes` (the site's LAN side).
pub fn interfaces_with_address_in(
    netlink: &Netlink,
    prefixes: &[IpNet],
) -> anyhow::Result<Vec<String>> {
    let names = names(netlink)?;
    let mut found: Vec<String> = Vec::new();
    for address in netlink.addresses()? {
        if !prefixes.iter().any(|p| p.contains(&address.net.addr())) {
            continue;
        }
        if let Some(name) = names.get(&address.link) {
            if !found.contains(name) {
                found.push(name.clone());
            }
        }
    }
    Ok(found)
}

/// What the namespace holds for this site's tunnels.
pub fn observe(netlink: &Netlink, site: SiteId) -> anyhow::Result<NetState> {
    let prefix = prefix(site);
    let mut state = NetState::default();
    let links = netlink.links()?;
    let addresses = netlink.addresses()?;
    for link in links.iter().filter(|l| l.name.starts_with(&prefix)) {
        let name = link.name.as_str();
        let mut interface = InterfaceState {
            mtu: u16::try_from(link.mtu).unwrap_or(u16::MAX),
            address: addresses
                .iter()
                .find(|a| a.link == link.index)
                .map(|a| a.net),
            ..Default::default()
        };
        // A link without its wireguard-go (crashed) reads as an empty interface; the diff
        // then reconfigures it.
        if let Ok(device) = Device::get(&iface(name)?, api_for(name)) {
            interface.listen_port = device.listen_port.unwrap_or(0);
            interface.fwmark = device.fwmark.unwrap_or(0);
            interface.public_key = device.public_key.map(|k| WgPublicKey(k.0));
            for peer in device.peers {
                let config = peer.config;
                let Some(endpoint) = config.endpoint else {
                    continue;
                };
                interface.peers.insert(
                    WgPublicKey(config.public_key.0),
                    PeerState {
                        endpoint,
                        allowed_ips: config
                            .allowed_ips
                            .iter()
                            .filter_map(|a| IpNet::new(a.address, a.cidr).ok())
                            .collect(),
                        keepalive_s: config.persistent_keepalive_interval.unwrap_or(0),
                    },
                );
            }
        }
        state.interfaces.insert(name.to_owned(), interface);
    }
    let names: BTreeMap<u32, &str> = links.iter().map(|l| (l.index, l.name.as_str())).collect();
    for route in netlink.routes()? {
        let Some(dev) = route.oif.and_then(|i| names.get(&i)) else {
            continue;
        };
        let ours =
            dev.starts_with(&prefix) || (UPLINK_BASE..UPLINK_BASE + 8).contains(&route.table);
        if !ours {
            continue;
        }
        state.routes.insert(Route {
            table: route.table,
            dst: route.dst,
            dev: (*dev).to_owned(),
            via: route.gateway,
            src: route.pref_src,
        });
    }
    for rule in netlink.mark_rules()? {
        if !(TABLE_BASE..TABLE_BASE + 64).contains(&rule.mark)
            && !(UPLINK_BASE..UPLINK_BASE + 8).contains(&rule.mark)
        {
            continue;
        }
        state.rules.insert(MarkRule {
            mark: rule.mark,
            table: rule.table,
            priority: rule.priority,
        });
    }
    Ok(state)
}

/// Make the interfaces `names` with `backend`. Userspace ones start side by side: every
/// `wireguard-go` is launched, then each is waited for (its exit once the daemon runs, then
/// its UAPI socket).
fn create_interfaces(netlink: &Netlink, names: &[&str], backend: WgBackend) -> anyhow::Result<()> {
    if backend == WgBackend::Kernel {
        for name in names {
            netlink.add_wireguard(name)?;
        }
        return Ok(());
    }
    let mut launched = Vec::new();
    for name in names {
        match Command::new("wireguard-go")
            .arg(name)
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            Ok(child) => launched.push((name, child)),
            Err(e) => {
                // Reap what was started before saying why the rest was not.
                for (_, mut child) in launched {
                    let _ = child.wait();
                }
                return Err(e).context("cannot run wireguard-go (scripts/setup installs it)");
            }
        }
    }
    let mut failed = None;
    for (name, mut child) in launched {
        let ok = child.wait().is_ok_and(|status| status.success());
        if !ok && failed.is_none() {
            failed = Some(name);
        }
    }
    if let Some(name) = failed {
        bail!("wireguard-go {name} failed");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for name in names {
        let socket = format!("/var/run/wireguard/{name}.sock");
        while !std::path::Path::new(&socket).exists() {
            if Instant::now() > deadline {
                bail!("wireguard-go {name} did not open {socket}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// How each of this site's uplinks is reached: the interface holding its address and the
/// gateway of a default route through that interface (in any table), if there is one.
pub fn uplink_routes(netlink: &Netlink, identity: &Identity) -> anyhow::Result<Vec<UplinkRoute>> {
    let names = names(netlink)?;
    let addresses = netlink.addresses()?;
    let routes = netlink.routes()?;
    let mut found = Vec::new();
    for (index, uplink) in identity.uplinks.iter().enumerate() {
        let Some(link) = addresses
            .iter()
            .find(|a| a.net.addr() == uplink.address)
            .map(|a| a.link)
        else {
            // Not configured here (yet): its tunnels wait.
            continue;
        };
        let Some(dev) = names.get(&link) else {
            continue;
        };
        let gateway = routes
            .iter()
            .filter(|r| r.dst.prefix_len() == 0 && r.oif == Some(link))
            .find_map(|r| r.gateway);
        found.push(UplinkRoute {
            index: index as u8,
            dev: dev.clone(),
            src: uplink.address,
            gateway,
        });
    }
    Ok(found)
}

/// Execute actions in order; the first failure stops and is returned. Interfaces get their
/// private key from `keys` (the site's current key, or its next one during a rotation).
///
/// Work is grouped where order allows: the new interfaces are made first and together (their
/// `wireguard-go` processes start side by side; an interface without peers sends nothing, so
/// this is safe before the rules), consecutive peer changes on one interface are one
/// WireGuard update, and a run of route or rule changes is one batch of netlink requests.
pub fn execute(
    netlink: &Netlink,
    actions: &[Action],
    keys: &crate::state::WireguardKeys,
    backend: WgBackend,
) -> anyhow::Result<()> {
    let new: Vec<&str> = actions
        .iter()
        .filter_map(|a| match a {
            Action::CreateInterface { name } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    create_interfaces(netlink, &new, backend)?;
    let mut next = 0;
    while next < actions.len() {
        let kind = batch_of(&actions[next]);
        let run = match kind {
            Batch::One => 1,
            _ => actions[next..]
                .iter()
                .take_while(|a| batch_of(a) == kind)
                .count(),
        };
        let batch = &actions[next..next + run];
        next += run;
        match kind {
            Batch::One => execute_one(netlink, &batch[0], keys)?,
            Batch::Peers(interface) => update_peers(interface, batch)?,
            Batch::AddRoutes => netlink.replace_routes(&route_specs(batch))?,
            // Gone already (its interface went first) is what we wanted.
            Batch::DeleteRoutes => netlink.delete_routes(&route_specs(batch))?,
            Batch::AddRules => netlink.add_mark_rules(&rule_entries(batch))?,
            Batch::DeleteRules => netlink.delete_mark_rules(&rule_entries(batch))?,
        }
    }
    Ok(())
}

/// Which actions go together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Batch<'a> {
    One,
    Peers(&'a str),
    AddRoutes,
    DeleteRoutes,
    AddRules,
    DeleteRules,
}

fn batch_of(action: &Action) -> Batch<'_> {
    match action {
        Action::SetPeer { interface, .. } | Action::RemovePeer { interface, .. } => {
            Batch::Peers(interface)
        }
        Action::AddRoute(_) => Batch::AddRoutes,
        Action::DeleteRoute(_) => Batch::DeleteRoutes,
        Action::AddRule(_) => Batch::AddRules,
        Action::DeleteRule(_) => Batch::DeleteRules,
        _ => Batch::One,
    }
}

fn route_specs(batch: &[Action]) -> Vec<RouteSpec> {
    batch
        .iter()
        .filter_map(|a| match a {
            Action::AddRoute(route) | Action::DeleteRoute(route) => Some(RouteSpec {
                table: route.table,
                dst: route.dst,
                dev: route.dev.clone(),
                via: route.via,
                src: route.src,
            }),
            _ => None,
        })
        .collect()
}

fn rule_entries(batch: &[Action]) -> Vec<RuleEntry> {
    batch
        .iter()
        .filter_map(|a| match a {
            Action::AddRule(rule) | Action::DeleteRule(rule) => Some(RuleEntry {
                mark: rule.mark,
                table: rule.table,
                priority: rule.priority,
            }),
            _ => None,
        })
        .collect()
}

/// The peer changes of `batch` (all on `interface`) as one WireGuard update.
fn update_peers(interface: &str, batch: &[Action]) -> anyhow::Result<()> {
    let mut update = DeviceUpdate::new();
    for action in batch {
        update = match action {
            Action::SetPeer { key, peer, .. } => {
                let mut builder = PeerConfigBuilder::new(&Key(key.0))
                    .set_endpoint(peer.endpoint)
                    .replace_allowed_ips()
                    .set_persistent_keepalive_interval(peer.keepalive_s);
                for net in &peer.allowed_ips {
                    builder = builder.add_allowed_ip(net.addr(), net.prefix_len());
                }
                update.add_peer(builder)
            }
            Action::RemovePeer { key, .. } => update.remove_peer_by_key(&Key(key.0)),
            _ => update,
        };
    }
    update
        .apply(&iface(interface)?, api_for(interface))
        .with_context(|| format!("changing {} peers on {interface}", batch.len()))
}

/// An action that is neither a creation nor part of a batch.
fn execute_one(
    netlink: &Netlink,
    action: &Action,
    keys: &crate::state::WireguardKeys,
) -> anyhow::Result<()> {
    match action {
        Action::DeleteInterface { name } => netlink.delete_link(name)?,
        Action::ConfigureInterface {
            name,
            listen_port,
            fwmark,
            mtu,
            address,
        } => {
            DeviceUpdate::new()
                .set_listen_port(*listen_port)
                .set_fwmark(*fwmark)
                .apply(&iface(name)?, api_for(name))
                .with_context(|| format!("configuring {name}"))?;
            netlink.set_mtu_up(name, u32::from(*mtu))?;
            netlink.set_only_address(name, *address)?;
        }
        Action::SetPrivateKey { name, public_key } => {
            let Some(private_key) = keys.private_for(public_key) else {
                bail!("this site holds no private key for {public_key}; cannot run {name} with it");
            };
            DeviceUpdate::new()
                .set_private_key(private_key.clone())
                .apply(&iface(name)?, api_for(name))
                .with_context(|| format!("setting the key of {name}"))?;
        }
        // Made up front by `create_interfaces`; the rest by their batches.
        Action::CreateInterface { .. }
        | Action::SetPeer { .. }
        | Action::RemovePeer { .. }
        | Action::AddRoute(_)
        | Action::DeleteRoute(_)
        | Action::AddRule(_)
        | Action::DeleteRule(_) => {}
    }
    Ok(())
}

/// Send one datagram to each peer through each interface that just got it, so WireGuard
/// starts its handshake now: if a peer's first handshake arrived before that peer was
/// configured here, WireGuard would otherwise wait its 5 s rekey timeout before retrying.
/// The datagram goes to the discard port of the peer's overlay address.
pub fn poke_new_peers(actions: &[Action]) {
    for action in actions {
        let Action::SetPeer {
            interface, peer, ..
        } = action
        else {
            continue;
        };
        let Some(target) = peer
            .allowed_ips
            .iter()
            .find(|n| n.prefix_len() == n.max_prefix_len())
            .map(|n| SocketAddr::new(n.addr(), 9))
        else {
            continue;
        };
        let bind = if target.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let Ok(socket) = std::net::UdpSocket::bind(bind) else {
            continue;
        };
        use std::os::fd::AsRawFd;
        // SAFETY: a valid socket and a buffer of the given length.
        let bound = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_BINDTODEVICE,
                interface.as_ptr().cast(),
                interface.len() as libc::socklen_t,
            )
        } == 0;
        if bound {
            let _ = socket.send_to(b"patronus", target);
        }
    }
}

/// A WireGuard session lives at most this long without a new handshake (REJECT_AFTER_TIME).
const SESSION_LIFETIME: Duration = Duration::from_secs(180);

/// Liveness from WireGuard alone (until the probes of the monitoring issue): a path (tunnel ×
/// peer) is up when its last handshake is younger than a session's lifetime; a tunnel is up
/// when one of its paths is. Returns (tunnels up, paths up, paths configured).
pub fn liveness(netlink: &Netlink, site: SiteId) -> (u32, u32, u32) {
    let now = std::time::SystemTime::now();
    let (mut tunnels_up, mut paths_up, mut paths) = (0, 0, 0);
    for device in devices(netlink, site) {
        let mut any = false;
        // A rotating peer's next key (no allowed IPs) is no path.
        for peer in device
            .peers
            .iter()
            .filter(|p| !p.config.allowed_ips.is_empty())
        {
            paths += 1;
            let fresh = peer
                .stats
                .last_handshake_time
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age < SESSION_LIFETIME);
            if fresh {
                paths_up += 1;
                any = true;
            }
        }
        tunnels_up += u32::from(any);
    }
    (tunnels_up, paths_up, paths)
}

/// This site's WireGuard devices in this namespace.
fn devices(netlink: &Netlink, site: SiteId) -> Vec<Device> {
    let prefix = prefix(site);
    netlink
        .links()
        .unwrap_or_default()
        .iter()
        .map(|link| link.name.as_str())
        .filter(|name| name.starts_with(&prefix))
        .filter_map(|name| Some((iface(name).ok()?, api_for(name))))
        .filter_map(|(name, api)| Device::get(&name, api).ok())
        .collect()
}

/// The peers among `slots` that have completed a handshake.
pub fn handshaken(slots: &[crate::handshake::PeerSlot]) -> Vec<crate::handshake::PeerSlot> {
    let mut interfaces: Vec<&str> = slots.iter().map(|s| s.interface.as_str()).collect();
    interfaces.dedup();
    let mut done = Vec::new();
    for name in interfaces {
        let Ok(device) = iface(name).and_then(|i| Ok(Device::get(&i, api_for(name))?)) else {
            continue;
        };
        for peer in &device.peers {
            if peer.stats.last_handshake_time.is_some() {
                let slot = crate::handshake::PeerSlot {
                    interface: name.to_owned(),
                    peer_key: peer.config.public_key.0,
                };
                if slots.contains(&slot) {
                    done.push(slot);
                }
            }
        }
    }
    done
}

/// Remove a peer and add it back as it was, which resets WireGuard's handshake state and its
/// one-initiation-per-5-s limit, so a fresh initiation leaves at once (see [`crate::handshake`]).
pub fn kick(slot: &crate::handshake::PeerSlot) -> anyhow::Result<()> {
    let name = iface(&slot.interface)?;
    let api = api_for(&slot.interface);
    let device = Device::get(&name, api)?;
    let Some(peer) = device
        .peers
        .iter()
        .find(|p| p.config.public_key.0 == slot.peer_key)
    else {
        return Ok(()); // Removed meanwhile: nothing to kick.
    };
    let mut builder = PeerConfigBuilder::new(&peer.config.public_key).replace_allowed_ips();
    if let Some(endpoint) = peer.config.endpoint {
        builder = builder.set_endpoint(endpoint);
    }
    if let Some(keepalive) = peer.config.persistent_keepalive_interval {
        builder = builder.set_persistent_keepalive_interval(keepalive);
    }
    for ip in &peer.config.allowed_ips {
        builder = builder.add_allowed_ip(ip.address, ip.cidr);
    }
    DeviceUpdate::new()
        .remove_peer_by_key(&peer.config.public_key)
        .apply(&name, api)
        .with_context(|| format!("removing a peer from {} to re-add it", slot.interface))?;
    DeviceUpdate::new()
        .add_peer(builder)
        .apply(&name, api)
        .with_context(|| format!("re-adding a peer on {}", slot.interface))?;
    Ok(())
}

/// One path (a peer on a tunnel interface) as WireGuard sees it.
#[derive(Debug, Clone)]
pub struct PathStat {
    pub interface: String,
    pub peer_key: [u8; 32],
    pub endpoint: Option<SocketAddr>,
    /// Since the last handshake; `None` if there never was one.
    pub handshake_age: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl PathStat {
    /// Up while the last handshake is younger than a session's lifetime.
    pub fn is_up(&self) -> bool {
        self.handshake_age.is_some_and(|age| age < SESSION_LIFETIME)
    }
}

/// Every path of this site, by interface.
pub fn path_stats(netlink: &Netlink, site: SiteId) -> Vec<PathStat> {
    let now = std::time::SystemTime::now();
    let mut stats = Vec::new();
    for device in devices(netlink, site) {
        // A rotating peer's next key (no allowed IPs) is no path.
        for peer in device
            .peers
            .iter()
            .filter(|p| !p.config.allowed_ips.is_empty())
        {
            stats.push(PathStat {
                interface: device.name.as_str_lossy().into_owned(),
                peer_key: peer.config.public_key.0,
                endpoint: peer.config.endpoint,
                handshake_age: peer
                    .stats
                    .last_handshake_time
                    .and_then(|t| now.duration_since(t).ok()),
                rx_bytes: peer.stats.rx_bytes,
                tx_bytes: peer.stats.tx_bytes,
            });
        }
    }
    stats
}

/// For each interface: whether an XDP program is attached, and in which mode.
pub fn xdp_attached(netlink: &Netlink, interfaces: &[String]) -> Vec<(String, Option<String>)> {
    let links = netlink.links().unwrap_or_default();
    interfaces
        .iter()
        .map(|name| {
            let mode = links
                .iter()
                .find(|l| &l.name == name)
                .and_then(|l| l.xdp)
                .map(str::to_owned);
            (name.clone(), mode)
        })
        .collect()
}

/// WireGuard transfer counters per interface: (received, sent) bytes.
pub fn transfer(netlink: &Netlink, site: SiteId) -> BTreeMap<String, (u64, u64)> {
    devices(netlink, site)
        .into_iter()
        .map(|d| {
            let (rx, tx) = d.peers.iter().fold((0, 0), |(rx, tx), p| {
                (rx + p.stats.rx_bytes, tx + p.stats.tx_bytes)
            });
            (d.name.as_str_lossy().into_owned(), (rx, tx))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::tests::in_new_netns;

    /// `auto` picks the kernel exactly when `kernel` is possible; `kernel` without the module
    /// is refused with what to do instead; the probe interface leaves nothing behind.
    #[test]
    fn the_backend_choice_follows_what_the_kernel_can_do() {
        in_new_netns(|| {
            let netlink = Netlink::open().expect("netlink");
            let links_before = netlink.links().expect("links").len();
            let kernel = resolve_backend(&netlink, BackendChoice::Kernel);
            let auto =
                resolve_backend(&netlink, BackendChoice::Auto).expect("auto always resolves");
            match kernel {
                Ok(backend) => {
                    assert_eq!(backend, WgBackend::Kernel);
                    assert_eq!(auto, WgBackend::Kernel);
                }
                Err(e) => {
                    assert!(e.to_string().contains("use auto or userspace"), "{e}");
                    assert_eq!(auto, WgBackend::Userspace);
                }
            }
            assert_eq!(
                resolve_backend(&netlink, BackendChoice::Userspace).expect("userspace"),
                WgBackend::Userspace
            );
            assert_eq!(netlink.links().expect("links").len(), links_before);
        });
    }

    /// What the diff asks for, executed through netlink, is what `observe` reads back: a
    /// second diff is empty (applying the same state twice makes no kernel change).
    #[test]
    fn executed_routes_and_rules_observe_as_desired() {
        in_new_netns(|| {
            let site = SiteId(uuid::Uuid::from_u128(
                0x1234_5678_0000_0000_0000_0000_0000_0001,
            ));
            let tunnel = crate::desired::interface_name(site, 0, 1);
            let netlink = Netlink::open().expect("netlink");
            netlink
                .add_test_link(&tunnel)
                .expect("a stand-in for the tunnel");
            netlink.set_mtu_up(&tunnel, 1420).expect("up");
            netlink
                // A host prefix, as the overlay address is: no connected route.
                .set_only_address(&tunnel, Some("100.64.0.1/32".parse().expect("net")))
                .expect("address");
            let mut want = observe(&netlink, site).expect("observe");
            assert!(want.routes.is_empty() && want.rules.is_empty());
            let route = |table, dst: &str| Route {
                table,
                dst: dst.parse().expect("net"),
                dev: tunnel.clone(),
                via: None,
                src: Some("100.64.0.1".parse().expect("ip")),
            };
            want.routes.insert(route(TABLE_BASE + 1, "10.2.0.0/24"));
            want.routes.insert(route(TABLE_BASE + 1, "100.64.0.2/32"));
            want.routes.insert(route(254, "10.2.0.0/24"));
            want.rules.insert(MarkRule {
                mark: TABLE_BASE + 1,
                table: TABLE_BASE + 1,
                priority: 100,
            });
            let have = observe(&netlink, site).expect("observe");
            let actions = crate::desired::diff(&want, &have);
            assert_eq!(actions.len(), 4, "{actions:?}");
            let keys = crate::state::WireguardKeys::for_tests();
            execute(&netlink, &actions, &keys, WgBackend::Userspace).expect("execute");
            let after = observe(&netlink, site).expect("observe");
            assert_eq!(after.routes, want.routes);
            assert_eq!(after.rules, want.rules);
            assert!(crate::desired::diff(&want, &after).is_empty());

            // Taking them away again leaves nothing of ours.
            let mut none = after.clone();
            none.routes.clear();
            none.rules.clear();
            execute(
                &netlink,
                &crate::desired::diff(&none, &after),
                &keys,
                WgBackend::Userspace,
            )
            .expect("execute");
            let last = observe(&netlink, site).expect("observe");
            assert!(last.routes.is_empty() && last.rules.is_empty(), "{last:?}");
        });
    }
}
