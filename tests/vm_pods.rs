//! VM Pods against the real control plane and a simulated hypervisor: every bound VM has
//! one Pod on its node that requests what the VM costs the host; a namespace's
//! ResourceQuota holds its VMs (the VM over quota says so and starts once quota is
//! freed); other Pods on a hypervisor take capacity from VMs; a VM's Pod follows it.

mod common;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, ResourceQuota};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use vmlet::api::overhead::Overhead;
use vmlet::api::quantity::parse_bytes;
use vmlet::api::{Hypervisor, VirtualMachine, conditions};

use common::node::*;

async fn create_vm(api: &Api<VirtualMachine>, name: &str, memory: &str, ns: &str) {
    create_vm_with(api, name, memory, ns, "Shutdown").await
}

async fn create_vm_with(
    api: &Api<VirtualMachine>,
    name: &str,
    memory: &str,
    ns: &str,
    eviction: &str,
) {
    let vm: VirtualMachine = serde_json::from_value(json!({
        "apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {"memory": memory, "cpu": {"cores": 2},
                 "nodeSelector": {"vmlet.dev/test-run": ns},
                 "evictionStrategy": eviction,
                 "podMetadata": {"labels": {"app": name}}}
    }))
    .unwrap();
    api.create(&PostParams::default(), &vm).await.unwrap();
}

/// The VM's Pods, found by the label every VM Pod carries.
async fn pods_of(pods: &Api<Pod>, vm: &str) -> Vec<Pod> {
    pods.list(&ListParams::default().labels(&format!("vmlet.dev/vm={vm}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

async fn scheduled(api: &Api<VirtualMachine>, name: &str) -> Option<(String, String, String)> {
    let vm = api.get(name).await.ok()?;
    let st = vm.status?;
    let c = conditions::find(&st.conditions, conditions::Type::Scheduled)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test]
async fn vm_pods_account_quota_and_capacity() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "vmpods").await;
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);

    let node = Node::new("vmpods").await;
    node.register(&[("vmlet.dev/test-run", &ns)]).await;
    let hvs: Api<Hypervisor> = Api::all(client.clone());
    let hv = common::wait_for(Duration::from_secs(30), || async {
        let h = hvs.get_opt(&node.name).await.ok()??;
        conditions::is_true(&h.status.as_ref()?.conditions, conditions::Type::Ready).then_some(h)
    })
    .await
    .expect("hypervisor Ready");
    let controller = tokio::spawn(vmlet::controller::run_until(
        common::controller_args("vmpods", &ns),
        std::future::pending(),
    ));

    // 1. A running VM has exactly one Pod, on its node, owned by it, labelled, requesting
    //    guest memory plus the node's published overhead and 1/4 core per vCPU.
    create_vm(&api, "a", "1Gi", &ns).await;
    let vm = wait_phase(&api, "a", "Running", 60).await;
    assert_eq!(
        vm.status.as_ref().unwrap().node_name.as_deref(),
        Some(node.name.as_str())
    );
    let pod = common::wait_for(Duration::from_secs(10), || async {
        pods_of(&pods, "a").await.into_iter().next()
    })
    .await
    .expect("the VM's Pod");
    assert_eq!(pods_of(&pods, "a").await.len(), 1);
    let spec = pod.spec.clone().unwrap();
    assert_eq!(spec.node_name.as_deref(), Some(node.name.as_str()));
    let labels = pod.metadata.labels.clone().unwrap();
    assert_eq!(labels["app"], "a", "the spec's podMetadata labels");
    let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(owner.uid, vm.metadata.uid.clone().unwrap());
    let req = spec.containers[0]
        .resources
        .clone()
        .unwrap()
        .requests
        .unwrap();
    let formula = hv.status.as_ref().unwrap().vm_overhead.clone().unwrap();
    let overhead = Overhead::try_from(&formula).unwrap().of(1, 2, 1 << 30);
    assert!(overhead > 0, "the node publishes an overhead");
    assert_eq!(parse_bytes(&req["memory"].0).unwrap(), (1 << 30) + overhead);
    assert_eq!(req["cpu"].0, "500m", "2 vCPUs at the default ratio of 4");

    // 2. Deleting the VM's Pod (by hand, or an eviction by `kubectl drain`) asks the VM
    //    to leave its node. evictionStrategy Shutdown: it is shut down, unbound and
    //    placed again (here on the same, only node) with a new Pod; the old Pod waits
    //    (Terminating) until the VM has left, then goes.
    let restarts = vm.status.as_ref().unwrap().restart_count.unwrap_or(0);
    pods.delete(
        &pod.metadata.name.clone().unwrap(),
        &DeleteParams::default(),
    )
    .await
    .unwrap();
    let evicting = common::wait_event(&client, &ns, "a", "Evicting", 20).await;
    assert!(
        evicting.is_some_and(|m| m.contains("shutting down")),
        "no Evicting event"
    );
    let back = common::wait_for(Duration::from_secs(60), || async {
        let vm = api.get("a").await.ok()?;
        let st = vm.status?;
        let restarted = st.restart_count.unwrap_or(0) > restarts
            && st.phase == Some(vmlet::api::vm::Phase::Running);
        let pods = Api::<Pod>::namespaced(client.clone(), &ns)
            .list(&ListParams::default().labels("vmlet.dev/vm=a"))
            .await
            .ok()?
            .items;
        (restarted && pods.len() == 1 && pods[0].metadata.uid != pod.metadata.uid).then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "a did not restart with a new Pod after its Pod was deleted: {:?} {:?}",
        api.get("a").await.ok().and_then(|v| v.status),
        pods_of(&pods, "a")
            .await
            .iter()
            .map(|p| p.metadata.name.clone())
            .collect::<Vec<_>>()
    );

    //    A Pod gone without its VM leaving (its finalizer removed by hand, then
    //    deleted): the VM runs on, and a new Pod counts it again.
    let current = pods_of(&pods, "a").await.remove(0);
    let name = current.metadata.name.clone().unwrap();
    pods.patch(
        &name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    pods.delete(&name, &DeleteParams::default()).await.unwrap();
    let again = common::wait_for(Duration::from_secs(20), || async {
        pods_of(&pods, "a")
            .await
            .into_iter()
            .find(|p| p.metadata.uid != current.metadata.uid)
    })
    .await;
    assert!(again.is_some(), "a's Pod was not created again");
    let st = api.get("a").await.unwrap().status.unwrap();
    assert_eq!(
        st.restart_count.unwrap_or(0),
        restarts + 1,
        "not restarted for it"
    );

    //    evictionStrategy LiveMigrate: a migration is asked for, and the Pod waits while
    //    the VM is still there (this node has no other to go to).
    create_vm_with(&api, "l", "256Mi", &ns, "LiveMigrate").await;
    wait_phase(&api, "l", "Running", 60).await;
    let l_pod = common::wait_for(Duration::from_secs(10), || async {
        pods_of(&pods, "l").await.into_iter().next()
    })
    .await
    .expect("l's Pod");
    let l_name = l_pod.metadata.name.clone().unwrap();
    pods.delete(&l_name, &DeleteParams::default())
        .await
        .unwrap();
    let migrations: Api<vmlet::api::VirtualMachineMigration> = Api::namespaced(client.clone(), &ns);
    let asked = common::wait_for(Duration::from_secs(20), || async {
        migrations
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|m| m.spec.vm_name == "l")
    })
    .await;
    assert!(asked.is_some(), "no migration asked for l");
    let held = pods.get(&l_name).await.unwrap();
    assert!(
        held.metadata.deletion_timestamp.is_some(),
        "l's Pod waits, Terminating"
    );
    // Deleting the VM lets its Pod go.
    for m in migrations.list(&ListParams::default()).await.unwrap().items {
        let _ = migrations
            .delete(&m.metadata.name.unwrap(), &DeleteParams::default())
            .await;
    }
    api.delete("l", &DeleteParams::default()).await.unwrap();
    let released = common::wait_for(Duration::from_secs(60), || async {
        pods.get_opt(&l_name).await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(released.is_some(), "l's Pod outlived l");

    // 3. A ResourceQuota on requests.memory: room for "a" only. "b" waits, says why with
    //    the API server's words, and starts once "a" is deleted.
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "vms"},
        "spec": {"hard": {"requests.memory": "2Gi", "pods": "5"}}
    }))
    .unwrap();
    Api::<ResourceQuota>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &quota)
        .await
        .unwrap();
    // The quota controller computes usage before the quota admits anything.
    common::wait_for(Duration::from_secs(30), || async {
        let q = Api::<ResourceQuota>::namespaced(client.clone(), &ns)
            .get("vms")
            .await
            .ok()?;
        q.status?.used?.get("requests.memory").map(|_| ())
    })
    .await
    .expect("quota usage computed");
    create_vm(&api, "b", "1Gi", &ns).await;
    let refused = common::wait_for(Duration::from_secs(30), || async {
        scheduled(&api, "b")
            .await
            .filter(|(s, r, _)| s == "False" && r == "QuotaExceeded")
    })
    .await;
    let Some(refused) = refused else {
        panic!("b not refused by quota: {:?}", scheduled(&api, "b").await);
    };
    assert!(refused.2.contains("exceeded quota"), "{}", refused.2);
    assert!(pods_of(&pods, "b").await.is_empty());
    assert!(
        api.get("b")
            .await
            .unwrap()
            .status
            .unwrap()
            .node_name
            .is_none(),
        "not bound"
    );
    api.delete("a", &DeleteParams::default()).await.unwrap();
    let vm_b = wait_phase(&api, "b", "Running", 60).await;
    assert_eq!(
        vm_b.status.unwrap().node_name.as_deref(),
        Some(node.name.as_str())
    );
    assert_eq!(pods_of(&pods, "b").await.len(), 1);
    // "a" is gone, and its Pod with it.
    let a_gone = common::wait_for(Duration::from_secs(30), || async {
        pods_of(&pods, "a").await.is_empty().then_some(())
    })
    .await;
    assert!(a_gone.is_some(), "a's Pod outlived it");
    Api::<ResourceQuota>::namespaced(client.clone(), &ns)
        .delete("vms", &DeleteParams::default())
        .await
        .unwrap();

    // 4. Another Pod on the hypervisor takes memory from VMs: with most of the node
    //    requested by it, a VM that no longer fits is not placed, and says why.
    let alloc = parse_bytes(
        &hv.status
            .as_ref()
            .unwrap()
            .allocatable
            .as_ref()
            .unwrap()
            .memory,
    )
    .unwrap();
    let big: Pod = serde_json::from_value(json!({
        "metadata": {"name": "big"},
        "spec": {"nodeName": node.name, "containers": [{"name": "c", "image": "none",
                 "resources": {"requests": {"memory": (alloc - (3u64 << 30)).to_string()}}}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &big).await.unwrap();
    // The controller sees the Pod through its watch, as kube-scheduler sees Pods through
    // its informer: a VM created in the same instant may be decided before the Pod
    // arrives (then the kubelet's admission would be the last word).
    tokio::time::sleep(Duration::from_secs(2)).await;
    create_vm(&api, "c", "2Gi", &ns).await;
    let unfit = common::wait_for(Duration::from_secs(30), || async {
        scheduled(&api, "c").await.filter(|(s, _, _)| s == "False")
    })
    .await
    .expect("c refused for lack of memory");
    assert!(unfit.2.contains("memory"), "{unfit:?}");
    // The Pod gone, the VM fits.
    pods.delete("big", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    wait_phase(&api, "c", "Running", 60).await;

    // 5. A LimitRange applies to VM Pods: its default memory limit is not put on them
    //    (their limit is their request), and its maximum refuses a VM whose footprint
    //    (guest and overhead) is larger than it.
    let limits: k8s_openapi::api::core::v1::LimitRange = serde_json::from_value(json!({
        "metadata": {"name": "vms"},
        "spec": {"limits": [{"type": "Container", "default": {"memory": "64Mi"},
                             "max": {"memory": "2Gi"}}]}
    }))
    .unwrap();
    Api::<k8s_openapi::api::core::v1::LimitRange>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &limits)
        .await
        .unwrap();
    create_vm(&api, "d", "1Gi", &ns).await;
    create_vm(&api, "e", "1900Mi", &ns).await;
    wait_phase(&api, "d", "Running", 60).await;
    let over = common::wait_for(Duration::from_secs(30), || async {
        scheduled(&api, "e")
            .await
            .filter(|(s, r, _)| s == "False" && r == "PodRefused")
    })
    .await;
    let Some(over) = over else {
        panic!(
            "e not refused by the LimitRange: {:?}",
            scheduled(&api, "e").await
        );
    };
    assert!(over.2.contains("maximum memory"), "{over:?}");

    // With the controller still running: it releases the VMs' Pods once they are gone.
    common::delete_vms_and_namespace(&client, &ns).await;
    controller.abort();
    node.forget().await;
}
