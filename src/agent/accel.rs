//! Which acceleration guests get on this node. `/dev/kvm` can exist and still never run
//! a Linux guest: on some nested hosts KVM runs real-mode code (SeaBIOS, a few probe
//! instructions) but hangs at the switch to protected mode, exactly where a Linux boot
//! leaves its real-mode setup. So the probe firmware walks the path a kernel takes before
//! its first console line (real mode -> 32-bit protected mode -> 64-bit long mode with
//! paging) and reports each step on the debug port; KVM is trusted only when every step
//! ran. The firmware's source is `probe/kvm_probe.S` beside this file.

use std::time::Duration;

use super::render::Accel;

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

/// The accelerator and why, for the Hypervisor status and the start-up log.
pub async fn detect(choice: AccelChoice) -> (Accel, String) {
    match choice {
        AccelChoice::Kvm => (Accel::Kvm, "forced by --accel kvm".into()),
        AccelChoice::Tcg => (Accel::Tcg, "forced by --accel tcg".into()),
        AccelChoice::Auto => match probe_kvm().await {
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
    /// QEMU's exit status and the last line of its stderr, when it exited by itself.
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

async fn probe_kvm() -> Result<(), String> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Err(format!("/dev/kvm cannot be opened: {e}"));
    }
    let dir = tempfile_dir().map_err(|e| e.to_string())?;
    // `-cpu host` is what KVM guests get (host-model); when QEMU cannot even start with
    // it, a second run on QEMU's default CPU tells whether KVM runs guests at all, so that
    // the reason names the boot step that fails.
    let verdict = match run_probe(&dir, Some("host")).await {
        Err(e) => Err(e),
        Ok(run) => match judge(&run) {
            Ok(()) => Ok(()),
            Err(why) if run.exited.is_none() => Err(why),
            Err(why) => {
                let default = match run_probe(&dir, None).await {
                    Ok(run) => match judge(&run) {
                        Ok(()) => "it runs only QEMU's default CPU".to_string(),
                        Err(d) => format!("with QEMU's default CPU {d}"),
                    },
                    Err(e) => e,
                };
                Err(format!("with -cpu host {why}; {default}"))
            }
        },
    };
    let _ = std::fs::remove_dir_all(&dir);
    verdict
}

async fn run_probe(dir: &std::path::Path, cpu: Option<&str>) -> Result<ProbeRun, String> {
    let fw = dir.join("probe.bin");
    let out = dir.join("probe.out");
    std::fs::write(&fw, PROBE_FIRMWARE).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&out);
    let mut cmd = tokio::process::Command::new(super::tools::QEMU_SYSTEM.program);
    cmd.args(["-accel", "kvm", "-nodefaults", "-display", "none"]);
    if let Some(cpu) = cpu {
        cmd.args(["-cpu", cpu]);
    }
    let mut child = cmd
        .args(["-m", "16", "-bios"])
        .arg(&fw)
        .arg("-chardev")
        .arg(format!("file,id=dbg,path={}", out.display()))
        .args(["-device", "isa-debugcon,iobase=0xe9,chardev=dbg"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| super::tools::QEMU_SYSTEM.spawn_error(e).to_string())?;
    let read = || std::fs::read(&out).unwrap_or_default();
    let deadline = tokio::time::Instant::now() + PROBE_DEADLINE;
    loop {
        let markers = read();
        if judge(&ProbeRun {
            markers: markers.clone(),
            exited: None,
        })
        .is_ok()
        {
            let _ = child.kill().await;
            return Ok(ProbeRun {
                markers,
                exited: None,
            });
        }
        if let Ok(Some(status)) = child.try_wait() {
            let stderr = match child.stderr.take() {
                Some(mut e) => {
                    let mut s = String::new();
                    let _ = tokio::io::AsyncReadExt::read_to_string(&mut e, &mut s).await;
                    s
                }
                None => String::new(),
            };
            // QEMU's first "error:" line says why; an assertion that follows does not.
            let last = stderr
                .lines()
                .find(|l| l.contains("error:"))
                .or_else(|| stderr.lines().last())
                .unwrap_or("")
                .trim()
                .to_string();
            return Ok(ProbeRun {
                markers: read(),
                exited: Some(format!("{status}: {last}")),
            });
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = child.kill().await;
            return Ok(ProbeRun {
                markers: read(),
                exited: None,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("vmlet-kvm-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
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
            .arg("-chardev")
            .arg(format!("file,id=dbg,path={}", out.display()))
            .args(["-device", "isa-debugcon,iobase=0xe9,chardev=dbg"])
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
