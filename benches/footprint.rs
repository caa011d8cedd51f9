//! Footprint: resident memory of the controller and of one agent, each its own process
//! (the release `vmlet` binary), against the real local control plane. The agent's node
//! is a libvirt test-driver node large enough for every VM; its domains live inside the
//! agent process (the test driver runs in the libvirt client library), so the agent's
//! per-VM figure includes libvirt's own record of each domain.
//!
//! Needs `hack/cluster.sh up`. VMLET_BENCH_CONTROLLER_VMS sets the controller's largest
//! VM count (default 10000).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use vmlet::api::VirtualMachine;

mod common;

/// glibc's malloc arenas, as the chart sets them for both processes (one arena per
/// thread by default keeps freed memory of every worker thread resident).
const ARENAS: &str = "2";
/// How long after the big burst the steady RSS is read: past two heap trims.
const STEADY: Duration = Duration::from_secs(25);

/// Resident set size of a process, in bytes.
fn rss(child: &Child) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn create_many(api: &Api<VirtualMachine>, from: usize, to: usize, selector: &str) {
    futures::stream::iter(from..to)
        .for_each_concurrent(32, |i| {
            let api = api.clone();
            async move {
                let vm = VirtualMachine::new(
                    &format!("vm-{i:05}"),
                    serde_json::from_value(json!({
                        "memory": "64Mi",
                        "cpu": {"cores": 1},
                        "nodeSelector": {"vmlet.dev/footprint": selector},
                    }))
                    .unwrap(),
                );
                // A create the client's connection pool resent (the first reached the
                // server) answers AlreadyExists: the VM is there either way.
                match api.create(&PostParams::default(), &vm).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(e) => panic!("create: {e}"),
                }
            }
        })
        .await;
}

/// Waits until `n` VMs satisfy `done` (15 minutes at most).
async fn wait_count(api: &Api<VirtualMachine>, n: usize, done: impl Fn(&VirtualMachine) -> bool) {
    let t = Instant::now();
    loop {
        // From the API server's watch cache: a quorum read of 10,000 VMs a second would
        // weigh on what is measured.
        let c = match api.list(&ListParams::default().match_any()).await {
            Ok(list) => list.items.iter().filter(|vm| done(vm)).count(),
            Err(_) => 0,
        };
        if c >= n {
            return;
        }
        if t.elapsed() > Duration::from_secs(900) {
            eprintln!("only {c}/{n} after 900 s");
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn running(vm: &VirtualMachine) -> bool {
    vm.status.as_ref().and_then(|s| s.phase) == Some(vmlet::api::vm::Phase::Running)
}

fn decided(vm: &VirtualMachine) -> bool {
    vm.status.as_ref().is_some_and(|s| {
        vmlet::api::conditions::find(&s.conditions, vmlet::api::conditions::Type::Scheduled)
            .is_some()
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let big = common::env_usize("VMLET_BENCH_CONTROLLER_VMS", 10_000);
    let kc = common::kubeconfig();
    let client = vmlet::kubeconfig::client(Some(&kc)).await?;
    common::install_crds(&client).await?;
    let run = format!("footprint{}", std::process::id());
    common::namespace(&client, &run).await?;
    let dir = tempfile::tempdir()?;
    let node = format!("{run}-node");
    // 1024 CPUs (4096 vCPUs allocatable) and 1 TiB: room for every VM.
    let xml = dir.path().join("node.xml");
    std::fs::write(
        &xml,
        "<node><cpu><mhz>2000</mhz><model>x86_64</model><nodes>1</nodes><sockets>1</sockets><cores>1024</cores><threads>1</threads><active>1024</active><total>1024</total></cpu><memory>1073741824</memory></node>",
    )?;
    let node_api: Api<Node> = Api::all(client.clone());
    let n = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node,
        "labels": {"vmlet.dev/hypervisor": "true", "vmlet.dev/footprint": run}}});
    node_api
        .patch(&node, &PatchParams::apply("vmlet-bench"), &Patch::Apply(&n))
        .await?;

    // Both quiet, on this kubeconfig, with the chart's allocator setting.
    let spawn = |args: Vec<std::ffi::OsString>| -> std::io::Result<Killed> {
        Command::new(env!("CARGO_BIN_EXE_vmlet"))
            .args(args)
            .arg("--kubeconfig")
            .arg(&kc)
            .env("RUST_LOG", "error")
            .env("MALLOC_ARENA_MAX", ARENAS)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(Killed)
    };
    let controller = spawn(
        [
            "controller",
            "--metrics-addr",
            "127.0.0.1:0",
            "--identity",
            "footprint",
        ]
        .into_iter()
        .chain(["--lease-namespace", &run])
        .map(Into::into)
        .collect(),
    )?;
    std::fs::create_dir_all(dir.path().join("images"))?;
    let agent = spawn(vec![
        "agent".into(),
        "--node".into(),
        node.clone().into(),
        "--accel".into(),
        "tcg".into(),
        "--metrics-addr".into(),
        "127.0.0.1:0".into(),
        "--libvirt-uri".into(),
        format!("test://{}", xml.display()).into(),
        "--state-dir".into(),
        dir.path().join("state").into(),
        "--image-root".into(),
        dir.path().join("images").into(),
    ])?;
    let hvs: Api<vmlet::api::Hypervisor> = Api::all(client.clone());
    let t = Instant::now();
    while !hvs
        .get_opt(&node)
        .await?
        .and_then(|h| h.status)
        .is_some_and(|s| {
            vmlet::api::conditions::is_true(&s.conditions, vmlet::api::conditions::Type::Ready)
        })
    {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(60),
            "agent never reported"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Let allocation settle: one heartbeat round, and the first lists done.
    tokio::time::sleep(Duration::from_secs(6)).await;

    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &run);
    let settle = Duration::from_secs(5);
    let mut agent_rows = vec![(0usize, rss(&agent.0))];
    let mut controller_rows = vec![(0usize, rss(&controller.0))];
    let mut made = 0;
    let mut steady = None;
    for target in [100usize, 1000] {
        create_many(&api, made, target, &run).await;
        made = target;
        wait_count(&api, target, running).await;
        tokio::time::sleep(settle).await;
        agent_rows.push((target, rss(&agent.0)));
        controller_rows.push((target, rss(&controller.0)));
    }
    // The rest fit nowhere (their selector matches no node): the controller holds them in
    // its cache and writes their Unschedulable condition; no agent sees them.
    if big > made {
        create_many(&api, made, big, "nowhere").await;
        wait_count(&api, big, decided).await;
        tokio::time::sleep(settle).await;
        controller_rows.push((big, rss(&controller.0)));
        // And once the burst's garbage has had time to go back: the process trims its
        // heap every vmlet::memory::TRIM_EVERY, so a sample 5 s after a burst may see
        // what the next trim returns. The steady figure is the one a Pod lives with.
        tokio::time::sleep(STEADY - settle).await;
        steady = Some(rss(&controller.0));
    }

    println!("## Footprint\n");
    println!(
        "The release `vmlet` binary as two processes (controller; one agent on a test-driver \
         node of 1024 CPUs and 1 TiB), both with MALLOC_ARENA_MAX={ARENAS} (as the chart runs \
         them), resident set size from /proc/PID/status after the VMs \
         reached their state and {} s more. Each VM: 1 vCPU, 64Mi; VMs beyond {made} have a \
         node selector no node matches, so they stay Pending in the controller's cache.\n",
        settle.as_secs()
    );
    println!("| VMs | controller RSS |\n|---|---|");
    for (n, b) in &controller_rows {
        println!("| {n} | {:.1} MiB |", mib(*b));
    }
    if let Some(b) = steady {
        println!(
            "\nSteady, {} s after the {big} VMs reached their state (two heap trims later): \
             controller RSS {:.1} MiB.\nsteady: {:.1}",
            STEADY.as_secs(),
            mib(b),
            mib(b)
        );
    }
    println!();
    println!(
        "| VMs on the node (Running) | agent RSS | per VM over the empty agent |\n|---|---|---|"
    );
    let base = agent_rows[0].1;
    for (n, b) in &agent_rows {
        let per = if *n == 0 {
            "-".to_string()
        } else {
            format!("{:.1} KiB", (*b as f64 - base as f64) / *n as f64 / 1024.0)
        };
        println!("| {n} | {:.1} MiB | {per} |", mib(*b));
    }
    println!();

    // Clean up while the agent runs, so finalizers complete: the namespace controller
    // deletes the VMs (one delete-collection of 10,000 would time out).
    let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let _ = ns.delete(&run, &DeleteParams::default()).await;
    let t = Instant::now();
    while ns.get_opt(&run).await.map_or(true, |n| n.is_some())
        && t.elapsed() < Duration::from_secs(600)
    {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    drop(agent);
    drop(controller);
    let _ = node_api.delete(&node, &DeleteParams::default()).await;
    let _ = hvs.delete(&node, &DeleteParams::default()).await;
    Ok(())
}
