//! `kubectl vm ...` run the way users run it: kubectl finds `kubectl-vm` on PATH.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kube::api::Api;
use serde_json::json;
use vmlet::agent::libvirt::RunState;
use vmlet::api::VirtualMachine;

use common::node::*;

/// PATH with the built plugin and the project's kubectl first.
fn path() -> String {
    let plugin_dir = Path::new(env!("CARGO_BIN_EXE_kubectl-vm"))
        .parent()
        .unwrap()
        .to_path_buf();
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/bin");
    let rest = std::env::var("PATH").unwrap_or_default();
    format!("{}:{}:{rest}", plugin_dir.display(), tools.display())
}

fn kubectl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("kubectl")
        .args(args)
        .env("PATH", path())
        .env("KUBECONFIG", common::kubeconfig_path())
        .output()
        .expect("kubectl on PATH (hack/cluster.sh build)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_for_every_command() {
    let (ok, out, err) = kubectl(&["vm", "--help"]);
    assert!(ok, "{err}");
    for cmd in [
        "start",
        "stop",
        "restart",
        "console",
        "migrate",
        "nodes",
        "drain",
        "completion",
    ] {
        assert!(out.contains(cmd), "kubectl vm --help lacks {cmd}:\n{out}");
        let (ok, out, err) = kubectl(&["vm", cmd, "--help"]);
        assert!(
            ok && out.contains("Usage: kubectl vm"),
            "{cmd} --help: {err}"
        );
        assert!(
            out.contains("--namespace"),
            "{cmd} --help lacks -n/--namespace"
        );
    }
    let (ok, out, _) = kubectl(&["vm", "completion", "bash"]);
    assert!(ok && out.contains("kubectl-vm"), "bash completion");
}

#[tokio::test]
async fn start_stop_restart_and_nodes() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "plugin").await;
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    let node = Node::new("plugin").await;
    let uid = create_vm(&api, "vm1", json!({"memory": "32Mi"}), &node.name).await;
    wait_phase(&api, "vm1", "Running", 30).await;

    let (ok, out, err) = kubectl(&["vm", "stop", "vm1", "-n", &ns]);
    assert!(ok && out.contains("stopping"), "{err}");
    wait_phase(&api, "vm1", "Stopped", 30).await;
    let (ok, _, err) = kubectl(&["vm", "stop", "vm1", "-n", &ns]);
    assert!(!ok && err.contains("already stopped"), "{err}");

    let (ok, _, err) = kubectl(&["vm", "start", "vm1", "--namespace", &ns]);
    assert!(ok, "{err}");
    let vm = wait_phase(&api, "vm1", "Running", 30).await;
    let before = vm.status.unwrap().restart_count.unwrap_or(0);

    let (ok, _, err) = kubectl(&["vm", "restart", "vm1", "-n", &ns]);
    assert!(ok, "{err}");
    let done = common::wait_for(Duration::from_secs(30), || async {
        let s = api.get("vm1").await.ok()?.status?;
        let restarted = s.last_restart_request.is_some() && s.restart_count.unwrap_or(0) > before;
        (restarted && s.phase == Some(vmlet::api::vm::Phase::Running)).then_some(())
    })
    .await;
    assert!(
        done.is_some(),
        "restart not carried out: {:?}",
        api.get("vm1").await.unwrap().status
    );
    assert_eq!(
        node.lv.lookup(&uid).await.unwrap().unwrap().state,
        RunState::Running
    );
    assert_eq!(node.domains_for(&uid).await, 1);

    let (ok, out, err) = kubectl(&["vm", "nodes"]);
    assert!(ok, "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with(&node.name))
        .unwrap_or_else(|| panic!("{} missing:\n{out}", node.name));
    assert!(line.contains("True") && line.contains("tcg"), "{line}");
    assert!(out.lines().next().unwrap().starts_with("NAME"));

    // -o prints the objects: the hypervisors as a List, the VM a command wrote.
    let (ok, out, err) = kubectl(&["vm", "nodes", "-o", "json", "--wait", "30s"]);
    assert!(ok, "{err}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list["kind"], "List");
    assert!(
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["metadata"]["name"] == node.name.as_str())
    );
    let (ok, out, err) = kubectl(&["vm", "restart", "vm1", "-n", &ns, "-o", "yaml"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("kind: VirtualMachine") && out.contains("vmlet.dev/restart"),
        "{out}"
    );
    let (ok, _, err) = kubectl(&["vm", "console", "vm1", "-n", &ns, "-o", "json"]);
    assert!(!ok && err.contains("-o applies to"), "{err}");

    // migrate creates the migration the controller acts on; a VM not placed is refused.
    let (ok, out, err) = kubectl(&[
        "vm",
        "migrate",
        "vm1",
        "-n",
        &ns,
        "--to",
        "elsewhere",
        "-o",
        "json",
    ]);
    assert!(ok, "{err}");
    let mig: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(mig["kind"], "VirtualMachineMigration");
    assert_eq!(
        mig["spec"],
        json!({"vmName": "vm1", "targetNode": "elsewhere"})
    );
    let (ok, _, err) = kubectl(&["vm", "migrate", "vm1", "-n", &ns, "--to", &node.name]);
    assert!(!ok && err.contains("already runs on"), "{err}");

    // Completion as kubectl does it: kubectl runs kubectl_complete-vm.
    let (ok, out, err) = kubectl(&["__complete", "vm", "res"]);
    assert!(ok && out.lines().any(|l| l == "restart"), "{out}{err}");
    let (ok, out, err) = kubectl(&["__complete", "vm", "-n", &ns, "stop", ""]);
    assert!(
        ok && out.lines().any(|l| l == "vm1"),
        "VM names: {out}{err}"
    );
    let (ok, out, err) = kubectl(&["__complete", "vm", "drain", ""]);
    assert!(
        ok && out.lines().any(|l| l == node.name),
        "node names: {out}{err}"
    );

    let (ok, _, err) = kubectl(&["vm", "start", "nope", "-n", &ns]);
    assert!(!ok && err.contains("not found"), "{err}");
    common::delete_vms_and_namespace(&client, &ns).await;
    node.forget().await;
}

/// A kubeconfig that is named but unreadable is an error that says so, never a silent
/// fall-back to another cluster; the kubeconfig flags select as kubectl's do.
#[test]
fn kubeconfig_flags_and_errors() {
    let run = |env_kc: &str, args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_kubectl-vm"))
            .args(args)
            .env("KUBECONFIG", env_kc)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let kc = common::kubeconfig_path();
    let kc = kc.to_str().unwrap();
    let (ok, err) = run("/nonexistent/config", &["nodes"]);
    assert!(!ok && err.contains("KUBECONFIG"), "{err}");
    let (ok, err) = run(kc, &["nodes", "--kubeconfig", "/nonexistent/other"]);
    assert!(!ok && err.contains("/nonexistent/other"), "{err}");
    let (ok, err) = run(kc, &["nodes", "--context", "no-such-context"]);
    assert!(!ok && err.contains("no-such-context"), "{err}");
    let (ok, err) = run(kc, &["nodes", "--request-timeout", "5m", "--as", "someone"]);
    assert!(
        !ok && err.contains("someone"),
        "impersonation reaches the server: {err}"
    );
    let (ok, err) = run(kc, &["nodes", "--request-timeout", "5 minutes"]);
    assert!(!ok && err.contains("expected a duration"), "{err}");
}
