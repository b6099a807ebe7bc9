//! The edge's state directory: everything it needs to run without the controller or the
//! token. Every file is written atomically (temporary file, fsync, rename) with mode 0600 in a
//! 0700 directory; `identity.json` is written last, so its presence means the rest is there.
//!
//! | file            | content                                              |
//! |-----------------|------------------------------------------------------|
//! | `identity.json` | tenant, site, controller, NATS URL, intent location   |
//! | `wireguard.key` | the WireGuard private key (base64)                   |
//! | `site.key`      | the certificate private key (PKCS#8 PEM)             |
//! | `site.crt`      | the site certificate (PEM)                           |
//! | `ca.crt`        | the tenant CA (PEM)                                  |
//! | `nats.creds`    | NATS user JWT and seed                               |

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use patronus_proto::enroll::{IntentLocation, UplinkSpec};
use patronus_proto::{SiteId, TenantId};
use serde::{Deserialize, Serialize};

pub const IDENTITY_FILE: &str = "identity.json";
pub const WIREGUARD_KEY_FILE: &str = "wireguard.key";
pub const SITE_KEY_FILE: &str = "site.key";
pub const SITE_CERT_FILE: &str = "site.crt";
pub const CA_CERT_FILE: &str = "ca.crt";
pub const NATS_CREDS_FILE: &str = "nats.creds";

/// Who this edge is and where it talks to. No secrets.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Identity {
    pub controller_url: String,
    pub tenant_id: TenantId,
    pub site_id: SiteId,
    pub site_name: String,
    pub overlay_address: std::net::IpAddr,
    pub listen_port_base: u16,
    /// Unix seconds when the certificate and NATS credentials expire.
    pub expires_at: i64,
    pub enrolled_at: i64,
    /// Unix seconds of the last renewal (none before the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed_at: Option<i64>,
    pub nats_url: String,
    pub inbox_prefix: String,
    pub intent: IntentLocation,
    pub uplinks: Vec<UplinkSpec>,
}

/// The state directory.
pub struct StateDir {
    pub path: PathBuf,
}

impl StateDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn is_enrolled(&self) -> bool {
        self.file(IDENTITY_FILE).exists()
    }

    /// Create the directory (0700) if needed.
    pub fn create(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.path)
            .with_context(|| format!("cannot create {}", self.path.display()))?;
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot restrict {}", self.path.display()))
    }

    /// Write one file atomically with mode 0600.
    pub fn write(&self, name: &str, contents: &[u8]) -> anyhow::Result<()> {
        write_atomic(&self.file(name), contents)
    }

    pub fn read(&self, name: &str) -> anyhow::Result<String> {
        let path = self.file(name);
        std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {}; is this site enrolled (patronus-edge enroll)?",
                path.display()
            )
        })
    }

    pub fn identity(&self) -> anyhow::Result<Identity> {
        self.recover()?;
        let text = self.read(IDENTITY_FILE)?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is damaged; enroll again with a new token",
                self.file(IDENTITY_FILE).display()
            )
        })
    }
}

/// Marker that a set of `.new` files is complete and must replace the current ones.
const STAGED_MARKER: &str = "staged";

impl StateDir {
    /// Replace several files as one: write every `<name>.new`, then the marker naming them,
    /// then rename each into place, then drop the marker. A crash before the marker leaves
    /// the old set; after it, [`StateDir::recover`] finishes the job.
    pub fn replace_all(&self, files: &[(&str, &[u8])]) -> anyhow::Result<()> {
        for (name, contents) in files {
            self.write(&format!("{name}.new"), contents)?;
        }
        let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
        self.write(STAGED_MARKER, names.join("\n").as_bytes())?;
        self.recover()
    }

    /// Finish an interrupted [`StateDir::replace_all`], or discard one that never got its
    /// marker.
    pub fn recover(&self) -> anyhow::Result<()> {
        let marker = self.file(STAGED_MARKER);
        match std::fs::read_to_string(&marker) {
            Ok(names) => {
                for name in names.lines().filter(|n| !n.is_empty()) {
                    let staged = self.file(&format!("{name}.new"));
                    if staged.exists() {
                        std::fs::rename(&staged, self.file(name)).with_context(|| {
                            format!("cannot move {} into place", staged.display())
                        })?;
                    }
                }
                std::fs::remove_file(&marker)
                    .with_context(|| format!("cannot remove {}", marker.display()))?;
            }
            Err(_) => {
                if let Ok(entries) = std::fs::read_dir(&self.path) {
                    for entry in entries.flatten() {
                        if entry.file_name().to_string_lossy().ends_with(".new") {
                            let _ = std::fs::remove_file(entry.path());
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Temporary file in the same directory, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().context("a state file needs a directory")?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(contents)
        .and_then(|_| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_private_and_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("patronus-edge-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let state = StateDir::new(&dir);
        state.create().unwrap();
        state.write("x", b"one").unwrap();
        state.write("x", b"two").unwrap();
        assert_eq!(state.read("x").unwrap(), "two");
        let mode = std::fs::metadata(state.file("x"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        assert!(!state.is_enrolled());
        // A staged set with its marker is finished by recover(); one without is discarded.
        state.write("a.new", b"new a").unwrap();
        state.write(STAGED_MARKER, b"a").unwrap();
        state.recover().unwrap();
        assert_eq!(state.read("a").unwrap(), "new a");
        assert!(!state.file(STAGED_MARKER).exists());
        state.write("a.new", b"half-written set").unwrap();
        state.recover().unwrap();
        assert_eq!(state.read("a").unwrap(), "new a");
        assert!(!state.file("a.new").exists());
        state
            .replace_all(&[("a", b"third".as_slice()), ("b", b"bee".as_slice())])
            .unwrap();
        assert_eq!(state.read("a").unwrap(), "third");
        assert_eq!(state.read("b").unwrap(), "bee");
        assert!(state.identity().unwrap_err().to_string().contains("enroll"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
