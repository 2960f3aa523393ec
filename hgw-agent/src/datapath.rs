//! The eBPF fast path: loads hgw's programs, attaches them with tcx (the links belong to
//! this process, so the kernel detaches them when the agent exits, however it exits),
//! and owns the maps.

use aya::{
    Ebpf,
    maps::{Array, LpmTrie, MapData, MapError, PerCpuArray, lpm_trie::Key},
    programs::{ProgramError, SchedClassifier, TcAttachType, tc::SchedClassifierLinkId},
};
use hgw_common::{
    COUNTER_NOT_IP, Counter, Endpoint, Family, MAP_CONFIG, MAP_COUNTERS, MAP_ENDPOINTS_V4,
    MAP_ENDPOINTS_V6, MAP_ROUTES_V4, MAP_ROUTES_V6, NextHop, NodeConfig, PROG_TO_PEER, PROG_TO_POD,
    counter_index,
};
use std::{collections::HashMap, net::IpAddr};

use ipnet::IpNet;
use log::{debug, warn};

use hgw_common::loader::{self, LoaderError};

use crate::config::Attach;

/// The programs, built by build.rs from hgw-ebpf.
pub static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hgw"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(transparent)]
    Load(#[from] LoaderError),
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
        "interface {interface} already runs hgw program {program} (id {id}): another hgw agent is running in this network namespace; stop it first"
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
    /// Bridge ports `hgw_to_peer` is attached to (Attach::Ports).
    ports: HashMap<u32, SchedClassifierLinkId>,
    attach: Attach,
    /// The ifindex of the uplink `hgw_to_pod` is attached to.
    uplink: Option<u32>,
    /// With Attach::Bridge, the ifindex of the bridge `hgw_to_peer` is attached to.
    bridge: Option<u32>,
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
    ) -> Result<Self, DatapathError> {
        for interface in [bridge, uplink] {
            refuse_foreign_hgw(interface)?;
        }
        let mut ebpf = loader::load(PROGRAMS, conntrack)?;
        if let Err(e) = aya_log::EbpfLogger::init(&mut ebpf).map(spawn_log_drain) {
            warn!("eBPF logs will not be shown: {e}");
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
        let mut datapath = Self {
            ebpf,
            config,
            routes_v4,
            routes_v6,
            counters,
            counters_fd,
            endpoints_v4,
            endpoints_v6,
            ports: HashMap::new(),
            attach,
            uplink: None,
            bridge: None,
        };
        datapath.set_config(node)?;
        for program in [PROG_TO_PEER, PROG_TO_POD] {
            datapath
                .program(program)?
                .load()
                .map_err(program_error("loading", program))?;
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
        if self.uplink != Some(uplink_ifindex) {
            self.program(PROG_TO_POD)?
                .attach(uplink, TcAttachType::Ingress)
                .map_err(program_error("attaching", PROG_TO_POD))?;
            self.uplink = Some(uplink_ifindex);
        }
        if self.attach == Attach::Bridge && self.bridge != Some(bridge_ifindex) {
            self.program(PROG_TO_PEER)?
                .attach(bridge, TcAttachType::Ingress)
                .map_err(program_error("attaching", PROG_TO_PEER))?;
            self.bridge = Some(bridge_ifindex);
        }
        Ok(())
    }

    /// Attaches `hgw_to_peer` to a bridge port's ingress (a pod's host-side veth), so
    /// pod traffic is forwarded before the bridge runs. Idempotent.
    pub fn attach_port(&mut self, name: &str, ifindex: u32) -> Result<(), DatapathError> {
        if self.ports.contains_key(&ifindex) {
            return Ok(());
        }
        refuse_foreign_hgw(name)?;
        let link = self
            .program(PROG_TO_PEER)?
            .attach(name, TcAttachType::Ingress)
            .map_err(program_error("attaching", PROG_TO_PEER))?;
        self.ports.insert(ifindex, link);
        Ok(())
    }

    /// Forgets a port that left the bridge or is gone (its tcx link dies with it).
    pub fn detach_port(&mut self, ifindex: u32) {
        if let Some(link) = self.ports.remove(&ifindex)
            && let Ok(prog) = self.program(PROG_TO_PEER)
        {
            // Fails when the device is already gone, which detached it anyway.
            let _ = prog.detach(link);
        }
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
        self.config
            .set(0, node, 0)
            .map_err(map_error("writing", MAP_CONFIG))
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
        result.map_err(map_error("updating", map))
    }

    pub fn remove_endpoint(&mut self, ip: IpAddr) -> Result<(), DatapathError> {
        let (result, map) = match ip {
            IpAddr::V4(ip) => (self.endpoints_v4.remove(&ip.octets()), MAP_ENDPOINTS_V4),
            IpAddr::V6(ip) => (self.endpoints_v6.remove(&ip.octets()), MAP_ENDPOINTS_V6),
        };
        absent_is_fine(result).map_err(map_error("deleting from", map))
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
        result.map_err(map_error("updating", map))
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
        absent_is_fine(result).map_err(map_error("deleting from", map))
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
/// ([`crate::status::AgentLock`], taken first) is what keeps a second agent out.
fn refuse_foreign_hgw(interface: &str) -> Result<(), DatapathError> {
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
    for info in attached {
        let name = info.name_as_str().unwrap_or_default();
        if name == PROG_TO_PEER || name == PROG_TO_POD {
            return Err(DatapathError::AlreadyAttached {
                interface: interface.to_owned(),
                program: name.to_owned(),
                id: info.id(),
            });
        }
    }
    Ok(())
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
