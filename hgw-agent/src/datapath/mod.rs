//! The eBPF fast path: loads hgw's programs, attaches them (`attach`: tcx, or cls_bpf
//! on kernels without it), and owns the maps.
//!
//! Without pinning, the tcx links belong to this process: the kernel detaches them when
//! the agent exits, however it exits. With a pin directory (on a bpffs, `pins`), the
//! links and the maps are pinned there and outlive the agent: the programs keep
//! forwarding while no agent runs, and a new agent adopts them, putting its own
//! programs in place with a link update (`bpf_link_update`: never detached, not one
//! packet without a program) and reusing the maps whose layout it shares. cls_bpf
//! filters outlive the agent by themselves; the next one replaces their programs in
//! place.

mod attach;
pub mod pin_owner;
mod pins;
pub mod probe;

use aya::{
    Ebpf,
    maps::{Array, LpmTrie, MapData, MapError, PerCpuArray, lpm_trie::Key},
    programs::{ProgramError, SchedClassifier},
};
use hgw_common::{
    COUNTER_NOT_IP, Counter, Endpoint, Family, MAP_CONFIG, MAP_COUNTERS, MAP_DEVICES,
    MAP_ENDPOINTS_V4, MAP_ENDPOINTS_V6, MAP_GENERATION, MAP_ROUTES_V4, MAP_ROUTES_V6, NextHop,
    NodeConfig, PROG_TO_PEER, PROG_TO_POD, counter_index,
};
use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use log::{info, warn};

use hgw_common::loader::{self, KernelFacts, LoaderError, PinnedMap};

use crate::config::Attach;

use attach::HookLink;
pub use attach::{FILTER_PRIORITY, FORCE_CLS_BPF, HookKind, remove_filters};
pub use pins::{marked_qdiscs, remove_pins};

/// The programs, built by build.rs from hgw-ebpf.
pub static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hgw"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(transparent)]
    Load(#[from] LoaderError),
    #[error("pin directory {path}: {operation}: {source}")]
    PinDir {
        path: String,
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("pinning the link of {program} on {interface} at {path}: {reason}")]
    PinLink {
        program: &'static str,
        interface: String,
        path: String,
        reason: String,
    },
    #[error("clsact qdisc of {interface}: {source}")]
    Qdisc {
        interface: String,
        #[source]
        source: aya::programs::tc::TcError,
    },
    #[error(transparent)]
    PinOwner(#[from] pin_owner::PinOwnerError),
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("{operation} program {program}: {source}")]
    Program {
        operation: &'static str,
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error(
        "interface {interface} already runs hgw program {program} (id {id}): another hgw agent is running in this network namespace (stop it first), or an earlier agent's pins are in another pin_dir (`hgw-agent uninstall --pin-dir OLD` removes them)"
    )]
    AlreadyAttached {
        interface: String,
        program: String,
        id: u32,
    },
    #[error("{operation} map {map}: {source}")]
    Map {
        operation: &'static str,
        map: &'static str,
        #[source]
        source: MapError,
    },
}

pub struct Datapath {
    /// Owns the programs and their links: dropping it detaches them.
    ebpf: Ebpf,
    config: Array<MapData, NodeConfig>,
    routes_v4: LpmTrie<MapData, [u8; 4], NextHop>,
    routes_v6: LpmTrie<MapData, [u8; 16], NextHop>,
    counters: PerCpuArray<MapData, u64>,
    /// A second fd of the counters map, for [`Datapath::counter_reader`] (opening
    /// the map by id would need CAP_SYS_ADMIN).
    counters_fd: Option<std::os::fd::OwnedFd>,
    endpoints_v4: aya::maps::HashMap<MapData, [u8; 4], Endpoint>,
    endpoints_v6: aya::maps::HashMap<MapData, [u8; 16], Endpoint>,
    /// Interfaces whose tc hooks a redirect would skip: ifindex -> `DEVICE_*` bits.
    devices: aya::maps::HashMap<MapData, u32, u32>,
    /// The ids of hgw's own programs (to tell them from others on a tcx hook).
    own: Vec<u32>,
    /// Changed after every write to the maps above: the programs' cached flows found
    /// with the old contents are stale.
    generation: Array<MapData, u32>,
    /// What `generation` holds (only the agent writes it).
    generation_now: u32,
    /// Maps written since `generation` was last changed ([`Datapath::publish_generation`]).
    generation_pending: bool,
    /// Bridge ports `hgw_to_peer` is attached to (Attach::Ports).
    ports: HashMap<u32, HookLink>,
    attach: Attach,
    /// `hgw_to_pod` on the uplink (its ifindex).
    uplink: Option<(u32, HookLink)>,
    /// With Attach::Bridge, `hgw_to_peer` on the bridge (its ifindex).
    bridge: Option<(u32, HookLink)>,
    /// Where links and maps are pinned (`None`: nothing pinned).
    pins: Option<PathBuf>,
    /// tcx or cls_bpf, chosen at start.
    hook: HookKind,
}

fn program_error(
    operation: &'static str,
    program: &'static str,
) -> impl FnOnce(ProgramError) -> DatapathError {
    move |source| DatapathError::Program {
        operation,
        program,
        source,
    }
}

impl Datapath {
    /// Loads the programs for the kernel `facts` describe (with conntrack lookups in
    /// `established` mode), writes the node config, attaches `hgw_to_pod` to the
    /// uplink's ingress and, with [`Attach::Bridge`], `hgw_to_peer` to the bridge's
    /// ingress (with [`Attach::Ports`] the agent attaches it to each port with
    /// [`Datapath::attach_port`]), the `hook` way.
    pub fn attach(
        (bridge, bridge_ifindex): (&str, u32),
        (uplink, uplink_ifindex): (&str, u32),
        node: NodeConfig,
        attach: Attach,
        (hook, facts): (HookKind, KernelFacts),
        pins: Option<&Path>,
    ) -> Result<Self, DatapathError> {
        if let Some(dir) = pins {
            pins::prepare_pin_dir(dir, bridge, attach)?;
        }
        pins::remove_earlier_pins(pins);
        for interface in [bridge, uplink] {
            attach::refuse_foreign_hgw(interface, pins)?;
        }
        // Whichever way this agent attaches: an earlier agent's filter on a hook this
        // one leaves alone would go on forwarding with that agent's maps.
        let n = attach::remove_unused_filters(bridge, uplink, attach);
        if n > 0 {
            info!(
                "removed {n} cls_bpf filters of an earlier agent on hooks this configuration does not use"
            );
        }
        let (mut ebpf, maps) =
            loader::load_pinned(PROGRAMS, facts, pins.map(|dir| dir.join("maps")).as_deref())?;
        let reused: Vec<&str> = maps
            .iter()
            .filter(|(_, m)| *m == PinnedMap::Reused)
            .map(|(name, _)| *name)
            .collect();
        let rebuilt: Vec<&str> = maps
            .iter()
            .filter(|(_, m)| *m == PinnedMap::Rebuilt)
            .map(|(name, _)| *name)
            .collect();
        if !reused.is_empty() {
            info!("pinned maps reused, state and all: {}", reused.join(", "));
        }
        if !rebuilt.is_empty() {
            warn!(
                "pinned maps of another layout replaced (their entries are written again): {}",
                rebuilt.join(", ")
            );
        }
        match aya_log::EbpfLogger::init(&mut ebpf).map(spawn_log_drain) {
            // The programs log nothing on the packet path (a per-packet log would flood
            // the ring); without a log call their object has no log map.
            Ok(()) | Err(aya_log::Error::MapNotFound) => {}
            Err(e) => warn!("eBPF logs will not be shown: {e}"),
        }

        let config = take_map(&mut ebpf, MAP_CONFIG)?;
        let routes_v4 = take_map(&mut ebpf, MAP_ROUTES_V4)?;
        let routes_v6 = take_map(&mut ebpf, MAP_ROUTES_V6)?;
        let counters_fd = match ebpf.map(MAP_COUNTERS) {
            Some(aya::maps::Map::PerCpuArray(data)) => std::os::fd::AsFd::as_fd(data.fd())
                .try_clone_to_owned()
                .ok(),
            _ => None,
        };
        let counters = take_map(&mut ebpf, MAP_COUNTERS)?;
        let endpoints_v4 = take_map(&mut ebpf, MAP_ENDPOINTS_V4)?;
        let endpoints_v6 = take_map(&mut ebpf, MAP_ENDPOINTS_V6)?;
        let devices = take_map(&mut ebpf, MAP_DEVICES)?;
        let generation: Array<MapData, u32> = take_map(&mut ebpf, MAP_GENERATION)?;
        // Pinned, it goes on from an earlier agent's value.
        let generation_now = generation
            .get(&0, 0)
            .map_err(map_error("reading", MAP_GENERATION))?;
        let mut datapath = Self {
            ebpf,
            config,
            routes_v4,
            routes_v6,
            counters,
            counters_fd,
            endpoints_v4,
            endpoints_v6,
            devices,
            own: Vec::new(),
            generation,
            generation_now,
            generation_pending: false,
            ports: HashMap::new(),
            attach,
            uplink: None,
            bridge: None,
            pins: pins.map(Path::to_path_buf),
            hook,
        };
        datapath.set_config(node)?;
        datapath.publish_generation()?;
        for program in [PROG_TO_PEER, PROG_TO_POD] {
            let prog = datapath.program(program)?;
            prog.load().map_err(program_error("loading", program))?;
            // Read through our own fd: needs no CAP_SYS_ADMIN.
            let id = prog
                .info()
                .map_err(program_error("reading the id of", program))?
                .id();
            datapath.own.push(id);
        }
        datapath.attach_node((bridge, bridge_ifindex), (uplink, uplink_ifindex))?;
        Ok(datapath)
    }

    /// Interface indexes of the ports `hgw_to_peer` is attached to.
    pub fn ports(&self) -> impl Iterator<Item = u32> + '_ {
        self.ports.keys().copied()
    }

    fn program(&mut self, program: &'static str) -> Result<&mut SchedClassifier, DatapathError> {
        self.ebpf
            .program_mut(program)
            .ok_or(DatapathError::MissingProgram(program))?
            .try_into()
            .map_err(program_error("finding", program))
    }

    /// Writes what the programs know of this node (its MACs may change while it runs).
    pub fn set_config(&mut self, node: NodeConfig) -> Result<(), DatapathError> {
        let result = self
            .config
            .set(0, node, 0)
            .map_err(map_error("writing", MAP_CONFIG));
        self.next_generation(result)
    }

    /// After a write to the config, routes or endpoints (done or not: a failed one
    /// may have changed something too), every cached flow is stale: noted here, and
    /// made so for the programs by [`Datapath::publish_generation`].
    fn next_generation(&mut self, result: Result<(), DatapathError>) -> Result<(), DatapathError> {
        self.generation_pending = true;
        result
    }

    /// Changes the generation if the maps were written since it last changed: the
    /// programs look every cached flow's next packet up again. Once per pass of the
    /// agent's loop, so that 5,000 entries written together cost one generation write,
    /// not 5,000.
    pub fn publish_generation(&mut self) -> Result<(), DatapathError> {
        if !std::mem::take(&mut self.generation_pending) {
            return Ok(());
        }
        self.generation_now = self.generation_now.wrapping_add(1);
        self.generation
            .set(0, self.generation_now, 0)
            .map_err(map_error("writing", MAP_GENERATION))
    }

    /// Sets interface `ifindex`'s `DEVICE_*` bits (non-zero: zero is no entry).
    pub fn set_device(&mut self, ifindex: u32, flags: u32) -> Result<(), DatapathError> {
        let result = self
            .devices
            .insert(ifindex, flags, 0)
            .map_err(map_error("updating", MAP_DEVICES));
        self.next_generation(result)
    }

    /// Interface `ifindex` has nothing a redirect would skip.
    pub fn remove_device(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        let result = absent_is_fine(self.devices.remove(&ifindex));
        self.next_generation(result.map_err(map_error("deleting from", MAP_DEVICES)))
    }

    /// The devices map's entries now (an earlier agent's, when pinned).
    pub fn devices(&self) -> Vec<(u32, u32)> {
        self.devices.iter().filter_map(Result::ok).collect()
    }

    /// The kernel's routing changed (a route or a rule): cached flows ask the FIB again.
    pub fn bump_generation(&mut self) -> Result<(), DatapathError> {
        self.next_generation(Ok(()))
    }

    /// The ids of hgw's programs.
    pub fn own_programs(&self) -> &[u32] {
        &self.own
    }

    pub fn set_endpoint(&mut self, ip: IpAddr, endpoint: Endpoint) -> Result<(), DatapathError> {
        let (result, map) = match ip {
            IpAddr::V4(ip) => (
                self.endpoints_v4.insert(ip.octets(), endpoint, 0),
                MAP_ENDPOINTS_V4,
            ),
            IpAddr::V6(ip) => (
                self.endpoints_v6.insert(ip.octets(), endpoint, 0),
                MAP_ENDPOINTS_V6,
            ),
        };
        self.next_generation(result.map_err(map_error("updating", map)))
    }

    pub fn remove_endpoint(&mut self, ip: IpAddr) -> Result<(), DatapathError> {
        let (result, map) = match ip {
            IpAddr::V4(ip) => (self.endpoints_v4.remove(&ip.octets()), MAP_ENDPOINTS_V4),
            IpAddr::V6(ip) => (self.endpoints_v6.remove(&ip.octets()), MAP_ENDPOINTS_V6),
        };
        self.next_generation(absent_is_fine(result).map_err(map_error("deleting from", map)))
    }

    pub fn set_route(&mut self, cidr: IpNet, next_hop: NextHop) -> Result<(), DatapathError> {
        let prefix = u32::from(cidr.prefix_len());
        let (result, map) = match cidr {
            IpNet::V4(net) => (
                self.routes_v4
                    .insert(&Key::new(prefix, net.network().octets()), next_hop, 0),
                MAP_ROUTES_V4,
            ),
            IpNet::V6(net) => (
                self.routes_v6
                    .insert(&Key::new(prefix, net.network().octets()), next_hop, 0),
                MAP_ROUTES_V6,
            ),
        };
        self.next_generation(result.map_err(map_error("updating", map)))
    }

    pub fn remove_route(&mut self, cidr: IpNet) -> Result<(), DatapathError> {
        let prefix = u32::from(cidr.prefix_len());
        let (result, map) = match cidr {
            IpNet::V4(net) => (
                self.routes_v4
                    .remove(&Key::new(prefix, net.network().octets())),
                MAP_ROUTES_V4,
            ),
            IpNet::V6(net) => (
                self.routes_v6
                    .remove(&Key::new(prefix, net.network().octets())),
                MAP_ROUTES_V6,
            ),
        };
        self.next_generation(absent_is_fine(result).map_err(map_error("deleting from", map)))
    }

    /// The fast-path routes the maps hold now (left by an earlier agent, when pinned).
    pub fn routes(&self) -> Vec<(IpNet, NextHop)> {
        let v4 = self
            .routes_v4
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(key, hop)| {
                let net = ipnet::Ipv4Net::new(key.data().into(), key.prefix_len() as u8).ok()?;
                Some((IpNet::V4(net), hop))
            });
        let v6 = self
            .routes_v6
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(key, hop)| {
                let net = ipnet::Ipv6Net::new(key.data().into(), key.prefix_len() as u8).ok()?;
                Some((IpNet::V6(net), hop))
            });
        v4.chain(v6).collect()
    }

    /// The local pods the maps hold now.
    pub fn endpoints(&self) -> Vec<(IpAddr, Endpoint)> {
        let v4 = self
            .endpoints_v4
            .iter()
            .filter_map(Result::ok)
            .map(|(ip, e)| (IpAddr::from(ip), e));
        let v6 = self
            .endpoints_v6
            .iter()
            .filter_map(Result::ok)
            .map(|(ip, e)| (IpAddr::from(ip), e));
        v4.chain(v6).collect()
    }

    /// Whether links and maps are pinned (they outlive the agent).
    pub fn pinned(&self) -> bool {
        self.pins.is_some()
    }

    /// Every counter, summed over the CPUs.
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        read_counters(&self.counters)
    }

    /// A second handle on the counters, for readers outside the agent's loop (status,
    /// metrics): reading it never waits for the loop.
    pub fn counter_reader(&self) -> Result<CounterReader, DatapathError> {
        let fd = self
            .counters_fd
            .as_ref()
            .and_then(|fd| fd.try_clone().ok())
            .ok_or(DatapathError::MissingMap(MAP_COUNTERS))?;
        let data = MapData::from_fd(fd).map_err(map_error("opening", MAP_COUNTERS))?;
        let map = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
            .map_err(map_error("opening", MAP_COUNTERS))?;
        Ok(CounterReader(map))
    }
}

/// Reads the fast path's counters, from any task.
pub struct CounterReader(PerCpuArray<MapData, u64>);

impl CounterReader {
    pub fn read(&self) -> Result<Counters, DatapathError> {
        read_counters(&self.0)
    }
}

fn read_counters(map: &PerCpuArray<MapData, u64>) -> Result<Counters, DatapathError> {
    let read = |slot: u32| -> Result<u64, DatapathError> {
        let values = map
            .get(&slot, 0)
            .map_err(map_error("reading", MAP_COUNTERS))?;
        Ok(values.iter().sum())
    };
    let mut families = Vec::with_capacity(Family::ALL.len());
    for &family in Family::ALL {
        let counters = Counter::ALL
            .iter()
            .map(|&counter| Ok((counter, read(counter_index(family, counter))?)))
            .collect::<Result<_, DatapathError>>()?;
        families.push((family, counters));
    }
    Ok(Counters {
        families,
        not_ip: read(COUNTER_NOT_IP)?,
    })
}

/// The fast path's packet counters, per family.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub families: Vec<(Family, Vec<(Counter, u64)>)>,
    /// Frames that were neither IPv4 nor IPv6.
    pub not_ip: u64,
}

fn map_error(operation: &'static str, map: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map {
        operation,
        map,
        source,
    }
}

/// Deleting what is not there is done.
fn absent_is_fine(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

fn take_map<T: TryFrom<aya::maps::Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, DatapathError> {
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    T::try_from(map).map_err(map_error("opening", name))
}

/// Keeps reading the programs' log ring buffer (only rare events are logged).
fn spawn_log_drain(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the fd is the logger's ring buffer map, owned by the logger, which the
    // AsyncFd owns for its whole life.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let Ok(mut logger) = registered else {
        warn!("eBPF logs will not be shown: cannot poll the log ring buffer");
        return;
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
