//! CIDR arithmetic the config, the sources and the desired state share: whether two
//! prefixes overlap, and a set of disjoint prefixes that finds the one a new prefix
//! overlaps in one lookup (thousands of peers are checked against each other).

use std::collections::BTreeMap;

use ipnet::IpNet;

/// Whether `a` and `b` share an address (one contains the other's network).
pub fn overlaps(a: IpNet, b: IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Accepted prefixes, disjoint, each with what claimed it, as address ranges (start ->
/// (end, prefix, owner), per family).
#[derive(Debug, Clone)]
pub struct Taken<T> {
    ranges: [BTreeMap<u128, (u128, IpNet, T)>; 2],
}

impl<T> Default for Taken<T> {
    fn default() -> Self {
        Self {
            ranges: [BTreeMap::new(), BTreeMap::new()],
        }
    }
}

impl<T> Taken<T> {
    fn span(net: IpNet) -> (usize, u128, u128) {
        match net.trunc() {
            IpNet::V4(v4) => (
                0,
                u32::from(v4.network()).into(),
                u32::from(v4.broadcast()).into(),
            ),
            IpNet::V6(v6) => (1, v6.network().into(), v6.broadcast().into()),
        }
    }

    /// The accepted prefix `net` overlaps, if any, and its owner: the ranges are
    /// disjoint, so only the last one starting at or before `net`'s end can reach
    /// into it.
    pub fn find(&self, net: IpNet) -> Option<(IpNet, &T)> {
        let (family, start, end) = Self::span(net);
        self.ranges[family]
            .range(..=end)
            .next_back()
            .filter(|(_, (last, ..))| *last >= start)
            .map(|(_, (_, net, owner))| (*net, owner))
    }

    /// Gives `net` back (it was accepted as it is).
    pub fn remove(&mut self, net: IpNet) {
        let (family, start, _) = Self::span(net);
        self.ranges[family].remove(&start);
    }

    /// Accepts `net` for `owner`; the caller has checked it overlaps nothing taken.
    pub fn insert(&mut self, net: IpNet, owner: T) {
        let (family, start, end) = Self::span(net);
        self.ranges[family].insert(start, (end, net.trunc(), owner));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_prefix_a_new_one_overlaps() {
        let net = |s: &str| s.parse::<IpNet>().expect("cidr");
        let mut taken = Taken::default();
        taken.insert(net("10.244.2.0/24"), 0);
        taken.insert(net("10.244.8.0/22"), 1);
        taken.insert(net("fd00:244:2::/64"), 0);
        for (cidr, found) in [
            ("10.244.2.0/24", Some(("10.244.2.0/24", 0))),
            ("10.244.2.128/25", Some(("10.244.2.0/24", 0))),
            ("10.244.0.0/16", Some(("10.244.8.0/22", 1))),
            ("10.244.9.0/24", Some(("10.244.8.0/22", 1))),
            ("10.244.3.0/24", None),
            ("10.244.12.0/22", None),
            ("fd00:244:2:0:8000::/65", Some(("fd00:244:2::/64", 0))),
            ("fd00:244::/32", Some(("fd00:244:2::/64", 0))),
            ("fd00:244:3::/64", None),
        ] {
            assert_eq!(
                taken.find(net(cidr)).map(|(n, &i)| (n, i)),
                found.map(|(n, i)| (net(n), i)),
                "{cidr}"
            );
        }
        taken.remove(net("10.244.8.0/22"));
        assert!(taken.find(net("10.244.9.0/24")).is_none());
        assert!(overlaps(net("10.0.0.0/8"), net("10.1.0.0/16")));
        assert!(!overlaps(net("10.0.0.0/16"), net("10.1.0.0/16")));
    }
}
