//! The eBPF data plane as the agent drives it (I/O): load `lan_steer.o` (XDP + TC programs,
//! built from `edge-ebpf/` by build.rs) with aya, attach it to the LAN interface, and read and
//! write its maps. [`abi`] mirrors the C map types; [`test_run`] runs a program on a crafted
//! packet with `BPF_PROG_TEST_RUN` (tests and `patronus-edge bench dataplane`).
//!
//! Where BPF cannot be loaded (no CAP_BPF, an old kernel) loading fails with a
//! [`DataplaneError`] the agent reports in one line before running routes-only.

#![allow(dead_code)] // The run loop's use (attach, policies from the intent) lands next.

pub mod abi;
pub mod bench;
pub mod packet;
pub mod test_run;

use std::os::fd::{AsFd, BorrowedFd};

use aya::maps::{Array, HashMap as BpfHashMap, LpmTrie, MapData, PerCpuArray};
use aya::programs::{SchedClassifier, Xdp};
use aya::Ebpf;

use abi::{ClassPaths, Counter, FlowKey, FlowValue, PathEntry, PolicyRule, PolicySet};

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

/// The loaded programs and their maps.
pub struct Dataplane {
    ebpf: Ebpf,
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
        Ok(Self { ebpf })
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

    /// Replace a class's paths: one map update is the whole failover.
    pub fn set_class_paths(&mut self, class: u32, paths: ClassPaths) -> Result<(), DataplaneError> {
        self.array("PATRONUS_CLASS_PATHS")?
            .set(class, paths, 0)
            .map_err(map_error("PATRONUS_CLASS_PATHS"))
    }

    pub fn class_paths(&mut self, class: u32) -> Result<ClassPaths, DataplaneError> {
        self.array("PATRONUS_CLASS_PATHS")?
            .get(&class, 0)
            .map_err(map_error("PATRONUS_CLASS_PATHS"))
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
