//! Discovery documents for `subresources.vmlet.dev/v1alpha1`: what the aggregator asks
//! before it marks the APIService Available, and what `kubectl api-resources` lists.

use serde_json::{Value, json};

use crate::api::streams::{GROUP, VERSION};

/// Pure: the document for a discovery path, or None for any other path. The aggregated
/// (v2) format is not offered: asked for it, the server answers 406 and the aggregator
/// falls back to these.
pub fn document(path: &str) -> Option<Value> {
    let gv = format!("{GROUP}/{VERSION}");
    let group = json!({
        "name": GROUP,
        "versions": [{"groupVersion": gv, "version": VERSION}],
        "preferredVersion": {"groupVersion": gv, "version": VERSION},
    });
    let path = path.trim_end_matches('/');
    if path == "/apis" {
        return Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [group]}));
    }
    if path == format!("/apis/{GROUP}") {
        let mut g = group;
        g["kind"] = json!("APIGroup");
        g["apiVersion"] = json!("v1");
        return Some(g);
    }
    if path == format!("/apis/{gv}") {
        let sub = |name: &str| {
            json!({"name": format!("virtualmachines/{name}"), "singularName": "",
                   "namespaced": true, "kind": "VirtualMachine", "verbs": ["get"]})
        };
        return Some(json!({
            "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
            "resources": [sub("console"), sub("vnc")],
        }));
    }
    None
}

/// A stream request's path: (namespace, VM name, subresource).
pub fn stream_path(path: &str) -> Option<(&str, &str, &str)> {
    let rest = path.strip_prefix(&format!("/apis/{GROUP}/{VERSION}/namespaces/"))?;
    let mut parts = rest.split('/');
    let (ns, kind, name, sub) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    (parts.next().is_none() && kind == "virtualmachines" && !ns.is_empty() && !name.is_empty())
        .then_some((ns, name, sub))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_documents_and_streams() {
        assert_eq!(document("/apis").unwrap()["kind"], "APIGroupList");
        assert_eq!(
            document("/apis/subresources.vmlet.dev").unwrap()["kind"],
            "APIGroup"
        );
        let list = document("/apis/subresources.vmlet.dev/v1alpha1/").unwrap();
        assert_eq!(list["resources"][0]["name"], "virtualmachines/console");
        assert_eq!(list["resources"][1]["name"], "virtualmachines/vnc");
        assert_eq!(document("/apis/other"), None);
        let p = "/apis/subresources.vmlet.dev/v1alpha1/namespaces/ns/virtualmachines/web/console";
        assert_eq!(stream_path(p), Some(("ns", "web", "console")));
        for bad in [
            "/apis/subresources.vmlet.dev/v1alpha1/namespaces/ns/virtualmachines/web",
            "/apis/subresources.vmlet.dev/v1alpha1/namespaces/ns/pods/web/console",
            "/apis/subresources.vmlet.dev/v1alpha1/namespaces/ns/virtualmachines/web/console/x",
            "/apis/subresources.vmlet.dev/v1alpha1/namespaces//virtualmachines/web/console",
        ] {
            assert_eq!(stream_path(bad), None, "{bad}");
        }
    }
}
