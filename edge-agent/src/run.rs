//! `patronus-edge run`: keep this site's tunnels equal to its intent.
//!
//! At start the last applied intent is read from the state directory and applied, so a
//! restarted agent restores its tunnels with no controller and no NATS. Then it follows its
//! intent key (a subscription plus a direct get of the current value) and, for every new
//! revision: decode and check it (tenant, site, revision above the applied one), diff the
//! desired state against what the namespace holds, execute the difference; if execution fails
//! half-way, put back the previous intent's state. Applied intents are stored atomically and
//! reported with `IntentApplied`, refusals with `IntentRejected`; a `Heartbeat` periodically
//! (liveness from WireGuard handshakes until the probes exist). Periodically the
//! desired state of the applied intent is compared with the namespace again, which repairs
//! what someone changed by hand. New peers without a handshake are kicked by one end of the
//! path ([`crate::handshake`]) so a first handshake lost to a race costs ~300 ms, not 5 s.
//! NATS reconnects by itself with backoff. Every minute the agent checks whether its
//! certificate and NATS credentials are past two thirds of their lifetime; then it renews
//! them (a signed call, off the loop) and reconnects with the new credentials (the old ones
//! stay valid until they expire, so a failed renewal is retried the next minute).
//!
//! WireGuard key rotation, checked every minute like renewal ([`crate::control::rotation_step`]):
//! once the current key is `wireguard.rotate_after_days` old the agent makes the next key pair
//! (`wireguard.next.key`, the current key stays in use), sends its public key with a signed
//! call until the controller accepts it, and waits: the controller announces it to the peers,
//! then commits it by naming it in this site's intent. Applying that intent runs every
//! interface with the next key (its peers get a datagram and a handshake kick at once), and
//! the next key replaces `wireguard.key`. An intent naming a key the agent does not hold is
//! applied with its current key, and said.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use futures_util::StreamExt;
use patronus_proto::events::{EventEnvelope, SdwanEvent};
use patronus_proto::{codec, SiteIntent, SCHEMA_VERSION};

use crate::config::EdgeConfig;
use crate::desired::{self, Action, NetState};
use crate::handshake;
use crate::state::{Identity, StateDir, WireguardKeys};
use crate::tunnels;

/// The last applied intent, in the state directory.
pub const INTENT_FILE: &str = "intent.json";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Agent {
    identity: Identity,
    state: StateDir,
    /// The WireGuard keys: current, and next during a rotation.
    keys: WireguardKeys,
    backend: tunnels::WgBackend,
    /// Route netlink: links, addresses, routes and rules of this namespace.
    netlink: crate::netlink::Netlink,
    applied: Option<SiteIntent>,
    /// New peers waiting for their first handshake (see [`crate::handshake`]).
    kicker: handshake::Kicker,
    dataplane: DataplaneSlot,
    dataplane_config: crate::config::DataplaneConfig,
    /// When an intent was last applied (the data plane loads once this is quiet).
    last_apply: Instant,
    /// The steering state the probing thread shares (it fails over without this loop).
    steerer: crate::steerer::SharedSteerer,
    /// The data plane's flow table, for flow reports (read without the steerer's lock).
    flow_table: Option<crate::dataplane::FlowTable>,
    /// What the probes say about each path (empty until measured); a copy for reports.
    path_views: std::collections::BTreeMap<patronus_proto::PathId, crate::steering::PathView>,
    /// The probing thread (none where it could not start: no failover, said once).
    prober: Option<crate::probing::Prober>,
    /// Sequence of the metrics batches this process sent.
    metrics_seq: u64,
    /// Peers allowed to run path tests against this site's sink; whether it listens yet.
    test_peers: crate::commands::Peers,
    sink_listening: bool,
}

/// How long applying must have been quiet before the data plane is loaded.
const DATAPLANE_QUIET: Duration = Duration::from_secs(2);

/// The eBPF data plane, once it could be attached.
enum DataplaneSlot {
    /// Not loaded yet: loading waits until applying has been quiet for a moment, since on a
    /// busy host (a lab of many sites on two cores) it competes with the tunnels for CPU.
    NotStarted,
    /// Being loaded on a thread of its own (the verifier and the 1 M-entry flow table take a
    /// few hundred ms, which must not hold up tunnels, handshake kicks or intents).
    Loading(
        std::thread::JoinHandle<
            Result<crate::dataplane::Dataplane, crate::dataplane::DataplaneError>,
        >,
    ),
    /// Loaded; waiting for a LAN interface to attach to (tried after each apply and tick).
    Loaded(Box<crate::dataplane::Dataplane>),
    /// Routes only (the reason was logged once).
    Off,
    /// Attached; the data plane itself lives in the steerer.
    On,
}

impl DataplaneSlot {
    fn start(config: &crate::config::DataplaneConfig) -> Self {
        if config.mode == crate::config::DataplaneChoice::Off {
            eprintln!(
                "dataplane: off by configuration; routes-only (default path per destination)"
            );
            return Self::Off;
        }
        Self::Loading(std::thread::spawn(|| {
            // Below the agent's own work: tunnels and intents come first on a busy host.
            // SAFETY: setpriority on this thread's own id; no memory is passed.
            unsafe {
                let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                libc::setpriority(libc::PRIO_PROCESS, tid, 10);
            }
            crate::dataplane::Dataplane::load()
        }))
    }
}

impl Agent {
    fn want(&self) -> NetState {
        match (
            &self.applied,
            tunnels::uplink_routes(&self.netlink, &self.identity),
        ) {
            (Some(intent), Ok(uplinks)) => self.want_for(intent, &uplinks),
            (Some(_), Err(e)) => {
                eprintln!("run: cannot read the uplinks' routes: {e:#}");
                NetState::default()
            }
            (None, _) => NetState::default(),
        }
    }

    /// The desired state of `intent`, with interfaces on the key it names if this site holds
    /// that key (its current one, or its next one once a rotation commits), else on its
    /// current key.
    fn want_for(&self, intent: &SiteIntent, uplinks: &[desired::UplinkRoute]) -> NetState {
        let mut want = desired::desired(intent, uplinks);
        if self
            .keys
            .private_for(&intent.wireguard.public_key)
            .is_none()
        {
            desired::use_local_key(&mut want, self.keys.current_public());
        }
        want
    }

    /// Make the namespace match `want`; returns how many actions it took.
    fn converge(&mut self, want: &NetState) -> anyhow::Result<usize> {
        let have = tunnels::observe(&self.netlink, self.identity.site_id)?;
        let actions = desired::diff(want, &have);
        tunnels::execute(&self.netlink, &actions, &self.keys, self.backend)?;
        // New peers, and every peer of an interface that changed its key (its sessions are
        // gone), get a datagram and the handshake tie-break now. A rotating peer's next key
        // (no allowed IPs) carries nothing and is left alone.
        let rekeyed: std::collections::BTreeSet<&String> = actions
            .iter()
            .filter_map(|a| match a {
                Action::SetPrivateKey { name, .. } => Some(name),
                _ => None,
            })
            .collect();
        let mut fresh: std::collections::BTreeMap<(String, patronus_proto::WgPublicKey), Action> =
            std::collections::BTreeMap::new();
        for action in &actions {
            if let Action::SetPeer {
                interface,
                key,
                peer,
                ..
            } = action
            {
                if !peer.allowed_ips.is_empty() {
                    fresh.insert((interface.clone(), *key), action.clone());
                }
            }
        }
        for name in rekeyed {
            for (key, peer) in want.interfaces.get(name).into_iter().flat_map(|i| &i.peers) {
                if !peer.allowed_ips.is_empty() {
                    fresh
                        .entry((name.clone(), *key))
                        .or_insert_with(|| Action::SetPeer {
                            interface: name.clone(),
                            key: *key,
                            peer: peer.clone(),
                        });
                }
            }
        }
        let fresh: Vec<Action> = fresh.into_values().collect();
        tunnels::poke_new_peers(&fresh);
        if let Some(own) = want.interfaces.values().find_map(|i| i.public_key) {
            self.kicker.set_local_key(own.0);
        }
        self.kicker.configured(
            Instant::now(),
            fresh.iter().filter_map(|a| match a {
                Action::SetPeer { interface, key, .. } => Some(handshake::PeerSlot {
                    interface: interface.clone(),
                    peer_key: key.0,
                }),
                _ => None,
            }),
        );
        Ok(actions.len())
    }

    /// After an intent is applied: if it names this site's next key, the interfaces run with
    /// it now, so it becomes the current key (`wireguard.key`) and the old one is dropped.
    fn finish_rotation(&mut self, intent: &SiteIntent) {
        if self.keys.next_public() != Some(intent.wireguard.public_key) {
            return;
        }
        match self.keys.promote(&self.state) {
            Ok(()) => eprintln!(
                "run: WireGuard key rotated: the interfaces now run with {} (revision {})",
                intent.wireguard.public_key, intent.revision
            ),
            // Retried after the next apply; both keys are still held.
            Err(e) => eprintln!(
                "run: the interfaces use the new WireGuard key, but storing it failed: {e:#}"
            ),
        }
    }

    /// Load and attach the eBPF data plane once it can be (or say in one line why it runs
    /// routes-only) and hand it to the steerer, which writes the policies and the plan.
    fn steer(&mut self) {
        let Some(intent) = &self.applied else {
            return;
        };
        if matches!(&self.dataplane, DataplaneSlot::Loading(h) if h.is_finished()) {
            let slot = std::mem::replace(&mut self.dataplane, DataplaneSlot::Off);
            if let DataplaneSlot::Loading(handle) = slot {
                match handle.join() {
                    Ok(Ok(dp)) => self.dataplane = DataplaneSlot::Loaded(Box::new(dp)),
                    Ok(Err(e)) => eprintln!("dataplane: {e}"),
                    Err(_) => eprintln!("dataplane: loading panicked; routes-only"),
                }
            }
        }
        if let DataplaneSlot::Loaded(_) = &self.dataplane {
            let interfaces = match &self.dataplane_config.lan_interface {
                Some(name) => vec![name.clone()],
                None => {
                    tunnels::interfaces_with_address_in(&self.netlink, &intent.overlay.lan_prefixes)
                        .unwrap_or_default()
                }
            };
            if interfaces.is_empty() {
                return; // No LAN interface yet; routes-only until one appears.
            }
            let slot = std::mem::replace(&mut self.dataplane, DataplaneSlot::Off);
            let DataplaneSlot::Loaded(mut dp) = slot else {
                return;
            };
            for interface in &interfaces {
                match dp.attach(interface) {
                    Ok(mode) => eprintln!(
                        "dataplane: eBPF steering on {interface} (XDP {}, TC ingress)",
                        match mode {
                            crate::dataplane::XdpMode::Driver => "in the driver",
                            crate::dataplane::XdpMode::Generic =>
                                "in generic mode: the driver has no native XDP",
                        }
                    ),
                    Err(e) => {
                        // Dropping `dp` detaches whatever was attached.
                        eprintln!("dataplane: {e}");
                        return;
                    }
                }
            }
            self.flow_table = self.steerer.lock().attach(dp);
            self.dataplane = DataplaneSlot::On;
        }
    }

    /// The top flows of the data plane's table, ready to publish; `None` without one.
    fn flow_report(&self) -> Option<patronus_proto::flows::FlowReport> {
        let (Some(table), Some(intent)) = (&self.flow_table, &self.applied) else {
            return None;
        };
        let compiled = self.steerer.lock().compiled().cloned()?;
        let entries = match table.entries() {
            Ok(entries) => entries,
            Err(e) => {
                eprintln!("dataplane: reading the flow table failed: {e}");
                return None;
            }
        };
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec into `now`.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        let mono_ns = (now.tv_sec as u64) * 1_000_000_000 + now.tv_nsec as u64;
        let flows = crate::flow_report::records(
            &entries,
            intent,
            &compiled,
            mono_ns,
            now_ms(),
            crate::flow_report::TOP_FLOWS,
        );
        Some(patronus_proto::flows::FlowReport {
            schema_version: SCHEMA_VERSION,
            tenant: self.identity.tenant_id,
            site: self.identity.site_id,
            sent_at_unix_ms: now_ms(),
            flows,
        })
    }

    fn dataplane_mode(&self) -> patronus_proto::events::DataplaneMode {
        match self.dataplane {
            DataplaneSlot::On => patronus_proto::events::DataplaneMode::Ebpf,
            _ => patronus_proto::events::DataplaneMode::RoutesOnly,
        }
    }

    /// Start the path-test sink once the overlay address exists (retried every tick).
    fn listen_for_path_tests(&mut self) {
        let Some(intent) = &self.applied else {
            return;
        };
        if self.sink_listening {
            return;
        }
        let address =
            std::net::SocketAddr::new(intent.overlay.address, crate::commands::PATH_TEST_PORT);
        match crate::commands::start_sink(address, self.test_peers.clone()) {
            Ok(_) => self.sink_listening = true,
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {}
            Err(e) => {
                eprintln!("run: the path-test sink cannot listen ({e}); path tests against this site fail");
                self.sink_listening = true;
            }
        }
    }

    /// Answer one request of the controller (path tests run off the loop).
    fn on_command(&self, client: &async_nats::Client, message: async_nats::Message) {
        let Some(reply_to) = message.reply.clone() else {
            eprintln!("run: a command without a reply subject was ignored");
            return;
        };
        let request: patronus_proto::command::CommandRequest = match codec::decode(&message.payload)
        {
            Ok(request) => request,
            Err(e) => {
                eprintln!("run: refused an undecodable command: {e}");
                let answer = crate::commands::reply(
                    "",
                    patronus_proto::command::CommandResult::Failed {
                        error: format!("the command does not decode: {}", e.reason()),
                    },
                );
                let client = client.clone();
                tokio::spawn(async move {
                    let _ = client
                        .publish(reply_to, codec::encode(&answer).into())
                        .await;
                });
                return;
            }
        };
        let monitor = self
            .applied
            .as_ref()
            .zip(self.prober.as_ref())
            .map(|(intent, prober)| {
                crate::probing::report(intent, &self.path_views, &prober.drops, now_ms())
            });
        let client = client.clone();
        let result = crate::commands::immediate(
            &request,
            self.applied.as_ref(),
            &self.path_views,
            monitor.as_ref(),
        );
        if let Some(result) = result {
            let answer = crate::commands::reply(&request.request_id, result);
            tokio::spawn(async move {
                let _ = client
                    .publish(reply_to, codec::encode(&answer).into())
                    .await;
            });
            return;
        }
        let patronus_proto::command::Command::PathTest { path, duration_s } = request.command
        else {
            return;
        };
        let target = self
            .applied
            .as_ref()
            .and_then(|intent| crate::commands::path_target(intent, path));
        let view = self.path_views.get(&path).cloned();
        let request_id = request.request_id.clone();
        eprintln!("run: path test of {path} for {duration_s} s (request {request_id})");
        tokio::spawn(async move {
            let result = match target {
                None => patronus_proto::command::CommandResult::Failed {
                    error: "this site has no such path in its applied intent".into(),
                },
                Some(target) => {
                    let measured = tokio::task::spawn_blocking(move || {
                        crate::commands::path_test(&target, duration_s)
                    })
                    .await
                    .unwrap_or_else(|e| Err(format!("the test stopped: {e}")));
                    match measured {
                        Ok(mbps) => patronus_proto::command::CommandResult::PathTest {
                            path,
                            metrics: crate::commands::test_metrics(view.as_ref(), mbps, now_ms()),
                        },
                        Err(error) => patronus_proto::command::CommandResult::Failed { error },
                    }
                }
            };
            let answer = crate::commands::reply(&request_id, result);
            let _ = client
                .publish(reply_to, codec::encode(&answer).into())
                .await;
        });
    }

    /// Keep `monitor.json` (what `status` shows of the paths) up to date.
    fn write_monitor_report(&self) {
        let (Some(intent), Some(prober)) = (&self.applied, &self.prober) else {
            return;
        };
        let report = crate::probing::report(intent, &self.path_views, &prober.drops, now_ms());
        match serde_json::to_vec_pretty(&report) {
            Ok(text) => {
                if let Err(e) = self.state.write(crate::probing::MONITOR_FILE, &text) {
                    eprintln!("run: writing the monitor report failed: {e:#}");
                }
            }
            Err(e) => eprintln!("run: encoding the monitor report failed: {e}"),
        }
    }

    /// Kick the new peers that are due (see [`crate::handshake`]).
    fn kick_due_peers(&mut self) {
        let slots = self.kicker.pending_slots();
        let done = tunnels::handshaken(&slots);
        for slot in self.kicker.poll(Instant::now(), |s| done.contains(s)) {
            if let Err(e) = tunnels::kick(&slot) {
                eprintln!(
                    "run: restarting the handshake on {} failed: {e:#}",
                    slot.interface
                );
            }
        }
    }

    /// Apply a new intent, or keep the old one and say why not.
    fn apply(&mut self, intent: SiteIntent) -> Result<usize, String> {
        let applied_revision = self.applied.as_ref().map(|i| i.revision);
        intent
            .check_acceptable(
                self.identity.tenant_id,
                self.identity.site_id,
                applied_revision,
            )
            .map_err(|e| e.to_string())?;
        let uplinks = tunnels::uplink_routes(&self.netlink, &self.identity)
            .map_err(|e| format!("cannot read the uplinks' routes: {e:#}"))?;
        if self
            .keys
            .private_for(&intent.wireguard.public_key)
            .is_none()
        {
            eprintln!(
                "run: intent revision {} names WireGuard key {}, which this site does not hold; keeping {} (peers cannot reach this site until the controller has its key: enroll again if this lasts)",
                intent.revision,
                intent.wireguard.public_key,
                self.keys.current_public()
            );
        }
        let want = self.want_for(&intent, &uplinks);
        match self.converge(&want) {
            Ok(changes) => {
                let text = serde_json::to_vec_pretty(&intent).map_err(|e| e.to_string())?;
                self.state
                    .write(INTENT_FILE, &text)
                    .map_err(|e| format!("applied, but not stored: {e:#}"))?;
                if let Some(prober) = &self.prober {
                    let compiled = crate::classifier::compile(&intent.policies.routing).ok();
                    prober.set_plan(crate::probing::plan(&intent, compiled.as_ref(), &uplinks));
                }
                self.steerer.lock().set_intent(intent.clone());
                if let Ok(mut peers) = self.test_peers.write() {
                    *peers = intent.peers.iter().map(|p| p.overlay_address).collect();
                }
                self.finish_rotation(&intent);
                self.applied = Some(intent);
                self.last_apply = Instant::now();
                self.steer();
                Ok(changes)
            }
            Err(e) => {
                // Put back what the previous intent had.
                let previous = self.want();
                if let Err(back) = self.converge(&previous) {
                    eprintln!("run: could not restore the previous state either: {back:#}");
                }
                Err(format!("applying failed and was undone: {e:#}"))
            }
        }
    }
}

async fn report(client: &async_nats::Client, identity: &Identity, event: SdwanEvent) {
    let envelope = EventEnvelope {
        schema_version: SCHEMA_VERSION,
        tenant: identity.tenant_id,
        site: Some(identity.site_id),
        at_unix_ms: now_ms(),
        event,
    };
    let subject = patronus_proto::subjects::events_subject(identity.tenant_id, identity.site_id);
    if client
        .publish(subject, codec::encode(&envelope).into())
        .await
        .is_err()
    {
        eprintln!("run: could not report an event (NATS down); it is dropped");
    }
}

/// Handle one value of the intent key; `None` payload means the controller withdrew it.
async fn on_intent(agent: &mut Agent, client: &async_nats::Client, payload: &[u8]) {
    if payload.is_empty() {
        return;
    }
    let intent: SiteIntent = match codec::decode(payload) {
        Ok(intent) => intent,
        Err(e) => {
            eprintln!("run: refused an undecodable intent: {e}");
            report(
                client,
                &agent.identity,
                SdwanEvent::IntentRejected {
                    revision: 0,
                    reason: format!("does not decode: {}", e.reason()),
                },
            )
            .await;
            return;
        }
    };
    let revision = intent.revision;
    if agent
        .applied
        .as_ref()
        .is_some_and(|a| a.revision == revision)
    {
        return;
    }
    let started = Instant::now();
    match agent.apply(intent) {
        Ok(changes) => {
            eprintln!(
                "run: applied intent revision {revision} ({changes} changes in {} ms)",
                started.elapsed().as_millis()
            );
            report(
                client,
                &agent.identity,
                SdwanEvent::IntentApplied { revision },
            )
            .await;
        }
        Err(reason) => {
            eprintln!("run: refused intent revision {revision}: {reason}");
            report(
                client,
                &agent.identity,
                SdwanEvent::IntentRejected { revision, reason },
            )
            .await;
        }
    }
}

/// The agent's NATS connection and its subscriptions.
struct Link {
    client: async_nats::Client,
    updates: async_nats::Subscriber,
    commands: async_nats::Subscriber,
    /// A message per (re)connection: the current intent must be read again then, since
    /// updates published while the connection was down never reach the subscription.
    connected: tokio::sync::mpsc::UnboundedReceiver<()>,
}

/// Connect with the credentials in the state directory and subscribe to the intent and the
/// controller's commands.
async fn connect(state: &StateDir, identity: &Identity) -> anyhow::Result<Link> {
    let creds = state.read(crate::state::NATS_CREDS_FILE)?;
    let (connected_tx, connected) = tokio::sync::mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_credentials(&creds)
        .context("nats.creds is damaged; enroll again")?
        .event_callback(move |event| {
            let connected_tx = connected_tx.clone();
            async move {
                if matches!(event, async_nats::Event::Connected) {
                    let _ = connected_tx.send(());
                }
            }
        })
        .custom_inbox_prefix(identity.inbox_prefix.clone())
        .name(format!("patronus-edge {}", identity.site_name))
        .request_timeout(Some(Duration::from_secs(5)))
        .retry_on_initial_connect()
        .connect(identity.nats_url.as_str())
        .await
        .context("NATS")?;
    let updates = client
        .subscribe(identity.intent.kv_subject.clone())
        .await
        .context("subscribing to the intent")?;
    let commands = client
        .subscribe(patronus_proto::subjects::cmd_subject(
            identity.tenant_id,
            identity.site_id,
        ))
        .await
        .context("subscribing to the controller's commands")?;
    Ok(Link {
        client,
        updates,
        commands,
        connected,
    })
}

pub fn run(state: StateDir, config: &EdgeConfig) -> anyhow::Result<()> {
    let identity = state.identity()?;
    let keys = WireguardKeys::load(&state)?;
    let key_public = keys.current_public().0;
    let rotate_after_s = config.rotate_after().map(|d| d.as_secs() as i64);
    let netlink = crate::netlink::Netlink::open()
        .context("opening route netlink (the agent needs CAP_NET_ADMIN in its namespace)")?;
    let backend = tunnels::resolve_backend(&netlink, config.wireguard.backend)?;
    eprintln!("run: WireGuard backend {backend:?}");
    let (probe_updates_tx, mut probe_updates) = tokio::sync::mpsc::unbounded_channel();
    let steerer = crate::steerer::SharedSteerer::default();
    let mut agent = Agent {
        identity: identity.clone(),
        state,
        keys,
        backend,
        netlink,
        applied: None,
        kicker: handshake::Kicker::new(key_public),
        dataplane: DataplaneSlot::NotStarted,
        dataplane_config: config.dataplane.clone(),
        last_apply: Instant::now(),
        steerer: steerer.clone(),
        flow_table: None,
        path_views: std::collections::BTreeMap::new(),
        prober: match crate::probing::start(probe_updates_tx, steerer) {
            Ok(prober) => Some(prober),
            Err(e) => {
                eprintln!(
                    "probe: cannot start the probing thread ({e}); no path monitoring or failover"
                );
                None
            }
        },
        metrics_seq: 0,
        test_peers: crate::commands::Peers::default(),
        sink_listening: false,
    };
    let (reconcile_every, heartbeat_every) =
        (config.reconcile_interval(), config.heartbeat_interval());
    // Restore from disk first: no controller needed.
    if let Ok(text) = agent.state.read(INTENT_FILE) {
        match codec::decode::<SiteIntent>(text.as_bytes()) {
            Ok(intent) => match agent.apply(intent) {
                Ok(changes) => eprintln!(
                    "run: restored intent revision {} from disk ({changes} changes)",
                    agent.applied.as_ref().map_or(0, |i| i.revision)
                ),
                Err(e) => eprintln!("run: the stored intent was not applied: {e}"),
            },
            Err(e) => {
                eprintln!("run: the stored intent is damaged ({e}); waiting for the controller")
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let mut identity = identity;
        let Link {
            mut client,
            mut updates,
            mut commands,
            mut connected,
        } = connect(&agent.state, &identity).await?;
        let mut renewal: Option<tokio::task::JoinHandle<anyhow::Result<Identity>>> = None;
        let mut renewal_check = tokio::time::interval(Duration::from_secs(60));
        type Announcing = tokio::task::JoinHandle<
            anyhow::Result<patronus_proto::enroll::WireguardKeyResponse>,
        >;
        let mut rotation: Option<Announcing> = None;
        let mut rotation_check = tokio::time::interval(Duration::from_secs(60));
        eprintln!(
            "run: site {} following its intent on {}",
            identity.site_name, identity.nats_url
        );
        let mut reconcile = tokio::time::interval(reconcile_every);
        let started = std::time::Instant::now();
        let mut heartbeat = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(2),
            heartbeat_every,
        );
        let mut needs_fetch = true;
        loop {
            if needs_fetch && client.connection_state() == async_nats::connection::State::Connected
            {
                match crate::nats::fetch_intent_bytes(&client, &identity).await {
                    Ok(Some(current)) => {
                        on_intent(&mut agent, &client, &current).await;
                        needs_fetch = false;
                    }
                    Ok(None) => needs_fetch = false,
                    // Retried at the next wake-up (reconcile tick at the latest).
                    Err(e) => eprintln!("run: reading the current intent failed: {e:#}"),
                }
            }
            let failovers = agent.steerer.lock().take_events();
            for event in failovers {
                report(&client, &identity, event).await;
            }
            let kick_at = agent.kicker.next_deadline();
            tokio::select! {
                Some(()) = connected.recv() => needs_fetch = true,
                _ = tokio::time::sleep_until(
                    kick_at.map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std)
                ), if kick_at.is_some() => agent.kick_due_peers(),
                message = updates.next() => match message {
                    Some(message) => on_intent(&mut agent, &client, &message.payload).await,
                    None => anyhow::bail!("the intent subscription ended"),
                },
                Some(message) = commands.next() => agent.on_command(&client, message),
                _ = renewal_check.tick(), if renewal.is_none() => {
                    let issued = identity.renewed_at.unwrap_or(identity.enrolled_at);
                    let now = (now_ms() / 1000) as i64;
                    if crate::control::renewal_due(now, issued, identity.expires_at) {
                        eprintln!("run: the certificate is past two thirds of its lifetime; renewing");
                        let state = StateDir::new(agent.state.path.clone());
                        renewal = Some(tokio::task::spawn_blocking(move || {
                            crate::control::renew(&state)
                        }));
                    }
                }
                done = async { renewal.as_mut().expect("guarded by is_some").await },
                    if renewal.is_some() =>
                {
                    renewal = None;
                    match done.map_err(|e| anyhow::anyhow!("the renewal stopped: {e}")).and_then(|r| r) {
                        Ok(renewed) => {
                            // The old credentials stay valid until they expire; move to the
                            // new ones now.
                            match connect(&agent.state, &renewed).await {
                                Ok(link) => {
                                    client = link.client;
                                    updates = link.updates;
                                    commands = link.commands;
                                    connected = link.connected;
                                    identity = renewed;
                                    agent.identity = identity.clone();
                                    needs_fetch = true;
                                    eprintln!("run: reconnected to NATS with the renewed credentials");
                                }
                                Err(e) => eprintln!(
                                    "run: renewed, but connecting with the new credentials failed ({e:#}); keeping the old connection"
                                ),
                            }
                        }
                        // Retried at the next check (every minute) while it stays due.
                        Err(e) => eprintln!("run: renewing the certificate failed: {e:#}; retrying in a minute"),
                    }
                }
                _ = rotation_check.tick(), if rotation.is_none() => {
                    let now = (now_ms() / 1000) as i64;
                    let made_at = agent.keys.current_created_at(identity.enrolled_at);
                    let step = crate::control::rotation_step(
                        now,
                        made_at,
                        rotate_after_s,
                        agent.keys.next_public().is_some(),
                        agent.keys.meta.next_accepted_at,
                    );
                    let announce = match step {
                        crate::control::RotationStep::Wait => None,
                        crate::control::RotationStep::MakeKey => match agent.keys.make_next(&agent.state, now) {
                            Ok(public) => {
                                eprintln!(
                                    "run: the WireGuard key is {} days old; made the next key pair (public key {public}), announcing it",
                                    (now - made_at) / 86_400
                                );
                                Some(public)
                            }
                            Err(e) => {
                                eprintln!("run: making the next WireGuard key failed: {e:#}; retrying in a minute");
                                None
                            }
                        },
                        crate::control::RotationStep::Announce => agent.keys.next_public(),
                    };
                    if let Some(public) = announce {
                        let state = StateDir::new(agent.state.path.clone());
                        let identity = identity.clone();
                        rotation = Some(tokio::task::spawn_blocking(move || {
                            crate::control::announce_wireguard_key(&state, &identity, public)
                        }));
                    }
                }
                done = async { rotation.as_mut().expect("guarded by is_some").await },
                    if rotation.is_some() =>
                {
                    rotation = None;
                    let now = (now_ms() / 1000) as i64;
                    match done.map_err(|e| anyhow::anyhow!("the call stopped: {e}")).and_then(|r| r) {
                        Ok(answer) if Some(answer.public_key) == agent.keys.next_public() => {
                            if agent.keys.meta.next_accepted_at.is_none() {
                                eprintln!(
                                    "run: the controller accepted the next WireGuard key ({:?}); it takes over when this site's intent names it",
                                    answer.state
                                );
                            }
                            if let Err(e) = agent.keys.accepted(&agent.state, now) {
                                eprintln!("run: recording the accepted WireGuard key failed: {e:#}");
                            }
                        }
                        // The key was rotated in meanwhile: nothing left to do.
                        Ok(_) => {}
                        Err(e) => match e.downcast_ref::<crate::control::Refused>() {
                            Some(refused) if refused.code == "wireguard_key_in_use" || refused.code == "invalid_key" => {
                                eprintln!("run: {refused}; discarding the next WireGuard key, a new one is made in a minute");
                                if let Err(e) = agent.keys.discard_next(&agent.state) {
                                    eprintln!("run: discarding the next WireGuard key failed: {e:#}");
                                }
                            }
                            _ => eprintln!("run: announcing the next WireGuard key failed: {e:#}; retrying in a minute"),
                        },
                    }
                }
                _ = reconcile.tick() => {
                    agent.listen_for_path_tests();
                    if matches!(agent.dataplane, DataplaneSlot::NotStarted)
                        && agent.last_apply.elapsed() >= DATAPLANE_QUIET
                    {
                        agent.dataplane = DataplaneSlot::start(&agent.dataplane_config);
                    }
                    if !matches!(agent.dataplane, DataplaneSlot::On | DataplaneSlot::Off) {
                        agent.steer();
                    }
                    match agent.converge(&agent.want()) {
                        Ok(0) => {}
                        Ok(n) => eprintln!("run: reconcile repaired {n} differences"),
                        Err(e) => eprintln!("run: reconcile failed: {e:#}"),
                    }
                }
                _ = heartbeat.tick() => {
                    let (tunnels_up, mut paths_up, paths_total) = tunnels::liveness(&agent.netlink, identity.site_id);
                    if !agent.path_views.is_empty() {
                        // Probe state once the probes run; handshakes before.
                        paths_up = agent
                            .path_views
                            .values()
                            .filter(|v| v.status == patronus_proto::metrics::PathStatus::Up)
                            .count() as u32;
                    }
                    report(&client, &identity, SdwanEvent::Heartbeat {
                        applied_revision: agent.applied.as_ref().map_or(0, |i| i.revision),
                        uptime_s: started.elapsed().as_secs(),
                        tunnels_up,
                        paths_up,
                        paths_total,
                        dataplane: agent.dataplane_mode(),
                    }).await;
                    if let Some(flows) = agent.flow_report().filter(|r| !r.flows.is_empty()) {
                        let subject = patronus_proto::subjects::flows_subject(
                            identity.tenant_id,
                            identity.site_id,
                        );
                        if client.publish(subject, codec::encode(&flows).into()).await.is_err() {
                            eprintln!("run: could not report flows (NATS down); dropped");
                        }
                    }
                }
                Some(update) = probe_updates.recv() => match update {
                    // The probing thread already steered with these; keep a copy for reports.
                    crate::probing::Update::Views(views) => {
                        agent.path_views = views;
                        agent.write_monitor_report();
                    }
                    crate::probing::Update::Event(event) => report(&client, &identity, event).await,
                    crate::probing::Update::Samples(samples) => {
                        agent.metrics_seq += 1;
                        let batch = patronus_proto::metrics::PathMetricsBatch {
                            schema_version: SCHEMA_VERSION,
                            tenant: identity.tenant_id,
                            site: identity.site_id,
                            seq: agent.metrics_seq,
                            sent_at_unix_ms: now_ms(),
                            samples,
                        };
                        let subject = patronus_proto::subjects::metrics_subject(
                            identity.tenant_id,
                            identity.site_id,
                        );
                        if client.publish(subject, codec::encode(&batch).into()).await.is_err() {
                            eprintln!("run: could not send path metrics (NATS down); dropped");
                        }
                    }
                },
                _ = tokio::signal::ctrl_c() => {
                    eprintln!("run: stopping; tunnels stay up");
                    return Ok(());
                }
            }
        }
    })
}
