//! Which acceleration guests get on this node. `/dev/kvm` can exist and still never run
//! a Linux guest: on some nested hosts KVM runs real-mode code (SeaBIOS, a few probe
//! instructions) but hangs at the switch to protected mode, exactly where a Linux boot
//! leaves its real-mode setup. So the probe firmware walks the path a kernel takes before
//! its first console line (real mode -> 32-bit protected mode -> 64-bit long mode with
//! paging) and reports each step on its first serial port; KVM is trusted only when every
//! step ran. It runs as a libvirt domain whose console is a file (see [`detect`]). The
//! firmware's source is `probe/kvm_probe.S` beside this file.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::domain;
use super::libvirt::Libvirt;
use super::node::Accel;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

/// 64 KiB BIOS image assembled from `probe/kvm_probe.S`.
pub const PROBE_FIRMWARE: &[u8] = include_bytes!("probe/kvm_probe.bin");

/// The markers the firmware writes, in order, and what reaching each one proves.
const STEPS: [(u8, &str); 3] = [
    (b'R', "real mode"),
    (b'P', "32-bit protected mode"),
    (b'L', "64-bit long mode with paging"),
];

/// How long the probe guest may take for all its steps (each takes microseconds when
/// KVM works; QEMU's own start-up dominates).
const PROBE_DEADLINE: Duration = Duration::from_secs(5);

/// The accelerator and why, for the Hypervisor status and the start-up log. The probe
/// runs as a libvirt domain, so it tests what guests will get: the host's QEMU, as
/// libvirt's QEMU user, with libvirt's view of /dev/kvm. The agent itself needs no
/// /dev/kvm and no QEMU (in a container it has neither).
pub async fn detect(choice: AccelChoice, lv: &dyn Libvirt, state_dir: &Path) -> (Accel, String) {
    match choice {
        AccelChoice::Kvm => (Accel::Kvm, "forced by --accel kvm".into()),
        AccelChoice::Tcg => (Accel::Tcg, "forced by --accel tcg".into()),
        AccelChoice::Auto => match probe_kvm(lv, state_dir).await {
            Ok(()) => (
                Accel::Kvm,
                "KVM probe guest reached 64-bit long mode with paging".into(),
            ),
            Err(why) => (Accel::Tcg, format!("KVM unusable: {why}")),
        },
    }
}

/// What the probe run showed: the markers seen, and how QEMU ended if it did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProbeRun {
    pub markers: Vec<u8>,
    /// Why the probe domain did not start, or that it stopped by itself.
    pub exited: Option<String>,
}

/// Pure: whether the run proves KVM can take a guest to long mode, and if not, which step
/// it stopped at.
pub fn judge(run: &ProbeRun) -> Result<(), String> {
    let reached = STEPS
        .iter()
        .take_while(|(m, _)| run.markers.contains(m))
        .count();
    if reached == STEPS.len() {
        return Ok(());
    }
    let stop = match reached {
        0 => "the probe guest ran no instruction".to_string(),
        n => format!(
            "the probe guest ran in {} but never reached {}",
            STEPS[n - 1].1,
            STEPS[n].1
        ),
    };
    Err(match &run.exited {
        Some(how) => format!("{stop}: QEMU exited ({how})"),
        None => format!(
            "{stop} within {} s (a Linux guest would hang before its first console line)",
            PROBE_DEADLINE.as_secs()
        ),
    })
}

/// The probe's domain: 16 MiB, the probe firmware as its BIOS, COM1 into a file. Only
/// the loader and the CPU differ from what the VM domain model (`domain.rs`) has.
#[derive(serde::Serialize)]
#[serde(rename = "domain")]
struct ProbeDomain {
    #[serde(rename = "@type")]
    kind: &'static str,
    name: String,
    memory: domain::Memory,
    vcpu: u32,
    os: ProbeOs,
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu: Option<ProbeCpu>,
    on_poweroff: &'static str,
    devices: ProbeDevices,
}

#[derive(serde::Serialize)]
struct ProbeOs {
    #[serde(rename = "type")]
    os_type: domain::OsType,
    loader: ProbeLoader,
}

#[derive(serde::Serialize)]
struct ProbeLoader {
    /// `rom`: QEMU's `-bios`.
    #[serde(rename = "@type")]
    kind: &'static str,
    #[serde(rename = "$text")]
    path: String,
}

#[derive(serde::Serialize)]
struct ProbeCpu {
    #[serde(rename = "@mode")]
    mode: &'static str,
}

#[derive(serde::Serialize)]
struct ProbeDevices {
    serial: domain::Serial,
    memballoon: domain::ModelOnly,
}

/// Pure: the probe domain's XML. `host_cpu` gives the guest the host's CPU, as KVM guests
/// get (host-model); without it QEMU's default CPU.
pub fn probe_xml(name: &str, firmware: &Path, out: &Path, host_cpu: bool) -> String {
    let dom = ProbeDomain {
        kind: "kvm",
        name: name.to_string(),
        memory: domain::Memory {
            unit: "MiB".into(),
            value: 16,
        },
        vcpu: 1,
        os: ProbeOs {
            os_type: domain::OsType {
                arch: "x86_64".into(),
                machine: "pc".into(),
                value: "hvm".into(),
            },
            loader: ProbeLoader {
                kind: "rom",
                path: firmware.display().to_string(),
            },
        },
        cpu: host_cpu.then_some(ProbeCpu {
            mode: "host-passthrough",
        }),
        on_poweroff: "destroy",
        devices: ProbeDevices {
            serial: domain::Serial {
                kind: "pty".into(),
                log: domain::SerialLog {
                    file: out.display().to_string(),
                    append: "off".into(),
                },
                target: domain::SerialTarget { port: 0 },
            },
            memballoon: domain::ModelOnly {
                model: "none".into(),
            },
        },
    };
    let mut xml = String::new();
    let mut ser = quick_xml::se::Serializer::new(&mut xml);
    ser.indent(' ', 2);
    dom.serialize(ser)
        .expect("the probe domain has only plain fields");
    xml.push('\n');
    xml
}

async fn probe_kvm(lv: &dyn Libvirt, state_dir: &Path) -> Result<(), String> {
    if let Err(e) = lv.domain_capabilities("kvm").await {
        return Err(format!("libvirt offers no KVM domains: {e}"));
    }
    // QEMU runs as libvirt's user: the firmware must be readable to it, and the output
    // file's directory traversable.
    let dir = state_dir.join("kvm-probe");
    let prepare = || -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
        let fw = dir.join("probe.bin");
        std::fs::write(&fw, PROBE_FIRMWARE)?;
        std::fs::set_permissions(&fw, std::fs::Permissions::from_mode(0o644))
    };
    prepare().map_err(|e| format!("cannot write the probe firmware in {}: {e}", dir.display()))?;
    let verdict = match run_probe(lv, &dir, true).await {
        Err(e) => Err(e),
        Ok(run) => match judge(&run) {
            Ok(()) => Ok(()),
            Err(why) if run.exited.is_none() => Err(why),
            // The host's CPU cannot be given to a guest: whether KVM runs guests at all
            // (on QEMU's default CPU) tells which boot step fails.
            Err(why) => {
                // The verdict on KVM itself first: the host-CPU failure is QEMU's long
                // story, and status columns cut the end off.
                let default = match run_probe(lv, &dir, false).await {
                    Ok(run) => match judge(&run) {
                        Ok(()) => "it runs only QEMU's default CPU".to_string(),
                        Err(d) => format!("with QEMU's default CPU {d}"),
                    },
                    Err(e) => e,
                };
                Err(format!("{default}; with the host's CPU {why}"))
            }
        },
    };
    let _ = std::fs::remove_dir_all(&dir);
    verdict
}

async fn run_probe(lv: &dyn Libvirt, dir: &Path, host_cpu: bool) -> Result<ProbeRun, String> {
    // Unique per run: agents of several test nodes (processes, or tasks of one) can
    // share one libvirtd.
    static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("vmlet-kvm-probe-{}-{run}", std::process::id());
    let out = dir.join(format!("probe-{run}.out"));
    let xml = probe_xml(&name, &dir.join("probe.bin"), &out, host_cpu);
    let uuid = match lv.create_transient(xml).await {
        Ok(uuid) => uuid,
        Err(e) => {
            return Ok(ProbeRun {
                markers: Vec::new(),
                exited: Some(format!("libvirt could not start it: {e}")),
            });
        }
    };
    let read = || std::fs::read(&out).unwrap_or_default();
    let deadline = tokio::time::Instant::now() + PROBE_DEADLINE;
    let run = loop {
        let markers = read();
        if judge(&ProbeRun {
            markers: markers.clone(),
            exited: None,
        })
        .is_ok()
        {
            break ProbeRun {
                markers,
                exited: None,
            };
        }
        match lv.lookup(&uuid).await {
            Ok(Some(d)) if d.state.active() => {}
            Ok(_) => {
                break ProbeRun {
                    markers: read(),
                    exited: Some("the probe domain stopped by itself".into()),
                };
            }
            Err(e) => return Err(format!("libvirt lost the probe domain: {e}")),
        }
        if tokio::time::Instant::now() >= deadline {
            break ProbeRun {
                markers: read(),
                exited: None,
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Transient: destroying it removes it from libvirt too.
    if let Err(e) = lv.destroy(&uuid).await {
        tracing::warn!(error = %e, domain = %name, "cannot destroy the KVM probe domain");
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(markers: &str, exited: Option<&str>) -> ProbeRun {
        ProbeRun {
            markers: markers.as_bytes().to_vec(),
            exited: exited.map(str::to_string),
        }
    }

    #[test]
    fn judge_names_the_step_that_did_not_run() {
        let cases: [(&str, Option<&str>, Result<(), &str>); 6] = [
            ("RPL", None, Ok(())),
            ("RPL", Some("signal 9"), Ok(())),
            ("", None, Err("ran no instruction within 5 s")),
            (
                "R",
                None,
                Err("ran in real mode but never reached 32-bit protected mode within 5 s"),
            ),
            (
                "RP",
                Some("exit status: 1: error: x"),
                Err(
                    "never reached 64-bit long mode with paging: QEMU exited (exit status: 1: error: x)",
                ),
            ),
            // Out of order or partial output proves nothing beyond the prefix.
            ("L", None, Err("ran no instruction")),
        ];
        for (markers, exited, want) in cases {
            let got = judge(&run(markers, exited));
            match (want, &got) {
                (Ok(()), Ok(())) => {}
                (Err(part), Err(msg)) => assert!(msg.contains(part), "{markers}: {msg}"),
                _ => panic!("{markers} {exited:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    /// The probe domain validates as libvirt domain XML in the golden test's way: here,
    /// its shape and the escaping of the paths it names.
    #[test]
    fn probe_xml_names_firmware_console_and_cpu() {
        let fw = Path::new("/var/lib/vmlet/kvm-probe/probe.bin");
        let out = Path::new("/var/lib/vmlet/kvm-probe/<&'out\">");
        let host = probe_xml("vmlet-kvm-probe-1", fw, out, true);
        assert!(host.starts_with("<domain type=\"kvm\">"), "{host}");
        assert!(host.contains("<loader type=\"rom\">/var/lib/vmlet/kvm-probe/probe.bin</loader>"));
        assert!(host.contains("<cpu mode=\"host-passthrough\"/>"), "{host}");
        assert!(
            host.contains("/var/lib/vmlet/kvm-probe/&lt;&amp;'out&quot;&gt;"),
            "{host}"
        );
        assert!(host.contains("<memballoon model=\"none\"/>"));
        let default = probe_xml("vmlet-kvm-probe-1", fw, out, false);
        assert!(!default.contains("<cpu"), "{default}");
    }

    /// The committed firmware is what its source assembles to, and it reaches long mode
    /// under TCG (the software CPU every host has).
    #[test]
    fn probe_firmware_matches_its_source_and_reaches_long_mode_under_tcg() {
        let dir = std::env::temp_dir().join(format!("vmlet-probe-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/src/agent/probe/kvm_probe.S");
        let obj = dir.join("probe.o");
        let bin = dir.join("probe.bin");
        let ok = |c: &mut std::process::Command| assert!(c.status().unwrap().success(), "{c:?}");
        ok(std::process::Command::new("as")
            .args(["--32", "-o"])
            .arg(&obj)
            .arg(src));
        ok(std::process::Command::new("ld")
            .args([
                "-m",
                "elf_i386",
                "-Ttext=0xf0000",
                "--oformat",
                "binary",
                "-o",
            ])
            .arg(&bin)
            .arg(&obj));
        assert!(
            std::fs::read(&bin).unwrap() == PROBE_FIRMWARE,
            "src/agent/probe/kvm_probe.bin is stale: reassemble it from kvm_probe.S"
        );

        let out = dir.join("out");
        let mut child = std::process::Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-nodefaults",
                "-display",
                "none",
                "-m",
                "16",
            ])
            .arg("-bios")
            .arg(&bin)
            .arg("-serial")
            .arg(format!("file:{}", out.display()))
            .spawn()
            .unwrap();
        // The firmware halts forever once in long mode.
        for _ in 0..200 {
            if std::fs::read(&out).is_ok_and(|b| b.contains(&b'L')) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let status = child.wait().unwrap();
        let markers = std::fs::read(&out).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            judge(&ProbeRun {
                markers: markers.clone(),
                exited: None
            }),
            Ok(()),
            "TCG run printed {:?} ({status})",
            String::from_utf8_lossy(&markers)
        );
    }
}
