//! What this node is, as the agent found it at start: its name, state directory,
//! acceleration and firmware. The renderer and the reports read it.

use std::path::PathBuf;

/// How guests on this node are accelerated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What the renderer needs to know about the node.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub node: String,
    pub state_dir: PathBuf,
    pub accel: Accel,
    pub uefi: bool,
    /// The libvirt domain type guests are defined with (`kvm`, `qemu`, or what another
    /// driver runs: libvirt's test driver takes only `test`).
    pub domain_type: String,
}

/// The domain type for guests: KVM's or QEMU's (TCG) as `accel` says when the driver runs
/// QEMU guests (or says nothing), else the first type the driver offers.
pub fn domain_type(offered: &[String], accel: Accel) -> String {
    let qemu = offered.is_empty() || offered.iter().any(|t| t == "qemu" || t == "kvm");
    match (qemu, accel) {
        (true, Accel::Kvm) => "kvm".into(),
        (true, Accel::Tcg) => "qemu".into(),
        (false, _) => offered[0].clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_domain_type_follows_the_accel_where_the_driver_runs_qemu() {
        let s = |v: &[&str]| v.iter().map(|t| t.to_string()).collect::<Vec<_>>();
        for (offered, accel, want) in [
            (s(&["qemu", "kvm"]), Accel::Kvm, "kvm"),
            (s(&["qemu", "kvm"]), Accel::Tcg, "qemu"),
            // Forced KVM where libvirt saw no /dev/kvm: defined as asked, refused at start.
            (s(&["qemu"]), Accel::Kvm, "kvm"),
            (s(&["qemu"]), Accel::Tcg, "qemu"),
            (s(&[]), Accel::Tcg, "qemu"),
            (s(&["test"]), Accel::Tcg, "test"),
            (s(&["xen", "test"]), Accel::Kvm, "xen"),
        ] {
            assert_eq!(domain_type(&offered, accel), want, "{offered:?} {accel:?}");
        }
    }
}
