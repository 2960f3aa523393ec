//! This node's subnet: its own entry kept while it fits, else a free subnet claimed in
//! a transaction.

use std::collections::BTreeMap;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use ipnet::IpNet;
use log::warn;

use super::{
    EtcdError,
    connect::Shared,
    entries::{Entry, LeaseAttrs, SubnetKey, check_subnets},
    listing::list,
    network::{Pool, SubnetSpace, uplink_overlap},
};
use crate::cidr::Taken;

/// Why this node's entry cannot be kept as it is, if it cannot: flannel's
/// compatibility (each family from its pool, IPv6 exactly when enabled) and the checks
/// of an entry's subnets (its value is ours to rewrite). Reservations may lie outside
/// SubnetMin and SubnetMax, and keep an IPv6 subnet the network does not use.
fn own_entry_unfit(
    subnet_key: SubnetKey,
    reservation: bool,
    space: &SubnetSpace,
    uplink: &[IpNet],
) -> Option<String> {
    match (space.v6.is_some(), subnet_key.v6.is_some()) {
        (true, false) => return Some("no IPv6 subnet, but the network has EnableIPv6".into()),
        (false, true) if !reservation => {
            return Some("an IPv6 subnet, but the network has no EnableIPv6".into());
        }
        _ => {}
    }
    let subnet_key = SubnetKey {
        v6: subnet_key.v6.filter(|_| space.v6.is_some()),
        ..subnet_key
    };
    if let Err(reason) = check_subnets(&subnet_key, space, uplink) {
        return Some(reason);
    }
    if reservation {
        return None;
    }
    space
        .pools()
        .zip(subnet_key.nets())
        .find(|((_, pool), net)| !pool.fits(net))
        .map(|((fields, pool), net)| {
            format!(
                "{net} is not a /{} between {} {} and {} {}",
                pool.subnet_len, fields.min, pool.min, fields.max, pool.max
            )
        })
}

/// Takes a subnet for this node: its own entry (same PublicIP) if there is one that
/// still fits, else `preferred`, else the first free one, in each family. Each claim is
/// one transaction (both families are one key) that only succeeds if nobody changed the
/// keys since we looked, so two nodes never share a subnet; an own entry that no longer
/// fits is deleted in the same transaction. The listing it claimed on comes back too:
/// the watch goes on from it, so the subnets are listed once at start.
pub(super) async fn acquire(
    client: &mut Client,
    shared: &Shared,
    space: &SubnetSpace,
    lease: i64,
    preferred: Option<SubnetKey>,
) -> Result<(SubnetKey, Listing), EtcdError> {
    let prefix = &shared.config.prefix;
    let value = serde_json::to_string(&LeaseAttrs {
        public_ip: shared.public_ip.to_string(),
        public_ipv6: shared.public_ipv6.map(|ip| ip.to_string()),
        backend_type: "host-gw".into(),
    })
    .expect("plain strings serialize");
    loop {
        let (entries, revision) = list(client, shared).await?;
        let ip = shared.public_ip.to_string();
        let mut mine: Vec<(&String, &Entry)> = entries
            .iter()
            .filter(|(key, entry)| {
                SubnetKey::parse(prefix, key).is_some()
                    && serde_json::from_str::<LeaseAttrs>(&entry.value)
                        .is_ok_and(|a| a.public_ip == ip)
            })
            .collect();
        mine.sort_by_key(|(key, entry)| (entry.create_revision, *key));
        let mut old = None;
        if let Some((key, entry)) = mine.first() {
            let subnet_key = SubnetKey::parse(prefix, key).expect("filtered on parsing");
            let unfit = own_entry_unfit(subnet_key, entry.lease == 0, space, &shared.uplink);
            match unfit {
                // A reservation for this node is used as it is, never rewritten.
                None if entry.lease == 0 => {
                    let own = SubnetKey {
                        v6: subnet_key.v6.filter(|_| space.v6.is_some()),
                        ..subnet_key
                    };
                    return Ok((own, (entries, revision)));
                }
                Some(reason) if entry.lease == 0 => {
                    return Err(EtcdError::BadConfig {
                        key: (*key).clone(),
                        reason: format!("this node's reservation cannot be used: {reason}"),
                    });
                }
                None => {
                    let compare =
                        Compare::mod_revision(key.as_str(), CompareOp::Equal, entry.mod_revision);
                    if claim(client, shared, key, &value, lease, vec![compare], vec![]).await? {
                        return Ok((subnet_key, (entries, revision)));
                    }
                    continue;
                }
                Some(reason) => {
                    warn!(
                        "etcd key {key}: this node's old subnet does not fit the network config ({reason}); claiming another"
                    );
                    old = Some(((*key).clone(), entry.mod_revision));
                }
            }
        }
        let mut taken = Taken::default();
        for key in entries
            .keys()
            .filter(|k| Some(*k) != old.as_ref().map(|o| &o.0))
        {
            if let Some(subnet_key) = SubnetKey::parse(prefix, key) {
                for net in subnet_key.nets() {
                    taken.insert(net, key.as_str());
                }
            }
        }
        let free = |net: &IpNet| {
            taken.find(*net).is_none() && uplink_overlap(net, &shared.uplink).is_none()
        };
        let pick = |pool: &Pool, preferred: Option<IpNet>| -> Result<IpNet, EtcdError> {
            preferred
                .filter(|p| pool.fits(p) && free(p))
                .or_else(|| pool.subnets().find(|s| free(s)))
                .ok_or_else(|| pool.no_free_subnet())
        };
        let v4 = match pick(&space.v4, preferred.map(|p| IpNet::V4(p.v4)))? {
            IpNet::V4(net) => net,
            IpNet::V6(_) => unreachable!("an IPv4 pool"),
        };
        let v6 = match &space.v6 {
            Some(pool) => match pick(pool, preferred.and_then(|p| p.v6).map(IpNet::V6))? {
                IpNet::V6(net) => Some(net),
                IpNet::V4(_) => unreachable!("an IPv6 pool"),
            },
            None => None,
        };
        let subnet_key = SubnetKey { v4, v6 };
        let key = subnet_key.key(prefix);
        let mut compares = vec![Compare::version(key.as_str(), CompareOp::Equal, 0)];
        let mut deletes = Vec::new();
        if let Some((old_key, revision)) = &old {
            compares.push(Compare::mod_revision(
                old_key.as_str(),
                CompareOp::Equal,
                *revision,
            ));
            deletes.push(TxnOp::delete(old_key.as_str(), None));
        }
        if claim(client, shared, &key, &value, lease, compares, deletes).await? {
            return Ok((subnet_key, (entries, revision)));
        }
        // Someone else changed it between our list and our claim: look again.
    }
}

/// Puts `key` on `lease` if `compares` hold, with `also` in the same transaction.
async fn claim(
    client: &mut Client,
    shared: &Shared,
    key: &str,
    value: &str,
    lease: i64,
    compares: Vec<Compare>,
    also: Vec<TxnOp>,
) -> Result<bool, EtcdError> {
    let mut ops = vec![TxnOp::put(
        key,
        value,
        Some(PutOptions::new().with_lease(lease)),
    )];
    ops.extend(also);
    let txn = Txn::new().when(compares).and_then(ops);
    let response = client
        .txn(txn)
        .await
        .map_err(shared.error("claiming a subnet"))?;
    Ok(response.succeeded())
}

/// The subnet entries at one revision, and that revision.
pub(super) type Listing = (BTreeMap<String, Entry>, i64);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::etcd::test_support::{dual, space, uplink};

    #[test]
    fn own_entries_fit_as_flannel_says() {
        let key = |s: &str| SubnetKey::parse("/p", s).expect("key");
        let up = uplink();
        assert_eq!(
            own_entry_unfit(key("/p/subnets/10.244.1.0-24"), false, &space(), &up),
            None
        );
        assert!(own_entry_unfit(key("/p/subnets/10.244.0.0-24"), false, &space(), &up).is_some());
        assert!(own_entry_unfit(key("/p/subnets/10.244.1.0-25"), false, &space(), &up).is_some());
        // A reservation may lie outside SubnetMin..SubnetMax, never over the uplink.
        assert_eq!(
            own_entry_unfit(key("/p/subnets/10.244.0.0-25"), true, &space(), &up),
            None
        );
        let over = own_entry_unfit(key("/p/subnets/172.31.0.0-24"), true, &space(), &up);
        assert!(over.is_some_and(|r| r.contains("uplink")));
        // IPv6 exactly when the network has it.
        assert!(own_entry_unfit(key("/p/subnets/10.244.1.0-24"), false, &dual(), &up).is_some());
        assert_eq!(
            own_entry_unfit(
                key("/p/subnets/10.244.1.0-24&fd00:244:1::-48"),
                false,
                &dual(),
                &up
            ),
            None
        );
        assert!(
            own_entry_unfit(
                key("/p/subnets/10.244.1.0-24&fd00:244:1::-48"),
                false,
                &space(),
                &up
            )
            .is_some()
        );
        assert_eq!(
            own_entry_unfit(
                key("/p/subnets/10.244.1.0-24&fd00:244:1::-48"),
                true,
                &space(),
                &up
            ),
            None
        );
    }
}
