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
