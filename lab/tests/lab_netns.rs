//! `patronus-lab up/status/down` on the real kernel (root, network namespaces): the WAN
//! carries traffic between every uplink and by the right uplink, LANs reach their router but
//! not each other (only tunnels will join them), the management link reaches the host end,
//! the WAN emulator's delay, loss and cut are what they claim, and `down` removes
//! everything, also what a crashed `up` left behind.

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

/// Run `work` on a thread inside network namespace `ns`.
fn in_netns<T: Send + 'static>(
    ns: &str,
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> std::thread::JoinHandle<anyhow::Result<T>> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(&path)?;
        // SAFETY: a valid namespace descriptor; only this thread moves.
        ensure!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } == 0,
            "setns {path}"
        );
        work()
    })
}

/// Average RTT in ms of `count` pings from site 1's wan0 to site 2's wan0.
fn average_rtt_ms(count: u32) -> anyhow::Result<f64> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            "pl-s1",
            "ping",
            "-q",
            "-c",
            &count.to_string(),
            "-i",
            "0.05",
        ])
        .args(["-W", "2", "-I", "198.18.1.1", "198.18.2.1"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let avg = text
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no RTT in ping output: {text}"))?;
    Ok(avg)
}

/// Fraction of `n` UDP datagrams from site 1's wan0 that reach site 2's wan0 (one way).
fn one_way_delivery(n: u32) -> anyhow::Result<f64> {
    let receiver = in_netns("pl-s2", move || {
        let socket = std::net::UdpSocket::bind("198.18.2.1:9999")?;
        socket.set_read_timeout(Some(std::time::Duration::from_millis(500)))?;
        let mut got = 0u32;
        let mut buf = [0u8; 64];
        while socket.recv(&mut buf).is_ok() {
            got += 1;
        }
        Ok(got)
    });
    std::thread::sleep(std::time::Duration::from_millis(200));
    let sender = in_netns("pl-s1", move || {
        let socket = std::net::UdpSocket::bind("198.18.1.1:0")?;
        for i in 0..n {
            socket.send_to(&i.to_be_bytes(), "198.18.2.1:9999")?;
            if i % 50 == 0 {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
        Ok(())
    });
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    let got = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    Ok(f64::from(got) / f64::from(n))
}

/// The emulator does what it says: 40 ms delay → 40±2 ms RTT, 10 % loss → 10±2 % one way,
/// a cut drops everything on that uplink only, and restore brings it back.
fn check_wan_emulator() -> anyhow::Result<()> {
    let base = average_rtt_ms(10)?;
    let out = lab(&["impair", "--site", "1", "--uplink", "0", "--delay", "40"])?;
    ensure!(out.status.success(), "{}", text(&out));
    let rtt = average_rtt_ms(20)?;
    println!("emulated delay 40 ms: RTT {rtt:.2} ms (baseline {base:.2} ms)");
    ensure!(
        (38.0..=42.0).contains(&rtt),
        "40 ms delay gave an RTT of {rtt} ms"
    );

    let out = lab(&["impair", "--site", "1", "--uplink", "0", "--loss", "10"])?;
    ensure!(out.status.success(), "{}", text(&out));
    let delivered = one_way_delivery(5000)?;
    let loss = (1.0 - delivered) * 100.0;
    println!("emulated loss 10 %: measured {loss:.2} % one way over 5000 datagrams");
    ensure!((8.0..=12.0).contains(&loss), "10 % loss measured {loss} %");

    let out = lab(&["impair", "--site", "1", "--uplink", "0", "--cut"])?;
    ensure!(out.status.success(), "{}", text(&out));
    ensure!(
        !ping("pl-s1", Some("198.18.1.1"), "198.18.2.1")?,
        "a cut uplink passed traffic"
    );
    ensure!(
        ping("pl-s1", Some("198.18.1.5"), "198.18.2.1")?,
        "the other uplink suffered from the cut"
    );
    let out = lab(&["impair", "--site", "1", "--uplink", "0", "--restore"])?;
    ensure!(out.status.success(), "{}", text(&out));
    ensure!(
        ping("pl-s1", Some("198.18.1.1"), "198.18.2.1")?,
        "restore did not restore"
    );
    let out = lab(&["impair", "--site", "7", "--uplink", "0", "--delay", "1"])?;
    ensure!(
        !out.status.success() && text(&out).contains("sites 1-3"),
        "{}",
        text(&out)
    );
    Ok(())
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
        check_wan_emulator()?;
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
