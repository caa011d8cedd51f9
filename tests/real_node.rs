//! The real worker node of hack/node.sh (kubelet, containerd, runc, CNI on this machine),
//! registered with the local control plane: a Pod is scheduled there by name, runs, gets
//! an address from the CNI bridge, and its log comes back through the API server (which
//! reaches the kubelet at the Node's InternalIP). The ground the chart's own Pods will run
//! on (issue: Helm install on a real node).
//!
//! Needs `hack/node.sh up` (make test runs it).

mod common;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, LogParams, PostParams};
use serde_json::json;

const NODE: &str = "vmlet-node";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_runs_on_the_real_node_and_its_log_comes_back() {
    let client = common::client().await;
    let node: Node = Api::all(client.clone())
        .get(NODE)
        .await
        .expect("the real node (hack/node.sh up)");
    let addresses = node.status.and_then(|s| s.addresses).unwrap_or_default();
    assert!(
        addresses
            .iter()
            .any(|a| a.type_ == "InternalIP" && a.address == "10.78.0.1"),
        "{addresses:?}"
    );
    let ns = common::namespace(&client, "real-node").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "hello"},
        "spec": {"nodeName": NODE, "restartPolicy": "Never",
            "containers": [{"name": "c", "image": "vmlet.dev/pause:local", "imagePullPolicy": "Never",
                "command": ["/bin/busybox", "sh", "-c", "echo hello from $(hostname); sleep 3600"]}]}
    }))
    .unwrap();
    let t = std::time::Instant::now();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let ip = common::wait_for(Duration::from_secs(60), || async {
        let st = pods.get("hello").await.ok()?.status?;
        (st.phase.as_deref() == Some("Running")).then_some(st.pod_ip)?
    })
    .await
    .expect("the Pod never ran");
    println!("Pod Running in {:.1} s at {ip}", t.elapsed().as_secs_f64());
    assert!(ip.starts_with("10.79.0."), "{ip}");
    let log = common::wait_for(Duration::from_secs(20), || async {
        let l = pods.logs("hello", &LogParams::default()).await.ok()?;
        l.contains("hello from hello").then_some(l)
    })
    .await
    .expect("no log through the API server");
    println!("log: {}", log.trim());
    common::delete_namespace(&client, &ns).await;
}
