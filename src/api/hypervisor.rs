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
    doc = "A node that runs VMs, named after its Node: the spec holds operator overrides (overcommit, reserved memory), the status is the node agent's report (capacity, allocatable, allocated, per-VM overhead, accelerator, readiness).",
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

/// vCPUs per host CPU when the Hypervisor's spec sets none.
pub const DEFAULT_CPU_OVERCOMMIT: f64 = 4.0;
/// Guest memory per byte of host memory when the Hypervisor's spec sets none.
pub const DEFAULT_MEMORY_OVERCOMMIT: f64 = 1.0;

impl HypervisorSpec {
    /// The (cpu, memory) overcommit ratios in force on this node.
    pub fn ratios(&self) -> (f64, f64) {
        (
            self.cpu_overcommit.unwrap_or(DEFAULT_CPU_OVERCOMMIT),
            self.memory_overcommit.unwrap_or(DEFAULT_MEMORY_OVERCOMMIT),
        )
    }
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
    /// Sum over the VMs bound to this node: their guests, plus each one's host overhead
    /// (`vmOverhead`) in memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<Resources>,
    /// What each VM costs this host beyond its guest memory; the scheduler charges it
    /// against `allocatable` with the VM's memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_overhead: Option<super::overhead::VmOverhead>,
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
    /// Where the agent serves /metrics, /healthz and its peers, e.g. http://10.0.0.5:9464.
    #[serde(default, rename = "agentURL", skip_serializing_if = "Option::is_none")]
    pub agent_url: Option<String>,
    /// Where the vmlet API component opens consoles and displays on this node (mutual
    /// TLS), e.g. 10.0.0.5:8444; empty when the agent has no stream certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_address: Option<String>,
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
    /// The storage pools this node's agent declares (`--storage-pool NAME=PATH`): shared
    /// directories where volumes of that `storage` live.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub storage_pools: Vec<StoragePool>,
    /// VMs bound here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<i32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::schema::conditions")]
    pub conditions: Vec<Condition>,
}

/// Whether an endpoint a Hypervisor's status publishes (`agentURL`, `migrationURI`) points
/// at its own node: its host must be one of the Node's InternalIP or ExternalIP addresses.
/// Those are written by kubelet; an agent's token cannot write Nodes, but it writes its
/// Hypervisor, so without this check a stolen agent token could send users' tokens
/// (`kubectl vm console`) and migrating guests to an address of its choosing.
pub fn endpoint_on_node(
    endpoint: &str,
    node: &k8s_openapi::api::core::v1::Node,
) -> Result<(), String> {
    let url = url::Url::parse(endpoint).map_err(|e| format!("{endpoint}: {e}"))?;
    let host = url
        .host_str()
        .ok_or_else(|| format!("{endpoint} names no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let own: Vec<&str> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .map(|a| a.address.as_str())
        .collect();
    let same = |a: &str| match (
        a.parse::<std::net::IpAddr>(),
        host.parse::<std::net::IpAddr>(),
    ) {
        (Ok(a), Ok(h)) => a == h,
        _ => a == host,
    };
    if own.iter().any(|a| same(a)) {
        Ok(())
    } else {
        Err(format!(
            "{endpoint} is not an address of node {} ({}): an agent may publish only its own node's addresses",
            node.metadata.name.as_deref().unwrap_or_default(),
            if own.is_empty() {
                "it lists none".to_string()
            } else {
                own.join(", ")
            }
        ))
    }
}

#[cfg(test)]
mod endpoint_tests {
    use super::*;

    #[test]
    fn endpoints_must_be_the_nodes_own_addresses() {
        let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1"},
            "status": {"addresses": [
                {"type": "InternalIP", "address": "10.0.0.5"},
                {"type": "ExternalIP", "address": "2001:db8::5"},
                {"type": "Hostname", "address": "n1.example"}
            ]}
        }))
        .unwrap();
        // (endpoint, accepted)
        for (endpoint, ok) in [
            ("http://10.0.0.5:9464", true),
            ("qemu+tls://10.0.0.5/system", true),
            ("qemu+tcp://10.0.0.5/system", true),
            ("http://[2001:db8::5]:9464", true),
            ("http://10.0.0.6:9464", false),
            ("http://attacker.example:9464", false),
            // A hostname is whatever DNS says: not an address kubelet vouches for.
            ("http://n1.example:9464", false),
            ("http://10.0.0.5.attacker.example/", false),
            ("not a url", false),
        ] {
            assert_eq!(endpoint_on_node(endpoint, &node).is_ok(), ok, "{endpoint}");
        }
        let bare: k8s_openapi::api::core::v1::Node =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "n2"}})).unwrap();
        let err = endpoint_on_node("http://10.0.0.5:1", &bare).unwrap_err();
        assert!(err.contains("lists none"), "{err}");
    }
}

/// A storage pool as one node mounts it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct StoragePool {
    /// The pool's name, as volumes name it in `storage`.
    pub name: String,
    /// The directory on this node.
    pub path: String,
}
