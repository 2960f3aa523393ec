//! nftables' hooks on the interfaces hgw redirects from or past, which a redirect at tc
//! ingress skips: base chains of the `netdev` family on an interface's `ingress` (run
//! after tc ingress) or `egress` (the kernel marks a packet `nf_skip_egress` while tc
//! ingress runs, so a redirect into the interface skips it), `inet` chains on `ingress`,
//! flowtables (whose hook is their interfaces' ingress), and `bridge` family chains,
//! which every bridge runs for frames it takes in (`prerouting`, `input`) and sends out
//! (`output`, `postrouting`). Read over NETLINK_NETFILTER (netlink-packet-route does not
//! speak it), only where nf_tables is there: asking would load it.

use std::path::Path;

use rtnetlink::packet_core::{NLA_HEADER_SIZE, NlasIterator};

use super::netlink;

const NETLINK_NETFILTER: isize = 12;
/// `NFNL_SUBSYS_NFTABLES << 8`: the message types below are nf_tables'.
const NFTABLES: u16 = 10 << 8;
const NFT_MSG_NEWCHAIN: u16 = NFTABLES | 3;
const NFT_MSG_GETCHAIN: u16 = NFTABLES | 4;
const NFT_MSG_NEWGEN: u16 = NFTABLES | 15;
const NFT_MSG_GETGEN: u16 = NFTABLES | 16;
const NFT_MSG_NEWFLOWTABLE: u16 = NFTABLES | 22;
const NFT_MSG_GETFLOWTABLE: u16 = NFTABLES | 23;
const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_INET: u8 = 1;
const NFPROTO_NETDEV: u8 = 5;
const NFPROTO_BRIDGE: u8 = 7;
/// `enum nft_chain_attributes`.
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
/// `enum nft_hook_attributes`.
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_DEV: u16 = 3;
const NFTA_HOOK_DEVS: u16 = 4;
/// `enum nft_devices_attributes`: a name, or (Linux 6.17) a prefix every interface
/// whose name starts with it matches. (6.16 sent a prefix as a name without its NUL.)
const NFTA_DEVICE_NAME: u16 = 1;
const NFTA_DEVICE_PREFIX: u16 = 2;
/// `enum nft_flowtable_attributes` and `nft_flowtable_hook_attributes`.
const NFTA_FLOWTABLE_TABLE: u16 = 1;
const NFTA_FLOWTABLE_NAME: u16 = 2;
const NFTA_FLOWTABLE_HOOK: u16 = 3;
const NFTA_FLOWTABLE_HOOK_DEVS: u16 = 3;
const NFTA_GEN_ID: u16 = 1;
/// `NF_NETDEV_INGRESS`, `NF_NETDEV_EGRESS`, `NF_INET_INGRESS`.
const NETDEV_INGRESS: u32 = 0;
const NETDEV_EGRESS: u32 = 1;
const INET_INGRESS: u32 = 5;
/// `NF_BR_PRE_ROUTING`, `NF_BR_LOCAL_IN`, `NF_BR_LOCAL_OUT`, `NF_BR_POST_ROUTING`.
const BR_PRE_ROUTING: u32 = 0;
const BR_LOCAL_IN: u32 = 1;
const BR_LOCAL_OUT: u32 = 3;
const BR_POST_ROUTING: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum NftablesError {
    #[error("opening a NETLINK_NETFILTER socket to read the nftables hooks: {0}")]
    Socket(#[source] std::io::Error),
    #[error("asking the kernel for its nftables {what}: {source}")]
    Request {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Where on an interface's way a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    /// The netdev ingress hook, after tc ingress.
    Ingress,
    /// The netdev egress hook, before tc egress; a redirect from tc ingress skips it.
    Egress,
    /// A bridge's `prerouting` or `input`: frames from its ports, before the bridge's
    /// own ingress.
    BridgeIn,
    /// A bridge's `output` or `postrouting`: what the bridge device sends to a port.
    BridgeOut,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
            Hook::BridgeIn => "bridge prerouting/input",
            Hook::BridgeOut => "bridge output/postrouting",
        }
    }
}

/// Which interfaces a hook is on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Devices {
    Name(String),
    Prefix(String),
    /// Every bridge (the `bridge` family's chains).
    Bridges,
    /// Every interface: the hooks could not be read.
    Any,
}

/// One chain's or flowtable's hook.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NetfilterHook {
    pub hook: Hook,
    pub devices: Devices,
    /// As `nft list` names it: `chain netdev t c`, `flowtable inet t f`.
    pub owner: String,
}

impl NetfilterHook {
    /// Whether the hook is on `interface` (`bridge`: the interface is a bridge).
    pub fn covers(&self, interface: &str, bridge: bool) -> bool {
        match &self.devices {
            Devices::Name(name) => name == interface,
            Devices::Prefix(prefix) => interface.starts_with(prefix.as_str()),
            Devices::Bridges => bridge,
            Devices::Any => true,
        }
    }
}

/// What stands for the hooks while they cannot be read (`why`): a chain on every
/// interface's ingress and egress, so that the fast path leaves everything it would
/// send past one to the kernel.
pub fn unknown(why: &str) -> Vec<NetfilterHook> {
    [Hook::Ingress, Hook::Egress]
        .into_iter()
        .map(|hook| NetfilterHook {
            hook,
            devices: Devices::Any,
            owner: format!("unknown ({why})"),
        })
        .collect()
}

/// The nftables hooks of this network namespace, read again when the ruleset's
/// generation moves.
#[derive(Debug, Default)]
pub struct Watch {
    /// The generation last read whole; `None`: never, or nf_tables not there.
    generation: Option<u32>,
}

impl Watch {
    /// The hooks, if the ruleset changed since the last read (`force`, or a failed
    /// last read: read them anyway); `Ok(None)`: unchanged. Without nf_tables there
    /// are none.
    pub fn changed(&mut self, force: bool) -> Result<Option<Vec<NetfilterHook>>, NftablesError> {
        let last = self.generation.take();
        if !nf_tables_present() {
            return Ok(Some(Vec::new()).filter(|_| force || last.is_some()));
        }
        let socket = netlink::open(NETLINK_NETFILTER).map_err(NftablesError::Socket)?;
        let generation = generation(&socket)?;
        if !force && last == Some(generation) {
            self.generation = last;
            return Ok(None);
        }
        let hooks = hooks(&socket)?;
        // What was read is at least this generation's; a change meanwhile reads again.
        self.generation = Some(generation);
        Ok(Some(hooks))
    }
}

/// Whether asking cannot load nf_tables: it is loaded (its module directory in sysfs),
/// built in (listed in modules.builtin), or the kernel loads no modules at all. Without
/// it no chain exists, and a node that does not use nftables must not get it from hgw.
/// Where modules.builtin cannot be read (an agent in a container without the host's
/// /lib/modules), nfnetlink's kernel socket in /proc/net/netlink says nf_tables may be
/// built in: then ask, rather than miss its chains.
fn nf_tables_present() -> bool {
    if Path::new("/sys/module/nf_tables").exists() || !Path::new("/proc/modules").exists() {
        return true;
    }
    let builtin = std::fs::read_to_string("/proc/sys/kernel/osrelease").and_then(|release| {
        std::fs::read_to_string(format!("/lib/modules/{}/modules.builtin", release.trim()))
    });
    match builtin {
        Ok(builtin) => builtin.lines().any(|l| l.ends_with("/nf_tables.ko")),
        Err(_) => netlink::kernel_socket_listed(NETLINK_NETFILTER),
    }
}

/// `struct nfgenmsg` for `family`, version 0, resource 0.
fn nfgenmsg(family: u8) -> [u8; 4] {
    [family, 0, 0, 0]
}

fn request(
    socket: &rtnetlink::sys::Socket,
    kind: u16,
    family: u8,
    what: &'static str,
) -> Result<Vec<(u16, Vec<u8>)>, NftablesError> {
    let dump = kind != NFT_MSG_GETGEN;
    netlink::request(socket, kind, dump, &nfgenmsg(family))
        .map_err(|source| NftablesError::Request { what, source })
}

fn generation(socket: &rtnetlink::sys::Socket) -> Result<u32, NftablesError> {
    let answer = request(socket, NFT_MSG_GETGEN, NFPROTO_UNSPEC, "ruleset generation")?;
    answer
        .iter()
        .filter(|(kind, _)| *kind == NFT_MSG_NEWGEN)
        .find_map(|(_, payload)| {
            attributes(payload.get(4..)?)
                .find(|(kind, _)| *kind == NFTA_GEN_ID)
                .and_then(|(_, value)| be_u32(value))
        })
        .ok_or_else(|| NftablesError::Request {
            what: "ruleset generation",
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "no generation id"),
        })
}

/// Every hook of the kinds above: chains of the families that have such hooks (a dump
/// each, so that the `ip` and `ip6` tables of kube-proxy are not read), flowtables of
/// every family.
fn hooks(socket: &rtnetlink::sys::Socket) -> Result<Vec<NetfilterHook>, NftablesError> {
    let mut hooks = Vec::new();
    for family in [NFPROTO_NETDEV, NFPROTO_INET, NFPROTO_BRIDGE] {
        for (kind, payload) in request(socket, NFT_MSG_GETCHAIN, family, "chains")? {
            if kind == NFT_MSG_NEWCHAIN {
                hooks.extend(chain_hooks(&payload));
            }
        }
    }
    for (kind, payload) in request(socket, NFT_MSG_GETFLOWTABLE, NFPROTO_UNSPEC, "flowtables")? {
        if kind == NFT_MSG_NEWFLOWTABLE {
            hooks.extend(flowtable_hooks(&payload));
        }
    }
    hooks.sort();
    hooks.dedup();
    Ok(hooks)
}

/// A chain message's hooks on interfaces: one per device of a base chain on one of the
/// hooks above, none for a regular chain or another hook.
fn chain_hooks(payload: &[u8]) -> Vec<NetfilterHook> {
    let Some((&family, rest)) = payload.split_first() else {
        return Vec::new();
    };
    let Some(body) = rest.get(3..) else {
        return Vec::new();
    };
    let (mut table, mut name, mut hook) = (String::new(), String::new(), None);
    for (kind, value) in attributes(body) {
        match kind {
            NFTA_CHAIN_TABLE => table = string(value),
            NFTA_CHAIN_NAME => name = string(value),
            NFTA_CHAIN_HOOK => hook = Some(value),
            _ => {}
        }
    }
    let Some(hook) = hook else { return Vec::new() };
    let mut number = None;
    let mut devices = Vec::new();
    for (kind, value) in attributes(hook) {
        match kind {
            NFTA_HOOK_HOOKNUM => number = be_u32(value),
            NFTA_HOOK_DEV => devices.push(device(value)),
            NFTA_HOOK_DEVS => devices.extend(device_list(value)),
            _ => {}
        }
    }
    let hook = match (family, number) {
        (NFPROTO_NETDEV, Some(NETDEV_INGRESS)) | (NFPROTO_INET, Some(INET_INGRESS)) => {
            Hook::Ingress
        }
        (NFPROTO_NETDEV, Some(NETDEV_EGRESS)) => Hook::Egress,
        // A netdev hook of a later kernel: on the interface's way in, as far as known.
        (NFPROTO_NETDEV, Some(_)) => Hook::Ingress,
        (NFPROTO_BRIDGE, Some(BR_PRE_ROUTING | BR_LOCAL_IN)) => Hook::BridgeIn,
        (NFPROTO_BRIDGE, Some(BR_LOCAL_OUT | BR_POST_ROUTING)) => Hook::BridgeOut,
        _ => return Vec::new(),
    };
    if family == NFPROTO_BRIDGE {
        devices = vec![Devices::Bridges];
    }
    let owner = format!("chain {} {table} {name}", family_name(family));
    devices.sort();
    devices.dedup();
    devices
        .into_iter()
        .map(|devices| NetfilterHook {
            hook,
            devices,
            owner: owner.clone(),
        })
        .collect()
}

/// A flowtable message's hooks: its devices' ingress.
fn flowtable_hooks(payload: &[u8]) -> Vec<NetfilterHook> {
    let Some((&family, rest)) = payload.split_first() else {
        return Vec::new();
    };
    let Some(body) = rest.get(3..) else {
        return Vec::new();
    };
    let (mut table, mut name, mut devices) = (String::new(), String::new(), Vec::new());
    for (kind, value) in attributes(body) {
        match kind {
            NFTA_FLOWTABLE_TABLE => table = string(value),
            NFTA_FLOWTABLE_NAME => name = string(value),
            NFTA_FLOWTABLE_HOOK => {
                for (kind, value) in attributes(value) {
                    if kind == NFTA_FLOWTABLE_HOOK_DEVS {
                        devices.extend(device_list(value));
                    }
                }
            }
            _ => {}
        }
    }
    let owner = format!("flowtable {} {table} {name}", family_name(family));
    devices
        .into_iter()
        .map(|devices| NetfilterHook {
            hook: Hook::Ingress,
            devices,
            owner: owner.clone(),
        })
        .collect()
}

/// A nest of `NFTA_DEVICE_NAME` and `NFTA_DEVICE_PREFIX`.
fn device_list(nest: &[u8]) -> impl Iterator<Item = Devices> + '_ {
    attributes(nest).filter_map(|(kind, value)| match kind {
        NFTA_DEVICE_NAME => Some(device(value)),
        NFTA_DEVICE_PREFIX => Some(Devices::Prefix(string(value))),
        _ => None,
    })
}

/// A device name attribute: a string with its NUL, or (Linux 6.16's wildcards, `veth*`
/// in nft) a prefix without one.
fn device(value: &[u8]) -> Devices {
    if value.last() == Some(&0) {
        Devices::Name(string(value))
    } else {
        Devices::Prefix(string(value))
    }
}

fn family_name(family: u8) -> &'static str {
    match family {
        NFPROTO_INET => "inet",
        2 => "ip",
        3 => "arp",
        NFPROTO_NETDEV => "netdev",
        NFPROTO_BRIDGE => "bridge",
        10 => "ip6",
        _ => "?",
    }
}

/// The netlink attributes in `buffer` (netlink-packet-core's iterator): (type without
/// the nested and byte-order bits, value). Stops at the first one that does not fit.
fn attributes(buffer: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    NlasIterator::new(buffer).map_while(Result::ok).map(|nla| {
        let (kind, len) = (nla.kind(), nla.value_length());
        let whole: &[u8] = nla.into_inner();
        (kind, &whole[NLA_HEADER_SIZE..NLA_HEADER_SIZE + len])
    })
}

/// A string attribute without its terminating NULs.
fn string(value: &[u8]) -> String {
    let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end]).into_owned()
}

fn be_u32(value: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(value.get(..4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One attribute, padded.
    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&u16::try_from(4 + value.len()).expect("short").to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value);
        a.resize(a.len().next_multiple_of(4), 0);
        a
    }

    fn nul(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    /// A NEWCHAIN payload: family, table, name, and a hook (number, devices).
    fn chain(family: u8, hook: Option<(u32, Vec<Vec<u8>>)>) -> Vec<u8> {
        let mut p = nfgenmsg(family).to_vec();
        p.extend(attr(NFTA_CHAIN_TABLE, &nul("t")));
        p.extend(attr(NFTA_CHAIN_NAME, &nul("c")));
        if let Some((number, devices)) = hook {
            let mut nest = attr(NFTA_HOOK_HOOKNUM, &number.to_be_bytes());
            nest.extend(attr(NFTA_HOOK_DEVS, &devices.concat()));
            p.extend(attr(NFTA_CHAIN_HOOK | 0x8000, &nest));
        }
        p
    }

    #[test]
    fn netdev_chains_give_a_hook_per_device() {
        let names = vec![
            attr(NFTA_DEVICE_NAME, &nul("eth0")),
            attr(NFTA_DEVICE_NAME, &nul("cni0")),
            attr(NFTA_DEVICE_PREFIX, &nul("veth")),
        ];
        let hooks = chain_hooks(&chain(NFPROTO_NETDEV, Some((NETDEV_EGRESS, names))));
        assert_eq!(hooks.len(), 3);
        assert!(hooks.iter().all(|h| h.hook == Hook::Egress));
        assert!(hooks.iter().all(|h| h.owner == "chain netdev t c"));
        let on = |name: &str| hooks.iter().any(|h| h.covers(name, false));
        assert!(on("eth0") && on("cni0") && on("veth1234") && !on("eth1"));
        // Linux 6.16's wildcard: a name without its NUL.
        let wildcard = chain_hooks(&chain(
            NFPROTO_NETDEV,
            Some((NETDEV_INGRESS, vec![attr(NFTA_DEVICE_NAME, b"veth")])),
        ));
        assert_eq!(wildcard[0].devices, Devices::Prefix("veth".into()));
        let ingress = chain_hooks(&chain(
            NFPROTO_NETDEV,
            Some((NETDEV_INGRESS, vec![attr(NFTA_DEVICE_NAME, &nul("eth0"))])),
        ));
        assert_eq!(ingress[0].hook, Hook::Ingress);
        assert_eq!(ingress[0].devices, Devices::Name("eth0".into()));
    }

    #[test]
    fn inet_ingress_and_bridge_chains_count_other_hooks_do_not() {
        let eth0 = || vec![attr(NFTA_DEVICE_NAME, &nul("eth0"))];
        let inet = chain_hooks(&chain(NFPROTO_INET, Some((INET_INGRESS, eth0()))));
        assert_eq!(inet[0].hook, Hook::Ingress);
        assert_eq!(inet[0].owner, "chain inet t c");
        // An inet forward chain (hook 2), a regular chain: not on an interface.
        assert!(chain_hooks(&chain(NFPROTO_INET, Some((2, Vec::new())))).is_empty());
        assert!(chain_hooks(&chain(NFPROTO_NETDEV, None)).is_empty());
        for (number, hook) in [
            (BR_PRE_ROUTING, Hook::BridgeIn),
            (BR_LOCAL_IN, Hook::BridgeIn),
            (BR_LOCAL_OUT, Hook::BridgeOut),
            (BR_POST_ROUTING, Hook::BridgeOut),
        ] {
            let bridge = chain_hooks(&chain(NFPROTO_BRIDGE, Some((number, Vec::new()))));
            assert_eq!(bridge.len(), 1, "bridge hook {number}");
            assert_eq!(bridge[0].hook, hook);
            assert!(bridge[0].covers("cni0", true) && !bridge[0].covers("eth0", false));
        }
        // A netdev hook number this code does not know: taken as ingress.
        let later = chain_hooks(&chain(NFPROTO_NETDEV, Some((7, eth0()))));
        assert_eq!(later[0].hook, Hook::Ingress);
        // The bridge family's forward hook: frames between two ports, not hgw's way.
        assert!(chain_hooks(&chain(NFPROTO_BRIDGE, Some((2, Vec::new())))).is_empty());
        // Truncated: nothing.
        assert!(chain_hooks(&[NFPROTO_NETDEV]).is_empty());
    }

    #[test]
    fn flowtables_hook_their_devices_ingress() {
        let mut p = nfgenmsg(NFPROTO_INET).to_vec();
        p.extend(attr(NFTA_FLOWTABLE_TABLE, &nul("filter")));
        p.extend(attr(NFTA_FLOWTABLE_NAME, &nul("ft")));
        let devs = [
            attr(NFTA_DEVICE_NAME, &nul("eth0")),
            attr(NFTA_DEVICE_NAME, &nul("cni0")),
        ]
        .concat();
        let mut nest = attr(1, &0u32.to_be_bytes());
        nest.extend(attr(NFTA_FLOWTABLE_HOOK_DEVS | 0x8000, &devs));
        p.extend(attr(NFTA_FLOWTABLE_HOOK | 0x8000, &nest));
        let hooks = flowtable_hooks(&p);
        assert_eq!(hooks.len(), 2);
        assert!(hooks.iter().all(|h| h.hook == Hook::Ingress));
        assert_eq!(hooks[1].owner, "flowtable inet filter ft");
        assert!(hooks[1].covers("cni0", true));
    }
}
