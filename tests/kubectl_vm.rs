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

/// A Hypervisor whose agentURL is not its Node's address (what a stolen agent token could
/// write): `kubectl vm console` refuses and the user's token never leaves; at the Node's
/// own address it is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_sends_the_token_only_to_the_nodes_own_address() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "console-trust").await;
    let node = format!("console-trust-{}", std::process::id());
    common::node_with_address(&client, &node, json!({}), "127.0.0.1").await;
    // Two listeners that count the requests with a bearer token they receive.
    let listen = |ip: &'static str| async move {
        let l = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let tokens = Arc::new(AtomicUsize::new(0));
        let seen = tokens.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                if String::from_utf8_lossy(&buf[..n]).contains("Bearer secret-token") {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nConnection: close\r\n\r\nguest says hi")
                    .await;
            }
        });
        (url, tokens)
    };
    let (elsewhere, stolen) = listen("127.0.0.2").await;
    let (own, received) = listen("127.0.0.1").await;
    let hvs: Api<vmlet::api::Hypervisor> = Api::all(client.clone());
    let set_url = |url: String| {
        let (hvs, node) = (hvs.clone(), node.clone());
        async move {
            let hv = json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "Hypervisor",
                "metadata": {"name": node}, "spec": {}});
            hvs.patch(
                &node,
                &kube::api::PatchParams::apply("vmlet-test"),
                &kube::api::Patch::Apply(&hv),
            )
            .await
            .unwrap();
            let st = json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "Hypervisor", "status": {"agentURL": url}});
            hvs.patch_status(
                &node,
                &kube::api::PatchParams::apply("vmlet-test").force(),
                &kube::api::Patch::Apply(&st),
            )
            .await
            .unwrap();
        }
    };
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    create_vm(&vms, "vm", json!({"memory": "64Mi"}), &node).await;

    set_url(elsewhere.clone()).await;
    let (ok, out, err) = kubectl(&["vm", "console", "vm", "-n", &ns, "--token", "secret-token"]);
    assert!(!ok, "console went to {elsewhere}: {out}");
    assert!(err.contains("not sending your token"), "{err}");
    println!("refused: {}", err.trim());
    assert_eq!(
        stolen.load(Ordering::SeqCst),
        0,
        "the token reached {elsewhere}"
    );

    set_url(own.clone()).await;
    let (ok, out, err) = kubectl(&["vm", "console", "vm", "-n", &ns, "--token", "secret-token"]);
    assert!(ok && out.contains("guest says hi"), "{out} {err}");
    assert_eq!(received.load(Ordering::SeqCst), 1);

    common::delete_vms_and_namespace(&client, &ns).await;
    common::forget_node(&client, &node).await;
}
