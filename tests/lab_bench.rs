//! `patronus-lab bench join` is self-contained: after scripts/setup it starts its controller
//! and lab, prints one JSON object with the documented keys, and leaves nothing behind.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{ensure, Context};

fn lab_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|debug| debug.join("patronus-lab"))
        .context("target directory")?;
    ensure!(
        path.exists(),
        "{} is not built; `cargo test --workspace` (scripts/test) builds it",
        path.display()
    );
    Ok(path)
}

#[test]
fn bench_join_prints_its_figures_and_cleans_up() -> anyhow::Result<()> {
    let out = Command::new(lab_binary()?)
        .args(["bench", "join", "--sites", "2", "--burst", "2", "--json"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "bench join failed: {stderr}");
    ensure!(
        stderr.contains("bench: site2 joined") && stderr.contains("cleaning up"),
        "no progress on stderr: {stderr}"
    );
    let figures: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "stdout is not one JSON object: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    ensure!(figures["sites"] == 2 && figures["burst"] == 2, "{figures}");
    let number = |k: &str| {
        figures[k]
            .as_f64()
            .with_context(|| format!("{k} missing: {figures}"))
    };
    let (p50, max, burst) = (
        number("join_ms_p50")?,
        number("join_ms_max")?,
        number("join10_ms_max")?,
    );
    ensure!(0.0 < p50 && p50 <= max, "{figures}");
    ensure!(burst > 0.0 && burst < 30_000.0, "{figures}");
    let namespaces = Command::new("ip").args(["netns", "list"]).output()?;
    ensure!(
        !String::from_utf8_lossy(&namespaces.stdout).contains("pl-"),
        "the bench left lab namespaces behind"
    );
    Ok(())
}
