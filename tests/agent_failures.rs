//! What a user sees when the node cannot run a VM: the real `vmlet agent` binary with a
//! PATH that lacks qemu-img (as on a machine where qemu-utils was never installed). The
//! VM must say so itself (phase, Ready condition naming the step and the package to
//! install, a Warning Event), not only the agent's log; once the node is fixed, the agent
//! retries on its own and the VM runs.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ListParams};
use serde_json::json;
use vmlet::api::VirtualMachine;

use common::node::{condition, create_vm, wait_phase};

/// Killed when dropped, whatever happens to the test.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn agent(node: &str, dir: &Path, path_env: &std::ffi::OsStr) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("agent.log"))
        .unwrap();
    let node_xml = dir.join("node.xml");
    Proc(
        Command::new(env!("CARGO_BIN_EXE_vmlet"))
            .args(["agent", "--node", node, "--metrics-addr", "127.0.0.1:0"])
            .arg("--libvirt-uri")
            .arg(format!("test://{}", node_xml.display()))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--image-root")
            .arg(dir.join("images"))
            .env("KUBECONFIG", common::kubeconfig_path())
            .env("PATH", path_env)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_qemu_img_shows_on_the_vm_and_the_agent_recovers_once_installed() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "no-qemu-img").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("images")).unwrap();
    std::fs::write(
        dir.path().join("node.xml"),
        "<node><cpu><mhz>2000</mhz><model>x86_64</model><nodes>1</nodes><sockets>1</sockets>\
         <cores>4</cores><threads>1</threads><active>4</active><total>4</total></cpu>\
         <memory>4194304</memory></node>",
    )
    .unwrap();
    let node = format!("no-qemu-img-{}", std::process::id());
    // An empty directory as the whole PATH: no qemu-img, nor anything else.
    let empty = dir.path().join("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    let without = agent(&node, dir.path(), empty.as_os_str());

    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    let spec = json!({"memory": "64Mi", "disks": [{"name": "data", "blank": {"size": "1Gi"}}]});
    create_vm(&api, "needs-disk", spec, &node).await;

    // Pending is also what the VM shows before its agent writes: wait for the agent's word.
    let vm = common::wait_for(Duration::from_secs(60), || async {
        let vm = api.get("needs-disk").await.ok()?;
        let s = vm.status.as_ref()?;
        (s.phase == Some(vmlet::api::vm::Phase::Pending)
            && vmlet::api::conditions::find(&s.conditions, vmlet::api::conditions::Type::Ready)
                .is_some())
        .then_some(vm)
    })
    .await
    .expect("the agent never said why the VM is Pending");
    let ready = condition(&vm, vmlet::api::conditions::Type::Ready);
    assert_eq!(ready.status, "False");
    assert_eq!(ready.reason, "ToolMissing", "{ready:?}");
    for needle in ["qemu-img", "qemu-utils", "retries"] {
        assert!(
            ready.message.contains(needle),
            "{needle}: {}",
            ready.message
        );
    }
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let found = common::wait_for(Duration::from_secs(20), || async {
        let list = events
            .list(&ListParams::default().fields("involvedObject.name=needs-disk"))
            .await
            .ok()?;
        list.items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("ToolMissing"))
    })
    .await
    .expect("a ToolMissing Event on the VM");
    assert_eq!(found.type_.as_deref(), Some("Warning"));
    assert!(found.message.unwrap_or_default().contains("qemu-utils"));

    // The node gets qemu-img: the same VM runs without anyone touching it.
    drop(without);
    let _with = agent(
        &node,
        dir.path(),
        &std::env::var_os("PATH").unwrap_or_default(),
    );
    let vm = wait_phase(&api, "needs-disk", "Running", 60).await;
    assert_eq!(
        condition(&vm, vmlet::api::conditions::Type::Ready).reason,
        "Running"
    );
    assert!(
        dir.path()
            .join("state/vms")
            .join(vm.metadata.uid.as_deref().unwrap())
            .join("disk-data.qcow2")
            .exists()
    );
    common::delete_vms_and_namespace(&client, &ns).await;
    common::forget_node(&client, &node).await;
}
