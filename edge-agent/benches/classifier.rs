//! The policy matcher in Rust (`classifier::Matcher`, the same bitmap algorithm the BPF
//! classifier runs) over 1,000 compiled policies: `cargo bench -p patronus-edge --bench
//! classifier`. Baseline in the same run: the reference scan of the policies in order.

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use patronus_proto::policy::{
    AppClass, LoadBalancing, MatchRules, PathPreference, PortRange, Protocol, RoutingPolicy, Sla,
};
use patronus_proto::PolicyId;

// The agent is a binary; its pure modules are compiled in here as they are.
#[path = "../src/dataplane/abi.rs"]
pub mod abi;
mod dataplane {
    pub use super::abi;
}
#[path = "../src/classifier.rs"]
mod classifier;

/// 1,000 policies: UDP to ports 20000..21000 from 10.<n/256>.<n%256>.0/24, priority = n.
fn policies() -> Vec<RoutingPolicy> {
    (0..1000u32)
        .map(|n| RoutingPolicy {
            id: PolicyId(uuid::Uuid::from_u128(u128::from(n) + 1)),
            name: format!("p{n}"),
            priority: n as u16,
            enabled: true,
            match_rules: MatchRules {
                src_prefixes: vec![format!("10.{}.{}.0/24", n / 256, n % 256).parse().unwrap()],
                protocol: Some(Protocol::Udp),
                dst_ports: vec![PortRange::single(20000 + n as u16)],
                ..MatchRules::default()
            },
            app_class: AppClass::new(&format!("class{}", n % 32)),
            path_preference: PathPreference::LowestLatency,
            load_balancing: LoadBalancing::FlowHash,
            sla: Sla::default(),
            probe_interval_ms: None,
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let policies = policies();
    let compiled = classifier::compile(&policies).expect("1,000 policies compile");
    let matcher = classifier::Matcher::new(&compiled);
    // Matches the lowest-priority policy (n = 0), the worst case for a scan.
    let packet = classifier::PacketFields {
        src: "10.0.0.9".parse::<IpAddr>().unwrap(),
        dst: "10.2.0.10".parse().unwrap(),
        protocol: 17,
        src_port: 40000,
        dst_port: 20000,
        dscp: 0,
    };
    assert_eq!(
        matcher.classify(&packet).map(|r| compiled.rules[r].policy),
        classifier::reference_match(&policies, &packet)
    );
    c.bench_function("classifier/matcher_1000_policies", |b| {
        b.iter(|| matcher.classify(black_box(&packet)))
    });
    c.bench_function("classifier/reference_scan_1000_policies", |b| {
        b.iter(|| classifier::reference_match(black_box(&policies), black_box(&packet)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
