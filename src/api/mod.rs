//! The `vmlet.dev/v1alpha1` API: CRD types, their schemas and validation rules.
//!
//! This module depends on nothing else in the crate; controller and agent build on it.

pub mod admission;
pub mod class;
pub mod conditions;
pub mod eviction;
pub mod hypervisor;
pub mod image;
pub mod migration;
pub mod overhead;
pub mod probe;
pub mod quantity;
mod schema;
pub mod streams;
pub mod vm;
pub mod vmpod;
pub mod volume;

pub use class::{VirtualMachineClass, VirtualMachineClassSpec};
pub use hypervisor::{Hypervisor, HypervisorSpec, HypervisorStatus};
pub use image::{VirtualMachineImage, VirtualMachineImageSpec, VirtualMachineImageStatus};
pub use migration::{
    MigrationPhase, VirtualMachineMigration, VirtualMachineMigrationSpec,
    VirtualMachineMigrationStatus,
};
pub use vm::{VirtualMachine, VirtualMachineSpec, VirtualMachineStatus};
pub use volume::{
    VirtualMachineRestore, VirtualMachineSnapshot, VirtualMachineVolume, VirtualMachineVolumeSpec,
    VirtualMachineVolumeStatus,
};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub const GROUP: &str = "vmlet.dev";
/// The finalizer the node agent holds until a VM's domain and disks are gone.
pub const DOMAIN_FINALIZER: &str = "vmlet.dev/domain";
/// The finalizer the controller puts on a migration it schedules, so that deleting it
/// mid-copy reaches the source agent, which aborts the copy and then removes it.
pub const MIGRATION_FINALIZER: &str = "vmlet.dev/migration";
/// The finalizer on a volume: the controller keeps it while a VM uses the volume; the
/// agent holding its data removes it once the data is deleted.
pub const VOLUME_FINALIZER: &str = "vmlet.dev/volume";
/// The finalizer the agent that takes a snapshot holds until its copies are deleted.
pub const SNAPSHOT_FINALIZER: &str = "vmlet.dev/snapshot";
/// On a published VirtualMachineImage: held by the agent that keeps its copy until no VM
/// or volume in the making uses it.
pub const IMAGE_FINALIZER: &str = "vmlet.dev/image";
/// Set by `kubectl vm drain` to the node a VM must leave by shutting down (its
/// evictionStrategy is Shutdown): that node's agent stops it, the controller then unbinds
/// it, and it starts wherever it is scheduled next.
pub const EVICT_ANNOTATION: &str = "vmlet.dev/evict";
/// The label that marks a Node as a hypervisor.
pub const HYPERVISOR_LABEL: &str = "vmlet.dev/hypervisor";
/// On each agent's heartbeat Lease (value: the node), so that an uninstall can find them
/// in kube-node-lease, which kubelets share.
pub const HEARTBEAT_LABEL: &str = "vmlet.dev/heartbeat";
/// The annotation through which a user starts ("on") and stops ("off") a VM with
/// runStrategy Manual.
pub const POWER_ANNOTATION: &str = "vmlet.dev/power";
/// A new value here asks for one stop-and-start (kubectl vm restart); the value acted on
/// is recorded in status.lastRestartRequest.
pub const RESTART_ANNOTATION: &str = "vmlet.dev/restart";
/// Where agents keep their heartbeat Leases (the namespace kubelets use for theirs).
pub const HEARTBEAT_LEASE_NAMESPACE: &str = "kube-node-lease";
/// A heartbeat Lease's duration when it names none, and the agent's default.
pub const DEFAULT_LEASE_DURATION_SECONDS: u64 = 15;
/// The controller replicas' leader-election Lease, in their own namespace, unless told
/// another name (`--leader-lease`; the chart's is `RELEASE-controller`).
pub const LEADER_LEASE: &str = "vmlet-controller";
/// On a Service without a Pod selector: the label selector of the VirtualMachines (in
/// the Service's namespace) the controller keeps its EndpointSlices filled with.
pub const SERVICE_SELECTOR_ANNOTATION: &str = "vmlet.dev/selector";
/// The `endpointslice.kubernetes.io/managed-by` value of the slices vmlet keeps.
pub const ENDPOINTSLICE_MANAGER: &str = "controller.vmlet.dev";

/// The name of `node`'s heartbeat Lease.
pub fn heartbeat_lease_name(node: &str) -> String {
    format!("vmlet-{node}")
}

/// The node whose heartbeat a Lease of that name is, if it is one.
pub fn heartbeat_lease_node(lease: &str) -> Option<&str> {
    lease.strip_prefix("vmlet-")
}

/// Every CRD, with the file name it has under `crds/`.
pub fn crds() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![
        ("virtualmachines.yaml", VirtualMachine::crd()),
        ("virtualmachineclasses.yaml", VirtualMachineClass::crd()),
        ("virtualmachineimages.yaml", VirtualMachineImage::crd()),
        ("hypervisors.yaml", Hypervisor::crd()),
        (
            "virtualmachinemigrations.yaml",
            VirtualMachineMigration::crd(),
        ),
        ("virtualmachinevolumes.yaml", VirtualMachineVolume::crd()),
        (
            "virtualmachinesnapshots.yaml",
            VirtualMachineSnapshot::crd(),
        ),
        ("virtualmachinerestores.yaml", VirtualMachineRestore::crd()),
    ]
}

/// One CRD as the YAML document `vmlet crd` prints and `crds/` holds.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> String {
    format!(
        "---\n{}",
        serde_saphyr::to_string(crd).expect("a CRD always serialises")
    )
}
