//! The fast path's packet counters: per-CPU slots summed, read by the agent's loop or,
//! through a second fd, by status and metrics without waiting for it.

use aya::maps::{MapData, PerCpuArray};
use hgw_common::{COUNTER_NOT_IP, Counter, Family, MAP_COUNTERS, counter_index};

use super::{Datapath, DatapathError, maps::map_error};

impl Datapath {
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
