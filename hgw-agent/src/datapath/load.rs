//! Loading the programs: the object's maps (pinned ones reused, or rebuilt when their
//! layout changed), the node config, the programs' ids, then the first attach.

use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
};

use aya::{
    Ebpf,
    maps::{Array, MapData, MapError},
};
use hgw_common::{
    MAP_CONFIG, MAP_COUNTERS, MAP_DEVICES, MAP_ENDPOINTS_V4, MAP_ENDPOINTS_V6, MAP_GENERATION,
    MAP_ROUTES_V4, MAP_ROUTES_V6, NodeConfig, PROG_TO_PEER, PROG_TO_POD,
    loader::{self, KernelFacts, PinnedMap},
};
use log::{info, warn};

use super::{
    Datapath, DatapathError, HookKind, PROGRAMS, leftovers, maps::map_error, pins, program_error,
};
use crate::config::Attach;

impl Datapath {
    /// Loads the programs for the kernel `facts` describe (with conntrack lookups in
    /// `established` mode) and writes the node config, for hooks of the `hook` kind;
    /// attaches nothing yet ([`Datapath::attach_node`], [`Datapath::attach_port`]), but
    /// takes off what earlier agents left on hooks `attach` does not use.
    pub fn load(
        bridge: &str,
        uplink: &str,
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
            leftovers::refuse_foreign_hgw(interface, pins)?;
        }
        // Whichever way this agent attaches: an earlier agent's filter on a hook this
        // one leaves alone would go on forwarding with that agent's maps.
        let n = leftovers::remove_unused_filters(bridge, uplink, attach);
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
            added_qdiscs: BTreeSet::new(),
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
        Ok(datapath)
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
