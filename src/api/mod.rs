//! The `vmlet.dev/v1alpha1` API: CRD types, their schemas and validation rules.
//!
//! This module depends on nothing else in the crate; controller and agent build on it.

pub mod class;
pub mod conditions;
pub mod hypervisor;
pub mod image;
pub mod migration;
pub mod quantity;
mod schema;
pub mod vm;

pub use class::{VirtualMachineClass, VirtualMachineClassSpec};
pub use hypervisor::{Hypervisor, HypervisorSpec, HypervisorStatus};
pub use image::{VirtualMachineImage, VirtualMachineImageSpec, VirtualMachineImageStatus};
pub use migration::{
    MigrationPhase, VirtualMachineMigration, VirtualMachineMigrationSpec,
    VirtualMachineMigrationStatus,
};
pub use vm::{VirtualMachine, VirtualMachineSpec, VirtualMachineStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub const GROUP: &str = "vmlet.dev";
/// The finalizer the node agent holds until a VM's domain and disks are gone.
pub const DOMAIN_FINALIZER: &str = "vmlet.dev/domain";
/// The finalizer the controller puts on a migration it schedules, so that deleting it
/// mid-copy reaches the source agent, which aborts the copy and then removes it.
pub const MIGRATION_FINALIZER: &str = "vmlet.dev/migration";
/// Set by `kubectl vm drain` to the node a VM must leave by shutting down (its
/// evictionStrategy is Shutdown): that node's agent stops it, the controller then unbinds
/// it, and it starts wherever it is scheduled next.
pub const EVICT_ANNOTATION: &str = "vmlet.dev/evict";
/// The label that marks a Node as a hypervisor.
pub const HYPERVISOR_LABEL: &str = "vmlet.dev/hypervisor";
/// On each agent's heartbeat Lease (value: the node), so that an uninstall can find them
/// in kube-node-lease, which kubelets share.
pub const HEARTBEAT_LABEL: &str = "vmlet.dev/heartbeat";

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
    ]
}

/// One CRD as the YAML document `vmlet crd` prints and `crds/` holds.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> String {
    format!(
        "---\n{}",
        serde_yaml::to_string(crd).expect("a CRD always serialises")
    )
}
