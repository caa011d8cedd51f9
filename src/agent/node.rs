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
    /// libvirt's test driver takes domains of type `test` and runs nothing.
    pub test_driver: bool,
}
