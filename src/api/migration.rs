//! The VirtualMachineMigration resource: a request to move one running VM to another node
//! without stopping it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Moves a running VirtualMachine to another node by live migration (its memory and its
/// local disks are copied while it runs). Deleting an unfinished migration cancels it;
/// the VM keeps running where it was.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "vmlet.dev",
    version = "v1alpha1",
    kind = "VirtualMachineMigration",
    doc = "A request to move a running VM to another node: live (memory copied while it runs) or by shutdown; the controller picks or checks the target and the agents carry it out.",
    namespaced,
    status = "VirtualMachineMigrationStatus",
    shortname = "vmim",
    category = "vmlet",
    printcolumn = r#"{"name":"VM","type":"string","jsonPath":".spec.vmName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".status.sourceNode"}"#,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".status.targetNode"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("a migration's spec is immutable: delete it and create another"))]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineMigrationSpec {
    /// The VirtualMachine to move, in this namespace.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub vm_name: String,
    /// The node to move it to. Empty: the scheduler picks one (never the VM's own node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub target_node: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum MigrationPhase {
    /// Accepted, waiting for a slot (see the concurrency limits) or for its checks.
    Pending,
    /// A target is chosen; the target node prepares the VM's files.
    Scheduling,
    /// The source node is copying the VM.
    Running,
    Succeeded,
    Failed,
}

impl MigrationPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationPhase::Pending => "Pending",
            MigrationPhase::Scheduling => "Scheduling",
            MigrationPhase::Running => "Running",
            MigrationPhase::Succeeded => "Succeeded",
            MigrationPhase::Failed => "Failed",
        }
    }

    /// Whether the migration still holds a slot (and capacity on its target).
    pub fn active(self) -> bool {
        matches!(self, MigrationPhase::Scheduling | MigrationPhase::Running)
    }

    pub fn finished(self) -> bool {
        matches!(self, MigrationPhase::Succeeded | MigrationPhase::Failed)
    }
}

impl VirtualMachineMigration {
    /// Whether the VM's binding may still change because of this migration: it has not
    /// finished, or it succeeded and the controller has not moved the binding to the
    /// target yet (the controller lets go of the finalizer once it has).
    pub fn unsettled(&self) -> bool {
        let phase = self.status.as_ref().and_then(|s| s.phase);
        phase.is_some_and(MigrationPhase::active)
            || phase == Some(MigrationPhase::Succeeded)
                && self
                    .metadata
                    .finalizers
                    .iter()
                    .flatten()
                    .any(|f| f == super::MIGRATION_FINALIZER)
    }
}

/// Where the migration stands. The controller writes phase Pending, Scheduling and
/// Failed-before-start; the target agent the TargetReady condition; the source agent
/// Running, Succeeded and Failed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineMigrationStatus {
    /// Pending, Scheduling, Running, Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<MigrationPhase>,
    /// Why it is in this phase, CamelCase (e.g. Throttled, NoTarget, NotRunning, Aborted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The same for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The node the VM ran on when the migration was scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,
    /// The node chosen to receive it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    /// When the copy started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the controller chose the target (phase Scheduling): the target's time to
    /// prepare counts from here, not from the request (which may have queued for long).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_time: Option<Time>,
    /// When it succeeded or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// How long the guest was paused at the switch-over, as libvirt reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_milliseconds: Option<i64>,
    /// Bytes of memory and disk copied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_transferred_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::schema::conditions")]
    pub conditions: Vec<Condition>,
}
