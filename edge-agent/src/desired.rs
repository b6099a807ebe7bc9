//! What the kernel should hold for an intent, and the difference from what it holds (pure).
//!
//! [`desired`] turns a [`SiteIntent`] into WireGuard interfaces (one per local uplink × remote
//! uplink index, each peer on it once, as the proto's tunnel convention says), their routes
//! (one table per interface with every prefix reachable through it) and the `ip rule`s from a
//! firewall mark to each table. [`diff`] compares that with the observed [`NetState`] and
//! returns the smallest list of [`Action`]s; applying them and observing again gives an empty
//! diff, and an unchanged intent gives no action at all (so applying twice changes nothing).
//! The netlink and WireGuard modules execute actions; nothing here touches the system.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use patronus_proto::intent::tunnel_port;
use patronus_proto::{SiteId, SiteIntent, WgPublicKey};

/// The kernel's main table: each destination's default path lives here (until the data
/// plane marks flows onto other paths).
pub const MAIN_TABLE: u32 = 254;

/// First routing table (and firewall mark) of the tunnels; tunnel (l, r) uses
/// `TABLE_BASE + 8·l + r`, which also orders `ip rule` priorities.
pub const TABLE_BASE: u32 = 1000;

/// Name of the interface for (local uplink, remote uplink): `pw<site 8 hex>-<l><r>`, 13
/// characters, unique per host as long as site ids differ in their first 32 bits (the
/// userspace UAPI socket directory is shared by all namespaces).
pub fn interface_name(site: SiteId, local: u8, remote: u8) -> String {
    let hex = site.0.simple().to_string();
    format!("pw{}-{local}{remote}", &hex[..8])
}

pub fn table_of(local: u8, remote: u8) -> u32 {
    TABLE_BASE + 8 * u32::from(local) + u32::from(remote)
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerState {
    pub endpoint: SocketAddr,
    pub allowed_ips: BTreeSet<IpNet>,
    pub keepalive_s: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct InterfaceState {
    pub listen_port: u16,
    /// Mark on the encrypted packets (selects the local uplink's table).
    pub fwmark: u32,
    /// The overlay address (as a host prefix).
    pub address: Option<IpNet>,
    pub mtu: u16,
    pub peers: BTreeMap<WgPublicKey, PeerState>,
}

/// A route: `dst` through `dev` in `table`, optionally via a gateway and with a preferred
/// source address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    pub table: u32,
    pub dst: IpNet,
    pub dev: String,
    pub via: Option<IpAddr>,
    pub src: Option<IpAddr>,
}

/// First routing table and firewall mark that pin a tunnel's encrypted packets to its local
/// uplink: uplink l uses `UPLINK_BASE + l`. WireGuard's socket is bound to no address, so
/// without this every tunnel would leave by the site's default uplink (and peers would see
/// the wrong source address and roam).
pub const UPLINK_BASE: u32 = 1100;

/// `0.0.0.0/0` or `::/0`.
pub fn default_net(ipv6: bool) -> IpNet {
    if ipv6 {
        IpNet::V6(Default::default())
    } else {
        IpNet::V4(Default::default())
    }
}

/// How a local uplink is reached, as found on the system: its interface, its address and
/// its gateway (none when the uplink is on-link).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UplinkRoute {
    pub index: u8,
    pub dev: String,
    pub src: IpAddr,
    pub gateway: Option<IpAddr>,
}

/// `ip rule fwmark <mark> lookup <table> priority <priority>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MarkRule {
    pub mark: u32,
    pub table: u32,
    pub priority: u32,
}

/// The tunnel side of a site's networking, desired or observed.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NetState {
    pub interfaces: BTreeMap<String, InterfaceState>,
    pub routes: BTreeSet<Route>,
    pub rules: BTreeSet<MarkRule>,
}

/// One change to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    CreateInterface {
        name: String,
    },
    DeleteInterface {
        name: String,
    },
    /// Listen port, mark, MTU and overlay address of an interface.
    ConfigureInterface {
        name: String,
        listen_port: u16,
        fwmark: u32,
        mtu: u16,
        address: Option<IpNet>,
    },
    SetPeer {
        interface: String,
        key: WgPublicKey,
        peer: PeerState,
    },
    RemovePeer {
        interface: String,
        key: WgPublicKey,
    },
    AddRoute(Route),
    DeleteRoute(Route),
    AddRule(MarkRule),
    DeleteRule(MarkRule),
}

/// The state an intent asks for, given how this site's uplinks are reached. Tunnels of a
/// local uplink missing from `uplinks` are left out (their traffic could not leave by it).
pub fn desired(intent: &SiteIntent, uplinks: &[UplinkRoute]) -> NetState {
    let mut state = NetState::default();
    for uplink in uplinks {
        let table = UPLINK_BASE + u32::from(uplink.index);
        state.routes.insert(Route {
            table,
            dst: default_net(uplink.src.is_ipv6()),
            dev: uplink.dev.clone(),
            via: uplink.gateway,
            src: Some(uplink.src),
        });
        state.rules.insert(MarkRule {
            mark: table,
            table,
            priority: table,
        });
    }
    let overlay = IpNet::from(intent.overlay.address);
    let peers: BTreeMap<SiteId, &patronus_proto::intent::Peer> =
        intent.peers.iter().map(|p| (p.site, p)).collect();
    // Each peer's default path: its lowest (local uplink, remote uplink) tunnel.
    let mut default_path: BTreeMap<SiteId, (u8, u8)> = BTreeMap::new();
    for path in &intent.paths {
        let Some(peer) = peers.get(&path.remote_site) else {
            continue;
        };
        if !uplinks.iter().any(|u| u.index == path.local_uplink) {
            continue;
        }
        let Some(endpoint) = peer
            .endpoints
            .iter()
            .find(|e| e.uplink_index == path.remote_uplink)
        else {
            continue;
        };
        let (Some(local_port), Some(remote_port)) = (
            tunnel_port(
                intent.wireguard.listen_port_base,
                path.local_uplink,
                path.remote_uplink,
            ),
            tunnel_port(peer.listen_port_base, path.remote_uplink, path.local_uplink),
        ) else {
            continue;
        };
        let name = interface_name(intent.site, path.local_uplink, path.remote_uplink);
        let table = table_of(path.local_uplink, path.remote_uplink);
        let allowed: BTreeSet<IpNet> = std::iter::once(IpNet::from(peer.overlay_address))
            .chain(peer.lan_prefixes.iter().copied())
            .chain(peer.transit_prefixes.iter().copied())
            .collect();
        for dst in &allowed {
            state.routes.insert(Route {
                table,
                dst: *dst,
                dev: name.clone(),
                via: None,
                src: None,
            });
        }
        state.rules.insert(MarkRule {
            mark: table,
            table,
            priority: table,
        });
        let interface = state
            .interfaces
            .entry(name)
            .or_insert_with(|| InterfaceState {
                listen_port: local_port,
                fwmark: UPLINK_BASE + u32::from(path.local_uplink),
                address: Some(overlay),
                mtu: intent.wireguard.mtu,
                peers: BTreeMap::new(),
            });
        interface.peers.insert(
            peer.public_key,
            PeerState {
                endpoint: SocketAddr::new(endpoint.ip, remote_port),
                allowed_ips: allowed,
                keepalive_s: intent.wireguard.persistent_keepalive_s,
            },
        );
        let best = default_path
            .entry(peer.site)
            .or_insert((path.local_uplink, path.remote_uplink));
        *best = (*best).min((path.local_uplink, path.remote_uplink));
    }
    for (site, (local, remote)) in default_path {
        let name = interface_name(intent.site, local, remote);
        let table = table_of(local, remote);
        let through: Vec<IpNet> = state
            .routes
            .iter()
            .filter(|r| r.table == table && r.dev == name)
            .filter(|r| {
                peers.get(&site).is_some_and(|p| {
                    IpNet::from(p.overlay_address) == r.dst
                        || p.lan_prefixes.contains(&r.dst)
                        || p.transit_prefixes.contains(&r.dst)
                })
            })
            .map(|r| r.dst)
            .collect();
        for dst in through {
            state.routes.insert(Route {
                table: MAIN_TABLE,
                dst,
                dev: name.clone(),
                via: None,
                src: None,
            });
        }
    }
    state
}

/// The actions that turn `actual` into `desired`: removals of what should not be there
/// first (so a moved allowed IP is free before it is claimed), then creations and changes.
pub fn diff(desired: &NetState, actual: &NetState) -> Vec<Action> {
    let mut actions = Vec::new();
    for rule in actual.rules.difference(&desired.rules) {
        actions.push(Action::DeleteRule(*rule));
    }
    for route in actual.routes.difference(&desired.routes) {
        actions.push(Action::DeleteRoute(route.clone()));
    }
    for (name, have) in &actual.interfaces {
        match desired.interfaces.get(name) {
            None => actions.push(Action::DeleteInterface { name: name.clone() }),
            Some(want) => {
                for key in have.peers.keys().filter(|k| !want.peers.contains_key(k)) {
                    actions.push(Action::RemovePeer {
                        interface: name.clone(),
                        key: *key,
                    });
                }
            }
        }
    }
    // Rules and the uplinks' own routes first: a tunnel may send its first handshake as soon
    // as its peer is set, and that packet must already leave by the tunnel's uplink.
    // Routes through an interface that goes away go with it; re-add what is still wanted.
    let deleted: BTreeSet<&String> = actual
        .interfaces
        .keys()
        .filter(|name| !desired.interfaces.contains_key(*name))
        .collect();
    let (tunnel_routes, other_routes): (Vec<&Route>, Vec<&Route>) = desired
        .routes
        .iter()
        .filter(|r| !actual.routes.contains(r) || deleted.contains(&r.dev))
        .partition(|r| desired.interfaces.contains_key(&r.dev));
    for rule in desired.rules.difference(&actual.rules) {
        actions.push(Action::AddRule(*rule));
    }
    for route in other_routes {
        actions.push(Action::AddRoute(route.clone()));
    }
    for (name, want) in &desired.interfaces {
        let have = actual.interfaces.get(name);
        if have.is_none() {
            actions.push(Action::CreateInterface { name: name.clone() });
        }
        if have.is_none_or(|h| {
            h.listen_port != want.listen_port
                || h.fwmark != want.fwmark
                || h.mtu != want.mtu
                || h.address != want.address
        }) {
            actions.push(Action::ConfigureInterface {
                name: name.clone(),
                listen_port: want.listen_port,
                fwmark: want.fwmark,
                mtu: want.mtu,
                address: want.address,
            });
        }
        for (key, peer) in &want.peers {
            if have.and_then(|h| h.peers.get(key)) != Some(peer) {
                actions.push(Action::SetPeer {
                    interface: name.clone(),
                    key: *key,
                    peer: peer.clone(),
                });
            }
        }
    }
    // Routes through one of our interfaces come after the interface exists.
    for route in tunnel_routes {
        actions.push(Action::AddRoute(route.clone()));
    }
    actions
}

/// Every address the WireGuard interfaces send to (for checks that traffic stays in the lab).
pub fn endpoints(state: &NetState) -> BTreeSet<IpAddr> {
    state
        .interfaces
        .values()
        .flat_map(|i| i.peers.values().map(|p| p.endpoint.ip()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What `actions` do to a state: the model the executors implement, used by tests.
    fn apply(state: &mut NetState, actions: &[Action]) {
        for action in actions {
            match action {
                Action::CreateInterface { name } => {
                    state.interfaces.entry(name.clone()).or_default();
                }
                Action::DeleteInterface { name } => {
                    state.interfaces.remove(name);
                    state.routes.retain(|r| &r.dev != name);
                }
                Action::ConfigureInterface {
                    name,
                    listen_port,
                    fwmark,
                    mtu,
                    address,
                } => {
                    if let Some(i) = state.interfaces.get_mut(name) {
                        i.listen_port = *listen_port;
                        i.fwmark = *fwmark;
                        i.mtu = *mtu;
                        i.address = *address;
                    }
                }
                Action::SetPeer {
                    interface,
                    key,
                    peer,
                } => {
                    if let Some(i) = state.interfaces.get_mut(interface) {
                        i.peers.insert(*key, peer.clone());
                    }
                }
                Action::RemovePeer { interface, key } => {
                    if let Some(i) = state.interfaces.get_mut(interface) {
                        i.peers.remove(key);
                    }
                }
                Action::AddRoute(route) => {
                    state.routes.insert(route.clone());
                }
                Action::DeleteRoute(route) => {
                    state.routes.remove(route);
                }
                Action::AddRule(rule) => {
                    state.rules.insert(*rule);
                }
                Action::DeleteRule(rule) => {
                    state.rules.remove(rule);
                }
            }
        }
    }

    fn key(n: u8) -> WgPublicKey {
        WgPublicKey([n; 32])
    }

    fn state_strategy() -> impl Strategy<Value = NetState> {
        let peer = (
            1u8..6,
            1u16..3,
            proptest::collection::btree_set(0u8..4, 1..3),
        )
            .prop_map(|(host, port, nets)| PeerState {
                endpoint: SocketAddr::from(([198, 18, host, 1], 51820 + port)),
                allowed_ips: nets
                    .into_iter()
                    .map(|n| IpNet::from(IpAddr::from([10, n, 0, 0])))
                    .collect(),
                keepalive_s: 25,
            });
        let interface = (
            51820u16..51824,
            proptest::collection::btree_map((1u8..5).prop_map(key), peer, 0..4),
        )
            .prop_map(|(listen_port, peers)| InterfaceState {
                listen_port,
                fwmark: UPLINK_BASE,
                address: Some(IpNet::from(IpAddr::from([100, 64, 0, 1]))),
                mtu: 1420,
                peers,
            });
        (
            proptest::collection::btree_map(
                (0u8..2, 0u8..2).prop_map(|(l, r)| format!("pw00000000-{l}{r}")),
                interface,
                0..4,
            ),
            proptest::collection::btree_set(
                (0u8..2, 0u8..4).prop_map(|(l, n)| Route {
                    table: table_of(l, 0),
                    dst: IpNet::from(IpAddr::from([10, n, 0, 0])),
                    dev: format!("pw00000000-{l}0"),
                    via: None,
                    src: None,
                }),
                0..5,
            ),
            proptest::collection::btree_set(
                (0u8..2, 0u8..2).prop_map(|(l, r)| MarkRule {
                    mark: table_of(l, r),
                    table: table_of(l, r),
                    priority: table_of(l, r),
                }),
                0..4,
            ),
        )
            .prop_map(|(interfaces, routes, rules)| NetState {
                interfaces,
                routes,
                rules,
            })
    }

    proptest! {
        #[test]
        fn applying_the_diff_reaches_the_desired_state(desired in state_strategy(), actual in state_strategy()) {
            let actions = diff(&desired, &actual);
            let mut state = actual.clone();
            apply(&mut state, &actions);
            // Routes of interfaces that are deleted and re-made are re-added by the diff.
            prop_assert_eq!(diff(&desired, &state), vec![]);
            prop_assert_eq!(&state.interfaces, &desired.interfaces);
            prop_assert_eq!(&state.rules, &desired.rules);
        }

        #[test]
        fn an_unchanged_state_needs_no_action(state in state_strategy()) {
            prop_assert_eq!(diff(&state, &state), vec![]);
        }

        #[test]
        fn rules_exist_before_any_peer_can_send(desired in state_strategy(), actual in state_strategy()) {
            let actions = diff(&desired, &actual);
            let last_rule = actions.iter().rposition(|a| matches!(a, Action::AddRule(_)));
            let first_peer = actions.iter().position(|a| matches!(a, Action::SetPeer { .. }));
            if let (Some(rule), Some(peer)) = (last_rule, first_peer) {
                prop_assert!(rule < peer);
            }
        }

        #[test]
        fn removals_come_before_additions(desired in state_strategy(), actual in state_strategy()) {
            let actions = diff(&desired, &actual);
            let first_add = actions.iter().position(|a| matches!(a, Action::CreateInterface { .. } | Action::SetPeer { .. } | Action::AddRoute(_) | Action::AddRule(_)));
            let last_removal = actions.iter().rposition(|a| matches!(a, Action::DeleteInterface { .. } | Action::RemovePeer { .. } | Action::DeleteRoute(_) | Action::DeleteRule(_)));
            if let (Some(add), Some(removal)) = (first_add, last_removal) {
                prop_assert!(removal < add);
            }
        }
    }

    #[test]
    fn interface_names_fit_the_kernel_limit() {
        let name = interface_name(SiteId(uuid::Uuid::new_v4()), 7, 7);
        assert_eq!(name.len(), 13);
        assert_eq!(default_net(false).to_string(), "0.0.0.0/0");
        assert_eq!(default_net(true).to_string(), "::/0");
        assert!(name.len() <= 15);
    }
}
