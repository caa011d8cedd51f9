//! End to end with libvirtd and QEMU (TCG here): a real kernel and busybox initramfs,
//! served over HTTP from 127.0.0.1 as sha256-checked VirtualMachineImages, boot to
//! userspace as a VirtualMachine; deletion removes domain, overlay and seed.
//!
//! Needs `hack/libvirt.sh up` (make test runs it). Prints apply->Running and
//! apply->guest-userspace beside a plain `virsh define && virsh start` of the same XML.

mod common;

use common::{DomainGuard, virsh};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use vmlet::agent::libvirt::{Connection, Libvirt, RunState};
use vmlet::api::VirtualMachine;

fn console_has(path: &Path, needle: &str) -> bool {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).contains(needle))
        .unwrap_or(false)
}

async fn wait_console(path: &Path, needle: &str, secs: u64) -> bool {
    common::wait_for(Duration::from_secs(secs), || async {
        console_has(path, needle).then_some(())
    })
    .await
    .is_some()
}

// Multi-threaded: the test blocks on kubectl while the in-process agent serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_guest_boots_to_userspace_and_is_cleaned_up() {
    let Setup {
        client,
        lv,
        ns,
        dir,
        state,
        node,
        agent,
    } = setup("e2e", "127.0.0.1:19464").await;
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    let spec = json!({
        "runStrategy": "Once",
        "memory": "128Mi",
        "boot": {"kernel": {"name": "tiny-kernel"}, "initrd": {"name": "tiny-initrd"}, "cmdline": "console=ttyS0 panic=-1"},
        "disks": [
            {"name": "data", "blank": {"size": "64Mi"}},
            {"name": "seed", "cloudInit": {"userData": "#cloud-config\n"}}
        ],
        "networks": [{"name": "default", "user": {}}]
    });
    let t0 = Instant::now();
    let vm = api
        .create(
            &PostParams::default(),
            &VirtualMachine::new("tiny", serde_json::from_value(spec).unwrap()),
        )
        .await
        .unwrap();
    let patch = json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachine", "status": {"nodeName": node}});
    api.patch_status(
        "tiny",
        &kube::api::PatchParams::apply("vmlet-test-scheduler"),
        &kube::api::Patch::Apply(&patch),
    )
    .await
    .unwrap();
    let uid = vm.metadata.uid.unwrap();
    let _guard = DomainGuard(vec![uid.clone(), "vmlet-plain-baseline".into()]);
    let console = state.join("vms").join(&uid).join("console.log");

    let running = common::wait_for(Duration::from_secs(120), || async {
        let vm = api.get("tiny").await.ok()?;
        (vm.status?.phase? == vmlet::api::vm::Phase::Running).then(|| t0.elapsed())
    })
    .await
    .unwrap_or_else(|| panic!("not Running: {:?}", std::fs::read_to_string(&console)));
    assert!(
        wait_console(&console, "vmlet-guest-up", 60).await,
        "guest never reached userspace"
    );
    let userspace = t0.elapsed();
    // The agent's metrics carry the guest's libvirt counters.
    let metrics = reqwest::get("http://127.0.0.1:19464/metrics")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = format!("vmlet_vm_cpu_seconds_total{{namespace=\"{ns}\",name=\"tiny\"}}");
    assert!(
        metrics.contains(&series),
        "{series} missing from:\n{metrics}"
    );
    assert_eq!(
        reqwest::get("http://127.0.0.1:19464/healthz")
            .await
            .unwrap()
            .status(),
        200
    );
    let vm = api.get("tiny").await.unwrap();
    let accel = vm
        .status
        .as_ref()
        .unwrap()
        .accel
        .clone()
        .unwrap_or_default();

    // The same XML, defined and started by hand, in the same run.
    let xml = virsh(&["dumpxml", "--inactive", &uid]).stdout;
    let plain = dir.path().join("plain.xml");
    let plain_log = dir.path().join("plain-console.log");
    // Console path first: it contains the uid.
    let xml = String::from_utf8(xml)
        .unwrap()
        .replace(console.to_str().unwrap(), plain_log.to_str().unwrap())
        .replace(&uid, "00000000-0000-4000-8000-00000000beef")
        .replace(&format!("vmlet_{ns}_tiny"), "vmlet-plain-baseline");
    // The baseline must not share the VM's writable disks: drop them.
    let xml = strip_disks(&xml);
    std::fs::write(&plain, xml).unwrap();
    let t1 = Instant::now();
    for args in [
        &["define", plain.to_str().unwrap()][..],
        &["start", "vmlet-plain-baseline"][..],
    ] {
        let out = virsh(args);
        assert!(
            out.status.success(),
            "virsh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let plain_started = t1.elapsed();
    assert!(wait_console(&plain_log, "vmlet-guest-up", 60).await);
    let plain_userspace = t1.elapsed();
    let _ = virsh(&["destroy", "vmlet-plain-baseline"]);
    let _ = virsh(&["undefine", "vmlet-plain-baseline"]);
    println!(
        "e2e boot ({accel}): apply->Running {:.2} s, apply->guest userspace {:.2} s; \
         virsh define+start {:.2} s, ->guest userspace {:.2} s; ratio {:.2}",
        running.as_secs_f64(),
        userspace.as_secs_f64(),
        plain_started.as_secs_f64(),
        plain_userspace.as_secs_f64(),
        userspace.as_secs_f64() / plain_userspace.as_secs_f64()
    );

    // Something outside kills the guest: the status says so within 2 s (lifecycle events).
    // The clock starts when the domain is gone (virsh destroy returns then).
    let td = Instant::now();
    assert!(virsh(&["destroy", &uid]).status.success());
    println!("virsh destroy took {:.2} s", td.elapsed().as_secs_f64());
    let t2 = Instant::now();
    let seen = common::wait_for(Duration::from_secs(10), || async {
        let vm = api.get("tiny").await.ok()?;
        (vm.status?.phase? == vmlet::api::vm::Phase::Failed).then(|| t2.elapsed())
    })
    .await
    .expect("outside destroy never reached the status");
    println!(
        "outside destroy -> status Failed in {:.2} s",
        seen.as_secs_f64()
    );
    assert!(seen < Duration::from_secs(2), "took {seen:?}");
    assert_eq!(
        lv.lookup(&uid).await.unwrap().unwrap().state,
        RunState::Destroyed
    );

    // Deletion: domain, overlay and seed gone; the cached images stay.
    let vm_dir = state.join("vms").join(&uid);
    assert!(vm_dir.join("disk-data.qcow2").exists() && vm_dir.join("disk-seed.iso").exists());
    api.delete("tiny", &DeleteParams::default()).await.unwrap();
    let gone = common::wait_for(Duration::from_secs(60), || async {
        api.get_opt("tiny").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(gone.is_some());
    assert!(
        lv.lookup(&uid).await.unwrap().is_none(),
        "domain left behind"
    );
    assert!(!vm_dir.exists(), "VM files left behind");
    assert_eq!(
        std::fs::read_dir(state.join("image-cache").join(&ns))
            .unwrap()
            .count(),
        2,
        "cached images removed"
    );
    common::delete_vms_and_namespace(&client, &ns).await;
    agent.abort();
    common::forget_node(&client, &node).await;
    let hvs: Api<vmlet::api::Hypervisor> = Api::all(client.clone());
    let _ = hvs.delete(&node, &DeleteParams::default()).await;
}

fn strip_disks(xml: &str) -> String {
    let mut out = String::new();
    let mut rest = xml;
    while let Some(start) = rest.find("<disk ") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("</disk>").expect("closed disk") + start + "</disk>".len();
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// One node on the real libvirtd: an in-process agent, and the tiny guest's kernel and
/// initramfs served over HTTP as sha256-checked VirtualMachineImages in a fresh namespace.
struct Setup {
    client: kube::Client,
    lv: Arc<Connection>,
    ns: String,
    dir: tempfile::TempDir,
    state: PathBuf,
    node: String,
    agent: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn setup(prefix: &str, metrics_addr: &str) -> Setup {
    vmlet::telemetry::init(Default::default());
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let lv = Arc::new(
        Connection::open("qemu:///system")
            .await
            .expect("libvirtd (hack/libvirt.sh up)"),
    );
    let ns = common::namespace(&client, prefix).await;
    let dir = common::qemu_tempdir();
    let state = dir.path().join("state");
    std::fs::create_dir_all(dir.path().join("images")).unwrap();
    let node = format!("{prefix}-{}", std::process::id());
    // Not a hypervisor for any controller (no label): the agent's VMs are bound by hand.
    // Its address is the one the agent publishes, so `kubectl vm console` trusts it.
    common::node_with_address(&client, &node, serde_json::json!({}), "127.0.0.1").await;
    let args = vmlet::agent::Args {
        node: node.clone(),
        libvirt_uri: "qemu:///system".into(),
        state_dir: state.clone(),
        image_root: dir.path().join("images"),
        accel: vmlet::agent::accel::AccelChoice::Auto,
        reserved_memory: "0".into(),
        vm_overhead: "auto".into(),
        metrics_addr: metrics_addr.into(),
        advertise_address: None,
        migration_uri: None,
        migration_tls: true,
        orphan_grace_seconds: 30,
        lease_duration_seconds: 15,
        heartbeat_seconds: 5,
        fence_after_seconds: 15,
        kubeconfig: Some(common::kubeconfig_path()),
        peer_key_file: None,
        downloads: vmlet::agent::download::DownloadPolicy::allowing_loopback(),
        storage_pools: vec![],
        stream_tls_dir: None,
        stream_addr: "127.0.0.1:0".into(),
    };
    let agent = tokio::spawn(vmlet::agent::run_with(
        args,
        lv.clone(),
        std::future::pending(),
    ));
    common::tiny_guest_images(&client, &ns).await;
    // The agent is up (its KVM probe alone takes seconds) before any clock starts.
    let hvs: Api<vmlet::api::Hypervisor> = Api::all(client.clone());
    common::wait_for(Duration::from_secs(60), || async {
        let st = hvs.get_opt(&node).await.ok()??.status?;
        vmlet::api::conditions::is_true(&st.conditions, vmlet::api::conditions::Type::Ready)
            .then_some(())
    })
    .await
    .expect("the agent never reported its Hypervisor Ready");
    Setup {
        client,
        lv,
        ns,
        dir,
        state,
        node,
        agent,
    }
}

async fn bind(api: &Api<VirtualMachine>, name: &str, node: &str) {
    let patch = json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachine", "status": {"nodeName": node}});
    api.patch_status(
        name,
        &kube::api::PatchParams::apply("vmlet-test-scheduler"),
        &kube::api::Patch::Apply(&patch),
    )
    .await
    .unwrap();
}

/// QEMU killed under a Running VM with runStrategy Always: restarted, each time after a
/// longer backoff (1 s, then 2 s), visible as CrashLoopBackOff and in restartCount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_qemu_is_restarted_with_backoff() {
    let Setup {
        client,
        ns,
        // Held to the end: dropping it deletes the agent's state directory under it.
        dir: _dir,
        state,
        node,
        agent,
        ..
    } = setup("e2e-kill", "127.0.0.1:0").await;
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    let spec = json!({
        "runStrategy": "Always",
        "memory": "128Mi",
        "boot": {"kernel": {"name": "tiny-kernel"}, "initrd": {"name": "tiny-initrd"}, "cmdline": "console=ttyS0 panic=-1"},
    });
    let vm = api
        .create(
            &PostParams::default(),
            &VirtualMachine::new("crashy", serde_json::from_value(spec).unwrap()),
        )
        .await
        .unwrap();
    let uid = vm.metadata.uid.unwrap();
    let _guard = DomainGuard(vec![uid.clone()]);
    bind(&api, "crashy", &node).await;
    let console = state.join("vms").join(&uid).join("console.log");
    let domain = format!("vmlet_{ns}_crashy");
    for (restarts_seen, min_backoff) in [(0, Duration::from_secs(1)), (1, Duration::from_secs(2))] {
        let round = restarts_seen + 1;
        let running = common::wait_for(Duration::from_secs(60), || async {
            let s = api.get("crashy").await.ok()?.status?;
            (s.phase == Some(vmlet::api::vm::Phase::Running)
                && s.restart_count.unwrap_or(0) >= restarts_seen)
                .then_some(())
        })
        .await;
        assert!(running.is_some(), "round {round}: not Running");
        assert!(wait_console(&console, "vmlet-guest-up", 60).await);
        let pid = common::qemu_pid(&domain).expect("QEMU's pid file");
        if round == 1 {
            // QEMU runs as Debian's libvirt-qemu user, not root, and its disks are lent
            // to that user only while it runs.
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
            let qemu_uid = uid_line.split_whitespace().nth(1).unwrap().to_string();
            let want = Command::new("id")
                .args(["-u", "libvirt-qemu"])
                .output()
                .unwrap();
            assert_eq!(
                qemu_uid,
                String::from_utf8_lossy(&want.stdout).trim(),
                "{uid_line}"
            );
            assert_ne!(qemu_uid, "0", "QEMU runs as root");
            println!("QEMU pid {pid} runs as uid {qemu_uid} (libvirt-qemu)");
        }
        let killed = Instant::now();
        assert!(
            Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
        let backoff = common::wait_for(Duration::from_secs(10), || async {
            let s = api.get("crashy").await.ok()?.status?;
            let c =
                vmlet::api::conditions::find(&s.conditions, vmlet::api::conditions::Type::Ready)?
                    .clone();
            (c.reason == "CrashLoopBackOff").then_some(c.message)
        })
        .await;
        assert!(backoff.is_some(), "round {round}: no CrashLoopBackOff");
        let message = backoff.clone().unwrap();
        assert!(
            message.contains(&format!("({round} in a row)")),
            "round {round}: {message}"
        );
        let restarted = common::wait_for(Duration::from_secs(60), || async {
            let s = api.get("crashy").await.ok()?.status?;
            (s.restart_count.unwrap_or(0) > restarts_seen).then(|| killed.elapsed())
        })
        .await
        .expect("not restarted");
        println!(
            "round {round}: QEMU killed -> restarted after {:.1} s ({})",
            restarted.as_secs_f64(),
            backoff.unwrap()
        );
        assert!(
            restarted >= min_backoff,
            "round {round}: restarted after {restarted:?}, backoff {min_backoff:?}"
        );
    }
    common::delete_vms_and_namespace(&client, &ns).await;
    agent.abort();
    common::forget_node(&client, &node).await;
    let _ = Api::<vmlet::api::Hypervisor>::all(client.clone())
        .delete(&node, &DeleteParams::default())
        .await;
}
