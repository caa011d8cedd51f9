//! The Hypervisor resource: one per node, written by that node's agent.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A node that runs VMs. Its name is the node's name. The spec holds operator
/// overrides; the status is the agent's report.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "vmlet.dev",
    version = "v1alpha1",
    kind = "Hypervisor",
    status = "HypervisorStatus",
    shortname = "hv",
    category = "vmlet",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Accel","type":"string","jsonPath":".status.accel"}"#,
    printcolumn = r#"{"name":"Accel-Reason","type":"string","priority":1,"jsonPath":".status.accelReason"}"#,
    printcolumn = r#"{"name":"CPU-Alloc","type":"integer","jsonPath":".status.allocated.cpu"}"#,
    printcolumn = r#"{"name":"CPU-Allocatable","type":"integer","jsonPath":".status.allocatable.cpu"}"#,
    printcolumn = r#"{"name":"Mem-Alloc","type":"string","jsonPath":".status.allocated.memory"}"#,
    printcolumn = r#"{"name":"Mem-Allocatable","type":"string","jsonPath":".status.allocatable.memory"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct HypervisorSpec {
    /// vCPUs offered per host CPU. Default 4.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.1, max = 64.0))]
    pub cpu_overcommit: Option<f64>,
    /// Guest memory offered per byte of host memory. Default 1.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.1, max = 4.0))]
    pub memory_overcommit: Option<f64>,
    /// Host memory kept back from guests. Default: the agent's --reserved-memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "super::schema::reserved_memory")]
    pub reserved_memory: Option<String>,
}

/// vCPUs and memory.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct Resources {
    /// vCPUs.
    pub cpu: i64,
    /// Memory, e.g. 16Gi.
    pub memory: String,
}

/// The agent's report on its node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HypervisorStatus {
    /// Host CPUs and memory as libvirt reports them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Resources>,
    /// What guests may use: capacity x overcommit - reserved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocatable: Option<Resources>,
    /// Sum over the VMs bound to this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<Resources>,
    /// kvm or tcg: how guests on this node are accelerated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
    /// Why: the KVM probe's verdict (the boot step it stopped at) or the --accel flag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel_reason: Option<String>,
    /// Version of libvirt on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_version: Option<String>,
    /// Version of the hypervisor (QEMU) libvirt drives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor_version: Option<String>,
    /// Whether UEFI firmware (OVMF) is installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uefi: Option<bool>,
    /// Where the agent serves /console, /metrics and /healthz, e.g. http://10.0.0.5:9464.
    #[serde(default, rename = "agentURL", skip_serializing_if = "Option::is_none")]
    pub agent_url: Option<String>,
    /// Where other nodes' libvirt reaches this node's for live migration, e.g.
    /// qemu+tcp://10.0.0.5/system; empty when the agent was not given one.
    #[serde(
        default,
        rename = "migrationURI",
        skip_serializing_if = "Option::is_none"
    )]
    pub migration_uri: Option<String>,
    /// Where this node keeps VM files and images: a migration rewrites the VM's paths
    /// from the source's to these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<String>,
    /// Where this node keeps downloaded VirtualMachineImages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_root: Option<String>,
    /// VMs bound here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<i32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::schema::conditions")]
    pub conditions: Vec<Condition>,
}
