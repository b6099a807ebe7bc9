//! `patronus-edge enroll`: make this site's keys here, send only their public parts with the
//! token, and keep what the controller answers in the state directory.
//!
//! Keys made: the WireGuard key pair (Curve25519), the certificate key pair (ECDSA P-256, the
//! CSR's subject `CN=<site>, O=<tenant>` read from the token) and the NATS user nkey. None of
//! the private halves leaves this process except into the state directory.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use patronus_proto::enroll::{creds_file, peek_claims, EnrollRequest, EnrollResponse, UplinkSpec};
use patronus_proto::policy::LinkKind;
use patronus_proto::{SiteId, TenantId, WgPublicKey};

use crate::state::{self, Identity, StateDir};

/// How long the controller gets to answer.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(30);

/// Parse `--uplink name=wan0,address=198.18.1.1[,type=fiber][,bandwidth=1000][,cost=0.5][,metered=true]`.
pub fn parse_uplink(text: &str) -> Result<UplinkSpec, String> {
    let mut name = None;
    let mut address = None;
    let mut spec = UplinkSpec {
        name: String::new(),
        address: std::net::IpAddr::from([0, 0, 0, 0]),
        interface_type: LinkKind::Other,
        bandwidth_mbps: None,
        cost_per_gb: 0.0,
        metered: false,
    };
    for part in text.split(',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not key=value"))?;
        match key.trim() {
            "name" => name = Some(value.trim().to_owned()),
            "address" => {
                address = Some(
                    value
                        .trim()
                        .parse()
                        .map_err(|_| format!("address {value:?} is not an IP address"))?,
                )
            }
            "type" => {
                spec.interface_type =
                    serde_json::from_value(serde_json::Value::String(value.trim().to_owned()))
                        .map_err(|_| format!("type {value:?} is not a link kind"))?;
                if spec.interface_type == LinkKind::Other && value.trim() != "other" {
                    return Err(format!(
                        "type {value:?} is not one of fiber, cable, dsl, ethernet, mpls, lte, five_g, starlink, satellite, other"
                    ));
                }
            }
            "bandwidth" => {
                spec.bandwidth_mbps = Some(
                    value
                        .trim()
                        .parse()
                        .ok()
                        .filter(|b| *b > 0)
                        .ok_or_else(|| format!("bandwidth {value:?} is not a positive Mbit/s"))?,
                )
            }
            "cost" => {
                spec.cost_per_gb = value
                    .trim()
                    .parse()
                    .ok()
                    .filter(|c: &f64| c.is_finite() && *c >= 0.0)
                    .ok_or_else(|| format!("cost {value:?} is not a cost per GB"))?
            }
            "metered" => {
                spec.metered = value
                    .trim()
                    .parse()
                    .map_err(|_| format!("metered {value:?} is not true or false"))?
            }
            other => return Err(format!("unknown uplink setting {other:?}")),
        }
    }
    spec.name = name.ok_or("name= is missing")?;
    spec.address = address.ok_or("address= is missing")?;
    Ok(spec)
}

/// A CSR for this site (`CN=<site>, O=<tenant>`), as the controller requires.
pub(crate) fn site_csr(
    key: &rcgen::KeyPair,
    tenant: TenantId,
    site: SiteId,
) -> anyhow::Result<String> {
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, site.to_string());
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, tenant.to_string());
    Ok(params.serialize_request(key)?.pem()?)
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The uplinks of a host that named none (pure): every interface with an IPv4 default route
/// in any routing table, in order of first appearance, with its first global IPv4 address;
/// named after the interface, kind `other`. Interfaces with a default route but no global
/// address (a point-to-point link with a private peer address, say) are left out.
pub fn detect_uplinks(
    routes: &[crate::netlink::RouteEntry],
    links: &std::collections::BTreeMap<u32, String>,
    addresses: &[crate::netlink::Address],
) -> Vec<UplinkSpec> {
    let mut devices: Vec<u32> = Vec::new();
    for route in routes {
        let default_v4 = route.dst.prefix_len() == 0 && route.dst.addr().is_ipv4();
        if let Some(oif) = route.oif.filter(|_| default_v4) {
            if !devices.contains(&oif) {
                devices.push(oif);
            }
        }
    }
    devices
        .into_iter()
        .filter_map(|index| {
            let name = links.get(&index)?;
            let address = addresses
                .iter()
                .find(|a| a.link == index && a.global && a.net.addr().is_ipv4())?;
            Some(UplinkSpec {
                name: name.clone(),
                address: address.net.addr(),
                interface_type: LinkKind::Other,
                bandwidth_mbps: None,
                cost_per_gb: 0.0,
                metered: false,
            })
        })
        .collect()
}

/// [`detect_uplinks`] on this host (route netlink).
pub fn discover_uplinks() -> anyhow::Result<Vec<UplinkSpec>> {
    let netlink = crate::netlink::Netlink::open()
        .context("opening route netlink to find this host's uplinks")?;
    let links = netlink
        .links()?
        .into_iter()
        .map(|l| (l.index, l.name))
        .collect();
    Ok(detect_uplinks(
        &netlink.routes()?,
        &links,
        &netlink.addresses()?,
    ))
}

/// Enroll and write the state directory. Prints one line per step.
pub fn enroll(
    controller: &str,
    token: &str,
    uplinks: Vec<UplinkSpec>,
    state: &StateDir,
    force: bool,
) -> anyhow::Result<Identity> {
    let started = Instant::now();
    if state.is_enrolled() && !force {
        let identity = state.identity()?;
        bail!(
            "{} already holds site {} ({}); pass --force to enroll this host again",
            state.path.display(),
            identity.site_name,
            identity.site_id
        );
    }
    let uplinks = if uplinks.is_empty() {
        let found = discover_uplinks()?;
        if found.is_empty() {
            bail!("this host has no default route with a global address to use as an uplink; name them: --uplink name=wan0,address=<public IP>");
        }
        for u in &found {
            eprintln!(
                "enroll: uplink {} = {} (found from its default route; name uplinks with --uplink to set their type, bandwidth and cost)",
                u.name, u.address
            );
        }
        found
    } else {
        uplinks
    };
    let claims = peek_claims(token)
        .context("the token is not an enrollment token; copy it again from the portal or `patronus-controller token create`")?;
    let (tenant, site) = (TenantId(claims.tenant), SiteId(claims.sub));
    let controller = controller.trim_end_matches('/');

    eprintln!(
        "enroll: generating WireGuard, certificate and NATS keys for site {} ({site})",
        claims.site_name
    );
    let wg_private = wireguard_control::Key::generate_private();
    let wg_public = WgPublicKey(wg_private.get_public().0);
    let cert_key = rcgen::KeyPair::generate().context("generating the certificate key")?;
    let nats_key = nkeys::KeyPair::new_user();
    let request = EnrollRequest {
        token: token.trim().to_owned(),
        csr_pem: site_csr(&cert_key, tenant, site)?,
        wg_public_key: wg_public,
        nats_public_key: nats_key.public_key(),
        uplinks: uplinks.clone(),
    };

    eprintln!("enroll: sending public keys to {controller}");
    let response = ureq::post(&format!("{controller}/api/v1/enroll"))
        .timeout(ENROLL_TIMEOUT)
        .send_json(&request);
    let answer: EnrollResponse = match response {
        Ok(r) => r
            .into_json()
            .context("the controller's answer is not an enrollment response")?,
        Err(ureq::Error::Status(code, r)) => {
            let body: serde_json::Value = r.into_json().unwrap_or_default();
            bail!(
                "the controller refused the enrollment ({code} {}): {}",
                body["error"].as_str().unwrap_or("error"),
                body["detail"].as_str().unwrap_or("no detail")
            );
        }
        Err(e) => {
            bail!("cannot reach the controller at {controller}: {e}; check the URL and the network")
        }
    };
    if answer.site_id != site || answer.tenant_id != tenant {
        bail!("the controller answered for another site; refusing to store it");
    }

    eprintln!("enroll: writing {}", state.path.display());
    state.create()?;
    let seed = nats_key
        .seed()
        .map_err(|e| anyhow::anyhow!("NATS seed: {e}"))?;
    state.write(
        state::WIREGUARD_KEY_FILE,
        format!("{}\n", wg_private.to_base64()).as_bytes(),
    )?;
    state.write(state::SITE_KEY_FILE, cert_key.serialize_pem().as_bytes())?;
    state.write(state::SITE_CERT_FILE, answer.certificate_pem.as_bytes())?;
    state.write(state::CA_CERT_FILE, answer.ca_certificate_pem.as_bytes())?;
    state.write(
        state::NATS_CREDS_FILE,
        creds_file(&answer.nats.user_jwt, &seed).as_bytes(),
    )?;
    let identity = Identity {
        controller_url: controller.to_owned(),
        tenant_id: tenant,
        site_id: site,
        site_name: answer.site_name,
        overlay_address: answer.overlay_address,
        listen_port_base: answer.listen_port_base,
        expires_at: answer.expires_at,
        enrolled_at: now_unix(),
        renewed_at: None,
        nats_url: answer.nats.url,
        inbox_prefix: answer.nats.inbox_prefix,
        intent: answer.intent,
        uplinks,
    };
    // Last: its presence marks a complete state directory.
    state.write(
        state::IDENTITY_FILE,
        serde_json::to_string_pretty(&identity)?.as_bytes(),
    )?;
    eprintln!(
        "enroll: site {} ({}) of tenant {} enrolled in {} ms; overlay {}; run `patronus-edge run` next",
        identity.site_name,
        identity.site_id,
        identity.tenant_id,
        started.elapsed().as_millis(),
        identity.overlay_address
    );
    Ok(identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uplinks_are_found_from_default_routes_in_every_table() {
        use crate::netlink::{Address, RouteEntry};
        let default = |table, oif, gateway: Option<&str>| RouteEntry {
            table,
            dst: "0.0.0.0/0".parse().unwrap(),
            oif: Some(oif),
            gateway: gateway.map(|g| g.parse().unwrap()),
            pref_src: None,
        };
        let routes = [
            default(1100, 2, Some("198.18.1.2")),
            default(1101, 3, Some("198.18.1.6")),
            default(254, 2, Some("198.18.1.2")),
            default(254, 9, None),
            RouteEntry {
                dst: "10.9.0.0/16".parse().unwrap(),
                ..default(254, 4, None)
            },
        ];
        let links = [(2, "wan0"), (3, "wan1"), (4, "lan0"), (9, "tun9")]
            .into_iter()
            .map(|(i, n)| (i, n.to_owned()))
            .collect();
        let address = |link, net: &str, global| Address {
            link,
            net: net.parse().unwrap(),
            global,
        };
        let addresses = [
            address(2, "fe80::1/64", false),
            address(2, "198.18.1.1/30", true),
            address(3, "198.18.1.5/30", true),
            address(4, "10.1.0.1/24", true),
            address(9, "10.255.0.1/32", false),
        ];
        let found = detect_uplinks(&routes, &links, &addresses);
        let named: Vec<(String, String)> = found
            .iter()
            .map(|u| (u.name.clone(), u.address.to_string()))
            .collect();
        assert_eq!(
            named,
            [
                ("wan0".to_owned(), "198.18.1.1".to_owned()),
                ("wan1".to_owned(), "198.18.1.5".to_owned())
            ],
            "tun9 has no global address; lan0 no default route"
        );
        assert!(detect_uplinks(&[], &links, &addresses).is_empty());
    }

    #[test]
    fn uplinks_parse_with_defaults_and_errors_name_the_part() {
        let u = parse_uplink("name=fiber,address=198.18.1.1,type=fiber,bandwidth=1000").unwrap();
        assert_eq!(u.name, "fiber");
        assert_eq!(u.interface_type, LinkKind::Fiber);
        assert_eq!(u.bandwidth_mbps, Some(1000));
        let lte =
            parse_uplink("name=lte,address=198.19.1.1,type=lte,cost=2.5,metered=true").unwrap();
        assert!(lte.metered);
        for (bad, says) in [
            ("address=198.18.1.1", "name"),
            ("name=x", "address"),
            ("name=x,address=nope", "address"),
            ("name=x,address=198.18.1.1,type=warp", "type"),
            ("name=x,address=198.18.1.1,bandwidth=0", "bandwidth"),
            ("name=x,address=198.18.1.1,colour=red", "colour"),
            ("garbage", "key=value"),
        ] {
            let err = parse_uplink(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn the_csr_names_the_site_and_tenant() {
        let key = rcgen::KeyPair::generate().unwrap();
        let (tenant, site) = (TenantId(uuid::Uuid::new_v4()), SiteId(uuid::Uuid::new_v4()));
        let pem = site_csr(&key, tenant, site).unwrap();
        let csr = rcgen::CertificateSigningRequestParams::from_pem(&pem).unwrap();
        let names: Vec<_> = csr.params.distinguished_name.iter().collect();
        assert_eq!(names.len(), 2);
    }
}
