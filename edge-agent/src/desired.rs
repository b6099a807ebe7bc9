//! What the kernel should hold for an intent, and the difference from what it holds (pure).
//!
//! [`desired`] turns a [`SiteIntent`] into WireGuard interfaces (one per local uplink × remote
//! uplink index, each peer on it once, as the proto's tunnel convention says), their routes
//! (one table per interface with every prefix reachable through it) and the `ip rule`s from a
//! firewall mark to each table. [`diff`] compares that with the observed [`NetState`] and
//! returns the smallest list of [`Action`]s; applying them and observing again gives an empty
//! diff, and an unchanged intent gives no action at all (so applying twice changes nothing).
//! The netlink and WireGuard modules execute actions; nothing here touches the system.
//!
//! Key rotation: every interface runs with the key the intent names for this site
//! ([`InterfaceState::public_key`]; the agent holds its private key, or keeps its current one:
//! [`use_local_key`]), and a peer that is rotating ([`patronus_proto::intent::Peer::next_public_key`])
//! gets a second entry for its next key with the same endpoint, no allowed IPs and no
//! keepalive: it never carries our traffic, but accepts the peer's first handshake with the
//! new key, so the switch costs no handshake timeout.

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
    /// The interface's own public key (the private key it runs with); none before one is set.
    pub public_key: Option<WgPublicKey>,
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
    /// Run the interface with the private key of `public_key` (the agent holds it). Peers
    /// stay; WireGuard drops the sessions made with the previous key.
    SetPrivateKey {
        name: String,
        public_key: WgPublicKey,
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
                public_key: Some(intent.wireguard.public_key),
                peers: BTreeMap::new(),
            });
        let endpoint = SocketAddr::new(endpoint.ip, remote_port);
        interface.peers.insert(
            peer.public_key,
            PeerState {
                endpoint,
                allowed_ips: allowed,
                keepalive_s: intent.wireguard.persistent_keepalive_s,
            },
        );
        if let Some(next) = peer.next_public_key {
            interface.peers.insert(
                next,
                PeerState {
                    endpoint,
                    allowed_ips: BTreeSet::new(),
                    keepalive_s: 0,
                },
            );
        }
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

/// Run every interface with `key` instead of the one the intent names (the agent does not hold
/// that one: its state is not what the controller thinks, and its current key is the best it
/// has).
pub fn use_local_key(state: &mut NetState, key: WgPublicKey) {
    for interface in state.interfaces.values_mut() {
        interface.public_key = Some(key);
    }
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
        // The interface's own key before its peers: a peer set before it would start a
        // handshake with the old key.
        if let Some(public_key) = want.public_key {
            if have.and_then(|h| h.public_key) != Some(public_key) {
                actions.push(Action::SetPrivateKey {
                    name: name.clone(),
                    public_key,
                });
            }
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
                Action::SetPrivateKey { name, public_key } => {
                    if let Some(i) = state.interfaces.get_mut(name) {
                        i.public_key = Some(*public_key);
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
            (10u8..12).prop_map(key),
        )
            .prop_map(|(listen_port, peers, own)| InterfaceState {
                listen_port,
                fwmark: UPLINK_BASE,
                address: Some(IpNet::from(IpAddr::from([100, 64, 0, 1]))),
                mtu: 1420,
                public_key: Some(own),
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
        fn an_interface_has_its_key_before_any_of_its_peers(desired in state_strategy(), actual in state_strategy()) {
            let actions = diff(&desired, &actual);
            for (i, action) in actions.iter().enumerate() {
                if let Action::SetPrivateKey { name, .. } = action {
                    let early = actions[..i].iter().any(|a| matches!(a, Action::SetPeer { interface, .. } if interface == name));
                    prop_assert!(!early, "a peer of {} was set before its key", name);
                }
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

    use patronus_proto::intent::{
        Overlay, PathSpec, Peer, PeerEndpoint, Uplink, WireguardSettings,
    };
    use patronus_proto::{PathId, ProbeKey, TenantId, SCHEMA_VERSION};

    fn uuid(n: u128) -> uuid::Uuid {
        uuid::Uuid::from_u128(n)
    }

    /// Site 1 with one uplink and one peer, site 2, on one path.
    fn two_sites(
        own: WgPublicKey,
        peer_key: WgPublicKey,
        peer_next: Option<WgPublicKey>,
    ) -> SiteIntent {
        SiteIntent {
            schema_version: SCHEMA_VERSION,
            tenant: TenantId(uuid(9)),
            site: SiteId(uuid(1)),
            site_name: "one".into(),
            revision: 1,
            generated_at_unix_ms: 0,
            overlay: Overlay {
                address: "100.64.0.1".parse().unwrap(),
                network: "100.64.0.0/16".parse().unwrap(),
                lan_prefixes: vec!["10.1.0.0/24".parse().unwrap()],
            },
            uplinks: vec![Uplink {
                index: 0,
                name: "wan0".into(),
                kind: patronus_proto::policy::LinkKind::Fiber,
                interface: None,
                bandwidth_mbps: None,
                cost_per_gb: 0.0,
                metered: false,
            }],
            wireguard: WireguardSettings {
                public_key: own,
                listen_port_base: 51820,
                mtu: 1420,
                persistent_keepalive_s: 25,
            },
            peers: vec![Peer {
                site: SiteId(uuid(2)),
                name: "two".into(),
                public_key: peer_key,
                overlay_address: "100.64.0.2".parse().unwrap(),
                lan_prefixes: vec!["10.2.0.0/24".parse().unwrap()],
                transit_prefixes: vec![],
                endpoints: vec![PeerEndpoint {
                    uplink_index: 0,
                    ip: "198.18.2.1".parse().unwrap(),
                    kind: None,
                }],
                listen_port_base: 51820,
                region: None,
                hub: false,
                probe_key: ProbeKey([3; 32]),
                next_public_key: peer_next,
            }],
            paths: vec![PathSpec {
                id: PathId(uuid(7)),
                local_uplink: 0,
                remote_site: SiteId(uuid(2)),
                remote_uplink: 0,
            }],
            policies: Default::default(),
            probe: Default::default(),
            failover: Default::default(),
        }
    }

    fn uplink() -> Vec<UplinkRoute> {
        vec![UplinkRoute {
            index: 0,
            dev: "wan0".into(),
            src: "198.18.1.1".parse().unwrap(),
            gateway: None,
        }]
    }

    /// What a model namespace holds after applying `intent` on top of `state`.
    fn applied(state: &NetState, intent: &SiteIntent) -> (NetState, Vec<Action>) {
        let want = desired(intent, &uplink());
        let actions = diff(&want, state);
        let mut next = state.clone();
        apply(&mut next, &actions);
        assert_eq!(diff(&want, &next), vec![]);
        (next, actions)
    }

    #[test]
    fn a_rotating_peer_is_announced_committed_and_its_old_key_removed() {
        let (own, old, new) = (key(1), key(2), key(3));
        let name = interface_name(SiteId(uuid(1)), 0, 0);
        let (before, _) = applied(&NetState::default(), &two_sites(own, old, None));

        // Announce: the next key is a second peer, same endpoint, no allowed IPs, no
        // keepalive; the current key keeps the allowed IPs and the routes stay as they were.
        let (announced, actions) = applied(&before, &two_sites(own, old, Some(new)));
        let peers = &announced.interfaces[&name].peers;
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[&new].endpoint, peers[&old].endpoint);
        assert!(peers[&new].allowed_ips.is_empty());
        assert_eq!(peers[&new].keepalive_s, 0);
        assert_eq!(peers[&old], before.interfaces[&name].peers[&old]);
        assert_eq!(announced.routes, before.routes);
        assert_eq!(
            actions,
            vec![Action::SetPeer {
                interface: name.clone(),
                key: new,
                peer: peers[&new].clone()
            }]
        );

        // Commit: the old key goes first (freeing its allowed IPs), then the next key takes
        // them; nothing else changes.
        let (committed, actions) = applied(&announced, &two_sites(own, new, None));
        assert_eq!(
            actions[0],
            Action::RemovePeer {
                interface: name.clone(),
                key: old
            }
        );
        assert!(
            matches!(&actions[1], Action::SetPeer { key, peer, .. } if *key == new && peer.allowed_ips == before.interfaces[&name].peers[&old].allowed_ips)
        );
        assert_eq!(actions.len(), 2);
        assert_eq!(committed.routes, before.routes);
        assert_eq!(committed.interfaces[&name].peers.len(), 1);
    }

    #[test]
    fn the_rotating_site_switches_its_interfaces_to_the_key_its_intent_names() {
        let (old, new, peer) = (key(1), key(4), key(2));
        let name = interface_name(SiteId(uuid(1)), 0, 0);
        let (first, actions) = applied(&NetState::default(), &two_sites(old, peer, None));
        // A new interface gets its key after being configured and before its peer.
        let configure = actions
            .iter()
            .position(|a| matches!(a, Action::ConfigureInterface { .. }))
            .unwrap();
        let key_set = actions
            .iter()
            .position(
                |a| matches!(a, Action::SetPrivateKey { public_key, .. } if *public_key == old),
            )
            .unwrap();
        let peer_set = actions
            .iter()
            .position(|a| matches!(a, Action::SetPeer { .. }))
            .unwrap();
        assert!(configure < key_set && key_set < peer_set);
        // The commit changes only the key: no peer, address or route is touched.
        let (_, actions) = applied(&first, &two_sites(new, peer, None));
        assert_eq!(
            actions,
            vec![Action::SetPrivateKey {
                name: name.clone(),
                public_key: new
            }]
        );
        // An intent naming a key the agent does not hold: it keeps its own.
        let mut want = desired(&two_sites(key(9), peer, None), &uplink());
        use_local_key(&mut want, old);
        assert_eq!(diff(&want, &first), vec![]);
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
