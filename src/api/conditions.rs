//! Helpers for `metav1.Condition` lists keyed by type, and the types vmlet writes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Every condition type vmlet writes, with the object it goes on and its one writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Type {
    /// VirtualMachine: the guest runs (the node's agent). Hypervisor: the agent reaches
    /// libvirt and reports (that node's agent).
    Ready,
    /// VirtualMachine: libvirt holds its domain (the agent).
    DomainDefined,
    /// VirtualMachine: the spec changed in a way that takes effect after a restart (the
    /// agent).
    RestartRequired,
    /// VirtualMachine: placed on a node, or why not (the controller).
    Scheduled,
    /// VirtualMachine: its node renews its heartbeat (the controller).
    NodeHealthy,
    /// VirtualMachine: its disks stayed on a lost node (the controller).
    DisksLeftBehind,
    /// VirtualMachineMigration: the target holds the VM's images and files (the target
    /// agent).
    TargetReady,
    /// VirtualMachineVolume: its file exists and has its size, or why not (the agent
    /// holding it).
    VolumeReady,
}

/// Which component writes a condition (each status field has one writer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    /// The agent of the node the object is about (or bound to).
    Agent,
    Controller,
}

impl Type {
    pub const ALL: [Type; 8] = [
        Type::Ready,
        Type::DomainDefined,
        Type::RestartRequired,
        Type::Scheduled,
        Type::NodeHealthy,
        Type::DisksLeftBehind,
        Type::TargetReady,
        Type::VolumeReady,
    ];

    /// The one component that writes this condition.
    pub const fn writer(self) -> Writer {
        match self {
            Type::Ready
            | Type::DomainDefined
            | Type::RestartRequired
            | Type::TargetReady
            | Type::VolumeReady => Writer::Agent,
            Type::Scheduled | Type::NodeHealthy | Type::DisksLeftBehind => Writer::Controller,
        }
    }

    /// Whether a condition of type `name` is one `writer` writes.
    pub fn written_by(name: &str, writer: Writer) -> bool {
        Type::ALL
            .iter()
            .any(|t| t.as_str() == name && t.writer() == writer)
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Type::Ready => "Ready",
            Type::DomainDefined => "DomainDefined",
            Type::RestartRequired => "RestartRequired",
            Type::Scheduled => "Scheduled",
            Type::NodeHealthy => "NodeHealthy",
            Type::DisksLeftBehind => "DisksLeftBehind",
            Type::TargetReady => "TargetReady",
            Type::VolumeReady => "VolumeReady",
        }
    }
}

impl std::fmt::Display for Type {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

pub fn find(conditions: &[Condition], type_: Type) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == type_.as_str())
}

pub fn is_true(conditions: &[Condition], type_: Type) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

/// A condition that keeps the previous transition time when its status did not change,
/// so that rewriting the same observation is a no-op.
pub fn new(
    previous: &[Condition],
    type_: Type,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Time,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = match find(previous, type_) {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now,
    };
    Condition {
        type_: type_.as_str().to_string(),
        status,
        reason: reason.to_string(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn keeps_transition_time_while_status_holds() {
        let first = new(&[], Type::Ready, true, "Running", "", Some(1), t(10));
        let second = new(
            std::slice::from_ref(&first),
            Type::Ready,
            true,
            "Running",
            "",
            Some(2),
            t(20),
        );
        assert_eq!(second.last_transition_time, t(10));
        let third = new(&[second], Type::Ready, false, "Stopped", "", Some(2), t(30));
        assert_eq!(third.last_transition_time, t(30));
    }
}
