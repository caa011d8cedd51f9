//! Which acceleration guests get on this node. `/dev/kvm` can exist and still never run
//! a guest (nested virtualisation without the features QEMU asks for), so the probe
//! boots a 64 KiB firmware under KVM and checks that it ran its first instructions.

use std::time::Duration;

use super::render::Accel;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

/// A BIOS image whose reset vector writes 'K' to the debug port and halts.
fn probe_firmware() -> Vec<u8> {
    let mut fw = vec![0u8; 64 * 1024];
    // At reset the CPU executes from 0xFFFFFFF0, the last 16 bytes of the image.
    let code = [0xB0, b'K', 0xE6, 0xE9, 0xF4, 0xEB, 0xFD]; // mov al,'K'; out 0xe9,al; hlt; jmp $-1
    let at = fw.len() - 16;
    fw[at..at + code.len()].copy_from_slice(&code);
    fw
}

pub async fn detect(choice: AccelChoice) -> (Accel, String) {
    match choice {
        AccelChoice::Kvm => (Accel::Kvm, "forced by --accel".into()),
        AccelChoice::Tcg => (Accel::Tcg, "forced by --accel".into()),
        AccelChoice::Auto => match probe_kvm().await {
            Ok(()) => (Accel::Kvm, "KVM probe guest ran".into()),
            Err(why) => (Accel::Tcg, format!("KVM unusable: {why}")),
        },
    }
}

async fn probe_kvm() -> Result<(), String> {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Err("/dev/kvm cannot be opened".into());
    }
    let dir = tempfile_dir().map_err(|e| e.to_string())?;
    let fw = dir.join("probe.bin");
    let out = dir.join("probe.out");
    std::fs::write(&fw, probe_firmware()).map_err(|e| e.to_string())?;
    let mut child = tokio::process::Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "16",
            "-bios",
        ])
        .arg(&fw)
        .arg("-chardev")
        .arg(format!("file,id=dbg,path={}", out.display()))
        .args(["-device", "isa-debugcon,iobase=0xe9,chardev=dbg"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run qemu-system-x86_64: {e}"))?;
    let mut ok = false;
    for _ in 0..30 {
        if std::fs::read(&out)
            .map(|b| b.contains(&b'K'))
            .unwrap_or(false)
        {
            ok = true;
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!("probe QEMU exited with {status}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    if ok {
        Ok(())
    } else {
        Err("probe guest did not run within 3 s".into())
    }
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("vmlet-kvm-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
