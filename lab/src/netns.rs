//! Bringing a lab up and down with iproute2.
//!
//! [`up_steps`] is pure: the plan in, the `ip` invocations out, in order, so tests can read
//! exactly what `up` does. [`run_steps`] runs them and stops at the first failure with the
//! command and its error. [`down`] removes everything with the lab's prefix whether or not
//! `up` finished (after a crash too): the namespaces (their veths go with them) and the host
//! bridge.
//!
//! Topology per site `i`: router namespace `pl-s<i>` with `lan0` to the LAN host namespace
//! `pl-s<i>-lan` (`eth0`), `wan<u>` to the internet namespace `pl-inet` (`s<i>u<u>`), and
//! `mgmt0` to the host bridge `pl-mgmt` (`pl-m<i>`). Each uplink has its own routing table
//! (`100+u`, chosen by source address) so traffic from an uplink's address leaves by that
//! uplink, as with two ISPs. The internet namespace forwards between all uplinks and knows no
//! LAN prefix, so LANs only reach each other through the tunnels the edge agents build.

use std::process::Command;

use anyhow::{bail, Context};

use crate::plan::{LabPlan, MGMT_BRIDGE, PREFIX};

/// One `ip` invocation (arguments after `ip`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step(pub Vec<String>);

fn step(args: &[&str]) -> Step {
    Step(args.iter().map(|a| (*a).to_owned()).collect())
}

fn in_ns(ns: &str, args: &[&str]) -> Step {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    step(&all)
}

/// Routing table of an uplink in the router namespace.
pub fn uplink_table(index: u8) -> u32 {
    100 + u32::from(index)
}

/// Turn on IPv4 forwarding in a namespace (a sysctl is per namespace).
fn forwarding(ns: &str) -> Step {
    step(&[
        "netns",
        "exec",
        ns,
        "sh",
        "-c",
        "echo 1 > /proc/sys/net/ipv4/ip_forward",
    ])
}

/// Every `ip` invocation that builds `plan`, in order.
pub fn up_steps(plan: &LabPlan) -> Vec<Step> {
    let inet = plan.internet_ns.as_str();
    let mut steps = vec![
        step(&["netns", "add", inet]),
        in_ns(inet, &["link", "set", "lo", "up"]),
        forwarding(inet),
        step(&["link", "add", &plan.mgmt_bridge, "type", "bridge"]),
        step(&[
            "addr",
            "add",
            &plan.mgmt_host_addr.to_string(),
            "dev",
            &plan.mgmt_bridge,
        ]),
        step(&["link", "set", &plan.mgmt_bridge, "up"]),
    ];
    for site in &plan.sites {
        let router = site.router_ns.as_str();
        let lan = site.lan_ns.as_str();
        steps.extend([
            step(&["netns", "add", router]),
            step(&["netns", "add", lan]),
            in_ns(router, &["link", "set", "lo", "up"]),
            in_ns(lan, &["link", "set", "lo", "up"]),
            forwarding(router),
            // LAN: router lan0 <-> host eth0.
            in_ns(
                router,
                &[
                    "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", lan,
                ],
            ),
            in_ns(
                router,
                &[
                    "addr",
                    "add",
                    &site.lan_router_addr.to_string(),
                    "dev",
                    "lan0",
                ],
            ),
            in_ns(router, &["link", "set", "lan0", "up"]),
            in_ns(
                lan,
                &[
                    "addr",
                    "add",
                    &site.lan_host_addr.to_string(),
                    "dev",
                    "eth0",
                ],
            ),
            in_ns(lan, &["link", "set", "eth0", "up"]),
            in_ns(
                lan,
                &[
                    "route",
                    "add",
                    "default",
                    "via",
                    &site.lan_router_addr.addr().to_string(),
                ],
            ),
            // Management: the host bridge <-> router mgmt0.
            step(&[
                "link",
                "add",
                &site.mgmt_host_if,
                "type",
                "veth",
                "peer",
                "name",
                "mgmt0",
                "netns",
                router,
            ]),
            step(&[
                "link",
                "set",
                &site.mgmt_host_if,
                "master",
                &plan.mgmt_bridge,
                "up",
            ]),
            in_ns(
                router,
                &["addr", "add", &site.mgmt_addr.to_string(), "dev", "mgmt0"],
            ),
            in_ns(router, &["link", "set", "mgmt0", "up"]),
        ]);
        for uplink in &site.uplinks {
            let table = uplink_table(uplink.index).to_string();
            let gateway = uplink.internet_addr.addr().to_string();
            steps.extend([
                in_ns(
                    router,
                    &[
                        "link",
                        "add",
                        &uplink.router_if,
                        "type",
                        "veth",
                        "peer",
                        "name",
                        &uplink.internet_if,
                        "netns",
                        inet,
                    ],
                ),
                in_ns(
                    router,
                    &[
                        "addr",
                        "add",
                        &uplink.router_addr.to_string(),
                        "dev",
                        &uplink.router_if,
                    ],
                ),
                in_ns(router, &["link", "set", &uplink.router_if, "up"]),
                in_ns(
                    inet,
                    &[
                        "addr",
                        "add",
                        &uplink.internet_addr.to_string(),
                        "dev",
                        &uplink.internet_if,
                    ],
                ),
                in_ns(inet, &["link", "set", &uplink.internet_if, "up"]),
                // Traffic from this uplink's address leaves by this uplink.
                in_ns(
                    router,
                    &[
                        "route",
                        "add",
                        "default",
                        "via",
                        &gateway,
                        "dev",
                        &uplink.router_if,
                        "table",
                        &table,
                    ],
                ),
                in_ns(
                    router,
                    &[
                        "rule",
                        "add",
                        "from",
                        &uplink.router_addr.addr().to_string(),
                        "table",
                        &table,
                        "priority",
                        &(1000 + u32::from(uplink.index)).to_string(),
                    ],
                ),
            ]);
        }
        // The router's own default route: its first uplink.
        if let Some(first) = site.uplinks.first() {
            steps.push(in_ns(
                router,
                &[
                    "route",
                    "add",
                    "default",
                    "via",
                    &first.internet_addr.addr().to_string(),
                    "dev",
                    &first.router_if,
                ],
            ));
        }
    }
    steps
}

/// Run `ip` with these arguments; the error names the command and what `ip` said.
pub fn ip(args: &[String]) -> anyhow::Result<String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (iproute2; scripts/setup installs it)")?;
    if !output.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

pub fn run_steps(steps: &[Step]) -> anyhow::Result<()> {
    for s in steps {
        ip(&s.0)?;
    }
    Ok(())
}

/// The lab's namespaces that exist now.
pub fn lab_namespaces() -> anyhow::Result<Vec<String>> {
    let listing = ip(&["netns".into(), "list".into()])?;
    Ok(listing
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with(PREFIX))
        .map(str::to_owned)
        .collect())
}

/// Remove every namespace and host interface of the lab. Returns how many namespaces went.
pub fn down() -> anyhow::Result<usize> {
    let namespaces = lab_namespaces()?;
    // A process inside (an edge agent, wireguard-go) keeps a deleted namespace alive with
    // its interfaces; stop them first.
    for ns in &namespaces {
        let pids = ip(&["netns".into(), "pids".into(), ns.clone()]).unwrap_or_default();
        for pid in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
            // SAFETY: signalling a process that lives in the lab's own namespace.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    for ns in &namespaces {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while !ip(&["netns".into(), "pids".into(), ns.clone()])
            .unwrap_or_default()
            .trim()
            .is_empty()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        for pid in ip(&["netns".into(), "pids".into(), ns.clone()])
            .unwrap_or_default()
            .lines()
            .filter_map(|p| p.trim().parse::<i32>().ok())
        {
            // SAFETY: as above; it did not stop on SIGTERM.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        ip(&["netns".into(), "del".into(), ns.clone()])?;
    }
    // Host-side veths normally die with their peers; remove any a lingering namespace kept.
    let links = ip(&["-o".into(), "link".into(), "show".into()]).unwrap_or_default();
    for name in links
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n))
        .filter(|n| n.starts_with(PREFIX) && *n != MGMT_BRIDGE)
    {
        let _ = ip(&["link".into(), "del".into(), name.to_owned()]);
    }
    if ip(&["link".into(), "show".into(), MGMT_BRIDGE.into()]).is_ok() {
        ip(&["link".into(), "del".into(), MGMT_BRIDGE.into()])?;
    }
    Ok(namespaces.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::plan;

    #[test]
    fn up_creates_each_namespace_once_and_every_address_of_the_plan() {
        let lab = plan(3, 2).unwrap();
        let steps = up_steps(&lab);
        let created: Vec<&str> = steps
            .iter()
            .filter(|s| s.0.len() == 3 && s.0[0] == "netns" && s.0[1] == "add")
            .map(|s| s.0[2].as_str())
            .collect();
        assert_eq!(created.len(), 1 + 2 * 3);
        assert!(created.iter().all(|ns| ns.starts_with(PREFIX)));
        let text: Vec<String> = steps.iter().map(|s| s.0.join(" ")).collect();
        for site in &lab.sites {
            for up in &site.uplinks {
                assert!(text.iter().any(|t| t.contains(&up.router_addr.to_string())));
                assert!(text.iter().any(|t| t.contains(&format!(
                    "rule add from {} table {}",
                    up.router_addr.addr(),
                    uplink_table(up.index)
                ))));
            }
            assert!(text.iter().any(|t| t.contains(&site.mgmt_addr.to_string())));
        }
        // Nothing but the management bridge touches the host's own namespace, and it only
        // gets the management address.
        for t in &text {
            if !t.starts_with("-n ") && !t.starts_with("netns ") {
                assert!(t.contains("pl-"), "host step outside the lab: {t}");
            }
        }
    }
}
