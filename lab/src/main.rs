//! `patronus-lab`: many Patronus sites on one machine, each in network namespaces behind an
//! emulated WAN, for the demo, the netns tests and the benchmarks.
//!
//! Modules: [`plan`] is the pure address and naming plan every other part derives from;
//! [`netns`] turns a plan into iproute2 steps (pure) and runs them, and tears a lab down.
//! [`wan`] decides what the emulated WAN does to a packet (pure); [`daemon`] is the emulator
//! process around it (TUN in the internet namespace, a control socket).
//! [`bench`] runs self-contained benchmarks on a lab of their own (`bench join`: a controller
//! with a throwaway database, sites enrolling through real tokens, time to first packet;
//! `bench failover`: blackout of a steady UDP stream when its uplink is cut). [`stream`] is
//! that stream (`udp-stream send|recv`, hidden, run inside a namespace).
//! Commands: `plan`, `up`, `down`, `status`, `impair`, `bench join`, `bench steering`,
//! `bench failover`.

mod bench;
mod daemon;
mod netns;
mod plan;
mod stream;
mod wan;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};

/// Where `up` records the size of the running lab.
const STATE_FILE: &str = "/var/lib/patronus/lab/state.json";
/// The WAN emulator's control socket, pid file and log.
const WAN_SOCKET: &str = "/var/lib/patronus/lab/wan.sock";
const WAN_PID: &str = "/var/lib/patronus/lab/wan.pid";
const WAN_LOG: &str = "/var/lib/patronus/lab/wan.log";

#[derive(Serialize, Deserialize)]
struct LabState {
    sites: u16,
    uplinks: u8,
}

#[derive(Parser)]
#[command(
    name = "patronus-lab",
    version,
    about = "Patronus lab of sites in network namespaces"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the namespaces, interfaces and addresses a lab of this size uses.
    Plan {
        #[arg(long, default_value_t = 4)]
        sites: u16,
        #[arg(long, default_value_t = 2)]
        uplinks: u8,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Create the lab's namespaces, links, addresses and routes (needs root).
    Up {
        #[arg(long, default_value_t = 4)]
        sites: u16,
        #[arg(long, default_value_t = 2)]
        uplinks: u8,
        /// Relay a port of the management address to a loopback service, e.g.
        /// `8080=127.0.0.1:8080` (the controller) or `4222=127.0.0.1:4222` (NATS).
        #[arg(long = "relay")]
        relays: Vec<daemon::Relay>,
    },
    /// Remove everything `up` created (also after a crash).
    Down,
    /// What is up: sites, namespaces, addresses.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Set what one uplink suffers (exactly these values; unnamed ones are zero).
    Impair {
        /// Site number (1..N).
        #[arg(long)]
        site: u16,
        /// Uplink index (0..U-1).
        #[arg(long)]
        uplink: u8,
        /// Round-trip time added, in ms (half each way).
        #[arg(long, default_value_t = 0.0)]
        delay: f64,
        /// Delay variation, in ms (at most the delay).
        #[arg(long, default_value_t = 0.0)]
        jitter: f64,
        /// Packet loss in each direction, in percent.
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        /// Rate limit in Mbit/s, each direction.
        #[arg(long)]
        rate: Option<f64>,
        /// Drop everything on the uplink.
        #[arg(long, conflicts_with = "restore")]
        cut: bool,
        /// Lower (or raise) the uplink's MTU, in bytes (576-9000): both ends of its link, so
        /// the site's kernel knows it from its device and other sites learn it from the
        /// internet's "fragmentation needed" replies to DF packets (classic path MTU
        /// discovery). `--restore` puts it back to 1500.
        #[arg(long, conflicts_with = "restore", value_parser = clap::value_parser!(u16).range(576..=9000))]
        mtu: Option<u16>,
        /// Remove every impairment.
        #[arg(long)]
        restore: bool,
    },
    /// Benchmarks on a lab of their own (root; after scripts/setup): figures on stdout.
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
    /// A steady UDP stream with sequence numbers and send times (for `bench failover`; run it
    /// inside a namespace with `ip netns exec`).
    #[command(hide = true)]
    UdpStream {
        #[command(subcommand)]
        mode: UdpStreamMode,
    },
    /// The WAN emulator process (started by `up`).
    #[command(hide = true)]
    WanDaemon {
        #[arg(long)]
        sites: u16,
        #[arg(long)]
        uplinks: u8,
        #[arg(long = "relay")]
        relays: Vec<daemon::Relay>,
    },
}

#[derive(Subcommand)]
enum UdpStreamMode {
    /// Send `--rate` datagrams per second to `--to` until killed (or for `--seconds`).
    Send {
        #[arg(long)]
        to: std::net::SocketAddr,
        #[arg(long, default_value_t = 100)]
        rate: u32,
        /// Datagram payload size in bytes.
        #[arg(long, default_value_t = 1000)]
        size: usize,
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Print `<seq> <sent ns> <received ns>` (CLOCK_MONOTONIC) for every datagram received.
    Recv {
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Time from `patronus-edge enroll` on a new site to its first packet answered by every
    /// other site: sites joining one after another, then a burst joining at once.
    Join {
        /// Sites that join one after another.
        #[arg(long, default_value_t = 5)]
        sites: u16,
        /// Sites that then join at the same moment.
        #[arg(long, default_value_t = 10)]
        burst: u16,
        /// One JSON object: {sites, join_ms_p50, join_ms_max, join10_ms_max, burst}.
        #[arg(long)]
        json: bool,
        /// Keep the agents' logs in this directory.
        #[arg(long)]
        keep_logs: Option<PathBuf>,
    },
    /// Blackout of a steady 100 packets/s UDP stream (a VoIP class, active-backup) when the
    /// uplink carrying it is cut, per probe interval; and packets lost when it is degraded
    /// past the class's SLA instead.
    Failover {
        /// One JSON object: {runs: [{interval_ms, cuts, p50_ms, p99_ms, max_ms,
        /// lost_on_degrade, ...}]}.
        #[arg(long)]
        json: bool,
        /// Cuts per probe interval.
        #[arg(long, default_value_t = 20)]
        cuts: u32,
        /// Probe intervals to measure, in ms.
        #[arg(long, value_delimiter = ',', default_value = "1000,100,20")]
        intervals: Vec<u32>,
        /// Keep the agents' logs (lines stamped with CLOCK_MONOTONIC ms) in this directory.
        #[arg(long)]
        keep_logs: Option<PathBuf>,
    },
    /// A brown-out among many sites: with `--sites` sites in a full mesh, the loss on the
    /// uplink carrying a 100 packets/s VoIP stream (SLA: 1 % loss) ramps from 0 to
    /// `--max-loss` %, `--ramps` times; per ramp the loss when the stream moved and the
    /// packets it lost, against what staying on the path would have lost.
    Brownout {
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(3..=20))]
        sites: u16,
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
        ramps: u32,
        /// The VoIP policy's probe interval toward the stream's destination, in ms.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(10..=60000))]
        interval: u32,
        /// Loss at the end of the ramp, in percent (1 % more per step).
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(2..=100))]
        max_loss: u32,
        /// Seconds from 0 to `--max-loss`.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(2..=600))]
        ramp_seconds: u32,
        /// One JSON object: {sites, interval_ms, runs: [{loss_at_move_pct, moved_after_ms,
        /// lost, lost_if_stayed, longest_gap_ms}], lost_p50, lost_p99, ...}.
        #[arg(long)]
        json: bool,
        /// Keep the agents' logs in this directory.
        #[arg(long)]
        keep_logs: Option<PathBuf>,
    },
    /// LAN-to-LAN TCP throughput through a path the eBPF programs steer, against the same
    /// path with the programs detached, in one run.
    Steering {
        /// Seconds per measurement (three measurements).
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        /// One JSON object: {steered_mbps, detached_mbps, ratio, seconds}.
        #[arg(long)]
        json: bool,
        /// Keep the agents' logs in this directory.
        #[arg(long)]
        keep_logs: Option<PathBuf>,
    },
}

fn require_root() -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .unwrap_or("");
    if euid != "0" {
        bail!("the lab creates network namespaces: run it as root");
    }
    Ok(())
}

fn up(sites: u16, uplinks: u8, relays: &[daemon::Relay]) -> anyhow::Result<()> {
    require_root()?;
    let lab = plan::plan(sites, uplinks)?;
    let existing = netns::lab_namespaces()?;
    if !existing.is_empty() {
        bail!(
            "a lab is already up ({} namespaces); run `patronus-lab down` first",
            existing.len()
        );
    }
    let steps = netns::up_steps(&lab);
    eprintln!(
        "lab: creating {sites} sites with {uplinks} uplinks ({} namespaces, {} steps)",
        1 + 2 * usize::from(sites),
        steps.len()
    );
    if let Err(e) = netns::run_steps(&steps) {
        eprintln!("lab: failed, removing what was created");
        let _ = netns::down();
        return Err(e);
    }
    let state = PathBuf::from(STATE_FILE);
    if let Some(dir) = state.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if let Err(e) = start_wan_daemon(sites, uplinks, relays) {
        eprintln!("lab: the WAN emulator did not start, removing the lab");
        let _ = stop_wan_daemon();
        let _ = netns::down();
        return Err(e);
    }
    std::fs::write(&state, serde_json::to_vec(&LabState { sites, uplinks })?)
        .with_context(|| format!("cannot write {STATE_FILE}"))?;
    eprintln!(
        "lab: up; WAN {} in {}, management {} on {}",
        lab.wan_space, lab.internet_ns, lab.mgmt_host_addr, lab.mgmt_bridge
    );
    Ok(())
}

fn start_wan_daemon(sites: u16, uplinks: u8, relays: &[daemon::Relay]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(WAN_LOG)
        .with_context(|| format!("cannot open {WAN_LOG}"))?;
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command.args([
        "wan-daemon",
        "--sites",
        &sites.to_string(),
        "--uplinks",
        &uplinks.to_string(),
    ]);
    for relay in relays {
        command
            .arg("--relay")
            .arg(format!("{}={}", relay.listen.port(), relay.target));
    }
    let child = command
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the WAN emulator")?;
    std::fs::write(WAN_PID, child.id().to_string())?;
    let socket = PathBuf::from(WAN_SOCKET);
    for _ in 0..100 {
        let probe = daemon::Request {
            uplink: std::net::Ipv4Addr::UNSPECIFIED,
            set: None,
        };
        if daemon::control(&socket, &probe).is_ok() {
            eprintln!(
                "lab: WAN emulator running (pid {}, log {WAN_LOG})",
                child.id()
            );
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    bail!("the WAN emulator did not come up within 5 s; see {WAN_LOG}")
}

/// Stop the emulator named by the pid file (only if that pid still is one).
fn stop_wan_daemon() -> anyhow::Result<()> {
    if let Ok(pid) = std::fs::read_to_string(WAN_PID) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("wan-daemon") {
                // SAFETY: sending a signal to a pid we checked is our daemon.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                for _ in 0..40 {
                    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        }
    }
    let _ = std::fs::remove_file(WAN_PID);
    let _ = std::fs::remove_file(WAN_SOCKET);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn impair(
    site: u16,
    uplink: u8,
    delay: f64,
    jitter: f64,
    loss: f64,
    rate: Option<f64>,
    cut: bool,
    mtu: Option<u16>,
    restore: bool,
) -> anyhow::Result<()> {
    let mtu = if restore { Some(LAB_MTU) } else { mtu };
    let impairment = if restore {
        wan::Impairment::default()
    } else {
        wan::Impairment {
            delay_ms: delay,
            jitter_ms: jitter,
            loss_pct: loss,
            rate_mbit: rate,
            cut,
        }
    };
    let (name, address, now) = set_impairment(site, uplink, impairment)?;
    eprintln!(
        "lab: site{site} {name} ({address}) now: {}",
        serde_json::to_string(&now)?
    );
    if let Some(mtu) = mtu {
        set_uplink_mtu(site, uplink, mtu)?;
        eprintln!("lab: site{site} {name} ({address}) MTU now {mtu} (both ends of its link)");
    }
    Ok(())
}

/// The MTU of every lab link.
pub const LAB_MTU: u16 = 1500;

/// The uplink `uplink` of site `site` as planned for the running lab.
fn running_uplink(site: u16, uplink: u8) -> anyhow::Result<(plan::SitePlan, plan::UplinkPlan)> {
    let state: LabState = std::fs::read(STATE_FILE)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .context("no lab is up; run `patronus-lab up` first")?;
    let lab = plan::plan(state.sites, state.uplinks)?;
    let site_plan = lab
        .sites
        .iter()
        .find(|s| s.index == site)
        .with_context(|| format!("--site {site}: the lab has sites 1-{}", state.sites))?
        .clone();
    let target = site_plan
        .uplinks
        .iter()
        .find(|u| u.index == uplink)
        .with_context(|| {
            format!(
                "--uplink {uplink}: sites have uplinks 0-{}",
                state.uplinks - 1
            )
        })?
        .clone();
    Ok((site_plan, target))
}

/// Set the MTU of both ends of an uplink's link (the site's router side and the internet's).
pub(crate) fn set_uplink_mtu(site: u16, uplink: u8, mtu: u16) -> anyhow::Result<()> {
    let (site_plan, target) = running_uplink(site, uplink)?;
    for (ns, dev) in [
        (site_plan.router_ns.as_str(), target.router_if.as_str()),
        (plan::INTERNET_NS, target.internet_if.as_str()),
    ] {
        netns::ip(&[
            "-n".into(),
            ns.into(),
            "link".into(),
            "set".into(),
            dev.into(),
            "mtu".into(),
            mtu.to_string(),
        ])?;
    }
    Ok(())
}

/// Make uplink `uplink` of site `site` suffer exactly `impairment` (through the running
/// emulator); returns the uplink's interface name, address and what it suffers now.
pub(crate) fn set_impairment(
    site: u16,
    uplink: u8,
    impairment: wan::Impairment,
) -> anyhow::Result<(String, std::net::Ipv4Addr, wan::Impairment)> {
    let (_, target) = running_uplink(site, uplink)?;
    impairment.validate()?;
    let reply = daemon::control(
        std::path::Path::new(WAN_SOCKET),
        &daemon::Request {
            uplink: target.router_addr.addr(),
            set: Some(impairment),
        },
    )?;
    if !reply.ok {
        bail!("{}", reply.error.unwrap_or_else(|| "refused".into()));
    }
    Ok((
        target.router_if.clone(),
        target.router_addr.addr(),
        reply.impairment.unwrap_or_default(),
    ))
}

fn down() -> anyhow::Result<()> {
    require_root()?;
    stop_wan_daemon()?;
    let removed = netns::down()?;
    let _ = std::fs::remove_file(STATE_FILE);
    eprintln!("lab: down ({removed} namespaces removed)");
    Ok(())
}

fn status(json: bool) -> anyhow::Result<()> {
    let namespaces = netns::lab_namespaces()?;
    let state: Option<LabState> = std::fs::read(STATE_FILE)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let lab = match &state {
        Some(s) => Some(plan::plan(s.sites, s.uplinks)?),
        None => None,
    };
    let sites: Vec<serde_json::Value> = lab
        .iter()
        .flat_map(|l| l.sites.iter())
        .map(|site| {
            serde_json::json!({
                "name": site.name,
                "router_ns": site.router_ns,
                "lan_ns": site.lan_ns,
                "present": namespaces.contains(&site.router_ns) && namespaces.contains(&site.lan_ns),
                "lan_host": site.lan_host_addr.addr(),
                "mgmt": site.mgmt_addr.addr(),
                "uplinks": site.uplinks.iter().map(|u| serde_json::json!({
                    "name": u.router_if,
                    "address": u.router_addr.addr(),
                    "gateway": u.internet_addr.addr(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let report = serde_json::json!({
        "up": state.is_some() && !namespaces.is_empty(),
        "namespaces": namespaces.len(),
        "sites": sites,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if state.is_none() && namespaces.is_empty() {
        println!("no lab is up");
    } else {
        println!(
            "lab: {} namespaces; {} sites",
            namespaces.len(),
            sites.len()
        );
        for site in &sites {
            println!(
                "  {} ({}): lan host {} mgmt {} {}",
                site["name"].as_str().unwrap_or(""),
                if site["present"] == true {
                    "up"
                } else {
                    "MISSING"
                },
                site["lan_host"],
                site["mgmt"],
                site["uplinks"]
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up {
            sites,
            uplinks,
            relays,
        } => up(sites, uplinks, &relays),
        Command::Down => down(),
        Command::Bench {
            which:
                BenchCommand::Join {
                    sites,
                    burst,
                    json,
                    keep_logs,
                },
        } => require_root().and_then(|()| bench::join(sites, burst, json, keep_logs.as_deref())),
        Command::Bench {
            which:
                BenchCommand::Steering {
                    seconds,
                    json,
                    keep_logs,
                },
        } => require_root().and_then(|()| bench::steering(seconds, json, keep_logs.as_deref())),
        Command::Bench {
            which:
                BenchCommand::Failover {
                    json,
                    cuts,
                    intervals,
                    keep_logs,
                },
        } => require_root()
            .and_then(|()| bench::failover(cuts, &intervals, json, keep_logs.as_deref())),
        Command::Bench {
            which:
                BenchCommand::Brownout {
                    sites,
                    ramps,
                    interval,
                    max_loss,
                    ramp_seconds,
                    json,
                    keep_logs,
                },
        } => require_root().and_then(|()| {
            bench::brownout(
                &bench::BrownoutSpec {
                    sites,
                    ramps,
                    interval_ms: interval,
                    max_loss_pct: max_loss,
                    ramp_seconds,
                },
                json,
                keep_logs.as_deref(),
            )
        }),
        Command::UdpStream {
            mode:
                UdpStreamMode::Send {
                    to,
                    rate,
                    size,
                    seconds,
                },
        } => stream::send(to, rate, size, seconds),
        Command::UdpStream {
            mode: UdpStreamMode::Recv { listen },
        } => stream::recv(listen),
        Command::Impair {
            site,
            uplink,
            delay,
            jitter,
            loss,
            rate,
            cut,
            mtu,
            restore,
        } => impair(site, uplink, delay, jitter, loss, rate, cut, mtu, restore),
        Command::WanDaemon {
            sites,
            uplinks,
            relays,
        } => plan::plan(sites, uplinks)
            .map_err(anyhow::Error::from)
            .and_then(|lab| daemon::run(&lab, std::path::Path::new(WAN_SOCKET), &relays)),
        Command::Status { json } => status(json),
        Command::Plan {
            sites,
            uplinks,
            json,
        } => print_plan(sites, uplinks, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("patronus-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_plan(sites: u16, uplinks: u8, json: bool) -> anyhow::Result<()> {
    let lab = plan::plan(sites, uplinks)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&lab)?);
        return Ok(());
    }
    println!(
        "WAN {} in namespace {}, management host {} on {}",
        lab.wan_space, lab.internet_ns, lab.mgmt_host_addr, lab.mgmt_bridge
    );
    for site in &lab.sites {
        let wans: Vec<String> = site
            .uplinks
            .iter()
            .map(|u| format!("{}={}", u.router_if, u.router_addr))
            .collect();
        println!(
            "{:<8} ns {:<8} lan {} (host {}) mgmt {} {}",
            site.name,
            site.router_ns,
            site.lan_prefix,
            site.lan_host_addr.addr(),
            site.mgmt_addr.addr(),
            wans.join(" ")
        );
    }
    Ok(())
}
