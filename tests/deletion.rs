//! Deletion always completes: a VM whose agent can no longer remove its finalizer (its
//! Node object deleted, or the VM unbound while its agent was down) is still deleted,
//! by the controller releasing the finalizer; nothing is released while the agent lives.
//! And a node's Hypervisor and heartbeat Lease go with its Node object.

mod common;

use std::time::Duration;

use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use vmlet::api::{DOMAIN_FINALIZER, VirtualMachine};

use common::node::*;

async fn gone(api: &Api<VirtualMachine>, name: &str, secs: u64) -> bool {
    common::wait_for(Duration::from_secs(secs), || async {
        api.get_opt(name).await.ok()?.is_none().then_some(())
    })
    .await
    .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_whose_agent_cannot_finish_are_still_deleted() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "deletion").await;
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    let mut node = Node::new("del").await;
    node.register(&[("vmlet.dev/deletion-test", &ns)]).await;
    let controller = tokio::spawn(vmlet::controller::run_until(
        common::controller_args("deletion", &ns),
        std::future::pending(),
    ));
    let spec = json!({"memory": "32Mi", "nodeSelector": {"vmlet.dev/deletion-test": ns}});
    for name in ["node-deleted", "unbound", "alive"] {
        let vm = VirtualMachine::new(name, serde_json::from_value(spec.clone()).unwrap());
        api.create(&Default::default(), &vm).await.unwrap();
        let vm = wait_phase(&api, name, "Running", 30).await;
        assert!(
            vm.metadata
                .finalizers
                .unwrap_or_default()
                .iter()
                .any(|f| f == DOMAIN_FINALIZER)
        );
    }

    // A live agent keeps its finalizer and completes the deletion itself.
    api.delete("alive", &DeleteParams::default()).await.unwrap();
    assert!(
        gone(&api, "alive", 30).await,
        "the live agent did not complete the deletion"
    );

    // The agent makes its Node the owner of its Hypervisor and Lease.
    let hvs: Api<vmlet::api::Hypervisor> = Api::all(client.clone());
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "kube-node-lease");
    let lease = format!("vmlet-{}", node.name);
    common::wait_for(Duration::from_secs(30), || async {
        let owned =
            |refs: Option<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>| {
                refs.unwrap_or_default()
                    .iter()
                    .any(|r| r.kind == "Node" && r.name == node.name)
            };
        let h = hvs.get(&node.name).await.ok()?;
        let l = leases.get(&lease).await.ok()?;
        (owned(h.metadata.owner_references) && owned(l.metadata.owner_references)).then_some(())
    })
    .await
    .expect("the Node never became the owner of its Hypervisor and Lease");

    // The agent goes away for good; one VM is unbound while it is being deleted, then
    // the Node object is deleted under the other. Each must be gone within 60 s.
    node.crash_agent();
    // Deleted first (a VM being deleted is never placed again), then unbound.
    api.delete("unbound", &DeleteParams::default())
        .await
        .unwrap();
    let unbind = json!({"status": {"nodeName": null}});
    api.patch_status("unbound", &PatchParams::default(), &Patch::Merge(&unbind))
        .await
        .unwrap();
    assert!(
        gone(&api, "unbound", 60).await,
        "an unbound VM stayed Terminating"
    );

    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    nodes
        .delete(&node.name, &DeleteParams::default())
        .await
        .unwrap();
    api.delete("node-deleted", &DeleteParams::default())
        .await
        .unwrap();
    assert!(
        gone(&api, "node-deleted", 60).await,
        "a VM bound to a deleted Node stayed Terminating"
    );
    // The Hypervisor and the Lease went with their Node (garbage collection).
    let collected = common::wait_for(Duration::from_secs(60), || async {
        (hvs.get_opt(&node.name).await.ok()?.is_none()
            && leases.get_opt(&lease).await.ok()?.is_none())
        .then_some(())
    })
    .await;
    assert!(
        collected.is_some(),
        "the Hypervisor or Lease outlived its Node"
    );
    controller.abort();
    common::delete_namespace(&client, &ns).await;
    node.forget().await;
}

/// The chart's MutatingAdmissionPolicy (here narrowed to this test's namespace) gives a
/// new VM the agent's finalizer as it is created: a VM no node takes is still deleted
/// (the controller releases it), and a VM that runs is started without the agent's own
/// finalizer and deleted by its agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_vms_carry_the_finalizer_from_admission() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "admitted").await;
    let policy = format!("vmlet-test-{ns}");
    let selector = json!({"matchLabels": {"kubernetes.io/metadata.name": ns}});
    vmlet::api::admission::apply_domain_finalizer_policy(&client, &policy, Some(selector), true)
        .await
        .unwrap();
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    let node = Node::new("admitted").await;
    node.register(&[("vmlet.dev/admission-test", &ns)]).await;
    let controller = tokio::spawn(vmlet::controller::run_until(
        common::controller_args("admitted", &ns),
        std::future::pending(),
    ));
    // The policy takes effect once the API server has loaded it.
    let placed = json!({"memory": "32Mi", "nodeSelector": {"vmlet.dev/admission-test": ns}});
    let nowhere = json!({"memory": "32Mi", "nodeSelector": {"vmlet.dev/admission-test": "none"}});
    let mut attempt = 0;
    let vm = loop {
        attempt += 1;
        let name = format!("nowhere-{attempt}");
        let vm = VirtualMachine::new(&name, serde_json::from_value(nowhere.clone()).unwrap());
        let vm = api.create(&Default::default(), &vm).await.unwrap();
        if vm
            .metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == DOMAIN_FINALIZER)
        {
            break vm;
        }
        api.delete(&name, &DeleteParams::default()).await.unwrap();
        assert!(attempt < 30, "the policy never added the finalizer");
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let nowhere_name = vm.metadata.name.clone().unwrap();
    // Unschedulable, deleted: no agent holds it, the controller lets it go.
    assert!(
        common::wait_for(Duration::from_secs(30), || async {
            let vm = api.get(&nowhere_name).await.ok()?;
            let st = vm.status?;
            vmlet::api::conditions::find(&st.conditions, vmlet::api::conditions::Type::Scheduled)
                .filter(|c| c.status == "False")
                .map(|_| ())
        })
        .await
        .is_some(),
        "never said why it is not scheduled"
    );
    // `kubectl describe vm` shows why: a FailedScheduling Event with the reasons.
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), &ns);
    let why = common::wait_for(Duration::from_secs(20), || async {
        let lp =
            kube::api::ListParams::default().fields(&format!("involvedObject.name={nowhere_name}"));
        events.list(&lp).await.ok()?.items.into_iter().find(|e| {
            e.reason.as_deref() == Some("FailedScheduling")
                && e.message
                    .as_deref()
                    .is_some_and(|m| m.contains("node selector mismatch"))
        })
    })
    .await;
    assert!(why.is_some(), "no FailedScheduling Event naming the reason");
    api.delete(&nowhere_name, &DeleteParams::default())
        .await
        .unwrap();
    assert!(
        gone(&api, &nowhere_name, 30).await,
        "an unbound VM with the admitted finalizer stayed Terminating"
    );

    let vm = VirtualMachine::new("placed", serde_json::from_value(placed).unwrap());
    let created = api.create(&Default::default(), &vm).await.unwrap();
    let admitted = created.metadata.finalizers.iter().flatten();
    assert_eq!(admitted.filter(|f| *f == DOMAIN_FINALIZER).count(), 1);
    let vm = wait_phase(&api, "placed", "Running", 30).await;
    // Still one: the agent found it there and did not add its own.
    let finalizers = vm.metadata.finalizers.unwrap_or_default();
    assert_eq!(finalizers, [DOMAIN_FINALIZER]);
    api.delete("placed", &DeleteParams::default())
        .await
        .unwrap();
    assert!(
        gone(&api, "placed", 30).await,
        "the agent did not complete the deletion"
    );

    vmlet::api::admission::apply_domain_finalizer_policy(&client, &policy, None, false)
        .await
        .unwrap();
    controller.abort();
    common::delete_namespace(&client, &ns).await;
    node.forget().await;
}
