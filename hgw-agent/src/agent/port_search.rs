//! When to dump the bridges' forwarding tables for pods whose port is not known. A
//! pod's forwarding entry learned before its neighbour entry appeared was not taken
//! from its event (the MAC was no pod's yet), so a dump finds it; one that is not there
//! yet comes with an event once the bridge learns it. So a pod is looked for a few times
//! after its neighbour entry appears or changes, with backoff, and then left: a stale
//! entry of a deleted pod (kept below gc_thresh1) or entries a pod adds cost a few dumps
//! each, never a dump every second forever.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

/// Dumps per pod before it is left to the forwarding events.
const DUMPS: u32 = 5;
/// The wait before the second dump; it doubles after each (1, 2, 4, 8 s).
const FIRST_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct PortSearch {
    /// Pods without a known port: IP -> the search for its MAC.
    waiting: HashMap<IpAddr, Search>,
}

#[derive(Debug, Clone, Copy)]
struct Search {
    mac: [u8; 6],
    dumps: u32,
    next: Instant,
}

impl PortSearch {
    /// Takes the pods whose port is not known now (a pod not among them is forgotten,
    /// one with a new MAC starts again); says when a dump is wanted for them, if ever.
    pub fn update(
        &mut self,
        missing: impl IntoIterator<Item = (IpAddr, [u8; 6])>,
        now: Instant,
    ) -> Option<Instant> {
        let mut waiting = HashMap::new();
        for (ip, mac) in missing {
            let search = match self.waiting.remove(&ip) {
                Some(search) if search.mac == mac => search,
                _ => Search {
                    mac,
                    dumps: 0,
                    next: now,
                },
            };
            waiting.insert(ip, search);
        }
        self.waiting = waiting;
        self.due()
    }

    /// When the next dump is wanted, if one is.
    pub fn due(&self) -> Option<Instant> {
        self.waiting
            .values()
            .filter(|s| s.dumps < DUMPS)
            .map(|s| s.next)
            .min()
    }

    /// A dump ran at `now`: each pod that was due has been looked for once more.
    pub fn dumped(&mut self, now: Instant) {
        for search in self.waiting.values_mut() {
            if search.dumps < DUMPS && search.next <= now {
                search.next = now + FIRST_WAIT * 2u32.pow(search.dumps);
                search.dumps += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 244, 1, 200));
    const MAC: [u8; 6] = [2, 0xf3, 0, 0, 0, 1];

    /// Runs dumps whenever one is due, for `span`; the offsets of the dumps.
    fn dumps_over(search: &mut PortSearch, start: Instant, span: Duration) -> Vec<Duration> {
        let mut at = Vec::new();
        let mut now = start;
        while let Some(due) = search.update([(IP, MAC)], now)
            && due <= start + span
        {
            now = due;
            search.dumped(now);
            at.push(now - start);
        }
        at
    }

    #[test]
    fn a_pod_that_never_gets_a_port_costs_five_dumps() {
        let mut search = PortSearch::default();
        let start = Instant::now();
        let secs = |s| Duration::from_secs(s);
        assert_eq!(
            dumps_over(&mut search, start, Duration::from_secs(3600)),
            [secs(0), secs(1), secs(3), secs(7), secs(15)]
        );
        assert_eq!(search.update([(IP, MAC)], start + secs(3600)), None);
    }

    #[test]
    fn a_new_mac_or_a_new_entry_is_looked_for_again() {
        let mut search = PortSearch::default();
        let start = Instant::now();
        dumps_over(&mut search, start, Duration::from_secs(3600));
        let later = start + Duration::from_secs(3600);
        assert_eq!(
            search.update([(IP, [2, 0xf3, 0, 0, 0, 2])], later),
            Some(later)
        );

        // Gone (it got its port, or its entry went), then back: a search of its own.
        dumps_over(&mut search, later, Duration::from_secs(3600));
        assert_eq!(search.update([], later), None);
        assert_eq!(search.update([(IP, MAC)], later), Some(later));
    }

    #[test]
    fn a_pod_waits_only_for_its_own_backoff() {
        let mut search = PortSearch::default();
        let start = Instant::now();
        let other: IpAddr = "10.244.1.201".parse().expect("ip");
        assert_eq!(search.update([(IP, MAC)], start), Some(start));
        search.dumped(start);
        // A second pod appears half a second later: due at once, the first is not.
        let half = start + Duration::from_millis(500);
        assert_eq!(search.update([(IP, MAC), (other, MAC)], half), Some(half));
        search.dumped(half);
        assert_eq!(
            search.update([(IP, MAC), (other, MAC)], half),
            Some(start + Duration::from_secs(1))
        );
    }
}
