//! The eBPF data plane as the agent drives it (I/O): load `lan_steer.o` (XDP + TC programs,
//! built from `edge-ebpf/` by build.rs) with aya, attach it to the LAN interface, and read and
//! write its maps. [`abi`] mirrors the C map types; [`test_run`] runs a program on a crafted
//! packet with `BPF_PROG_TEST_RUN` (tests and `patronus-edge bench dataplane`).
//!
//! Where BPF cannot be loaded (no CAP_BPF, an old kernel) loading fails with a
//! [`DataplaneError`] the agent reports in one line before running routes-only.

#![allow(dead_code)] // Some accessors serve only the tests and the bench.

pub mod abi;
pub mod bench;
pub mod packet;
pub mod test_run;

use std::os::fd::{AsFd, BorrowedFd};

use aya::maps::{Array, HashMap as BpfHashMap, LpmTrie, MapData, PerCpuArray};
use aya::programs::{SchedClassifier, Xdp};
use aya::Ebpf;

use abi::{ClassPaths, Counter, DestSite, FlowKey, FlowValue, PathEntry, PolicyRule, PolicySet};

/// The compiled programs (aligned as aya needs).
static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("PATRONUS_EBPF_OUT_DIR"), "/lan_steer.o"));

/// An XDP program that only passes packets: the benchmarks' baseline.
static EMPTY_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("PATRONUS_EBPF_OUT_DIR"), "/xdp_empty.o"));
pub const EMPTY_PROGRAM: &str = "patronus_xdp_empty";

pub const XDP_PROGRAM: &str = "patronus_xdp_lan";
pub const TC_PROGRAM: &str = "patronus_tc_lan";

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("the kernel refused the eBPF programs ({0}); running routes-only (needs CAP_BPF and Linux 5.17+)")]
    Load(String),
    #[error("map {name}: {detail}")]
    Map { name: &'static str, detail: String },
}

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |e| DataplaneError::Map {
        name,
        detail: e.to_string(),
    }
}

/// Load the empty baseline program.
pub fn load_empty() -> Result<Ebpf, DataplaneError> {
    let mut ebpf = Ebpf::load(EMPTY_OBJECT).map_err(|e| DataplaneError::Load(e.to_string()))?;
    let xdp: &mut Xdp = ebpf
        .program_mut(EMPTY_PROGRAM)
        .ok_or_else(|| DataplaneError::Load(format!("{EMPTY_PROGRAM} is missing")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| DataplaneError::Load(e.to_string()))?;
    xdp.load()
        .map_err(|e| DataplaneError::Load(format!("{EMPTY_PROGRAM}: {e:#}")))?;
    Ok(ebpf)
}

/// The descriptor of XDP program `name` in `ebpf` (for `BPF_PROG_TEST_RUN`).
pub fn program_fd<'a>(ebpf: &'a Ebpf, name: &str) -> Result<BorrowedFd<'a>, DataplaneError> {
    let program: &Xdp = ebpf
        .program(name)
        .ok_or_else(|| DataplaneError::Load(format!("{name} is missing")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| DataplaneError::Load(e.to_string()))?;
    program
        .fd()
        .map(|fd| fd.as_fd())
        .map_err(|e| DataplaneError::Load(e.to_string()))
}

/// How the XDP program runs on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpMode {
    /// In the driver (native).
    Driver,
    /// Generic (skb) mode: the driver has no XDP support.
    Generic,
}

/// What is in the maps now, so the next apply writes only the difference.
#[derive(Default)]
struct Written {
    compiled: Option<crate::classifier::Compiled>,
    ports: Vec<PolicySet>,
    /// (class, destination slot) entries written.
    classes: std::collections::BTreeSet<(u16, u16)>,
    dests: std::collections::BTreeMap<crate::classifier::Prefix, u16>,
}

/// The flow table through a descriptor of its own (see [`Dataplane::flow_table`]).
pub struct FlowTable {
    map: BpfHashMap<MapData, FlowKey, FlowValue>,
}

impl FlowTable {
    pub fn entries(&self) -> Result<Vec<(FlowKey, FlowValue)>, DataplaneError> {
        self.map
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_error("PATRONUS_FLOWS"))
    }
}

/// The loaded programs and their maps.
pub struct Dataplane {
    ebpf: Ebpf,
    written: Written,
}

impl Dataplane {
    /// Load both programs into the kernel (the verifier runs here); nothing is attached yet.
    pub fn load() -> Result<Self, DataplaneError> {
        let mut ebpf = Ebpf::load(OBJECT).map_err(|e| DataplaneError::Load(e.to_string()))?;
        {
            let xdp: &mut Xdp = ebpf
                .program_mut(XDP_PROGRAM)
                .ok_or_else(|| DataplaneError::Load(format!("{XDP_PROGRAM} is missing")))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| DataplaneError::Load(e.to_string()))?;
            xdp.load()
                .map_err(|e| DataplaneError::Load(format!("{XDP_PROGRAM}: {e:#}")))?;
        }
        {
            let tc: &mut SchedClassifier = ebpf
                .program_mut(TC_PROGRAM)
                .ok_or_else(|| DataplaneError::Load(format!("{TC_PROGRAM} is missing")))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| DataplaneError::Load(e.to_string()))?;
            tc.load()
                .map_err(|e| DataplaneError::Load(format!("{TC_PROGRAM}: {e:#}")))?;
        }
        // Array maps start zeroed: only non-empty sets need writing the first time.
        Ok(Self {
            ebpf,
            written: Written {
                ports: vec![PolicySet::default(); 65536],
                ..Written::default()
            },
        })
    }

    /// Attach XDP (driver mode where the driver supports it, generic otherwise) and the TC
    /// ingress program to `interface`. Dropping the `Dataplane` detaches both.
    pub fn attach(&mut self, interface: &str) -> Result<XdpMode, DataplaneError> {
        use aya::programs::{tc, TcAttachType, XdpFlags};
        let attach_error = |what: &str, e: &dyn std::fmt::Display| {
            DataplaneError::Load(format!("attaching {what} to {interface}: {e}"))
        };
        let mode = {
            let xdp: &mut Xdp = self
                .ebpf
                .program_mut(XDP_PROGRAM)
                .ok_or_else(|| DataplaneError::Load(format!("{XDP_PROGRAM} is missing")))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| DataplaneError::Load(e.to_string()))?;
            match xdp.attach(interface, XdpFlags::DRV_MODE) {
                Ok(_) => XdpMode::Driver,
                Err(_) => {
                    xdp.attach(interface, XdpFlags::SKB_MODE)
                        .map_err(|e| attach_error("XDP", &e))?;
                    XdpMode::Generic
                }
            }
        };
        // An existing clsact qdisc is fine.
        let _ = tc::qdisc_add_clsact(interface);
        let classifier: &mut SchedClassifier = self
            .ebpf
            .program_mut(TC_PROGRAM)
            .ok_or_else(|| DataplaneError::Load(format!("{TC_PROGRAM} is missing")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| DataplaneError::Load(e.to_string()))?;
        classifier
            .attach(interface, TcAttachType::Ingress)
            .map_err(|e| attach_error("TC ingress", &e))?;
        Ok(mode)
    }

    /// Write compiled policies and the steering plan into the maps, only what changed: paths
    /// and class paths first (a class's new generation is the failover), then the rules, then
    /// the bitmaps that point at them.
    pub fn apply(
        &mut self,
        compiled: &crate::classifier::Compiled,
        plan: &crate::steering::SteeringPlan,
    ) -> Result<usize, DataplaneError> {
        let mut writes = 0;
        for (index, path) in &plan.paths {
            self.set_path(*index, *path)?;
            writes += 1;
        }
        // Destinations first, so a new flow toward a new peer finds its slot's paths.
        for (prefix, slot) in &plan.dests {
            if self.written.dests.get(prefix) != Some(slot) {
                self.set_dest(prefix.len, prefix.addr, *slot)?;
                writes += 1;
            }
        }
        let mut classes = std::collections::BTreeSet::new();
        for ((class, site), class_plan) in &plan.classes {
            let index = abi::class_index(*class, *site);
            let current = self.class_paths(index)?;
            let current = (self.written.classes.contains(&(*class, *site))).then_some(current);
            let next = crate::steering::next_class_paths(current.as_ref(), class_plan);
            if current != Some(next) {
                self.set_class_paths(index, next)?;
                writes += 1;
            }
            classes.insert((*class, *site));
        }
        // (Class, destination) pairs that are gone: no paths, at a new generation, so their
        // flows leave them.
        for (class, site) in self
            .written
            .classes
            .difference(&classes)
            .copied()
            .collect::<Vec<_>>()
        {
            let index = abi::class_index(class, site);
            let current = self.class_paths(index)?;
            let empty = ClassPaths {
                generation: current.generation.wrapping_add(1).max(1),
                ..ClassPaths::default()
            };
            self.set_class_paths(index, empty)?;
            writes += 1;
        }
        self.written.classes = classes;
        for prefix in self
            .written
            .dests
            .keys()
            .filter(|p| !plan.dests.contains_key(p))
            .copied()
            .collect::<Vec<_>>()
        {
            self.remove_dest(prefix.len, prefix.addr)?;
            writes += 1;
        }
        self.written.dests = plan.dests.clone();

        // The policy tables change only with the policies; a failover (the plan alone)
        // must not rebuild and compare the 65,536-entry port table.
        if self.written.compiled.as_ref() == Some(compiled) {
            return Ok(writes);
        }
        let previous = self.written.compiled.take();
        for (rank, rule) in compiled.rules.iter().enumerate() {
            if previous.as_ref().and_then(|p| p.rules.get(rank)) != Some(rule) {
                self.set_policy_rule(
                    rank as u32,
                    PolicyRule {
                        class_id: rule.class_id,
                        src_port_lo: rule.src_port_lo,
                        src_port_hi: rule.src_port_hi,
                        dscp: rule.dscp.unwrap_or(0xff),
                        pad: 0,
                    },
                )?;
                writes += 1;
            }
        }
        let empty = PolicySet::default();
        for (number, set) in compiled.protocol.iter().enumerate() {
            let before = previous.as_ref().and_then(|p| p.protocol.get(number));
            if before.unwrap_or(&empty) != set {
                self.set_protocol_set(number as u8, *set)?;
                writes += 1;
            }
        }
        let mut ports = Vec::with_capacity(65536);
        for (first, last, set) in &compiled.dst_ports {
            ports.extend(std::iter::repeat_n(*set, usize::from(last - first) + 1));
        }
        for (port, set) in ports.iter().enumerate() {
            if self.written.ports.get(port) != Some(set) {
                self.set_dst_port_set(port as u16, *set)?;
                writes += 1;
            }
        }
        self.written.ports = ports;
        for (source, now, before) in [
            (true, &compiled.src, previous.as_ref().map(|p| &p.src)),
            (false, &compiled.dst, previous.as_ref().map(|p| &p.dst)),
        ] {
            for (prefix, set) in now {
                if before.and_then(|b| b.get(prefix)) != Some(set) {
                    self.set_prefix_set(source, prefix.len, prefix.addr, *set)?;
                    writes += 1;
                }
            }
            for prefix in before.into_iter().flat_map(|b| b.keys()) {
                if !now.contains_key(prefix) {
                    self.remove_prefix(source, prefix.len, prefix.addr)?;
                    writes += 1;
                }
            }
        }
        self.written.compiled = Some(compiled.clone());
        Ok(writes)
    }

    fn remove_prefix(
        &mut self,
        source: bool,
        prefixlen: u32,
        addr: [u8; 16],
    ) -> Result<(), DataplaneError> {
        let name = if source {
            "PATRONUS_POLICY_SRC"
        } else {
            "PATRONUS_POLICY_DST"
        };
        let map = self.ebpf.map_mut(name).ok_or(DataplaneError::Map {
            name,
            detail: "missing from the object".into(),
        })?;
        let mut trie: LpmTrie<&mut MapData, [u8; 16], PolicySet> =
            LpmTrie::try_from(map).map_err(map_error(name))?;
        match trie.remove(&aya::maps::lpm_trie::Key::new(prefixlen, addr)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_error(name)(e)),
        }
    }

    /// The XDP program's descriptor (for `BPF_PROG_TEST_RUN`).
    pub fn xdp_fd(&self) -> Result<BorrowedFd<'_>, DataplaneError> {
        program_fd(&self.ebpf, XDP_PROGRAM)
    }

    /// Insert `count` flows made by `make(i)` (benchmarks: a full table). Returns how many
    /// went in.
    pub fn fill_flows(
        &mut self,
        count: u32,
        make: impl Fn(u32) -> (FlowKey, FlowValue),
    ) -> Result<u32, DataplaneError> {
        let name = "PATRONUS_FLOWS";
        let map = self.ebpf.map_mut(name).ok_or(DataplaneError::Map {
            name,
            detail: "missing from the object".into(),
        })?;
        let mut flows: BpfHashMap<&mut MapData, FlowKey, FlowValue> =
            BpfHashMap::try_from(map).map_err(map_error(name))?;
        for i in 0..count {
            let (key, value) = make(i);
            flows.insert(key, value, 0).map_err(map_error(name))?;
        }
        Ok(count)
    }

    fn array<T: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<Array<&mut MapData, T>, DataplaneError> {
        let map = self.ebpf.map_mut(name).ok_or(DataplaneError::Map {
            name,
            detail: "missing from the object".into(),
        })?;
        Array::try_from(map).map_err(map_error(name))
    }

    pub fn set_path(&mut self, index: u32, path: PathEntry) -> Result<(), DataplaneError> {
        self.array("PATRONUS_PATHS")?
            .set(index, path, 0)
            .map_err(map_error("PATRONUS_PATHS"))
    }

    /// Replace a (class, destination)'s paths (`index` from [`abi::class_index`]): one map
    /// update is the whole failover.
    pub fn set_class_paths(&mut self, index: u32, paths: ClassPaths) -> Result<(), DataplaneError> {
        self.array("PATRONUS_CLASS_PATHS")?
            .set(index, paths, 0)
            .map_err(map_error("PATRONUS_CLASS_PATHS"))
    }

    pub fn class_paths(&mut self, index: u32) -> Result<ClassPaths, DataplaneError> {
        self.array("PATRONUS_CLASS_PATHS")?
            .get(&index, 0)
            .map_err(map_error("PATRONUS_CLASS_PATHS"))
    }

    fn dest_trie(&mut self) -> Result<LpmTrie<&mut MapData, [u8; 16], DestSite>, DataplaneError> {
        let name = "PATRONUS_DEST_SITES";
        let map = self.ebpf.map_mut(name).ok_or(DataplaneError::Map {
            name,
            detail: "missing from the object".into(),
        })?;
        LpmTrie::try_from(map).map_err(map_error(name))
    }

    /// Traffic to `addr/prefixlen` (16-byte form) goes to the peer in destination `slot`.
    pub fn set_dest(
        &mut self,
        prefixlen: u32,
        addr: [u8; 16],
        slot: u16,
    ) -> Result<(), DataplaneError> {
        self.dest_trie()?
            .insert(
                &aya::maps::lpm_trie::Key::new(prefixlen, addr),
                DestSite { site: slot, pad: 0 },
                0,
            )
            .map_err(map_error("PATRONUS_DEST_SITES"))
    }

    fn remove_dest(&mut self, prefixlen: u32, addr: [u8; 16]) -> Result<(), DataplaneError> {
        match self
            .dest_trie()?
            .remove(&aya::maps::lpm_trie::Key::new(prefixlen, addr))
        {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_error("PATRONUS_DEST_SITES")(e)),
        }
    }

    pub fn set_policy_rule(&mut self, rank: u32, rule: PolicyRule) -> Result<(), DataplaneError> {
        self.array("PATRONUS_POLICY_RULES")?
            .set(rank, rule, 0)
            .map_err(map_error("PATRONUS_POLICY_RULES"))
    }

    pub fn set_protocol_set(&mut self, protocol: u8, set: PolicySet) -> Result<(), DataplaneError> {
        self.array("PATRONUS_POLICY_PROTO")?
            .set(u32::from(protocol), set, 0)
            .map_err(map_error("PATRONUS_POLICY_PROTO"))
    }

    pub fn set_dst_port_set(&mut self, port: u16, set: PolicySet) -> Result<(), DataplaneError> {
        self.array("PATRONUS_POLICY_DPORT")?
            .set(u32::from(port), set, 0)
            .map_err(map_error("PATRONUS_POLICY_DPORT"))
    }

    /// `source`: the source-prefix trie, else the destination one. Addresses are IPv6 or
    /// IPv4-mapped (`prefixlen` counts from the start of the 16 bytes).
    pub fn set_prefix_set(
        &mut self,
        source: bool,
        prefixlen: u32,
        addr: [u8; 16],
        set: PolicySet,
    ) -> Result<(), DataplaneError> {
        let name = if source {
            "PATRONUS_POLICY_SRC"
        } else {
            "PATRONUS_POLICY_DST"
        };
        let map = self.ebpf.map_mut(name).ok_or(DataplaneError::Map {
            name,
            detail: "missing from the object".into(),
        })?;
        let mut trie: LpmTrie<&mut MapData, [u8; 16], PolicySet> =
            LpmTrie::try_from(map).map_err(map_error(name))?;
        trie.insert(&aya::maps::lpm_trie::Key::new(prefixlen, addr), set, 0)
            .map_err(map_error(name))
    }

    /// One flow's entry, if the table has it.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowValue>, DataplaneError> {
        let name = "PATRONUS_FLOWS";
        let map = self.ebpf.map(name).ok_or(DataplaneError::Map {
            name,
            detail: "missing from the object".into(),
        })?;
        let flows: BpfHashMap<&MapData, FlowKey, FlowValue> =
            BpfHashMap::try_from(map).map_err(map_error(name))?;
        match flows.get(key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_error(name)(e)),
        }
    }

    /// A second handle on the flow table (its own descriptor), for readers that must not
    /// hold whatever guards the `Dataplane` while they walk up to a million entries.
    pub fn flow_table(&self) -> Result<FlowTable, DataplaneError> {
        let name = "PATRONUS_FLOWS";
        let map = self.ebpf.map(name).ok_or(DataplaneError::Map {
            name,
            detail: "missing from the object".into(),
        })?;
        let data = match map {
            aya::maps::Map::LruHashMap(data) | aya::maps::Map::HashMap(data) => data,
            _ => {
                return Err(DataplaneError::Map {
                    name,
                    detail: "is not a hash map".into(),
                })
            }
        };
        let fd = data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| DataplaneError::Map {
                name,
                detail: e.to_string(),
            })?;
        let data = MapData::from_fd(fd).map_err(map_error(name))?;
        let map =
            BpfHashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(map_error(name))?;
        Ok(FlowTable { map })
    }

    /// Every flow in the table.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>, DataplaneError> {
        let name = "PATRONUS_FLOWS";
        let map = self.ebpf.map(name).ok_or(DataplaneError::Map {
            name,
            detail: "missing from the object".into(),
        })?;
        let flows: BpfHashMap<&MapData, FlowKey, FlowValue> =
            BpfHashMap::try_from(map).map_err(map_error(name))?;
        flows
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_error(name))
    }

    /// A counter summed over CPUs.
    pub fn counter(&self, counter: Counter) -> Result<u64, DataplaneError> {
        let name = "PATRONUS_COUNTERS";
        let map = self.ebpf.map(name).ok_or(DataplaneError::Map {
            name,
            detail: "missing from the object".into(),
        })?;
        let counters: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(map_error(name))?;
        let values = counters
            .get(&(counter as u32), 0)
            .map_err(map_error(name))?;
        Ok(values.iter().sum())
    }
}

#[cfg(test)]
mod tests;
