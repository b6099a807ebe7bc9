//! The lab's address and naming plan: pure functions from (sites, uplinks) to namespaces,
//! interfaces and addresses, so `up`, `down`, the tests and the benchmarks all agree on them.
//!
//! - WAN: RFC 2544 benchmarking space 198.18.0.0/15 only. Site `i` uplink `u` is the /30
//!   `198.18.i.(4u)`: `.4u+1` on the site's router, `.4u+2` on the emulated internet.
//! - Management: `198.19.254.0/24`, host `.1`, site `i` router `.(i+1)`; the controller is
//!   reached only over this link.
//! - LANs: `10.i.0.0/24` behind site `i` (router `.1`, host `.10`), inside the namespaces.
//! - Namespaces `pl-inet`, `pl-s<i>` (router) and `pl-s<i>-lan` (host); interface names stay
//!   within the kernel's 15 characters.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::Serialize;

/// Sites the lab supports (the management /24 bounds it).
pub const MAX_SITES: u16 = 250;
/// Uplinks per site (a /24 per site holds 64 /30s; the proto allows 8).
pub const MAX_UPLINKS: u8 = 8;
pub const WAN_SPACE: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(198, 18, 0, 0), 15) {
    Ok(net) => net,
    Err(_) => panic!("constant prefix"),
};
pub const INTERNET_NS: &str = "pl-inet";
/// Prefix of every namespace and host-side interface the lab creates (what `down` removes).
pub const PREFIX: &str = "pl-";
/// The host's bridge for the management link.
pub const MGMT_BRIDGE: &str = "pl-mgmt";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("--sites must be 1-{MAX_SITES}, got {0}")]
    Sites(u16),
    #[error("--uplinks must be 1-{MAX_UPLINKS}, got {0}")]
    Uplinks(u8),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UplinkPlan {
    pub index: u8,
    /// Interface in the site's router namespace.
    pub router_if: String,
    /// Its peer interface in the internet namespace.
    pub internet_if: String,
    pub router_addr: Ipv4Net,
    pub internet_addr: Ipv4Net,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SitePlan {
    pub index: u16,
    pub name: String,
    pub router_ns: String,
    pub lan_ns: String,
    pub lan_prefix: Ipv4Net,
    pub lan_router_addr: Ipv4Net,
    pub lan_host_addr: Ipv4Net,
    pub mgmt_addr: Ipv4Net,
    /// Host side of the site's management veth (on the host bridge).
    pub mgmt_host_if: String,
    pub uplinks: Vec<UplinkPlan>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LabPlan {
    /// Every WAN address of the lab lies in this prefix.
    pub wan_space: Ipv4Net,
    pub internet_ns: String,
    pub mgmt_bridge: String,
    pub mgmt_host_addr: Ipv4Net,
    pub sites: Vec<SitePlan>,
}

fn net(a: u8, b: u8, c: u8, d: u8, len: u8) -> Ipv4Net {
    // Every caller passes a length of 24 or 30.
    Ipv4Net::new(Ipv4Addr::new(a, b, c, d), len).expect("prefix length is at most 32")
}

/// Plan a lab of `sites` sites with `uplinks` uplinks each.
pub fn plan(sites: u16, uplinks: u8) -> Result<LabPlan, PlanError> {
    if sites == 0 || sites > MAX_SITES {
        return Err(PlanError::Sites(sites));
    }
    if uplinks == 0 || uplinks > MAX_UPLINKS {
        return Err(PlanError::Uplinks(uplinks));
    }
    let sites = (1..=sites)
        .map(|i| {
            let octet = i as u8; // i <= 250
            SitePlan {
                index: i,
                name: format!("site{i}"),
                router_ns: format!("pl-s{i}"),
                lan_ns: format!("pl-s{i}-lan"),
                lan_prefix: net(10, octet, 0, 0, 24),
                lan_router_addr: net(10, octet, 0, 1, 24),
                lan_host_addr: net(10, octet, 0, 10, 24),
                mgmt_addr: net(198, 19, 254, octet + 1, 24),
                mgmt_host_if: format!("pl-m{i}"),
                uplinks: (0..uplinks)
                    .map(|u| UplinkPlan {
                        index: u,
                        router_if: format!("wan{u}"),
                        internet_if: format!("s{i}u{u}"),
                        router_addr: net(198, 18, octet, 4 * u + 1, 30),
                        internet_addr: net(198, 18, octet, 4 * u + 2, 30),
                    })
                    .collect(),
            }
        })
        .collect();
    Ok(LabPlan {
        wan_space: WAN_SPACE,
        internet_ns: INTERNET_NS.into(),
        mgmt_bridge: MGMT_BRIDGE.into(),
        mgmt_host_addr: net(198, 19, 254, 1, 24),
        sites,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn limits_are_enforced() {
        assert_eq!(plan(0, 2), Err(PlanError::Sites(0)));
        assert_eq!(plan(251, 2), Err(PlanError::Sites(251)));
        assert_eq!(plan(3, 0), Err(PlanError::Uplinks(0)));
        assert_eq!(plan(3, 9), Err(PlanError::Uplinks(9)));
    }

    #[test]
    fn site_one_is_laid_out_as_documented() {
        let lab = plan(1, 2).unwrap();
        let s = &lab.sites[0];
        assert_eq!(s.router_ns, "pl-s1");
        assert_eq!(s.uplinks[1].router_addr.to_string(), "198.18.1.5/30");
        assert_eq!(s.uplinks[1].internet_addr.to_string(), "198.18.1.6/30");
        assert_eq!(s.lan_host_addr.to_string(), "10.1.0.10/24");
        assert_eq!(s.mgmt_addr.to_string(), "198.19.254.2/24");
    }

    proptest! {
        #[test]
        fn addresses_are_unique_inside_the_lab_space_and_names_fit(sites in 1u16..=MAX_SITES, uplinks in 1u8..=MAX_UPLINKS) {
            let lab = plan(sites, uplinks).unwrap();
            let mut addrs = HashSet::new();
            let mut names = HashSet::new();
            prop_assert!(addrs.insert(lab.mgmt_host_addr.addr()));
            for site in &lab.sites {
                prop_assert!(names.insert(site.router_ns.clone()) && names.insert(site.lan_ns.clone()));
                prop_assert!(addrs.insert(site.mgmt_addr.addr()));
                prop_assert!(addrs.insert(site.lan_host_addr.addr()));
                prop_assert!(site.mgmt_host_if.len() <= 15 && site.mgmt_host_if.starts_with(PREFIX));
                prop_assert!(names.insert(site.mgmt_host_if.clone()));
                for up in &site.uplinks {
                    // WAN addresses never leave RFC 2544 space.
                    prop_assert!(WAN_SPACE.contains(&up.router_addr.addr()));
                    prop_assert!(WAN_SPACE.contains(&up.internet_addr.addr()));
                    prop_assert!(up.router_addr.contains(&up.internet_addr.addr()));
                    prop_assert!(addrs.insert(up.router_addr.addr()) && addrs.insert(up.internet_addr.addr()));
                    prop_assert!(up.internet_if.len() <= 15 && up.router_if.len() <= 15);
                    prop_assert!(names.insert(up.internet_if.clone()));
                }
            }
        }
    }
}
