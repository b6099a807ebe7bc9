//! `patronus-lab bench join`: how long a new site takes to join the mesh, end to end.
//!
//! Self-contained: it starts a controller (a throwaway database with one tenant, on a loopback
//! port relayed into the lab), brings up a lab, and for each site measures the time from the
//! start of `patronus-edge enroll` (in the site's router namespace, with a fresh one-time
//! token) to the first ping answered by the LAN host of *every* site already in the mesh, from
//! the new site's LAN host. Sites join one after another (`--sites`), then `--burst` more join
//! at the same moment. Progress goes to stderr, figures to stdout; everything it started is
//! stopped and removed at the end, also when a step fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use patronus_test_support::lab::LabController;
use patronus_test_support::TestEnv;
use serde::Serialize;

use crate::plan;

/// How long a site may take to reach every other one before the bench gives up on it.
const JOIN_DEADLINE: Duration = Duration::from_secs(30);
/// Ping interval while waiting for the first answer: the measurement's resolution.
const PING_INTERVAL_S: &str = "0.02";

/// What `bench join --json` prints.
#[derive(Debug, Serialize, PartialEq)]
pub struct JoinFigures {
    /// Sites that joined one after another (the first has nobody to reach and is not timed).
    pub sites: u16,
    pub join_ms_p50: f64,
    pub join_ms_max: f64,
    /// The slowest of the sites that joined at the same moment.
    pub join10_ms_max: f64,
    /// How many sites joined at the same moment.
    pub burst: u16,
}

/// Median (upper median for an even count) and maximum; `None` when empty.
pub fn p50_max(samples: &[Duration]) -> Option<(Duration, Duration)> {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let max = *sorted.last()?;
    Some((sorted[sorted.len() / 2], max))
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// A binary next to this one (the workspace builds them into the same directory).
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    ensure!(
        path.exists(),
        "{} is not built: run `cargo build -p patronus-edge -p patronus-lab`",
        path.display()
    );
    Ok(path)
}

struct Bench {
    lab: PathBuf,
    edge: PathBuf,
    state: PathBuf,
    controller_url: String,
    agents: Vec<Child>,
}

impl Bench {
    /// Enroll site `n` and start its agent; return when its LAN host has had an answer from
    /// every LAN host in `others`, with the time since the enroll started.
    fn join(&mut self, n: u16, token: &str, others: &[u16]) -> anyhow::Result<Duration> {
        let started = Instant::now();
        // The pings run from the start, so the first answer is seen as soon as the path is up.
        let pings: Vec<(u16, Child)> = others
            .iter()
            .map(|&m| Ok((m, self.ping(n, m)?)))
            .collect::<anyhow::Result<_>>()?;
        let state = self.state.join(format!("site{n}"));
        let out = Command::new("ip")
            .args(["netns", "exec", &format!("pl-s{n}")])
            .arg(&self.edge)
            .args([
                "enroll",
                "--controller",
                &self.controller_url,
                "--token",
                token,
            ])
            .arg("--state-dir")
            .arg(&state)
            .args([
                "--uplink",
                &format!("name=wan0,address=198.18.{n}.1,type=fiber,bandwidth=1000"),
                "--uplink",
                &format!("name=wan1,address=198.18.{n}.5,type=lte,bandwidth=100,cost=2"),
            ])
            .output()
            .context("running patronus-edge enroll")?;
        if !out.status.success() {
            bail!(
                "site{n} did not enroll: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let log = std::fs::File::create(self.state.join(format!("site{n}.log")))?;
        self.agents.push(
            Command::new("ip")
                .args(["netns", "exec", &format!("pl-s{n}")])
                .arg(&self.edge)
                .arg("run")
                .arg("--state-dir")
                .arg(&state)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("starting patronus-edge run")?,
        );
        let mut slowest = Duration::ZERO;
        for (m, mut ping) in pings {
            let status = ping.wait()?;
            ensure!(
                status.success(),
                "site{n}'s LAN never reached site{m}'s within {JOIN_DEADLINE:?}; agent log: {}",
                self.state.join(format!("site{n}.log")).display()
            );
            slowest = slowest.max(started.elapsed());
        }
        Ok(slowest)
    }

    /// A ping from site `from`'s LAN host to site `to`'s that ends at the first answer.
    fn ping(&self, from: u16, to: u16) -> anyhow::Result<Child> {
        let target = plan::plan(to, 1)?
            .sites
            .last()
            .map(|s| s.lan_host_addr.addr().to_string())
            .context("plan of site")?;
        Command::new("ip")
            .args(["netns", "exec", &format!("pl-s{from}-lan")])
            .args(["ping", "-n", "-q", "-c", "1", "-i", PING_INTERVAL_S, "-w"])
            .arg(JOIN_DEADLINE.as_secs().to_string())
            .arg(target)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting ping (iputils-ping; scripts/setup installs it)")
    }

    fn stop_agents(&mut self) {
        for agent in &mut self.agents {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        self.agents.clear();
    }
}

/// Run the join benchmark: `sites` one after another, then `burst` at once.
pub fn join(sites: u16, burst: u16, json: bool, keep_logs: Option<&Path>) -> anyhow::Result<()> {
    ensure!(
        sites >= 2,
        "--sites must be at least 2 (the first site has nobody to reach)"
    );
    let total = sites
        .checked_add(burst)
        .context("--sites + --burst too large")?;
    plan::plan(total, 2)?;
    let figures = with_lab("join", keep_logs, |bench, runtime, controller| {
        run_join(bench, runtime, controller, sites, burst)
    })?;
    if json {
        println!("{}", serde_json::to_string(&figures)?);
    } else {
        println!(
            "join (sites one after another, {} timed): p50 {} ms, max {} ms",
            figures.sites - 1,
            figures.join_ms_p50,
            figures.join_ms_max
        );
        println!(
            "join ({} sites at once): max {} ms",
            figures.burst, figures.join10_ms_max
        );
    }
    Ok(())
}

/// Start a controller (throwaway database and tenant), run `work` with a fresh [`Bench`],
/// then stop the agents, take the lab down, stop the controller and drop the database,
/// whatever `work` returned.
fn with_lab<T>(
    name: &str,
    keep_logs: Option<&Path>,
    work: impl FnOnce(&mut Bench, &tokio::runtime::Runtime, &LabController) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let lab = std::env::current_exe()?;
    let edge = sibling("patronus-edge")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let env = TestEnv::load()?;
    eprintln!("bench: starting a controller with a throwaway database and tenant");
    let controller = runtime.block_on(LabController::start(&env))?;
    let state = PathBuf::from(format!(
        "/var/lib/patronus/lab/bench-{name}-{}",
        std::process::id()
    ));
    let mut bench = Bench {
        lab,
        edge,
        state,
        controller_url: controller.url_in_lab(),
        agents: Vec::new(),
    };
    let result = work(&mut bench, &runtime, &controller);
    eprintln!("bench: cleaning up (agents, lab, controller, database)");
    bench.stop_agents();
    let down = Command::new(&bench.lab).arg("down").output();
    if let Some(dir) = keep_logs {
        keep_agent_logs(&bench.state, dir);
    }
    let _ = std::fs::remove_dir_all(&bench.state);
    let stopped = runtime.block_on(controller.stop());
    let value = result?;
    match down {
        Ok(o) if o.status.success() => {}
        Ok(o) => bail!("lab down: {}", String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) => bail!("lab down: {e}"),
    }
    stopped?;
    Ok(value)
}

/// Copy the agents' logs (`site<n>.log`) to `dir` before the state is removed.
fn keep_agent_logs(state: &Path, dir: &Path) {
    let copied = std::fs::create_dir_all(dir).and_then(|()| {
        for entry in std::fs::read_dir(state)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "log") {
                if let Some(name) = path.file_name() {
                    std::fs::copy(&path, dir.join(name))?;
                }
            }
        }
        Ok(())
    });
    match copied {
        Ok(()) => eprintln!("bench: agent logs kept in {}", dir.display()),
        Err(e) => eprintln!(
            "bench: could not keep the agent logs in {}: {e}",
            dir.display()
        ),
    }
}

/// A fresh state directory and a lab of `sites` sites with 2 uplinks, relayed to `controller`.
fn lab_up(bench: &Bench, controller: &LabController, sites: u16) -> anyhow::Result<()> {
    if Path::new(&bench.state).exists() {
        std::fs::remove_dir_all(&bench.state)?;
    }
    std::fs::create_dir_all(&bench.state)?;
    eprintln!("bench: bringing up a lab of {sites} sites with 2 uplinks");
    let out = Command::new(&bench.lab)
        .args(["up", "--sites", &sites.to_string(), "--uplinks", "2"])
        .args(controller.relay_args())
        .output()?;
    ensure!(
        out.status.success(),
        "lab up: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn run_join(
    bench: &mut Bench,
    runtime: &tokio::runtime::Runtime,
    controller: &LabController,
    sites: u16,
    burst: u16,
) -> anyhow::Result<JoinFigures> {
    let total = sites + burst;
    lab_up(bench, controller, total)?;

    let mut sequential = Vec::new();
    for n in 1..=sites {
        let token = runtime.block_on(controller.token(&format!("site{n}"), &lan(n)?))?;
        let others: Vec<u16> = (1..n).collect();
        let took = bench.join(n, &token, &others)?;
        if n > 1 {
            eprintln!("bench: site{n} joined: every other LAN answered after {took:?}");
            sequential.push(took);
        } else {
            eprintln!("bench: site1 enrolled and running (nobody to reach yet)");
        }
    }

    eprintln!("bench: {burst} sites join at the same moment");
    let mut tokens = Vec::new();
    for n in sites + 1..=total {
        tokens.push((
            n,
            runtime.block_on(controller.token(&format!("site{n}"), &lan(n)?))?,
        ));
    }
    let burst_times: Vec<Duration> = std::thread::scope(|scope| {
        let handles: Vec<_> = tokens
            .iter()
            .map(|(n, token)| {
                let others: Vec<u16> = (1..=total).filter(|m| m != n).collect();
                let mut one = Bench {
                    lab: bench.lab.clone(),
                    edge: bench.edge.clone(),
                    state: bench.state.clone(),
                    controller_url: bench.controller_url.clone(),
                    agents: Vec::new(),
                };
                scope.spawn(move || {
                    let took = one.join(*n, token, &others);
                    (took, one.agents)
                })
            })
            .collect();
        let mut times = Vec::new();
        let mut failure = None;
        for handle in handles {
            let (took, agents) = handle
                .join()
                .map_err(|_| anyhow::anyhow!("a join thread panicked"))?;
            bench.agents.extend(agents);
            match took {
                Ok(t) => times.push(t),
                Err(e) => failure = Some(e),
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(times),
        }
    })?;
    for (i, took) in burst_times.iter().enumerate() {
        eprintln!(
            "bench: site{} (burst) reached all {} others after {took:?}",
            usize::from(sites) + 1 + i,
            total - 1
        );
    }
    let (p50, max) = p50_max(&sequential).context("no sequential join measured")?;
    let (_, burst_max) = p50_max(&burst_times).context("no burst join measured")?;
    Ok(JoinFigures {
        sites,
        join_ms_p50: ms(p50),
        join_ms_max: ms(max),
        join10_ms_max: ms(burst_max),
        burst,
    })
}

/// Site `n`'s LAN prefix, as the lab plans it.
fn lan(n: u16) -> anyhow::Result<String> {
    plan::plan(n, 1)?
        .sites
        .last()
        .map(|s| s.lan_prefix.to_string())
        .context("plan of site")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p50_and_max() {
        let d = Duration::from_millis;
        assert_eq!(p50_max(&[]), None);
        assert_eq!(p50_max(&[d(5)]), Some((d(5), d(5))));
        assert_eq!(p50_max(&[d(9), d(1), d(5)]), Some((d(5), d(9))));
        assert_eq!(p50_max(&[d(4), d(1), d(3), d(2)]), Some((d(3), d(4))));
    }

    #[test]
    fn milliseconds_keep_one_decimal() {
        assert_eq!(ms(Duration::from_micros(1_234_567)), 1234.6);
    }
}

/// What `bench steering --json` prints.
#[derive(Debug, Serialize, PartialEq)]
pub struct SteeringFigures {
    /// LAN-to-LAN TCP with the eBPF programs steering (mean of the runs before and after).
    pub steered_mbps: f64,
    /// The same path with the programs detached (agent stopped; tunnels stay).
    pub detached_mbps: f64,
    /// steered / detached.
    pub ratio: f64,
    pub seconds: u32,
}

/// TCP throughput from site 1's LAN host to site 2's on port 5060, in Mbit/s.
fn iperf_mbps(seconds: u32) -> anyhow::Result<f64> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            "pl-s1-lan",
            "iperf3",
            "-J",
            "-c",
            "10.2.0.10",
            "-p",
            "5060",
        ])
        .args(["-t", &seconds.to_string()])
        .output()
        .context("running iperf3 (scripts/setup installs it)")?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 printed no JSON: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e6)
        .with_context(|| format!("iperf3 failed: {}", report["error"]))
}

/// Whether site 1's LAN interface has an XDP program.
fn xdp_on_lan(site: u16) -> bool {
    Command::new("ip")
        .args(["-n", &format!("pl-s{site}"), "-d", "link", "show", "lan0"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("prog/xdp"))
}

fn wait_for(what: &str, limit: Duration, check: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !check() {
        ensure!(Instant::now() < deadline, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Run the steering throughput benchmark.
pub fn steering(seconds: u32, json: bool, keep_logs: Option<&Path>) -> anyhow::Result<()> {
    ensure!((1..=600).contains(&seconds), "--seconds must be 1-600");
    let figures = with_lab("steering", keep_logs, |bench, runtime, controller| {
        lab_up(bench, controller, 2)?;
        for n in 1..=2u16 {
            let token = runtime.block_on(controller.token(&format!("site{n}"), &lan(n)?))?;
            let others: Vec<u16> = (1..n).collect();
            bench.join(n, &token, &others)?;
        }
        // A policy for TCP 5060 over the lowest-latency path: tunnel (0, 0), which is also the
        // main table's default path, so "detached" below measures the same path.
        let stored_path = bench.state.join("site1").join("intent.json");
        wait_for("site1 stored no intent", Duration::from_secs(15), || {
            stored_path.exists()
        })?;
        let stored = std::fs::read(&stored_path)
            .with_context(|| format!("reading {}", stored_path.display()))?;
        let mut intent: patronus_proto::SiteIntent = patronus_proto::codec::decode(&stored)?;
        intent.revision += 1;
        intent.policies.routing = vec![patronus_proto::policy::RoutingPolicy {
            id: patronus_proto::PolicyId(uuid_from(1)),
            name: "bench".into(),
            priority: 100,
            enabled: true,
            match_rules: patronus_proto::policy::MatchRules {
                protocol: Some(patronus_proto::policy::Protocol::Tcp),
                dst_ports: vec![patronus_proto::policy::PortRange::single(5060)],
                ..Default::default()
            },
            app_class: patronus_proto::policy::AppClass::new("voip"),
            path_preference: patronus_proto::policy::PathPreference::LowestLatency,
            load_balancing: patronus_proto::policy::LoadBalancing::ActiveBackup,
            sla: Default::default(),
        }];
        runtime.block_on(controller.put_intent(&intent))?;
        let log = bench.state.join("site1.log");
        eprintln!("bench: waiting for site1's data plane to take the policy");
        wait_for(
            "site1's data plane took no policy",
            Duration::from_secs(30),
            || std::fs::read_to_string(&log).is_ok_and(|l| l.contains("dataplane: 1 policies")),
        )?;
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                "pl-s2-lan",
                "iperf3",
                "-s",
                "-D",
                "-p",
                "5060",
            ])
            .output()?;
        ensure!(out.status.success(), "iperf3 server did not start");
        std::thread::sleep(Duration::from_millis(300));

        eprintln!("bench: {seconds} s of TCP with the programs steering");
        let steered_first = iperf_mbps(seconds)?;
        eprintln!("bench: stopping site1's agent (the kernel detaches its programs; tunnels stay)");
        if !bench.agents.is_empty() {
            let mut agent = bench.agents.remove(0);
            let _ = agent.kill();
            let _ = agent.wait();
        }
        wait_for(
            "the programs were not detached",
            Duration::from_secs(5),
            || !xdp_on_lan(1),
        )?;
        eprintln!("bench: {seconds} s of TCP on the same path without the programs");
        let detached = iperf_mbps(seconds)?;
        eprintln!("bench: restarting site1's agent");
        let restart_log = std::fs::File::create(bench.state.join("site1-restart.log"))?;
        bench.agents.push(
            Command::new("ip")
                .args(["netns", "exec", "pl-s1"])
                .arg(&bench.edge)
                .args(["run", "--state-dir"])
                .arg(bench.state.join("site1"))
                .stdout(Stdio::null())
                .stderr(restart_log)
                .spawn()?,
        );
        let restart = bench.state.join("site1-restart.log");
        wait_for(
            "the restarted agent never steered again",
            Duration::from_secs(30),
            || std::fs::read_to_string(&restart).is_ok_and(|l| l.contains("dataplane: 1 policies")),
        )?;
        eprintln!("bench: {seconds} s of TCP with the programs steering again");
        let steered_again = iperf_mbps(seconds)?;
        let steered = (steered_first + steered_again) / 2.0;
        Ok(SteeringFigures {
            steered_mbps: (steered * 10.0).round() / 10.0,
            detached_mbps: (detached * 10.0).round() / 10.0,
            ratio: ((steered / detached) * 1000.0).round() / 1000.0,
            seconds,
        })
    })?;
    if json {
        println!("{}", serde_json::to_string(&figures)?);
    } else {
        println!(
            "TCP LAN to LAN over tunnel (0, 0): steered {} Mbit/s, programs detached {} Mbit/s ({:.1} %)",
            figures.steered_mbps,
            figures.detached_mbps,
            figures.ratio * 100.0
        );
    }
    Ok(())
}

fn uuid_from(n: u128) -> uuid::Uuid {
    uuid::Uuid::from_u128(n)
}
