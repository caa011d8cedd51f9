//! Live migration between two real libvirt hosts on this machine (hack/hosts.sh: two
//! libvirtd, each in a network and mount namespace of its own, 10.77.0.1 and 10.77.0.2),
//! each with its own in-process agent and state directory, and the controller.
//!
//! The tiny guest boots on one, a VirtualMachineMigration moves it to the other: the
//! guest keeps running (its uptime continues on the target's console), status.nodeName
//! changes exactly once, the source keeps nothing. Then a migration that cannot happen
//! (the VM is stopped) fails with a reason and leaves the VM alone.
//!
//! Needs `hack/hosts.sh up` and `hack/cluster.sh up` (make test runs both).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use vmlet::agent::libvirt::Libvirt;
use vmlet::api::{MigrationPhase, VirtualMachine, VirtualMachineImage, VirtualMachineMigration};

const HOSTS: [&str; 2] = ["qemu+tcp://10.77.0.1/system", "qemu+tcp://10.77.0.2/system"];

fn guest_files() -> (PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = root.join(".cache/guest");
    let status = Command::new(root.join("hack/tiny-guest.sh"))
        .arg(&out)
        .status()
        .expect("hack/tiny-guest.sh");
    assert!(status.success(), "building the tiny guest failed");
    (out.join("vmlinuz"), out.join("initrd.gz"))
}

fn virsh(uri: &str, args: &[&str]) -> String {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(uri)
        .args(args)
        .output()
        .expect("virsh");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The last `uptime=` the guest printed on a console log.
fn last_uptime(path: &Path) -> Option<f64> {
    let text = String::from_utf8_lossy(&std::fs::read(path).ok()?).into_owned();
    text.lines()
        .rev()
        .find_map(|l| l.split("uptime=").nth(1))
        .and_then(|v| v.trim().parse().ok())
}

struct Host {
    node: String,
    state: PathBuf,
    uri: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_guest_moves_between_two_libvirt_hosts() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "mig").await;
    let dir = tempfile::tempdir().unwrap();
    let run = format!("mig-{}", std::process::id());

    // Two hypervisors: a Node, an agent on its own libvirtd and state directory.
    let nodes: Api<Node> = Api::all(client.clone());
    let mut hosts = Vec::new();
    let mut agents = Vec::new();
    for (i, uri) in HOSTS.iter().enumerate() {
        let lv = Libvirt::open(uri)
            .await
            .unwrap_or_else(|e| panic!("{uri}: {e} (run hack/hosts.sh up)"));
        let node = format!("{run}-h{}", i + 1);
        let n = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node,
            "labels": {"vmlet.dev/hypervisor": "true", "vmlet.dev/migration-test": run}}});
        nodes
            .patch(&node, &PatchParams::apply("vmlet-test"), &Patch::Apply(&n))
            .await
            .unwrap();
        let base = dir.path().join(format!("h{}", i + 1));
        let state = base.join("state");
        std::fs::create_dir_all(base.join("images")).unwrap();
        let args = vmlet::agent::Args {
            node: node.clone(),
            libvirt_uri: uri.to_string(),
            state_dir: state.clone(),
            image_root: base.join("images"),
            accel: vmlet::agent::accel::AccelChoice::Tcg,
            reserved_memory: "0".into(),
            metrics_addr: "127.0.0.1:0".into(),
            advertise_address: None,
            migration_uri: Some(uri.to_string()),
            orphan_grace_seconds: 30,
            lease_duration_seconds: 15,
            heartbeat_seconds: 2,
            fence_after_seconds: 0,
            kubeconfig: Some(common::kubeconfig_path()),
        };
        agents.push(tokio::spawn(vmlet::agent::run_with(
            args,
            lv,
            std::future::pending(),
        )));
        hosts.push(Host { node, state, uri });
    }
    let controller = tokio::spawn(vmlet::controller::run_until(
        common::controller_args("migration-test", &ns),
        std::future::pending(),
    ));

    // The tiny guest, on whichever host the scheduler picks.
    let (kernel, initrd) = guest_files();
    let (kurl, ksha) = common::serve_file(&kernel).await;
    let (iurl, isha) = common::serve_file(&initrd).await;
    let images: Api<VirtualMachineImage> = Api::namespaced(client.clone(), &ns);
    for (name, fmt, url, sha) in [
        ("tiny-kernel", "kernel", &kurl, &ksha),
        ("tiny-initrd", "initrd", &iurl, &isha),
    ] {
        let spec = json!({"format": fmt, "source": {"http": {"url": url, "sha256": sha}}});
        let img = VirtualMachineImage::new(name, serde_json::from_value(spec).unwrap());
        images.create(&PostParams::default(), &img).await.unwrap();
    }
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    let spec = json!({
        "runStrategy": "Always",
        "memory": "128Mi",
        "nodeSelector": {"vmlet.dev/migration-test": run},
        "boot": {"kernel": {"name": "tiny-kernel"}, "initrd": {"name": "tiny-initrd"}, "cmdline": "console=ttyS0 panic=-1"},
        "disks": [
            {"name": "data", "blank": {"size": "64Mi"}},
            {"name": "seed", "cloudInit": {"userData": "#cloud-config\n"}}
        ],
        "networks": [{"name": "default", "user": {}}]
    });
    let vm = api
        .create(
            &PostParams::default(),
            &VirtualMachine::new("tiny", serde_json::from_value(spec).unwrap()),
        )
        .await
        .unwrap();
    let uid = vm.metadata.uid.clone().unwrap();

    // Every nodeName the VM ever shows, from a watch.
    let bindings: Arc<Mutex<Vec<String>>> = Arc::default();
    let watch = {
        let (api, bindings) = (api.clone(), bindings.clone());
        tokio::spawn(async move {
            let mut s = watcher(api, watcher::Config::default().fields("metadata.name=tiny"))
                .applied_objects()
                .boxed();
            while let Ok(Some(vm)) = s.try_next().await {
                if let Some(n) = vm.status.and_then(|s| s.node_name) {
                    let mut b = bindings.lock().unwrap();
                    if b.last() != Some(&n) {
                        b.push(n);
                    }
                }
            }
        })
    };

    let source = common::wait_for(Duration::from_secs(120), || async {
        let st = api.get("tiny").await.ok()?.status?;
        (st.phase? == vmlet::api::vm::Phase::Running).then_some(st.node_name?)
    })
    .await
    .expect("the VM never ran");
    let (src, dst) = if source == hosts[0].node {
        (&hosts[0], &hosts[1])
    } else {
        (&hosts[1], &hosts[0])
    };
    let src_console = src.state.join("vms").join(&uid).join("console.log");
    let dst_console = dst.state.join("vms").join(&uid).join("console.log");
    common::wait_for(Duration::from_secs(60), || async {
        last_uptime(&src_console).filter(|u| *u > 4.0)
    })
    .await
    .expect("the guest never reached userspace");

    // Move it.
    let migs: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), &ns);
    let before = last_uptime(&src_console).unwrap();
    let t = Instant::now();
    let m = VirtualMachineMigration::new(
        "move-tiny",
        serde_json::from_value(json!({"vmName": "tiny"})).unwrap(),
    );
    migs.create(&PostParams::default(), &m).await.unwrap();
    let done = common::wait_for(Duration::from_secs(120), || async {
        let st = migs.get("move-tiny").await.ok()?.status?;
        st.phase?.finished().then_some(st)
    })
    .await
    .expect("the migration never finished");
    assert_eq!(
        done.phase,
        Some(MigrationPhase::Succeeded),
        "migration: {done:?}"
    );
    assert_eq!(done.source_node.as_deref(), Some(src.node.as_str()));
    assert_eq!(done.target_node.as_deref(), Some(dst.node.as_str()));
    println!(
        "migration {} -> {}: {:.2} s from create to Succeeded; libvirt downtime {:?} ms, {:?} bytes",
        src.node,
        dst.node,
        t.elapsed().as_secs_f64(),
        done.downtime_milliseconds,
        done.data_transferred_bytes
    );

    // The guest kept running: the target's console continues its uptime, no new boot.
    let after = common::wait_for(Duration::from_secs(30), || async {
        last_uptime(&dst_console).filter(|u| *u > before)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "no continued uptime on the target (source's last {before}): {:?}",
            std::fs::read_to_string(&dst_console)
        )
    });
    let target_log = std::fs::read_to_string(&dst_console).unwrap_or_default();
    assert!(
        !target_log.contains("vmlet-guest-up"),
        "the guest booted again on the target: {target_log}"
    );
    println!("guest uptime {before} s on the source, {after} s on the target");

    // Bound to the target; the binding changed exactly once; the VM stays Running there.
    let st = common::wait_for(Duration::from_secs(30), || async {
        let st = api.get("tiny").await.ok()?.status?;
        (st.node_name.as_deref() == Some(dst.node.as_str())
            && st.phase == Some(vmlet::api::vm::Phase::Running))
        .then_some(st)
    })
    .await
    .expect("the VM is not Running on the target");
    assert_eq!(st.domain_uuid.as_deref(), Some(uid.as_str()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        *bindings.lock().unwrap(),
        vec![src.node.clone(), dst.node.clone()],
        "status.nodeName must change exactly once"
    );
    assert!(
        virsh(dst.uri, &["list", "--uuid"]).contains(&uid),
        "not running on the target's libvirt"
    );
    assert!(
        !virsh(src.uri, &["list", "--all", "--uuid"]).contains(&uid),
        "the source still has the domain"
    );
    assert!(
        !src.state.join("vms").join(&uid).exists(),
        "the source kept the VM's files"
    );

    // A stopped VM cannot migrate live: refused with a reason, the VM untouched.
    let stop = json!({"spec": {"runStrategy": "Halted"}});
    api.patch("tiny", &PatchParams::default(), &Patch::Merge(&stop))
        .await
        .unwrap();
    common::wait_for(Duration::from_secs(60), || async {
        let st = api.get("tiny").await.ok()?.status?;
        (st.phase? == vmlet::api::vm::Phase::Stopped).then_some(())
    })
    .await
    .expect("the VM never stopped");
    let m = VirtualMachineMigration::new(
        "move-stopped",
        serde_json::from_value(json!({"vmName": "tiny"})).unwrap(),
    );
    migs.create(&PostParams::default(), &m).await.unwrap();
    let refused = common::wait_for(Duration::from_secs(30), || async {
        let st = migs.get("move-stopped").await.ok()?.status?;
        st.phase?.finished().then_some(st)
    })
    .await
    .expect("the second migration never finished");
    assert_eq!(refused.phase, Some(MigrationPhase::Failed));
    assert_eq!(refused.reason.as_deref(), Some("NotRunning"));
    assert_eq!(
        api.get("tiny")
            .await
            .unwrap()
            .status
            .unwrap()
            .node_name
            .as_deref(),
        Some(dst.node.as_str())
    );

    // Finished migrations hold no finalizer: deleting them is immediate.
    migs.delete_collection(&DeleteParams::default(), &Default::default())
        .await
        .unwrap();
    common::wait_for(Duration::from_secs(20), || async {
        migs.list(&Default::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await
    .expect("migrations were not deleted");
    watch.abort();
    common::delete_vms_and_namespace(&client, &ns).await;
    controller.abort();
    for a in agents {
        a.abort();
    }
    for h in &hosts {
        let _ = nodes.delete(&h.node, &DeleteParams::default()).await;
        let hv: Api<vmlet::api::Hypervisor> = Api::all(client.clone());
        let _ = hv.delete(&h.node, &DeleteParams::default()).await;
    }
}
