//! The eBPF fast path: loads hgw's programs, attaches them with tcx, and owns the maps.
//!
//! Without pinning, the tcx links belong to this process: the kernel detaches them when
//! the agent exits, however it exits. With a pin directory (on a bpffs), the links and
//! the maps are pinned there and outlive the agent: the programs keep forwarding while
//! no agent runs, and a new agent adopts them, putting its own programs in place with a
//! link update (`bpf_link_update`: never detached, not one packet without a program)
//! and reusing the maps whose layout it shares.

use aya::{
    Ebpf,
    maps::{Array, LpmTrie, MapData, MapError, PerCpuArray, lpm_trie::Key},
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
    util::KernelVersion,
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
use log::{debug, info, warn};

use hgw_common::loader::{self, LoaderError, PinnedMap};

use crate::config::Attach;

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
    #[error(transparent)]
    PinOwner(#[from] crate::pin_owner::PinOwnerError),
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
    /// Bridge ports `hgw_to_peer` is attached to (Attach::Ports).
    ports: HashMap<u32, HookLink>,
    attach: Attach,
    /// `hgw_to_pod` on the uplink (its ifindex).
    uplink: Option<(u32, HookLink)>,
    /// With Attach::Bridge, `hgw_to_peer` on the bridge (its ifindex).
    bridge: Option<(u32, HookLink)>,
    /// Where links and maps are pinned (`None`: nothing pinned).
    pins: Option<PathBuf>,
}

/// A program's tcx link on one interface. Dropped, it is detached unless pinned.
struct HookLink {
    _link: FdLink,
    pin: Option<PathBuf>,
}

impl HookLink {
    /// Takes the program off the interface, pinned or not.
    fn detach(self) {
        if let Some(pin) = &self.pin {
            // The link goes with its last reference: the pin, then our fd.
            let _ = std::fs::remove_file(pin);
        }
    }
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
    /// Loads the programs (`conntrack`: in `established` mode), writes the node config, attaches `hgw_to_pod` to the uplink's
    /// ingress and, with [`Attach::Bridge`], `hgw_to_peer` to the bridge's ingress (with
    /// [`Attach::Ports`] the agent attaches it to each port with [`Datapath::attach_port`]).
    pub fn attach(
        (bridge, bridge_ifindex): (&str, u32),
        (uplink, uplink_ifindex): (&str, u32),
        node: NodeConfig,
        attach: Attach,
        conntrack: bool,
        pins: Option<&Path>,
    ) -> Result<Self, DatapathError> {
        if let Some(dir) = pins {
            prepare_pin_dir(dir, bridge, attach)?;
        }
        remove_earlier_pins(pins);
        for interface in [bridge, uplink] {
            refuse_foreign_hgw(interface, pins)?;
        }
        let (mut ebpf, maps) = loader::load_pinned(
            PROGRAMS,
            conntrack,
            pins.map(|dir| dir.join("maps")).as_deref(),
        )?;
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
            ports: HashMap::new(),
            attach,
            uplink: None,
            bridge: None,
            pins: pins.map(Path::to_path_buf),
        };
        datapath.set_config(node)?;
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

    /// Attaches `hgw_to_pod` to the uplink's ingress and, with [`Attach::Bridge`],
    /// `hgw_to_peer` to the bridge's, unless already attached to these very devices: a
    /// device deleted and made again under its name (a new ifindex) gets them again.
    pub fn attach_node(
        &mut self,
        (bridge, bridge_ifindex): (&str, u32),
        (uplink, uplink_ifindex): (&str, u32),
    ) -> Result<(), DatapathError> {
        if self.uplink.as_ref().map(|(i, _)| *i) != Some(uplink_ifindex) {
            let link = self.attach_hook(PROG_TO_POD, uplink)?;
            if let Some((_, old)) = self.uplink.replace((uplink_ifindex, link)) {
                old.detach();
            }
        }
        if self.attach == Attach::Bridge
            && self.bridge.as_ref().map(|(i, _)| *i) != Some(bridge_ifindex)
        {
            let link = self.attach_hook(PROG_TO_PEER, bridge)?;
            if let Some((_, old)) = self.bridge.replace((bridge_ifindex, link)) {
                old.detach();
            }
        }
        Ok(())
    }

    /// Attaches `hgw_to_peer` to a bridge port's ingress (a pod's host-side veth), so
    /// pod traffic is forwarded before the bridge runs. Idempotent.
    pub fn attach_port(&mut self, name: &str, ifindex: u32) -> Result<(), DatapathError> {
        if self.ports.contains_key(&ifindex) {
            return Ok(());
        }
        refuse_foreign_hgw(name, self.pins.as_deref())?;
        let link = self.attach_hook(PROG_TO_PEER, name)?;
        self.ports.insert(ifindex, link);
        Ok(())
    }

    /// Takes the program off a port that left the bridge, or forgets one that is gone.
    pub fn detach_port(&mut self, ifindex: u32) {
        if let Some(link) = self.ports.remove(&ifindex) {
            link.detach();
        }
    }

    /// `program` on `interface`'s ingress. Pinned: a link pinned by an earlier agent
    /// and still on this interface gets this agent's program by a link update, in
    /// place; otherwise a new link is made and pinned.
    fn attach_hook(
        &mut self,
        program: &'static str,
        interface: &str,
    ) -> Result<HookLink, DatapathError> {
        let pin = self
            .pins
            .as_ref()
            .map(|dir| link_pin_path(dir, program, interface));
        let pin_error = |path: &Path, reason: String| DatapathError::PinLink {
            program,
            interface: interface.to_owned(),
            path: path.display().to_string(),
            reason,
        };
        if let Some(path) = &pin
            && let Some(old) = adoptable(path, interface)
        {
            let link =
                SchedClassifierLink::try_from(old).map_err(|e| pin_error(path, e.to_string()))?;
            let prog = self.program(program)?;
            let id = prog
                .attach_to_link(link)
                .map_err(program_error("replacing in place", program))?;
            let link = prog
                .take_link(id)
                .map_err(program_error("taking the link of", program))?;
            let link = FdLink::try_from(link).map_err(|e| pin_error(path, e.to_string()))?;
            info!("{program} on {interface}: replaced in place (pinned link updated)");
            return Ok(HookLink {
                _link: link,
                pin: pin.clone(),
            });
        }
        let prog = self.program(program)?;
        // Last on the hook: what was there before hgw has seen every packet, so only
        // programs attached later are ones a redirect would skip (`DEVICE_INGRESS`).
        let attached = if tcx() {
            prog.attach_with_options(
                interface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::last()),
            )
        } else {
            prog.attach(interface, TcAttachType::Ingress)
        };
        let id = attached.map_err(program_error("attaching", program))?;
        let link = prog
            .take_link(id)
            .map_err(program_error("taking the link of", program))?;
        let link = FdLink::try_from(link).map_err(|e| DatapathError::PinLink {
            program,
            interface: interface.to_owned(),
            path: String::new(),
            reason: e.to_string(),
        })?;
        let link = match &pin {
            Some(path) => {
                let _ = std::fs::remove_file(path);
                FdLink::from(link.pin(path).map_err(|e| pin_error(path, e.to_string()))?)
            }
            None => link,
        };
        Ok(HookLink { _link: link, pin })
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
    /// may have changed something too), every cached flow is stale: the programs
    /// look its next packet up again.
    fn next_generation(&mut self, result: Result<(), DatapathError>) -> Result<(), DatapathError> {
        self.generation_now = self.generation_now.wrapping_add(1);
        self.generation
            .set(0, self.generation_now, 0)
            .map_err(map_error("writing", MAP_GENERATION))?;
        result
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

/// tcx stacks programs: a second agent would run behind the first one and see nothing,
/// so an hgw program already on the hook means another agent is alive. Its links die
/// with it; we do not take them away from under it. Naming the programs on a hook
/// needs CAP_SYS_ADMIN (their info is read by id); without it, the agent lock
/// ([`crate::lock::AgentLock`], taken first) is what keeps a second agent out.
fn refuse_foreign_hgw(interface: &str, pins: Option<&Path>) -> Result<(), DatapathError> {
    let attached = match SchedClassifier::query_tcx(interface, TcAttachType::Ingress) {
        Ok((_, programs)) => programs,
        Err(ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EPERM) => {
            debug!(
                "{interface}: programs already on its ingress cannot be named without CAP_SYS_ADMIN ({}); the agent lock guards against a second agent",
                e.call
            );
            return Ok(());
        }
        // No tcx entry on this hook yet, or a kernel without tcx: nothing of ours is there.
        Err(_) => return Ok(()),
    };
    // Programs held by links pinned here are an earlier agent's, left to be adopted.
    let pinned: Vec<u32> = pins
        .into_iter()
        .flat_map(|dir| {
            [PROG_TO_PEER, PROG_TO_POD]
                .map(|program| pinned_program(&link_pin_path(dir, program, interface)))
        })
        .flatten()
        .collect();
    for info in attached {
        let name = info.name_as_str().unwrap_or_default();
        if (name == PROG_TO_PEER || name == PROG_TO_POD) && !pinned.contains(&info.id()) {
            return Err(DatapathError::AlreadyAttached {
                interface: interface.to_owned(),
                program: name.to_owned(),
                id: info.id(),
            });
        }
    }
    Ok(())
}

/// Whether the kernel attaches tc programs with tcx (6.6+), as aya decides in `attach`.
fn tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// Where the link of `program` on `interface` is pinned.
fn link_pin_path(dir: &Path, program: &str, interface: &str) -> PathBuf {
    dir.join("links").join(format!("{program}@{interface}"))
}

/// The program a pinned link holds, if the pin is there.
fn pinned_program(path: &Path) -> Option<u32> {
    pinned_tcx_link(path).map(|(program, _)| program)
}

/// The link pinned at `path` if it still holds a program on `interface` (a device made
/// again under the name has none of it: that pin is removed).
fn adoptable(path: &Path, interface: &str) -> Option<FdLink> {
    if !path.exists() {
        return None;
    }
    let ifindex =
        std::fs::read_to_string(Path::new("/sys/class/net").join(interface).join("ifindex"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
    let on_interface = pinned_tcx_link(path).is_some_and(|(_, on)| Some(on) == ifindex);
    if on_interface && let Ok(link) = PinnedLink::from_pin(path) {
        return Some(FdLink::from(link));
    }
    let _ = std::fs::remove_file(path);
    None
}

/// The program id and the interface of the tcx link pinned at `path`, from the link's
/// own info (`BPF_OBJ_GET_INFO_BY_FD` on a link this process opens needs no
/// CAP_SYS_ADMIN, unlike naming a hook's programs by id). A link whose device is gone
/// has interface 0.
fn pinned_tcx_link(path: &Path) -> Option<(u32, u32)> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_TYPE_TCX: u32 = 11;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    /// `struct bpf_link_info` up to its union (8-byte aligned), of which tcx uses the
    /// first two words: ifindex, attach_type.
    #[repr(C)]
    struct LinkInfo {
        kind: u32,
        id: u32,
        prog_id: u32,
        _pad: u32,
        union: [u32; 16],
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let get = ObjGet {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: `get` is a valid BPF_OBJ_GET attr whose path outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw const get,
            std::mem::size_of::<ObjGet>(),
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just gave us this fd; the OwnedFd closes it.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    let mut info = LinkInfo {
        kind: 0,
        id: 0,
        prog_id: 0,
        _pad: 0,
        union: [0; 16],
    };
    let attr = InfoByFd {
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: &raw mut info as u64,
    };
    // SAFETY: `attr` points at `info`, which is as long as `info_len` says.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw const attr,
            std::mem::size_of::<InfoByFd>(),
        )
    };
    (rc == 0 && info.kind == BPF_LINK_TYPE_TCX).then_some((info.prog_id, info.union[0]))
}

/// bpffs mounted where the pins go (mounted when missing: at /sys/fs/bpf for a path
/// under it, else on the directory itself), the directories made, and the pins of
/// links that cannot be adopted removed: interfaces that are gone, and the bridge-side
/// program on hooks this attach mode does not use.
fn prepare_pin_dir(dir: &Path, bridge: &str, attach: Attach) -> Result<(), DatapathError> {
    let error = |operation: &'static str| {
        move |source| DatapathError::PinDir {
            path: dir.display().to_string(),
            operation,
            source,
        }
    };
    let mount_point = if dir.starts_with(BPFFS_DEFAULT) {
        Path::new(BPFFS_DEFAULT)
    } else {
        dir
    };
    std::fs::create_dir_all(mount_point).map_err(error("creating"))?;
    if !on_bpffs(mount_point) {
        mount_bpffs(mount_point).map_err(error("mounting bpffs"))?;
        info!("mounted bpffs at {}", mount_point.display());
        crate::pin_owner::warn_if_private_mount(mount_point);
    }
    std::fs::create_dir_all(dir).map_err(error("creating"))?;
    // Before anything in it is trusted: interfaces' names and indexes repeat across
    // network namespaces.
    crate::pin_owner::claim(dir)?;
    for sub in ["maps", "links"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(error("creating"))?;
    }
    let links = std::fs::read_dir(dir.join("links")).map_err(error("listing"))?;
    for entry in links.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((program, interface)) = name.split_once('@') else {
            continue;
        };
        let exists = Path::new("/sys/class/net").join(interface).exists();
        let unused = program == PROG_TO_PEER
            && match attach {
                Attach::Ports => interface == bridge,
                Attach::Bridge => interface != bridge,
            };
        if !exists || unused {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// An earlier agent of this network namespace pinned its programs in another directory
/// (`pin_dir` changed without `uninstall`): they would sit first on the hooks and take
/// the traffic while this agent's counters stay at 0. Their pins go, and with them the
/// programs (no process holds them: the agent lock keeps a second agent out).
fn remove_earlier_pins(own: Option<&Path>) {
    for dir in crate::pin_owner::earlier_pin_dirs(own) {
        match remove_pins(&dir) {
            Ok(n) => warn!(
                "removed {n} pins an earlier agent of this network namespace left in {} (pin_dir changed without `hgw-agent uninstall`); its programs were first on the hooks",
                dir.display()
            ),
            Err(e) => warn!(
                "{}: an earlier agent's pins, whose programs sit first on the hooks, could not be removed: {e}; remove them with `hgw-agent uninstall --pin-dir {}`",
                dir.display(),
                dir.display()
            ),
        }
    }
}

/// Removes the link and map pins under `dir` and the directories, if they are there;
/// each pinned link is detached first. Returns how many pins went.
///
/// Unlinking a link's pin alone drops the link's last reference only after an RCU
/// grace period, so its program would stay on the hook for a moment: long enough for
/// the hook checks that follow (a new agent's, uninstall's) to see it.
pub fn remove_pins(dir: &Path) -> std::io::Result<usize> {
    let mut count = 0;
    for sub in ["links", "maps"] {
        let sub = dir.join(sub);
        let Ok(entries) = std::fs::read_dir(&sub) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            if sub.ends_with("links")
                && let Err(e) = detach_pinned_link(&path)
            {
                warn!("detaching the link pinned at {}: {e}", path.display());
            }
            std::fs::remove_file(path)?;
            count += 1;
        }
        std::fs::remove_dir(&sub)?;
    }
    if dir.exists() {
        crate::pin_owner::unmark(dir)?;
        std::fs::remove_dir(dir)?;
    }
    Ok(count)
}

/// Detaches the BPF link pinned at `path` at once (BPF_OBJ_GET, then BPF_LINK_DETACH:
/// no capability beyond access to the pin), leaving the pin.
fn detach_pinned_link(path: &Path) -> std::io::Result<()> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let c_path =
        std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // union bpf_attr, BPF_OBJ_GET: pathname (u64), bpf_fd, file_flags; zero-padded to
    // the size the kernel reads.
    let mut attr = [0u64; 16];
    attr[0] = c_path.as_ptr() as u64;
    // SAFETY: attr is a zeroed bpf_attr of 128 bytes holding a pointer to a
    // NUL-terminated path that outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, attr.as_mut_ptr(), 128u32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    let link = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut attr = [0u64; 16];
    attr[0] = u64::from(fd.unsigned_abs());
    // SAFETY: attr is a zeroed bpf_attr whose first u32 is link_detach.link_fd, an fd
    // open for the call (`link` closes it after).
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, attr.as_mut_ptr(), 128u32) };
    drop(link);
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

const BPFFS_DEFAULT: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn on_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut stat) == 0 && stat.f_type as i64 == BPF_FS_MAGIC
    }
}

fn mount_bpffs(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path =
        std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"bpffs".as_ptr(),
            c_path.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
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
