//! The two patch types clients send to Nodes: JSON merge patch (RFC 7386) and
//! Kubernetes' strategic merge patch, which merges some lists by a key instead of
//! replacing them (a Node's `status.conditions` by `type`, as kubelet and flannel rely on).

use serde_json::{Map, Value};

/// How a list field of a Node merges under a strategic merge patch (the
/// `patchStrategy`/`patchMergeKey` tags of k8s.io/api/core/v1); every other list is
/// replaced whole, as in a merge patch.
enum ListMerge {
    /// Elements are objects; the patch's element replaces-by-merging the one with the
    /// same value of this field, and new ones are appended.
    ByKey(&'static str),
    /// Elements are scalars; the patch's are added to the set.
    Primitive,
}

fn list_strategy(path: &[&str]) -> Option<ListMerge> {
    match path {
        ["status", "conditions" | "addresses"] => Some(ListMerge::ByKey("type")),
        ["metadata", "ownerReferences"] => Some(ListMerge::ByKey("uid")),
        ["spec", "podCIDRs"] | ["metadata", "finalizers"] => Some(ListMerge::Primitive),
        _ => None,
    }
}

/// RFC 7386: objects merge key by key, `null` deletes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target) = target else {
        return;
    };
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// Why a strategic merge patch was refused (the API server answers 422 or 400).
#[derive(Debug, PartialEq, Eq)]
pub struct PatchError(pub String);

/// A strategic merge patch: a merge patch, except for the lists [`list_strategy`] names
/// and the directives `$patch: delete` / `$patch: replace` (on an object or a list
/// element) and `$deleteFromPrimitiveList/<field>`; `$setElementOrder/<field>` and
/// `$retainKeys` are accepted and ignored (they only order or prune what is merged).
pub fn strategic_merge_patch(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    merge_object(target, patch, &mut Vec::new())
}

fn merge_object<'a>(
    target: &mut Value,
    patch: &'a Value,
    path: &mut Vec<&'a str>,
) -> Result<(), PatchError> {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut replaced = patch.clone();
            replaced.remove("$patch");
            *target = Value::Object(replaced);
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Object(Map::new());
            return Ok(());
        }
        Some(other) => return Err(PatchError(format!("unknown patch type: {other}"))),
        None => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target_map) = target else {
        return Ok(());
    };
    for (key, value) in patch {
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            let gone = value.as_array().map(Vec::as_slice).unwrap_or_default();
            if let Some(Value::Array(list)) = target_map.get_mut(field) {
                list.retain(|v| !gone.contains(v));
            }
            continue;
        }
        if key.starts_with('$') {
            continue;
        }
        if value.is_null() {
            target_map.remove(key);
            continue;
        }
        path.push(key);
        let slot = target_map.entry(key.clone()).or_insert(Value::Null);
        match (list_strategy(path), value) {
            (Some(strategy), Value::Array(items)) => merge_list(slot, items, &strategy, path)?,
            _ => merge_object(slot, value, path)?,
        }
        path.pop();
    }
    Ok(())
}

fn merge_list<'a>(
    target: &mut Value,
    items: &'a [Value],
    strategy: &ListMerge,
    path: &mut Vec<&'a str>,
) -> Result<(), PatchError> {
    if !target.is_array() {
        *target = Value::Array(Vec::new());
    }
    let Value::Array(list) = target else {
        return Ok(());
    };
    let key = match strategy {
        ListMerge::Primitive => {
            for item in items {
                if !list.contains(item) {
                    list.push(item.clone());
                }
            }
            return Ok(());
        }
        ListMerge::ByKey(key) => *key,
    };
    for item in items {
        let Some(wanted) = item.get(key) else {
            return Err(PatchError(format!(
                "map: {item} does not contain declared merge key: {key}"
            )));
        };
        let at = list.iter().position(|v| v.get(key) == Some(wanted));
        match (item.get("$patch").and_then(Value::as_str), at) {
            (Some("delete"), Some(i)) => {
                list.remove(i);
            }
            (Some("delete"), None) => {}
            (_, Some(i)) => merge_object(&mut list[i], item, path)?,
            (_, None) => {
                let mut added = Value::Null;
                merge_object(&mut added, item, path)?;
                list.push(added);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn merge_patch_deletes_with_null_and_replaces_lists() {
        let mut node = json!({"metadata": {"annotations": {"a": "1", "b": "2"}},
                              "status": {"conditions": [{"type": "Ready"}]}});
        merge_patch(
            &mut node,
            &json!({"metadata": {"annotations": {"a": null, "c": "3"}},
                    "status": {"conditions": [{"type": "NetworkUnavailable"}]}}),
        );
        assert_eq!(
            node,
            json!({"metadata": {"annotations": {"b": "2", "c": "3"}},
                   "status": {"conditions": [{"type": "NetworkUnavailable"}]}})
        );
    }

    #[test]
    fn strategic_patch_merges_conditions_by_type() {
        let mut node = json!({"status": {"conditions": [
            {"type": "Ready", "status": "True"},
            {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated"}]}});
        let patch = json!({"status": {"conditions": [
            {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"},
            {"type": "MemoryPressure", "status": "False"}]}});
        strategic_merge_patch(&mut node, &patch).expect("patch applies");
        assert_eq!(
            node["status"]["conditions"],
            json!([{"type": "Ready", "status": "True"},
                   {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"},
                   {"type": "MemoryPressure", "status": "False"}])
        );
    }

    #[test]
    fn strategic_patch_directives() {
        let mut node = json!({"spec": {"podCIDRs": ["10.0.1.0/24"], "taints": [{"key": "a"}]},
                              "status": {"conditions": [{"type": "Ready"}, {"type": "X"}]}});
        let patch = json!({
            "spec": {"podCIDRs": ["fd00::/64"], "taints": [{"key": "b"}],
                     "$deleteFromPrimitiveList/podCIDRs": ["10.0.1.0/24"]},
            "status": {"conditions": [{"type": "X", "$patch": "delete"}],
                       "$setElementOrder/conditions": [{"type": "Ready"}]}});
        strategic_merge_patch(&mut node, &patch).expect("patch applies");
        assert_eq!(
            node,
            json!({"spec": {"podCIDRs": ["fd00::/64"], "taints": [{"key": "b"}]},
                   "status": {"conditions": [{"type": "Ready"}]}})
        );
    }

    #[test]
    fn strategic_patch_element_without_its_merge_key_is_refused() {
        let mut node = json!({});
        let err = strategic_merge_patch(
            &mut node,
            &json!({"status": {"conditions": [{"status": "False"}]}}),
        )
        .expect_err("no merge key");
        assert!(err.0.contains("merge key: type"), "{err:?}");
    }
}
