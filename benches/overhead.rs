//! QEMU's memory beyond guest RAM: the tiny guest (hack/tiny-guest.sh), rendered by
//! vmlet's own renderer, defined and started on qemu:///system (hack/libvirt.sh up),
//! for several guest sizes and vCPU counts. Each QEMU's resident memory is read from
//! /proc/PID/smaps once the guest has reached userspace and settled: the guest RAM
//! mapping (the anonymous mapping of exactly the guest's size) apart, the rest is
//! overhead. Fits fixed + per vCPU + per GiB and prints it beside the formula the agent
//! reserves.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vmlet::agent::node::{Accel, NodeFacts};
use vmlet::agent::render::{self, LocalImage};
use vmlet::api::VirtualMachine;

const MI: f64 = (1u64 << 20) as f64;

fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()
        .expect("virsh")
}

/// Resident KiB of the guest RAM mapping and of everything else in process `pid`.
fn resident(pid: u32, guest_bytes: u64) -> std::io::Result<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let (mut guest, mut other) = (0u64, 0u64);
    let mut is_guest = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: "start-end perms offset dev inode [path]".
            let (s, e) = first.split_once('-').unwrap_or(("0", "0"));
            let size =
                u64::from_str_radix(e, 16).unwrap_or(0) - u64::from_str_radix(s, 16).unwrap_or(0);
            let inode = line.split_whitespace().nth(4).unwrap_or("0");
            is_guest = size == guest_bytes && inode == "0";
        } else if first == "Rss:" {
            let kib: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            if is_guest {
                guest += kib;
            } else {
                other += kib;
            }
        }
    }
    Ok((guest, other))
}

/// The QEMU process of domain `uuid`: the one whose command line names it as its guest.
fn qemu_pid(uuid: &str) -> Option<u32> {
    let out = virsh(&["domname", uuid]);
    let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let needle = format!("guest={name},");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        (cmdline.contains("qemu-system") && cmdline.contains(&needle)).then_some(pid)
    })
}

struct Sample {
    vcpus: u32,
    memory_mib: u64,
    guest_rss_mib: f64,
    overhead_mib: f64,
}

/// Boots one guest of that size, measures it, removes it.
fn measure(
    dir: &Path,
    images: &BTreeMap<String, LocalImage>,
    vcpus: u32,
    memory_mib: u64,
) -> anyhow::Result<Sample> {
    let name = format!("overhead-{vcpus}c-{memory_mib}m");
    let vm: VirtualMachine = serde_json::from_value(serde_json::json!({
        "apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": "bench", "uid": format!("00000000-0000-4000-8000-{vcpus:04}{memory_mib:08}")},
        "spec": {
            "memory": format!("{memory_mib}Mi"),
            "cpu": {"cores": vcpus},
            "boot": {"kernel": {"name": "tiny-kernel"}, "initrd": {"name": "tiny-initrd"}, "cmdline": "console=ttyS0 panic=-1"},
        }
    }))?;
    let facts = NodeFacts {
        node: "bench".into(),
        state_dir: dir.to_path_buf(),
        accel: Accel::Tcg,
        uefi: false,
        domain_type: "qemu".into(),
    };
    let domain = render::render(&vm, None, &images.clone().into(), &facts)?;
    let (xml, _) = render::finish(domain)?;
    let uid = vm.metadata.uid.clone().unwrap_or_default();
    let vm_dir = dir.join("vms").join(&uid);
    std::fs::create_dir_all(&vm_dir)?;
    let file = dir.join(format!("{name}.xml"));
    std::fs::write(&file, xml)?;
    let _ = virsh(&["destroy", &uid]);
    let _ = virsh(&["undefine", &uid]);
    let out = virsh(&["define", file.to_str().unwrap_or_default()]);
    anyhow::ensure!(
        out.status.success(),
        "define: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = virsh(&["start", &uid]);
    anyhow::ensure!(
        out.status.success(),
        "start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let console = vm_dir.join("console.log");
    let t = Instant::now();
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("vmlet-guest-up")
    {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(120),
            "guest {name} never reached userspace"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Settled: the guest's init is done, and QEMU's lazily grown buffers with it.
    std::thread::sleep(Duration::from_secs(5));
    let pid = qemu_pid(&uid).ok_or_else(|| anyhow::anyhow!("no pid file for {uid}"))?;
    let (guest, other) = resident(pid, memory_mib << 20)?;
    let _ = virsh(&["destroy", &uid]);
    let _ = virsh(&["undefine", &uid]);
    Ok(Sample {
        vcpus,
        memory_mib,
        guest_rss_mib: guest as f64 / 1024.0,
        overhead_mib: other as f64 / 1024.0,
    })
}

/// Least squares of overhead = a + b x vcpus + c x GiB.
#[allow(clippy::needless_range_loop)] // matrix arithmetic reads best by index
fn fit(samples: &[Sample]) -> (f64, f64, f64) {
    let rows: Vec<[f64; 4]> = samples
        .iter()
        .map(|s| {
            [
                1.0,
                f64::from(s.vcpus),
                s.memory_mib as f64 / 1024.0,
                s.overhead_mib,
            ]
        })
        .collect();
    // Normal equations, 3x3, by Gaussian elimination.
    let mut m = [[0.0f64; 4]; 3];
    for r in &rows {
        for i in 0..3 {
            for j in 0..3 {
                m[i][j] += r[i] * r[j];
            }
            m[i][3] += r[i] * r[3];
        }
    }
    for i in 0..3 {
        let p = m[i][i];
        for j in i..4 {
            m[i][j] /= p;
        }
        for k in 0..3 {
            if k != i {
                let f = m[k][i];
                for j in i..4 {
                    m[k][j] -= f * m[i][j];
                }
            }
        }
    }
    (m[0][3], m[1][3], m[2][3])
}

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let guest = root.join(".cache/guest");
    anyhow::ensure!(
        guest.join("vmlinuz").exists(),
        "run hack/tiny-guest.sh first"
    );
    // QEMU runs as its own user: a directory it may enter and files it may read.
    let dir = tempfile::Builder::new()
        .prefix("vmlet-overhead")
        .tempdir_in("/var/tmp")?;
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let mut images = BTreeMap::new();
    for (name, file) in [("tiny-kernel", "vmlinuz"), ("tiny-initrd", "initrd.gz")] {
        let to = dir.path().join(file);
        std::fs::copy(guest.join(file), &to)?;
        images.insert(
            name.to_string(),
            LocalImage {
                path: to,
                format: "raw",
            },
        );
    }
    let shapes = [(1, 128), (1, 512), (1, 1024), (1, 2048), (2, 512), (4, 512)];
    let mut samples = Vec::new();
    for (vcpus, mib) in shapes {
        samples.push(measure(dir.path(), &images, vcpus, mib)?);
    }
    let (a, b, c) = fit(&samples);
    let reserved = vmlet::agent::overhead::default_for(Accel::Tcg);
    println!("## QEMU's memory beyond guest RAM\n");
    println!(
        "The tiny guest rendered by vmlet, started with `virsh` on qemu:///system under TCG, measured 5 s after its first userspace line: resident memory outside the guest RAM mapping (/proc/PID/smaps). KVM guests hang on this machine kind, so KVM is not measured here.\n"
    );
    println!(
        "| vCPUs | guest memory | guest RAM resident | overhead (resident, outside guest RAM) | reserved by the formula |\n|---|---|---|---|---|"
    );
    for s in &samples {
        let r = reserved.of(1, i64::from(s.vcpus), s.memory_mib << 20) as f64 / MI;
        println!(
            "| {} | {} MiB | {:.1} MiB | {:.1} MiB | {:.0} MiB |",
            s.vcpus, s.memory_mib, s.guest_rss_mib, s.overhead_mib, r
        );
    }
    println!();
    let uncovered = samples
        .iter()
        .filter(|s| {
            (reserved.of(1, i64::from(s.vcpus), s.memory_mib << 20) as f64 / MI) < s.overhead_mib
        })
        .count();
    println!(
        "Least-squares fit: overhead = {a:.1} MiB + {b:.1} MiB x vCPUs + {c:.1} MiB x GiB of guest memory. The agent reserves {} + {} x vCPUs + {} x GiB under TCG (`--vm-overhead`, docs/scheduling.md).\n",
        vmlet::api::quantity::Bytes(reserved.fixed),
        vmlet::api::quantity::Bytes(reserved.per_vcpu),
        vmlet::api::quantity::Bytes(reserved.per_gib),
    );
    println!(
        "overhead: {} of {} shapes measured above what the formula reserves",
        uncovered,
        samples.len()
    );
    Ok(())
}
