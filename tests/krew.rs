//! The krew manifest and the release archive it points at agree: hack/krew.sh packs
//! exactly the files krew/vm.yaml lists, and writes the archive's sha256 into it.

use std::path::Path;
use std::process::Command;

#[test]
fn krew_manifest_lists_what_the_release_archive_holds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dist = tempfile::tempdir().unwrap();
    let version = env!("CARGO_PKG_VERSION");
    let out = Command::new(root.join("hack/krew.sh"))
        .args([version, "https://example.com/releases"])
        .env("DIST", dist.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hack/krew.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(dist.path().join("vm.yaml")).unwrap())
            .unwrap();
    assert_eq!(manifest["kind"], "Plugin");
    assert_eq!(manifest["metadata"]["name"], "vm");
    assert_eq!(manifest["spec"]["version"], format!("v{version}"));
    let platform = &manifest["spec"]["platforms"][0];
    let uri = platform["uri"].as_str().unwrap();
    let name = uri.rsplit('/').next().unwrap();
    assert_eq!(
        uri,
        format!("https://example.com/releases/kubectl-vm_v{version}_linux_amd64.tar.gz")
    );
    let archive = dist.path().join(name);
    let sha = Command::new("sha256sum").arg(&archive).output().unwrap();
    let sha = String::from_utf8_lossy(&sha.stdout);
    assert_eq!(platform["sha256"], sha.split_whitespace().next().unwrap());
    let listed = Command::new("tar")
        .arg("-tzf")
        .arg(&archive)
        .output()
        .unwrap();
    let mut in_archive: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|l| l.trim_start_matches("./").to_string())
        .filter(|l| !l.is_empty())
        .collect();
    in_archive.sort();
    let mut files: Vec<String> = platform["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["from"].as_str().unwrap().to_string())
        .collect();
    files.sort();
    assert_eq!(in_archive, files, "archive vs the manifest's files");
    let bin = platform["bin"].as_str().unwrap();
    assert!(
        files.iter().any(|f| f == bin),
        "bin {bin} not in the archive"
    );
    assert!(files.iter().any(|f| f == "kubectl_complete-vm"));
    assert!(
        !manifest.to_string().contains('@'),
        "a placeholder left: {manifest}"
    );
}
