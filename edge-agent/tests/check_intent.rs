//! `patronus-edge check-intent` on good and bad input: exit status and one-line messages.

use std::io::Write;
use std::process::{Command, Output};

use patronus_proto::intent::{
    FailoverSettings, Overlay, ProbeSettings, SiteIntent, Uplink, WireguardSettings,
};
use patronus_proto::policy::{LinkKind, PolicySet};
use patronus_proto::{codec, SiteId, TenantId, WgPublicKey, SCHEMA_VERSION};

fn intent() -> SiteIntent {
    SiteIntent {
        schema_version: SCHEMA_VERSION,
        tenant: TenantId(uuid_from(1)),
        site: SiteId(uuid_from(2)),
        site_name: "hq".into(),
        revision: 5,
        generated_at_unix_ms: 0,
        overlay: Overlay {
            address: "100.64.0.1".parse().unwrap(),
            network: "100.64.0.0/16".parse().unwrap(),
            lan_prefixes: vec!["10.0.1.0/24".parse().unwrap()],
        },
        uplinks: vec![Uplink {
            index: 0,
            name: "wan0".into(),
            kind: LinkKind::Fiber,
            interface: None,
            bandwidth_mbps: None,
            cost_per_gb: 0.0,
            metered: false,
        }],
        wireguard: WireguardSettings {
            public_key: WgPublicKey([1; 32]),
            listen_port_base: 51820,
            mtu: 1420,
            persistent_keepalive_s: 25,
        },
        peers: vec![],
        paths: vec![],
        policies: PolicySet::default(),
        probe: ProbeSettings::default(),
        failover: FailoverSettings::default(),
    }
}

fn uuid_from(n: u128) -> uuid::Uuid {
    uuid::Uuid::from_u128(n)
}

fn run(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_patronus-edge"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("patronus-edge runs");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn a_valid_intent_passes_with_a_summary() {
    let out = run(&["check-intent", "-", "--json"], &codec::encode(&intent()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["revision"], 5);
    assert_eq!(summary["valid"], true);
}

#[test]
fn bad_input_fails_with_one_line() {
    let mut stale = intent();
    stale.revision = 3;
    let cases: Vec<(Vec<&str>, Vec<u8>, &str)> = vec![
        (
            vec!["check-intent", "-"],
            b"{not json".to_vec(),
            "not valid JSON",
        ),
        (
            vec!["check-intent", "-"],
            b"{}".to_vec(),
            "no schema_version",
        ),
        (
            vec!["check-intent", "-"],
            br#"{"schema_version":"9.0"}"#.to_vec(),
            "schema version 9.0",
        ),
        (
            vec!["check-intent", "/nonexistent/intent.json"],
            vec![],
            "cannot open",
        ),
        (
            vec![
                "check-intent",
                "-",
                "--tenant",
                "00000000-0000-0000-0000-000000000001",
                "--site",
                "00000000-0000-0000-0000-000000000002",
                "--applied-revision",
                "4",
            ],
            codec::encode(&stale),
            "not above the applied revision 4",
        ),
    ];
    for (args, input, expected) in cases {
        let out = run(&args, &input);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
    }
}
