//! Real processes: `vmlet agent` on the real libvirtd and two `vmlet controller` replicas,
//! killed with SIGKILL. The agent dies mid-reconcile (right after it defined the domain)
//! and is started again: one domain, status converges, the guest boots. The leader dies
//! without releasing its Lease: the other replica takes over and places the next VM.

mod common;

fn virsh(args: &[&str]) -> String {
    String::from_utf8_lossy(&common::virsh(args).stdout).into_owned()
}

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use vmlet::api::{VirtualMachine, VirtualMachineImage};

/// Children killed (SIGKILL) when dropped, whatever happens to the test.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn vmlet(args: &[&str], log: &Path) -> Proc {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Proc(
        Command::new(env!("CARGO_BIN_EXE_vmlet"))
            .args(args)
            .env("KUBECONFIG", common::kubeconfig_path())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_agent_and_leader_recover() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "procs").await;
    let dir = common::qemu_tempdir();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        Command::new(root.join("hack/tiny-guest.sh"))
            .arg(dir.path().join("guest"))
            .status()
            .unwrap()
            .success()
    );
    let images: Api<VirtualMachineImage> = Api::namespaced(client.clone(), &ns);
    for (name, fmt, file) in [("k", "kernel", "vmlinuz"), ("i", "initrd", "initrd.gz")] {
        let (url, sha) = common::serve_file(&dir.path().join("guest").join(file)).await;
        let spec = json!({"format": fmt, "source": {"http": {"url": url, "sha256": sha}}});
        images
            .create(
                &PostParams::default(),
                &VirtualMachineImage::new(name, serde_json::from_value(spec).unwrap()),
            )
            .await
            .unwrap();
    }
    let node = format!("procs-{}", std::process::id());
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let n = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node, "labels": {"vmlet.dev/hypervisor": "true", "vmlet.dev/test-run": ns}}});
    nodes
        .patch(&node, &PatchParams::apply("vmlet-tests"), &Patch::Apply(&n))
        .await
        .unwrap();

    let state = dir.path().join("state");
    let agent_args: Vec<String> = [
        "agent",
        "--node",
        &node,
        "--libvirt-uri",
        "qemu:///system",
        "--accel",
        "tcg",
        "--metrics-addr",
        "127.0.0.1:0",
        "--reserved-memory",
        "0",
        // The images are served from this test, on loopback.
        "--image-source-allow",
        "127.0.0.0/8",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--state-dir".into(),
        state.display().to_string(),
        "--image-root".into(),
        dir.path().display().to_string(),
    ])
    .collect();
    let agent_args: Vec<&str> = agent_args.iter().map(String::as_str).collect();
    let log = dir.path().join("processes.log");
    let mut agent = vmlet(&agent_args, &log);
    let controller = |id: &str| {
        vmlet(
            &[
                "controller",
                "--identity",
                id,
                "--lease-namespace",
                &ns,
                "--metrics-addr",
                "127.0.0.1:0",
            ],
            &log,
        )
    };
    let mut replicas = vec![
        ("one".to_string(), Some(controller("one"))),
        ("two".to_string(), Some(controller("two"))),
    ];

    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    let spec = |sel: &str| {
        json!({"memory": "128Mi", "nodeSelector": {"vmlet.dev/test-run": sel},
               "boot": {"kernel": {"name": "k"}, "initrd": {"name": "i"}, "cmdline": "console=ttyS0 panic=-1"}})
    };
    let vm = api
        .create(
            &PostParams::default(),
            &VirtualMachine::new("first", serde_json::from_value(spec(&ns)).unwrap()),
        )
        .await
        .unwrap();
    let uid = vm.metadata.uid.unwrap();
    let domain = format!("vmlet_{ns}_first");
    let _guard = common::DomainGuard(vec![uid.clone()]);

    // SIGKILL the agent the moment the domain is defined, before it reports anything.
    let defined = common::wait_for(Duration::from_secs(60), || async {
        virsh(&["list", "--all", "--uuid"])
            .contains(&uid)
            .then_some(())
    })
    .await;
    assert!(defined.is_some(), "the agent never defined the domain");
    agent.0.kill().unwrap();
    let _ = agent.0.wait();
    agent = vmlet(&agent_args, &log);
    let running = common::wait_for(Duration::from_secs(90), || async {
        let s = api.get("first").await.ok()?.status?;
        (s.phase == Some(vmlet::api::vm::Phase::Running)).then_some(())
    })
    .await;
    assert!(
        running.is_some(),
        "status never converged: {:?}",
        api.get("first").await.unwrap().status
    );
    let console = state.join("vms").join(&uid).join("console.log");
    let booted = common::wait_for(Duration::from_secs(60), || async {
        std::fs::read_to_string(&console)
            .ok()?
            .contains("vmlet-guest-up")
            .then_some(())
    })
    .await;
    assert!(booted.is_some(), "guest never booted");
    let names = virsh(&["list", "--all", "--name"]);
    assert_eq!(
        names.lines().filter(|l| l.trim() == domain).count(),
        1,
        "a second domain for the VM:\n{names}"
    );
    assert_eq!(virsh(&["list", "--all", "--uuid"]).matches(&uid).count(), 1);

    // SIGKILL the leader; the other replica takes over and places the next VM.
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let holder = || async {
        leases
            .get_opt("vmlet-controller")
            .await
            .ok()
            .flatten()?
            .spec?
            .holder_identity
    };
    let leader = common::wait_for(Duration::from_secs(10), || async { holder().await })
        .await
        .expect("a leader");
    let t0 = Instant::now();
    for (id, p) in replicas.iter_mut() {
        if *id == leader {
            drop(p.take());
        }
    }
    let other = common::wait_for(Duration::from_secs(30), || async {
        holder().await.filter(|h| *h != leader)
    })
    .await;
    assert!(other.is_some(), "no takeover after the leader was killed");
    println!(
        "leader {leader} SIGKILLed; {} took over in {:.1} s",
        other.unwrap(),
        t0.elapsed().as_secs_f64()
    );
    assert!(t0.elapsed() < Duration::from_secs(15));
    let mut spec2 = spec(&ns);
    spec2["runStrategy"] = json!("Halted");
    api.create(
        &PostParams::default(),
        &VirtualMachine::new("second", serde_json::from_value(spec2).unwrap()),
    )
    .await
    .unwrap();
    let bound = common::wait_for(Duration::from_secs(30), || async {
        api.get("second")
            .await
            .ok()?
            .status?
            .node_name
            .filter(|n| *n == node)
    })
    .await;
    assert!(bound.is_some(), "the new leader did not place the VM");

    common::delete_vms_and_namespace(&client, &ns).await;
    assert!(
        !virsh(&["list", "--all", "--uuid"]).contains(&uid),
        "domain left behind"
    );
    drop(agent);
    replicas.clear();
    let _ = nodes.delete(&node, &DeleteParams::default()).await;
    let _ = Api::<vmlet::api::Hypervisor>::all(client.clone())
        .delete(&node, &DeleteParams::default())
        .await;
}
