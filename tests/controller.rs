//! The controller against the real control plane and three simulated hypervisors (agents
//! on `test:///default`): placement by node selector, anti-affinity and fit, a clear
//! refusal when nothing fits, and leader failover between two replicas.

mod common;

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use serde_json::json;
use vmlet::api::{Hypervisor, VirtualMachine, conditions};

use common::node::*;

async fn node_of(api: &Api<VirtualMachine>, name: &str) -> String {
    let vm = wait_phase(api, name, "Running", 60).await;
    vm.status.unwrap().node_name.unwrap()
}

async fn create(
    api: &Api<VirtualMachine>,
    name: &str,
    labels: serde_json::Value,
    spec: serde_json::Value,
) {
    let vm: VirtualMachine = serde_json::from_value(json!({
        "apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": name, "labels": labels}, "spec": spec
    }))
    .unwrap();
    api.create(&PostParams::default(), &vm).await.unwrap();
}

#[tokio::test]
async fn placement_and_leader_failover() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "sched").await;
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);

    let nodes = [
        Node::new("sched-a").await,
        Node::new("sched-b").await,
        Node::new("sched-c").await,
    ];
    for (n, zone) in nodes.iter().zip(["a", "a", "b"]) {
        n.register(&[
            ("topology.kubernetes.io/zone", zone),
            ("vmlet.dev/test-run", &ns),
        ])
        .await;
    }
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    let hvs: Api<Hypervisor> = Api::all(client.clone());
    for n in &names {
        let ready = common::wait_for(Duration::from_secs(30), || async {
            let h = hvs.get_opt(n).await.ok()??;
            conditions::is_true(&h.status?.conditions, vmlet::api::conditions::Type::Ready)
                .then_some(())
        })
        .await;
        assert!(ready.is_some(), "hypervisor {n} never Ready");
    }

    let c1 = tokio::spawn(vmlet::controller::run_until(
        common::controller_args("replica-1", &ns),
        std::future::pending(),
    ));
    let c2 = tokio::spawn(vmlet::controller::run_until(
        common::controller_args("replica-2", &ns),
        std::future::pending(),
    ));
    let mut replicas = [
        (String::from("replica-1"), Some(c1)),
        (String::from("replica-2"), Some(c2)),
    ];

    // A node selector pins the VM to the only zone-b hypervisor.
    create(
        &api,
        "zone-b",
        json!({}),
        json!({"memory": "64Mi", "nodeSelector": {"topology.kubernetes.io/zone": "b", "vmlet.dev/test-run": ns}}),
    )
    .await;
    assert_eq!(node_of(&api, "zone-b").await, names[2]);

    // Required anti-affinity keeps the pair apart, and within this test's hypervisors.
    let anti = json!([{"labelSelector": {"matchLabels": {"app": "db"}}, "topologyKey": "kubernetes.io/hostname"}]);
    // Every VM here selects this run's nodes: leftovers of other runs never interfere.
    let sel = json!({"topology.kubernetes.io/zone": "a", "vmlet.dev/test-run": ns});
    for name in ["db-0", "db-1"] {
        create(
            &api,
            name,
            json!({"app": "db"}),
            json!({"memory": "64Mi", "antiAffinity": anti, "nodeSelector": sel}),
        )
        .await;
    }
    let (a, b) = (node_of(&api, "db-0").await, node_of(&api, "db-1").await);
    assert_ne!(a, b, "anti-affinity pair on one node");
    // A third member has nowhere to go in zone a.
    create(
        &api,
        "db-2",
        json!({"app": "db"}),
        json!({"memory": "64Mi", "antiAffinity": anti, "nodeSelector": sel}),
    )
    .await;

    // A burst against one hypervisor never over-allocates it: exactly as many VMs as fit
    // are bound (the assume cache counts placements the cache has not seen yet).
    // The zone-b VM already holds 1 vCPU and 64Mi there; each burst VM asks the same.
    // Each VM takes its 64Mi and the node's overhead per VM (status.vmOverhead).
    let st = hvs.get(&names[2]).await.unwrap().status.unwrap();
    let allocatable = st.allocatable.unwrap();
    let overhead =
        vmlet::api::overhead::Overhead::try_from(&st.vm_overhead.expect("vmOverhead")).unwrap();
    let footprint = (64u64 << 20) + overhead.of(1, 1, 64 << 20);
    let mem_free = vmlet::api::quantity::parse_bytes(&allocatable.memory).unwrap() - footprint;
    let fit = ((mem_free / footprint) as usize).min((allocatable.cpu - 1) as usize);
    let burst = fit + 10;
    let zone_b = json!({"topology.kubernetes.io/zone": "b", "vmlet.dev/test-run": ns});
    let creates = (0..burst).map(|i| {
        let api = api.clone();
        let zone_b = zone_b.clone();
        async move {
            create(
                &api,
                &format!("burst-{i}"),
                json!({"burst": "yes"}),
                json!({"memory": "64Mi", "nodeSelector": zone_b}),
            )
            .await
        }
    });
    futures::future::join_all(creates).await;
    let settled = common::wait_for(Duration::from_secs(60), || async {
        let vms = api
            .list(&kube::api::ListParams::default().labels("burst=yes"))
            .await
            .ok()?
            .items;
        let bound = vms
            .iter()
            .filter(|v| {
                v.status
                    .as_ref()
                    .and_then(|s| s.node_name.as_ref())
                    .is_some()
            })
            .count();
        let refused = vms
            .iter()
            .filter(|v| {
                v.status
                    .as_ref()
                    .and_then(|s| {
                        conditions::find(&s.conditions, vmlet::api::conditions::Type::Scheduled)
                    })
                    .is_some_and(|c| c.status == "False")
            })
            .count();
        (bound + refused == burst).then_some(bound)
    })
    .await
    .expect("burst never settled");
    if settled != fit {
        let vms = api
            .list(&kube::api::ListParams::default().labels("burst=yes"))
            .await
            .unwrap()
            .items;
        let why: std::collections::BTreeSet<String> = vms
            .iter()
            .filter_map(|v| {
                conditions::find(
                    &v.status.as_ref()?.conditions,
                    vmlet::api::conditions::Type::Scheduled,
                )
                .map(|c| c.message.clone())
            })
            .collect();
        eprintln!("burst outcome: {why:#?}");
    }
    assert_eq!(
        settled, fit,
        "{burst} VMs of 64Mi on a node with room for {fit}"
    );
    let api_burst = api.clone();
    let _ = api_burst
        .delete_collection(
            &Default::default(),
            &kube::api::ListParams::default().labels("burst=yes"),
        )
        .await;

    // Nothing in the cluster has 3 TiB free: refused, with the reason counted.
    create(
        &api,
        "huge",
        json!({}),
        json!({"memory": "3Ti", "nodeSelector": {"vmlet.dev/test-run": ns}}),
    )
    .await;
    for (name, text) in [
        ("huge", "insufficient memory"),
        ("db-2", "anti-affinity conflict"),
    ] {
        let cond = common::wait_for(Duration::from_secs(30), || async {
            let vm = api.get(name).await.ok()?;
            let c = conditions::find(
                &vm.status?.conditions,
                vmlet::api::conditions::Type::Scheduled,
            )?
            .clone();
            (c.status == "False").then_some(c)
        })
        .await
        .unwrap_or_else(|| panic!("{name} not marked unschedulable"));
        assert_eq!(cond.reason, "Unschedulable");
        assert!(
            cond.message.starts_with("0/") && cond.message.contains(text),
            "{name}: {}",
            cond.message
        );
        let vm = api.get(name).await.unwrap();
        assert!(vm.status.unwrap().node_name.is_none());
    }

    // Leader failover: the leader dies without releasing its lease (as with kill -9);
    // the other replica takes over and binds new VMs.
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let holder = || async {
        leases
            .get_opt("vmlet-controller")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
    };
    let leader = common::wait_for(Duration::from_secs(10), || async { holder().await })
        .await
        .expect("a leader");
    let t0 = Instant::now();
    for (id, handle) in replicas.iter_mut() {
        if *id == leader {
            handle.take().unwrap().abort();
        }
    }
    let other = common::wait_for(Duration::from_secs(30), || async {
        holder().await.filter(|h| *h != leader)
    })
    .await
    .expect("no takeover");
    let takeover = t0.elapsed();
    println!(
        "leader {leader} killed; {other} took over in {:.1} s",
        takeover.as_secs_f64()
    );
    assert!(
        takeover < Duration::from_secs(15),
        "takeover took {takeover:?}"
    );
    create(
        &api,
        "after-failover",
        json!({}),
        json!({"memory": "64Mi", "nodeSelector": sel}),
    )
    .await;
    assert!(names.contains(&node_of(&api, "after-failover").await));

    let _ = api.delete("huge", &Default::default()).await;
    common::delete_vms_and_namespace(&client, &ns).await;
    for (_, h) in replicas.iter_mut() {
        if let Some(h) = h.take() {
            h.abort();
        }
    }
    for n in nodes {
        n.forget().await;
    }
}
