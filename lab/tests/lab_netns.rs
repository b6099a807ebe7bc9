//! `patronus-lab up/status/down` on the real kernel (root, network namespaces): the WAN
//! carries traffic between every uplink and by the right uplink, LANs reach their router but
//! not each other (only tunnels will join them), the management link reaches the host end,
//! and `down` removes everything, also what a crashed `up` left behind.

use std::process::{Command, Output};

use anyhow::{ensure, Context};

fn lab(args: &[&str]) -> anyhow::Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_patronus-lab"))
        .args(args)
        .output()
        .context("running patronus-lab")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// One ping from namespace `ns` (optionally from a source address) to a lab address.
fn ping(ns: &str, from: Option<&str>, to: &str) -> anyhow::Result<bool> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "ping", "-c", "1", "-W", "1"]);
    if let Some(from) = from {
        cmd.args(["-I", from]);
    }
    Ok(cmd.arg(to).output()?.status.success())
}

fn lab_leftovers() -> anyhow::Result<(usize, bool)> {
    let list = Command::new("ip").args(["netns", "list"]).output()?;
    let namespaces = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|l| l.starts_with("pl-"))
        .count();
    let bridge = Command::new("ip")
        .args(["link", "show", "pl-mgmt"])
        .output()?
        .status
        .success();
    Ok((namespaces, bridge))
}

#[test]
fn a_lab_comes_up_routes_the_wan_isolates_lans_and_goes_down_cleanly() -> anyhow::Result<()> {
    let euid = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|r| r.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    ensure!(
        euid,
        "this test creates network namespaces and must run as root (scripts/test does)"
    );
    ensure!(
        lab_leftovers()? == (0, false),
        "a lab is already up on this host; run `patronus-lab down` (or `scripts/demo --down`) first"
    );

    let out = lab(&["up", "--sites", "3", "--uplinks", "2"])?;
    ensure!(out.status.success(), "{}", text(&out));
    let checks = (|| -> anyhow::Result<()> {
        // The WAN: any uplink to any uplink, sourced from each uplink's own address.
        ensure!(
            ping("pl-s1", Some("198.18.1.1"), "198.18.2.1")?,
            "wan0 → site2 wan0"
        );
        ensure!(
            ping("pl-s1", Some("198.18.1.5"), "198.18.3.5")?,
            "wan1 → site3 wan1"
        );
        ensure!(
            ping("pl-s3", Some("198.18.3.5"), "198.18.1.1")?,
            "site3 wan1 → site1 wan0"
        );
        // LAN host to its router; management to the host end of the link.
        ensure!(ping("pl-s2-lan", None, "10.2.0.1")?, "LAN host → router");
        ensure!(
            ping("pl-s2", None, "198.19.254.1")?,
            "router → management host"
        );
        // LANs do not reach each other over the bare WAN.
        ensure!(
            !ping("pl-s1-lan", None, "10.2.0.10")?,
            "LAN to LAN without a tunnel"
        );
        let out = lab(&["status", "--json"])?;
        ensure!(out.status.success(), "{}", text(&out));
        let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        ensure!(
            status["up"] == true && status["namespaces"] == 7,
            "{status}"
        );
        ensure!(
            status["sites"]
                .as_array()
                .is_some_and(|s| s.len() == 3 && s.iter().all(|s| s["present"] == true)),
            "{status}"
        );
        // A second lab on top is refused.
        let out = lab(&["up", "--sites", "2"])?;
        ensure!(
            !out.status.success() && text(&out).contains("already up"),
            "{}",
            text(&out)
        );
        Ok(())
    })();
    let out = lab(&["down"])?;
    checks?;
    ensure!(out.status.success(), "{}", text(&out));
    ensure!(lab_leftovers()? == (0, false), "down left something behind");

    // What a crashed `up` leaves (a namespace and the bridge) goes too.
    for args in [
        vec!["netns", "add", "pl-inet"],
        vec!["netns", "add", "pl-s1"],
        vec!["link", "add", "pl-mgmt", "type", "bridge"],
    ] {
        ensure!(Command::new("ip").args(&args).status()?.success());
    }
    let out = lab(&["down"])?;
    ensure!(out.status.success(), "{}", text(&out));
    ensure!(
        lab_leftovers()? == (0, false),
        "down after a crash left something behind"
    );
    let out = lab(&["status"])?;
    ensure!(text(&out).contains("no lab is up"), "{}", text(&out));
    Ok(())
}
