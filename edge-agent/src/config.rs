//! The edge agent's one configuration: defaults, then a TOML file (`--config`,
//! `PATRONUS_EDGE_CONFIG`), then `PATRONUS_EDGE_*` variables and flags; validated at start
//! with a message that names the setting.
//!
//! ```toml
//! state_dir = "/var/lib/patronus-edge"
//! [wireguard]
//! backend = "auto"            # auto | kernel | userspace
//! rotate_after_days = 30      # make a new key pair this long after the current one; 0 = never
//! [agent]
//! reconcile_interval_s = 5
//! heartbeat_interval_s = 10
//! [dataplane]
//! mode = "auto"               # auto (eBPF where it loads, else routes-only) | off
//! lan_interface = "lan0"      # default: the interfaces holding an address in the site's LANs
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::tunnels::BackendChoice;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    pub state_dir: PathBuf,
    pub wireguard: WireguardConfig,
    pub agent: AgentConfig,
    pub dataplane: DataplaneConfig,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DataplaneChoice {
    /// Load the eBPF programs; where they do not load, say why and run routes-only.
    #[default]
    Auto,
    /// Routes only (default path per destination).
    Off,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DataplaneConfig {
    pub mode: DataplaneChoice,
    /// The LAN interface to steer; by default every interface with an address in the site's
    /// LAN prefixes.
    pub lan_interface: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WireguardConfig {
    pub backend: BackendChoice,
    /// Days after which the agent makes a new WireGuard key pair and rotates it in (counted
    /// from when the current key was made); 0 never rotates.
    pub rotate_after_days: u32,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// How often the namespace is compared with the applied intent.
    pub reconcile_interval_s: u64,
    /// How often a heartbeat is published.
    pub heartbeat_interval_s: u64,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/patronus-edge"),
            wireguard: WireguardConfig::default(),
            agent: AgentConfig::default(),
            dataplane: DataplaneConfig::default(),
        }
    }
}

impl Default for WireguardConfig {
    fn default() -> Self {
        Self {
            backend: BackendChoice::Auto,
            rotate_after_days: 30,
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            reconcile_interval_s: 5,
            heartbeat_interval_s: 10,
        }
    }
}

impl EdgeConfig {
    /// Load from an optional file and the environment (through `env`, so tests need not
    /// touch the process environment), then validate.
    pub fn load(file: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("config file {} is not valid", path.display()))?
            }
            None => EdgeConfig::default(),
        };
        if let Some(dir) = env("PATRONUS_EDGE_STATE_DIR") {
            config.state_dir = PathBuf::from(dir);
        }
        if let Some(backend) = env("PATRONUS_EDGE_WG_BACKEND") {
            config.wireguard.backend = match backend.as_str() {
                "auto" => BackendChoice::Auto,
                "kernel" => BackendChoice::Kernel,
                "userspace" => BackendChoice::Userspace,
                other => {
                    bail!("PATRONUS_EDGE_WG_BACKEND: {other:?} is not auto, kernel or userspace")
                }
            };
        }
        if let Some(days) = env("PATRONUS_EDGE_WG_ROTATE_AFTER_DAYS") {
            config.wireguard.rotate_after_days = days.trim().parse().map_err(|_| {
                anyhow::anyhow!(
                    "PATRONUS_EDGE_WG_ROTATE_AFTER_DAYS: {days:?} is not a number of days"
                )
            })?;
        }
        if let Some(mode) = env("PATRONUS_EDGE_DATAPLANE") {
            config.dataplane.mode = match mode.as_str() {
                "auto" => DataplaneChoice::Auto,
                "off" => DataplaneChoice::Off,
                other => bail!("PATRONUS_EDGE_DATAPLANE: {other:?} is not auto or off"),
            };
        }
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.state_dir.as_os_str().is_empty() || !self.state_dir.is_absolute() {
            bail!("state_dir must be an absolute path");
        }
        if !(1..=3600).contains(&self.agent.reconcile_interval_s) {
            bail!("agent.reconcile_interval_s must be 1-3600");
        }
        if !(1..=3600).contains(&self.agent.heartbeat_interval_s) {
            bail!("agent.heartbeat_interval_s must be 1-3600");
        }
        if self.wireguard.rotate_after_days > 3650 {
            bail!("wireguard.rotate_after_days must be 0 (never) to 3650");
        }
        if let Some(name) = &self.dataplane.lan_interface {
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
                bail!("dataplane.lan_interface {name:?} is not an interface name");
            }
        }
        Ok(())
    }

    pub fn reconcile_interval(&self) -> Duration {
        Duration::from_secs(self.agent.reconcile_interval_s)
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_secs(self.agent.heartbeat_interval_s)
    }

    /// How long a WireGuard key is used before a new one is made; `None`: never.
    pub fn rotate_after(&self) -> Option<Duration> {
        (self.wireguard.rotate_after_days > 0)
            .then(|| Duration::from_secs(u64::from(self.wireguard.rotate_after_days) * 86_400))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn a_file_sets_values_and_the_environment_overrides_it() {
        let dir = std::env::temp_dir().join(format!("patronus-edge-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("edge.toml");
        std::fs::write(
            &file,
            "state_dir = \"/srv/edge\"\n[wireguard]\nbackend = \"userspace\"\n[agent]\nreconcile_interval_s = 2\n",
        )
        .unwrap();
        let config = EdgeConfig::load(Some(&file), &no_env).unwrap();
        assert_eq!(config.state_dir, PathBuf::from("/srv/edge"));
        assert_eq!(config.wireguard.backend, BackendChoice::Userspace);
        assert_eq!(config.agent.reconcile_interval_s, 2);
        assert_eq!(config.agent.heartbeat_interval_s, 10);
        assert_eq!(config.wireguard.rotate_after_days, 30);
        assert_eq!(
            config.rotate_after(),
            Some(Duration::from_secs(30 * 86_400))
        );
        let env = |name: &str| (name == "PATRONUS_EDGE_WG_BACKEND").then(|| "kernel".to_owned());
        assert_eq!(
            EdgeConfig::load(Some(&file), &env)
                .unwrap()
                .wireguard
                .backend,
            BackendChoice::Kernel
        );
        // Rotation: from the file, overridden by the environment; 0 is never.
        std::fs::write(&file, "[wireguard]\nrotate_after_days = 7\n").unwrap();
        assert_eq!(
            EdgeConfig::load(Some(&file), &no_env)
                .unwrap()
                .wireguard
                .rotate_after_days,
            7
        );
        let never =
            |name: &str| (name == "PATRONUS_EDGE_WG_ROTATE_AFTER_DAYS").then(|| "0".to_owned());
        assert_eq!(
            EdgeConfig::load(Some(&file), &never)
                .unwrap()
                .rotate_after(),
            None
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_settings_name_themselves() {
        let dir = std::env::temp_dir().join(format!("patronus-edge-badcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (text, says) in [
            ("[wireguard]\nbackend = \"magic\"\n", "not valid"),
            ("colour = 1\n", "not valid"),
            (
                "[agent]\nreconcile_interval_s = 0\n",
                "reconcile_interval_s",
            ),
            ("state_dir = \"relative\"\n", "absolute"),
            (
                "[wireguard]\nrotate_after_days = 5000\n",
                "rotate_after_days",
            ),
            ("[wireguard]\nrotate_after_days = -1\n", "not valid"),
        ] {
            let file = dir.join("edge.toml");
            std::fs::write(&file, text).unwrap();
            let err = format!("{:#}", EdgeConfig::load(Some(&file), &no_env).unwrap_err());
            assert!(err.contains(says), "{text}: {err}");
        }
        let env = |name: &str| (name == "PATRONUS_EDGE_WG_BACKEND").then(|| "fast".to_owned());
        assert!(EdgeConfig::load(None, &env).is_err());
        let env = |name: &str| {
            (name == "PATRONUS_EDGE_WG_ROTATE_AFTER_DAYS").then(|| "monthly".to_owned())
        };
        let err = format!("{:#}", EdgeConfig::load(None, &env).unwrap_err());
        assert!(err.contains("PATRONUS_EDGE_WG_ROTATE_AFTER_DAYS"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
