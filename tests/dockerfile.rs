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
