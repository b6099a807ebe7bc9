//! Route netlink (I/O): links, addresses, routes and rules of the agent's network namespace,
//! read and changed through `rtnetlink` instead of iproute2.
//!
//! The agent's decisions are synchronous ([`crate::tunnels`] is called from the run loop and
//! from `patronus-edge status`), so [`Netlink`] offers blocking calls: the netlink connection
//! runs on a thread of its own (a one-thread tokio runtime driving the socket), and each call
//! waits on its request's answer with `futures_executor::block_on`, which never nests a
//! tokio runtime inside the caller's. Interfaces are named in and out; indexes stay inside.

use std::collections::BTreeMap;
use std::net::IpAddr;

use futures_util::future::join_all;
use futures_util::{StreamExt, TryStreamExt};
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkMessage, LinkXdp, XdpAttached};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, LinkUnspec, LinkWireguard, RouteMessageBuilder};

/// What went wrong talking to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a route netlink socket: {0}")]
    Open(#[source] std::io::Error),
    #[error("no interface named {0}")]
    NoSuchLink(String),
    #[error("{what}: {source}")]
    Kernel {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl NetlinkError {
    /// The kernel's errno, when it answered with one.
    #[cfg(test)]
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { source, .. } => errno_of(source),
            _ => None,
        }
    }
}

/// The errno of a kernel refusal.
fn errno_of(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => message.code.map(|c| -c.get()),
        _ => None,
    }
}

type Result<T> = std::result::Result<T, NetlinkError>;

fn kernel(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |source| NetlinkError::Kernel { what, source }
}

/// A link as the agent needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    /// `Some("driver" | "generic" | "offloaded" | "attached")` with an XDP program on it.
    pub xdp: Option<&'static str>,
}

/// One address on a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub link: u32,
    pub net: IpNet,
    /// Scope global (not link- or host-local).
    pub global: bool,
}

/// A unicast route (other kinds — local, broadcast, multicast — are not the agent's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    pub table: u32,
    pub dst: IpNet,
    /// Output interface index, if the route has one.
    pub oif: Option<u32>,
    pub gateway: Option<IpAddr>,
    pub pref_src: Option<IpAddr>,
}

/// An IPv4 policy rule with a firewall mark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleEntry {
    pub mark: u32,
    pub table: u32,
    pub priority: u32,
}

/// A route netlink connection driven on its own thread.
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Open the socket in the calling thread's network namespace.
    pub fn open() -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(NetlinkError::Open)?;
        // The socket registers with the runtime that will drive it; it is opened here, on the
        // caller's thread, so it lives in the caller's network namespace.
        let (connection, handle, _) = {
            let _inside = runtime.enter();
            rtnetlink::new_connection().map_err(NetlinkError::Open)?
        };
        std::thread::Builder::new()
            .name("patronus-netlink".into())
            .spawn(move || runtime.block_on(connection))
            .map_err(NetlinkError::Open)?;
        Ok(Self { handle })
    }

    pub fn links(&self) -> Result<Vec<Link>> {
        futures_executor::block_on(async {
            let messages: Vec<LinkMessage> = self
                .handle
                .link()
                .get()
                .execute()
                .try_collect()
                .await
                .map_err(kernel("listing links"))?;
            Ok(messages.iter().filter_map(link_of).collect())
        })
    }

    pub fn link_index(&self, name: &str) -> Result<u32> {
        futures_executor::block_on(async {
            let mut found = self
                .handle
                .link()
                .get()
                .match_name(name.to_owned())
                .execute();
            match found.next().await {
                Some(Ok(message)) => Ok(message.header.index),
                Some(Err(e)) if errno_of(&e) == Some(libc::ENODEV) => {
                    Err(NetlinkError::NoSuchLink(name.to_owned()))
                }
                Some(Err(e)) => Err(kernel(format!("looking up {name}"))(e)),
                None => Err(NetlinkError::NoSuchLink(name.to_owned())),
            }
        })
    }

    pub fn addresses(&self) -> Result<Vec<Address>> {
        futures_executor::block_on(async {
            let messages: Vec<AddressMessage> = self
                .handle
                .address()
                .get()
                .execute()
                .try_collect()
                .await
                .map_err(kernel("listing addresses"))?;
            Ok(messages.iter().filter_map(address_of).collect())
        })
    }

    /// Every unicast route of both families in every table.
    pub fn routes(&self) -> Result<Vec<RouteEntry>> {
        futures_executor::block_on(async {
            let mut all = Vec::new();
            for family in [
                RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
                RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
            ] {
                let mut dump = family;
                // Table 0 (unspecified) dumps every table.
                dump.header.table = 0;
                let messages: Vec<RouteMessage> = self
                    .handle
                    .route()
                    .get(dump)
                    .execute()
                    .try_collect()
                    .await
                    .map_err(kernel("listing routes"))?;
                all.extend(messages.iter().filter_map(route_of));
            }
            Ok(all)
        })
    }

    /// IPv4 rules that match a firewall mark.
    pub fn mark_rules(&self) -> Result<Vec<RuleEntry>> {
        let messages = futures_executor::block_on(self.rule_messages())?;
        Ok(messages.iter().filter_map(rule_of).collect())
    }

    /// Every IPv4 rule as the kernel lists it.
    async fn rule_messages(&self) -> Result<Vec<RuleMessage>> {
        self.handle
            .rule()
            .get(IpVersion::V4)
            .execute()
            .try_collect()
            .await
            .map_err(kernel("listing rules"))
    }

    /// `ip link add NAME type wireguard` (fails without the kernel module).
    pub fn add_wireguard(&self, name: &str) -> Result<()> {
        futures_executor::block_on(
            self.handle
                .link()
                .add(LinkWireguard::new(name).build())
                .execute(),
        )
        .map_err(kernel(format!("creating WireGuard interface {name}")))
    }

    /// Delete `name`; a link already gone is not an error.
    pub fn delete_link(&self, name: &str) -> Result<()> {
        let index = match self.link_index(name) {
            Ok(index) => index,
            Err(NetlinkError::NoSuchLink(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        futures_executor::block_on(self.handle.link().del(index).execute())
            .map_err(kernel(format!("deleting {name}")))
    }

    /// Set `name`'s MTU and bring it up.
    pub fn set_mtu_up(&self, name: &str, mtu: u32) -> Result<()> {
        let index = self.link_index(name)?;
        futures_executor::block_on(
            self.handle
                .link()
                .change(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
                .execute(),
        )
        .map_err(kernel(format!("setting {name} up with MTU {mtu}")))
    }

    /// Make `address` the only address of `name` (`None`: no address).
    pub fn set_only_address(&self, name: &str, address: Option<IpNet>) -> Result<()> {
        let index = self.link_index(name)?;
        futures_executor::block_on(async {
            let present: Vec<AddressMessage> = self
                .handle
                .address()
                .get()
                .set_link_index_filter(index)
                .execute()
                .try_collect()
                .await
                .map_err(kernel(format!("listing the addresses of {name}")))?;
            let mut have = false;
            for message in present {
                let net = address_of(&message).map(|a| a.net);
                if address.is_some_and(|want| net == Some(want)) {
                    have = true;
                    continue;
                }
                self.handle
                    .address()
                    .del(message)
                    .execute()
                    .await
                    .map_err(kernel(format!("removing an address from {name}")))?;
            }
            if let Some(want) = address.filter(|_| !have) {
                self.handle
                    .address()
                    .add(index, want.addr(), want.prefix_len())
                    .execute()
                    .await
                    .map_err(kernel(format!("adding {want} to {name}")))?;
            }
            Ok(())
        })
    }

    /// `ip route replace` of each route, sent together: the kernel answers them in one go
    /// instead of one round trip (and two thread wake-ups) each. The first failure is
    /// returned; the others were still attempted.
    pub fn replace_routes(&self, routes: &[RouteSpec]) -> Result<()> {
        let indexes = self.indexes()?;
        let messages = routes
            .iter()
            .map(|r| route_message(r, &indexes))
            .collect::<Result<Vec<_>>>()?;
        let answers = futures_executor::block_on(join_all(
            messages
                .into_iter()
                .map(|m| self.handle.route().add(m).replace().execute()),
        ));
        first_failure(routes, answers, |route, e| {
            kernel(format!("adding the route {}", route.describe()))(e)
        })
    }

    /// `ip route del` of each route, sent together; a route already gone (or whose interface
    /// is gone, taking it along) is not an error.
    pub fn delete_routes(&self, routes: &[RouteSpec]) -> Result<()> {
        let indexes = self.indexes()?;
        let mut present = Vec::new();
        for route in routes {
            match route_message(route, &indexes) {
                Ok(message) => present.push((route, message)),
                Err(NetlinkError::NoSuchLink(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let answers = futures_executor::block_on(join_all(
            present
                .iter()
                .map(|(_, m)| self.handle.route().del(m.clone()).execute()),
        ));
        let answers = answers.into_iter().map(|answer| match answer {
            Err(e) if errno_of(&e) == Some(libc::ESRCH) => Ok(()),
            other => other,
        });
        let routes: Vec<&RouteSpec> = present.iter().map(|(r, _)| *r).collect();
        first_failure(&routes, answers, |route, e| {
            kernel(format!("deleting the route {}", route.describe()))(e)
        })
    }

    /// Interface indexes by name, from one dump.
    fn indexes(&self) -> Result<BTreeMap<String, u32>> {
        Ok(self
            .links()?
            .into_iter()
            .map(|l| (l.name, l.index))
            .collect())
    }

    /// A link to hang addresses and routes on (tests): one end of a veth pair whose other
    /// end is `name` with `p` appended (this kernel has no dummy links).
    #[cfg(test)]
    pub(crate) fn add_test_link(&self, name: &str) -> Result<()> {
        futures_executor::block_on(
            self.handle
                .link()
                .add(rtnetlink::LinkVeth::new(name, &format!("{name}p")).build())
                .execute(),
        )
        .map_err(kernel(format!("creating veth {name}")))
    }

    /// `ip rule add fwmark M lookup T priority P` for each rule, sent together.
    pub fn add_mark_rules(&self, rules: &[RuleEntry]) -> Result<()> {
        let answers = futures_executor::block_on(join_all(rules.iter().map(|rule| {
            self.handle
                .rule()
                .add()
                .v4()
                .fw_mark(rule.mark)
                .table_id(rule.table)
                .priority(rule.priority)
                .action(RuleAction::ToTable)
                .execute()
        })));
        first_failure(rules, answers, |rule, e| {
            kernel(format!(
                "adding the rule fwmark {} lookup {} priority {}",
                rule.mark, rule.table, rule.priority
            ))(e)
        })
    }

    /// Delete every IPv4 rule matching one of `rules` (mark, table and priority); a rule
    /// that is not there is not an error.
    pub fn delete_mark_rules(&self, rules: &[RuleEntry]) -> Result<()> {
        futures_executor::block_on(async {
            let messages = self.rule_messages().await?;
            let doomed: Vec<(RuleEntry, RuleMessage)> = messages
                .into_iter()
                .filter_map(|m| rule_of(&m).filter(|r| rules.contains(r)).map(|r| (r, m)))
                .collect();
            let answers = join_all(
                doomed
                    .iter()
                    .map(|(_, m)| self.handle.rule().del(m.clone()).execute()),
            )
            .await;
            let entries: Vec<RuleEntry> = doomed.into_iter().map(|(r, _)| r).collect();
            first_failure(&entries, answers, |rule, e| {
                kernel(format!(
                    "deleting the rule fwmark {} lookup {}",
                    rule.mark, rule.table
                ))(e)
            })
        })
    }
}

/// The first failed answer, as an error about its item.
fn first_failure<T>(
    items: &[T],
    answers: impl IntoIterator<Item = std::result::Result<(), rtnetlink::Error>>,
    error: impl Fn(&T, rtnetlink::Error) -> NetlinkError,
) -> Result<()> {
    for (item, answer) in items.iter().zip(answers) {
        answer.map_err(|e| error(item, e))?;
    }
    Ok(())
}

/// The netlink message for `route`, its interface looked up in `indexes`.
fn route_message(route: &RouteSpec, indexes: &BTreeMap<String, u32>) -> Result<RouteMessage> {
    let invalid = |e: String| NetlinkError::Invalid(format!("route {}: {e}", route.describe()));
    let index = *indexes
        .get(&route.dev)
        .ok_or_else(|| NetlinkError::NoSuchLink(route.dev.clone()))?;
    let mut builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(route.dst.addr(), route.dst.prefix_len())
        .map_err(|e| invalid(e.to_string()))?
        .output_interface(index)
        .table_id(route.table)
        .protocol(RouteProtocol::Static)
        .kind(RouteType::Unicast);
    builder = match route.via {
        Some(via) => builder.gateway(via).map_err(|e| invalid(e.to_string()))?,
        // As iproute2 does: a route with no gateway reaches its destination on the link.
        None => builder.scope(RouteScope::Link),
    };
    if let Some(src) = route.src {
        builder = builder
            .pref_source(src)
            .map_err(|e| invalid(e.to_string()))?;
    }
    Ok(builder.build())
}

/// A route to install: what [`crate::desired::Route`] says, by interface name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub table: u32,
    pub dst: IpNet,
    pub dev: String,
    pub via: Option<IpAddr>,
    pub src: Option<IpAddr>,
}

impl RouteSpec {
    fn describe(&self) -> String {
        let mut text = self.dst.to_string();
        if let Some(via) = self.via {
            text.push_str(&format!(" via {via}"));
        }
        text.push_str(&format!(" dev {} table {}", self.dev, self.table));
        text
    }
}

fn link_of(message: &LinkMessage) -> Option<Link> {
    let mut name = None;
    let mut mtu = 0;
    let mut xdp = None;
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Mtu(m) => mtu = *m,
            LinkAttribute::Xdp(parts) => {
                xdp = parts.iter().find_map(|p| match p {
                    LinkXdp::Attached(XdpAttached::None) => None,
                    LinkXdp::Attached(XdpAttached::Driver) => Some("driver"),
                    LinkXdp::Attached(XdpAttached::SocketBuffer) => Some("generic"),
                    LinkXdp::Attached(XdpAttached::Hardware) => Some("offloaded"),
                    LinkXdp::Attached(_) => Some("attached"),
                    _ => None,
                })
            }
            _ => {}
        }
    }
    Some(Link {
        index: message.header.index,
        name: name?,
        mtu,
        xdp,
    })
}

fn address_of(message: &AddressMessage) -> Option<Address> {
    // IPv4 has IFA_LOCAL (the interface's own address; IFA_ADDRESS is the peer's on a
    // point-to-point link); IPv6 only IFA_ADDRESS.
    let local = message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = local.or_else(|| {
        message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })?;
    Some(Address {
        link: message.header.index,
        net: IpNet::new(address, message.header.prefix_len).ok()?,
        global: message.header.scope == AddressScope::Universe,
    })
}

fn ip_of(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn route_of(message: &RouteMessage) -> Option<RouteEntry> {
    if message.header.kind != RouteType::Unicast {
        return None;
    }
    let mut table = u32::from(message.header.table);
    let mut destination = None;
    let mut oif = None;
    let mut gateway = None;
    let mut pref_src = None;
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(d) => destination = ip_of(d),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(g) => gateway = ip_of(g),
            RouteAttribute::PrefSource(s) => pref_src = ip_of(s),
            _ => {}
        }
    }
    let destination = destination.unwrap_or(match message.header.address_family {
        netlink_packet_route::AddressFamily::Inet6 => IpAddr::from([0u16; 8]),
        _ => IpAddr::from([0u8; 4]),
    });
    Some(RouteEntry {
        table,
        dst: IpNet::new(destination, message.header.destination_prefix_length).ok()?,
        oif,
        gateway,
        pref_src,
    })
}

fn rule_of(message: &RuleMessage) -> Option<RuleEntry> {
    let mut mark = None;
    let mut table = u32::from(message.header.table);
    let mut priority = 0;
    for attribute in &message.attributes {
        match attribute {
            RuleAttribute::FwMark(m) => mark = Some(*m),
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::Priority(p) => priority = *p,
            _ => {}
        }
    }
    Some(RuleEntry {
        mark: mark?,
        table,
        priority,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    //! Against the kernel, in a network namespace of the test's own (needs root, as
    //! `scripts/test` runs): what the agent writes through netlink reads back the same, and
    //! writing it again changes nothing.

    use super::*;

    /// Run `test` on a thread moved into a new network namespace (the namespace is the
    /// thread's; the netlink socket opened there stays in it).
    pub(crate) fn in_new_netns(test: impl FnOnce() + Send + 'static) {
        std::thread::spawn(move || {
            // SAFETY: unshare(2) with a flag; affects only this thread.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "unshare(CLONE_NEWNET) failed ({}): the netlink tests need root (scripts/test runs as root)",
                std::io::Error::last_os_error()
            );
            test();
        })
        .join()
        .expect("the netlink test failed");
    }

    fn net(text: &str) -> IpNet {
        text.parse().expect("test prefix")
    }

    #[test]
    fn links_addresses_mtu_and_deletion() {
        in_new_netns(|| {
            let nl = Netlink::open().expect("netlink");
            nl.add_test_link("pwtest0").expect("veth");
            nl.set_mtu_up("pwtest0", 1380).expect("mtu");
            let link = nl
                .links()
                .expect("links")
                .into_iter()
                .find(|l| l.name == "pwtest0")
                .expect("the link is listed");
            assert_eq!((link.mtu, link.xdp), (1380, None));

            nl.set_only_address("pwtest0", Some(net("100.64.0.1/10")))
                .expect("address");
            // Again: nothing to do, still one address.
            nl.set_only_address("pwtest0", Some(net("100.64.0.1/10")))
                .expect("address again");
            let mine = |nl: &Netlink| -> Vec<IpNet> {
                nl.addresses()
                    .expect("addresses")
                    .into_iter()
                    .filter(|a| a.link == link.index)
                    .map(|a| a.net)
                    .filter(|n| n.addr().is_ipv4())
                    .collect()
            };
            assert_eq!(mine(&nl), vec![net("100.64.0.1/10")]);
            // A new address replaces the old one.
            nl.set_only_address("pwtest0", Some(net("100.64.0.7/10")))
                .expect("new address");
            assert_eq!(mine(&nl), vec![net("100.64.0.7/10")]);
            nl.set_only_address("pwtest0", None).expect("no address");
            assert!(mine(&nl).is_empty());

            nl.delete_link("pwtest0").expect("delete");
            assert!(matches!(
                nl.link_index("pwtest0"),
                Err(NetlinkError::NoSuchLink(_))
            ));
            // Deleting what is gone is what was wanted.
            nl.delete_link("pwtest0").expect("delete again");
            assert!(matches!(
                nl.set_mtu_up("pwtest0", 1400),
                Err(NetlinkError::NoSuchLink(_))
            ));
        });
    }

    #[test]
    fn routes_in_high_tables_read_back_as_written() {
        in_new_netns(|| {
            let nl = Netlink::open().expect("netlink");
            nl.add_test_link("pwtest1").expect("veth");
            nl.set_mtu_up("pwtest1p", 1500).expect("the far end up");
            nl.set_mtu_up("pwtest1", 1420).expect("up");
            nl.set_only_address("pwtest1", Some(net("198.18.1.2/30")))
                .expect("address");
            let index = nl.link_index("pwtest1").expect("index");
            let routes = [
                // A peer's prefix through a tunnel, in a path table above 255.
                RouteSpec {
                    table: 1003,
                    dst: net("10.2.0.0/24"),
                    dev: "pwtest1".into(),
                    via: None,
                    src: Some("198.18.1.2".parse().expect("ip")),
                },
                // An uplink's default route through its gateway.
                RouteSpec {
                    table: 1100,
                    dst: net("0.0.0.0/0"),
                    dev: "pwtest1".into(),
                    via: Some("198.18.1.1".parse().expect("ip")),
                    src: None,
                },
            ];
            for route in &routes {
                nl.replace_routes(std::slice::from_ref(route))
                    .expect("route");
            }
            let mut read: Vec<RouteEntry> = nl
                .routes()
                .expect("routes")
                .into_iter()
                .filter(|r| r.table >= 1000)
                .collect();
            read.sort_by_key(|r| r.table);
            assert_eq!(
                read,
                vec![
                    RouteEntry {
                        table: 1003,
                        dst: net("10.2.0.0/24"),
                        oif: Some(index),
                        gateway: None,
                        pref_src: Some("198.18.1.2".parse().expect("ip")),
                    },
                    RouteEntry {
                        table: 1100,
                        dst: net("0.0.0.0/0"),
                        oif: Some(index),
                        gateway: Some("198.18.1.1".parse().expect("ip")),
                        pref_src: None,
                    },
                ]
            );
            // Again, together: no change.
            nl.replace_routes(&routes).expect("the same routes again");
            nl.delete_routes(&routes).expect("delete");
            nl.delete_routes(&routes).expect("delete what is gone");
            assert!(nl.routes().expect("routes").iter().all(|r| r.table < 1000));
            // A route through a link that does not exist is refused by name.
            let error = nl
                .replace_routes(&[RouteSpec {
                    dev: "pwnothere".into(),
                    ..routes[0].clone()
                }])
                .expect_err("no such link");
            assert!(error.to_string().contains("pwnothere"), "{error}");
        });
    }

    #[test]
    fn mark_rules_are_added_listed_and_deleted() {
        in_new_netns(|| {
            let nl = Netlink::open().expect("netlink");
            let rule = RuleEntry {
                mark: 1003,
                table: 1003,
                priority: 1003,
            };
            nl.add_mark_rules(std::slice::from_ref(&rule))
                .expect("rule");
            let ours = |nl: &Netlink| -> Vec<RuleEntry> {
                nl.mark_rules()
                    .expect("rules")
                    .into_iter()
                    .filter(|r| r.mark == 1003)
                    .collect()
            };
            assert_eq!(ours(&nl), vec![rule.clone()]);
            // The kernel refuses a duplicate (the diff never asks for one).
            assert_eq!(
                nl.add_mark_rules(std::slice::from_ref(&rule))
                    .expect_err("duplicate")
                    .errno(),
                Some(libc::EEXIST)
            );
            nl.delete_mark_rules(std::slice::from_ref(&rule))
                .expect("delete");
            assert!(ours(&nl).is_empty());
            nl.delete_mark_rules(std::slice::from_ref(&rule))
                .expect("delete what is gone");
        });
    }
}
