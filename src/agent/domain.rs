//! A typed model of the libvirt domain XML vmlet writes, serialised through quick-xml.
//!
//! Only the elements vmlet uses are modelled. Every string reaches the XML through the
//! serializer, which escapes it; field order fixes element order, so output is
//! deterministic. The same types deserialise, which lets tests parse output back.

use serde::{Deserialize, Serialize};

/// The namespace of vmlet's `<metadata>` element.
pub const METADATA_NS: &str = "https://vmlet.dev/xmlns/domain/v1alpha1";

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename = "domain")]
pub struct Domain {
    #[serde(rename = "@type")]
    pub kind: String,
    pub name: String,
    pub uuid: String,
    pub metadata: Metadata,
    pub memory: Memory,
    pub vcpu: Vcpu,
    pub os: Os,
    pub features: Features,
    pub cpu: Cpu,
    pub clock: Clock,
    pub on_poweroff: String,
    pub on_reboot: String,
    pub on_crash: String,
    pub devices: Devices,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Metadata {
    // quick-xml matches elements by local name when reading.
    #[serde(rename(serialize = "vmlet:vm", deserialize = "vm"))]
    pub vm: VmMetadata,
}

/// Who owns the domain: lets a restarted agent adopt it, or remove it when its VM is gone.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct VmMetadata {
    #[serde(
        rename(serialize = "@xmlns:vmlet", deserialize = "@xmlns:vmlet"),
        alias = "@vmlet"
    )]
    pub xmlns: String,
    #[serde(rename = "@namespace")]
    pub namespace: String,
    #[serde(rename = "@name")]
    pub name: String,
    #[serde(rename = "@uid")]
    pub uid: String,
    #[serde(rename = "@generation")]
    pub generation: i64,
    /// The node whose agent owns the domain: agents sharing a libvirtd (tests, a
    /// misconfigured host) never sweep each other's domains.
    #[serde(rename = "@node")]
    pub node: String,
    /// Hash of the domain as rendered without this metadata: tells whether a spec change
    /// changed the hardware (and so needs a restart) or not.
    #[serde(rename = "@hash", default)]
    pub hash: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Memory {
    #[serde(rename = "@unit")]
    pub unit: String,
    #[serde(rename = "$text")]
    pub value: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Vcpu {
    #[serde(rename = "@placement")]
    pub placement: String,
    #[serde(rename = "$text")]
    pub count: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Os {
    #[serde(rename = "@firmware", default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<String>,
    #[serde(rename = "type")]
    pub os_type: OsType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub boot: Vec<BootDev>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct OsType {
    #[serde(rename = "@arch")]
    pub arch: String,
    #[serde(rename = "@machine")]
    pub machine: String,
    #[serde(rename = "$text")]
    pub value: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct BootDev {
    #[serde(rename = "@dev")]
    pub dev: String,
}

/// An element with neither attributes nor children, such as `<acpi/>`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Empty {}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Features {
    pub acpi: Empty,
    pub apic: Empty,
    /// TCG guests only: the bound on QEMU's translation cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcg: Option<Tcg>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Tcg {
    #[serde(rename = "tb-cache")]
    pub tb_cache: TbCache,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TbCache {
    #[serde(rename = "@unit")]
    pub unit: String,
    #[serde(rename = "$text")]
    pub size: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Cpu {
    #[serde(rename = "@mode")]
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<CpuModel>,
    pub topology: Topology,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CpuModel {
    #[serde(rename = "@fallback")]
    pub fallback: String,
    #[serde(rename = "$text")]
    pub name: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Topology {
    #[serde(rename = "@sockets")]
    pub sockets: u32,
    #[serde(rename = "@dies")]
    pub dies: u32,
    #[serde(rename = "@cores")]
    pub cores: u32,
    #[serde(rename = "@threads")]
    pub threads: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Clock {
    #[serde(rename = "@offset")]
    pub offset: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Devices {
    #[serde(rename = "disk", default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
    #[serde(rename = "controller", default, skip_serializing_if = "Vec::is_empty")]
    pub controllers: Vec<Controller>,
    #[serde(rename = "interface", default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<Serial>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<Channel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graphics: Option<Graphics>,
    pub video: Video,
    pub memballoon: ModelOnly,
    pub rng: Rng,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Disk {
    #[serde(rename = "@type")]
    pub kind: String,
    #[serde(rename = "@device")]
    pub device: String,
    pub driver: DiskDriver,
    pub source: DiskSource,
    pub target: DiskTarget,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readonly: Option<Empty>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    pub alias: Alias,
}

/// A disk as libvirt describes it in any domain XML (its live XML has more than the
/// model above, and in other shapes): what storage operations need to find a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRef {
    /// disk or cdrom.
    pub device: String,
    /// The target device name (vda, sdb).
    pub dev: String,
    /// The source file, when it is a file.
    pub file: Option<String>,
    pub readonly: bool,
}

/// The disks in a domain XML, read leniently (every other element ignored).
pub fn disks_in(xml: &str) -> Result<Vec<DiskRef>, quick_xml::DeError> {
    #[derive(Deserialize)]
    struct Dom {
        devices: Devs,
    }
    #[derive(Deserialize)]
    struct Devs {
        #[serde(rename = "disk", default)]
        disks: Vec<D>,
    }
    #[derive(Deserialize)]
    struct D {
        #[serde(rename = "@device", default)]
        device: String,
        source: Option<Src>,
        target: Tgt,
        readonly: Option<serde::de::IgnoredAny>,
    }
    #[derive(Deserialize)]
    struct Src {
        #[serde(rename = "@file")]
        file: Option<String>,
    }
    #[derive(Deserialize)]
    struct Tgt {
        #[serde(rename = "@dev")]
        dev: String,
    }
    let d: Dom = quick_xml::de::from_str(xml)?;
    Ok(d.devices
        .disks
        .into_iter()
        .map(|d| DiskRef {
            device: if d.device.is_empty() {
                "disk".into()
            } else {
                d.device
            },
            dev: d.target.dev,
            file: d.source.and_then(|s| s.file),
            readonly: d.readonly.is_some(),
        })
        .collect())
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DiskDriver {
    #[serde(rename = "@name")]
    pub name: String,
    #[serde(rename = "@type")]
    pub format: String,
    #[serde(rename = "@discard", default, skip_serializing_if = "Option::is_none")]
    pub discard: Option<String>,
    #[serde(rename = "@cache", default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DiskSource {
    #[serde(rename = "@file")]
    pub file: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DiskTarget {
    #[serde(rename = "@dev")]
    pub dev: String,
    #[serde(rename = "@bus")]
    pub bus: String,
}

/// A user alias (libvirt requires the `ua-` prefix) naming the device after the spec.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Alias {
    #[serde(rename = "@name")]
    pub name: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Controller {
    #[serde(rename = "@type")]
    pub kind: String,
    #[serde(rename = "@index")]
    pub index: u32,
    #[serde(rename = "@model")]
    pub model: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Interface {
    #[serde(rename = "@type")]
    pub kind: String,
    pub mac: Mac,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<InterfaceSource>,
    pub model: Model,
    pub alias: Alias,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Mac {
    #[serde(rename = "@address")]
    pub address: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct InterfaceSource {
    #[serde(rename = "@network", default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    #[serde(rename = "@bridge", default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Model {
    #[serde(rename = "@type")]
    pub kind: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ModelOnly {
    #[serde(rename = "@model")]
    pub model: String,
}

/// The serial console: a pty libvirt hands out as a stream (virDomainOpenConsole), its
/// output also logged (by virtlogd) to a file the agent can follow.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Serial {
    #[serde(rename = "@type")]
    pub kind: String,
    pub log: SerialLog,
    pub target: SerialTarget,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SerialLog {
    #[serde(rename = "@file")]
    pub file: String,
    #[serde(rename = "@append")]
    pub append: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SerialTarget {
    #[serde(rename = "@port")]
    pub port: u32,
}

/// The guest agent's virtio-serial channel; libvirt picks the host socket's path.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Channel {
    #[serde(rename = "@type")]
    pub kind: String,
    pub target: ChannelTarget,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ChannelTarget {
    #[serde(rename = "@type")]
    pub kind: String,
    #[serde(rename = "@name")]
    pub name: String,
}

/// VNC without a listening socket: clients come only through libvirt
/// (virDomainOpenGraphicsFD), so no port opens on the host.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Graphics {
    #[serde(rename = "@type")]
    pub kind: String,
    pub listen: GraphicsListen,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct GraphicsListen {
    #[serde(rename = "@type")]
    pub kind: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Video {
    pub model: Model,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Rng {
    #[serde(rename = "@model")]
    pub model: String,
    pub backend: RngBackend,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RngBackend {
    #[serde(rename = "@model")]
    pub model: String,
    #[serde(rename = "$text")]
    pub path: String,
}

impl Domain {
    /// The domain XML, indented, with a trailing newline.
    pub fn to_xml(&self) -> Result<String, quick_xml::SeError> {
        let mut out = String::new();
        let mut ser = quick_xml::se::Serializer::new(&mut out);
        ser.indent(' ', 2);
        self.serialize(ser)?;
        out.push('\n');
        Ok(out)
    }

    pub fn from_xml(xml: &str) -> Result<Self, quick_xml::DeError> {
        quick_xml::de::from_str(xml)
    }
}

/// Reads vmlet's metadata out of any domain's XML; `None` for domains vmlet did not define.
pub fn owner_of(xml: &str) -> Option<VmMetadata> {
    #[derive(Deserialize)]
    struct Outer {
        metadata: Option<OuterMeta>,
    }
    #[derive(Deserialize)]
    struct OuterMeta {
        #[serde(rename = "vm")]
        vm: Option<VmMetadata>,
    }
    let outer: Outer = quick_xml::de::from_str(xml).ok()?;
    let vm = outer.metadata?.vm?;
    (vm.xmlns == METADATA_NS).then_some(vm)
}
