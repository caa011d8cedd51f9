//! An API server outage three times longer than the fence delay, with two agents that
//! share a peer key: each asks the other before fencing, both answer that they cannot
//! reach the API server either (a majority of hypervisors), so neither fences. No VM is
//! destroyed or restarted: status.startTime and restartCount are unchanged afterwards.
//! (tests/failover.rs is the other side: a cut-off agent whose peer does reach the API
//! server fences.)
//!
//! Alone in its test binary: cargo runs test binaries one after another, so no other test
//! sees the outage.

mod common;

use std::time::{Duration, Instant};

use kube::api::Api;
use serde_json::json;
use vmlet::agent::libvirt::RunState;
use vmlet::api::VirtualMachine;

use common::node::*;

const FENCE_AFTER: u64 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_that_all_lose_the_api_server_do_not_fence() {
    let pid = common::apiserver_pid();
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "outage-peers").await;
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    // Agents count every Hypervisor object when they judge "a majority cannot reach the
    // API server". Ones that tests which failed earlier left behind (no agent renews
    // their Lease any more) would make these two a minority: they would fence, the safe
    // side, and this test fail. Hypervisors of live agents are left alone.
    let hvs: Api<vmlet::api::Hypervisor> = Api::all(client.clone());
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "kube-node-lease");
    let now = k8s_openapi::jiff::Timestamp::now();
    for h in hvs.list(&Default::default()).await.unwrap().items {
        let name = h.metadata.name.unwrap_or_default();
        let lease = leases.get_opt(&format!("vmlet-{name}")).await.unwrap();
        let renewed = lease.and_then(|l| l.spec?.renew_time).map(|t| t.0);
        if renewed.is_none_or(|t| now.duration_since(t).as_secs() > 60) {
            common::forget_node(&client, &name).await;
        }
    }
    let keydir = tempfile::tempdir().unwrap();
    let key = keydir.path().join("peer.key");
    std::fs::write(&key, vmlet::agent::peers::nonce().unwrap().repeat(2)).unwrap();
    let fast = |a: &mut vmlet::agent::Args| {
        a.heartbeat_seconds = 1;
        a.lease_duration_seconds = 3;
        a.fence_after_seconds = FENCE_AFTER;
        a.peer_key_file = Some(key.clone());
    };
    let a = Node::build("peer-a", None, fast).await;
    let b = Node::build("peer-b", None, fast).await;
    let mut uids = Vec::new();
    for (name, node) in [("on-a", &a), ("on-b", &b)] {
        let uid = create_vm(&api, name, json!({"memory": "32Mi"}), &node.name).await;
        wait_phase(&api, name, "Running", 30).await;
        uids.push(uid);
    }
    // Both agents know each other (their Hypervisor objects carry their addresses).
    common::wait_for(Duration::from_secs(30), || async {
        let hvs: Api<vmlet::api::Hypervisor> = Api::all(client.clone());
        let with_url = |n: &str| {
            let hvs = hvs.clone();
            let n = n.to_string();
            async move { hvs.get(&n).await.ok()?.status?.agent_url }
        };
        (with_url(&a.name).await.is_some() && with_url(&b.name).await.is_some()).then_some(())
    })
    .await
    .expect("Hypervisors with agent URLs");
    tokio::time::sleep(Duration::from_secs(2)).await; // the agents' caches see both
    let before: Vec<_> = {
        let mut v = Vec::new();
        for name in ["on-a", "on-b"] {
            let s = api.get(name).await.unwrap().status.unwrap();
            v.push((s.start_time, s.restart_count));
        }
        v
    };

    common::signal("-STOP", &pid);
    let stopped = Instant::now();
    let mut interrupted = Vec::new();
    while stopped.elapsed() < Duration::from_secs(3 * FENCE_AFTER) {
        for (node, uid) in [(&a, &uids[0]), (&b, &uids[1])] {
            if node.lv.lookup(uid).await.unwrap().map(|d| d.state) != Some(RunState::Running) {
                interrupted.push(format!(
                    "{} at {:.1} s",
                    node.name,
                    stopped.elapsed().as_secs_f64()
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    common::signal("-CONT", &pid);
    assert!(
        interrupted.is_empty(),
        "domains stopped during the outage: {interrupted:?}"
    );

    // Afterwards: the VMs run on, never restarted.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (i, name) in ["on-a", "on-b"].into_iter().enumerate() {
        let vm = wait_phase(&api, name, "Running", 30).await;
        let s = vm.status.unwrap();
        assert_eq!(
            (s.start_time, s.restart_count),
            before[i].clone(),
            "{name} was restarted"
        );
    }
    common::delete_vms_and_namespace(&client, &ns).await;
    a.forget().await;
    b.forget().await;
}
