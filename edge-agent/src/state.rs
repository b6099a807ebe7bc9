//! The edge's state directory: everything it needs to run without the controller or the
//! token. Every file is written atomically (temporary file, fsync, rename) with mode 0600 in a
//! 0700 directory; `identity.json` is written last, so its presence means the rest is there.
//!
//! | file            | content                                              |
//! |-----------------|------------------------------------------------------|
//! | `identity.json` | tenant, site, controller, NATS URL, intent location   |
//! | `wireguard.key` | the WireGuard private key (base64)                   |
//! | `wireguard.next.key` | the next WireGuard private key, during a rotation |
//! | `wireguard.json` | when the keys were made, the rotation's progress (no secret) |
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
pub const WIREGUARD_NEXT_KEY_FILE: &str = "wireguard.next.key";
pub const WIREGUARD_META_FILE: &str = "wireguard.json";

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

/// When this site's WireGuard keys were made and how far the rotation to the next one got.
/// No secret: the keys themselves are in their own files.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WireguardMeta {
    /// Unix seconds when `wireguard.key` was made (none: at enrollment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<i64>,
    /// Unix seconds when `wireguard.next.key` was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_created_at: Option<i64>,
    /// Unix seconds when the controller last accepted the next key's public key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_accepted_at: Option<i64>,
}

/// The site's WireGuard private keys: the one its interfaces use, and during a rotation the
/// next one (made here; only its public key is ever sent). `Debug` shows public keys only.
pub struct WireguardKeys {
    current: wireguard_control::Key,
    next: Option<wireguard_control::Key>,
    pub meta: WireguardMeta,
}

impl std::fmt::Debug for WireguardKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireguardKeys")
            .field("current_public", &self.current_public())
            .field("next_public", &self.next_public())
            .field("meta", &self.meta)
            .finish()
    }
}

fn read_wg_key(state: &StateDir, name: &str) -> anyhow::Result<wireguard_control::Key> {
    wireguard_control::Key::from_base64(state.read(name)?.trim())
        .map_err(|_| anyhow::anyhow!("{name} is damaged; enroll again"))
}

impl WireguardKeys {
    /// Read the keys, finishing a promotion that a crash interrupted (a next key equal to the
    /// current one).
    pub fn load(state: &StateDir) -> anyhow::Result<Self> {
        let current = read_wg_key(state, WIREGUARD_KEY_FILE)?;
        let next = match state.file(WIREGUARD_NEXT_KEY_FILE).exists() {
            true => Some(read_wg_key(state, WIREGUARD_NEXT_KEY_FILE)?),
            false => None,
        };
        let meta: WireguardMeta = state
            .read(WIREGUARD_META_FILE)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        let mut keys = Self {
            current,
            next,
            meta,
        };
        if keys.next.as_ref() == Some(&keys.current) {
            keys.finish_promotion(state)?;
        } else if keys.next.is_none()
            && (keys.meta.next_created_at.is_some() || keys.meta.next_accepted_at.is_some())
        {
            keys.meta.next_created_at = None;
            keys.meta.next_accepted_at = None;
            keys.write_meta(state)?;
        }
        Ok(keys)
    }

    /// A fresh key pair held in memory only (tests that execute actions without a state dir).
    #[cfg(test)]
    pub fn for_tests() -> Self {
        Self {
            current: wireguard_control::Key::generate_private(),
            next: None,
            meta: WireguardMeta::default(),
        }
    }

    pub fn current_public(&self) -> patronus_proto::WgPublicKey {
        patronus_proto::WgPublicKey(self.current.get_public().0)
    }

    pub fn next_public(&self) -> Option<patronus_proto::WgPublicKey> {
        self.next
            .as_ref()
            .map(|k| patronus_proto::WgPublicKey(k.get_public().0))
    }

    /// The private key of `public`, if this site holds it.
    pub fn private_for(
        &self,
        public: &patronus_proto::WgPublicKey,
    ) -> Option<&wireguard_control::Key> {
        std::iter::once(&self.current)
            .chain(self.next.as_ref())
            .find(|k| k.get_public().0 == public.0)
    }

    /// Unix seconds when the current key was made (`enrolled_at` for the enrollment's key).
    pub fn current_created_at(&self, enrolled_at: i64) -> i64 {
        self.meta.created_at.unwrap_or(enrolled_at)
    }

    fn write_meta(&self, state: &StateDir) -> anyhow::Result<()> {
        state.write(WIREGUARD_META_FILE, &serde_json::to_vec_pretty(&self.meta)?)
    }

    /// Make the next key pair (kept beside the current one, which stays in use) and return
    /// its public key.
    pub fn make_next(
        &mut self,
        state: &StateDir,
        now: i64,
    ) -> anyhow::Result<patronus_proto::WgPublicKey> {
        let key = wireguard_control::Key::generate_private();
        state.write(WIREGUARD_NEXT_KEY_FILE, key.to_base64().as_bytes())?;
        self.next = Some(key);
        self.meta.next_created_at = Some(now);
        self.meta.next_accepted_at = None;
        self.write_meta(state)?;
        Ok(self.next_public().expect("just made"))
    }

    /// The controller accepted the next key's public key at `now`.
    pub fn accepted(&mut self, state: &StateDir, now: i64) -> anyhow::Result<()> {
        self.meta.next_accepted_at = Some(now);
        self.write_meta(state)
    }

    /// Forget the next key (the controller refused it for good); a new one is made later.
    pub fn discard_next(&mut self, state: &StateDir) -> anyhow::Result<()> {
        self.next = None;
        self.meta.next_created_at = None;
        self.meta.next_accepted_at = None;
        self.write_meta(state)?;
        match std::fs::remove_file(state.file(WIREGUARD_NEXT_KEY_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// The next key is now the site's key (its intent names it and the interfaces use it):
    /// it replaces `wireguard.key`, and the previous key is gone. Each step is one atomic
    /// write; [`WireguardKeys::load`] finishes the job after a crash between them.
    pub fn promote(&mut self, state: &StateDir) -> anyhow::Result<()> {
        let Some(next) = self.next.clone() else {
            return Ok(());
        };
        state.write(WIREGUARD_KEY_FILE, next.to_base64().as_bytes())?;
        self.current = next;
        self.finish_promotion(state)
    }

    fn finish_promotion(&mut self, state: &StateDir) -> anyhow::Result<()> {
        self.meta.created_at = self.meta.next_created_at.or(self.meta.created_at);
        self.meta.next_created_at = None;
        self.meta.next_accepted_at = None;
        self.write_meta(state)?;
        self.next = None;
        match std::fs::remove_file(state.file(WIREGUARD_NEXT_KEY_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
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

    fn key_dir(name: &str) -> StateDir {
        let dir = std::env::temp_dir().join(format!("patronus-edge-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let state = StateDir::new(&dir);
        state.create().unwrap();
        let enrolled = wireguard_control::Key::generate_private();
        state
            .write(WIREGUARD_KEY_FILE, enrolled.to_base64().as_bytes())
            .unwrap();
        state
    }

    fn mode(state: &StateDir, name: &str) -> u32 {
        std::fs::metadata(state.file(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn a_next_key_is_made_kept_private_and_promoted_in_place_of_the_current_one() {
        let state = key_dir("wgkeys");
        let mut keys = WireguardKeys::load(&state).unwrap();
        let first = keys.current_public();
        assert_eq!(keys.current_created_at(100), 100);
        assert_eq!(keys.next_public(), None);

        let next = keys.make_next(&state, 5_000).unwrap();
        assert_ne!(next, first);
        assert_eq!(mode(&state, WIREGUARD_NEXT_KEY_FILE), 0o600);
        assert_eq!(mode(&state, WIREGUARD_META_FILE), 0o600);
        // Both keys are held; the current one is still the one in use.
        assert!(keys.private_for(&first).is_some());
        assert!(keys.private_for(&next).is_some());
        assert!(keys
            .private_for(&patronus_proto::WgPublicKey([9; 32]))
            .is_none());
        keys.accepted(&state, 5_001).unwrap();
        // A restart finds the rotation where it was.
        let reloaded = WireguardKeys::load(&state).unwrap();
        assert_eq!(reloaded.current_public(), first);
        assert_eq!(reloaded.next_public(), Some(next));
        assert_eq!(reloaded.meta.next_accepted_at, Some(5_001));
        // The metadata and the debug output name no private key.
        let private = keys.private_for(&next).unwrap().to_base64();
        assert!(!state.read(WIREGUARD_META_FILE).unwrap().contains(&private));
        assert!(!format!("{keys:?}").contains(&private));

        keys.promote(&state).unwrap();
        assert_eq!(keys.current_public(), next);
        assert_eq!(keys.next_public(), None);
        assert_eq!(keys.current_created_at(100), 5_000);
        assert!(!state.file(WIREGUARD_NEXT_KEY_FILE).exists());
        assert_eq!(state.read(WIREGUARD_KEY_FILE).unwrap(), private);
        assert_eq!(mode(&state, WIREGUARD_KEY_FILE), 0o600);
        let reloaded = WireguardKeys::load(&state).unwrap();
        assert_eq!(reloaded.current_public(), next);
        assert_eq!(reloaded.meta, keys.meta);
        std::fs::remove_dir_all(&state.path).unwrap();
    }

    #[test]
    fn a_promotion_cut_short_is_finished_on_load_and_a_refused_key_is_forgotten() {
        let state = key_dir("wgcrash");
        let mut keys = WireguardKeys::load(&state).unwrap();
        let next = keys.make_next(&state, 7_000).unwrap();
        // A crash right after the new key replaced wireguard.key: the next key file is still
        // there and the metadata still describes the rotation.
        let private = keys.private_for(&next).unwrap().to_base64();
        state.write(WIREGUARD_KEY_FILE, private.as_bytes()).unwrap();
        let reloaded = WireguardKeys::load(&state).unwrap();
        assert_eq!(reloaded.current_public(), next);
        assert_eq!(reloaded.next_public(), None);
        assert_eq!(reloaded.current_created_at(0), 7_000);
        assert!(!state.file(WIREGUARD_NEXT_KEY_FILE).exists());

        let mut keys = reloaded;
        keys.make_next(&state, 8_000).unwrap();
        keys.discard_next(&state).unwrap();
        assert!(!state.file(WIREGUARD_NEXT_KEY_FILE).exists());
        let reloaded = WireguardKeys::load(&state).unwrap();
        assert_eq!(reloaded.next_public(), None);
        assert_eq!(reloaded.meta.next_created_at, None);
        assert_eq!(reloaded.current_public(), next);
        std::fs::remove_dir_all(&state.path).unwrap();
    }
}
