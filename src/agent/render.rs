//! From a VirtualMachine (with its class and the node's local image files) to a domain
//! model. Pure: no I/O, so golden files can pin the output.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::domain::{self, Domain};
use super::layout::{console_log, domain_name, vm_dir};
use super::node::{Accel, NodeFacts};
use super::volumes::{LocalVolume, Origin};
use crate::api::quantity;
use crate::api::vm::{self as spec, DiskBus, Firmware, Machine, NicModel, VirtualMachineSpec};
use crate::api::{VirtualMachine, VirtualMachineClassSpec};

/// The virtio-serial port name qemu-ga looks for in the guest.
pub const GUEST_AGENT_CHANNEL: &str = "org.qemu.guest_agent.0";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("VM has no uid yet")]
    NoUid,
    #[error("spec.memory is not set and the class does not set it")]
    NoMemory,
    #[error("{0}")]
    BadQuantity(#[from] quantity::ParseError),
    #[error(
        "firmware uefi is asked for, but this node's libvirt offers no UEFI firmware (install OVMF: the Debian package ovmf)"
    )]
    NoUefi,
    #[error("VirtualMachineImage {0:?} is not available on this node")]
    ImageMissing(String),
    #[error("VirtualMachineVolume {0:?} is not available on this node")]
    VolumeMissing(String),
    #[error("too many {0} disks")]
    TooManyDisks(&'static str),
}

/// Hardware after the class is applied: fields on the VM win.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hardware {
    pub sockets: u32,
    pub cores: u32,
    pub threads: u32,
    pub cpu_model: Option<String>,
    pub memory_bytes: u64,
    pub machine: Machine,
    pub firmware: Firmware,
}

impl Hardware {
    pub fn vcpus(&self) -> u32 {
        self.sockets * self.cores * self.threads
    }

    pub fn resolve(
        vm: &VirtualMachineSpec,
        class: Option<&VirtualMachineClassSpec>,
    ) -> Result<Self, RenderError> {
        let cpu = vm.effective_cpu(class);
        let memory = vm.effective_memory(class).ok_or(RenderError::NoMemory)?;
        Ok(Hardware {
            // The schema keeps these in 1..=128; the clamp only guards hand-made objects.
            sockets: cpu.sockets.unwrap_or(1).clamp(1, 128) as u32,
            cores: cpu.cores.unwrap_or(1).clamp(1, 128) as u32,
            threads: cpu.threads.unwrap_or(1).clamp(1, 128) as u32,
            cpu_model: cpu.model,
            memory_bytes: quantity::parse_bytes(memory)?,
            machine: vm
                .machine
                .or(class.and_then(|c| c.machine))
                .unwrap_or_default(),
            firmware: vm.effective_firmware(class),
        })
    }
}

/// A disk's file on the node and how the domain attaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskFile {
    /// A qcow2 overlay whose backing file is the cached image.
    Overlay {
        path: PathBuf,
        base: PathBuf,
        base_format: &'static str,
    },
    /// A new empty qcow2 of `size` bytes.
    Blank { path: PathBuf, size: u64 },
    /// A cloud-init NoCloud seed ISO.
    Seed { path: PathBuf },
    /// A VirtualMachineVolume's qcow2 file (outside the VM's directory: it outlives the
    /// VM), made from `origin` when it does not exist. A `shared` one (on a storage pool)
    /// bypasses the host's page cache, so that another host that opens it after a
    /// migration or a failover reads what this one wrote.
    Volume {
        path: PathBuf,
        size: u64,
        origin: Origin,
        shared: bool,
    },
}

impl DiskFile {
    pub fn path(&self) -> &Path {
        match self {
            DiskFile::Overlay { path, .. }
            | DiskFile::Blank { path, .. }
            | DiskFile::Volume { path, .. }
            | DiskFile::Seed { path } => path,
        }
    }
}

/// What a VM's disks and boot files are made of on this node, by the names the spec uses.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub images: BTreeMap<String, LocalImage>,
    pub volumes: BTreeMap<String, LocalVolume>,
}

impl From<BTreeMap<String, LocalImage>> for Sources {
    fn from(images: BTreeMap<String, LocalImage>) -> Self {
        Sources {
            images,
            volumes: BTreeMap::new(),
        }
    }
}

/// The files a VM's disks need on the node, in spec order.
pub fn disk_files(
    vm: &VirtualMachineSpec,
    uid: &str,
    state_dir: &Path,
    sources: &Sources,
) -> Result<Vec<(spec::Disk, DiskFile)>, RenderError> {
    let dir = vm_dir(state_dir, uid);
    vm.disks
        .iter()
        .map(|d| {
            let file = if let Some(v) = &d.volume {
                let local = sources
                    .volumes
                    .get(&v.name)
                    .ok_or_else(|| RenderError::VolumeMissing(v.name.clone()))?;
                DiskFile::Volume {
                    path: local.path.clone(),
                    size: local.size,
                    origin: local.origin.clone(),
                    shared: local.shared,
                }
            } else if let Some(img) = &d.image {
                let local = sources
                    .images
                    .get(&img.name)
                    .ok_or_else(|| RenderError::ImageMissing(img.name.clone()))?;
                DiskFile::Overlay {
                    path: dir.join(format!("disk-{}.qcow2", d.name)),
                    base: local.path.clone(),
                    base_format: local.format,
                }
            } else if let Some(blank) = &d.blank {
                DiskFile::Blank {
                    path: dir.join(format!("disk-{}.qcow2", d.name)),
                    size: quantity::parse_bytes(&blank.size)?,
                }
            } else {
                DiskFile::Seed {
                    path: dir.join(format!("disk-{}.iso", d.name)),
                }
            };
            Ok((d.clone(), file))
        })
        .collect()
}

/// A verified image file on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalImage {
    pub path: PathBuf,
    /// qcow2 or raw for disks; raw for kernels and initrds.
    pub format: &'static str,
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn device_name(prefix: &'static str, index: usize) -> Result<String, RenderError> {
    // vda..vdz is plenty: the API allows 16 disks.
    let letter = b"abcdefghijklmnopqrstuvwxyz"
        .get(index)
        .ok_or(RenderError::TooManyDisks(prefix))?;
    Ok(format!("{prefix}{}", *letter as char))
}

/// Renders the domain for `vm`. `sources` maps image and volume names to local files.
pub fn render(
    vm: &VirtualMachine,
    class: Option<&VirtualMachineClassSpec>,
    sources: &Sources,
    node: &NodeFacts,
) -> Result<Domain, RenderError> {
    let uid = vm.metadata.uid.as_deref().ok_or(RenderError::NoUid)?;
    let namespace = vm.metadata.namespace.as_deref().unwrap_or("default");
    let name = vm.metadata.name.as_deref().unwrap_or_default();
    let hw = Hardware::resolve(&vm.spec, class)?;
    if hw.firmware == Firmware::Uefi && !node.uefi {
        return Err(RenderError::NoUefi);
    }
    let (disks, controllers) = disks_of(vm, uid, node, sources, hw.machine)?;
    let devices = domain::Devices {
        disks,
        controllers,
        interfaces: interfaces_of(vm, uid),
        serial: Some(serial_of(node, uid)),
        channel: (vm.spec.guest_agent == Some(true)).then(|| domain::Channel {
            kind: "unix".into(),
            target: domain::ChannelTarget {
                kind: "virtio".into(),
                name: GUEST_AGENT_CHANNEL.into(),
            },
        }),
        graphics: (vm.spec.graphics == Some(true)).then(|| domain::Graphics {
            kind: "vnc".into(),
            listen: domain::GraphicsListen {
                kind: "none".into(),
            },
        }),
        video: domain::Video {
            model: domain::Model {
                kind: if vm.spec.graphics == Some(true) {
                    "vga"
                } else {
                    "none"
                }
                .into(),
            },
        },
        memballoon: domain::ModelOnly {
            model: "virtio".into(),
        },
        rng: domain::Rng {
            model: "virtio".into(),
            backend: domain::RngBackend {
                model: "random".into(),
                path: "/dev/urandom".into(),
            },
        },
    };
    Ok(Domain {
        kind: node.domain_type.clone(),
        name: domain_name(namespace, name),
        uuid: uid.to_string(),
        metadata: domain::Metadata {
            vm: domain::VmMetadata {
                xmlns: domain::METADATA_NS.into(),
                namespace: namespace.into(),
                name: name.into(),
                uid: uid.into(),
                generation: vm.metadata.generation.unwrap_or(0),
                node: node.node.clone(),
                hash: String::new(),
            },
        },
        memory: domain::Memory {
            unit: "KiB".into(),
            value: hw.memory_bytes.div_ceil(1024),
        },
        vcpu: domain::Vcpu {
            placement: "static".into(),
            count: hw.vcpus(),
        },
        os: os_of(vm, &hw, &sources.images)?,
        features: domain::Features {
            acpi: domain::Empty {},
            apic: domain::Empty {},
            // Unbounded, QEMU sizes it at an eighth of host memory (up to 1 GiB) per VM;
            // the bound is part of the overhead the scheduler reserves.
            tcg: (node.accel == super::node::Accel::Tcg).then(|| domain::Tcg {
                tb_cache: domain::TbCache {
                    unit: "MiB".into(),
                    size: super::overhead::TB_CACHE_MIB,
                },
            }),
        },
        cpu: cpu_of(&hw, node.accel),
        clock: domain::Clock {
            offset: "utc".into(),
        },
        on_poweroff: "destroy".into(),
        on_reboot: "restart".into(),
        on_crash: "destroy".into(),
        devices,
    })
}

/// Firmware, machine, and how it boots: a kernel of its own, or the first disk.
fn os_of(
    vm: &VirtualMachine,
    hw: &Hardware,
    images: &BTreeMap<String, LocalImage>,
) -> Result<domain::Os, RenderError> {
    let mut os = domain::Os {
        firmware: (hw.firmware == Firmware::Uefi).then(|| "efi".to_string()),
        os_type: domain::OsType {
            arch: "x86_64".into(),
            machine: match hw.machine {
                Machine::Q35 => "q35",
                Machine::Pc => "pc",
            }
            .into(),
            value: "hvm".into(),
        },
        kernel: None,
        initrd: None,
        cmdline: None,
        boot: Vec::new(),
    };
    let boot_image = |r: &spec::ImageRef| {
        images
            .get(&r.name)
            .map(|i| path_str(&i.path))
            .ok_or_else(|| RenderError::ImageMissing(r.name.clone()))
    };
    match &vm.spec.boot {
        Some(boot) if boot.kernel.is_some() => {
            os.kernel = boot.kernel.as_ref().map(boot_image).transpose()?;
            os.initrd = boot.initrd.as_ref().map(boot_image).transpose()?;
            os.cmdline = boot.cmdline.clone();
        }
        _ => os.boot.push(domain::BootDev { dev: "hd".into() }),
    }
    Ok(os)
}

fn cpu_of(hw: &Hardware, accel: Accel) -> domain::Cpu {
    let (mode, model) = cpu_mode(hw.cpu_model.as_deref(), accel);
    domain::Cpu {
        mode,
        model,
        topology: domain::Topology {
            sockets: hw.sockets,
            dies: 1,
            cores: hw.cores,
            threads: hw.threads,
        },
    }
}

/// The bus a disk is attached to in the guest, and its device names there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bus {
    Virtio,
    Sata,
    Scsi,
    Ide,
}

impl Bus {
    /// A seed is a CD-ROM: on SATA for q35, on IDE for pc (which has no AHCI).
    fn of(seed: bool, asked: DiskBus, machine: Machine) -> Self {
        match (seed, asked, machine) {
            (true, _, Machine::Q35) => Bus::Sata,
            (true, _, Machine::Pc) => Bus::Ide,
            (false, DiskBus::Virtio, _) => Bus::Virtio,
            (false, DiskBus::Sata, _) => Bus::Sata,
            (false, DiskBus::Scsi, _) => Bus::Scsi,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Bus::Virtio => "virtio",
            Bus::Sata => "sata",
            Bus::Scsi => "scsi",
            Bus::Ide => "ide",
        }
    }

    /// SATA and SCSI disks share the `sd` names.
    fn prefix(self) -> &'static str {
        match self {
            Bus::Virtio => "vd",
            Bus::Ide => "hd",
            Bus::Sata | Bus::Scsi => "sd",
        }
    }
}

/// How a disk file is read: the seed ISO as it is, every other disk as qcow2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Qcow2,
    Raw,
}

impl Format {
    fn as_str(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }
}

/// The disks in spec order, named per bus, and the SCSI controller when a disk needs one.
fn disks_of(
    vm: &VirtualMachine,
    uid: &str,
    node: &NodeFacts,
    sources: &Sources,
    machine: Machine,
) -> Result<(Vec<domain::Disk>, Vec<domain::Controller>), RenderError> {
    let mut used: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut disks = Vec::new();
    for (d, file) in disk_files(&vm.spec, uid, &node.state_dir, sources)? {
        let seed = matches!(file, DiskFile::Seed { .. });
        let bus = Bus::of(seed, d.bus.unwrap_or_default(), machine);
        let dev = device_name(
            bus.prefix(),
            post_inc(used.entry(bus.prefix()).or_default()),
        )?;
        let format = if seed { Format::Raw } else { Format::Qcow2 };
        disks.push(domain::Disk {
            kind: "file".into(),
            device: if seed { "cdrom" } else { "disk" }.into(),
            driver: domain::DiskDriver {
                name: "qemu".into(),
                format: format.as_str().into(),
                discard: (!seed).then(|| "unmap".into()),
                cache: matches!(file, DiskFile::Volume { shared: true, .. }).then(|| "none".into()),
            },
            source: domain::DiskSource {
                file: path_str(file.path()),
            },
            target: domain::DiskTarget {
                dev,
                bus: bus.as_str().into(),
            },
            readonly: (seed || d.read_only == Some(true)).then(domain::Empty::default),
            serial: (!seed).then(|| d.name.clone()),
            alias: domain::Alias {
                name: format!("ua-disk-{}", d.name),
            },
        });
    }
    let controllers = disks
        .iter()
        .any(|d| d.target.bus == Bus::Scsi.as_str())
        .then(|| domain::Controller {
            kind: "scsi".into(),
            index: 0,
            model: "virtio-scsi".into(),
        })
        .into_iter()
        .collect();
    Ok((disks, controllers))
}

fn interfaces_of(vm: &VirtualMachine, uid: &str) -> Vec<domain::Interface> {
    vm.spec
        .networks
        .iter()
        .filter_map(|n| {
            let (kind, source) = if n.user.is_some() {
                ("user", None)
            } else if let Some(net) = &n.network {
                (
                    "network",
                    Some(domain::InterfaceSource {
                        network: Some(net.name.clone()),
                        bridge: None,
                    }),
                )
            } else if let Some(br) = &n.bridge {
                (
                    "bridge",
                    Some(domain::InterfaceSource {
                        network: None,
                        bridge: Some(br.name.clone()),
                    }),
                )
            } else {
                return None; // the API refuses a network without a source
            };
            Some(domain::Interface {
                kind: kind.into(),
                mac: domain::Mac {
                    address: super::layout::mac_of(uid, n),
                },
                source,
                model: domain::Model {
                    kind: match n.model.unwrap_or_default() {
                        NicModel::Virtio => "virtio",
                        NicModel::E1000e => "e1000e",
                    }
                    .into(),
                },
                alias: domain::Alias {
                    name: format!("ua-net-{}", n.name),
                },
            })
        })
        .collect()
}

/// The serial console, appended to a file the agent can follow.
fn serial_of(node: &NodeFacts, uid: &str) -> domain::Serial {
    domain::Serial {
        kind: "pty".into(),
        log: domain::SerialLog {
            file: path_str(&console_log(&node.state_dir, uid)),
            append: "on".into(),
        },
        target: domain::SerialTarget { port: 0 },
    }
}

fn post_inc(n: &mut usize) -> usize {
    *n += 1;
    *n - 1
}

/// KVM can expose the host CPU; TCG emulates one, so host-* modes become QEMU's
/// `maximum` there and the default is a plain named model.
fn cpu_mode(model: Option<&str>, accel: Accel) -> (String, Option<domain::CpuModel>) {
    let named = |m: &str| {
        Some(domain::CpuModel {
            fallback: "allow".into(),
            name: m.into(),
        })
    };
    match (model, accel) {
        (Some(m @ ("host-model" | "host-passthrough")), Accel::Kvm) => (m.into(), None),
        (Some("host-model" | "host-passthrough"), Accel::Tcg) => ("maximum".into(), None),
        (Some(m), _) => ("custom".into(), named(m)),
        (None, Accel::Kvm) => ("host-model".into(), None),
        (None, Accel::Tcg) => ("custom".into(), named("qemu64")),
    }
}

/// Fills in the hardware hash and serialises: the hash covers everything but the metadata
/// element, so a new generation that changes no hardware keeps the same hash.
pub fn finish(mut d: Domain) -> Result<(String, String), quick_xml::SeError> {
    let mut bare = d.clone();
    bare.metadata.vm.generation = 0;
    let hash = hex::encode(&Sha256::digest(bare.to_xml()?.as_bytes())[..8]);
    d.metadata.vm.hash = hash.clone();
    Ok((d.to_xml()?, hash))
}
