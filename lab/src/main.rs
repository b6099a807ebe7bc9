//! `patronus-lab`: many Patronus sites on one machine, each in network namespaces behind an
//! emulated WAN, for the demo, the netns tests and the benchmarks.
//!
//! Modules: [`plan`] is the pure address and naming plan every other part derives from;
//! [`netns`] turns a plan into iproute2 steps (pure) and runs them, and tears a lab down.
//! Commands: `plan`, `up`, `down`, `status`. The WAN emulator (`impair`) and the benchmarks
//! build on these in the edge-agent-and-lab issue.

mod netns;
mod plan;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};

/// Where `up` records the size of the running lab.
const STATE_FILE: &str = "/var/lib/patronus/lab/state.json";

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
    },
    /// Remove everything `up` created (also after a crash).
    Down,
    /// What is up: sites, namespaces, addresses.
    Status {
        #[arg(long)]
        json: bool,
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

fn up(sites: u16, uplinks: u8) -> anyhow::Result<()> {
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
    std::fs::write(&state, serde_json::to_vec(&LabState { sites, uplinks })?)
        .with_context(|| format!("cannot write {STATE_FILE}"))?;
    eprintln!(
        "lab: up; WAN {} in {}, management {} on {}",
        lab.wan_space, lab.internet_ns, lab.mgmt_host_addr, lab.mgmt_bridge
    );
    Ok(())
}

fn down() -> anyhow::Result<()> {
    require_root()?;
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
        Command::Up { sites, uplinks } => up(sites, uplinks),
        Command::Down => down(),
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
