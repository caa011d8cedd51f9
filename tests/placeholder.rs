//! The VM Pod's container, `vmlet-placeholder` (placeholder/): built as the image builds
//! it, it runs with no dynamic loader and a few KiB resident, survives a stop and a
//! continue, and exits 0 on SIGTERM (PID 1 of a container ignores SIGTERM unless it
//! waits for it).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

fn build() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("cargo")
        .args([
            "build",
            "--release",
            "--locked",
            "--manifest-path",
            "placeholder/Cargo.toml",
            "--target-dir",
            "target/placeholder",
        ])
        .current_dir(&root)
        .output()
        .expect("cargo");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    root.join("target/placeholder/release/vmlet-placeholder")
}

fn status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{key} in {status}"))
}

#[test]
fn waits_in_a_few_kib_and_exits_0_on_sigterm() {
    let bin = build();
    let elf = std::fs::read(&bin).unwrap();
    assert!(
        !elf.windows(7).any(|w| w == b"ld-linu"),
        "linked against a dynamic loader"
    );
    for signal in ["TERM", "INT"] {
        let mut child = Command::new(&bin).spawn().unwrap();
        let pid = child.id();
        std::thread::sleep(Duration::from_millis(200));
        let rss = status_kib(pid, "VmRSS:");
        println!("vmlet-placeholder: {} bytes, RSS {rss} KiB", elf.len());
        assert!(rss <= 64, "RSS {rss} KiB");
        for s in ["STOP", "CONT"] {
            Command::new("kill")
                .args([&format!("-{s}"), &pid.to_string()])
                .status()
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            child.try_wait().unwrap().is_none(),
            "ended without a signal to end it"
        );
        Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "SIG{signal}: {status:?}");
    }
}
