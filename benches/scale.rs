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

mod common;

/// The chart's MutatingAdmissionPolicy, as the bench installs it for the vmlet burst.
const POLICY: &str = "vmlet-bench-domain-finalizer";

/// When a VM was first seen Scheduled, and Running.
type Seen = (Option<Instant>, Option<Instant>);

/// Latencies (sorted) and instants (seconds after the run's start) of one run's VMs.
struct Lat {
    scheduled: Vec<f64>,
    running: Vec<f64>,
    created_at: Vec<f64>,
    running_at: Vec<f64>,
}

impl Lat {
    fn collect(
        applied: &Mutex<HashMap<String, Instant>>,
        seen: &Mutex<HashMap<String, Seen>>,
        prefix: &str,
        t0: Instant,
    ) -> Lat {
        let applied = applied.lock().unwrap();
        let seen = seen.lock().unwrap();
        let mut l = Lat {
            scheduled: vec![],
            running: vec![],
            created_at: vec![],
            running_at: vec![],
        };
        for (name, a) in applied.iter().filter(|(n, _)| n.starts_with(prefix)) {
            l.created_at.push(a.duration_since(t0).as_secs_f64());
            let Some((s, r)) = seen.get(name) else {
                continue;
            };
            if let Some(s) = s {
                l.scheduled.push(s.duration_since(*a).as_secs_f64());
            }
            if let Some(r) = r {
                l.running.push(r.duration_since(*a).as_secs_f64());
                l.running_at.push(r.duration_since(t0).as_secs_f64());
            }
        }
        l.scheduled.sort_by(f64::total_cmp);
        l.running.sort_by(f64::total_cmp);
        l
    }
}

async fn create(
    api: &Api<VirtualMachine>,
    applied: &Mutex<HashMap<String, Instant>>,
    name: String,
) {
    let vm = VirtualMachine::new(
        &name,
        serde_json::from_value(json!({"memory": "512Mi", "cpu": {"cores": 1}})).unwrap(),
    );
    applied.lock().unwrap().insert(name, Instant::now());
    api.create(&PostParams::default(), &vm)
        .await
        .expect("create");
}

/// Waits until `n` VMs named `prefix*` are Running (10 minutes at most); the time since t0.
async fn wait_running(
    seen: &Mutex<HashMap<String, Seen>>,
    prefix: &str,
    n: usize,
    t0: Instant,
) -> Duration {
    loop {
        let running = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, (_, r))| k.starts_with(prefix) && r.is_some())
            .count();
        if running >= n {
            return t0.elapsed();
        }
        if t0.elapsed() > Duration::from_secs(600) {
            eprintln!("only {running}/{n} {prefix}* Running after 600 s");
            return t0.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The three writes one VM needs (create, bind, status) by a bare client, for `n` VMs
/// with 32 in flight: each VM's latency (sorted) and VMs per second.
async fn floor_burst(api: &Api<VirtualMachine>, n: usize) -> anyhow::Result<(Vec<f64>, f64)> {
    let lat = Arc::new(Mutex::new(Vec::new()));
    let t0 = Instant::now();
    futures::stream::iter(0..n)
        .for_each_concurrent(32, |i| {
            let (api, lat) = (api.clone(), lat.clone());
            async move {
                let name = format!("floorb-{i:05}");
                let t = Instant::now();
                let vm = VirtualMachine::new(
                    &name,
                    serde_json::from_value(json!({"memory": "512Mi"})).unwrap(),
                );
                api.create(&PostParams::default(), &vm).await.expect("create");
                for (manager, status) in [
                    ("floor-scheduler", json!({"nodeName": "nowhere"})),
                    ("floor-agent", json!({"phase": "Running"})),
                ] {
                    let p = json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachine", "status": status});
                    api.patch_status(&name, &PatchParams::apply(manager), &Patch::Apply(&p))
                        .await
                        .expect("status");
                }
                lat.lock().unwrap().push(t.elapsed().as_secs_f64());
            }
        })
        .await;
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    let mut lat = std::mem::take(&mut *lat.lock().unwrap());
    lat.sort_by(f64::total_cmp);
    Ok((lat, rate))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let nodes = common::env_usize("VMLET_BENCH_NODES", 100);
    let vms = common::env_usize("VMLET_BENCH_VMS", 1000);
    let rate = common::env_usize("VMLET_BENCH_RATE", 50);
    let kc = common::kubeconfig();
    let client = vmlet::kubeconfig::client(Some(&kc)).await?;
    common::install_crds(&client).await?;
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
        let lv = std::sync::Arc::new(vmlet::agent::libvirt::Connection::open(&uri).await?);
        let args = vmlet::agent::Args {
            node: name.clone(),
            libvirt_uri: uri,
            state_dir: nd.join("state"),
            image_root: nd.join("images"),
            accel: vmlet::agent::accel::AccelChoice::Tcg,
            reserved_memory: "0".into(),
            vm_overhead: "auto".into(),
            metrics_addr: "127.0.0.1:0".into(),
            advertise_address: None,
            migration_uri: None,
            migration_tls: true,
            orphan_grace_seconds: 30,
            lease_duration_seconds: 15,
            heartbeat_seconds: 5,
            fence_after_seconds: 60,
            kubeconfig: Some(kc.clone()),
            peer_key_file: None,
            downloads: vmlet::agent::download::DownloadPolicy::allowing_loopback(),
            storage_pools: vec![],
            stream_tls_dir: None,
            stream_addr: "127.0.0.1:0".into(),
        };
        agents.push(tokio::spawn(vmlet::agent::run_with(
            args,
            lv,
            std::future::pending(),
        )));
    }
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
                h.status.as_ref().is_some_and(|s| {
                    vmlet::api::conditions::is_true(
                        &s.conditions,
                        vmlet::api::conditions::Type::Ready,
                    )
                })
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
    // The floor, measured once the agents have settled (the same background as the
    // burst), before the controller runs: the API writes one VM needs (create, bind,
    // status), sequentially, by a bare client.
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
    let cpu0 = common::apiserver_cpu(&client).await?;
    let floor_burst = floor_burst(&floor_api, vms).await?;
    let floor_cpu = common::apiserver_cpu(&client).await? - cpu0;
    floor_api
        .delete_collection(&DeleteParams::default(), &Default::default())
        .await?;
    while !floor_api.list(&Default::default()).await?.items.is_empty() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // What the chart installs: new VMs carry the agent's finalizer from their creation.
    vmlet::api::admission::apply_domain_finalizer_policy(&client, POLICY, None, true).await?;
    let controller_args = vmlet::controller::Args {
        metrics_addr: "127.0.0.1:0".into(),
        lease_namespace: run.clone(),
        identity: Some("bench".into()),
        kubeconfig: Some(kc.clone()),
        ..Default::default()
    };
    let controller = tokio::spawn(vmlet::controller::run_until(
        controller_args,
        std::future::pending(),
    ));
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
    let applied: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();

    // The burst: every create issued at once (32 in flight).
    let before = common::request_counts(&client).await?;
    let cpu0 = common::apiserver_cpu(&client).await?;
    let t0 = Instant::now();
    futures::stream::iter(0..vms)
        .for_each_concurrent(32, |i| create(&api, &applied, format!("burst-{i:05}")))
        .await;
    let created = t0.elapsed();
    let total = wait_running(&seen, "burst-", vms, t0).await;
    let requests = common::delta(&before, &common::request_counts(&client).await?);
    let burst_cpu = common::apiserver_cpu(&client).await? - cpu0;
    let burst = Lat::collect(&applied, &seen, "burst-", t0);

    // The steady run: creates at a fixed rate, each at its slot whatever the others do.
    let steady_n = vms;
    let t1 = Instant::now();
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    futures::stream::iter(0..steady_n)
        .for_each_concurrent(None, |i| {
            let (api, applied) = (&api, &applied);
            async move {
                tokio::time::sleep_until((t1 + period * i as u32).into()).await;
                create(api, applied, format!("steady-{i:05}")).await
            }
        })
        .await;
    let steady_total = wait_running(&seen, "steady-", steady_n, t1).await;
    let steady = Lat::collect(&applied, &seen, "steady-", t1);
    watch.abort();

    println!(
        "## Scale: {nodes} simulated hypervisors, {vms} VMs in a burst, {steady_n} at {rate} VMs/s\n"
    );
    println!(
        "Agents and controller are tasks in one process (test-driver nodes of 16 CPUs and 64 GiB, \
         so 64 vCPUs allocatable each); each VM asks 1 vCPU and 512Mi. Times come from a watch \
         on the namespace, in the same process.\n"
    );
    println!("### Burst\n");
    println!(
        "All {vms} creates issued at once, 32 in flight; all created after {:.1} s.\n",
        created.as_secs_f64()
    );
    println!("| measure | p50 | p95 | p99 |\n|---|---|---|---|");
    println!("{}", common::row("apply -> Scheduled", &burst.scheduled));
    println!("{}", common::row("apply -> Running", &burst.running));
    println!(
        "{}",
        common::row(
            "floor, sequential: create + bind + status by a bare client",
            &floor
        )
    );
    println!(
        "{}",
        common::row(
            "floor, burst: the same three writes for each of {vms} VMs, 32 in flight",
            &floor_burst.0
        )
        .replace("{vms}", &vms.to_string())
    );
    println!();
    println!(
        "Throughput: {} VMs Running {:.1} s after the first create = {:.1} VMs/s (the bare \
         client's burst floor: {:.1} VMs/s). apply -> Running p50 is {:.1}x the sequential \
         floor and {:.2}x the burst floor.\n",
        burst.running.len(),
        total.as_secs_f64(),
        burst.running.len() as f64 / total.as_secs_f64(),
        floor_burst.1,
        common::percentile(&burst.running, 0.5) / common::percentile(&floor, 0.5),
        common::percentile(&burst.running, 0.5) / common::percentile(&floor_burst.0, 0.5),
    );
    let per_vm = |k: &str| requests.get(k).copied().unwrap_or(0.0) / vms as f64;
    let all: f64 = requests.values().sum();
    // The VMs' own requests: what the success path costs per VM, node heartbeats apart.
    let vm_requests: f64 = requests
        .iter()
        .filter(|(k, _)| {
            k.starts_with("virtualmachines ")
                || k.starts_with("virtualmachines/")
                || k.starts_with("pods ")
                || k.as_str() == "events POST"
                || k.as_str() == "events PATCH"
        })
        .map(|(_, v)| v)
        .sum::<f64>()
        / vms as f64;
    println!(
        "API requests during the burst (apiserver_request_total, watches excluded), per VM: \
         {vm_requests:.2} for the VMs themselves: creates {:.2} (the user's), VM patches \
         {:.2} (the agent's finalizer, when admission did not add it), status writes {:.2} \
         (the controller's binding, the agent's status), GETs {:.2} (the agent's fresh read \
         before a first start), VM Pod creates {:.2} (the controller's), Event writes {:.2}. \
         {:.2} in all, counting the heartbeats and Hypervisor reports of {nodes} nodes over \
         {:.0} s.\n",
        per_vm("virtualmachines POST"),
        per_vm("virtualmachines PATCH"),
        per_vm("virtualmachines/status PATCH") + per_vm("virtualmachines/status APPLY"),
        per_vm("virtualmachines GET"),
        per_vm("pods POST"),
        per_vm("events POST") + per_vm("events PATCH"),
        all / vms as f64,
        total.as_secs_f64(),
    );
    println!(
        "API server CPU per VM: {:.1} ms in the burst (everything vmlet and its heartbeats cost \
         it), {:.1} ms for the bare client's three writes.\n",
        burst_cpu * 1000.0 / vms as f64,
        floor_cpu * 1000.0 / vms as f64,
    );
    println!("| request | count |\n|---|---|");
    for (k, v) in &requests {
        println!("| {k} | {v:.0} |");
    }
    println!();
    println!("### Steady rate\n");
    println!(
        "{steady_n} creates at {rate} VMs/s (one every {:.0} ms, on schedule whatever the \
         earlier ones do), {vms} burst VMs still running.\n",
        period.as_secs_f64() * 1000.0
    );
    println!("| measure | p50 | p95 | p99 |\n|---|---|---|---|");
    println!("{}", common::row("apply -> Scheduled", &steady.scheduled));
    println!("{}", common::row("apply -> Running", &steady.running));
    println!();
    println!(
        "Sustained: {} VMs Running {:.1} s after the first create = {:.1} VMs/s (offered {rate}).\n",
        steady.running.len(),
        steady_total.as_secs_f64(),
        steady.running.len() as f64 / steady_total.as_secs_f64(),
    );
    let plots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/bench");
    common::plot(
        &plots.join("burst-latency-cdf.png"),
        &format!("Burst of {vms} VMs on {nodes} hypervisors: latency CDF"),
        "seconds after apply",
        "fraction of VMs",
        &[
            ("apply -> Scheduled", common::cdf(&burst.scheduled)),
            ("apply -> Running", common::cdf(&burst.running)),
            ("floor (bare client, burst)", common::cdf(&floor_burst.0)),
        ],
    )?;
    common::plot(
        &plots.join("steady-throughput.png"),
        &format!("{steady_n} VMs offered at {rate} VMs/s: throughput"),
        "seconds since the first create",
        "VMs per second (1 s bins)",
        &[
            ("created", common::rate(&steady.created_at, 1.0)),
            ("Running", common::rate(&steady.running_at, 1.0)),
        ],
    )?;
    println!("![burst latency CDF](bench/burst-latency-cdf.png)\n");
    println!("![steady throughput](bench/steady-throughput.png)\n");
    let p = |v: &[f64], q: f64| common::percentile(v, q);
    println!(
        "burst: p50 ratio {:.2}, p99 ratio {:.2}, throughput ratio {:.2}, requests per VM {:.2}",
        p(&burst.running, 0.5) / p(&floor_burst.0, 0.5),
        p(&burst.running, 0.99) / p(&floor_burst.0, 0.99),
        burst.running.len() as f64 / total.as_secs_f64() / floor_burst.1,
        vm_requests,
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
    vmlet::api::admission::apply_domain_finalizer_policy(&client, POLICY, None, false).await?;
    controller.abort();
    for a in agents {
        a.abort();
    }
    Ok(())
}
