//! The ansible role `ansible/roles/patronus_edge` against the real controller and a real lab:
//! `ansible-lint` finds nothing and the playbook parses; `ansible-playbook` with a local
//! connection inside site 2's router namespace (`ip netns exec pl-s2`) installs the agent from
//! the local build into a per-test root, renders its configuration and unit, and enrolls the
//! host with a token created through the API; the agent started as the unit's `ExecStart`
//! says brings the tunnels to site 1 up, and the API lists the site active with every path up.
//! A second run changes nothing, and so does a check-mode run. A forged token (the binary
//! taken from a URL with its checksum, served on the lab's management address) fails with the
//! controller's error and leaves its root as it was, and a missing token or controller URL
//! fails before anything is written. The token never shows in ansible's output.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use patronus_test_support::lab::{
    binary, enroll_site, in_ns, text, Agents, LabController, LAB_MGMT_HOST,
};
use patronus_test_support::TestEnv;
use uuid::Uuid;

/// Where `scripts/setup` installs ansible-core and ansible-lint.
const DEFAULT_ANSIBLE_BIN: &str = "/var/lib/patronus/ansible/bin";

/// `ansible-playbook` and `ansible-lint` of the virtual environment `scripts/setup` makes.
struct Ansible {
    bin: PathBuf,
    /// The repository's `ansible/` directory.
    dir: PathBuf,
    /// ANSIBLE_HOME, temporary directories and an empty ansible.cfg, inside the test's dir.
    home: PathBuf,
}

impl Ansible {
    fn find(home: PathBuf) -> anyhow::Result<Self> {
        let bin = PathBuf::from(
            std::env::var("PATRONUS_ANSIBLE_BIN").unwrap_or_else(|_| DEFAULT_ANSIBLE_BIN.into()),
        );
        for tool in ["ansible-playbook", "ansible-lint"] {
            ensure!(
                bin.join(tool).exists(),
                "{} is missing: run scripts/setup (it installs ansible-core and ansible-lint from PyPI into {DEFAULT_ANSIBLE_BIN}/..)",
                bin.join(tool).display()
            );
        }
        std::fs::create_dir_all(home.join("tmp"))?;
        // No /etc/ansible/ansible.cfg or ~/.ansible.cfg of this machine changes the runs.
        std::fs::write(home.join("ansible.cfg"), "")?;
        Ok(Self {
            bin,
            dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("ansible"),
            home,
        })
    }

    /// `tool args` in `ansible/`, inside network namespace `ns` when given.
    fn command(&self, ns: Option<&str>, tool: &str, args: &[&str]) -> Command {
        let mut command = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(self.bin.join(tool));
                c
            }
            None => Command::new(self.bin.join(tool)),
        };
        command
            .args(args)
            .current_dir(&self.dir)
            .env("ANSIBLE_CONFIG", self.home.join("ansible.cfg"))
            .env("ANSIBLE_HOME", &self.home)
            .env("ANSIBLE_LOCAL_TEMP", self.home.join("tmp"))
            .env("ANSIBLE_REMOTE_TEMP", self.home.join("tmp"))
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_FORCE_COLOR", "0")
            .env("ANSIBLE_STDOUT_CALLBACK", "default")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        command
    }

    /// `ansible-playbook site.yml` inside site 2's router namespace, at `-vvv`: module
    /// arguments and results are printed, so a task that handles the token without
    /// `no_log` would show it (the runs below check that it never does).
    fn playbook(&self, inventory: &Path, extra: &[&str]) -> anyhow::Result<Output> {
        let mut args = vec![
            "-vvv",
            "-i",
            inventory.to_str().context("path")?,
            "site.yml",
        ];
        args.extend_from_slice(extra);
        self.command(Some("pl-s2"), "ansible-playbook", &args)
            .output()
            .context("running ansible-playbook")
    }
}

/// The counters of `host`'s line in the play recap (`ok=.. changed=.. failed=..`).
fn recap(out: &Output, host: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    let all = text(out);
    let line = all
        .lines()
        .skip_while(|l| !l.starts_with("PLAY RECAP"))
        .find(|l| l.split_whitespace().next() == Some(host))
        .with_context(|| format!("no recap line for {host}: {all}"))?;
    Ok(line
        .split_whitespace()
        .filter_map(|f| f.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect())
}

/// Every file and directory under `root` with its mode, size and modification time, except
/// `skip` (the running agent's state directory, which it writes itself) and what it holds.
fn tree_but(root: &Path, skip: Option<&Path>) -> anyhow::Result<Vec<String>> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if Some(entry.path().as_path()) == skip {
                continue;
            }
            let meta = entry.metadata()?;
            seen.push(format!(
                "{} {:o} {} {}.{}",
                entry.path().display(),
                meta.mode(),
                meta.len(),
                meta.mtime(),
                meta.mtime_nsec()
            ));
            if meta.is_dir() {
                todo.push(entry.path());
            }
        }
    }
    seen.sort();
    Ok(seen)
}

fn tree(root: &Path) -> anyhow::Result<Vec<String>> {
    tree_but(root, None)
}

/// Serve `file` to every GET on the lab's management address (sites reach the host there),
/// counting the requests: the role's `patronus_edge_binary_url` path without leaving the lab.
fn serve_file(file: PathBuf) -> anyhow::Result<(String, Arc<AtomicUsize>)> {
    let listener = std::net::TcpListener::bind((LAB_MGMT_HOST, 0))
        .context("binding the lab's management address (is the lab up?)")?;
    let url = format!("http://{}/patronus-edge", listener.local_addr()?);
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let Ok(body) = std::fs::read(&file) else {
                let _ = stream.write_all(b"HTTP/1.1 500 Internal Server Error\r\n\r\n");
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream
                .write_all(head.as_bytes())
                .and_then(|()| stream.write_all(&body));
        }
    });
    Ok((url, served))
}

/// `GET path` of the controller's API with the tenant's API token.
fn api_get(base: &str, token: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    ureq::get(&format!("{base}{path}"))
        .set("Authorization", &format!("Bearer {token}"))
        .call()
        .with_context(|| format!("GET {path}"))?
        .into_json()
        .with_context(|| format!("GET {path}: not JSON"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ansible_role_installs_enrolls_and_runs_an_edge_idempotently() -> anyhow::Result<()> {
    patronus_test_support::lab::require_root()?;
    let lab = binary("patronus-lab")?;
    let edge = binary("patronus-edge")?;
    let dir = std::env::temp_dir().join(format!("patronus-ansible-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let ansible = Ansible::find(dir.join("ansible-home"))?;

    // The role and playbook are lint-clean (the production profile of ansible/.ansible-lint)
    // and parse.
    let started = Instant::now();
    let lint = ansible.command(None, "ansible-lint", &[]).output()?;
    ensure!(
        lint.status.success() && text(&lint).contains("Passed"),
        "ansible-lint: {}",
        text(&lint)
    );
    let syntax = ansible
        .command(
            None,
            "ansible-playbook",
            &["-i", "inventory.example.yml", "site.yml", "--syntax-check"],
        )
        .output()?;
    ensure!(syntax.status.success(), "syntax check: {}", text(&syntax));
    println!("ansible-lint and --syntax-check: {:?}", started.elapsed());

    let env = TestEnv::load()?;
    let lab_controller = LabController::start(&env).await?;
    let api_token = lab_controller.api_token().await?;
    let api = lab_controller.controller.url.clone();
    let site1_token = lab_controller.token("site1", "10.1.0.0/24").await?;
    let out = Command::new(&lab)
        .args(["up", "--sites", "2", "--uplinks", "2"])
        .args(lab_controller.relay_args())
        .output()?;
    ensure!(out.status.success(), "{}", text(&out));

    let result = async {
        let controller_url = lab_controller.url_in_lab();
        let mut agents = Agents(Vec::new());
        // Site 1, enrolled and run as the other lab tests do: the peer of the role's site.
        let state1 = dir.join("site1");
        enroll_site(&edge, &controller_url, &site1_token, 1, &state1)?;
        agents.0.push(
            Command::new("ip")
                .args(["netns", "exec", "pl-s1"])
                .arg(&edge)
                .args(["run", "--state-dir"])
                .arg(&state1)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("run1.log"))?)
                .spawn()?,
        );

        // Site 2's one-time token, created through the API as an operator would.
        let created: serde_json::Value = ureq::post(&format!("{api}/api/v1/enrollment-tokens"))
            .set("Authorization", &format!("Bearer {api_token}"))
            .send_json(serde_json::json!({"site": "site2", "lan_prefixes": ["10.2.0.0/24"]}))
            .context("POST /api/v1/enrollment-tokens")?
            .into_json()?;
        let token = created["secret"]
            .as_str()
            .context("no secret in the created token")?
            .to_owned();

        // The inventory: site 2's router is the host, files go under a per-test root, and
        // there is no systemd in a namespace (the test runs the unit's command itself).
        let root2 = dir.join("root-site2");
        std::fs::create_dir_all(&root2)?;
        let inventory = dir.join("inventory.yml");
        std::fs::write(
            &inventory,
            serde_json::to_string_pretty(&serde_json::json!({
                "patronus_edges": {"hosts": {"site2": {
                    "ansible_connection": "local",
                    "ansible_python_interpreter": "/usr/bin/python3",
                    // The test runs as root and this machine has no sudo.
                    "ansible_become": false,
                    "patronus_edge_root": root2,
                    "patronus_edge_service_manager": "none",
                    "patronus_edge_controller_url": controller_url,
                    "patronus_edge_binary_src": edge,
                    "patronus_edge_uplinks": [
                        {"name": "wan0", "address": "198.18.2.1", "type": "fiber", "bandwidth_mbps": 1000},
                        {"name": "wan1", "address": "198.18.2.5", "type": "lte", "bandwidth_mbps": 50,
                         "cost_per_gb": 2.5, "metered": true},
                    ],
                }}}
            }))?,
        )?;
        // The token in a 0600 vars file, as a vault would hand it over: not on a command line.
        let secret_vars = |name: &str, vars: serde_json::Value| -> anyhow::Result<String> {
            use std::os::unix::fs::OpenOptionsExt;
            let path = dir.join(name);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?
                .write_all(serde_json::to_string(&vars)?.as_bytes())?;
            Ok(format!("@{}", path.display()))
        };
        let token_vars = secret_vars(
            "token.json",
            serde_json::json!({"patronus_edge_enrollment_token": token}),
        )?;
        let no_token = |out: &Output, run: &str| -> anyhow::Result<()> {
            ensure!(
                !text(out).contains(&token),
                "{run}: the enrollment token shows in ansible's output"
            );
            Ok(())
        };

        // First run: installs, enrolls, renders.
        let started = Instant::now();
        let first = ansible.playbook(&inventory, &["-e", &token_vars])?;
        ensure!(first.status.success(), "first run: {}", text(&first));
        no_token(&first, "first run")?;
        let counts = recap(&first, "site2")?;
        ensure!(
            counts["failed"] == 0 && counts["changed"] > 0,
            "first run: {counts:?}"
        );
        println!(
            "first run (install + enroll): {:?}, {counts:?}",
            started.elapsed()
        );
        let state2 = root2.join("var/lib/patronus-edge");
        let identity: serde_json::Value =
            serde_json::from_slice(&std::fs::read(state2.join("identity.json"))?)?;
        ensure!(identity["site_name"] == "site2", "{identity}");
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&state2)?.permissions().mode() & 0o777;
            ensure!(mode == 0o700, "state directory mode {mode:o}");
        }
        let site2 = identity["site_id"].as_str().context("site id")?.to_owned();
        let config = std::fs::read_to_string(root2.join("etc/patronus-edge/edge.toml"))?;
        ensure!(
            config.contains(&format!("state_dir = \"{}\"", state2.display())),
            "{config}"
        );
        let unit = std::fs::read_to_string(root2.join("etc/systemd/system/patronus-edge.service"))?;
        for line in [
            "Restart=on-failure",
            "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_BPF CAP_PERFMON",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            &format!("ReadWritePaths={}", state2.display()),
        ] {
            ensure!(unit.lines().any(|l| l == line), "no {line:?} in the unit: {unit}");
        }
        ensure!(
            root2.join("etc/sysctl.d/60-patronus-edge.conf").exists(),
            "no forwarding setting"
        );
        // systemd accepts every directive and value of the unit (its complaints name the file).
        let unit_path = root2.join("etc/systemd/system/patronus-edge.service");
        let verify = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit_path)
            .output()
            .context("systemd-analyze (package systemd; scripts/setup installs it) cannot run")?;
        ensure!(
            verify.status.success() && !text(&verify).contains("patronus-edge.service"),
            "systemd-analyze verify: {}",
            text(&verify)
        );

        // Run the agent exactly as the unit would, in the site's namespace.
        let exec_start = unit
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .context("no ExecStart in the unit")?;
        let argv: Vec<&str> = exec_start.split_whitespace().collect();
        ensure!(
            argv.first() == Some(&root2.join("usr/local/bin/patronus-edge").to_str().context("path")?),
            "ExecStart does not run the installed agent: {exec_start}"
        );
        agents.0.push(
            Command::new("ip")
                .args(["netns", "exec", "pl-s2"])
                .args(&argv)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("run2.log"))?)
                .spawn()?,
        );

        // The API: site 2 active, and every path between the two sites (2 × 2 uplinks, each
        // direction) up, as the agents measure and report them.
        let started = Instant::now();
        let deadline = started + Duration::from_secs(60);
        loop {
            let site = api_get(&api, &api_token, &format!("/api/v1/sites/{site2}"))?;
            let paths = api_get(&api, &api_token, &format!("/api/v1/paths?site={site2}"))?;
            let items = paths["items"].as_array().cloned().unwrap_or_default();
            let up = items.iter().filter(|p| p["status"] == "up").count();
            let from_site2 = items
                .iter()
                .filter(|p| p["src_site_id"] == site2.as_str() && p["status"] == "up")
                .count();
            if site["status"] == "active" && from_site2 == 4 && up == items.len() {
                println!(
                    "agent started → API lists site2 active with {up} paths up: {:?}",
                    started.elapsed()
                );
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "site2 not active with its paths up after 60 s: site {site}\npaths {paths}\nagent log:\n{}",
                    std::fs::read_to_string(dir.join("run2.log")).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // Its tunnels, as the agent itself reports them.
        let out = in_ns(
            "pl-s2",
            &edge,
            &[
                "--config",
                root2.join("etc/patronus-edge/edge.toml").to_str().context("path")?,
                "status",
            ],
        )?;
        let status = text(&out);
        ensure!(
            out.status.success() && status.matches("up (handshake").count() == 4,
            "{status}"
        );

        // Second run and a check-mode run: nothing to change, no new enrollment (the agent
        // writes its state directory meanwhile; the role's files must stay as they are).
        let tree_before = tree_but(&root2, Some(&state2))?;
        for (run, extra) in [("second run", vec![]), ("check mode", vec!["--check"])] {
            let mut args = vec!["-e", token_vars.as_str()];
            args.extend(extra);
            let out = ansible.playbook(&inventory, &args)?;
            ensure!(out.status.success(), "{run}: {}", text(&out));
            no_token(&out, run)?;
            let counts = recap(&out, "site2")?;
            ensure!(
                counts["changed"] == 0 && counts["failed"] == 0,
                "{run} changed something: {counts:?}\n{}",
                text(&out)
            );
        }
        let tree_after = tree_but(&root2, Some(&state2))?;
        ensure!(
            tree_after == tree_before,
            "the second runs changed the root: {tree_before:#?} → {tree_after:#?}"
        );
        let identity_again: serde_json::Value =
            serde_json::from_slice(&std::fs::read(state2.join("identity.json"))?)?;
        ensure!(
            identity_again["enrolled_at"] == identity["enrolled_at"],
            "the host was enrolled again"
        );

        // A forged token (signed by another controller's key) on a fresh root, the binary
        // from a URL with its checksum: the controller's refusal, and nothing written.
        let (url, served) = serve_file(edge.clone())?;
        let sum = Command::new("sha256sum").arg(&edge).output()?;
        ensure!(sum.status.success(), "sha256sum: {}", text(&sum));
        let checksum = format!(
            "sha256:{}",
            String::from_utf8_lossy(&sum.stdout)
                .split_whitespace()
                .next()
                .context("sha256sum output")?
        );
        let now = chrono::Utc::now();
        let forged = patronus_controller::enrollment::TokenKeys::from_seed(&[0x42; 32])
            .mint(
                lab_controller.tenant.0,
                Uuid::new_v4(),
                "site3",
                Uuid::new_v4(),
                now,
                now + chrono::Duration::minutes(10),
            )
            .map_err(|e| anyhow::anyhow!("minting the forged token: {e:?}"))?;
        let fresh = dir.join("root-wrong");
        std::fs::create_dir_all(&fresh)?;
        let wrong_vars = secret_vars(
            "wrong.json",
            serde_json::json!({
                "patronus_edge_enrollment_token": forged,
                "patronus_edge_root": fresh,
                "patronus_edge_binary_src": "",
                "patronus_edge_binary_url": url,
                "patronus_edge_binary_checksum": checksum,
            }),
        )?;
        let staging_before = staging_dirs()?;
        let out = ansible.playbook(&inventory, &["-e", &wrong_vars])?;
        let all = text(&out);
        ensure!(!out.status.success(), "a forged token enrolled: {all}");
        ensure!(
            all.contains("the controller refused the enrollment (401 invalid_token): the token is not a valid enrollment token of this controller"),
            "the run does not say what the controller said: {all}"
        );
        ensure!(!all.contains(&forged), "the forged token shows in the output");
        ensure!(
            served.load(Ordering::SeqCst) >= 1,
            "the binary was not taken from its URL: {all}"
        );
        ensure!(
            tree(&fresh)?.is_empty(),
            "a refused enrollment left files: {:?}",
            tree(&fresh)?
        );
        ensure!(
            staging_dirs()? == staging_before,
            "the staging directory was left behind"
        );
        println!("forged token: refused by the controller, root untouched");

        // A missing token or controller URL: a clear message before anything is written.
        for (name, vars, says) in [
            (
                "missing token",
                serde_json::json!({"patronus_edge_enrollment_token": "", "patronus_edge_root": fresh}),
                "patronus_edge_enrollment_token is empty",
            ),
            (
                "missing URL",
                serde_json::json!({"patronus_edge_controller_url": "", "patronus_edge_root": fresh}),
                "patronus_edge_controller_url must be the controller's URL",
            ),
        ] {
            let vars = secret_vars(&format!("{}.json", name.replace(' ', "-")), vars)?;
            let out = ansible.playbook(&inventory, &["-e", &vars])?;
            let all = text(&out);
            ensure!(!out.status.success() && all.contains(says), "{name}: {all}");
            ensure!(tree(&fresh)?.is_empty(), "{name}: files were written");
        }

        // Site 2's agent still runs and its tunnels are still up.
        ensure!(
            agents.0.iter_mut().all(|a| a.try_wait().ok().flatten().is_none()),
            "an agent exited; site2's log:\n{}",
            std::fs::read_to_string(dir.join("run2.log")).unwrap_or_default()
        );
        drop(agents);
        Ok(())
    }
    .await;
    let down = Command::new(&lab).arg("down").output()?;
    let _ = std::fs::remove_dir_all(&dir);
    let stopped = lab_controller.stop().await;
    result?;
    ensure!(down.status.success(), "{}", text(&down));
    stopped
}

/// The role's staging directories in the temporary directory (`patronus-edge-enroll.*`).
fn staging_dirs() -> anyhow::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(std::env::temp_dir())?
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("patronus-edge-enroll.")
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    Ok(found)
}
