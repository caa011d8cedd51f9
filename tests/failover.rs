//! Node loss with self-fencing. Agent A reaches the API server through a proxy the test
//! breaks while A's VMs run: A fences itself (destroys its domains), the controller
//! declares A lost only after that, and the VM without local data runs on B. Sampled
//! every 50 ms: never two running domains for one uid. The VM whose blank disk holds data
//! only A has stays bound to A (NodeHealthy=False saying why) and runs there
//! again, on the same disk, when A returns. A keeps the moved VM's stale definition and
//! files while that VM exists and removes them once it is deleted.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams};
use serde_json::json;
use vmlet::agent::libvirt::RunState;
use vmlet::api::VirtualMachine;

use common::node::*;

use common::proxy::{Proxy, admin_kubeconfig, fast, proxied_kubeconfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_node_fences_before_its_vm_moves() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "failover").await;
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    let dir = tempfile::tempdir().unwrap();

    // The proxy first: the agent's kubeconfig points at its port.
    // Nodes an earlier, interrupted run of this test left behind are silent hypervisors
    // to this controller: enough of them trip its mass-silence guard.
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "kube-node-lease");
    let stale = nodes
        .list(&kube::api::ListParams::default().labels("vmlet.dev/failover-test"))
        .await
        .unwrap();
    for n in stale.items.iter().filter_map(|n| n.metadata.name.clone()) {
        let _ = nodes.delete(&n, &DeleteParams::default()).await;
        let _ = leases
            .delete(&format!("vmlet-{n}"), &DeleteParams::default())
            .await;
    }

    let (_, server) = admin_kubeconfig();
    let proxy = Proxy::start(server.trim_start_matches("https://").to_string()).await;
    let kubeconfig = proxied_kubeconfig(dir.path(), proxy.port);

    // The agents share a peer key: before fencing, A asks B, which reaches the API
    // server, so A knows it is cut off (not an outage) and fences.
    let key = dir.path().join("peer.key");
    std::fs::write(&key, vmlet::agent::peers::nonce().unwrap().repeat(2)).unwrap();
    let a = Node::build("fo-a", None, |args| {
        fast(args);
        args.kubeconfig = Some(kubeconfig.clone());
        args.peer_key_file = Some(key.clone());
    })
    .await;
    let b = Node::build("fo-b", None, |args| {
        fast(args);
        args.peer_key_file = Some(key.clone());
    })
    .await;
    a.register(&[("vmlet.dev/failover-test", &ns)]).await;

    let controller = tokio::spawn(vmlet::controller::run_until(
        vmlet::controller::Args {
            heartbeat_grace_seconds: 2,
            fence_after_seconds: 4,
            loss_margin_seconds: 3,
            ..common::controller_args("failover", &ns)
        },
        std::future::pending(),
    ));

    // The VM lands on A (B is not a hypervisor yet), then B joins.
    let spec = json!({"memory": "32Mi", "runStrategy": "Always", "nodeSelector": {"vmlet.dev/failover-test": ns}});
    let vm = VirtualMachine::new("ha", serde_json::from_value(spec).unwrap());
    let uid = api
        .create(&Default::default(), &vm)
        .await
        .unwrap()
        .metadata
        .uid
        .unwrap();
    let on_a = wait_phase(&api, "ha", "Running", 30).await;
    assert_eq!(
        on_a.status.unwrap().node_name.as_deref(),
        Some(a.name.as_str())
    );
    let spec = json!({"memory": "32Mi", "runStrategy": "Always", "nodeSelector": {"vmlet.dev/failover-test": ns},
                      "disks": [{"name": "data", "blank": {"size": "64Mi"}}]});
    let keep = VirtualMachine::new("keep", serde_json::from_value(spec).unwrap());
    let keep_uid = api
        .create(&Default::default(), &keep)
        .await
        .unwrap()
        .metadata
        .uid
        .unwrap();
    let keep_on_a = wait_phase(&api, "keep", "Running", 30).await;
    assert_eq!(
        keep_on_a.status.unwrap().node_name.as_deref(),
        Some(a.name.as_str())
    );
    let disk = a
        .state_dir()
        .join("vms")
        .join(&keep_uid)
        .join("disk-data.qcow2");
    let inode =
        |p: &std::path::Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let disk_inode = inode(&disk);
    b.register(&[("vmlet.dev/failover-test", &ns)]).await;

    // Watch both nodes' domains and the binding every 50 ms.
    let both_running = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let (lv_a, lv_b) = (a.lv.clone(), b.lv.clone());
    let sampler = {
        let (both, stop, uid, api, b_name) = (
            both_running.clone(),
            stop.clone(),
            uid.clone(),
            api.clone(),
            b.name.clone(),
        );
        tokio::spawn(async move {
            let t0 = Instant::now();
            let (mut fenced_at, mut moved_at) = (None, None);
            while !stop.load(Ordering::SeqCst) {
                let ra = matches!(
                    lv_a.lookup(&uid).await.ok().flatten().map(|d| d.state),
                    Some(RunState::Running)
                );
                let rb = matches!(
                    lv_b.lookup(&uid).await.ok().flatten().map(|d| d.state),
                    Some(RunState::Running)
                );
                if ra && rb {
                    both.store(true, Ordering::SeqCst);
                }
                if !ra && fenced_at.is_none() {
                    fenced_at = Some(t0.elapsed());
                }
                let node = api.get("ha").await.ok().and_then(|v| v.status?.node_name);
                if node.as_deref() == Some(b_name.as_str()) && moved_at.is_none() {
                    moved_at = Some(t0.elapsed());
                    assert!(!ra, "bound to B while A's domain still runs");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (fenced_at, moved_at)
        })
    };

    let t_cut = Instant::now();
    proxy.cut();
    let on_b = common::wait_for(Duration::from_secs(60), || async {
        let v = api.get("ha").await.ok()?;
        let s = v.status?;
        (s.node_name.as_deref() == Some(b.name.as_str())
            && s.phase == Some(vmlet::api::vm::Phase::Running))
        .then_some(())
    })
    .await;
    let running_on_b = t_cut.elapsed();
    assert!(
        on_b.is_some(),
        "the VM never ran on B: {:?}",
        api.get("ha").await.unwrap().status
    );
    assert_eq!(b.domains_for(&uid).await, 1);

    // The VM with data only A has waits for A, and says why. The controller judges each
    // VM of the lost node in turn, so this one's verdict may land after the moved VM runs.
    let kept = common::wait_for(Duration::from_secs(15), || async {
        let vm = api.get("keep").await.ok()?;
        let c = vmlet::api::conditions::find(
            &vm.status.as_ref()?.conditions,
            vmlet::api::conditions::Type::NodeHealthy,
        )?;
        (c.status == "False").then_some(vm)
    })
    .await
    .unwrap_or_else(|| panic!("keep never showed NodeHealthy=False"));
    let st = kept.status.clone().unwrap();
    assert_eq!(st.node_name.as_deref(), Some(a.name.as_str()), "{st:?}");
    let healthy = condition(&kept, vmlet::api::conditions::Type::NodeHealthy);
    assert!(
        healthy.message.contains("failoverPolicy") && healthy.message.contains("data"),
        "{}",
        healthy.message
    );
    assert_eq!(b.domains_for(&keep_uid).await, 0);

    // A comes back with a stale cache for a moment: it must not start its copy of the
    // moved VM, and keeps that copy's definition (and files) while the VM exists. The
    // sampler keeps watching throughout. The waiting VM runs again on A, same disk.
    proxy.heal();
    wait_phase(&api, "keep", "Running", 60).await;
    assert_eq!(inode(&disk), disk_inode, "the data disk was recreated");
    let back = common::wait_for(Duration::from_secs(15), || async {
        let vm = api.get("keep").await.ok()?;
        let c = vmlet::api::conditions::find(
            &vm.status?.conditions,
            vmlet::api::conditions::Type::NodeHealthy,
        )?
        .clone();
        (c.status == "True" && c.reason == "NodeReturned").then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "NodeHealthy never came back: {:?}",
        api.get("keep").await.unwrap().status
    );
    tokio::time::sleep(Duration::from_secs(8)).await; // orphan grace (2 s) + a sweep (5 s)
    assert_eq!(
        a.domains_for(&uid).await,
        1,
        "A removed the definition of a VM that exists"
    );
    stop.store(true, Ordering::SeqCst);
    let (fenced_at, moved_at) = sampler
        .await
        .expect("sampler: bound to B while A still ran");
    assert!(
        !both_running.load(Ordering::SeqCst),
        "two running domains for one uid"
    );
    let (fenced_at, moved_at) = (
        fenced_at.expect("A never fenced"),
        moved_at.expect("never rebound"),
    );
    assert!(
        fenced_at < moved_at,
        "moved at {moved_at:?} before A fenced at {fenced_at:?}"
    );
    // kubectl describe vm tells the story: the node was lost, the VM was placed again.
    for reason in ["NodeLost", "Rebound"] {
        let note = common::wait_event(&client, &ns, "ha", reason, 15).await;
        assert!(note.is_some(), "no {reason} Event on the VM");
    }
    println!(
        "cut -> A fenced {:.1} s, -> rebound to B {:.1} s, -> Running on B {:.1} s",
        fenced_at.as_secs_f64(),
        moved_at.as_secs_f64(),
        running_on_b.as_secs_f64()
    );

    // No finalizer stuck: the VM deletes cleanly from B.
    api.delete("ha", &DeleteParams::default()).await.unwrap();
    let gone = common::wait_for(Duration::from_secs(30), || async {
        api.get_opt("ha").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(gone.is_some(), "finalizer stuck");
    assert_eq!(b.domains_for(&uid).await, 0);
    // Deleted: now A's sweep confirms it and removes the stale definition and files.
    let cleaned = common::wait_for(Duration::from_secs(30), || async {
        (a.domains_for(&uid).await == 0).then_some(())
    })
    .await;
    assert!(cleaned.is_some(), "A kept the stale domain of a deleted VM");
    assert!(!a.state_dir().join("vms").join(&uid).exists());
    api.delete("keep", &DeleteParams::default()).await.unwrap();
    let gone = common::wait_for(Duration::from_secs(30), || async {
        api.get_opt("keep").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(gone.is_some(), "keep: finalizer stuck");
    assert!(!disk.exists(), "the data disk outlived its VM");
    controller.abort();
    common::delete_namespace(&client, &ns).await;
    a.forget().await;
    b.forget().await;
}
