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
/// Ping interval while waiting for the first answer: the measurement's resolution. Not
/// finer: in a burst of 10 sites, 140 pings at 50/s were 7,000 packets/s through userspace
/// WireGuard and the userspace WAN emulator, which kept the 2 cores saturated and slowed the
/// handshakes being measured.
const PING_INTERVAL_S: &str = "0.1";

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
    /// Prefix every line of the agents' logs with the CLOCK_MONOTONIC time it was written
    /// (ms), so a bench can tell when an agent noticed what it did.
    stamp_logs: bool,
}

impl Bench {
    /// Enroll site `n` and start its agent; return when its LAN host has had an answer from
    /// every LAN host in `others`, with the time since the enroll started.
    fn join(&mut self, n: u16, token: &str, others: &[u16]) -> anyhow::Result<Duration> {
        let started = Instant::now();
        if self.stamp_logs {
            eprintln!(
                "bench: {:.1} site{n} enrolling",
                crate::stream::monotonic_ns() as f64 / 1e6
            );
        }
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
        let agent = self.spawn_agent(n, &format!("site{n}.log"))?;
        self.agents.push(agent);
        let mut slowest = (Duration::ZERO, 0);
        for (m, mut ping) in pings {
            let status = ping.wait()?;
            ensure!(
                status.success(),
                "site{n}'s LAN never reached site{m}'s within {JOIN_DEADLINE:?}; agent log: {}",
                self.state.join(format!("site{n}.log")).display()
            );
            slowest = slowest.max((started.elapsed(), m));
        }
        if slowest.0 > Duration::from_secs(2) {
            eprintln!(
                "bench: site{n}: the last LAN to answer was site{}'s, after {:?}",
                slowest.1, slowest.0
            );
        }
        Ok(slowest.0)
    }

    /// Start site `n`'s agent (`patronus-edge run` in its router namespace), its stderr in
    /// `log` under the state directory (stamped if [`Bench::stamp_logs`]).
    fn spawn_agent(&self, n: u16, log: &str) -> anyhow::Result<Child> {
        let file = std::fs::File::create(self.state.join(log))?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &format!("pl-s{n}")])
            .arg(&self.edge)
            .arg("run")
            .arg("--state-dir")
            .arg(self.state.join(format!("site{n}")))
            .stdout(Stdio::null());
        if !self.stamp_logs {
            return command
                .stderr(file)
                .spawn()
                .context("starting patronus-edge run");
        }
        let mut child = command
            .stderr(Stdio::piped())
            .spawn()
            .context("starting patronus-edge run")?;
        if let Some(stderr) = child.stderr.take() {
            std::thread::spawn(move || stamp_lines(stderr, file));
        }
        Ok(child)
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
        stamp_logs: false,
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

/// Copy `from` to `to` line by line, each line prefixed with the CLOCK_MONOTONIC time (ms,
/// three decimals) it was read at; until `from` ends (the agent exited).
fn stamp_lines(from: impl std::io::Read, mut to: std::fs::File) {
    use std::io::{BufRead, Write};
    for line in std::io::BufReader::new(from).lines() {
        let Ok(line) = line else { return };
        let ms = crate::stream::monotonic_ns() as f64 / 1e6;
        if writeln!(to, "{ms:.3} {line}").is_err() {
            return;
        }
    }
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
    // Kept logs (--keep-logs) then tell when each agent applied what, on the clock of the
    // "enrolling" lines below.
    bench.stamp_logs = true;

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
                    stamp_logs: bench.stamp_logs,
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

/// What `bench brownout` is asked to do.
#[derive(Debug, Clone, Copy)]
pub struct BrownoutSpec {
    pub sites: u16,
    pub ramps: u32,
    pub interval_ms: u32,
    pub max_loss_pct: u32,
    pub ramp_seconds: u32,
}

/// One ramp of `bench brownout --json`.
#[derive(Debug, Serialize, PartialEq)]
pub struct BrownoutRun {
    pub uplink: u8,
    /// The loss the uplink had when the stream left it; `None`: it never left.
    pub loss_at_move_pct: Option<u32>,
    pub moved_after_ms: Option<f64>,
    /// Packets of the stream lost from the ramp's start until it moved (and settled).
    pub lost: u64,
    /// The longest gap between two packets received over the ramp.
    pub longest_gap_ms: f64,
}

/// What `bench brownout --json` prints.
#[derive(Debug, Serialize, PartialEq)]
pub struct BrownoutFigures {
    pub sites: u16,
    /// Paths site 1 monitors (to every other site, 2 × 2 uplinks each).
    pub paths: usize,
    pub interval_ms: u32,
    pub max_loss_pct: u32,
    pub ramp_seconds: u32,
    pub sla_max_loss_pct: f64,
    pub runs: Vec<BrownoutRun>,
    pub moved: usize,
    pub lost_p50: f64,
    pub lost_p99: f64,
    /// The baseline, computed: what the stream loses over one whole ramp on a path that
    /// never fails over (the emulator's loss per step × packets sent per step; its loss
    /// figures are checked in `lab/tests/lab_netns.rs`).
    pub lost_without_failover: f64,
    pub loss_at_move_p50_pct: Option<f64>,
    pub loss_at_move_max_pct: Option<f64>,
    pub longest_gap_p99_ms: f64,
}

/// The VoIP class's loss SLA in the brown-out bench.
const BROWNOUT_SLA_LOSS_PCT: f64 = 1.0;

/// Packets a stream of `rate` packets/s loses over a ramp of 1 % per `step` up to `loss`
/// percent (pure): the baseline of staying on a browning-out path.
pub fn ramp_loss(rate: u32, step: Duration, steps: u32) -> f64 {
    (1..=steps)
        .map(|pct| f64::from(rate) * step.as_secs_f64() * f64::from(pct) / 100.0)
        .sum()
}

pub fn brownout(spec: &BrownoutSpec, json: bool, keep_logs: Option<&Path>) -> anyhow::Result<()> {
    let figures = with_lab("brownout", keep_logs, |bench, runtime, controller| {
        bench.stamp_logs = true;
        lab_up(bench, controller, spec.sites)?;
        for n in 1..=spec.sites {
            let token = runtime.block_on(controller.token(&format!("site{n}"), &lan(n)?))?;
            let others: Vec<u16> = (1..n).collect();
            let took = bench.join(n, &token, &others)?;
            eprintln!(
                "bench: site{n} joined and reached {} sites in {:.1} s",
                others.len(),
                took.as_secs_f64()
            );
        }
        let paths = 4 * usize::from(spec.sites - 1);
        let identity: serde_json::Value = serde_json::from_slice(
            &std::fs::read(bench.state.join("site1").join("identity.json"))
                .context("site1's identity")?,
        )?;
        let site_id = identity["site_id"]
            .as_str()
            .context("site1's identity has no site_id")?
            .replace('-', "");
        let prefix = format!("pw{}", site_id.get(..8).context("site id")?);
        wait_all_paths_ready(bench, paths, Duration::from_secs(60))?;

        // VoIP toward site 2's LAN only: its paths are probed every `interval_ms`, the 32
        // others at the site's 1 s.
        let stored_path = bench.state.join("site1").join("intent.json");
        let stored = std::fs::read(&stored_path)
            .with_context(|| format!("reading {}", stored_path.display()))?;
        let mut intent: patronus_proto::SiteIntent = patronus_proto::codec::decode(&stored)?;
        intent.revision += 1;
        intent.probe.timeout_ms = spec.interval_ms.max(100);
        intent.failover.failback_hold_down_ms = BENCH_HOLD_DOWN_MS;
        intent.policies.routing = vec![patronus_proto::policy::RoutingPolicy {
            id: patronus_proto::PolicyId(uuid_from(1)),
            name: "voip".into(),
            priority: 100,
            enabled: true,
            match_rules: patronus_proto::policy::MatchRules {
                dst_prefixes: vec![lan(2)?.parse().context("site 2's LAN")?],
                protocol: Some(patronus_proto::policy::Protocol::Udp),
                dst_ports: vec![patronus_proto::policy::PortRange::single(STREAM_PORT)],
                ..Default::default()
            },
            app_class: patronus_proto::policy::AppClass::new("voip"),
            path_preference: patronus_proto::policy::PathPreference::LowestLatency,
            load_balancing: patronus_proto::policy::LoadBalancing::ActiveBackup,
            sla: patronus_proto::policy::Sla {
                max_latency_ms: Some(SLA_MAX_LATENCY_MS),
                max_loss_pct: Some(BROWNOUT_SLA_LOSS_PCT),
                ..Default::default()
            },
            probe_interval_ms: Some(spec.interval_ms),
        }];
        runtime.block_on(controller.put_intent(&intent))?;
        wait_log(
            bench,
            &format!("applied intent revision {} ", intent.revision),
            Duration::from_secs(15),
        )?;
        wait_log(bench, "dataplane: 1 policies", Duration::from_secs(60))?;
        eprintln!("bench: starting the stream ({STREAM_RATE} packets/s, UDP {STREAM_PORT})");
        let streams = Streams::start(bench)?;
        wait_for(
            "no packet of the stream arrived",
            Duration::from_secs(10),
            || streams.first_sent_after(0).is_some(),
        )?;
        let step =
            Duration::from_secs_f64(f64::from(spec.ramp_seconds) / f64::from(spec.max_loss_pct));
        let mut runs = Vec::new();
        for ramp in 1..=spec.ramps {
            wait_all_paths_ready(bench, paths, Duration::from_secs(90))?;
            std::thread::sleep(Duration::from_millis(300));
            let uplink = carrying_uplink(&prefix)?;
            let run = brownout_ramp(&streams, &prefix, uplink, spec, step)?;
            crate::set_impairment(1, uplink, crate::wan::Impairment::default())?;
            eprintln!(
                "bench: brown-out {ramp}/{} of uplink {uplink}: {}; lost {} packets, longest \
                 gap {:.1} ms",
                spec.ramps,
                match (run.loss_at_move_pct, run.moved_after_ms) {
                    (Some(pct), Some(ms)) => format!("moved at {pct} % loss, {ms:.0} ms in"),
                    _ => "never moved".to_owned(),
                },
                run.lost,
                run.longest_gap_ms
            );
            runs.push(run);
        }
        drop(streams);
        let round = |v: f64| (v * 10.0).round() / 10.0;
        let lost: Vec<f64> = runs.iter().map(|r| r.lost as f64).collect();
        let at_move: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.loss_at_move_pct.map(f64::from))
            .collect();
        let gaps: Vec<f64> = runs.iter().map(|r| r.longest_gap_ms).collect();
        Ok(BrownoutFigures {
            sites: spec.sites,
            paths,
            interval_ms: spec.interval_ms,
            max_loss_pct: spec.max_loss_pct,
            ramp_seconds: spec.ramp_seconds,
            sla_max_loss_pct: BROWNOUT_SLA_LOSS_PCT,
            moved: at_move.len(),
            lost_p50: percentile(&lost, 50.0).unwrap_or(0.0),
            lost_p99: percentile(&lost, 99.0).unwrap_or(0.0),
            lost_without_failover: round(ramp_loss(STREAM_RATE, step, spec.max_loss_pct)),
            loss_at_move_p50_pct: percentile(&at_move, 50.0),
            loss_at_move_max_pct: percentile(&at_move, 100.0),
            longest_gap_p99_ms: percentile(&gaps, 99.0).map(round).unwrap_or(0.0),
            runs,
        })
    })?;
    if json {
        println!("{}", serde_json::to_string(&figures)?);
    } else {
        println!(
            "{} sites ({} paths at site 1), VoIP probes every {} ms, SLA {} % loss, loss ramped \
             0-{} % over {} s: moved in {}/{} brown-outs, at {} % loss (p50; max {}), lost \
             p50 {} / p99 {} packets (a path that never fails over: {}), longest gap p99 {} ms",
            figures.sites,
            figures.paths,
            figures.interval_ms,
            figures.sla_max_loss_pct,
            figures.max_loss_pct,
            figures.ramp_seconds,
            figures.moved,
            figures.runs.len(),
            figures
                .loss_at_move_p50_pct
                .map_or("-".to_owned(), |v| v.to_string()),
            figures
                .loss_at_move_max_pct
                .map_or("-".to_owned(), |v| v.to_string()),
            figures.lost_p50,
            figures.lost_p99,
            figures.lost_without_failover,
            figures.longest_gap_p99_ms
        );
    }
    Ok(())
}

/// One brown-out: raise the loss of site 1's `uplink` 1 % per `step` until the stream has
/// left it (or the ramp ends and 10 s more pass), then measure.
fn brownout_ramp(
    streams: &Streams,
    prefix: &str,
    uplink: u8,
    spec: &BrownoutSpec,
    step: Duration,
) -> anyhow::Result<BrownoutRun> {
    let start_ns = crate::stream::monotonic_ns();
    let started = Instant::now();
    let mut moved: Option<(u32, Duration)> = None;
    'ramp: for pct in 1..=spec.max_loss_pct {
        crate::set_impairment(
            1,
            uplink,
            crate::wan::Impairment {
                loss_pct: f64::from(pct),
                ..Default::default()
            },
        )?;
        let step_ends = Instant::now() + step;
        while Instant::now() < step_ends {
            // `carrying_uplink` itself watches for 300 ms.
            if carrying_uplink(prefix)? != uplink {
                moved = Some((pct, started.elapsed()));
                break 'ramp;
            }
        }
    }
    if moved.is_none() {
        let hold = Instant::now() + Duration::from_secs(10);
        while Instant::now() < hold {
            if carrying_uplink(prefix)? != uplink {
                moved = Some((spec.max_loss_pct, started.elapsed()));
                break;
            }
        }
    }
    // The moved flow settles; late packets arrive.
    std::thread::sleep(Duration::from_millis(500));
    let end_ns = crate::stream::monotonic_ns();
    std::thread::sleep(Duration::from_millis(300));
    let arrivals = streams.snapshot();
    let lost = lost_between(&arrivals, start_ns, end_ns)
        .context("the stream's arrivals do not cover the brown-out")?;
    let gap = arrivals
        .windows(2)
        .filter(|w| w[1].received_ns >= start_ns && w[1].received_ns <= end_ns)
        .map(|w| w[1].received_ns.saturating_sub(w[0].received_ns))
        .max()
        .unwrap_or(0);
    Ok(BrownoutRun {
        uplink,
        loss_at_move_pct: moved.map(|(pct, _)| pct),
        moved_after_ms: moved.map(|(_, at)| (at.as_secs_f64() * 10_000.0).round() / 10.0),
        lost,
        longest_gap_ms: (gap as f64 / 1e5).round() / 10.0,
    })
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

fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) -> anyhow::Result<()> {
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
            probe_interval_ms: None,
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
        let restarted = bench.spawn_agent(1, "site1-restart.log")?;
        bench.agents.push(restarted);
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

/// One probe interval's figures in `bench failover --json`.
#[derive(Debug, Serialize, PartialEq)]
pub struct FailoverRun {
    pub interval_ms: u32,
    /// The probe timeout used: max(interval, 3 × the paths' typical RTT).
    pub timeout_ms: u32,
    pub cuts: u32,
    /// Blackout per cut: the longest gap between two consecutive packets received around
    /// the cut (the stream's own spacing, 10 ms, included).
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Packets lost while the stream moved off an uplink delayed past its class's SLA.
    pub lost_on_degrade: u64,
    /// Median time from the cut to the agent's log saying a path of the cut uplink is down
    /// (the prober thread's detection) and to its log of the data plane rewrite (the run
    /// loop's reaction); `None` when no cut produced the line.
    pub down_logged_p50_ms: Option<f64>,
    pub failover_logged_p50_ms: Option<f64>,
}

/// What `bench failover --json` prints.
#[derive(Debug, Serialize, PartialEq)]
pub struct FailoverFigures {
    pub runs: Vec<FailoverRun>,
}

/// Packets per second of the measured stream.
const STREAM_RATE: u32 = 100;
/// Its destination port: the VoIP class's.
const STREAM_PORT: u16 = 5060;
/// The VoIP class's latency SLA (the degrade case delays past it).
const SLA_MAX_LATENCY_MS: f64 = 50.0;
/// Delay added in the degrade case.
const DEGRADE_DELAY_MS: f64 = 100.0;
/// Failback hold-down for the bench (the default, 10 s, would make 20 cuts take long).
const BENCH_HOLD_DOWN_MS: u32 = 2000;

/// Nearest-rank percentile (`p` in 0..=100) of `samples`; `None` when empty (pure).
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The blackout around a cut (pure): the longest gap between consecutive arrivals (in the
/// order received) among those received from `cut_ns` up to `resumed_ns` (the arrival of the
/// first packet sent after the cut).
pub fn blackout_ns(arrivals: &[crate::stream::Arrival], cut_ns: u64, resumed_ns: u64) -> u64 {
    arrivals
        .windows(2)
        .filter(|w| w[1].received_ns >= cut_ns && w[1].received_ns <= resumed_ns)
        .map(|w| w[1].received_ns.saturating_sub(w[0].received_ns))
        .max()
        .unwrap_or(0)
}

/// Packets sent between `from_ns` and `to_ns` that never arrived (pure): the sequences
/// between the last one received that was sent before `from_ns` and the first one received
/// that was sent after `to_ns`, minus those received. `None` without both bounds.
pub fn lost_between(arrivals: &[crate::stream::Arrival], from_ns: u64, to_ns: u64) -> Option<u64> {
    let low = arrivals
        .iter()
        .filter(|a| a.sent_ns < from_ns)
        .map(|a| a.seq)
        .max()?;
    let high = arrivals
        .iter()
        .filter(|a| a.sent_ns > to_ns)
        .map(|a| a.seq)
        .min()?;
    if high <= low + 1 {
        return Some(0);
    }
    let received: std::collections::BTreeSet<u64> = arrivals
        .iter()
        .filter(|a| a.seq > low && a.seq < high)
        .map(|a| a.seq)
        .collect();
    Some((high - low - 1).saturating_sub(received.len() as u64))
}

/// The first line of a stamped log (`<ms> <text>`) at or after `after_ms` that satisfies
/// `want`: its time in ms (pure).
pub fn first_stamped(log: &str, after_ms: f64, want: impl Fn(&str) -> bool) -> Option<f64> {
    log.lines().find_map(|line| {
        let (stamp, text) = line.split_once(' ')?;
        let ms: f64 = stamp.parse().ok()?;
        (ms >= after_ms && want(text)).then_some(ms)
    })
}

/// The stream between the two LAN hosts: a receiver on site 2's, a sender on site 1's, and
/// what arrived so far. Both processes are killed when this is dropped.
struct Streams {
    receiver: Child,
    sender: Option<Child>,
    arrivals: std::sync::Arc<std::sync::Mutex<Vec<crate::stream::Arrival>>>,
}

impl Streams {
    fn start(bench: &Bench) -> anyhow::Result<Self> {
        use std::io::BufRead;
        let to = plan::plan(2, 1)?
            .sites
            .last()
            .map(|s| s.lan_host_addr.addr())
            .context("plan of site 2")?;
        let mut receiver = Command::new("ip")
            .args(["netns", "exec", "pl-s2-lan"])
            .arg(&bench.lab)
            .args(["udp-stream", "recv", "--listen"])
            .arg(format!("0.0.0.0:{STREAM_PORT}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the stream's receiver")?;
        let arrivals = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        if let Some(stdout) = receiver.stdout.take() {
            let sink = arrivals.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { return };
                    if let (Some(arrival), Ok(mut all)) =
                        (crate::stream::parse_line(&line), sink.lock())
                    {
                        all.push(arrival);
                    }
                }
            });
        }
        let mut streams = Self {
            receiver,
            sender: None,
            arrivals,
        };
        std::thread::sleep(Duration::from_millis(200));
        streams.sender = Some(
            Command::new("ip")
                .args(["netns", "exec", "pl-s1-lan"])
                .arg(&bench.lab)
                .args(["udp-stream", "send", "--to"])
                .arg(format!("{to}:{STREAM_PORT}"))
                .args(["--rate", &STREAM_RATE.to_string(), "--size", "1000"])
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting the stream's sender")?,
        );
        Ok(streams)
    }

    fn snapshot(&self) -> Vec<crate::stream::Arrival> {
        self.arrivals.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// The first arrival of a packet sent after `ns`, if any yet.
    fn first_sent_after(&self, ns: u64) -> Option<crate::stream::Arrival> {
        let all = self.arrivals.lock().ok()?;
        all.iter()
            .rev()
            .take_while(|a| a.sent_ns > ns)
            .last()
            .copied()
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        for child in self.sender.iter_mut().chain([&mut self.receiver]) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Bytes sent into site 1's tunnels so far, per local uplink (`prefix` names site 1's).
fn tunnel_tx_by_uplink(prefix: &str) -> anyhow::Result<std::collections::BTreeMap<u8, u64>> {
    let out = Command::new("ip")
        .args(["netns", "exec", "pl-s1", "wg", "show", "all", "transfer"])
        .output()
        .context("wg show")?;
    ensure!(
        out.status.success(),
        "wg show: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let mut sent = std::collections::BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(name), Some(tx)) = (
            f.first().filter(|n| n.starts_with(prefix)),
            f.get(3).and_then(|t| t.parse::<u64>().ok()),
        ) else {
            continue;
        };
        // `pw<8 hex>-<l><r>`: the local uplink is the next-to-last character.
        if let Some(local) = name
            .chars()
            .rev()
            .nth(1)
            .and_then(|c| c.to_digit(10))
            .and_then(|d| u8::try_from(d).ok())
        {
            *sent.entry(local).or_default() += tx;
        }
    }
    Ok(sent)
}

/// The local uplink of site 1 carrying the stream now: the one whose tunnels grew the most
/// over 300 ms, which must be more than probes alone send.
fn carrying_uplink(prefix: &str) -> anyhow::Result<u8> {
    let before = tunnel_tx_by_uplink(prefix)?;
    std::thread::sleep(Duration::from_millis(300));
    let after = tunnel_tx_by_uplink(prefix)?;
    let (uplink, grew) = after
        .iter()
        .map(|(u, tx)| (*u, tx.saturating_sub(before.get(u).copied().unwrap_or(0))))
        .max_by_key(|(_, grew)| *grew)
        .context("site1 has no tunnels")?;
    // 100 packets/s of ~1,100 bytes: ~33 kB in 300 ms; probes at 20 ms send ~5 kB.
    ensure!(
        grew > 15_000,
        "the stream does not flow through site1's tunnels (at most {grew} B in 300 ms)"
    );
    Ok(uplink)
}

/// site 1's `monitor.json`, if it is there and parses.
fn monitor(bench: &Bench) -> Option<serde_json::Value> {
    let text = std::fs::read(bench.state.join("site1").join("monitor.json")).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Wait until site 1's monitor says every one of its 4 paths is up, past its hold-down and
/// within every SLA (a restored uplink is usable again).
fn wait_paths_ready(bench: &Bench, limit: Duration) -> anyhow::Result<()> {
    wait_all_paths_ready(bench, 4, limit)
}

/// The same for a site 1 with `count` paths.
fn wait_all_paths_ready(bench: &Bench, count: usize, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let report = monitor(bench);
        let ready = report.as_ref().is_some_and(|m| {
            m["paths"].as_array().is_some_and(|paths| {
                paths.len() == count
                    && paths.iter().all(|p| {
                        p["status"] == "up"
                            && p["preferred"] == true
                            && p["sla_blocked"].as_array().is_some_and(|b| b.is_empty())
                    })
            })
        });
        if ready {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "site1's {count} paths were not all up and usable within {limit:?}: {}",
            report.map_or_else(|| "no monitor.json".to_owned(), |m| m.to_string())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_log(bench: &Bench) -> String {
    std::fs::read_to_string(bench.state.join("site1.log")).unwrap_or_default()
}

fn wait_log(bench: &Bench, what: &str, limit: Duration) -> anyhow::Result<()> {
    wait_for(&format!("site1's log never said {what:?}"), limit, || {
        read_log(bench).contains(what)
    })
}

/// Run the failover benchmark: for each probe interval, `cuts` cuts, then the degrade case.
pub fn failover(
    cuts: u32,
    intervals: &[u32],
    json: bool,
    keep_logs: Option<&Path>,
) -> anyhow::Result<()> {
    ensure!((1..=1000).contains(&cuts), "--cuts must be 1-1000");
    ensure!(
        !intervals.is_empty() && intervals.iter().all(|i| (10..=60_000).contains(i)),
        "--intervals: probe intervals in ms, each 10-60000"
    );
    let figures = with_lab("failover", keep_logs, |bench, runtime, controller| {
        bench.stamp_logs = true;
        lab_up(bench, controller, 2)?;
        for n in 1..=2u16 {
            let token = runtime.block_on(controller.token(&format!("site{n}"), &lan(n)?))?;
            let others: Vec<u16> = (1..n).collect();
            bench.join(n, &token, &others)?;
        }
        let identity: serde_json::Value = serde_json::from_slice(
            &std::fs::read(bench.state.join("site1").join("identity.json"))
                .context("site1's identity")?,
        )?;
        let site_id = identity["site_id"]
            .as_str()
            .context("site1's identity has no site_id")?
            .replace('-', "");
        let prefix = format!("pw{}", site_id.get(..8).context("site id")?);
        // The paths' typical RTT (the default probes measure it), for the probe timeout.
        eprintln!("bench: measuring the paths' typical RTT");
        let mut typical_rtt_ms = 0.0;
        wait_for(
            "site1 measured not all 4 paths",
            Duration::from_secs(20),
            || {
                let latencies: Vec<f64> = monitor(bench)
                    .and_then(|m| m["paths"].as_array().cloned())
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|p| p["latency_ms"].as_f64())
                    .filter(|l| *l > 0.0)
                    .collect();
                if latencies.len() < 4 {
                    return false;
                }
                typical_rtt_ms = percentile(&latencies, 50.0).unwrap_or(0.0);
                true
            },
        )?;
        eprintln!("bench: typical RTT {typical_rtt_ms:.2} ms");
        // Started once the data plane has the VoIP policy: the data plane classifies a flow
        // when it first sees it, and a flow that started before its policy existed stays in
        // the default class (routes only, no failover) for as long as it lives.
        let mut streams = None;
        let mut runs = Vec::new();
        for &interval in intervals {
            runs.push(failover_run(
                bench,
                runtime,
                controller,
                &mut streams,
                &prefix,
                interval,
                cuts,
                typical_rtt_ms,
            )?);
        }
        drop(streams);
        Ok(FailoverFigures { runs })
    })?;
    if json {
        println!("{}", serde_json::to_string(&figures)?);
    } else {
        for run in &figures.runs {
            println!(
                "probes every {} ms (timeout {} ms): blackout over {} cuts p50 {} ms, p99 {} ms, \
                 max {} ms; lost on degrade {}",
                run.interval_ms,
                run.timeout_ms,
                run.cuts,
                run.p50_ms,
                run.p99_ms,
                run.max_ms,
                run.lost_on_degrade
            );
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn failover_run(
    bench: &Bench,
    runtime: &tokio::runtime::Runtime,
    controller: &LabController,
    streams: &mut Option<Streams>,
    prefix: &str,
    interval: u32,
    cuts: u32,
    typical_rtt_ms: f64,
) -> anyhow::Result<FailoverRun> {
    use crate::wan::Impairment;
    let timeout = interval.max((3.0 * typical_rtt_ms).ceil() as u32);
    let stored_path = bench.state.join("site1").join("intent.json");
    let stored = std::fs::read(&stored_path)
        .with_context(|| format!("reading {}", stored_path.display()))?;
    let mut intent: patronus_proto::SiteIntent = patronus_proto::codec::decode(&stored)?;
    intent.revision += 1;
    intent.probe.interval_ms = interval;
    intent.probe.timeout_ms = timeout;
    intent.probe.down_after_losses = 3;
    intent.failover.failback_hold_down_ms = BENCH_HOLD_DOWN_MS;
    intent.policies.routing = vec![patronus_proto::policy::RoutingPolicy {
        id: patronus_proto::PolicyId(uuid_from(1)),
        name: "voip".into(),
        priority: 100,
        enabled: true,
        match_rules: patronus_proto::policy::MatchRules {
            protocol: Some(patronus_proto::policy::Protocol::Udp),
            dst_ports: vec![patronus_proto::policy::PortRange::single(STREAM_PORT)],
            ..Default::default()
        },
        app_class: patronus_proto::policy::AppClass::new("voip"),
        path_preference: patronus_proto::policy::PathPreference::LowestLatency,
        load_balancing: patronus_proto::policy::LoadBalancing::ActiveBackup,
        sla: patronus_proto::policy::Sla {
            max_latency_ms: Some(SLA_MAX_LATENCY_MS),
            ..Default::default()
        },
        probe_interval_ms: None,
    }];
    eprintln!(
        "bench: probes every {interval} ms (timeout {timeout} ms, down after 3 lost, hold-down \
         {BENCH_HOLD_DOWN_MS} ms): intent revision {}",
        intent.revision
    );
    runtime.block_on(controller.put_intent(&intent))?;
    wait_log(
        bench,
        &format!("applied intent revision {} ", intent.revision),
        Duration::from_secs(15),
    )?;
    wait_log(bench, "dataplane: 1 policies", Duration::from_secs(30))?;
    let streams: &Streams = match streams {
        Some(s) => s,
        None => {
            eprintln!("bench: starting the stream ({STREAM_RATE} packets/s, UDP {STREAM_PORT})");
            let started = streams.insert(Streams::start(bench)?);
            wait_for(
                "no packet of the stream arrived",
                Duration::from_secs(10),
                || started.first_sent_after(0).is_some(),
            )?;
            started
        }
    };

    let mut blackouts = Vec::new();
    let mut downs = Vec::new();
    let mut rewrites = Vec::new();
    use crate::wan::Uniform;
    let mut random = crate::wan::XorShift(crate::stream::monotonic_ns() | 1);
    for cut in 1..=cuts {
        wait_paths_ready(bench, Duration::from_secs(60))?;
        // A restored path takes its flows back once it is usable again: let that happen.
        std::thread::sleep(Duration::from_millis(300));
        let uplink = carrying_uplink(prefix)?;
        // The wait above ends on a probe's reply, so without this every cut would fall at
        // the same point of the probe schedule.
        std::thread::sleep(Duration::from_secs_f64(
            random.next_f64() * f64::from(interval) / 1000.0,
        ));
        crate::set_impairment(
            1,
            uplink,
            Impairment {
                cut: true,
                ..Default::default()
            },
        )?;
        let cut_ns = crate::stream::monotonic_ns();
        let deadline = Instant::now() + Duration::from_secs(30);
        let resumed = loop {
            if let Some(a) = streams.first_sent_after(cut_ns) {
                break a;
            }
            if Instant::now() > deadline {
                let _ = crate::set_impairment(1, uplink, Impairment::default());
                bail!(
                    "the stream did not come back within 30 s of cutting uplink {uplink} \
                     (probes every {interval} ms)"
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        std::thread::sleep(Duration::from_millis(200));
        crate::set_impairment(1, uplink, Impairment::default())?;
        let gap_ms = blackout_ns(&streams.snapshot(), cut_ns, resumed.received_ns) as f64 / 1e6;
        let log = read_log(bench);
        let cut_ms = cut_ns as f64 / 1e6;
        let tunnel = format!("via {prefix}-{uplink}");
        let down = first_stamped(&log, cut_ms, |l| {
            l.contains(&tunnel) && l.contains("Up -> Down")
        })
        .map(|t| t - cut_ms);
        let rewrite =
            first_stamped(&log, cut_ms, |l| l.contains("dataplane: failover")).map(|t| t - cut_ms);
        let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1} ms"));
        eprintln!(
            "bench: {interval} ms probes, cut {cut}/{cuts} of uplink {uplink}: blackout \
             {gap_ms:.1} ms (path down logged after {}, data plane rewritten after {})",
            fmt(down),
            fmt(rewrite)
        );
        blackouts.push(gap_ms);
        downs.extend(down);
        rewrites.extend(rewrite);
    }

    // Degrade: the carrying uplink gets slower than the class's SLA; the stream must move
    // without losing a packet (the delayed ones still arrive).
    wait_paths_ready(bench, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_millis(300));
    let uplink = carrying_uplink(prefix)?;
    let start_ns = crate::stream::monotonic_ns();
    crate::set_impairment(
        1,
        uplink,
        Impairment {
            delay_ms: DEGRADE_DELAY_MS,
            ..Default::default()
        },
    )?;
    // Watched on the tunnels' counters rather than in the log: a flow whose path is
    // outranked first (its latency rising) and then dropped for the SLA moves without the
    // agent logging a failover (it reports one only when a class's first path changes).
    let deadline = Instant::now() + Duration::from_secs(60);
    let moved = loop {
        match carrying_uplink(prefix) {
            Ok(now) if now != uplink => break Ok(crate::stream::monotonic_ns()),
            Ok(_) if Instant::now() < deadline => continue,
            Ok(_) => {
                break Err(anyhow::anyhow!(
                    "the stream never moved off uplink {uplink} delayed by {DEGRADE_DELAY_MS} ms \
                     within 60 s"
                ))
            }
            Err(e) => break Err(e),
        }
    };
    // The moved flow settles; the last delayed packets arrive.
    std::thread::sleep(Duration::from_millis(500));
    let end_ns = crate::stream::monotonic_ns();
    crate::set_impairment(1, uplink, Impairment::default())?;
    let moved_ns = moved?;
    std::thread::sleep(Duration::from_millis(300));
    let lost = lost_between(&streams.snapshot(), start_ns, end_ns)
        .context("the stream's arrivals do not cover the degrade case")?;
    eprintln!(
        "bench: {interval} ms probes, uplink {uplink} delayed by {DEGRADE_DELAY_MS} ms (SLA \
         {SLA_MAX_LATENCY_MS} ms): the stream moved within {:.1} s, {lost} packets lost",
        moved_ns.saturating_sub(start_ns) as f64 / 1e9
    );
    let round = |v: f64| (v * 10.0).round() / 10.0;
    let stat = |p: f64| percentile(&blackouts, p).map(round).unwrap_or(0.0);
    Ok(FailoverRun {
        interval_ms: interval,
        timeout_ms: timeout,
        cuts,
        p50_ms: stat(50.0),
        p99_ms: stat(99.0),
        max_ms: stat(100.0),
        lost_on_degrade: lost,
        down_logged_p50_ms: percentile(&downs, 50.0).map(round),
        failover_logged_p50_ms: percentile(&rewrites, 50.0).map(round),
    })
}

#[cfg(test)]
mod failover_tests {
    use super::*;
    use crate::stream::Arrival;

    fn at(seq: u64, sent_ms: u64, received_ms: u64) -> Arrival {
        Arrival {
            seq,
            sent_ns: sent_ms * 1_000_000,
            received_ns: received_ms * 1_000_000,
        }
    }

    #[test]
    fn staying_on_a_browning_out_path_loses_the_ramps_integral() {
        // 100 packets/s, 1 %, 2 %, 3 % for a second each: 1 + 2 + 3 packets.
        assert!((ramp_loss(100, Duration::from_secs(1), 3) - 6.0).abs() < 1e-9);
        assert_eq!(ramp_loss(100, Duration::from_secs(1), 0), 0.0);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(10.0));
        assert_eq!(percentile(&v, 99.0), Some(20.0));
        assert_eq!(percentile(&v, 100.0), Some(20.0));
        assert_eq!(percentile(&[3.0], 0.0), Some(3.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn the_blackout_is_the_longest_gap_around_the_cut() {
        // Every 10 ms; cut at 35; packets 4..=11 lost; 12 (sent at 120) arrives at 121.
        let mut a: Vec<Arrival> = (0..4).map(|s| at(s, s * 10, s * 10 + 1)).collect();
        a.extend((12..20).map(|s| at(s, s * 10, s * 10 + 1)));
        assert_eq!(blackout_ns(&a, 35_000_000, 121_000_000), 90_000_000);
        // A longer gap long before the cut does not count.
        let mut b = vec![at(0, 0, 1)];
        b.extend(a.iter().map(|x| {
            at(
                x.seq + 100,
                x.sent_ns / 1_000_000 + 1000,
                x.received_ns / 1_000_000 + 1000,
            )
        }));
        assert_eq!(blackout_ns(&b, 1_035_000_000, 1_121_000_000), 90_000_000);
    }

    #[test]
    fn loss_counts_the_missing_sequences_of_the_window_only() {
        // 0..30 every 10 ms; 12 and 13 lost; 20 and 21 arrive late and out of order.
        let mut a: Vec<Arrival> = (0..30)
            .filter(|s| ![12, 13, 20, 21].contains(s))
            .map(|s| at(s, s * 10, s * 10 + 1))
            .collect();
        a.push(at(21, 210, 300));
        a.push(at(20, 200, 301));
        assert_eq!(lost_between(&a, 100_000_000, 250_000_000), Some(2));
        assert_eq!(lost_between(&a, 150_000_000, 250_000_000), Some(0));
        assert_eq!(
            lost_between(&a, 0, 250_000_000),
            None,
            "nothing before the window"
        );
    }

    #[test]
    fn stamped_lines_are_found_after_a_time() {
        let log = "10.000 probe: path a via pw1-00 Up -> Down: 3 lost\n\
                   20.500 dataplane: failover a -> b: path down\n\
                   30.000 probe: path a via pw1-00 Up -> Down: 3 lost\n";
        assert_eq!(
            first_stamped(log, 5.0, |l| l.contains("Up -> Down")),
            Some(10.0)
        );
        assert_eq!(
            first_stamped(log, 11.0, |l| l.contains("Up -> Down")),
            Some(30.0)
        );
        assert_eq!(
            first_stamped(log, 0.0, |l| l.contains("failover")),
            Some(20.5)
        );
        assert_eq!(first_stamped(log, 31.0, |l| l.contains("failover")), None);
    }
}
