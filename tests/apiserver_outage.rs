//! kube-apiserver stops answering for 30 s (SIGSTOP on the real process, then SIGCONT):
//! the agent and the controller ride it out without restarting, the running VM is not
//! touched (the outage is shorter than the fence delay), and both work again afterwards.
//!
//! Alone in its test binary: cargo runs test binaries one after another, so no other test
//! sees the outage.

mod common;

use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams};
use serde_json::json;
use vmlet::agent::libvirt::RunState;
use vmlet::api::VirtualMachine;

use common::node::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_controller_survive_a_30s_apiserver_outage() {
    let pid = common::apiserver_pid();
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "outage").await;
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    let node = Node::build("outage", None, |a| {
        a.heartbeat_seconds = 1;
        a.lease_duration_seconds = 4;
    })
    .await;
    node.register(&[("vmlet.dev/test-run", &ns)]).await;
    let controller = tokio::spawn(vmlet::controller::run_until(
        vmlet::controller::Args {
            heartbeat_grace_seconds: 2,
            ..common::controller_args("outage", &ns)
        },
        std::future::pending(),
    ));
    let sel = json!({"vmlet.dev/test-run": ns});
    let vm = VirtualMachine::new(
        "steady",
        serde_json::from_value(json!({"memory": "32Mi", "nodeSelector": sel})).unwrap(),
    );
    let uid = api
        .create(&Default::default(), &vm)
        .await
        .unwrap()
        .metadata
        .uid
        .unwrap();
    wait_phase(&api, "steady", "Running", 30).await;

    common::signal("-STOP", &pid);
    let stopped = Instant::now();
    // During the outage the domain keeps running; sample it.
    let mut interrupted = false;
    while stopped.elapsed() < Duration::from_secs(30) {
        if node.lv.lookup(&uid).await.unwrap().map(|d| d.state) != Some(RunState::Running) {
            interrupted = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    common::signal("-CONT", &pid);
    assert!(!interrupted, "the VM was stopped during the outage");
    assert!(
        !controller.is_finished(),
        "the controller exited during the outage"
    );

    // Both work again, without a restart: the agent reacts to a spec change, the
    // controller places a new VM, and the old domain was never restarted.
    let recovered = Instant::now();
    api.patch(
        "steady",
        &Default::default(),
        &kube::api::Patch::Merge(json!({"spec": {"runStrategy": "Halted"}})),
    )
    .await
    .unwrap();
    wait_phase(&api, "steady", "Stopped", 60).await;
    let vm = VirtualMachine::new(
        "after",
        serde_json::from_value(json!({"memory": "32Mi", "nodeSelector": sel})).unwrap(),
    );
    api.create(&Default::default(), &vm).await.unwrap();
    wait_phase(&api, "after", "Running", 60).await;
    println!(
        "recovered {:.1} s after the API server came back",
        recovered.elapsed().as_secs_f64()
    );
    let steady = api.get("steady").await.unwrap().status.unwrap();
    assert_eq!(steady.restart_count.unwrap_or(0), 0, "the VM was restarted");

    for name in ["steady", "after"] {
        api.delete(name, &DeleteParams::default()).await.unwrap();
    }
    common::delete_vms_and_namespace(&client, &ns).await;
    controller.abort();
    node.forget().await;
}
