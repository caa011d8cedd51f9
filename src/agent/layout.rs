//! Where a VM's things are on the node and what they are called: its directory, console
//! log, libvirt domain name and the MACs derived from its uid. Stable across agent
//! restarts, because a restarted agent finds its domains and files by these.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Domain names are `vmlet_<namespace>_<name>`: namespaces and VM names never contain
/// '_', so the mapping is one-to-one and stable across restarts.
pub fn domain_name(namespace: &str, name: &str) -> String {
    format!("vmlet_{namespace}_{name}")
}

/// The per-VM directory: overlays, blank disks, seed ISO and console log. Keyed by uid so
/// that a VM deleted and re-created under the same name never sees old disks.
pub fn vm_dir(state_dir: &Path, uid: &str) -> PathBuf {
    state_dir.join("vms").join(uid)
}

pub fn console_log(state_dir: &Path, uid: &str) -> PathBuf {
    vm_dir(state_dir, uid).join("console.log")
}

/// A stable, locally administered unicast MAC from the VM's uid and the interface name.
/// The MAC of the VM's interface `n`: the one the spec gives, else the one derived from
/// the VM's uid and the interface's name (the domain, the status and the address lookup
/// must agree on it).
pub fn mac_of(uid: &str, n: &crate::api::vm::Network) -> String {
    n.mac_address
        .clone()
        .unwrap_or_else(|| derived_mac(uid, &n.name))
}

pub fn derived_mac(uid: &str, nic: &str) -> String {
    let h = Sha256::new()
        .chain_update(uid)
        .chain_update([0])
        .chain_update(nic)
        .finalize();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2])
}
