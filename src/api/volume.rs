//! Storage that outlives VMs: VirtualMachineVolume, and point-in-time copies of a VM's
//! volumes (VirtualMachineSnapshot) that a VirtualMachineRestore puts back.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The storage kind of a volume that names none: a directory on one node.
pub const LOCAL: &str = "local";

/// A disk with a life of its own: created on first use (empty, or from an image, another
/// volume or a snapshot), kept when its VM is deleted, written by one VM at a time.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "vmlet.dev",
    version = "v1alpha1",
    kind = "VirtualMachineVolume",
    doc = "A disk whose data outlives the VMs that use it: node-local (the VM runs where it is) or on a storage pool shared by nodes (the VM may move).",
    namespaced,
    status = "VirtualMachineVolumeStatus",
    shortname = "vmvol",
    category = "vmlet",
    printcolumn = r#"{"name":"Size","type":"string","jsonPath":".spec.size"}"#,
    printcolumn = r#"{"name":"Storage","type":"string","jsonPath":".spec.storage"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.node"}"#,
    printcolumn = r#"{"name":"User","type":"string","jsonPath":".status.user"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("quantity(self.size).compareTo(quantity(oldSelf.size)) >= 0").message("a volume grows, never shrinks: size may not decrease").field_path(".size"))]
#[x_kube(validation = Rule::new("(has(self.storage) ? self.storage : 'local') == (has(oldSelf.storage) ? oldSelf.storage : 'local')").message("storage is immutable").field_path(".storage"))]
#[x_kube(validation = Rule::new("has(self.source) == has(oldSelf.source) && (!has(self.source) || self.source == oldSelf.source)").message("source is immutable").field_path(".source"))]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineVolumeSpec {
    /// The disk's size, e.g. 10Gi. Growing it grows the disk (online while its VM runs);
    /// a volume never shrinks. A source larger than this keeps its own size.
    #[schemars(schema_with = "super::schema::volume_size")]
    pub size: String,
    /// `local` (default): a file in one node's state directory; the volume belongs to the
    /// node where it is first used, and VMs using it run there. Otherwise the name of a
    /// storage pool the agents declare (`--storage-pool NAME=PATH`, a directory every node
    /// mounts, such as NFS or CephFS): VMs using it run on any node with the pool and
    /// restart elsewhere with their data when their node is lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub storage: Option<String>,
    /// What the volume starts as (immutable); empty when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<VolumeSource>,
}

impl VirtualMachineVolumeSpec {
    /// The storage pool's name, or None for a local volume.
    pub fn pool(&self) -> Option<&str> {
        self.storage.as_deref().filter(|s| *s != LOCAL)
    }
}

/// Exactly one of image, volume or snapshot.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[x_kube(validation = Rule::new("[has(self.image), has(self.volume), has(self.snapshot)].exists_one(x, x)").message("exactly one of source.image, source.volume or source.snapshot must be set"))]
#[serde(rename_all = "camelCase")]
pub struct VolumeSource {
    /// A copy of a disk VirtualMachineImage (same namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<super::vm::ImageRef>,
    /// A copy of another volume (same namespace), which no running VM may be writing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<super::vm::ImageRef>,
    /// A copy of one disk of a VirtualMachineSnapshot (same namespace): a clone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotDiskRef>,
}

/// One disk of a snapshot.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SnapshotDiskRef {
    /// Name of the VirtualMachineSnapshot.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// The disk's name in the VM the snapshot was taken of.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub disk: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum VolumePhase {
    /// Not created yet: it is, on the node of the first VM that uses it.
    Pending,
    Ready,
    /// Creating or growing it failed; the Ready condition says why.
    Failed,
}

/// The controller writes `node` and `user`; the agent holding the data the rest
/// (docs/status.md).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineVolumeStatus {
    /// Pending until its first VM's node makes it, then Ready (or Failed: see VolumeReady).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<VolumePhase>,
    /// The node a local volume lives on, set when it is first used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The VirtualMachine (same namespace) that may write it; one at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The disk's size as the guest sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_bytes: Option<i64>,
    /// What the file takes on its storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::schema::conditions")]
    pub conditions: Vec<Condition>,
}

/// A crash-consistent point-in-time copy of every volume of a VM, taken by the agent of
/// the VM's node (while it runs, through libvirt's backup job; while it is stopped, by
/// qemu-img). Each copy lives in its volume's storage. Deleting it deletes the copies.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "vmlet.dev",
    version = "v1alpha1",
    kind = "VirtualMachineSnapshot",
    doc = "A point-in-time copy of a VM's volumes, taken by the agent that holds them.",
    namespaced,
    status = "VirtualMachineSnapshotStatus",
    shortname = "vmsnap",
    category = "vmlet",
    printcolumn = r#"{"name":"VM","type":"string","jsonPath":".spec.vmName"}"#,
    printcolumn = r#"{"name":"Ready","type":"boolean","jsonPath":".status.readyToUse"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("a snapshot's spec is immutable"))]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineSnapshotSpec {
    /// The VirtualMachine (same namespace) whose volumes are copied.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub vm_name: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SnapshotPhase {
    InProgress,
    Succeeded,
    Failed,
}

/// Written by the agent of the node that takes it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineSnapshotStatus {
    /// InProgress while the copies are made, then Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SnapshotPhase>,
    /// Whether it can be restored or cloned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    /// The node that took it: local copies live there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The uid of the VM it was taken of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_uid: Option<String>,
    /// The point in time it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<Time>,
    /// One copy per volume of the VM.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<SnapshotVolume>,
    /// How consistent the copy is, as KubeVirt says it: Online (taken while the VM ran),
    /// GuestAgent (its filesystems frozen by the guest agent for the instant),
    /// NoGuestAgent (the VM has no guest agent channel: crash-consistent) or
    /// QuiesceFailed (it has one, which did not freeze: crash-consistent). None when
    /// taken while the VM was stopped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub indications: Vec<SnapshotIndication>,
    /// How it went: the time it took, or why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SnapshotIndication {
    Online,
    GuestAgent,
    NoGuestAgent,
    QuiesceFailed,
}

/// One copied volume.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotVolume {
    /// The disk's name in the VM.
    pub disk: String,
    /// The VirtualMachineVolume copied.
    pub volume: String,
    /// Where the copy lives: `local` (the snapshot's node) or a pool.
    pub storage: String,
    /// The copied disk's size as the guest saw it.
    pub size_bytes: i64,
}

/// Puts a stopped VM's volumes back to a snapshot of it. Waits while the VM runs.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "vmlet.dev",
    version = "v1alpha1",
    kind = "VirtualMachineRestore",
    doc = "Puts a snapshot's data back into the volumes it was taken from (the VM is stopped meanwhile).",
    namespaced,
    status = "VirtualMachineRestoreStatus",
    shortname = "vmrestore",
    category = "vmlet",
    printcolumn = r#"{"name":"VM","type":"string","jsonPath":".spec.vmName"}"#,
    printcolumn = r#"{"name":"Snapshot","type":"string","jsonPath":".spec.snapshotName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("a restore's spec is immutable"))]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineRestoreSpec {
    /// The VirtualMachine (same namespace) whose volumes are put back.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub vm_name: String,
    /// The VirtualMachineSnapshot of that VM to put back.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub snapshot_name: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RestorePhase {
    /// Waiting for the VM to be stopped (the message says so).
    Pending,
    Succeeded,
    Failed,
}

/// Written by the agent of the VM's node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineRestoreStatus {
    /// Pending while the VM runs, then Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RestorePhase>,
    /// The node whose agent carries it out (where the VM is bound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// What it waits for, how long it took, or why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
}
