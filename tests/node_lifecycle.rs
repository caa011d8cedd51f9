//! Node lifecycle with five simulated hypervisors (agents on vmlet's in-memory libvirt)
//! and one controller with short timings. Checked: silencing four of five trips the
//! mass-silence guard (the VM stays bound, NodeHealthy=False saying FailoverHeldBack, a
//! Warning Event on the silent Nodes, the silent Hypervisors not Ready) and the VM is
//! healthy again once they return; then two Nodes are deleted (their Hypervisors and
//! heartbeat Leases are gone within a minute; a VM bound to one of them moves) and a
//! third agent is cut off: the guard counts only Nodes that exist (one of three is
//! lost), and the VM moves.

mod common;

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node as KubeNode;
use kube::api::{Api, DeleteParams, ListParams};
use serde_json::json;
use vmlet::api::{Hypervisor, VirtualMachine, conditions};

use common::node::*;

const LABEL: &str = "vmlet.dev/lifecycle-test";

fn node_healthy(vm: &VirtualMachine) -> Option<(String, String)> {
    let c = conditions::find(
        &vm.status.as_ref()?.conditions,
        conditions::Type::NodeHealthy,
    )?;
    Some((c.status.clone(), c.reason.clone()))
}

fn bound(vm: &VirtualMachine) -> Option<String> {
    vm.status.as_ref()?.node_name.clone()
}

async fn hypervisor_ready(client: &kube::Client, node: &str) -> Option<String> {
    let hv = Api::<Hypervisor>::all(client.clone())
        .get(node)
        .await
        .ok()?;
    let c = conditions::find(&hv.status?.conditions, conditions::Type::Ready)?.clone();
    Some(format!("{}/{}", c.status, c.reason))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_loss_counts_only_nodes_that_exist() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "lifecycle").await;
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    let nodes_api: Api<KubeNode> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let hvs: Api<Hypervisor> = Api::all(client.clone());
    // Nodes an interrupted run left: silent hypervisors to this controller.
    let stale = nodes_api
        .list(&ListParams::default().labels(LABEL))
        .await
        .unwrap();
    for n in stale.items.iter().filter_map(|n| n.metadata.name.clone()) {
        common::forget_node(&client, &n).await;
    }

    let mut nodes = Vec::new();
    for i in 0..5 {
        let n = Node::build_on(Backend::Fake, &format!("lc{i}"), None, |a| {
            common::proxy::fast(a)
        })
        .await;
        n.register(&[(LABEL, &ns)]).await;
        nodes.push(n);
    }
    let _controller = tokio::spawn(vmlet::controller::run_until(
        vmlet::controller::Args {
            heartbeat_grace_seconds: 2,
            fence_after_seconds: 4,
            loss_margin_seconds: 3,
            ..common::controller_args("lifecycle", &ns)
        },
        std::future::pending(),
    ));
    let spec = json!({"memory": "32Mi", "runStrategy": "Always", "nodeSelector": {LABEL: ns}});
    let mut vm = VirtualMachine::new("ha", serde_json::from_value(spec).unwrap());
    vm.metadata.labels = Some([("app".to_string(), "ha".to_string())].into());
    api.create(&Default::default(), &vm).await.unwrap();
    let first = bound(&wait_phase(&api, "ha", "Running", 30).await).unwrap();
    let x = nodes.iter().position(|n| n.name == first).unwrap();

    // 1. Four of five silent (the VM's node among them): the guard holds failover back.
    let silent: Vec<usize> = (0..5).filter(|&i| i != (x + 1) % 5).collect();
    for &i in &silent {
        nodes[i].crash_agent();
    }
    let held = common::wait_for(Duration::from_secs(60), || async {
        let vm = api.get("ha").await.ok()?;
        (node_healthy(&vm)? == ("False".into(), "FailoverHeldBack".into())).then_some(vm)
    })
    .await
    .expect("the guard never said it held failover back");
    assert_eq!(
        bound(&held).as_deref(),
        Some(first.as_str()),
        "moved while 4 of 5 were silent"
    );
    let msg = conditions::find(
        &held.status.unwrap().conditions,
        conditions::Type::NodeHealthy,
    )
    .unwrap()
    .message
    .clone();
    assert!(msg.contains("4 of 5 hypervisors are silent"), "{msg}");
    // The silent agents' Hypervisors are no longer Ready=True.
    let unknown = common::wait_for(Duration::from_secs(30), || async {
        (hypervisor_ready(&client, &first).await? == "Unknown/AgentSilent").then_some(())
    })
    .await;
    assert!(
        unknown.is_some(),
        "silent hypervisor says {:?}",
        hypervisor_ready(&client, &first).await
    );
    // The Node of the VM says why too.
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::all(client.clone());
    let said = common::wait_for(Duration::from_secs(15), || async {
        let evs = events
            .list(&ListParams::default().fields(&format!("involvedObject.name={first}")))
            .await
            .ok()?;
        evs.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("FailoverHeldBack"))
            .then_some(())
    })
    .await;
    assert!(said.is_some(), "no FailoverHeldBack Event on node {first}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        bound(&api.get("ha").await.unwrap()).as_deref(),
        Some(first.as_str()),
        "moved while the guard held"
    );

    // They return: the VM is healthy again where it was, the Hypervisors Ready again.
    for &i in &silent {
        nodes[i].start_agent();
    }
    let healthy = common::wait_for(Duration::from_secs(60), || async {
        let vm = api.get("ha").await.ok()?;
        (node_healthy(&vm)?.0 == "True").then_some(vm)
    })
    .await
    .expect("never healthy again");
    assert_eq!(bound(&healthy).as_deref(), Some(first.as_str()));
    let ready = common::wait_for(Duration::from_secs(30), || async {
        hypervisor_ready(&client, &first)
            .await?
            .starts_with("True/")
            .then_some(())
    })
    .await;
    assert!(
        ready.is_some(),
        "the returned agent's Hypervisor is not Ready"
    );

    // 2. Two other Nodes are decommissioned: agents stopped, Node objects deleted. One
    // of them holds a second VM (kept off the first's node by anti-affinity).
    let spec = json!({"memory": "32Mi", "runStrategy": "Always", "nodeSelector": {LABEL: ns},
                      "antiAffinity": [{"labelSelector": {"matchLabels": {"app": "ha"}},
                                        "topologyKey": "kubernetes.io/hostname"}]});
    let mut other = VirtualMachine::new("other", serde_json::from_value(spec).unwrap());
    other.metadata.labels = Some([("app".to_string(), "other".to_string())].into());
    api.create(&Default::default(), &other).await.unwrap();
    let y_name = bound(&wait_phase(&api, "other", "Running", 30).await).unwrap();
    let y = nodes.iter().position(|n| n.name == y_name).unwrap();
    assert_ne!(x, y, "anti-affinity");
    let gone: Vec<usize> = std::iter::once(y)
        .chain((0..5).filter(|&i| i != x && i != y).take(1))
        .collect();
    for &i in &gone {
        nodes[i].crash_agent();
        nodes_api
            .delete(&nodes[i].name, &DeleteParams::default())
            .await
            .unwrap();
    }
    let t = Instant::now();
    let cleaned = common::wait_for(Duration::from_secs(60), || async {
        for &i in &gone {
            let n = &nodes[i].name;
            if hvs.get_opt(n).await.ok()?.is_some()
                || leases.get_opt(&format!("vmlet-{n}")).await.ok()?.is_some()
            {
                return None;
            }
        }
        Some(())
    })
    .await;
    assert!(
        cleaned.is_some(),
        "Hypervisors or Leases of deleted Nodes remain after 60 s"
    );
    eprintln!(
        "deleted Nodes' Hypervisors and Leases gone after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // The VM on a deleted Node is on a lost node: it says so and moves.
    let moved = common::wait_for(Duration::from_secs(90), || async {
        let vm = api.get("other").await.ok()?;
        let node = bound(&vm)?;
        (node != y_name && vm.status.as_ref()?.phase? == vmlet::api::vm::Phase::Running)
            .then_some(node)
    })
    .await;
    assert!(
        moved.is_some(),
        "the VM on a deleted Node never moved; status: {}",
        serde_json::to_string(&api.get("other").await.unwrap().status).unwrap()
    );
    eprintln!(
        "the deleted Node's VM runs on {} {:.1} s after the Node was deleted",
        moved.unwrap(),
        t.elapsed().as_secs_f64()
    );

    // 3. The VM's own node is cut off: one of three existing hypervisors is lost, so
    // the VM moves (the deleted two are not counted as lost).
    nodes[x].crash_agent();
    let t = Instant::now();
    let moved = common::wait_for(Duration::from_secs(90), || async {
        let vm = api.get("ha").await.ok()?;
        let node = bound(&vm)?;
        (node != first && vm.status.as_ref()?.phase? == vmlet::api::vm::Phase::Running)
            .then_some(node)
    })
    .await;
    let Some(to) = moved else {
        panic!(
            "the VM never moved off its lost node; status: {}",
            serde_json::to_string(&api.get("ha").await.unwrap().status).unwrap()
        );
    };
    assert!(
        !gone.iter().any(|&i| nodes[i].name == to),
        "moved to a deleted node"
    );
    eprintln!(
        "moved from {first} to {to} {:.1} s after its agent was cut off",
        t.elapsed().as_secs_f64()
    );

    common::delete_vms_and_namespace(&client, &ns).await;
    for n in nodes {
        n.forget().await;
    }
}
