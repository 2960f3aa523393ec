//! What the agent reads from `<prefix>/subnets/` and keeps of it, bounded whatever any
//! etcd writer puts there: a listing comes in pages of [`PAGE`] entries at one revision,
//! so no gRPC message has to hold all of them; a value larger than a flannel lease can be
//! is kept as its size only; and the warnings already given are remembered as hashes of
//! the entries rejected in the latest peer set, no more.

use std::{
    collections::{BTreeMap, HashMap},
    hash::{BuildHasher as _, RandomState},
};

use etcd_client::{Client, GetOptions, KeyValue};

use super::{EtcdError, connect::Shared, entries::Entry};

/// Entries per listing request at first, and after a page with a large value or a
/// failed page: few enough that values at etcd's request limit fit in one message.
const PAGE: i64 = 16;
/// Entries per listing request at most: pages grow (x4) while their values are a
/// flannel lease's few hundred bytes, so thousands of subnets take a few round trips,
/// not hundreds.
const PAGE_MAX: i64 = 1024;
/// The largest gRPC message the agent decodes (the client's default is 4 MiB, which a
/// few large values under `subnets/` exceed): a page of [`PAGE`] values at etcd's
/// default request limit (1.5 MiB) fits, and so does one watch response of a few.
pub(super) const MAX_MESSAGE: usize = 64 << 20;
/// A flannel lease's value is a few hundred bytes; a larger one is kept as its size.
pub(super) const MAX_VALUE: usize = 64 << 10;

/// One key-value as the agent keeps it; `None` for a key that is not UTF-8.
pub(super) fn entry(kv: &KeyValue) -> Option<(String, Entry)> {
    let key = kv.key_str().ok()?.to_owned();
    let (value, oversize) = if kv.value().len() > MAX_VALUE {
        (String::new(), Some(kv.value().len()))
    } else {
        // Not UTF-8: an empty value, which check_entry rejects as not a lease.
        (kv.value_str().unwrap_or_default().to_owned(), None)
    };
    Some((
        key,
        Entry {
            value,
            oversize,
            lease: kv.lease(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
        },
    ))
}

/// The subnet entries at one revision, and that revision, a page at a time.
pub(super) async fn list(
    client: &mut Client,
    shared: &Shared,
) -> Result<(BTreeMap<String, Entry>, i64), EtcdError> {
    let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
    let prefix = shared.subnets_prefix().into_bytes();
    let end = prefix_end(&prefix);
    let mut from = prefix;
    let mut revision = 0;
    let mut entries = BTreeMap::new();
    let mut page = PAGE;
    loop {
        let options = |page| {
            let options = GetOptions::new().with_range(end.clone()).with_limit(page);
            // Every page at the first one's revision: one consistent listing, which the
            // watch continues from. A compaction meanwhile fails it, and the caller lists
            // again.
            if revision != 0 {
                options.with_revision(revision)
            } else {
                options
            }
        };
        let response = match kv.get(from.clone(), Some(options(page))).await {
            // Too large together for one message, maybe: asked again at the smallest.
            Err(_) if page > PAGE => {
                page = PAGE;
                kv.get(from.clone(), Some(options(page))).await
            }
            other => other,
        }
        .map_err(shared.error("listing subnets"))?;
        if revision == 0 {
            revision = response.header().map_or(0, |h| h.revision());
        }
        let largest = response.kvs().iter().map(|kv| kv.value().len()).max();
        page = if largest.unwrap_or(0) <= MAX_VALUE {
            (page * 4).min(PAGE_MAX)
        } else {
            PAGE
        };
        entries.extend(response.kvs().iter().filter_map(entry));
        let Some(last) = response.kvs().last() else {
            break;
        };
        if !response.more() {
            break;
        }
        // The next page starts just after the last key.
        from = last.key().to_vec();
        from.push(0);
    }
    Ok((entries, revision))
}

/// The end of the range of keys starting with `prefix` (as etcd's own clients compute it).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: to the end of the keyspace.
    vec![0]
}

/// Which rejected entries were warned about, as a hash of each one's value by key: an
/// entry rejected again is not warned about again, and one gone (or accepted) is
/// forgotten, so what is remembered is at most one hash per key etcd holds now.
#[derive(Debug, Default)]
pub(super) struct Warned {
    by_key: HashMap<String, u64>,
    // Keyed per process, so a writer cannot choose values that collide.
    hasher: RandomState,
}

impl Warned {
    /// Notes `key` as rejected with `entry`; true if it was not, with this value.
    pub(super) fn first(&mut self, key: &str, entry: &Entry) -> bool {
        let hash = self.hasher.hash_one((key, &entry.value, entry.oversize));
        self.by_key.insert(key.to_owned(), hash) != Some(hash)
    }

    /// `key` is gone, or accepted.
    pub(super) fn forget(&mut self, key: &str) {
        self.by_key.remove(key);
    }

    /// Keeps only the keys `keep` says are still there (a new listing).
    pub(super) fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.by_key.retain(|key, _| keep(key));
    }

    /// How many rejected entries are remembered.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.by_key.len()
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_ends_as_etcd_computes_them() {
        assert_eq!(prefix_end(b"/p/subnets/"), b"/p/subnets0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), [0]);
    }
}
