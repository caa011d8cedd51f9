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
    for cmd in ["start", "stop", "restart", "console", "nodes", "completion"] {
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

    let (ok, _, err) = kubectl(&["vm", "start", "nope", "-n", &ns]);
    assert!(!ok && err.contains("not found"), "{err}");
    common::delete_vms_and_namespace(&client, &ns).await;
    node.forget().await;
}
