//! The VirtualMachineClass resource: a reusable hardware template.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::vm::{Cpu, Firmware, Machine};

/// Hardware that VirtualMachines take by `spec.classRef`; fields set on a VM override it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "vmlet.dev",
    version = "v1alpha1",
    kind = "VirtualMachineClass",
    doc = "A reusable shape for VirtualMachines (cluster-scoped): vCPUs, memory, machine type, firmware and CPU model; a VM that names it takes what it does not set itself.",
    shortname = "vmclass",
    category = "vmlet",
    printcolumn = r#"{"name":"Cores","type":"integer","jsonPath":".spec.cpu.cores"}"#,
    printcolumn = r#"{"name":"Memory","type":"string","jsonPath":".spec.memory"}"#,
    printcolumn = r#"{"name":"Machine","type":"string","jsonPath":".spec.machine"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineClassSpec {
    /// Virtual CPU topology and model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Cpu>,
    /// Guest memory, e.g. 2Gi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "super::schema::memory")]
    pub memory: Option<String>,
    /// Machine type: q35 or pc.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<Machine>,
    /// Firmware: bios or uefi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,
}
