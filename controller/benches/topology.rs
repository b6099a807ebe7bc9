//! Topology computation at the seed's scale targets: 50 sites in full mesh, 500 sites
//! hierarchical (goal: under 50 ms), 5,000 sites hybrid. Two uplinks per site.
//!
//! Run: `cargo bench -p patronus-controller --bench topology`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use patronus_controller::topology::{compute, TopologyMode, TopologySettings, TopologySite};
use patronus_proto::SiteId;
use uuid::Uuid;

const REGIONS: [&str; 6] = [
    "us-east",
    "us-west",
    "eu-west",
    "eu-central",
    "ap-south",
    "ap-east",
];

fn sites(n: usize) -> Vec<TopologySite> {
    (0..n)
        .map(|i| TopologySite {
            id: SiteId(Uuid::from_u128(0x5eed_0000_0000 + i as u128)),
            region: Some(REGIONS[i % REGIONS.len()].to_owned()),
            uplinks: vec![0, 1],
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("topology");
    group.sample_size(20);

    let full = sites(50);
    let settings = TopologySettings {
        mode: TopologyMode::FullMesh,
        max_peers: 64,
        ..Default::default()
    };
    group.bench_function(BenchmarkId::new("full_mesh", 50), |b| {
        b.iter(|| compute(&full, &settings).expect("valid"))
    });

    // 500 sites, two regional hubs per region (12 hubs).
    let hier = sites(500);
    let settings = TopologySettings {
        mode: TopologyMode::Hierarchical,
        hub_sites: hier.iter().take(12).map(|s| s.id).collect(),
        max_peers: 20,
        ..Default::default()
    };
    group.bench_function(BenchmarkId::new("hierarchical", 500), |b| {
        b.iter(|| compute(&hier, &settings).expect("valid"))
    });

    // 5,000 sites: 10 critical sites and 30 hubs in the core, every other site a spoke.
    let hybrid = sites(5000);
    let settings = TopologySettings {
        mode: TopologyMode::Hybrid,
        full_mesh_sites: hybrid.iter().skip(30).take(10).map(|s| s.id).collect(),
        hub_sites: hybrid.iter().take(30).map(|s| s.id).collect(),
        nearest_hub: true,
        same_region_mesh: false,
        // Core sites peer with the 39 other core members.
        max_peers: 48,
        ..Default::default()
    };
    group.bench_function(BenchmarkId::new("hybrid", 5000), |b| {
        b.iter(|| compute(&hybrid, &settings).expect("valid"))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
