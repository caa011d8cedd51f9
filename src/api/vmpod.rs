//! The VM Pod: the Pod that stands for a VM in Kubernetes' own machinery (node
//! accounting, ResourceQuota, LimitRange, the pod network, volumes). Its container only
//! holds a place; QEMU runs under the node's libvirtd. The names here are shared by the
//! controller (which creates and deletes VM Pods), the agent and the kubectl plugin.

use sha2::{Digest, Sha256};

/// On every VM Pod: the name of the VM it stands for (in the Pod's namespace).
pub const VM_LABEL: &str = "vmlet.dev/vm";
/// On every VM Pod: the uid of the VM it stands for, so that a VM deleted and created
/// again under the same name never adopts its predecessor's Pod.
pub const VM_UID_LABEL: &str = "vmlet.dev/vm-uid";
/// The scheduler named in a VM Pod: vmlet's controller places it (kube-scheduler leaves
/// Pods that name another scheduler alone).
pub const SCHEDULER_NAME: &str = "vmlet";
/// On every VM Pod, held by the controller: a VM Pod's deletion (by hand, or by an
/// eviction such as `kubectl drain`'s) is a request that the VM leave its node, and the
/// Pod stays (Terminating) until the VM has, so that a drain waits for its VMs.
pub const POD_FINALIZER: &str = "vmlet.dev/vm-pod";
/// The VM Pod's one container.
pub const CONTAINER: &str = "vm";
/// The program the container runs (in the vmlet image): it only waits to be stopped.
pub const PLACEHOLDER_COMMAND: &str = "/usr/local/bin/vmlet-placeholder";

/// The VM Pod's name for the VM `vm` (uid `uid`) on `node`: `vm-NAME-HASH`, the hash
/// of uid and node, so that one VM's Pods on two nodes (a migration's source and
/// target) never share a name and a VM created anew never reuses its predecessor's.
/// Pod names are DNS subdomains of at most 253 characters: a long VM name is cut.
pub fn pod_name(vm: &str, uid: &str, node: &str) -> String {
    let digest = Sha256::new()
        .chain_update(uid.as_bytes())
        .chain_update([0u8])
        .chain_update(node.as_bytes())
        .finalize();
    let hash = &hex::encode(digest)[..8];
    // "vm-" + name + "-" + 8 hex digits.
    let room = 253 - 3 - 1 - hash.len();
    let mut name: &str = vm;
    if name.len() > room {
        name = &name[..room];
    }
    let name = name.trim_end_matches(['-', '.']);
    format!("vm-{name}-{hash}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names_are_per_vm_and_node_and_fit() {
        let a = pod_name("web", "u1", "n1");
        assert!(
            a.starts_with("vm-web-") && a.len() == "vm-web-".len() + 8,
            "{a}"
        );
        assert_eq!(a, pod_name("web", "u1", "n1"), "stable");
        assert_ne!(a, pod_name("web", "u1", "n2"), "per node");
        assert_ne!(a, pod_name("web", "u2", "n1"), "per VM instance");
        let long = "a".repeat(253);
        let n = pod_name(&long, "u", "n");
        assert_eq!(n.len(), 253);
        // A cut that ends in a dot or dash is trimmed: the name stays a DNS subdomain.
        let dotted = format!("{}.{}", "b".repeat(240), "c".repeat(12));
        let n = pod_name(&dotted, "u", "n");
        assert!(!n.contains(".-"), "{n}");
    }
}
