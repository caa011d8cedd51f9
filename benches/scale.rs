//! Scale: simulated hypervisors (agents on libvirt's test driver, as tasks in this one
//! process, each with a node file of its own: 16 CPUs, 64 GiB) and a controller, against
//! the real local control plane. A burst of VMs is created at once; each VM's apply ->
//! Scheduled and apply -> Running is timed from a watch. The floor is the same API writes
//! one VM needs (create, bind, status) done sequentially by a bare client.
//!
//! Needs `hack/cluster.sh up`; reads KUBECONFIG (default .cache/cluster/kubeconfig).
//! VMLET_BENCH_NODES and VMLET_BENCH_VMS set the size (default 100 and 1000).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use vmlet::api::VirtualMachine;

/// When a VM was first seen Scheduled, and Running.
type Seen = (Option<Instant>, Option<Instant>);

fn kubeconfig() -> PathBuf {
    std::env::var_os("KUBECONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/cluster/kubeconfig")
        })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let nodes = env_usize("VMLET_BENCH_NODES", 100);
    let vms = env_usize("VMLET_BENCH_VMS", 1000);
    let kc = kubeconfig();
    let client = vmlet::kubeconfig::client(Some(&kc)).await?;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    for (_, crd) in vmlet::api::crds() {
        crds.patch(
            &crd.metadata.name.clone().unwrap(),
            &PatchParams::apply("vmlet-bench").force(),
            &Patch::Apply(&crd),
        )
        .await?;
    }
    let run = format!("bench{}", std::process::id());
    let ns_api: Api<Namespace> = Api::all(client.clone());
    ns_api
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": run}}))?,
        )
        .await?;
    let dir = tempfile::tempdir()?;

    // Hypervisors.
    let node_api: Api<Node> = Api::all(client.clone());
    let mut agents = Vec::new();
    for i in 0..nodes {
        let name = format!("{run}-n{i:03}");
        let nd = dir.path().join(&name);
        std::fs::create_dir_all(nd.join("images"))?;
        let xml = nd.join("node.xml");
        std::fs::write(
            &xml,
            "<node><cpu><mhz>2000</mhz><model>x86_64</model><nodes>1</nodes><sockets>1</sockets><cores>16</cores><threads>1</threads><active>16</active><total>16</total></cpu><memory>67108864</memory></node>",
        )?;
        let n = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"vmlet.dev/hypervisor": "true", "vmlet.dev/bench": run}}});
        node_api
            .patch(&name, &PatchParams::apply("vmlet-bench"), &Patch::Apply(&n))
            .await?;
        let uri = format!("test://{}", xml.display());
        let lv = vmlet::agent::libvirt::Libvirt::open(&uri).await?;
        let args = vmlet::agent::Args {
            node: name.clone(),
            libvirt_uri: uri,
            state_dir: nd.join("state"),
            image_root: nd.join("images"),
            accel: vmlet::agent::accel::AccelChoice::Tcg,
            reserved_memory: "0".into(),
            metrics_addr: "127.0.0.1:0".into(),
            advertise_address: None,
            orphan_grace_seconds: 30,
            lease_duration_seconds: 15,
            heartbeat_seconds: 5,
            fence_after_seconds: 60,
            kubeconfig: Some(kc.clone()),
        };
        agents.push(tokio::spawn(vmlet::agent::run_with(
            args,
            lv,
            std::future::pending(),
        )));
    }
    // The floor, measured before any vmlet component runs: the API writes one VM needs
    // (create, bind, status), sequentially, by a bare client.
    let mut floor = Vec::new();
    for i in 0..20 {
        let name = format!("floor-{i}");
        let t = Instant::now();
        let vm = VirtualMachine::new(&name, serde_json::from_value(json!({"memory": "512Mi"}))?);
        let floor_api: Api<VirtualMachine> = Api::namespaced(client.clone(), &run);
        floor_api.create(&PostParams::default(), &vm).await?;
        let bind = json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachine", "status": {"nodeName": "nowhere"}});
        floor_api
            .patch_status(
                &name,
                &PatchParams::apply("floor-scheduler"),
                &Patch::Apply(&bind),
            )
            .await?;
        let st = json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachine", "status": {"phase": "Running"}});
        floor_api
            .patch_status(
                &name,
                &PatchParams::apply("floor-agent"),
                &Patch::Apply(&st),
            )
            .await?;
        floor.push(t.elapsed().as_secs_f64());
    }
    floor.sort_by(f64::total_cmp);
    let floor_api: Api<VirtualMachine> = Api::namespaced(client.clone(), &run);
    floor_api
        .delete_collection(&DeleteParams::default(), &Default::default())
        .await?;

    let controller_args = vmlet::controller::Args {
        strategy: vmlet::controller::scheduler::Strategy::Spread,
        cpu_weight: 1.0,
        memory_weight: 1.0,
        metrics_addr: "127.0.0.1:0".into(),
        lease_namespace: run.clone(),
        identity: Some("bench".into()),
        lease_duration_seconds: 10,
        heartbeat_grace_seconds: 5,
        fence_after_seconds: 60,
        loss_margin_seconds: 10,
        kubeconfig: Some(kc.clone()),
    };
    let controller = tokio::spawn(vmlet::controller::run_until(
        controller_args,
        std::future::pending(),
    ));
    // Wait until every hypervisor has reported.
    let hvs: Api<vmlet::api::Hypervisor> = Api::all(client.clone());
    let t = Instant::now();
    loop {
        let ready = hvs
            .list(&Default::default())
            .await?
            .items
            .iter()
            .filter(|h| {
                h.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with(&run))
            })
            .filter(|h| {
                h.status
                    .as_ref()
                    .is_some_and(|s| vmlet::api::conditions::is_true(&s.conditions, "Ready"))
            })
            .count();
        if ready == nodes {
            break;
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(120),
            "only {ready}/{nodes} hypervisors ready"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Leases are renewed every 5 s; give the controller's cache one round.
    tokio::time::sleep(Duration::from_secs(6)).await;

    // Timestamps from a watch on the namespace.
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &run);
    let seen: Arc<Mutex<HashMap<String, Seen>>> = Arc::default();
    let watch = {
        let (api, seen) = (api.clone(), seen.clone());
        tokio::spawn(async move {
            let mut stream = watcher(api, watcher::Config::default())
                .applied_objects()
                .boxed();
            while let Ok(Some(vm)) = stream.try_next().await {
                let now = Instant::now();
                let name = vm.metadata.name.clone().unwrap_or_default();
                let st = vm.status.unwrap_or_default();
                let mut seen = seen.lock().unwrap();
                let e = seen.entry(name).or_default();
                if st.node_name.is_some() && e.0.is_none() {
                    e.0 = Some(now);
                }
                if st.phase == Some(vmlet::api::vm::Phase::Running) && e.1.is_none() {
                    e.1 = Some(now);
                }
            }
        })
    };

    // The burst: every create issued at once (32 in flight).
    let applied: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let t0 = Instant::now();
    futures::stream::iter(0..vms)
        .for_each_concurrent(32, |i| {
            let (api, applied) = (api.clone(), applied.clone());
            async move {
                let name = format!("vm-{i:05}");
                let vm = VirtualMachine::new(
                    &name,
                    serde_json::from_value(json!({"memory": "512Mi", "cpu": {"cores": 1}}))
                        .unwrap(),
                );
                applied.lock().unwrap().insert(name, Instant::now());
                api.create(&PostParams::default(), &vm)
                    .await
                    .expect("create");
            }
        })
        .await;
    let created = t0.elapsed();
    loop {
        let running = seen
            .lock()
            .unwrap()
            .values()
            .filter(|(_, r)| r.is_some())
            .count();
        if running == vms {
            break;
        }
        if t0.elapsed() > Duration::from_secs(600) {
            eprintln!("only {running}/{vms} Running after 600 s");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total = t0.elapsed();
    watch.abort();

    let (mut sched, mut run_lat) = (Vec::new(), Vec::new());
    {
        let applied = applied.lock().unwrap();
        for (name, (s, r)) in seen.lock().unwrap().iter() {
            let Some(a) = applied.get(name) else { continue };
            if let Some(s) = s {
                sched.push(s.duration_since(*a).as_secs_f64());
            }
            if let Some(r) = r {
                run_lat.push(r.duration_since(*a).as_secs_f64());
            }
        }
    }
    sched.sort_by(f64::total_cmp);
    run_lat.sort_by(f64::total_cmp);

    println!("## Scale: {nodes} simulated hypervisors, a burst of {vms} VMs\n");
    println!(
        "Agents and controller are tasks in one process (test-driver nodes of 16 CPUs and 64 GiB); each VM asks 1 vCPU and 512Mi. Creates issued 32 at a time; all {vms} created in {:.1} s.\n",
        created.as_secs_f64()
    );
    println!("| measure | p50 | p95 | p99 |\n|---|---|---|---|");
    if !sched.is_empty() {
        println!(
            "| apply -> Scheduled | {:.2} s | {:.2} s | {:.2} s |",
            percentile(&sched, 0.5),
            percentile(&sched, 0.95),
            percentile(&sched, 0.99)
        );
    }
    if !run_lat.is_empty() {
        println!(
            "| apply -> Running | {:.2} s | {:.2} s | {:.2} s |",
            percentile(&run_lat, 0.5),
            percentile(&run_lat, 0.95),
            percentile(&run_lat, 0.99)
        );
    }
    println!(
        "| floor: create + bind + status, sequential, bare client | {:.3} s | {:.3} s | {:.3} s |",
        percentile(&floor, 0.5),
        percentile(&floor, 0.95),
        percentile(&floor, 0.99)
    );
    println!();
    println!(
        "Throughput: {} VMs Running in {:.1} s = {:.1} VMs/s. apply -> Running p50 is {:.1}x the floor's p50.\n",
        run_lat.len(),
        total.as_secs_f64(),
        run_lat.len() as f64 / total.as_secs_f64(),
        if run_lat.is_empty() {
            0.0
        } else {
            percentile(&run_lat, 0.5) / percentile(&floor, 0.5)
        }
    );

    // Clean up: the agents still run, so finalizers complete.
    let _ = api
        .delete_collection(&DeleteParams::default(), &Default::default())
        .await;
    let t = Instant::now();
    while !api.list(&Default::default()).await?.items.is_empty()
        && t.elapsed() < Duration::from_secs(300)
    {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let _ = ns_api.delete(&run, &DeleteParams::default()).await;
    for i in 0..nodes {
        let name = format!("{run}-n{i:03}");
        let _ = node_api.delete(&name, &DeleteParams::default()).await;
        let _ = hvs.delete(&name, &DeleteParams::default()).await;
    }
    controller.abort();
    for a in agents {
        a.abort();
    }
    Ok(())
}
