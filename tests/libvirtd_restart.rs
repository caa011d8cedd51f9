//! libvirtd killed (SIGKILL) under a running agent and started again: while it is gone
//! the agent's /healthz fails and its Hypervisor is Ready=False (LibvirtUnreachable), the
//! guest keeps running (QEMU does not depend on libvirtd); once it is back the agent
//! reconnects on its own, registers for lifecycle events again, and a later
//! `virsh destroy` shows in the VM's status within 10 s.
//!
//! Alone in its test binary: it restarts the machine's libvirtd, which the other real-QEMU
//! tests use; cargo runs test binaries one after another.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{Api, PostParams};
use serde_json::json;
use vmlet::agent::libvirt::Connection;
use vmlet::api::VirtualMachine;

fn libvirtd_pid() -> String {
    std::fs::read_to_string("/run/libvirtd.pid")
        .expect("libvirtd started by hack/libvirt.sh")
        .trim()
        .to_string()
}

/// The status code of the agent's /healthz (a bare HTTP/1.0 GET on loopback).
async fn healthz(base: &str) -> Option<u16> {
    let url = format!("{base}/healthz");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/')?;
    let mut s = tokio::net::TcpStream::connect(host).await.ok()?;
    s.write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    String::from_utf8_lossy(&buf)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reconnects_after_libvirtd_is_killed_and_restarted() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "lvrestart").await;
    let lv = Connection::open("qemu:///system")
        .await
        .expect("libvirtd (hack/libvirt.sh up)");
    let dir = common::qemu_tempdir();
    std::fs::create_dir_all(dir.path().join("images")).unwrap();
    let node = format!("lvrestart-{}", std::process::id());
    // A fixed free port, so that the test knows where /healthz is.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let args = vmlet::agent::Args {
        node: node.clone(),
        libvirt_uri: "qemu:///system".into(),
        state_dir: dir.path().join("state"),
        image_root: dir.path().join("images"),
        accel: vmlet::agent::accel::AccelChoice::Tcg,
        reserved_memory: "0".into(),
        vm_overhead: "auto".into(),
        metrics_addr: format!("127.0.0.1:{port}"),
        advertise_address: None,
        migration_uri: None,
        migration_tls: true,
        orphan_grace_seconds: 30,
        lease_duration_seconds: 15,
        heartbeat_seconds: 1,
        fence_after_seconds: 60,
        kubeconfig: Some(common::kubeconfig_path()),
        peer_key_file: None,
        downloads: vmlet::agent::download::DownloadPolicy::allowing_loopback(),
        storage_pools: vec![],
        stream_tls_dir: None,
        stream_addr: "127.0.0.1:0".into(),
    };
    let agent = tokio::spawn(vmlet::agent::run_with(
        args,
        Arc::new(lv),
        std::future::pending(),
    ));
    common::tiny_guest_images(&client, &ns).await;
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    let spec = json!({
        "runStrategy": "Always",
        "memory": "128Mi",
        "nodeSelector": {"vmlet.dev/test-run": ns},
        "boot": {"kernel": {"name": "tiny-kernel"}, "initrd": {"name": "tiny-initrd"}, "cmdline": "console=ttyS0 panic=-1"},
    });
    let vm = api
        .create(
            &PostParams::default(),
            &VirtualMachine::new("steady", serde_json::from_value(spec).unwrap()),
        )
        .await
        .unwrap();
    let uid = vm.metadata.uid.unwrap();
    let _guard = common::DomainGuard(vec![uid.clone()]);
    common::node::bind(&api, "steady", &node).await;
    let running = common::node::wait_phase(&api, "steady", "Running", 60).await;
    let started = running.status.unwrap().start_time;
    assert_eq!(healthz(&url).await, Some(200));

    // libvirtd dies.
    let killed = std::process::Command::new("kill")
        .args(["-9", &libvirtd_pid()])
        .status()
        .unwrap();
    assert!(killed.success());
    let hvs: Api<vmlet::api::Hypervisor> = Api::all(client.clone());
    let noticed = common::wait_for(Duration::from_secs(20), || async {
        let h = hvs.get(&node).await.ok()?;
        let ready = vmlet::api::conditions::find(
            &h.status?.conditions,
            vmlet::api::conditions::Type::Ready,
        )?
        .clone();
        (ready.status == "False" && ready.reason == "LibvirtUnreachable").then_some(())
    })
    .await;
    assert!(
        noticed.is_some(),
        "the Hypervisor stayed Ready without libvirtd"
    );
    assert_eq!(
        healthz(&url).await,
        Some(503),
        "/healthz passed without libvirtd"
    );

    // libvirtd comes back (the QEMU process ran on meanwhile). A daemon that dies while
    // it reconnects to the QEMUs it left is started once more, as an init system would.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let up = || {
        std::process::Command::new(root.join("hack/libvirt.sh"))
            .arg("up")
            .status()
            .unwrap()
            .success()
    };
    assert!(up() || up(), "libvirtd did not start again");
    let ready = common::wait_for(Duration::from_secs(60), || async {
        let h = hvs.get(&node).await.ok()?;
        vmlet::api::conditions::is_true(&h.status?.conditions, vmlet::api::conditions::Type::Ready)
            .then_some(())
    })
    .await;
    assert!(ready.is_some(), "the agent never reconnected");
    assert_eq!(healthz(&url).await, Some(200));
    let vm = api.get("steady").await.unwrap().status.unwrap();
    assert_eq!(
        vm.start_time, started,
        "the guest was restarted by libvirtd's restart"
    );

    // Lifecycle events flow again: an outside destroy shows within 10 s.
    let t = Instant::now();
    let out = common::virsh(&["destroy", &uid]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = common::wait_for(Duration::from_secs(10), || async {
        let s = api.get("steady").await.ok()?.status?;
        (s.restart_count.unwrap_or(0) >= 1 || s.phase != Some(vmlet::api::vm::Phase::Running))
            .then_some(())
    })
    .await;
    assert!(
        seen.is_some(),
        "virsh destroy did not reach the VM's status within 10 s"
    );
    println!(
        "libvirtd restart: destroy seen in the VM's status after {:.2} s",
        t.elapsed().as_secs_f64()
    );
    common::delete_vms_and_namespace(&client, &ns).await;
    agent.abort();
    common::forget_node(&client, &node).await;
}
