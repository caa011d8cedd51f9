//! Every example reaches Running (controller + two simulated hypervisors), and the
//! GitOps contract holds: applying the same manifests again changes nothing (no new
//! generation, no status churn, no restart), `kubectl diff` is empty after reconcile, and
//! user, controller and agent never fight over fields.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kube::api::{Api, DeleteParams};
use sha2::{Digest, Sha256};
use vmlet::api::{VirtualMachine, VirtualMachineClass};

use common::node::*;

/// Per VM: generation, resourceVersion, restartCount.
type Snapshot = BTreeMap<String, (Option<i64>, Option<String>, Option<i32>)>;

fn kubectl(args: &[&str]) -> std::process::Output {
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/bin");
    Command::new(tools.join("kubectl"))
        .args(args)
        .env("KUBECONFIG", common::kubeconfig_path())
        .output()
        .expect("kubectl (hack/cluster.sh build)")
}

/// The examples as one manifest. The cloud-init example names a cloud image by URL and
/// checksum; here it is served from 127.0.0.1 (a small qcow2 made for the test), the one
/// change made to the files.
async fn manifests(dir: &Path) -> String {
    let qcow = dir.join("base.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow)
        .arg("16M")
        .output()
        .unwrap();
    assert!(out.status.success());
    let bytes = std::fs::read(&qcow).unwrap();
    let sha = hex::encode(Sha256::digest(&bytes));
    let url = common::serve_bytes(bytes, "debian-12.qcow2").await;
    let mut files: Vec<_> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
    files.sort();
    let mut all = String::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let text = text
            .replace(
                "http://images.example.internal/debian-12-genericcloud-amd64.qcow2",
                &url,
            )
            .replace(&"0".repeat(64), &sha);
        all.push_str("---\n");
        all.push_str(&text);
        all.push('\n');
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_run_and_reapplying_changes_nothing() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "examples-run").await;
    let status = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("hack/tiny-guest.sh"))
        .arg("/var/lib/vmlet/images/tiny")
        .status()
        .unwrap();
    assert!(status.success(), "hack/tiny-guest.sh");
    let root = Some("/var/lib/vmlet/images".into());
    let a = Node::with_image_root("ex-a", root.clone()).await;
    let b = Node::with_image_root("ex-b", root).await;
    a.register(&[("topology.kubernetes.io/zone", "zone-a")])
        .await;
    b.register(&[("topology.kubernetes.io/zone", "zone-b")])
        .await;
    let controller = tokio::spawn(vmlet::controller::run_until(
        common::controller_args("examples", &ns),
        std::future::pending(),
    ));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("all.yaml");
    std::fs::write(&file, manifests(dir.path()).await).unwrap();
    let file = file.to_str().unwrap();
    let apply = || {
        kubectl(&[
            "apply",
            "--server-side",
            "--field-manager=gitops",
            "-n",
            &ns,
            "-f",
            file,
        ])
    };
    let out = apply();
    assert!(
        out.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    let names: Vec<String> = api
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|v| v.metadata.name)
        .collect();
    assert!(names.len() >= 7, "{names:?}");
    for name in &names {
        wait_phase(&api, name, "Running", 60).await;
    }
    let vms = api.list(&Default::default()).await.unwrap().items;
    let node_of = |n: &str| {
        vms.iter()
            .find(|v| v.metadata.name.as_deref() == Some(n))
            .unwrap()
            .status
            .clone()
            .unwrap()
            .node_name
            .unwrap()
    };
    assert_eq!(node_of("pinned"), a.name, "nodeSelector zone-a");
    assert_ne!(
        node_of("db-0"),
        node_of("db-1"),
        "anti-affinity pair on one node"
    );

    // Let the agents finish their first round of status writes, then snapshot.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let snapshot = |vms: Vec<VirtualMachine>| -> Snapshot {
        vms.into_iter()
            .map(|v| {
                let rc = v.status.as_ref().and_then(|s| s.restart_count);
                (
                    v.metadata.name.clone().unwrap(),
                    (
                        v.metadata.generation,
                        v.metadata.resource_version.clone(),
                        rc,
                    ),
                )
            })
            .collect()
    };
    let before = snapshot(api.list(&Default::default()).await.unwrap().items);

    // Apply again (as a GitOps tool does on every sync), without forcing conflicts.
    let out = apply();
    assert!(
        out.status.success(),
        "re-apply conflicted: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = snapshot(api.list(&Default::default()).await.unwrap().items);
    assert_eq!(
        before, after,
        "re-applying changed generation, status or restarts"
    );

    // kubectl diff against the live objects is empty (exit code 0).
    let out = kubectl(&[
        "diff",
        "--server-side",
        "--field-manager=gitops",
        "-n",
        &ns,
        "-f",
        file,
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "kubectl diff is not empty:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Who owns what: the user the spec, the controller the binding, the agent the rest.
    let vm = api.get("tiny").await.unwrap();
    let managers = vm.metadata.managed_fields.unwrap_or_default();
    let owns = |manager: &str, needle: &str| {
        managers.iter().any(|m| {
            m.manager.as_deref() == Some(manager)
                && serde_json::to_string(&m.fields_v1)
                    .unwrap_or_default()
                    .contains(needle)
        })
    };
    assert!(
        owns("gitops", "f:runStrategy"),
        "spec not owned by the applier"
    );
    assert!(
        owns("vmlet-controller", "f:nodeName"),
        "binding not owned by the controller"
    );
    assert!(
        owns("vmlet-agent", "f:phase"),
        "phase not owned by the agent"
    );
    assert!(
        !owns("vmlet-agent", "f:spec") && !owns("vmlet-controller", "f:spec"),
        "a vmlet component wrote the spec"
    );

    common::delete_vms_and_namespace(&client, &ns).await;
    let classes: Api<VirtualMachineClass> = Api::all(client.clone());
    let _ = classes.delete("small", &DeleteParams::default()).await;
    controller.abort();
    a.forget().await;
    b.forget().await;
}

/// Each file in examples/ applies exactly as shipped, bytes unchanged, the way a user
/// copies it: a value YAML reads as a number where the schema wants a string fails here.
/// A server-side dry run: the API server decodes, validates (schema, CEL, admission
/// policies) and merges each object as for a real apply, but stores nothing, so no
/// controller of a test running beside this one binds these VMs.
#[tokio::test]
async fn every_example_applies_exactly_as_shipped() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "examples-as-shipped").await;
    let mut files: Vec<_> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
    files.sort();
    assert!(files.len() >= 6, "{files:?}");
    let mut failed = Vec::new();
    for f in &files {
        let out = kubectl(&[
            "apply",
            "--server-side",
            "--field-manager=as-shipped",
            "--dry-run=server",
            "-n",
            &ns,
            "-f",
            f.to_str().unwrap(),
        ]);
        if !out.status.success() {
            failed.push(format!(
                "{}: {}",
                f.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    common::delete_namespace(&client, &ns).await;
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
