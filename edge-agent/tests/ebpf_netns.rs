//! The compiled XDP program passes the kernel verifier and forwards traffic: attached to a
//! veth in a network namespace this test creates, pings across it still get through.
//! Needs root (network namespaces, BPF); `scripts/test` runs as root. Without the capability
//! the test fails with a message saying so, never passes silently.

use std::process::Command;

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip (install iproute2 via scripts/setup): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Two namespaces joined by a veth pair, removed on drop.
struct Pair {
    a: String,
    b: String,
}

impl Pair {
    fn create() -> Result<Self, String> {
        let id = std::process::id();
        let pair = Pair {
            a: format!("pt-xdp-a-{id}"),
            b: format!("pt-xdp-b-{id}"),
        };
        ip(&["netns", "add", &pair.a])
            .map_err(|e| format!("{e} (this test needs root: run scripts/test as root)"))?;
        ip(&["netns", "add", &pair.b])?;
        ip(&[
            "-n", &pair.a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns",
            &pair.b,
        ])?;
        // RFC 2544 benchmarking addresses, only inside these namespaces.
        ip(&["-n", &pair.a, "addr", "add", "198.18.255.1/30", "dev", "va"])?;
        ip(&["-n", &pair.b, "addr", "add", "198.18.255.2/30", "dev", "vb"])?;
        ip(&["-n", &pair.a, "link", "set", "va", "up"])?;
        ip(&["-n", &pair.b, "link", "set", "vb", "up"])?;
        Ok(pair)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

#[test]
fn xdp_lan_program_loads_and_passes_traffic() {
    let object = concat!(env!("PATRONUS_EBPF_OUT_DIR"), "/lan_steer.o");
    let pair = Pair::create().unwrap_or_else(|e| panic!("cannot build the test namespaces: {e}"));
    ip(&[
        "-n", &pair.b, "link", "set", "dev", "vb", "xdp", "obj", object, "sec", "xdp",
    ])
    .unwrap_or_else(|e| panic!("the verifier or the kernel refused lan_steer.o: {e}"));
    let link = ip(&["-n", &pair.b, "link", "show", "vb"]).unwrap();
    assert!(link.contains("prog/xdp"), "no XDP program on vb: {link}");

    let ping = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pair.a,
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "2",
            "198.18.255.2",
        ])
        .output()
        .expect("ping runs");
    assert!(
        ping.status.success(),
        "pings through the XDP program failed: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
}

/// `patronus-edge bench dataplane --json` runs the real programs in the kernel and prints the
/// documented keys (the figures themselves go to BENCHMARKS.md, not into assertions).
#[test]
fn bench_dataplane_prints_its_figures() {
    let out = Command::new(env!("CARGO_BIN_EXE_patronus-edge"))
        .args(["bench", "dataplane", "--json"])
        .output()
        .expect("patronus-edge runs");
    assert!(
        out.status.success(),
        "bench dataplane failed (needs root with CAP_BPF; scripts/test runs as root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let figures: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    for key in [
        "empty_ns",
        "flow_hit_ns",
        "miss_1000_policies_ns",
        "hit_1m_flows_ns",
    ] {
        let value = figures[key].as_f64().unwrap_or(-1.0);
        assert!(value > 0.0, "{key} missing or not positive: {figures}");
    }
}
