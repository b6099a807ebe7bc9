//! `patronus-edge bench dataplane`: per-packet cost of the XDP program, measured in the kernel
//! with `BPF_PROG_TEST_RUN` repeat counts, beside an empty XDP program in the same run.
//!
//! - `empty_ns`: the empty program (the floor: the test-run loop itself);
//! - `flow_hit_ns`: a packet of a flow already in the table;
//! - `miss_1000_policies_ns`: new flows (distinct ports, one run each) classified against
//!   1,000 policies, the match being the lowest-priority one (every bitmap word is scanned);
//! - `hit_1m_flows_ns`: a flow-table hit with 1,048,576 flows in the table.
//!
//! Misses can only be measured one run per flow (a repeat would hit), so `empty_ns` is also
//! measured that way for them (`empty_single_ns`); compare like with like.

use anyhow::Context;
use serde::Serialize;

use super::abi::{ClassPaths, FlowKey, FlowValue, LbMode, PathEntry, PolicyRule, PolicySet};
use super::{packet, test_run, Dataplane};

const REPEAT: u32 = 1_000_000;
const MISSES: u16 = 20_000;

#[derive(Debug, Serialize)]
pub struct Figures {
    pub empty_ns: f64,
    pub flow_hit_ns: f64,
    pub miss_1000_policies_ns: f64,
    pub hit_1m_flows_ns: f64,
    pub empty_single_ns: f64,
    pub repeat: u32,
    pub misses: u16,
}

fn mean_single(fd: std::os::fd::BorrowedFd<'_>, packets: &[Vec<u8>]) -> anyhow::Result<f64> {
    let mut total = 0u64;
    for p in packets {
        total += u64::from(test_run::run(fd, p, 1)?.duration_ns);
    }
    Ok(total as f64 / packets.len() as f64)
}

/// 1,000 policies on UDP destination ports 20000..21000 (rank = port - 20000), each to its
/// own class, all with path 0.
fn thousand_policies(dp: &mut Dataplane) -> anyhow::Result<()> {
    dp.set_path(
        0,
        PathEntry {
            mark: 1100,
            flags: 0,
        },
    )?;
    let mut class = ClassPaths {
        generation: 1,
        lb_mode: LbMode::ActiveBackup as u8,
        count: 1,
        ..ClassPaths::default()
    };
    class.paths[0] = 0;
    dp.set_class_paths(super::abi::class_index(1, 0), class)?;
    let all: Vec<u32> = (0..1000).collect();
    dp.set_prefix_set(true, 0, [0; 16], PolicySet::with(&all))?;
    dp.set_prefix_set(false, 0, [0; 16], PolicySet::with(&all))?;
    dp.set_protocol_set(17, PolicySet::with(&all))?;
    for rank in 0..1000u32 {
        dp.set_dst_port_set(20000 + rank as u16, PolicySet::with(&[rank]))?;
        let rule = PolicyRule {
            class_id: 1,
            src_port_lo: 0,
            src_port_hi: 0xffff,
            dscp: 0xff,
            pad: 0,
        };
        dp.set_policy_rule(rank, rule)?;
    }
    Ok(())
}

pub fn run(json: bool) -> anyhow::Result<()> {
    eprintln!("bench: loading the data plane and the empty baseline program");
    let empty = super::load_empty().context("loading xdp_empty.o")?;
    let mut dp = Dataplane::load()?;
    let packet = packet::udp_ipv4([10, 1, 0, 10], [10, 2, 0, 10], 40000, 20999);
    let empty_fd = super::program_fd(&empty, super::EMPTY_PROGRAM)?;
    let empty_ns = f64::from(test_run::run(empty_fd, &packet, REPEAT)?.duration_ns);

    eprintln!("bench: 1,000 policies; {MISSES} new flows, one run each");
    thousand_policies(&mut dp)?;
    let misses: Vec<Vec<u8>> = (0..MISSES)
        .map(|i| packet::udp_ipv4([10, 1, 0, 10], [10, 2, 0, 10], 1024 + i, 20999))
        .collect();
    let empty_single_ns = mean_single(empty_fd, &misses)?;
    let miss_1000_policies_ns = mean_single(dp.xdp_fd()?, &misses)?;
    let flow = dp
        .flow(&packet::flow_key_ipv4(
            [10, 1, 0, 10],
            [10, 2, 0, 10],
            17,
            1024,
            20999,
        ))?
        .context("a miss did not create its flow")?;
    anyhow::ensure!(
        flow.policy_index == 999,
        "classified as {flow:?}, not policy 999"
    );

    eprintln!("bench: flow-table hit, {REPEAT} runs");
    let flow_hit_ns = f64::from(test_run::run(dp.xdp_fd()?, &misses[0], REPEAT)?.duration_ns);

    eprintln!("bench: filling the flow table with 1,048,576 flows (takes a few seconds)");
    let filled = dp.fill_flows(super::abi::MAX_FLOWS, |i| {
        (
            packet::flow_key_ipv4(
                [10, 3, (i >> 16) as u8, (i >> 8) as u8],
                [10, 4, 0, i as u8],
                17,
                4000,
                20999,
            ),
            FlowValue {
                path: 0,
                mark: 1100,
                generation: 1,
                class_id: 1,
                ..FlowValue::default()
            },
        )
    })?;
    eprintln!("bench: {filled} flows in the table; hit, {REPEAT} runs");
    let probe = packet::udp_ipv4([10, 3, 0, 7], [10, 4, 0, 9], 4000, 20999);
    let hit_1m_flows_ns = f64::from(test_run::run(dp.xdp_fd()?, &probe, REPEAT)?.duration_ns);
    anyhow::ensure!(
        dp.flow(&FlowKey {
            ..packet::flow_key_ipv4([10, 3, 0, 7], [10, 4, 0, 9], 17, 4000, 20999)
        })?
        .is_some_and(|f| f.packets >= u64::from(REPEAT)),
        "the 1M-flow probe did not hit its flow"
    );

    let figures = Figures {
        empty_ns,
        flow_hit_ns,
        miss_1000_policies_ns,
        hit_1m_flows_ns,
        empty_single_ns,
        repeat: REPEAT,
        misses: MISSES,
    };
    if json {
        println!("{}", serde_json::to_string(&figures)?);
    } else {
        println!(
            "empty XDP program          {:>8.1} ns/packet ({REPEAT} runs)",
            figures.empty_ns
        );
        println!(
            "flow-table hit             {:>8.1} ns/packet (goal < 100 ns)",
            figures.flow_hit_ns
        );
        println!(
            "hit, 1M flows in the table {:>8.1} ns/packet",
            figures.hit_1m_flows_ns
        );
        println!(
            "miss, 1,000 policies       {:>8.1} ns/packet (goal < 1 µs; empty program run once: {:.1} ns)",
            figures.miss_1000_policies_ns, figures.empty_single_ns
        );
    }
    Ok(())
}
