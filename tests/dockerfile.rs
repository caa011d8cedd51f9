//! The Dockerfile's build stage gets what Cargo.toml needs: every file it copies into the
//! build context, and nothing else, must make a manifest cargo accepts. (It once copied
//! only src/, and cargo refused the manifest for its missing benches.)

use std::path::{Path, PathBuf};
use std::process::Command;

/// The sources of the build stage's COPY lines (before the second FROM).
fn build_stage_copies(dockerfile: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut stages = 0;
    for line in dockerfile.lines().map(str::trim) {
        if line.starts_with("FROM ") {
            stages += 1;
            if stages > 1 {
                break;
            }
        }
        if let Some(rest) = line.strip_prefix("COPY ") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            if words.iter().any(|w| w.starts_with("--from")) {
                continue;
            }
            // The last word is the destination.
            out.extend(words[..words.len() - 1].iter().map(|w| w.to_string()));
        }
    }
    out
}

fn copy(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap().flatten() {
            copy(&e.path(), &to.join(e.file_name()));
        }
    } else {
        std::fs::copy(from, to).unwrap();
    }
}

#[test]
fn the_build_stage_context_makes_a_valid_manifest() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let copies = build_stage_copies(&dockerfile);
    assert!(copies.contains(&"Cargo.toml".to_string()), "{copies:?}");
    let ctx = tempfile::tempdir().unwrap();
    for c in &copies {
        copy(&root.join(c), &ctx.path().join(c));
    }
    // Loads the manifest and every declared target; offline, from the local cache.
    let out = Command::new("cargo")
        .args(["fetch", "--offline", "--locked", "--target"])
        .arg(format!("{}-unknown-linux-gnu", std::env::consts::ARCH))
        .current_dir(ctx.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo refuses the image's build context ({copies:?}):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `make image` (hack/image.sh, no Docker) and the Dockerfile describe one image: the
/// runtime stage's Debian release and packages, its binaries' paths, user and entrypoint.
#[test]
fn image_script_builds_what_the_dockerfile_describes() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let script = std::fs::read_to_string(root.join("hack/image.sh")).unwrap();
    let runtime = dockerfile.split("\nFROM ").last().expect("a runtime stage");
    assert!(
        runtime.starts_with("docker.io/library/debian:bookworm"),
        "{runtime}"
    );
    assert!(script.contains("SUITE=bookworm"));
    // The packages after `apt-get install ... --no-install-recommends`, up to `&&`.
    let install = runtime
        .split("--no-install-recommends")
        .nth(1)
        .unwrap()
        .split("&&")
        .next()
        .unwrap();
    let mut docker_pkgs: Vec<&str> = install.split_whitespace().filter(|w| *w != "\\").collect();
    docker_pkgs.sort_unstable();
    let line = script
        .lines()
        .find_map(|l| l.strip_prefix("PACKAGES="))
        .expect("PACKAGES= in hack/image.sh");
    let mut script_pkgs: Vec<&str> = line.split(',').collect();
    script_pkgs.sort_unstable();
    assert_eq!(docker_pkgs, script_pkgs);
    for (docker, script_has) in [
        ("USER 65532:65532", "--config.user 65532:65532"),
        (
            r#"ENTRYPOINT ["/usr/local/bin/vmlet"]"#,
            "--config.entrypoint /usr/local/bin/vmlet",
        ),
        (
            "/usr/local/bin/kubectl_complete-vm",
            "for b in vmlet kubectl-vm kubectl_complete-vm",
        ),
        (
            "--manifest-path placeholder/Cargo.toml --target-dir target/placeholder",
            "--manifest-path placeholder/Cargo.toml --target-dir target/placeholder",
        ),
        (
            "target/placeholder/release/vmlet-placeholder /usr/local/bin/vmlet-placeholder",
            "target/placeholder/release/vmlet-placeholder\" \"$d/bins/usr/local/bin/vmlet-placeholder",
        ),
    ] {
        assert!(dockerfile.contains(docker), "Dockerfile lacks {docker}");
        assert!(
            script.contains(script_has),
            "hack/image.sh lacks {script_has}"
        );
    }
}
