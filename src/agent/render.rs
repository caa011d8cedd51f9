//! From a VirtualMachine (with its class and the node's local image files) to a domain
//! model. Pure: no I/O, so golden files can pin the output.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::domain::{self, Domain};
use crate::api::quantity;
use crate::api::vm::{self as spec, DiskBus, Firmware, Machine, NicModel, VirtualMachineSpec};
use crate::api::{VirtualMachine, VirtualMachineClassSpec};

/// How guests on this node are accelerated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What the renderer needs to know about the node.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub node: String,
    pub state_dir: PathBuf,
    pub accel: Accel,
    pub uefi: bool,
    /// libvirt's test driver takes domains of type `test` and runs nothing.
    pub test_driver: bool,
}

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

/// Domain names are `vmlet_<namespace>_<name>`: namespaces and VM names never contain
/// '_', so the mapping is one-to-one and stable across restarts.
pub fn domain_name(namespace: &str, name: &str) -> String {
    format!("vmlet_{namespace}_{name}")
}

/// The per-VM directory: overlays, blank disks, seed ISO and console log. Keyed by uid so
/// that a VM deleted and re-created under the same name never sees old disks.
pub fn vm_dir(state_dir: &Path, uid: &str) -> PathBuf {
    state_dir.join("vms").join(uid)
}

pub fn console_log(state_dir: &Path, uid: &str) -> PathBuf {
    vm_dir(state_dir, uid).join("console.log")
}

/// A stable, locally administered unicast MAC from the VM's uid and the interface name.
pub fn derived_mac(uid: &str, nic: &str) -> String {
    let h = Sha256::new()
        .chain_update(uid)
        .chain_update([0])
        .chain_update(nic)
        .finalize();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2])
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
}

impl DiskFile {
    pub fn path(&self) -> &Path {
        match self {
            DiskFile::Overlay { path, .. }
            | DiskFile::Blank { path, .. }
            | DiskFile::Seed { path } => path,
        }
    }
}

/// The files a VM's disks need on the node, in spec order.
pub fn disk_files(
    vm: &VirtualMachineSpec,
    uid: &str,
    state_dir: &Path,
    images: &BTreeMap<String, LocalImage>,
) -> Result<Vec<(spec::Disk, DiskFile)>, RenderError> {
    let dir = vm_dir(state_dir, uid);
    vm.disks
        .iter()
        .map(|d| {
            let file = if let Some(img) = &d.image {
                let local = images
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

/// Renders the domain for `vm`. `images` maps VirtualMachineImage names to local files.
pub fn render(
    vm: &VirtualMachine,
    class: Option<&VirtualMachineClassSpec>,
    images: &BTreeMap<String, LocalImage>,
    node: &NodeFacts,
) -> Result<Domain, RenderError> {
    let uid = vm.metadata.uid.as_deref().ok_or(RenderError::NoUid)?;
    let namespace = vm.metadata.namespace.as_deref().unwrap_or("default");
    let name = vm.metadata.name.as_deref().unwrap_or_default();
    let hw = Hardware::resolve(&vm.spec, class)?;
    if hw.firmware == Firmware::Uefi && !node.uefi {
        return Err(RenderError::NoUefi);
    }
    let machine = match hw.machine {
        Machine::Q35 => "q35",
        Machine::Pc => "pc",
    };

    let mut os = domain::Os {
        firmware: (hw.firmware == Firmware::Uefi).then(|| "efi".to_string()),
        os_type: domain::OsType {
            arch: "x86_64".into(),
            machine: machine.into(),
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

    let (mode, model) = cpu_mode(hw.cpu_model.as_deref(), node.accel);
    let cpu = domain::Cpu {
        mode,
        model,
        topology: domain::Topology {
            sockets: hw.sockets,
            dies: 1,
            cores: hw.cores,
            threads: hw.threads,
        },
    };

    let mut devices = domain::Devices {
        disks: Vec::new(),
        controllers: Vec::new(),
        interfaces: Vec::new(),
        serial: None,
        graphics: None,
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
    let (mut vd, mut sd, mut hd) = (0usize, 0usize, 0usize);
    for (d, file) in disk_files(&vm.spec, uid, &node.state_dir, images)? {
        let seed = matches!(file, DiskFile::Seed { .. });
        // A seed is a CD-ROM: on SATA for q35, on IDE for pc (which has no AHCI).
        let bus = match (seed, d.bus.unwrap_or_default(), hw.machine) {
            (true, _, Machine::Q35) => "sata",
            (true, _, Machine::Pc) => "ide",
            (false, DiskBus::Virtio, _) => "virtio",
            (false, DiskBus::Sata, _) => "sata",
            (false, DiskBus::Scsi, _) => "scsi",
        };
        let dev = match bus {
            "virtio" => device_name("vd", post_inc(&mut vd))?,
            "ide" => device_name("hd", post_inc(&mut hd))?,
            _ => device_name("sd", post_inc(&mut sd))?,
        };
        let readonly = seed || d.read_only == Some(true);
        devices.disks.push(domain::Disk {
            kind: "file".into(),
            device: if seed { "cdrom" } else { "disk" }.into(),
            driver: domain::DiskDriver {
                name: "qemu".into(),
                format: if seed { "raw" } else { "qcow2" }.into(),
                discard: (!seed).then(|| "unmap".into()),
            },
            source: domain::DiskSource {
                file: path_str(file.path()),
            },
            target: domain::DiskTarget {
                dev,
                bus: bus.into(),
            },
            readonly: readonly.then(domain::Empty::default),
            serial: (!seed).then(|| d.name.clone()),
            alias: domain::Alias {
                name: format!("ua-disk-{}", d.name),
            },
        });
    }
    if devices.disks.iter().any(|d| d.target.bus == "scsi") {
        devices.controllers.push(domain::Controller {
            kind: "scsi".into(),
            index: 0,
            model: "virtio-scsi".into(),
        });
    }
    for n in &vm.spec.networks {
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
            continue; // the API refuses a network without a source
        };
        devices.interfaces.push(domain::Interface {
            kind: kind.into(),
            mac: domain::Mac {
                address: n
                    .mac_address
                    .clone()
                    .unwrap_or_else(|| derived_mac(uid, &n.name)),
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
        });
    }
    devices.serial = Some(domain::Serial {
        kind: "file".into(),
        source: domain::SerialSource {
            path: path_str(&console_log(&node.state_dir, uid)),
            append: "on".into(),
        },
        target: domain::SerialTarget { port: 0 },
    });
    if vm.spec.graphics == Some(true) {
        devices.graphics = Some(domain::Graphics {
            kind: "vnc".into(),
            autoport: "yes".into(),
            listen: "127.0.0.1".into(),
        });
    }

    Ok(Domain {
        kind: match (node.test_driver, node.accel) {
            (true, _) => "test",
            (false, Accel::Kvm) => "kvm",
            (false, Accel::Tcg) => "qemu",
        }
        .into(),
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
        os,
        features: domain::Features {
            acpi: domain::Empty {},
            apic: domain::Empty {},
        },
        cpu,
        clock: domain::Clock {
            offset: "utc".into(),
        },
        on_poweroff: "destroy".into(),
        on_reboot: "restart".into(),
        on_crash: "destroy".into(),
        devices,
    })
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
