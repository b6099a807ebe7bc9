//! The WAN emulator process (`patronus-lab wan-daemon`, started by `up`, stopped by `down`).
//!
//! In the internet namespace every packet arriving from an uplink is routed (by `ip rule iif
//! <uplink> lookup 200`) into the TUN device `wanemu`; this process reads it, asks [`Wan`]
//! what to do, and writes it back to the TUN at its release time, whence the kernel forwards
//! it to its destination uplink by the ordinary connected routes. Impairments change at run
//! time through a Unix socket (one JSON line per request), which is how `patronus-lab impair`
//! talks to it.

use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::netns::ip;
use crate::plan::LabPlan;
use crate::wan::{Impairment, Wan, XorShift};

pub const TUN_NAME: &str = "wanemu";
pub const WAN_TABLE: &str = "200";

/// A control request.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    /// The uplink's site-side address.
    pub uplink: Ipv4Addr,
    /// `None` asks for the current impairment.
    pub set: Option<Impairment>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    pub impairment: Option<Impairment>,
    pub error: Option<String>,
    pub forwarded: u64,
    pub dropped: u64,
}

/// Open a TUN device (no packet-information header) in the calling thread's namespace.
fn open_tun(name: &str) -> anyhow::Result<File> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        pad: [u8; 22],
    }
    let path = c"/dev/net/tun";
    // SAFETY: a valid NUL-terminated path; the result is checked.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        bail!(
            "cannot open /dev/net/tun: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: fd is an open descriptor we own from here on.
    let file = unsafe { File::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF takes a pointer to an ifreq, which IfReq lays out.
    if unsafe { libc::ioctl(fd, TUNSETIFF, &mut req) } < 0 {
        bail!("TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    }
    Ok(file)
}

/// Enter the named network namespace (this thread only).
fn enter_netns(ns: &str) -> anyhow::Result<()> {
    let path = format!("/var/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("cannot open {path}"))?;
    use std::os::fd::AsRawFd;
    // SAFETY: a valid namespace file descriptor.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {ns}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

struct Pending {
    at: Instant,
    packet: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    /// Earliest first in a max-heap.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.at.cmp(&self.at)
    }
}

#[derive(Default)]
struct Counters {
    forwarded: AtomicU64,
    dropped: AtomicU64,
}

/// One TCP relay on the management link: sites reach host services (the controller, NATS)
/// that listen on loopback only, through the host end of the link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relay {
    pub listen: std::net::SocketAddr,
    pub target: std::net::SocketAddr,
}

impl std::str::FromStr for Relay {
    type Err = String;
    /// `PORT=HOST:PORT`: listen on that port of the management address.
    fn from_str(s: &str) -> Result<Self, String> {
        let (port, target) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not PORT=HOST:PORT"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{port:?} is not a port"))?;
        let target = target
            .parse()
            .map_err(|_| format!("{target:?} is not HOST:PORT"))?;
        Ok(Relay {
            listen: std::net::SocketAddr::from(([0, 0, 0, 0], port)),
            target,
        })
    }
}

fn serve_relay(listener: std::net::TcpListener, target: std::net::SocketAddr) {
    for inbound in listener.incoming() {
        let Ok(inbound) = inbound else { continue };
        std::thread::spawn(move || {
            let Ok(outbound) = std::net::TcpStream::connect(target) else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (Ok(mut in_read), Ok(mut out_write)) = (inbound.try_clone(), outbound.try_clone())
            else {
                return;
            };
            let upstream = std::thread::spawn(move || {
                let _ = std::io::copy(&mut in_read, &mut out_write);
                let _ = out_write.shutdown(std::net::Shutdown::Write);
            });
            let (mut out_read, mut in_write) = (outbound, inbound);
            let _ = std::io::copy(&mut out_read, &mut in_write);
            let _ = in_write.shutdown(std::net::Shutdown::Write);
            let _ = upstream.join();
        });
    }
}

/// Run until killed: TUN in the internet namespace, routing into it, the management relays,
/// the control socket.
pub fn run(plan: &LabPlan, socket: &std::path::Path, relays: &[Relay]) -> anyhow::Result<()> {
    for relay in relays {
        let listen = std::net::SocketAddr::new(
            std::net::IpAddr::V4(plan.mgmt_host_addr.addr()),
            relay.listen.port(),
        );
        let listener = std::net::TcpListener::bind(listen)
            .with_context(|| format!("cannot relay on {listen}"))?;
        let target = relay.target;
        std::thread::spawn(move || serve_relay(listener, target));
        eprintln!("wan-daemon: relaying {listen} -> {target}");
    }
    let inet = plan.internet_ns.clone();
    let (tun_tx, tun_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let opened = enter_netns(&inet).and_then(|_| open_tun(TUN_NAME));
        let _ = tun_tx.send(opened);
    });
    let tun = tun_rx.recv().context("TUN thread")??;
    let inet = plan.internet_ns.as_str();
    let run_ip = |args: &[&str]| {
        let mut all = vec!["-n".to_owned(), inet.to_owned()];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        ip(&all)
    };
    run_ip(&["link", "set", TUN_NAME, "up"])?;
    run_ip(&[
        "route", "add", "default", "dev", TUN_NAME, "table", WAN_TABLE,
    ])?;
    for site in &plan.sites {
        for uplink in &site.uplinks {
            run_ip(&[
                "rule",
                "add",
                "iif",
                &uplink.internet_if,
                "lookup",
                WAN_TABLE,
            ])?;
        }
    }

    let wan = Arc::new(Mutex::new(Wan::default()));
    let queue = Arc::new((Mutex::new(BinaryHeap::<Pending>::new()), Condvar::new()));
    let counters = Arc::new(Counters::default());
    let epoch = Instant::now();

    // Reader: TUN → decision → queue.
    {
        let mut tun = tun.try_clone()?;
        let (wan, queue, counters) = (wan.clone(), queue.clone(), counters.clone());
        std::thread::spawn(move || {
            let mut rng = XorShift(epoch.elapsed().as_nanos() as u64 | 1);
            let mut buf = vec![0u8; 65_536];
            loop {
                let n = match tun.read(&mut buf) {
                    Ok(n) => n,
                    Err(_) => return,
                };
                let packet = &buf[..n];
                if n < 20 || packet[0] >> 4 != 4 {
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
                let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
                let now = Instant::now();
                let now_ns = now.duration_since(epoch).as_nanos() as u64;
                let verdict = match wan.lock() {
                    Ok(mut wan) => wan.decide(src, dst, n, now_ns, &mut rng),
                    Err(_) => return,
                };
                match verdict {
                    Ok(delay_ns) => {
                        let (heap, ready) = &*queue;
                        if let Ok(mut heap) = heap.lock() {
                            heap.push(Pending {
                                at: now + Duration::from_nanos(delay_ns),
                                packet: packet.to_vec(),
                            });
                            ready.notify_one();
                        }
                    }
                    Err(_) => {
                        counters.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    // Writer: queue → TUN at release time.
    {
        let mut tun = tun;
        let (queue, counters) = (queue.clone(), counters.clone());
        std::thread::spawn(move || {
            let (heap, ready) = &*queue;
            let Ok(mut guard) = heap.lock() else { return };
            loop {
                let now = Instant::now();
                match guard.peek().map(|p| p.at) {
                    Some(at) if at <= now => {
                        if let Some(p) = guard.pop() {
                            drop(guard);
                            if tun.write_all(&p.packet).is_ok() {
                                counters.forwarded.fetch_add(1, Ordering::Relaxed);
                            } else {
                                counters.dropped.fetch_add(1, Ordering::Relaxed);
                            }
                            let Ok(g) = heap.lock() else { return };
                            guard = g;
                        }
                    }
                    Some(at) => {
                        let Ok((g, _)) = ready.wait_timeout(guard, at - now) else {
                            return;
                        };
                        guard = g;
                    }
                    None => {
                        let Ok(g) = ready.wait(guard) else { return };
                        guard = g;
                    }
                }
            }
        });
    }

    // Control socket (the host's filesystem, reachable from any namespace).
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    eprintln!(
        "wan-daemon: forwarding through {TUN_NAME} in {inet}; control {}",
        socket.display()
    );
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let mut reader = BufReader::new(&stream);
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            continue;
        }
        let reply = match serde_json::from_str::<Request>(&line) {
            Err(e) => Reply {
                ok: false,
                impairment: None,
                error: Some(format!("bad request: {e}")),
                forwarded: 0,
                dropped: 0,
            },
            Ok(request) => {
                let mut wan = wan
                    .lock()
                    .map_err(|_| anyhow::anyhow!("emulator state poisoned"))?;
                let result = match request.set {
                    Some(imp) => imp.validate().map(|_| wan.set(request.uplink, imp)),
                    None => Ok(()),
                };
                Reply {
                    ok: result.is_ok(),
                    impairment: Some(wan.get(request.uplink)),
                    error: result.err().map(|e| e.to_string()),
                    forwarded: counters.forwarded.load(Ordering::Relaxed),
                    dropped: counters.dropped.load(Ordering::Relaxed),
                }
            }
        };
        let mut writer = &stream;
        let _ = writeln!(writer, "{}", serde_json::to_string(&reply)?);
    }
    Ok(())
}

/// Send one request to a running daemon.
pub fn control(socket: &std::path::Path, request: &Request) -> anyhow::Result<Reply> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "the WAN emulator is not running ({}); is the lab up? (`patronus-lab up`)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    writeln!(stream, "{}", serde_json::to_string(request)?)?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let reply: Reply = serde_json::from_str(&line).context("the emulator's answer")?;
    Ok(reply)
}
