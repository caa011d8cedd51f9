//! The product as its users run it: the chart installed by Helm on the real kubelet node
//! of hack/node.sh, its own Pods (controller Deployment, agent DaemonSet) running the image
//! `make image` built and imported, QEMU as libvirt's unprivileged user. A VM applied
//! after the install boots the tiny guest; the console works against the installed chart;
//! `helm upgrade` to another image tag rolls the agent and leaves the guest's QEMU alone;
//! after the VM is deleted, `helm uninstall` and the README's clean-up leave nothing.
//!
//! Needs what `make test` starts: the control plane (with kube-scheduler), libvirtd, the
//! node (hack/node.sh up) and the image (make image). One test: it owns the cluster's
//! scheduling while it runs (test binaries run one after another).

mod common;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use vmlet::api::image::ImagePhase;
use vmlet::api::{Hypervisor, VirtualMachine, vm::Phase};

const NODE: &str = "vmlet-node";
const NS: &str = "vmlet-system";
const RELEASE: &str = "vmlet";
const SOCK: &str = "/run/vmlet-node/containerd.sock";
/// The chart's default state directory on the node.
const STATE: &str = "/var/lib/vmlet";

fn ctr(args: &[&str]) -> std::process::Output {
    std::process::Command::new("ctr")
        .args(["--address", SOCK, "-n", "k8s.io"])
        .args(args)
        .output()
        .expect("ctr (hack/deps.sh installs containerd)")
}

fn helm(args: &[&str]) -> String {
    common::cli_ok(common::cli("helm", args, None), &format!("helm {args:?}"))
}

fn kubectl(args: &[&str]) -> std::process::Output {
    common::cli("kubectl", args, None)
}

/// Undoes what the test set up on the shared cluster, also when it fails half-way: the
/// release, its namespace, the hypervisor label, what the agent left for its node.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = common::cli(
            "helm",
            &["uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "60s"],
            None,
        );
        let _ = kubectl(&[
            "delete",
            "namespace",
            NS,
            "--ignore-not-found",
            "--wait=false",
        ]);
        let _ = kubectl(&["label", "node", NODE, "vmlet.dev/hypervisor-"]);
        let _ = forget_node_records();
    }
}

/// The README's step after `helm uninstall`: what the agents kept for their nodes (the
/// Hypervisor and the heartbeat Lease) goes; Ok when both deletions worked.
fn forget_node_records() -> Result<(), String> {
    for args in [
        &["delete", "hypervisor", NODE, "--ignore-not-found"][..],
        &[
            "delete",
            "lease",
            "-n",
            "kube-node-lease",
            "-l",
            vmlet::api::HEARTBEAT_LABEL,
        ],
    ] {
        let out = kubectl(args);
        if !out.status.success() {
            return Err(format!(
                "kubectl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(())
}

fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// QEMU's pid for the domain of the VM with `uid`.
fn qemu_pid(uid: &str) -> Option<u32> {
    let name = common::virsh(&["domname", uid]);
    let name = String::from_utf8_lossy(&name.stdout).trim().to_string();
    if name.is_empty() {
        return None;
    }
    common::qemu_pid(&name)
}

/// Resident memory of the processes whose command line is exactly `cmdline` (the Pods'
/// processes, seen from the host), in MiB.
fn rss_mib(args0: &str, args1: &str) -> Vec<f64> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let parts: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        if parts.len() > 1 && parts[0] == args0.as_bytes() && parts[1] == args1.as_bytes() {
            let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
            if let Some(kb) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            {
                out.push(kb / 1024.0);
            }
        }
    }
    out
}

/// Resident and private memory (MiB) of the processes that run `program` alone: what
/// each costs the node, shared library pages aside.
fn memory_of(program: &str) -> Vec<(f64, f64)> {
    let kb = |text: &str, key: &str| -> f64 {
        text.lines()
            .filter_map(|l| l.strip_prefix(key))
            .filter_map(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .sum()
    };
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if cmd.strip_suffix(&[0]) != Some(program.as_bytes()) {
            continue;
        }
        let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
        let smaps = std::fs::read_to_string(e.path().join("smaps_rollup")).unwrap_or_default();
        let private = kb(&smaps, "Private_Clean:") + kb(&smaps, "Private_Dirty:");
        out.push((kb(&status, "VmRSS:") / 1024.0, private / 1024.0));
    }
    out
}

async fn agent_pod(pods: &Api<Pod>) -> Option<Pod> {
    let list = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=agent"))
        .await
        .ok()?;
    list.items.into_iter().find(|p| {
        p.metadata.deletion_timestamp.is_none()
            && p.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .flatten()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_pods_on_a_real_node_boot_a_vm_upgrade_and_uninstall_cleanly() {
    let client = common::client().await;
    let node: Node = Api::all(client.clone())
        .get(NODE)
        .await
        .expect("the real node: run hack/node.sh up (make test does)");
    assert!(
        node.status
            .iter()
            .flat_map(|s| s.conditions.iter().flatten())
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        "node {NODE} not Ready"
    );
    let images = String::from_utf8(ctr(&["images", "ls", "-q"]).stdout).unwrap();
    assert!(
        images.lines().any(|l| l == "docker.io/library/vmlet:dev"),
        "vmlet:dev is not in the node's containerd: run make image\n{images}"
    );
    // The upgrade's "other tag": the same image under a second name, so that the rollout
    // is the chart's doing, not a new build's.
    let tagged = ctr(&[
        "images",
        "tag",
        "--force",
        "docker.io/library/vmlet:dev",
        "docker.io/library/vmlet:dev-next",
    ]);
    assert!(tagged.status.success(), "{tagged:?}");

    let _cleanup = Cleanup;
    common::ensure_crds(&client).await;
    // The install's one step per node: mark it a hypervisor.
    common::cli_ok(
        kubectl(&[
            "label",
            "node",
            NODE,
            "vmlet.dev/hypervisor=true",
            "--overwrite",
        ]),
        "label node",
    );

    // The install command of the README (plus: the tiny guest's images are served on
    // this machine's loopback, which downloads may not reach by default).
    let t = Instant::now();
    helm(&[
        "install",
        RELEASE,
        &format!("{}/charts/vmlet", env!("CARGO_MANIFEST_DIR")),
        "-n",
        NS,
        "--create-namespace",
        "--set",
        "image.repository=vmlet",
        "--set",
        "image.tag=dev",
        "--set",
        "image.pullPolicy=Never",
        "--set",
        "agent.images.sourceAllow={127.0.0.0/8}",
        "--wait",
        "--timeout",
        "5m",
    ]);
    let installed = t.elapsed();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let dep = deployments.get("vmlet-controller").await.unwrap();
    assert_eq!(dep.status.as_ref().unwrap().ready_replicas, Some(2));
    let ds = daemonsets.get("vmlet-agent").await.unwrap();
    assert_eq!(ds.status.as_ref().unwrap().number_ready, 1);
    println!(
        "helm install --wait: {:.1} s to 2 controller Pods and 1 agent Pod Ready",
        installed.as_secs_f64()
    );
    // The chart's own check, as a user runs it: a Pod that waits for a Ready hypervisor.
    let t = Instant::now();
    let out = helm(&["test", RELEASE, "-n", NS, "--timeout", "3m"]);
    assert!(out.contains("Succeeded"), "helm test: {out}");
    println!("helm test: {:.1} s", t.elapsed().as_secs_f64());

    // One controller Pod leads.
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let holder = common::wait_for(Duration::from_secs(30), || async {
        leases
            .get("vmlet-controller")
            .await
            .ok()?
            .spec?
            .holder_identity
    })
    .await
    .expect("no controller took the leader Lease");
    let controllers = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=controller"))
        .await
        .unwrap();
    assert!(
        controllers
            .items
            .iter()
            .any(|p| p.metadata.name.as_deref() == Some(holder.as_str())),
        "leader {holder} is not a controller Pod"
    );

    // The agent reports its node: reachable at the Node's address, acceleration and UEFI
    // read through libvirt.
    let hvs: Api<Hypervisor> = Api::all(client.clone());
    let hv = common::wait_for(Duration::from_secs(60), || async {
        let hv = hvs.get(NODE).await.ok()?;
        let ready = hv
            .status
            .as_ref()?
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        ready.then_some(hv)
    })
    .await
    .expect("the agent's Hypervisor never became Ready");
    let st = hv.status.clone().unwrap();
    println!(
        "Hypervisor {NODE}: accel {:?} ({:?}), uefi {:?}, agentURL {:?}",
        st.accel, st.accel_reason, st.uefi, st.agent_url
    );
    assert_eq!(st.agent_url.as_deref(), Some("http://10.78.0.1:9464"));
    assert!(st.accel_reason.as_deref().is_some_and(|r| !r.is_empty()));

    let ns = common::namespace(&client, "chart-vm").await;
    other_pods_reach_the_agent(&client, &ns, st.agent_url.as_deref().unwrap()).await;
    common::tiny_guest_images(&client, &ns).await;
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);

    // firmware: uefi goes only where libvirt offers UEFI.
    let uefi_spec = json!({
        "runStrategy": "Always", "memory": "128Mi", "firmware": "uefi",
        "boot": {"kernel": {"name": "tiny-kernel"}, "initrd": {"name": "tiny-initrd"}},
    });
    vms.create(
        &PostParams::default(),
        &VirtualMachine::new("uefi", serde_json::from_value(uefi_spec).unwrap()),
    )
    .await
    .unwrap();
    if st.uefi != Some(true) {
        let why = common::wait_for(Duration::from_secs(30), || async {
            let vm = vms.get("uefi").await.ok()?;
            let c = vm
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Scheduled" && c.status == "False")?;
            c.message.contains("no UEFI firmware").then_some(c.message)
        })
        .await
        .expect("a UEFI VM was not refused on a node without UEFI");
        println!("uefi VM refused: {why}");
    }
    vms.delete("uefi", &DeleteParams::default()).await.unwrap();

    let spec = json!({
        "runStrategy": "Always",
        "memory": "128Mi",
        "boot": {"kernel": {"name": "tiny-kernel"}, "initrd": {"name": "tiny-initrd"},
                 "cmdline": "console=ttyS0 panic=-1 vmlet.shell=1"},
        "disks": [{"name": "data", "blank": {"size": "64Mi"}}],
    });
    let t0 = Instant::now();
    let vm = vms
        .create(
            &PostParams::default(),
            &VirtualMachine::new("tiny", serde_json::from_value(spec).unwrap()),
        )
        .await
        .unwrap();
    let uid = vm.metadata.uid.clone().unwrap();
    let console_log = std::path::PathBuf::from(STATE)
        .join("vms")
        .join(&uid)
        .join("console.log");
    let running = common::wait_for(Duration::from_secs(180), || async {
        let vm = vms.get("tiny").await.ok()?;
        (vm.status?.phase? == Phase::Running).then(|| t0.elapsed())
    })
    .await;
    let Some(running) = running else {
        panic!(
            "not Running: {:?}",
            vms.get("tiny").await.ok().and_then(|v| v.status)
        );
    };
    let up = common::wait_for(Duration::from_secs(90), || async {
        std::fs::read_to_string(&console_log)
            .ok()?
            .contains("vmlet-guest-up")
            .then(|| t0.elapsed())
    })
    .await
    .expect("the guest never reached userspace");
    println!(
        "VM under the chart: apply->Running {:.2} s, apply->guest userspace {:.2} s",
        running.as_secs_f64(),
        up.as_secs_f64()
    );
    let vm = vms.get("tiny").await.unwrap();
    assert_eq!(vm.status.as_ref().unwrap().node_name.as_deref(), Some(NODE));
    vm_pod_counts_on_the_node(&client, &ns, &uid).await;

    // The images say where they are ready: the agent writes its node's entry, the
    // controller sums the entries up.
    let images: Api<vmlet::api::VirtualMachineImage> = Api::namespaced(client.clone(), &ns);
    let img = common::wait_for(Duration::from_secs(30), || async {
        let img = images.get("tiny-kernel").await.ok()?;
        let st = img.status.clone()?;
        (st.phase == Some(ImagePhase::Ready)).then_some(st)
    })
    .await
    .expect("tiny-kernel never became Ready in its status");
    let entry = img
        .nodes
        .iter()
        .find(|n| n.node == NODE)
        .expect("no entry for the node");
    assert_eq!(entry.phase, ImagePhase::Ready);
    assert!(entry.size.is_some_and(|s| s > 1_000_000), "{entry:?}");

    // The console, through the chart's APIService, its API container and the installed
    // agent, with a ServiceAccount's token.
    console_reads_the_guest(&ns);

    // helm upgrade to another tag: the agent rolls, the guest's QEMU stays.
    let qemu = qemu_pid(&uid).expect("no QEMU pid for the running VM");
    let before = agent_pod(&pods).await.expect("no Ready agent Pod");
    for (what, args0, args1) in [
        ("controller", "/usr/local/bin/vmlet", "controller"),
        ("agent", "/usr/local/bin/vmlet", "agent"),
    ] {
        println!("RSS {what}: {:?} MiB", rss_mib(args0, args1));
    }
    let t = Instant::now();
    helm(&[
        "upgrade",
        RELEASE,
        &format!("{}/charts/vmlet", env!("CARGO_MANIFEST_DIR")),
        "-n",
        NS,
        "--reuse-values",
        "--set",
        "image.tag=dev-next",
        "--wait",
        "--timeout",
        "5m",
    ]);
    let after = common::wait_for(Duration::from_secs(120), || async {
        let p = agent_pod(&pods).await?;
        let image = p.spec.as_ref()?.containers[0].image.clone()?;
        (p.metadata.uid != before.metadata.uid && image == "vmlet:dev-next").then_some(p)
    })
    .await
    .expect("the agent did not roll to vmlet:dev-next");
    println!(
        "helm upgrade: agent Pod {} -> {} in {:.1} s",
        before.metadata.name.unwrap(),
        after.metadata.name.unwrap(),
        t.elapsed().as_secs_f64()
    );
    // The new agent has adopted the domain: its report still says Running, and libvirt
    // still runs the same QEMU.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let vm = vms.get("tiny").await.unwrap();
    assert_eq!(vm.status.unwrap().phase, Some(Phase::Running));
    assert_eq!(
        qemu_pid(&uid),
        Some(qemu),
        "QEMU was restarted by the upgrade"
    );
    assert!(pid_alive(qemu), "QEMU {qemu} is gone");
    let size = std::fs::metadata(&console_log).unwrap().len();
    assert!(
        common::wait_for(Duration::from_secs(20), || async {
            (std::fs::metadata(&console_log).ok()?.len() > size).then_some(())
        })
        .await
        .is_some(),
        "the guest stopped writing to its console after the upgrade"
    );

    // Uninstall in the README's order: VMs first (their agent removes domains and disks),
    // then the release, then what the agents kept for their nodes.
    vms.delete("tiny", &DeleteParams::default()).await.unwrap();
    common::wait_for(Duration::from_secs(60), || async {
        vms.get_opt("tiny").await.ok()?.is_none().then_some(())
    })
    .await
    .expect("the VM was not removed");
    assert_eq!(qemu_pid(&uid), None, "the VM's domain is still defined");
    assert!(!pid_alive(qemu), "QEMU {qemu} outlived its VM");
    assert!(
        !console_log.parent().unwrap().exists(),
        "the VM's directory was left on the node"
    );
    quota_holds_vms(&client, &ns).await;
    kubectl_drain_stops_a_shutdown_vm(&client, &ns).await;
    common::delete_namespace(&client, &ns).await;

    helm(&["uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "2m"]);
    forget_node_records().expect("the README's clean-up after helm uninstall");
    assert!(
        common::wait_until_empty(&pods, Duration::from_secs(60)).await,
        "Pods left in vmlet-system after helm uninstall"
    );
    let left = common::cli_ok(
        kubectl(&[
            "get",
            "clusterroles,clusterrolebindings,validatingadmissionpolicies,\
             validatingadmissionpolicybindings,roles,rolebindings,services,secrets,\
             serviceaccounts,configmaps,deployments,daemonsets,poddisruptionbudgets",
            "-A",
            "-l",
            &format!("app.kubernetes.io/instance={RELEASE}"),
            "-o",
            "name",
        ]),
        "list what the release labelled",
    );
    assert!(left.trim().is_empty(), "left behind: {left}");
    let leases_left = common::cli_ok(
        kubectl(&[
            "get",
            "lease",
            "-n",
            "kube-node-lease",
            "-l",
            vmlet::api::HEARTBEAT_LABEL,
            "-o",
            "name",
        ]),
        "list heartbeat Leases",
    );
    assert!(leases_left.trim().is_empty(), "left behind: {leases_left}");
    // The runtime keeps nothing of the release either (kubelet removes a deleted Pod's
    // containers).
    let filter = format!("labels.\"io.kubernetes.pod.namespace\"=={NS}");
    // (kubelet's container garbage collection runs once a minute)
    let left = common::wait_for(Duration::from_secs(90), || async {
        let out = ctr(&["containers", "ls", "-q", &filter]);
        let ids = String::from_utf8(out.stdout).ok()?;
        ids.trim().is_empty().then_some(())
    })
    .await;
    assert!(
        left.is_some(),
        "containers of {NS} left in containerd: {}",
        String::from_utf8_lossy(&ctr(&["containers", "ls", &filter]).stdout)
    );
}

/// The VM's Pod on the real kubelet: running the placeholder from the vmlet image, and
/// counted by kube-scheduler: a Pod that would fit in the node's memory were the VM not
/// there stays Pending with kube-scheduler's "Insufficient memory".
async fn vm_pod_counts_on_the_node(client: &kube::Client, ns: &str, vm_uid: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let sel = format!("{}={vm_uid}", vmlet::api::vmpod::VM_UID_LABEL);
    let vm_pod = common::wait_for(Duration::from_secs(60), || async {
        let p = pods
            .list(&ListParams::default().labels(&sel))
            .await
            .ok()?
            .items
            .pop()?;
        (p.status.as_ref()?.phase.as_deref() == Some("Running")).then_some(p)
    })
    .await
    .expect("the VM's Pod never ran on the node");
    assert_eq!(
        vm_pod.spec.as_ref().unwrap().node_name.as_deref(),
        Some(NODE)
    );
    let vm_req = vmlet::controller::vmpod::pod_requests(&vm_pod);
    // The placeholder's own memory, as the kernel counts it.
    let rss: Vec<(f64, f64)> = memory_of(vmlet::api::vmpod::PLACEHOLDER_COMMAND);
    println!(
        "VM Pod {}: requests {}m cpu, {} MiB memory; placeholder (RSS, private) {rss:?} MiB",
        vm_pod.metadata.name.as_deref().unwrap_or_default(),
        vm_req.cpu_millis,
        vm_req.memory >> 20
    );
    assert!(!rss.is_empty(), "no placeholder process on the node");

    // What the node has left for Pods, the VM's Pod aside.
    let node: Node = Api::all(client.clone()).get(NODE).await.unwrap();
    let allocatable = node.status.unwrap().allocatable.unwrap()["memory"]
        .0
        .clone();
    let allocatable = vmlet::api::quantity::parse_bytes(&allocatable).unwrap();
    let all: Api<Pod> = Api::all(client.clone());
    let on_node = all
        .list(&ListParams::default().fields(&format!("spec.nodeName={NODE}")))
        .await
        .unwrap();
    let others: u64 = on_node
        .items
        .iter()
        .filter(|p| p.metadata.uid != vm_pod.metadata.uid)
        .filter(|p| vmlet::controller::vmpod::holds_node(p).is_some())
        .map(|p| vmlet::controller::vmpod::pod_requests(p).memory)
        .sum();
    let ask = allocatable - others - vm_req.memory / 2;
    let big: Pod = serde_json::from_value(json!({
        "metadata": {"name": "big"},
        "spec": {"containers": [{"name": "c", "image": "vmlet:dev", "imagePullPolicy": "Never",
                 "command": [vmlet::api::vmpod::PLACEHOLDER_COMMAND],
                 "resources": {"requests": {"memory": ask.to_string()}}}],
                 "nodeSelector": {"kubernetes.io/hostname": NODE}}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &big).await.unwrap();
    let why = common::wait_for(Duration::from_secs(30), || async {
        let p = pods.get("big").await.ok()?;
        let c = p
            .status?
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
        c.message
    })
    .await
    .expect("a Pod that fits only without the VM was not held Pending");
    assert!(why.contains("Insufficient memory"), "{why}");
    println!("a Pod of {} MiB beside the VM: Pending: {why}", ask >> 20);
    let p = pods.get("big").await.unwrap();
    assert_eq!(p.spec.unwrap().node_name, None, "bound beside the VM");

    // The controller's token creates and deletes VM Pods only (vm-pod-restriction.yaml).
    let controller = format!("system:serviceaccount:{NS}:{RELEASE}-controller");
    for (what, args) in [
        (
            "create a Pod",
            vec!["run", "evil", "--image=vmlet:dev", "--restart=Never"],
        ),
        ("delete a Pod", vec!["delete", "pod", "big"]),
    ] {
        let mut args = args.clone();
        args.extend(["-n", ns, "--as", &controller]);
        let out = kubectl(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("only VM Pods"),
            "the controller's token could {what}: {err}"
        );
    }
    pods.delete("big", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
}

/// A tiny guest VM named `name` with the given evictionStrategy.
async fn tiny_vm(vms: &Api<VirtualMachine>, name: &str, eviction: &str) -> VirtualMachine {
    let spec = json!({
        "runStrategy": "Always", "memory": "128Mi", "evictionStrategy": eviction,
        "boot": {"kernel": {"name": "tiny-kernel"}, "initrd": {"name": "tiny-initrd"},
                 "cmdline": "console=ttyS0 panic=-1"},
    });
    vms.create(
        &PostParams::default(),
        &VirtualMachine::new(name, serde_json::from_value(spec).unwrap()),
    )
    .await
    .unwrap()
}

/// A namespace's ResourceQuota on requests.memory holds its VMs: the VM over quota is
/// not placed and says why with the API server's words, and starts once another VM is
/// deleted, with nothing else to do.
async fn quota_holds_vms(client: &kube::Client, ns: &str) {
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), ns);
    let quotas: Api<k8s_openapi::api::core::v1::ResourceQuota> =
        Api::namespaced(client.clone(), ns);
    let one = tiny_vm(&vms, "q1", "Shutdown").await;
    common::node::wait_phase(&vms, "q1", "Running", 120).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let sel = format!(
        "{}={}",
        vmlet::api::vmpod::VM_UID_LABEL,
        one.metadata.uid.unwrap()
    );
    let q1_pod = pods
        .list(&ListParams::default().labels(&sel))
        .await
        .unwrap()
        .items;
    let per_vm = vmlet::controller::vmpod::pod_requests(&q1_pod[0]).memory;
    // Room for one such VM, not two.
    let quota: k8s_openapi::api::core::v1::ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "vms"},
        "spec": {"hard": {"requests.memory": (per_vm + per_vm / 2).to_string()}}
    }))
    .unwrap();
    quotas.create(&PostParams::default(), &quota).await.unwrap();
    common::wait_for(Duration::from_secs(30), || async {
        quotas
            .get("vms")
            .await
            .ok()?
            .status?
            .used?
            .get("requests.memory")
            .map(|_| ())
    })
    .await
    .expect("quota usage computed");
    tiny_vm(&vms, "q2", "Shutdown").await;
    let t = Instant::now();
    let why = common::wait_for(Duration::from_secs(30), || async {
        let vm = vms.get("q2").await.ok()?;
        let c = vm.status?.conditions.into_iter().find(|c| {
            c.type_ == "Scheduled" && c.status == "False" && c.reason == "QuotaExceeded"
        })?;
        Some(c.message)
    })
    .await
    .expect("q2 was not held by the quota");
    assert!(why.contains("exceeded quota"), "{why}");
    println!(
        "a VM over quota: {:.1} s to QuotaExceeded: {why}",
        t.elapsed().as_secs_f64()
    );
    vms.delete("q1", &DeleteParams::default()).await.unwrap();
    let t = Instant::now();
    common::node::wait_phase(&vms, "q2", "Running", 120).await;
    println!(
        "q1 deleted: q2 Running {:.1} s later",
        t.elapsed().as_secs_f64()
    );
    vms.delete("q2", &DeleteParams::default()).await.unwrap();
    quotas
        .delete("vms", &DeleteParams::default())
        .await
        .unwrap();
    assert!(
        common::wait_until_empty(&vms, Duration::from_secs(60)).await,
        "q1 and q2 not removed"
    );
}

/// Plain `kubectl drain` of the node: the VM Pod's eviction makes the agent shut a VM
/// with evictionStrategy Shutdown down (ACPI, destroyed after its grace period: the tiny
/// guest has no ACPI daemon), the drain returns once it has left (its Pod waited for
/// it), and after `kubectl uncordon` it runs again. The
/// drain names the VM Pods (`--pod-selector`): on this one-node cluster the chart's own
/// controller Pods could go nowhere else.
async fn kubectl_drain_stops_a_shutdown_vm(client: &kube::Client, ns: &str) {
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), ns);
    let vm = tiny_vm(&vms, "drained", "Shutdown").await;
    let uid = vm.metadata.uid.clone().unwrap();
    common::node::wait_phase(&vms, "drained", "Running", 120).await;
    let qemu = qemu_pid(&uid).expect("QEMU of the VM to drain");
    let t = Instant::now();
    let out = kubectl(&[
        "drain",
        NODE,
        "--ignore-daemonsets",
        "--pod-selector",
        vmlet::api::vmpod::VM_LABEL,
        "--timeout",
        "180s",
    ]);
    let drained = t.elapsed();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = kubectl(&["uncordon", NODE]);
    assert!(out.status.success(), "kubectl drain failed: {text}");
    println!("kubectl drain: {:.1} s\n{text}", drained.as_secs_f64());
    assert!(!pid_alive(qemu), "QEMU {qemu} still runs after the drain");
    let evicting = common::wait_event(client, ns, "drained", "Evicting", 5).await;
    assert!(evicting.is_some(), "no Evicting event on the drained VM");
    // Uncordoned, it is placed again and runs.
    let t = Instant::now();
    common::node::wait_phase(&vms, "drained", "Running", 180).await;
    println!(
        "uncordoned: Running again {:.1} s later",
        t.elapsed().as_secs_f64()
    );
    vms.delete("drained", &DeleteParams::default())
        .await
        .unwrap();
    common::wait_for(Duration::from_secs(60), || async {
        vms.get_opt("drained").await.ok()?.is_none().then_some(())
    })
    .await
    .expect("the drained VM was not removed");
}

/// `kubectl vm console` against the installed chart: a ServiceAccount allowed
/// `virtualmachines/console` in subresources.vmlet.dev types a sum into the guest's shell
/// and reads the result back; one without is refused.
fn console_reads_the_guest(ns: &str) {
    let rbac = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: console-user, namespace: {ns}}}\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: nobody, namespace: {ns}}}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: vm-console, namespace: {ns}}}\n\
         rules: [{{apiGroups: [subresources.vmlet.dev], resources: [virtualmachines/console], verbs: [get]}}]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: vm-console, namespace: {ns}}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: vm-console}}\n\
         subjects: [{{kind: ServiceAccount, name: console-user, namespace: {ns}}}]\n"
    );
    common::cli_ok(
        common::cli("kubectl", &["apply", "-f", "-"], Some(&rbac)),
        "console RBAC",
    );
    // The aggregated API is served once the API container is ready.
    common::cli_ok(
        kubectl(&[
            "wait",
            "--for=condition=Available",
            "--timeout=120s",
            "apiservice/v1alpha1.subresources.vmlet.dev",
        ]),
        "the APIService",
    );
    let console = |sa: &str, typed: &str| {
        let token = common::cli_ok(
            kubectl(&["create", "token", sa, "-n", ns]),
            "kubectl create token",
        );
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kubectl-vm"))
            .args(["console", "tiny", "-n", ns, "--idle", "1s"])
            .env("KUBECONFIG", common::kubeconfig_path())
            .arg(format!("--token={}", token.trim()))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(typed.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = console("console-user", "echo vmlet-$((5000+5))\n");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("vmlet-5005"),
        "console: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = console("nobody", "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("forbidden"),
        "nobody: {err}"
    );
}

/// A Pod on the Pod network reaches the agent at the address it advertises.
async fn other_pods_reach_the_agent(client: &kube::Client, ns: &str, agent_url: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let (host, port) = agent_url
        .strip_prefix("http://")
        .and_then(|a| a.rsplit_once(':'))
        .expect("agentURL http://HOST:PORT");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "reach-agent"},
        "spec": {"restartPolicy": "Never",
            "containers": [{"name": "c", "image": "vmlet.dev/pause:local", "imagePullPolicy": "Never",
                // (busybox's static wget crashes here; nc and a request line do.)
                "command": ["/bin/busybox", "sh", "-c",
                // busybox nc hangs up when its input ends, before the reply: keep the
                // input open a while. Tried a few times: the Pod's first packets can
                // race its network's set-up.
                    format!("for i in 1 2 3 4 5 6 7 8 9 10; do \
                        r=$( (printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n'; /bin/busybox sleep 2) | /bin/busybox nc -w 5 {host} {port} 2>&1); \
                        echo \"try $i: $r\"; echo \"$r\" | /bin/busybox grep -qx ok && exit 0; /bin/busybox sleep 1; done; exit 1")]}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let phase = common::wait_for(Duration::from_secs(60), || async {
        let phase = pods.get("reach-agent").await.ok()?.status?.phase?;
        matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase)
    })
    .await;
    let log = match pods.logs("reach-agent", &Default::default()).await {
        Ok(l) => l,
        Err(e) => format!("(no log: {e})"),
    };
    assert_eq!(
        phase.as_deref(),
        Some("Succeeded"),
        "a Pod could not reach the agent at {agent_url}: {log}"
    );
    let _ = pods.delete("reach-agent", &DeleteParams::default()).await;
}
