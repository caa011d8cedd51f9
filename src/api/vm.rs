//! The VirtualMachine resource.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const MAX_DISKS: u32 = 16;
pub const MAX_NETWORKS: u32 = 8;
/// OpenStack bounds user data at 64 KiB; so do we, in bytes.
pub const MAX_USER_DATA: usize = 65536;

/// A virtual machine: its hardware, disks, networks, placement and run strategy.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "vmlet.dev",
    version = "v1alpha1",
    kind = "VirtualMachine",
    doc = "A virtual machine: its virtual hardware, disks, networks, boot and cloud-init, and how it should run. The controller places it on a hypervisor node; that node's agent runs it as a libvirt domain and reports its phase, conditions and addresses.",
    namespaced,
    status = "VirtualMachineStatus",
    shortname = "vm",
    shortname = "vms",
    category = "vmlet",
    category = "all",
    selectable = ".status.nodeName",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.nodeName"}"#,
    printcolumn = r#"{"name":"Node-Healthy","type":"string","jsonPath":".status.conditions[?(@.type==\"NodeHealthy\")].status"}"#,
    printcolumn = r#"{"name":"CPUs","type":"integer","jsonPath":".status.vcpus"}"#,
    printcolumn = r#"{"name":"Memory","type":"string","jsonPath":".status.memory"}"#,
    printcolumn = r#"{"name":"IP","type":"string","jsonPath":".status.interfaces[0].ipAddress"}"#,
    printcolumn = r#"{"name":"Run-Strategy","type":"string","priority":1,"jsonPath":".spec.runStrategy"}"#,
    printcolumn = r#"{"name":"Accel","type":"string","priority":1,"jsonPath":".status.accel"}"#,
    printcolumn = r#"{"name":"Restarts","type":"integer","priority":1,"jsonPath":".status.restartCount"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("has(self.classRef) || has(self.memory)").message("spec.memory is required unless spec.classRef names a VirtualMachineClass").field_path(".memory"))]
#[x_kube(validation = Rule::new("!has(self.disks) || self.disks.filter(d, has(d.cloudInit)).size() <= 1").message("at most one cloudInit disk").field_path(".disks"))]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineSpec {
    /// When the VM should run, with KubeVirt's meanings: Always (restart whenever it stops),
    /// RerunOnFailure (restart only after a failure), Once (run until it stops, never
    /// again), Manual (start and stop only on request) and Halted (keep it stopped).
    /// Default Always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_strategy: Option<RunStrategy>,

    /// A VirtualMachineClass to take cpu, memory, machine and firmware from; fields set on
    /// the VM override the class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_ref: Option<ClassRef>,

    /// Virtual CPU topology and model. Default one socket, one core, one thread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Cpu>,

    /// Guest memory, e.g. 512Mi or 2Gi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "super::schema::memory")]
    pub memory: Option<String>,

    /// Machine type: q35 (PCIe, the default) or pc (i440FX).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<Machine>,

    /// Firmware: bios (SeaBIOS, the default) or uefi (OVMF, when the node has it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,

    /// Direct kernel boot: a kernel and initrd from VirtualMachineImages and a command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<Boot>,

    /// The VM's disks, in boot order. Names are unique DNS labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::schema::disks")]
    pub disks: Vec<Disk>,

    /// The VM's network interfaces. Names are unique DNS labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::schema::networks")]
    pub networks: Vec<Network>,

    /// Labels a node must carry for the VM to be placed on it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Taints of nodes this VM tolerates, as for Pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,

    /// VMs this VM must not share a topology domain with (required anti-affinity).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub anti_affinity: Vec<AntiAffinityTerm>,

    /// What a node drain does to this VM: LiveMigrate, Shutdown or None. Default LiveMigrate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eviction_strategy: Option<EvictionStrategy>,

    /// Attach a VNC display bound to the host's loopback. Default false: serial console only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graphics: Option<bool>,

    /// Give the guest a channel for the QEMU guest agent (qemu-ga, which the guest must
    /// run): snapshots freeze its filesystems for an application-consistent copy. Default
    /// false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_agent: Option<bool>,

    /// When the VM is ready for traffic, as a Pod's readiness probe says it: a TCP
    /// connect or an HTTP GET from the node's agent to the guest's address, or a command
    /// run in the guest by its agent (needs `guestAgent`). It drives the `Ready` condition
    /// and the VM's endpoints in Services. Without one, a running VM is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<super::probe::Probe>,

    /// Seconds an ACPI shutdown may take before the domain is destroyed. Default 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub termination_grace_period_seconds: Option<i64>,

    /// What happens when the VM's node is lost, or drained by shutting the VM down, while
    /// its disks hold node-local writable data (image overlays, blank disks): WaitForNode
    /// (default) keeps it bound to its node, phase Unknown, until the node returns (the
    /// data is only there); RestartWithNewDisks starts it elsewhere on new, empty disks.
    /// VMs without such data (kernel boot, cloud-init seeds, read-only images) move
    /// either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_policy: Option<FailoverPolicy>,

    /// Labels and annotations for the VM's Pod, the Pod that stands for the VM in
    /// Kubernetes (quota, node accounting, Services and NetworkPolicies that select Pods).
    /// `vmlet.dev/*` labels are vmlet's own and cannot be set here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_metadata: Option<PodMetadata>,

    /// The PriorityClass of the VM's Pod: ResourceQuotas scoped by priority count the VM
    /// under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub priority_class_name: Option<String>,
}

/// Metadata the user gives the VM's Pod.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.labels) || self.labels.all(k, !k.startsWith('vmlet.dev/'))").message("vmlet.dev/ labels on the VM's Pod are vmlet's own").field_path(".labels"))]
pub struct PodMetadata {
    /// Labels of the VM's Pod, besides vmlet's own (`vmlet.dev/vm`, `vmlet.dev/vm-uid`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub labels: BTreeMap<String, String>,
    /// Annotations of the VM's Pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum FailoverPolicy {
    #[default]
    WaitForNode,
    RestartWithNewDisks,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum RunStrategy {
    #[default]
    Always,
    RerunOnFailure,
    Once,
    Manual,
    Halted,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    #[default]
    Q35,
    Pc,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    #[default]
    Bios,
    Uefi,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum EvictionStrategy {
    LiveMigrate,
    Shutdown,
    None,
}

/// A reference to a cluster-scoped VirtualMachineClass.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct ClassRef {
    /// Name of the VirtualMachineClass.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
}

/// A reference to a VirtualMachineImage in the VM's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct ImageRef {
    /// Name of the VirtualMachineImage (same namespace).
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
}

/// Virtual CPU topology (sockets x cores x threads vCPUs) and model.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[x_kube(validation = Rule::new("(has(self.sockets) ? self.sockets : 1) * (has(self.cores) ? self.cores : 1) * (has(self.threads) ? self.threads : 1) <= 512").message("sockets x cores x threads must be at most 512 vCPUs"))]
#[serde(rename_all = "camelCase")]
pub struct Cpu {
    /// CPU sockets (1-16). Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16))]
    pub sockets: Option<i32>,
    /// Cores per socket (1-128). Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 128))]
    pub cores: Option<i32>,
    /// Threads per core (1-4). Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4))]
    pub threads: Option<i32>,
    /// CPU model: host-model, host-passthrough, or a named QEMU model such as Skylake-Server.
    /// Default: host-model under KVM, QEMU's default model under TCG.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"))]
    pub model: Option<String>,
}

impl Cpu {
    pub fn vcpus(&self) -> i32 {
        self.sockets.unwrap_or(1) * self.cores.unwrap_or(1) * self.threads.unwrap_or(1)
    }
}

/// Direct kernel boot.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[x_kube(validation = Rule::new("has(self.kernel) || (!has(self.initrd) && !has(self.cmdline))").message("boot.initrd and boot.cmdline need boot.kernel").field_path(".kernel"))]
pub struct Boot {
    /// A VirtualMachineImage of format kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<ImageRef>,
    /// A VirtualMachineImage of format initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<ImageRef>,
    /// Kernel command line: one line of printable characters, at most 2048 (no control
    /// characters, nor U+2028/U+2029, which XML readers turn into line feeds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("!self.matches('[\\\\x00-\\\\x1f\\\\x7f-\\\\x9f\\\\x{2028}\\\\x{2029}]')").message("boot.cmdline must be one line without control characters"))]
    #[schemars(length(max = 2048))]
    pub cmdline: Option<String>,
}

/// One disk: exactly one of image, blank, volume or cloudInit.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[x_kube(validation = Rule::new("[has(self.image), has(self.blank), has(self.volume), has(self.cloudInit)].exists_one(x, x)").message("exactly one of image, blank, volume or cloudInit must be set"))]
#[serde(rename_all = "camelCase")]
pub struct Disk {
    /// Disk name, a DNS label unique within the VM.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Bus: virtio (default), sata or scsi. A cloudInit disk is a CD-ROM on sata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<DiskBus>,
    /// Attach read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    /// A copy-on-write overlay on a VirtualMachineImage; the image itself is never written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageRef>,
    /// An empty disk of the given size, created on first start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blank: Option<BlankDisk>,
    /// A VirtualMachineVolume (same namespace): a disk that outlives the VM, written by
    /// one VM at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<ImageRef>,
    /// A cloud-init NoCloud seed (CD-ROM labelled cidata) written by the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    #[default]
    Virtio,
    Sata,
    Scsi,
}

/// An empty disk.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct BlankDisk {
    #[schemars(schema_with = "super::schema::disk_size")]
    pub size: String,
}

/// cloud-init NoCloud data. meta-data (instance-id = the VM's uid, hostname = its name)
/// is written by the agent.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CloudInit {
    /// user-data, e.g. a #cloud-config document (at most 64 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    #[x_kube(validation = Rule::new("size(bytes(self)) <= 65536").message("cloudInit.userData must be at most 64 KiB"))]
    pub user_data: Option<String>,
    /// network-config (version 1 or 2), at most 64 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    #[x_kube(validation = Rule::new("size(bytes(self)) <= 65536").message("cloudInit.networkData must be at most 64 KiB"))]
    pub network_data: Option<String>,
}

/// One network interface: exactly one of user, network or bridge.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[x_kube(validation = Rule::new("[has(self.user), has(self.network), has(self.bridge)].exists_one(x, x)").message("exactly one of user, network or bridge must be set"))]
#[serde(rename_all = "camelCase")]
pub struct Network {
    /// Interface name, a DNS label unique within the VM.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// NIC model: virtio (default) or e1000e.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<NicModel>,
    /// A fixed unicast MAC address (lower-case hex); derived from the VM's uid when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f][02468ace](:[0-9a-f]{2}){5}$"))]
    pub mac_address: Option<String>,
    /// User-mode networking (SLIRP): outbound only, no setup on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<UserNetwork>,
    /// A libvirt network defined on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NamedNetwork>,
    /// A Linux bridge on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<Bridge>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum NicModel {
    #[default]
    Virtio,
    E1000e,
}

/// User-mode networking; no options yet.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct UserNetwork {}

/// A libvirt network by name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct NamedNetwork {
    /// Name of the libvirt network on the node.
    #[schemars(
        length(min = 1, max = 64),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    )]
    pub name: String,
}

/// A host bridge by interface name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct Bridge {
    /// The bridge's interface name: at most 15 characters of letters, digits, '_', '.', '-'.
    #[schemars(
        length(min = 1, max = 15),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    )]
    pub name: String,
}

/// Required anti-affinity: no two VMs matched by labelSelector in one topology domain.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AntiAffinityTerm {
    /// VMs (in this VM's namespace) to keep away from.
    pub label_selector: LabelSelector,
    /// Node label whose value defines a topology domain, e.g. kubernetes.io/hostname.
    #[schemars(length(min = 1, max = 316))]
    pub topology_key: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Waiting for a node, or being prepared on it. What a VM's status says before its
    /// agent writes (the schema's default). Objects written by vmlet before the agent
    /// became the phase's one writer may say `Scheduled`: it reads as Pending.
    #[serde(alias = "Scheduled")]
    Pending,
    Starting,
    Running,
    Stopping,
    Stopped,
    Failed,
    /// A live migration copies the guest to another node (its source agent writes it;
    /// the target's agent writes Running once the binding has moved there).
    Migrating,
    /// libvirt reports a domain state vmlet does not know.
    Unknown,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Starting => "Starting",
            Phase::Running => "Running",
            Phase::Stopping => "Stopping",
            Phase::Stopped => "Stopped",
            Phase::Failed => "Failed",
            Phase::Migrating => "Migrating",
            Phase::Unknown => "Unknown",
        }
    }
}

/// What vmlet observes of the VM.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineStatus {
    /// Lifecycle phase, written by the agent of the VM's node; Pending until it writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = "Pending"))]
    pub phase: Option<Phase>,
    /// The node the VM is bound to (written by the scheduler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::schema::conditions")]
    pub conditions: Vec<Condition>,
    /// UUID of the libvirt domain (always the VM's metadata.uid).
    #[serde(
        default,
        rename = "domainUUID",
        skip_serializing_if = "Option::is_none"
    )]
    pub domain_uuid: Option<String>,
    /// Network interfaces with their MAC and, where libvirt can tell, IP address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::schema::interfaces")]
    pub interfaces: Vec<InterfaceStatus>,
    /// How often vmlet restarted the VM after it stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_count: Option<i32>,
    /// When the running domain was started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// The last `vmlet.dev/restart` annotation value the agent acted on (kubectl vm restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restart_request: Option<String>,
    /// vCPUs after the class is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<i32>,
    /// Memory after the class is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// Acceleration the domain runs with: kvm or tcg.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
}

/// One network interface as the node sees it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceStatus {
    /// The interface's name in spec.networks.
    pub name: String,
    /// MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The first of `ipAddresses`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
    /// Every IPv4 and IPv6 address of the interface, from the most trusted source that
    /// knows any: the guest agent, then the node's neighbour (ARP) table, then libvirt's
    /// DHCP leases.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub ip_addresses: Vec<String>,
    /// Where the addresses came from: GuestAgent, Neighbour or Lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_source: Option<AddressSource>,
    /// The `ipAddresses` the node itself saw the interface use (its DHCP lease or the
    /// neighbour table), not only the guest's word: Services and readiness probes send
    /// traffic only to these, so that a guest cannot steer them at addresses not its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub confirmed_addresses: Vec<String>,
}

/// Where an interface's addresses were learned, from the most to the least trusted.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
pub enum AddressSource {
    /// The QEMU guest agent (the guest's own view).
    GuestAgent,
    /// The node's neighbour (ARP) table: the guest answered from that address.
    Neighbour,
    /// libvirt's DHCP leases: what the network handed out.
    Lease,
}

impl VirtualMachineSpec {
    /// The disks whose only copy lives on the node the VM runs on: writable image
    /// overlays, blank disks and volumes on local storage (`shared` says which volumes
    /// are on a storage pool). A cloud-init seed is regenerated at every start and a
    /// read-only overlay is never written, so neither counts.
    pub fn node_local_data(&self, shared: &dyn Fn(&str) -> bool) -> Vec<&str> {
        self.disks
            .iter()
            .filter(|d| d.cloud_init.is_none() && d.read_only != Some(true))
            .filter(|d| {
                d.image.is_some()
                    || d.blank.is_some()
                    || d.volume.as_ref().is_some_and(|v| !shared(&v.name))
            })
            .map(|d| d.name.as_str())
            .collect()
    }

    /// The names of the volumes the VM uses.
    pub fn volumes(&self) -> impl Iterator<Item = &str> {
        self.disks
            .iter()
            .filter_map(|d| d.volume.as_ref().map(|v| v.name.as_str()))
    }

    /// Whether the VM may be started on another node without its current disks (node
    /// loss, a drain that shuts it down): only when nothing is lost by it, or its spec
    /// says so. A local volume never moves: its VM runs where it lives.
    pub fn may_restart_elsewhere(&self, shared: &dyn Fn(&str) -> bool) -> bool {
        if self.volumes().any(|v| !shared(v)) {
            return false;
        }
        self.node_local_data(shared).is_empty()
            || self.failover_policy == Some(FailoverPolicy::RestartWithNewDisks)
    }

    /// The CPU after the class is applied: the VM's own `cpu` wins as a whole.
    pub fn effective_cpu(&self, class: Option<&crate::api::VirtualMachineClassSpec>) -> Cpu {
        self.cpu
            .clone()
            .or_else(|| class.and_then(|c| c.cpu.clone()))
            .unwrap_or_default()
    }

    /// The memory quantity after the class is applied.
    pub fn effective_memory<'a>(
        &'a self,
        class: Option<&'a crate::api::VirtualMachineClassSpec>,
    ) -> Option<&'a str> {
        self.memory
            .as_deref()
            .or(class.and_then(|c| c.memory.as_deref()))
    }

    /// The firmware the VM boots: its own, else its class's, else BIOS.
    pub fn effective_firmware(
        &self,
        class: Option<&crate::api::VirtualMachineClassSpec>,
    ) -> Firmware {
        self.firmware
            .or(class.and_then(|c| c.firmware))
            .unwrap_or_default()
    }

    /// What the VM takes from a hypervisor: vCPUs and memory bytes; None when its memory
    /// cannot be known (no memory and no class, or the class is missing).
    pub fn requests(
        &self,
        class: Option<&crate::api::VirtualMachineClassSpec>,
    ) -> Option<(i64, u64)> {
        let memory = crate::api::quantity::parse_bytes(self.effective_memory(class)?).ok()?;
        Some((i64::from(self.effective_cpu(class).vcpus().max(1)), memory))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_node_local_writable_data_pins_a_vm() {
        let disk = |json: serde_json::Value| -> Disk { serde_json::from_value(json).unwrap() };
        let image = || disk(serde_json::json!({"name": "root", "image": {"name": "i"}}));
        let ro =
            || disk(serde_json::json!({"name": "ro", "image": {"name": "i"}, "readOnly": true}));
        let blank = || disk(serde_json::json!({"name": "data", "blank": {"size": "1Gi"}}));
        let seed = || disk(serde_json::json!({"name": "seed", "cloudInit": {}}));
        let vol = |name: &str| disk(serde_json::json!({"name": name, "volume": {"name": name}}));
        use FailoverPolicy::*;
        // (disks, policy) -> (node-local disks, may restart elsewhere)
        type Row = (Vec<Disk>, Option<FailoverPolicy>, Vec<&'static str>, bool);
        let table: Vec<Row> = vec![
            (vec![], None, vec![], true),
            (vec![seed()], None, vec![], true),
            (vec![ro()], None, vec![], true),
            (vec![image()], None, vec!["root"], false),
            (vec![blank(), seed()], None, vec!["data"], false),
            (
                vec![image(), blank()],
                Some(WaitForNode),
                vec!["root", "data"],
                false,
            ),
            (
                vec![image(), blank()],
                Some(RestartWithNewDisks),
                vec!["root", "data"],
                true,
            ),
            // Volumes: "pooled" is on a storage pool, "here" on a node's local storage.
            (vec![vol("pooled"), seed()], None, vec![], true),
            (vec![vol("here")], None, vec!["here"], false),
            // New disks cannot stand in for a local volume: it stays where it lives.
            (
                vec![vol("here")],
                Some(RestartWithNewDisks),
                vec!["here"],
                false,
            ),
            (vec![vol("pooled"), blank()], None, vec!["data"], false),
            (
                vec![vol("pooled"), blank()],
                Some(RestartWithNewDisks),
                vec!["data"],
                true,
            ),
        ];
        let shared = |name: &str| name == "pooled";
        for (disks, policy, local, may) in table {
            let spec = VirtualMachineSpec {
                disks,
                failover_policy: policy,
                ..Default::default()
            };
            assert_eq!(spec.node_local_data(&shared), local);
            assert_eq!(
                spec.may_restart_elsewhere(&shared),
                may,
                "{local:?} {policy:?}"
            );
        }
    }
}
