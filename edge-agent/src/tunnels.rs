//! The I/O side of [`crate::desired`]: observe this site's tunnels, routes and rules in the
//! current network namespace, and execute [`Action`]s.
//!
//! WireGuard interfaces are the kernel's (`ip link add … type wireguard`) where the module
//! exists, otherwise `wireguard-go` processes ([`WgBackend`], chosen by configuration, `auto`
//! probing once). Either way `wireguard-control` configures them: through the UAPI socket of
//! a userspace interface, through netlink for a kernel one ([`api_for`] tells which an
//! interface is). Interfaces, addresses, routes and rules go through iproute2 (`ip -j` for
//! reading). Only objects named with this site's interface prefix are observed or touched.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
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
pub fn resolve_backend(choice: BackendChoice) -> anyhow::Result<WgBackend> {
    let kernel_works = || {
        let probe = format!("pwprobe{}", std::process::id() % 100_000);
        let made = ip(&["link", "add", &probe, "type", "wireguard"]).is_ok();
        if made {
            let _ = ip(&["link", "del", &probe]);
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

fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip_json(args: &[&str]) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut all = vec!["-j"];
    all.extend_from_slice(args);
    let text = ip(&all)?;
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(&text).context("unreadable `ip -j` output")
}

fn iface(name: &str) -> anyhow::Result<InterfaceName> {
    name.parse()
        .map_err(|e| anyhow::anyhow!("interface name {name:?}: {e:?}"))
}

/// The interfaces holding an address inside one of `prefixes` (the site's LAN side).
pub fn interfaces_with_address_in(prefixes: &[IpNet]) -> anyhow::Result<Vec<String>> {
    let mut found = Vec::new();
    for link in ip_json(&["addr", "show"])? {
        let Some(name) = link["ifname"].as_str() else {
            continue;
        };
        let inside = link["addr_info"].as_array().into_iter().flatten().any(|a| {
            a["local"]
                .as_str()
                .and_then(|l| l.parse::<IpAddr>().ok())
                .is_some_and(|addr| prefixes.iter().any(|p| p.contains(&addr)))
        });
        if inside && !found.iter().any(|f| f == name) {
            found.push(name.to_owned());
        }
    }
    Ok(found)
}

/// What the namespace holds for this site's tunnels.
pub fn observe(site: SiteId) -> anyhow::Result<NetState> {
    let prefix = prefix(site);
    let mut state = NetState::default();
    for link in ip_json(&["link", "show"])? {
        let Some(name) = link["ifname"].as_str().filter(|n| n.starts_with(&prefix)) else {
            continue;
        };
        let mut interface = InterfaceState {
            mtu: link["mtu"].as_u64().unwrap_or(0) as u16,
            ..Default::default()
        };
        for addr in ip_json(&["addr", "show", "dev", name])? {
            if let Some(info) = addr["addr_info"].as_array() {
                interface.address = info
                    .iter()
                    .filter_map(|a| {
                        let ip: IpAddr = a["local"].as_str()?.parse().ok()?;
                        IpNet::new(ip, a["prefixlen"].as_u64()? as u8).ok()
                    })
                    .next();
            }
        }
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
    for route in ip_json(&["route", "show", "table", "all"])? {
        let (Some(dev), Some(dst)) = (route["dev"].as_str(), route["dst"].as_str()) else {
            continue;
        };
        if route["type"].as_str().is_some_and(|t| t != "unicast") {
            continue;
        }
        let table = match route["table"].as_str() {
            None | Some("main") => 254,
            Some(t) => match t.parse() {
                Ok(t) => t,
                Err(_) => continue,
            },
        };
        let ours = dev.starts_with(&prefix) || (UPLINK_BASE..UPLINK_BASE + 8).contains(&table);
        if !ours {
            continue;
        }
        let via: Option<IpAddr> = route["gateway"].as_str().and_then(|g| g.parse().ok());
        let dst: IpNet = if dst == "default" {
            crate::desired::default_net(via.is_some_and(|v| v.is_ipv6()))
        } else {
            match dst.parse::<IpNet>() {
                Ok(net) => net,
                Err(_) => match dst.parse::<IpAddr>() {
                    Ok(ip) => IpNet::from(ip),
                    Err(_) => continue,
                },
            }
        };
        state.routes.insert(Route {
            table,
            dst,
            dev: dev.to_owned(),
            via,
            src: route["prefsrc"].as_str().and_then(|s| s.parse().ok()),
        });
    }
    for rule in ip_json(&["rule", "show"])? {
        let Some(mark) = rule["fwmark"]
            .as_str()
            .and_then(|m| u32::from_str_radix(m.trim_start_matches("0x"), 16).ok())
        else {
            continue;
        };
        if !(TABLE_BASE..TABLE_BASE + 64).contains(&mark)
            && !(UPLINK_BASE..UPLINK_BASE + 8).contains(&mark)
        {
            continue;
        }
        let table = rule["table"]
            .as_str()
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        let priority = rule["priority"].as_u64().unwrap_or(0) as u32;
        state.rules.insert(MarkRule {
            mark,
            table,
            priority,
        });
    }
    Ok(state)
}

/// Make interface `name` with `backend`.
fn create_interface(name: &str, backend: WgBackend) -> anyhow::Result<()> {
    if backend == WgBackend::Kernel {
        ip(&["link", "add", name, "type", "wireguard"])?;
        return Ok(());
    }
    let status = Command::new("wireguard-go")
        .arg(name)
        .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .context("cannot run wireguard-go (scripts/setup installs it)")?;
    if !status.success() {
        bail!("wireguard-go {name} failed");
    }
    let socket = format!("/var/run/wireguard/{name}.sock");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::path::Path::new(&socket).exists() {
        if Instant::now() > deadline {
            bail!("wireguard-go {name} did not open {socket}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn route_args(route: &Route) -> Vec<String> {
    let mut args = vec![route.dst.to_string()];
    if let Some(via) = route.via {
        args.extend(["via".into(), via.to_string()]);
    }
    args.extend(["dev".into(), route.dev.clone()]);
    if let Some(src) = route.src {
        args.extend(["src".into(), src.to_string()]);
    }
    args.extend(["table".into(), route.table.to_string()]);
    args
}

/// How each of this site's uplinks is reached: the interface holding its address and the
/// gateway of a default route through that interface (in any table), if there is one.
pub fn uplink_routes(identity: &Identity) -> anyhow::Result<Vec<UplinkRoute>> {
    let addresses = ip_json(&["addr", "show"])?;
    let routes = ip_json(&["route", "show", "table", "all"])?;
    let mut found = Vec::new();
    for (index, uplink) in identity.uplinks.iter().enumerate() {
        let address = uplink.address.to_string();
        let Some(dev) = addresses.iter().find_map(|link| {
            let has = link["addr_info"]
                .as_array()?
                .iter()
                .any(|a| a["local"].as_str() == Some(address.as_str()));
            has.then(|| link["ifname"].as_str().map(str::to_owned))
                .flatten()
        }) else {
            // Not configured here (yet): its tunnels wait.
            continue;
        };
        let gateway = routes
            .iter()
            .filter(|r| r["dst"].as_str() == Some("default") && r["dev"].as_str() == Some(&dev))
            .find_map(|r| r["gateway"].as_str().and_then(|g| g.parse().ok()));
        found.push(UplinkRoute {
            index: index as u8,
            dev,
            src: uplink.address,
            gateway,
        });
    }
    Ok(found)
}

/// Execute actions in order; the first failure stops and is returned. Interfaces get their
/// private key from `keys` (the site's current key, or its next one during a rotation).
pub fn execute(
    actions: &[Action],
    keys: &crate::state::WireguardKeys,
    backend: WgBackend,
) -> anyhow::Result<()> {
    for action in actions {
        match action {
            Action::CreateInterface { name } => create_interface(name, backend)?,
            Action::DeleteInterface { name } => {
                ip(&["link", "del", name])?;
            }
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
                ip(&["link", "set", name, "mtu", &mtu.to_string(), "up"])?;
                ip(&["addr", "flush", "dev", name])?;
                if let Some(address) = address {
                    ip(&["addr", "add", &address.to_string(), "dev", name])?;
                }
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
            Action::SetPeer {
                interface,
                key,
                peer,
            } => {
                let mut builder = PeerConfigBuilder::new(&Key(key.0))
                    .set_endpoint(peer.endpoint)
                    .replace_allowed_ips()
                    .set_persistent_keepalive_interval(peer.keepalive_s);
                for net in &peer.allowed_ips {
                    builder = builder.add_allowed_ip(net.addr(), net.prefix_len());
                }
                DeviceUpdate::new()
                    .add_peer(builder)
                    .apply(&iface(interface)?, api_for(interface))
                    .with_context(|| format!("setting a peer on {interface}"))?;
            }
            Action::RemovePeer { interface, key } => {
                DeviceUpdate::new()
                    .remove_peer_by_key(&Key(key.0))
                    .apply(&iface(interface)?, api_for(interface))
                    .with_context(|| format!("removing a peer from {interface}"))?;
            }
            Action::AddRoute(route) => {
                let mut args = vec!["route".to_owned(), "replace".to_owned()];
                args.extend(route_args(route));
                ip(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
            }
            Action::DeleteRoute(route) => {
                let mut args = vec!["route".to_owned(), "del".to_owned()];
                args.extend(route_args(route));
                // Gone already (its interface went first) is what we wanted.
                let _ = ip(&args.iter().map(String::as_str).collect::<Vec<_>>());
            }
            Action::AddRule(rule) => {
                ip(&[
                    "rule",
                    "add",
                    "fwmark",
                    &rule.mark.to_string(),
                    "lookup",
                    &rule.table.to_string(),
                    "priority",
                    &rule.priority.to_string(),
                ])?;
            }
            Action::DeleteRule(rule) => {
                ip(&[
                    "rule",
                    "del",
                    "fwmark",
                    &rule.mark.to_string(),
                    "lookup",
                    &rule.table.to_string(),
                    "priority",
                    &rule.priority.to_string(),
                ])?;
            }
        }
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
pub fn liveness(site: SiteId) -> (u32, u32, u32) {
    let now = std::time::SystemTime::now();
    let (mut tunnels_up, mut paths_up, mut paths) = (0, 0, 0);
    for device in devices(site) {
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
fn devices(site: SiteId) -> Vec<Device> {
    let prefix = prefix(site);
    ip_json(&["link", "show"])
        .unwrap_or_default()
        .iter()
        .filter_map(|link| link["ifname"].as_str())
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
pub fn path_stats(site: SiteId) -> Vec<PathStat> {
    let now = std::time::SystemTime::now();
    let mut stats = Vec::new();
    for device in devices(site) {
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

/// For each interface: whether an XDP program is attached, and in which mode (`ip -j link`).
pub fn xdp_attached(interfaces: &[String]) -> Vec<(String, Option<String>)> {
    let links = ip_json(&["-d", "link", "show"]).unwrap_or_default();
    interfaces
        .iter()
        .map(|name| {
            let mode = links
                .iter()
                .find(|l| l["ifname"].as_str() == Some(name))
                .and_then(|l| l.get("xdp"))
                .map(|x| match x["mode"].as_u64() {
                    Some(1) => "driver".to_owned(),
                    Some(2) => "generic".to_owned(),
                    Some(3) => "offloaded".to_owned(),
                    _ => "attached".to_owned(),
                });
            (name.clone(), mode)
        })
        .collect()
}

/// WireGuard transfer counters per interface: (received, sent) bytes.
pub fn transfer(site: SiteId) -> BTreeMap<String, (u64, u64)> {
    devices(site)
        .into_iter()
        .map(|d| {
            let (rx, tx) = d.peers.iter().fold((0, 0), |(rx, tx), p| {
                (rx + p.stats.rx_bytes, tx + p.stats.tx_bytes)
            });
            (d.name.as_str_lossy().into_owned(), (rx, tx))
        })
        .collect()
}
