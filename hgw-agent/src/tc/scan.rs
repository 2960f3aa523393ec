//! Reading the hooks from the kernel: `BPF_PROG_QUERY` for tcx, rtnetlink dumps of
//! qdiscs and filters, and program names (when the agent may read them).

use std::collections::{BTreeSet, HashMap};

use futures::TryStreamExt as _;
use hgw_common::sys;
use log::warn;
use rtnetlink::packet_route::tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption};

use super::{Filter, Hooks, PARENT_EGRESS, PARENT_INGRESS};

/// `TC_H_ROOT`: the parent of an interface's root qdisc.
const PARENT_ROOT: u32 = 0xFFFF_FFFF;
/// `TC_H_INGRESS`: the parent of an `ingress` or `clsact` qdisc.
const PARENT_CLSACT: u32 = 0xFFFF_FFF1;

#[derive(Debug, thiserror::Error)]
pub enum TcError {
    #[error("querying the tcx {hook} programs of interface {ifindex}: {source}")]
    Tcx {
        hook: &'static str,
        ifindex: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("{operation} (interface {ifindex}): {source}")]
    Netlink {
        operation: &'static str,
        ifindex: u32,
        #[source]
        source: rtnetlink::Error,
    },
}

/// The ids of the programs on an interface's tcx hook, in the order they run
/// (`BPF_PROG_QUERY`; aya's `query_tcx` also opens each program by id, which needs
/// CAP_SYS_ADMIN). A kernel without tcx has none.
pub fn tcx_programs(ifindex: u32, egress: bool) -> Result<Vec<u32>, TcError> {
    match query_tcx(ifindex, egress) {
        Ok(ids) => Ok(ids),
        // A kernel without tcx does not know the attach type.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
            Ok(Vec::new())
        }
        Err(source) => Err(TcError::Tcx {
            hook: if egress { "egress" } else { "ingress" },
            ifindex,
            source,
        }),
    }
}

/// Whether the kernel has tcx: it knows tcx's attach type (a query of the loopback
/// interface's ingress, index 1 in every network namespace; before 6.6, EINVAL).
pub fn tcx_supported() -> bool {
    !matches!(
        query_tcx(1, false),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP))
    )
}

/// `BPF_PROG_QUERY` of a tcx hook.
fn query_tcx(ifindex: u32, egress: bool) -> std::io::Result<Vec<u32>> {
    const BPF_TCX_INGRESS: u32 = 46;
    const BPF_TCX_EGRESS: u32 = 47;
    /// `union bpf_attr`'s `query` member, up to `revision` (6.6).
    #[repr(C)]
    #[derive(Default)]
    struct Query {
        target_ifindex: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        count: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    let mut ids = vec![0u32; 8];
    loop {
        let mut query = Query {
            target_ifindex: ifindex,
            attach_type: if egress {
                BPF_TCX_EGRESS
            } else {
                BPF_TCX_INGRESS
            },
            prog_ids: ids.as_mut_ptr() as u64,
            count: u32::try_from(ids.len()).unwrap_or(u32::MAX),
            ..Query::default()
        };
        // SAFETY: BPF_PROG_QUERY's layout; `prog_ids` points at `ids`, which holds
        // `count` u32s and outlives the call.
        let error = match unsafe { sys::bpf(sys::BPF_PROG_QUERY, &mut query) } {
            Ok(_) => {
                ids.truncate(query.count as usize);
                return Ok(ids);
            }
            Err(error) => error,
        };
        match error.raw_os_error() {
            // More programs than room: the kernel said how many there are.
            Some(libc::ENOSPC) if query.count as usize > ids.len() => {
                ids = vec![0; query.count as usize];
            }
            _ => return Err(error),
        }
    }
}

/// The legacy tc part of one interface's hooks: its root qdisc's kind and whether it
/// has an `ingress` / `clsact` qdisc (whose filters are then dumped).
#[derive(Debug, Default)]
struct Qdiscs {
    root: Option<String>,
    /// `ingress` or `clsact`.
    clsact: Option<String>,
}

/// Dumps hooks over rtnetlink and names programs (when the agent may).
pub struct Scanner {
    handle: rtnetlink::Handle,
    /// Program names by id; `None`: not readable (naming a program by id needs
    /// CAP_SYS_ADMIN). Asked once per program.
    names: HashMap<u32, Option<String>>,
}

impl Scanner {
    pub fn new(handle: rtnetlink::Handle) -> Self {
        Self {
            handle,
            names: HashMap::new(),
        }
    }

    pub fn names(&self) -> &HashMap<u32, Option<String>> {
        &self.names
    }

    /// The hooks of every interface of `ifindexes`: one qdisc dump, a filter dump per
    /// interface with an `ingress` or `clsact` qdisc, the tcx queries. An interface
    /// gone meanwhile is left out.
    pub async fn scan(&mut self, ifindexes: &[u32]) -> Result<HashMap<u32, Hooks>, TcError> {
        let one = match ifindexes {
            [one] => Some(*one),
            _ => None,
        };
        let mut qdiscs = self.qdiscs(one).await?;
        let mut hooks = HashMap::with_capacity(ifindexes.len());
        for &ifindex in ifindexes {
            let q = qdiscs.remove(&ifindex).unwrap_or_default();
            let mut filters = BTreeSet::new();
            if let Some(kind) = &q.clsact {
                let parents: &[u32] = if kind == "clsact" {
                    &[PARENT_INGRESS, PARENT_EGRESS]
                } else {
                    &[PARENT_INGRESS]
                };
                for &parent in parents {
                    match self.filters(ifindex, parent).await {
                        Ok(found) => filters.extend(found),
                        Err(e) if gone(&e) => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
            let (Some(tcx_ingress), Some(tcx_egress)) = (
                present(tcx_programs(ifindex, false))?,
                present(tcx_programs(ifindex, true))?,
            ) else {
                continue;
            };
            hooks.insert(
                ifindex,
                Hooks {
                    tcx_ingress,
                    tcx_egress,
                    root_qdisc: q.root,
                    filters: filters.into_iter().collect(),
                    // From the observed state (by interface name, from link messages).
                    netfilter: Vec::new(),
                    bridge: Vec::new(),
                    xdp: false,
                },
            );
        }
        self.learn_names(hooks.values());
        Ok(hooks)
    }

    /// Only the tcx part of `hooks` again (tcx sends no events): the interfaces whose
    /// programs changed, with their hooks updated.
    pub fn rescan_tcx(
        &mut self,
        hooks: &HashMap<u32, Hooks>,
    ) -> Result<Vec<(u32, Hooks)>, TcError> {
        let mut changed = Vec::new();
        for (&ifindex, old) in hooks {
            let (Some(ingress), Some(egress)) = (
                present(tcx_programs(ifindex, false))?,
                present(tcx_programs(ifindex, true))?,
            ) else {
                continue;
            };
            if ingress != old.tcx_ingress || egress != old.tcx_egress {
                changed.push((
                    ifindex,
                    Hooks {
                        tcx_ingress: ingress,
                        tcx_egress: egress,
                        ..old.clone()
                    },
                ));
            }
        }
        self.learn_names(changed.iter().map(|(_, h)| h));
        Ok(changed)
    }

    /// Names the programs not asked about yet (one walk over the loaded programs).
    fn learn_names<'a>(&mut self, hooks: impl Iterator<Item = &'a Hooks>) {
        let unknown: BTreeSet<u32> = hooks
            .flat_map(|h| h.tcx_ingress.iter().chain(&h.tcx_egress))
            .copied()
            .filter(|id| !self.names.contains_key(id))
            .collect();
        if unknown.is_empty() {
            return;
        }
        for info in aya::programs::loaded_programs() {
            // Without CAP_SYS_ADMIN the walk fails at once: the ids stay unnamed.
            let Ok(info) = info else { break };
            if unknown.contains(&info.id()) {
                let name = info.name_as_str().map(str::to_owned);
                self.names.insert(info.id(), name);
            }
        }
        for id in unknown {
            self.names.entry(id).or_insert(None);
        }
    }

    /// Deletes the `clsact` qdiscs of `interfaces` (ones hgw added, after hgw's filters
    /// went) that have no filter left on either hook; returns how many went. An
    /// interface gone, or with another qdisc there, is skipped; one that cannot be
    /// checked or deleted is said and left (an empty clsact qdisc does nothing).
    pub async fn delete_unused_clsacts(&self, interfaces: &[u32]) -> usize {
        if interfaces.is_empty() {
            return 0;
        }
        // One dump for all of them: the kernel ignores the index of a dump request.
        let qdiscs = match self.qdiscs(None).await {
            Ok(qdiscs) => qdiscs,
            Err(e) => {
                warn!("the clsact qdiscs hgw added stay: {e}");
                return 0;
            }
        };
        let mut removed = 0;
        for &ifindex in interfaces {
            if qdiscs.get(&ifindex).and_then(|q| q.clsact.as_deref()) != Some("clsact") {
                continue;
            }
            match self.delete_clsact_if_unused(ifindex).await {
                Ok(gone) => removed += usize::from(gone),
                Err(e) => warn!("the clsact qdisc hgw added on interface {ifindex} stays: {e}"),
            }
        }
        removed
    }

    /// Deletes interface `ifindex`'s `clsact` qdisc if no filter is left on it; whether
    /// it went.
    async fn delete_clsact_if_unused(&self, ifindex: u32) -> Result<bool, TcError> {
        for parent in [PARENT_INGRESS, PARENT_EGRESS] {
            if !self.filters(ifindex, parent).await?.is_empty() {
                return Ok(false);
            }
        }
        let mut qdisc = self.handle.clone().qdisc();
        let mut request = qdisc.del(i32::try_from(ifindex).unwrap_or(0));
        let message = request.message_mut();
        message.header.parent = PARENT_CLSACT.into();
        message.header.handle = TcHandle {
            major: 0xFFFF,
            minor: 0,
        };
        message.attributes.push(TcAttribute::Kind("clsact".into()));
        request.execute().await.map_err(|source| TcError::Netlink {
            operation: "deleting the clsact qdisc",
            ifindex,
            source,
        })?;
        Ok(true)
    }

    /// Root and ingress/clsact qdiscs by interface (of `ifindex` alone, if given).
    async fn qdiscs(&self, ifindex: Option<u32>) -> Result<HashMap<u32, Qdiscs>, TcError> {
        let mut request = self.handle.clone().qdisc().get();
        if let Some(ifindex) = ifindex {
            request = request.index(i32::try_from(ifindex).unwrap_or(0));
        }
        let messages: Vec<TcMessage> =
            request
                .execute()
                .try_collect()
                .await
                .map_err(|source| TcError::Netlink {
                    operation: "listing qdiscs",
                    ifindex: ifindex.unwrap_or(0),
                    source,
                })?;
        let mut by_interface: HashMap<u32, Qdiscs> = HashMap::new();
        for message in &messages {
            let Ok(index) = u32::try_from(message.header.index) else {
                continue;
            };
            // The kernel may ignore the index of a dump request.
            if ifindex.is_some_and(|wanted| wanted != index) {
                continue;
            }
            let Some(kind) = kind(message) else { continue };
            let entry = by_interface.entry(index).or_default();
            match u32::from(message.header.parent) {
                PARENT_ROOT => entry.root = Some(kind),
                PARENT_CLSACT if kind == "ingress" || kind == "clsact" => {
                    entry.clsact = Some(kind);
                }
                _ => {}
            }
        }
        Ok(by_interface)
    }

    /// The filters under `parent` ([`PARENT_INGRESS`], [`PARENT_EGRESS`]), every chain.
    async fn filters(&self, ifindex: u32, parent: u32) -> Result<Vec<Filter>, TcError> {
        let mut request = self
            .handle
            .traffic_filter(i32::try_from(ifindex).unwrap_or(0))
            .get();
        request = if parent == PARENT_EGRESS {
            request.egress()
        } else {
            request.ingress()
        };
        let messages: Vec<TcMessage> =
            request
                .execute()
                .try_collect()
                .await
                .map_err(|source| TcError::Netlink {
                    operation: "listing tc filters",
                    ifindex,
                    source,
                })?;
        Ok(messages
            .iter()
            .filter_map(|m| filter(m, parent == PARENT_EGRESS))
            .collect())
    }
}

/// A filter message as a [`Filter`]; `None` for a cls_bpf header without a program
/// (the chain's entry, not a filter).
fn filter(message: &TcMessage, egress: bool) -> Option<Filter> {
    let kind = kind(message)?;
    let mut chain = 0;
    let mut name = None;
    let mut id = None;
    for attribute in &message.attributes {
        match attribute {
            TcAttribute::Chain(c) => chain = *c,
            TcAttribute::Options(options) => {
                for option in options {
                    match option {
                        TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => name = Some(n.clone()),
                        TcOption::Bpf(TcFilterBpfOption::ProgId(i)) => id = Some(*i),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if kind == "bpf" && message.header.handle == TcHandle::UNSPEC {
        return None;
    }
    Some(Filter {
        egress,
        kind,
        // tcm_info: priority in the upper 16 bits, protocol in the lower.
        priority: u16::try_from(message.header.info >> 16).unwrap_or(u16::MAX),
        chain,
        name,
        id,
    })
}

fn kind(message: &TcMessage) -> Option<String> {
    message.attributes.iter().find_map(|a| match a {
        TcAttribute::Kind(kind) => Some(kind.clone()),
        _ => None,
    })
}

/// The interface went away meanwhile: not an error, it has no hooks to scan.
fn gone(error: &TcError) -> bool {
    match error {
        TcError::Tcx { source, .. } => source.raw_os_error() == Some(libc::ENODEV),
        TcError::Netlink {
            source: rtnetlink::Error::NetlinkError(e),
            ..
        } => matches!(-e.raw_code(), libc::ENODEV | libc::EINVAL | libc::ENOENT),
        TcError::Netlink { .. } => false,
    }
}

/// `Ok(None)` for an interface that is gone.
fn present<T>(result: Result<T, TcError>) -> Result<Option<T>, TcError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e) if gone(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_left_out_and_programs_named() {
        let message = |handle: u32, name: Option<&str>| {
            let mut m = TcMessage::default();
            m.header.handle = handle.into();
            m.header.info = 1 << 16;
            m.attributes.push(TcAttribute::Kind("bpf".into()));
            if let Some(name) = name {
                m.attributes.push(TcAttribute::Options(vec![TcOption::Bpf(
                    TcFilterBpfOption::ProgName(name.into()),
                )]));
            }
            m
        };
        assert_eq!(super::filter(&message(0, None), false), None);
        let other = super::filter(&message(1, Some("shaper")), true).expect("a filter");
        assert_eq!((other.priority, other.egress), (1, true));
        assert_eq!(other.name.as_deref(), Some("shaper"));
    }
}
