//! The agent against the real control plane and libvirt's `test:///default` driver.
//!
//! Each test runs its own agent in-process, for its own node name, on its own libvirt
//! connection (the test driver keeps domains per connection), and holds a clone of that
//! connection to see what the agent did. Dropping an agent's task is a crash: its domains
//! stay, as they would when a real agent dies.

mod common;

use std::time::Duration;

use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use vmlet::agent::libvirt::RunState;
use vmlet::api::{VirtualMachine, VirtualMachineImage};

use common::node::*;

#[tokio::test]
async fn lifecycle_create_stop_start_crash_restart_delete() {
    lifecycle(Backend::TestDriver, "life").await;
}

/// The same life on vmlet's in-memory libvirt: the agent's reconcile needs no libvirt.
#[tokio::test]
async fn lifecycle_on_the_in_memory_libvirt() {
    lifecycle(Backend::Fake, "fakelife").await;
}

async fn lifecycle(backend: Backend, prefix: &str) {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, &format!("agent-{prefix}")).await;
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    let fake = matches!(backend, Backend::Fake);
    let mut node = Node::build_on(backend, prefix, None, |_| {}).await;

    let spec = json!({
        "memory": "64Mi",
        "cpu": {"cores": 2},
        "disks": [
            {"name": "data", "blank": {"size": "16Mi"}},
            {"name": "seed", "cloudInit": {"userData": "#cloud-config\nhostname: x\n"}}
        ],
        "networks": [{"name": "default", "user": {}}]
    });
    let uid = create_vm(&api, "vm1", spec, &node.name).await;

    // Created and running, with its files on the node.
    let vm = wait_phase(&api, "vm1", "Running", 30).await;
    assert_eq!(
        condition(&vm, vmlet::api::conditions::Type::Ready).status,
        "True"
    );
    assert_eq!(
        condition(&vm, vmlet::api::conditions::Type::DomainDefined).status,
        "True"
    );
    let st = vm.status.as_ref().unwrap();
    assert_eq!(st.domain_uuid.as_deref(), Some(uid.as_str()));
    assert_eq!(st.vcpus, Some(2));
    assert_eq!(st.memory.as_deref(), Some("64Mi"));
    assert_eq!(st.observed_generation, vm.metadata.generation);
    assert!(
        st.interfaces[0]
            .mac
            .as_deref()
            .unwrap()
            .starts_with("52:54:00:")
    );
    assert!(
        vm.metadata
            .finalizers
            .as_ref()
            .unwrap()
            .contains(&vmlet::api::DOMAIN_FINALIZER.to_string())
    );
    let vm_dir = node.state_dir().join("vms").join(&uid);
    assert!(vm_dir.join("disk-data.qcow2").exists());
    assert!(vm_dir.join("disk-seed.iso").exists());
    assert_eq!(node.domains_for(&uid).await, 1);
    let dom = node.lv.lookup(&uid).await.unwrap().unwrap();
    assert_eq!(dom.name, format!("vmlet_{ns}_vm1"));
    assert_eq!(dom.state, RunState::Running);

    // Nothing changes while nothing changes: no status churn.
    let rv = api.get("vm1").await.unwrap().metadata.resource_version;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        api.get("vm1").await.unwrap().metadata.resource_version,
        rv,
        "status rewritten with nothing changed"
    );

    // Halted stops it (ACPI; the test driver powers off at once).
    patch_spec(&api, "vm1", json!({"runStrategy": "Halted"})).await;
    wait_phase(&api, "vm1", "Stopped", 30).await;
    assert_eq!(
        node.lv.lookup(&uid).await.unwrap().unwrap().state,
        RunState::ShutOff
    );

    // Always starts it again.
    patch_spec(&api, "vm1", json!({"runStrategy": "Always"})).await;
    let vm = wait_phase(&api, "vm1", "Running", 30).await;
    let restarts = vm.status.as_ref().unwrap().restart_count.unwrap_or(0);

    // Destroyed from outside (a `virsh destroy`): Always restarts it, and counts it.
    node.lv.destroy(&uid).await.unwrap();
    let restarted = common::wait_for(Duration::from_secs(20), || async {
        let vm = api.get("vm1").await.ok()?;
        let s = vm.status?;
        (s.phase == Some(vmlet::api::vm::Phase::Running) && s.restart_count.unwrap_or(0) > restarts)
            .then_some(())
    })
    .await;
    assert!(
        restarted.is_some(),
        "not restarted after an outside destroy: {:?}",
        api.get("vm1").await.unwrap().status
    );
    assert_eq!(
        node.lv.lookup(&uid).await.unwrap().unwrap().state,
        RunState::Running
    );

    // QEMU crashes (the fake can say so; the test driver cannot): restarted, counted.
    if fake {
        let restarts = api.get("vm1").await.unwrap().status.unwrap().restart_count;
        vmlet::agent::libvirt::Fake::open(&node.args.libvirt_uri)
            .set_state(&uid, RunState::Crashed);
        let restarted = common::wait_for(Duration::from_secs(20), || async {
            let s = api.get("vm1").await.ok()?.status?;
            (s.phase == Some(vmlet::api::vm::Phase::Running) && s.restart_count > restarts)
                .then_some(())
        })
        .await;
        assert!(
            restarted.is_some(),
            "not restarted after a crash: {:?}",
            api.get("vm1").await.unwrap().status
        );
    }

    // The agent dies; the spec changes meanwhile; a new agent adopts the running domain by
    // uuid (no second copy) and says a restart is needed instead of rebooting it.
    node.crash_agent();
    patch_spec(&api, "vm1", json!({"memory": "128Mi"})).await;
    node.start_agent();
    let adopted = common::wait_for(Duration::from_secs(30), || async {
        let vm = api.get("vm1").await.ok()?;
        let s = vm.status.as_ref()?;
        let c = vmlet::api::conditions::find(
            &s.conditions,
            vmlet::api::conditions::Type::RestartRequired,
        )?;
        (c.status == "True" && s.observed_generation == vm.metadata.generation).then_some(())
    })
    .await;
    assert!(
        adopted.is_some(),
        "{:?}",
        api.get("vm1").await.unwrap().status
    );
    assert_eq!(node.domains_for(&uid).await, 1);
    assert_eq!(
        node.lv.lookup(&uid).await.unwrap().unwrap().state,
        RunState::Running,
        "rebooted behind the user's back"
    );

    // Deletion removes the domain and the VM's files, then the finalizer.
    api.delete("vm1", &DeleteParams::default()).await.unwrap();
    let gone = common::wait_for(Duration::from_secs(30), || async {
        api.get_opt("vm1").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "VM not deleted: {:?}",
        api.get("vm1").await.ok().map(|v| v.metadata.finalizers)
    );
    assert_eq!(node.domains_for(&uid).await, 0);
    assert!(!vm_dir.exists(), "per-VM files left behind");

    common::delete_vms_and_namespace(&client, &ns).await;
    node.forget().await;
}

#[tokio::test]
async fn delete_while_stopping_and_once_strategy() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "agent-del").await;
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    let node = Node::new("del").await;

    let uid = create_vm(&api, "a", json!({"memory": "32Mi"}), &node.name).await;
    wait_phase(&api, "a", "Running", 30).await;
    patch_spec(&api, "a", json!({"runStrategy": "Halted"})).await;
    api.delete("a", &DeleteParams::default()).await.unwrap();
    let gone = common::wait_for(Duration::from_secs(30), || async {
        api.get_opt("a").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(gone.is_some());
    assert_eq!(node.domains_for(&uid).await, 0);

    // Once: runs, and after the guest stops it stays stopped.
    let uid = create_vm(
        &api,
        "once",
        json!({"memory": "32Mi", "runStrategy": "Once"}),
        &node.name,
    )
    .await;
    wait_phase(&api, "once", "Running", 30).await;
    node.lv.shutdown(&uid).await.unwrap();
    wait_phase(&api, "once", "Stopped", 30).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        node.lv.lookup(&uid).await.unwrap().unwrap().state,
        RunState::ShutOff,
        "Once ran twice"
    );

    // Halted from the start: defined, never started.
    let uid = create_vm(
        &api,
        "halted",
        json!({"memory": "32Mi", "runStrategy": "Halted"}),
        &node.name,
    )
    .await;
    let vm = wait_phase(&api, "halted", "Stopped", 30).await;
    assert_eq!(
        condition(&vm, vmlet::api::conditions::Type::DomainDefined).status,
        "True"
    );
    assert_eq!(
        node.lv.lookup(&uid).await.unwrap().unwrap().state,
        RunState::ShutOff
    );

    common::delete_vms_and_namespace(&client, &ns).await;
    node.forget().await;
}

#[tokio::test]
async fn a_vm_bound_elsewhere_is_not_touched() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "agent-scope").await;
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    let node = Node::new("scope").await;
    let uid = create_vm(&api, "other", json!({"memory": "32Mi"}), "some-other-node").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(node.domains_for(&uid).await, 0);
    let vm = api.get("other").await.unwrap();
    let agent_wrote = vm
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .any(|f| f.manager.as_deref() == Some(vmlet::agent::FIELD_MANAGER));
    assert!(!agent_wrote, "agent wrote status of a VM bound elsewhere");
    // Nobody wrote the phase: the schema's default says Pending.
    assert_eq!(
        vm.status.unwrap().phase,
        Some(vmlet::api::vm::Phase::Pending)
    );
    common::delete_vms_and_namespace(&client, &ns).await;
    node.forget().await;
}

#[tokio::test]
async fn bad_images_keep_the_vm_off_and_say_why() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "agent-bad").await;
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    let images: Api<VirtualMachineImage> = Api::namespaced(client.clone(), &ns);
    let node = Node::new("bad").await;

    let url = common::serve_bytes(b"not the kernel you are looking for".to_vec(), "image").await;
    let secret = node.dir.path().join("secret");
    std::fs::write(&secret, "host secret").unwrap();
    std::os::unix::fs::symlink(&secret, node.image_root().join("escape")).unwrap();
    let wrong_sha = "ab".repeat(32);
    let imgs = [
        (
            "badsum",
            json!({"format": "kernel", "source": {"http": {"url": url, "sha256": wrong_sha}}}),
        ),
        (
            "escape",
            json!({"format": "kernel", "source": {"hostPath": {"path": node.image_root().join("escape")}}}),
        ),
        (
            "outside",
            json!({"format": "kernel", "source": {"hostPath": {"path": secret}}}),
        ),
    ];
    for (name, spec) in imgs {
        let img = VirtualMachineImage::new(name, serde_json::from_value(spec).unwrap());
        images.create(&PostParams::default(), &img).await.unwrap();
    }
    let cases = [
        (
            "vm-badsum",
            "badsum",
            "ImageChecksumMismatch",
            "checksum mismatch",
        ),
        (
            "vm-escape",
            "escape",
            "ImagePathRefused",
            "outside the image root",
        ),
        (
            "vm-outside",
            "outside",
            "ImagePathRefused",
            "outside the image root",
        ),
        (
            "vm-missing",
            "nonexistent",
            "ImageNotFound",
            "does not exist",
        ),
    ];
    let mut uids = Vec::new();
    for (vm, image, _, _) in cases {
        let spec = json!({"memory": "32Mi", "boot": {"kernel": {"name": image}, "cmdline": "console=ttyS0"}});
        uids.push(create_vm(&api, vm, spec, &node.name).await);
    }
    for ((vm, _, reason, text), uid) in cases.iter().zip(&uids) {
        let got = common::wait_for(Duration::from_secs(30), || async {
            let v = api.get(vm).await.ok()?;
            let c = vmlet::api::conditions::find(
                &v.status.as_ref()?.conditions,
                vmlet::api::conditions::Type::Ready,
            )?
            .clone();
            (c.reason == *reason).then_some(c)
        })
        .await
        .unwrap_or_else(|| panic!("{vm}: no {reason}: {:?}", futures_status(&api, vm)));
        assert_eq!(got.status, "False");
        assert!(got.message.contains(text), "{vm}: {}", got.message);
        assert_eq!(node.domains_for(uid).await, 0, "{vm}: a domain was defined");
        assert!(
            !node.state_dir().join("vms").join(uid).exists(),
            "{vm}: files were created"
        );
    }
    // A qcow2 base whose backing file points at a host path, and the same file declared
    // raw (which would hand the guest the qcow2 header and its backing reference).
    let evil = node.image_root().join("evil.qcow2");
    common::qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        secret.to_str().unwrap(),
        evil.to_str().unwrap(),
        "1M",
    ]);
    for (name, format, reason, text) in [
        (
            "backed",
            "qcow2",
            "ImageHasBackingFile",
            "has a backing file",
        ),
        ("disguised", "raw", "ImageFormatMismatch", "is qcow2"),
    ] {
        let spec = json!({"format": format, "source": {"hostPath": {"path": evil}}});
        let img = VirtualMachineImage::new(name, serde_json::from_value(spec).unwrap());
        images.create(&PostParams::default(), &img).await.unwrap();
        let vm = format!("vm-{name}");
        let spec = json!({"memory": "32Mi", "disks": [{"name": "root", "image": {"name": name}}]});
        let uid = create_vm(&api, &vm, spec, &node.name).await;
        let got = common::wait_for(Duration::from_secs(30), || async {
            let v = api.get(&vm).await.ok()?;
            let c = vmlet::api::conditions::find(
                &v.status.as_ref()?.conditions,
                vmlet::api::conditions::Type::Ready,
            )?
            .clone();
            (c.reason == reason).then_some(c)
        })
        .await
        .unwrap_or_else(|| panic!("{vm}: no {reason}"));
        assert!(got.message.contains(text), "{vm}: {}", got.message);
        assert_eq!(node.domains_for(&uid).await, 0);
        assert!(!node.state_dir().join("vms").join(&uid).exists());
    }
    // Nothing from the failed download is left in the cache.
    let cached: Vec<_> = std::fs::read_dir(node.state_dir().join("images"))
        .map(|d| d.count())
        .into_iter()
        .collect();
    assert!(
        cached.iter().all(|&n| n == 0),
        "partial download left in the cache"
    );
    common::delete_vms_and_namespace(&client, &ns).await;
    node.forget().await;
}

fn futures_status(api: &Api<VirtualMachine>, name: &str) -> String {
    let api = api.clone();
    let name = name.to_string();
    std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async { format!("{:?}", api.get(&name).await.ok().and_then(|v| v.status)) })
    })
    .join()
    .unwrap()
}

#[tokio::test]
async fn hypervisor_object_and_lease_report_the_node() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let node = Node::new("hv").await;
    let hvs: Api<vmlet::api::Hypervisor> = Api::all(client.clone());
    let hv = common::wait_for(Duration::from_secs(30), || async {
        let hv = hvs.get_opt(&node.name).await.ok()??;
        hv.status.as_ref()?.capacity.as_ref()?;
        Some(hv)
    })
    .await
    .expect("Hypervisor reported");
    let st = hv.status.unwrap();
    // test:///default reports 16 CPUs and 8 GiB (in its built-in node).
    let cap = st.capacity.unwrap();
    assert!(cap.cpu > 0);
    let alloc = st.allocatable.unwrap();
    assert_eq!(alloc.cpu, cap.cpu * 4, "default cpu overcommit 4.0");
    assert_eq!(
        alloc.memory, cap.memory,
        "memory overcommit 1.0, nothing reserved"
    );
    assert_eq!(st.accel.as_deref(), Some("tcg"));
    assert!(vmlet::api::conditions::is_true(
        &st.conditions,
        vmlet::api::conditions::Type::Ready
    ));
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "kube-node-lease");
    let lease = leases
        .get(&format!("vmlet-{}", node.name))
        .await
        .expect("heartbeat lease");
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some(node.name.as_str())
    );
    node.forget().await;
}

#[tokio::test]
async fn orphaned_domains_are_removed_after_the_grace_period() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "agent-orphan").await;
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    let mut node = Node::new("orphan").await;
    let uid = create_vm(
        &api,
        "gone",
        json!({"memory": "32Mi", "disks": [{"name": "d", "blank": {"size": "1Mi"}}]}),
        &node.name,
    )
    .await;
    wait_phase(&api, "gone", "Running", 30).await;
    let vm_dir = node.state_dir().join("vms").join(&uid);
    assert!(vm_dir.exists());

    // The VM disappears while its agent is down (finalizer removed by hand).
    node.crash_agent();
    let patch = json!({"metadata": {"finalizers": null}});
    api.patch(
        "gone",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .unwrap();
    api.delete("gone", &DeleteParams::default()).await.unwrap();
    assert_eq!(node.domains_for(&uid).await, 1);

    // The restarted agent removes the domain and its files once the grace period passed.
    node.start_agent();
    let removed = common::wait_for(Duration::from_secs(30), || async {
        (node.domains_for(&uid).await == 0).then_some(())
    })
    .await;
    assert!(removed.is_some(), "orphaned domain kept");
    assert!(!vm_dir.exists(), "orphan's files kept");
    common::delete_vms_and_namespace(&client, &ns).await;
    node.forget().await;
}
