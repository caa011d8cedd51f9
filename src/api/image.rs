//! The VirtualMachineImage resource: a base disk, kernel or initrd and where to get it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A disk image or boot file. Each node's agent fetches it once, verifies it and caches it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "vmlet.dev",
    version = "v1alpha1",
    kind = "VirtualMachineImage",
    doc = "A disk image, kernel or initrd that VMs boot from: where it comes from (HTTP with a sha256, a host path, a volume or snapshot to publish) and, per node, whether its copy is ready.",
    namespaced,
    status = "VirtualMachineImageStatus",
    shortname = "vmimage",
    category = "vmlet",
    printcolumn = r#"{"name":"Format","type":"string","jsonPath":".spec.format"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("!has(self.source.volume) && !has(self.source.snapshot) || self.format == 'qcow2'").message("an image published from a volume or snapshot is qcow2").field_path(".format"))]
#[x_kube(validation = Rule::new("(!has(oldSelf.source.volume) && !has(oldSelf.source.snapshot)) || self == oldSelf").message("a published image's spec is immutable"))]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineImageSpec {
    /// qcow2 or raw for disks; kernel or initrd for direct kernel boot.
    pub format: ImageFormat,
    /// Where the image comes from: exactly one of http, hostPath, volume or snapshot.
    pub source: ImageSource,
}

impl VirtualMachineImageSpec {
    /// Whether the image is a copy of a volume or snapshot that an agent publishes.
    pub fn published(&self) -> bool {
        self.source.volume.is_some() || self.source.snapshot.is_some()
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Qcow2,
    Raw,
    Kernel,
    Initrd,
}

/// Exactly one of http, hostPath, volume or snapshot.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("[has(self.http), has(self.hostPath), has(self.volume), has(self.snapshot)].exists_one(x, x)").message("exactly one of source.http, source.hostPath, source.volume or source.snapshot must be set"))]
#[serde(rename_all = "camelCase")]
pub struct ImageSource {
    /// Download over http(s), verified against a sha256 before use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSource>,
    /// A file under the agent's image root (default /var/lib/vmlet/images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathSource>,
    /// Publishes a VirtualMachineVolume (same namespace) as a template: copied once, when
    /// no VM uses it, by the node that holds it. The copy lives where the volume does (the
    /// node's local storage, or its pool) and outlives the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<super::vm::ImageRef>,
    /// Publishes one disk of a VirtualMachineSnapshot (same namespace), copied once by the
    /// node that took the snapshot, kept where the snapshot's copy is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<super::volume::SnapshotDiskRef>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct HttpSource {
    /// An http:// or https:// URL.
    #[schemars(length(min = 8, max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^\\\\s]+$') && isURL(self) && url(self).getHostname() != ''").message("source.http.url must be an http:// or https:// URL"))]
    pub url: String,
    /// SHA-256 of the file, 64 lower-case hex digits.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: String,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct HostPathSource {
    /// Absolute path on the node, inside the agent's image root.
    #[schemars(length(min = 2, max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("source.hostPath.path must be absolute"))]
    #[x_kube(validation = Rule::new("!self.split('/').exists(s, s == '..')").message("source.hostPath.path must not contain '..'"))]
    #[x_kube(validation = Rule::new("!self.matches('[\\\\x00-\\\\x1f\\\\x7f-\\\\x9f]')").message("source.hostPath.path must not contain control characters"))]
    pub path: String,
}

/// Per-node state of the image.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineImageStatus {
    /// Summed up over the nodes by the controller: Ready once some node holds a verified
    /// copy; Downloading while one fetches it; Failed when every node that tried failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ImagePhase>,
    /// One entry per node that used the image; each node's agent writes only its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::schema::image_nodes")]
    pub nodes: Vec<ImageNodeStatus>,
    /// Where the copy of a published image (source volume or snapshot) lives, written
    /// once by the agent that made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<PublishedImage>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::schema::conditions")]
    pub conditions: Vec<Condition>,
}

/// The copy of a published image: VMs and volumes that use the image run where it is.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PublishedImage {
    /// `local` (on `node` only) or the storage pool that holds the copy.
    pub storage: String,
    /// The node that made the copy; for local storage, the only node that has it.
    pub node: String,
    /// The copy's size as a disk, in bytes.
    pub size_bytes: i64,
}

impl PublishedImage {
    /// The node a VM using the image must run on, if the copy is local.
    pub fn pinned_node(&self) -> Option<&str> {
        (self.storage == super::volume::LOCAL).then_some(self.node.as_str())
    }
}

/// Where an image stands, on one node or overall.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ImagePhase {
    /// Nothing tried yet.
    #[default]
    Pending,
    Downloading,
    Ready,
    Failed,
}

impl ImagePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            ImagePhase::Pending => "Pending",
            ImagePhase::Downloading => "Downloading",
            ImagePhase::Ready => "Ready",
            ImagePhase::Failed => "Failed",
        }
    }

    /// Pure: the image's phase from its nodes' entries.
    pub fn of_nodes(nodes: &[ImageNodeStatus]) -> ImagePhase {
        let any = |p: ImagePhase| nodes.iter().any(|n| n.phase == p);
        if any(ImagePhase::Ready) {
            ImagePhase::Ready
        } else if any(ImagePhase::Downloading) {
            ImagePhase::Downloading
        } else if !nodes.is_empty() && nodes.iter().all(|n| n.phase == ImagePhase::Failed) {
            ImagePhase::Failed
        } else {
            ImagePhase::Pending
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageNodeStatus {
    /// The node.
    pub node: String,
    /// Downloading, Ready or Failed on that node.
    pub phase: ImagePhase,
    /// Bytes fetched so far, while downloading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<i64>,
    /// Size of the cached file in bytes, once ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<i64>,
    /// Why it failed, as a CamelCase word.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Why it failed, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_phase_sums_up_its_nodes() {
        let n = |phase| ImageNodeStatus {
            node: "n".into(),
            phase,
            ..Default::default()
        };
        use ImagePhase::*;
        let cases: [(&[ImagePhase], ImagePhase); 7] = [
            (&[], Pending),
            (&[Ready], Ready),
            (&[Failed, Ready], Ready),
            (&[Failed, Downloading], Downloading),
            (&[Failed], Failed),
            (&[Failed, Failed], Failed),
            (&[Pending, Failed], Pending),
        ];
        for (nodes, want) in cases {
            let nodes: Vec<_> = nodes.iter().map(|p| n(*p)).collect();
            assert_eq!(ImagePhase::of_nodes(&nodes), want, "{nodes:?}");
        }
    }
}
