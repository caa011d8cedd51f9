//! Volumes with real QEMU (TCG here) on libvirtd, an in-process agent and controller: the
//! tiny guest writes a marker to its volume (`vmlet.disk=vda vmlet.write=M` on its kernel
//! command line) or prints what the volume starts with, and its heartbeat says the disk's
//! size as the guest sees it. Checked: a marker outlives its VM; one VM writes a volume
//! at a time; a volume grows while its VM runs and the guest sees it without a reboot; a
//! snapshot taken while the VM runs, overwritten, restored, brings the marker back; a
//! clone of the snapshot boots with it; a volume in use is deleted only once its VM is;
//! snapshot and restore of a 1 GiB volume full of data are timed.
//!
//! Needs `hack/libvirt.sh up` (make test runs it).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use vmlet::agent::libvirt::Connection;
use vmlet::api::image::ImagePhase;
use vmlet::api::volume::{
    RestorePhase, VirtualMachineRestore, VirtualMachineSnapshot, VirtualMachineVolume, VolumePhase,
};
use vmlet::api::{VirtualMachine, VirtualMachineImage, conditions};

const LABEL: &str = "vmlet.dev/volumes-test";

struct Lab {
    client: kube::Client,
    ns: String,
    node: String,
    state: PathBuf,
    images: PathBuf,
    _dir: tempfile::TempDir,
}

/// Removes test nodes an earlier, interrupted run of these tests left: silent
/// hypervisors to this run's controllers, enough of them trip the mass-silence guard.
async fn forget_stale_nodes(client: &kube::Client) {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let me = std::process::id().to_string();
    let stale = nodes
        .list(&kube::api::ListParams::default().labels(LABEL))
        .await
        .unwrap();
    for n in stale.items.iter().filter_map(|n| n.metadata.name.clone()) {
        if !n.contains(&me) {
            common::forget_node(client, &n).await;
        }
    }
}

/// A node of its own (named for `tag`) with an in-process agent and controller.
async fn lab(tag: &str) -> Lab {
    vmlet::telemetry::init(Default::default());
    let client = common::client().await;
    common::ensure_crds(&client).await;
    forget_stale_nodes(&client).await;
    let ns = common::namespace(&client, tag).await;
    let dir = common::qemu_tempdir();
    let state = dir.path().join("state");
    let images = dir.path().join("images");
    let node = format!("{tag}-{}", std::process::id());
    common::node_with_address(
        &client,
        &node,
        json!({"vmlet.dev/hypervisor": "true", LABEL: &node}),
        "127.0.0.1",
    )
    .await;
    let lv = Arc::new(
        Connection::open("qemu:///system")
            .await
            .expect("libvirtd (hack/libvirt.sh up)"),
    );
    let args = vmlet::agent::Args {
        accel: vmlet::agent::accel::AccelChoice::Auto,
        orphan_grace_seconds: 30,
        heartbeat_seconds: 5,
        fence_after_seconds: 15,
        ..common::agent_args(&node, "qemu:///system", dir.path())
    };
    tokio::spawn(vmlet::agent::run_with(args, lv, std::future::pending()));
    tokio::spawn(vmlet::controller::run_until(
        common::controller_args(&format!("{node}-test"), &ns),
        std::future::pending(),
    ));
    common::tiny_guest_images(&client, &ns).await;
    Lab {
        client,
        ns,
        node,
        state,
        images,
        _dir: dir,
    }
}

impl Lab {
    fn vms(&self) -> Api<VirtualMachine> {
        Api::namespaced(self.client.clone(), &self.ns)
    }
    fn volumes(&self) -> Api<VirtualMachineVolume> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn volume(&self, name: &str, spec: serde_json::Value) {
        let v = VirtualMachineVolume::new(name, serde_json::from_value(spec).unwrap());
        self.volumes()
            .create(&PostParams::default(), &v)
            .await
            .unwrap();
    }

    /// A VM on volume `vol` whose guest writes `write` to it first, if given.
    async fn vm(&self, name: &str, vol: &str, write: Option<&str>) -> String {
        self.vm_on(name, json!({"volume": {"name": vol}}), write)
            .await
    }

    /// A VM whose one disk, `data`, is `disk` (its source).
    async fn vm_on(&self, name: &str, disk: serde_json::Value, write: Option<&str>) -> String {
        let mut data = json!({"name": "data"});
        data.as_object_mut()
            .unwrap()
            .extend(disk.as_object().unwrap().clone());
        let spec = json!({
            "runStrategy": "Always",
            "memory": "128Mi",
            "nodeSelector": {LABEL: self.node},
            "boot": {"kernel": {"name": "tiny-kernel"}, "initrd": {"name": "tiny-initrd"},
                     "cmdline": cmdline(write)},
            "disks": [data],
        });
        let vm = VirtualMachine::new(name, serde_json::from_value(spec).unwrap());
        let vm = self
            .vms()
            .create(&PostParams::default(), &vm)
            .await
            .unwrap();
        vm.metadata.uid.unwrap()
    }

    fn console(&self, uid: &str) -> PathBuf {
        self.state.join("vms").join(uid).join("console.log")
    }

    async fn patch_spec(&self, name: &str, spec: serde_json::Value) {
        self.vms()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": spec})),
            )
            .await
            .unwrap();
    }

    async fn wait_phase(&self, name: &str, phase: &str) {
        let ok = common::wait_for(Duration::from_secs(120), || async {
            let vm = self.vms().get(name).await.ok()?;
            (serde_json::to_value(vm.status?.phase?).ok()? == phase).then_some(())
        })
        .await;
        assert!(
            ok.is_some(),
            "{name} never {phase}: {:?}",
            self.vms().get(name).await.ok().and_then(|v| v.status)
        );
    }
}

/// Creates VM `name` from `spec`; its uid.
async fn create(api: &Api<VirtualMachine>, name: &str, spec: serde_json::Value) -> String {
    let vm = VirtualMachine::new(name, serde_json::from_value(spec).unwrap());
    let vm = api.create(&PostParams::default(), &vm).await.unwrap();
    vm.metadata.uid.unwrap()
}

fn cmdline(write: Option<&str>) -> String {
    let mut c = "console=ttyS0 panic=-1 vmlet.disk=vda".to_string();
    if let Some(m) = write {
        c.push_str(&format!(" vmlet.write={m}"));
    }
    c
}

fn read_from(path: &Path, from: usize) -> String {
    let b = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(&b[from.min(b.len())..]).into_owned()
}

fn len(path: &Path) -> usize {
    std::fs::metadata(path)
        .map(|m| m.len() as usize)
        .unwrap_or(0)
}

/// Waits until the console, from byte `from` on, holds `needle`.
async fn console_says(path: &Path, from: usize, needle: &str, secs: u64) {
    let seen = common::wait_for(Duration::from_secs(secs), || async {
        read_from(path, from).contains(needle).then_some(())
    })
    .await;
    assert!(
        seen.is_some(),
        "console never said {needle:?}; it said: {}",
        read_from(path, from)
            .lines()
            .filter(|l| l.contains("vmlet-"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
}

async fn snapshot(lab: &Lab, name: &str, vm: &str) -> Duration {
    let api: Api<VirtualMachineSnapshot> = Api::namespaced(lab.client.clone(), &lab.ns);
    let t = Instant::now();
    let s =
        VirtualMachineSnapshot::new(name, serde_json::from_value(json!({"vmName": vm})).unwrap());
    api.create(&PostParams::default(), &s).await.unwrap();
    let ready = common::wait_for(Duration::from_secs(300), || async {
        let st = api.get(name).await.ok()?.status?;
        assert_ne!(
            st.phase,
            Some(vmlet::api::volume::SnapshotPhase::Failed),
            "{:?}",
            st.message
        );
        (st.ready_to_use == Some(true)).then_some(())
    })
    .await;
    assert!(ready.is_some(), "{:?}", api.get(name).await.unwrap().status);
    t.elapsed()
}

async fn restore(lab: &Lab, name: &str, vm: &str, snap: &str) -> Duration {
    let api: Api<VirtualMachineRestore> = Api::namespaced(lab.client.clone(), &lab.ns);
    let t = Instant::now();
    let r = VirtualMachineRestore::new(
        name,
        serde_json::from_value(json!({"vmName": vm, "snapshotName": snap})).unwrap(),
    );
    api.create(&PostParams::default(), &r).await.unwrap();
    let done = common::wait_for(Duration::from_secs(300), || async {
        let st = api.get(name).await.ok()?.status?;
        assert_ne!(st.phase, Some(RestorePhase::Failed), "{:?}", st.message);
        (st.phase == Some(RestorePhase::Succeeded)).then_some(())
    })
    .await;
    assert!(done.is_some(), "{:?}", api.get(name).await.unwrap().status);
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_outlive_vms_grow_snapshot_restore_and_clone() {
    let lab = lab("volumes").await;
    lab.volume("data", json!({"size": "64Mi"})).await;

    // The first VM writes its marker; the volume is made on its node and claimed by it.
    let uid = lab.vm("writer", "data", Some("first")).await;
    let con = lab.console(&uid);
    console_says(&con, 0, "vmlet-disk-wrote=first", 120).await;
    let v = lab.volumes().get("data").await.unwrap();
    let st = v.status.clone().unwrap();
    assert_eq!(st.phase, Some(VolumePhase::Ready), "{st:?}");
    assert_eq!(st.node.as_deref(), Some(lab.node.as_str()));
    assert_eq!(st.user.as_deref(), Some("writer"));
    assert_eq!(st.allocated_bytes, Some(64 << 20));

    // A second VM that wants it is refused, and told who holds it.
    lab.vm("intruder", "data", None).await;
    let refused = common::wait_for(Duration::from_secs(30), || async {
        let vm = lab.vms().get("intruder").await.ok()?;
        let c = conditions::find(&vm.status?.conditions, conditions::Type::Scheduled)?.clone();
        (c.status == "False" && c.reason == "VolumeInUse").then_some(c.message)
    })
    .await
    .expect("the intruder was not refused");
    assert!(refused.contains("writer"), "{refused}");
    lab.vms()
        .delete("intruder", &DeleteParams::default())
        .await
        .unwrap();

    // It grows while the VM runs: the guest sees 96 MiB without a reboot.
    let at = len(&con);
    lab.volumes()
        .patch(
            "data",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": "96Mi"}})),
        )
        .await
        .unwrap();
    console_says(
        &con,
        at,
        &format!("disk-sectors={}", (96u64 << 20) / 512),
        60,
    )
    .await;
    assert!(
        !read_from(&con, at).contains("vmlet-guest-up"),
        "the guest rebooted"
    );
    // Shrinking is refused by the API server.
    let shrink = lab
        .volumes()
        .patch(
            "data",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": "32Mi"}})),
        )
        .await;
    assert!(
        format!("{shrink:?}").contains("never shrinks"),
        "{shrink:?}"
    );

    // A snapshot while it runs (crash-consistent: no guest agent); then the guest
    // overwrites the marker.
    let took = snapshot(&lab, "snap1", "writer").await;
    let snaps: Api<VirtualMachineSnapshot> = Api::namespaced(lab.client.clone(), &lab.ns);
    assert_eq!(
        snaps
            .get("snap1")
            .await
            .unwrap()
            .status
            .unwrap()
            .indications,
        vec![
            vmlet::api::volume::SnapshotIndication::Online,
            vmlet::api::volume::SnapshotIndication::NoGuestAgent
        ]
    );
    println!(
        "snapshot of a running 96 MiB volume: {:.2} s",
        took.as_secs_f64()
    );
    let at = len(&con);
    lab.patch_spec(
        "writer",
        json!({"boot": {"cmdline": cmdline(Some("second"))}}),
    )
    .await;
    lab.vms()
        .patch(
            "writer",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {vmlet::api::RESTART_ANNOTATION: "1"}}}),
            ),
        )
        .await
        .unwrap();
    console_says(&con, at, "vmlet-disk-read=vmlet-marker:second", 120).await;

    // Stopped, restored, started without writing: the first marker is back.
    lab.patch_spec(
        "writer",
        json!({"runStrategy": "Halted", "boot": {"cmdline": cmdline(None)}}),
    )
    .await;
    lab.wait_phase("writer", "Stopped").await;
    let took = restore(&lab, "back", "writer", "snap1").await;
    println!("restore of a 96 MiB volume: {:.2} s", took.as_secs_f64());
    let at = len(&con);
    lab.patch_spec("writer", json!({"runStrategy": "Always"}))
        .await;
    console_says(&con, at, "vmlet-disk-read=vmlet-marker:first", 120).await;

    // The VM goes; the volume stays with its data, released; a new VM reads the marker.
    lab.vms()
        .delete("writer", &DeleteParams::default())
        .await
        .unwrap();
    assert!(common::wait_until_empty(&lab.vms(), Duration::from_secs(60)).await);
    let released = common::wait_for(Duration::from_secs(30), || async {
        let st = lab.volumes().get("data").await.ok()?.status?;
        st.user.is_none().then_some(st)
    })
    .await
    .expect("the claim outlived its VM");
    assert_eq!(released.phase, Some(VolumePhase::Ready));
    let uid = lab.vm("reader", "data", None).await;
    console_says(
        &lab.console(&uid),
        0,
        "vmlet-disk-read=vmlet-marker:first",
        120,
    )
    .await;

    // A clone of the snapshot boots with the marker too.
    lab.volume(
        "copy",
        json!({"size": "64Mi", "source": {"snapshot": {"name": "snap1", "disk": "data"}}}),
    )
    .await;
    let uid = lab.vm("cloned", "copy", None).await;
    console_says(
        &lab.console(&uid),
        0,
        "vmlet-disk-read=vmlet-marker:first",
        120,
    )
    .await;
    let copy = lab.volumes().get("copy").await.unwrap().status.unwrap();
    assert_eq!(
        copy.allocated_bytes,
        Some(96 << 20),
        "a clone keeps its source's size"
    );

    // A volume in use is deleted only once its VM is; its file goes with it.
    let copy_file = lab.state.join("volumes").join(format!(
        "{}.qcow2",
        lab.volumes()
            .get("copy")
            .await
            .unwrap()
            .metadata
            .uid
            .unwrap()
    ));
    assert!(copy_file.exists());
    lab.volumes()
        .delete("copy", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        lab.volumes().get_opt("copy").await.unwrap().is_some(),
        "deleted while in use"
    );
    lab.vms()
        .delete("cloned", &DeleteParams::default())
        .await
        .unwrap();
    let gone = common::wait_for(Duration::from_secs(60), || async {
        lab.volumes()
            .get_opt("copy")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "{:?}",
        lab.volumes().get("copy").await.ok().map(|v| v.status)
    );
    assert!(!copy_file.exists(), "the deleted volume's file stayed");

    timed_gib(&lab).await;
    common::delete_vms_and_namespace(&lab.client, &lab.ns).await;
    common::forget_node(&lab.client, &lab.node).await;
}

/// Waits until image `name` is published and Ready; where its copy is.
async fn published(lab: &Lab, name: &str) -> vmlet::api::image::PublishedImage {
    let api: Api<VirtualMachineImage> = Api::namespaced(lab.client.clone(), &lab.ns);
    let p = common::wait_for(Duration::from_secs(120), || async {
        let st = api.get(name).await.ok()?.status?;
        (st.phase == Some(ImagePhase::Ready)).then_some(st.published?)
    })
    .await;
    match p {
        Some(p) => p,
        None => panic!(
            "{name} never published: {:?}",
            api.get(name).await.ok().and_then(|i| i.status)
        ),
    }
}

async fn gone<K>(api: &Api<K>, name: &str) -> bool
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    common::wait_for(Duration::from_secs(60), || async {
        api.get_opt(name).await.ok()?.is_none().then_some(())
    })
    .await
    .is_some()
}

/// A configured disk becomes a template: published from a snapshot while its VM runs,
/// and from the volume itself once no VM uses it (until then it waits, saying why). VMs
/// boot from both with the marker; the copies outlive their sources; a deleted image
/// keeps its copy while a VM's overlay reads it, then the copy goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_disks_publish_as_templates() {
    let lab = lab("publish").await;
    let images: Api<VirtualMachineImage> = Api::namespaced(lab.client.clone(), &lab.ns);
    let image = |name: &str, source: serde_json::Value| {
        let spec = json!({"format": "qcow2", "source": source});
        VirtualMachineImage::new(name, serde_json::from_value(spec).unwrap())
    };
    lab.volume("golden", json!({"size": "64Mi"})).await;
    let uid = lab.vm("maker", "golden", Some("golden")).await;
    console_says(&lab.console(&uid), 0, "vmlet-disk-wrote=golden", 120).await;

    let pp = PostParams::default();
    images
        .create(
            &pp,
            &image("from-vol", json!({"volume": {"name": "golden"}})),
        )
        .await
        .unwrap();
    let waiting = common::wait_for(Duration::from_secs(30), || async {
        let st = images.get("from-vol").await.ok()?.status?;
        let n = st.nodes.into_iter().find(|n| n.node == lab.node)?;
        (n.reason.as_deref() == Some("ImageSourceInUse")).then_some(n.message?)
    })
    .await
    .expect("publishing a volume in use did not wait");
    assert!(waiting.contains("maker"), "{waiting}");

    let t = Instant::now();
    snapshot(&lab, "snap", "maker").await;
    images
        .create(
            &pp,
            &image(
                "from-snap",
                json!({"snapshot": {"name": "snap", "disk": "data"}}),
            ),
        )
        .await
        .unwrap();
    let p = published(&lab, "from-snap").await;
    println!(
        "snapshot and publish of a running 64 MiB volume: {:.2} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(
        (p.storage.as_str(), p.node.as_str()),
        ("local", lab.node.as_str())
    );
    let snaps: Api<VirtualMachineSnapshot> = Api::namespaced(lab.client.clone(), &lab.ns);
    snaps
        .delete("snap", &DeleteParams::default())
        .await
        .unwrap();
    assert!(gone(&snaps, "snap").await, "the snapshot stayed");
    let uid = lab
        .vm_on("t1", json!({"image": {"name": "from-snap"}}), None)
        .await;
    console_says(
        &lab.console(&uid),
        0,
        "vmlet-disk-read=vmlet-marker:golden",
        120,
    )
    .await;

    lab.vms()
        .delete("maker", &DeleteParams::default())
        .await
        .unwrap();
    assert!(gone(&lab.vms(), "maker").await);
    published(&lab, "from-vol").await;
    lab.volumes()
        .delete("golden", &DeleteParams::default())
        .await
        .unwrap();
    assert!(gone(&lab.volumes(), "golden").await, "the volume stayed");
    lab.volume(
        "fresh",
        json!({"size": "64Mi", "source": {"image": {"name": "from-vol"}}}),
    )
    .await;
    let uid = lab.vm("t2", "fresh", None).await;
    console_says(
        &lab.console(&uid),
        0,
        "vmlet-disk-read=vmlet-marker:golden",
        120,
    )
    .await;

    let snap_uid = images.get("from-snap").await.unwrap().metadata.uid.unwrap();
    let copy = lab
        .state
        .join("published")
        .join(format!("{snap_uid}.qcow2"));
    assert!(copy.exists(), "{}", copy.display());
    images
        .delete("from-snap", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        images.get_opt("from-snap").await.unwrap().is_some(),
        "deleted while in use"
    );
    assert!(copy.exists(), "the copy went while a VM reads it");
    lab.vms()
        .delete("t1", &DeleteParams::default())
        .await
        .unwrap();
    assert!(gone(&images, "from-snap").await, "the image stayed");
    assert!(!copy.exists(), "the deleted image's copy stayed");

    common::delete_vms_and_namespace(&lab.client, &lab.ns).await;
    common::forget_node(&lab.client, &lab.node).await;
}

/// A snapshot of a running VM with a guest agent freezes its filesystems for the instant
/// of the copy: the tiny guest mounts an ext2 filesystem on its volume and runs Debian's
/// qemu-ga. A VM whose channel has no agent behind it is still copied, crash-consistent,
/// and its snapshot says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_freeze_the_guests_filesystems_through_its_agent() {
    let lab = lab("quiesce").await;
    let snaps: Api<VirtualMachineSnapshot> = Api::namespaced(lab.client.clone(), &lab.ns);
    let mut uids = Vec::new();
    for (name, cmdline) in [
        ("agent", "console=ttyS0 panic=-1 vmlet.fs=vda vmlet.qga=1"),
        ("mute", "console=ttyS0 panic=-1 vmlet.fs=vda"),
    ] {
        let vol = format!("{name}-fs");
        lab.volume(&vol, json!({"size": "64Mi"})).await;
        let spec = json!({
            "runStrategy": "Always",
            "memory": "256Mi",
            "guestAgent": true,
            "nodeSelector": {LABEL: lab.node},
            "boot": {"kernel": {"name": "tiny-kernel"}, "initrd": {"name": "tiny-initrd"},
                     "cmdline": cmdline},
            "disks": [{"name": "data", "volume": {"name": vol}}],
        });
        uids.push(create(&lab.vms(), name, spec).await);
    }
    console_says(&lab.console(&uids[0]), 0, "vmlet-qga-up", 120).await;
    console_says(&lab.console(&uids[0]), 0, "vmlet-fs-mounted=vda", 120).await;
    console_says(&lab.console(&uids[1]), 0, "vmlet-fs-mounted=vda", 120).await;
    // The agent opens its port a moment after it says it started.
    tokio::time::sleep(Duration::from_secs(2)).await;

    use vmlet::api::volume::SnapshotIndication::*;
    let took = snapshot(&lab, "frozen", "agent").await;
    let st = snaps.get("frozen").await.unwrap().status.unwrap();
    println!(
        "quiesced snapshot: {:.2} s ({:?})",
        took.as_secs_f64(),
        st.message
    );
    assert_eq!(st.indications, vec![Online, GuestAgent], "{:?}", st.message);
    assert!(
        st.message
            .as_deref()
            .is_some_and(|m| m.contains("1 filesystem(s) frozen")),
        "{:?}",
        st.message
    );
    // The guest runs on, thawed: it still writes its heartbeat.
    let at = len(&lab.console(&uids[0]));
    console_says(&lab.console(&uids[0]), at, "vmlet-guest-heartbeat", 30).await;

    snapshot(&lab, "crash", "mute").await;
    let st = snaps.get("crash").await.unwrap().status.unwrap();
    assert_eq!(
        st.indications,
        vec![Online, QuiesceFailed],
        "{:?}",
        st.message
    );
    assert!(
        st.message
            .as_deref()
            .is_some_and(|m| m.contains("not quiesced")),
        "{:?}",
        st.message
    );

    common::delete_vms_and_namespace(&lab.client, &lab.ns).await;
    common::forget_node(&lab.client, &lab.node).await;
}

/// Snapshot (running) and restore (stopped) of a 1 GiB volume full of random data.
async fn timed_gib(lab: &Lab) {
    let raw = lab.images.join("gib.raw");
    let status = std::process::Command::new("head")
        .args(["-c", "1073741824", "/dev/urandom"])
        .stdout(std::fs::File::create(&raw).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    let images: Api<vmlet::api::VirtualMachineImage> = Api::namespaced(lab.client.clone(), &lab.ns);
    let img = vmlet::api::VirtualMachineImage::new(
        "gib",
        serde_json::from_value(json!({"format": "raw", "source": {"hostPath": {"path": raw}}}))
            .unwrap(),
    );
    images.create(&PostParams::default(), &img).await.unwrap();
    lab.volume(
        "big",
        json!({"size": "1Gi", "source": {"image": {"name": "gib"}}}),
    )
    .await;
    let uid = lab.vm("big", "big", None).await;
    console_says(&lab.console(&uid), 0, "vmlet-disk-read=", 300).await;
    let snap = snapshot(lab, "big-snap", "big").await;
    lab.patch_spec("big", json!({"runStrategy": "Halted"}))
        .await;
    lab.wait_phase("big", "Stopped").await;
    let back = restore(lab, "big-back", "big", "big-snap").await;
    println!(
        "1 GiB volume of random data: snapshot (VM running) {:.2} s, restore (VM stopped) {:.2} s",
        snap.as_secs_f64(),
        back.as_secs_f64()
    );
}

/// A VM whose only disk is a volume on a storage pool (one directory both libvirt hosts
/// of hack/hosts.sh see) writes its marker on host 1; host 1's agent is cut off from the
/// API server, fences (destroys its domain), the controller declares the node lost and
/// restarts the VM on host 2, where the guest reads the marker: the data came along.
/// Then a snapshot taken on host 2 (kept on the pool) is cloned into a local volume on
/// host 1, where a VM boots from it with the marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_on_a_pooled_volume_fails_over_with_its_data() {
    use common::proxy::{Proxy, admin_kubeconfig, fast, proxied_kubeconfig};
    vmlet::telemetry::init(Default::default());
    let client = common::client().await;
    common::ensure_crds(&client).await;
    forget_stale_nodes(&client).await;
    let ns = common::namespace(&client, "pool-failover").await;
    let dir = common::qemu_tempdir();
    let pool = dir.path().join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let run = format!("pool-{}", std::process::id());
    let (_, server) = admin_kubeconfig();
    let proxy = Proxy::start(server.trim_start_matches("https://").to_string()).await;
    let cut_off = proxied_kubeconfig(dir.path(), proxy.port);
    let key = dir.path().join("peer.key");
    std::fs::write(&key, vmlet::agent::peers::nonce().unwrap().repeat(2)).unwrap();
    let mut states = Vec::new();
    for (i, uri) in ["qemu+tcp://10.77.0.1/system", "qemu+tcp://10.77.0.2/system"]
        .iter()
        .enumerate()
    {
        let lv = Connection::open(uri)
            .await
            .unwrap_or_else(|e| panic!("{uri}: {e} (run hack/hosts.sh up)"));
        let node = format!("{run}-h{}", i + 1);
        common::node_with_address(
            &client,
            &node,
            json!({"vmlet.dev/hypervisor": "true", LABEL: run}),
            &format!("10.77.0.{}", i + 1),
        )
        .await;
        let base = dir.path().join(format!("h{}", i + 1));
        let mut args = vmlet::agent::Args {
            kubeconfig: Some(if i == 0 {
                cut_off.clone()
            } else {
                common::kubeconfig_path()
            }),
            peer_key_file: Some(key.clone()),
            storage_pools: vec![format!("shared={}", pool.display())],
            ..common::agent_args(&node, uri, &base)
        };
        fast(&mut args);
        tokio::spawn(vmlet::agent::run_with(
            args,
            Arc::new(lv),
            std::future::pending(),
        ));
        states.push((node, base.join("state")));
    }
    tokio::spawn(vmlet::controller::run_until(
        vmlet::controller::Args {
            heartbeat_grace_seconds: 2,
            fence_after_seconds: 4,
            loss_margin_seconds: 3,
            ..common::controller_args(&format!("{run}-test"), &ns)
        },
        std::future::pending(),
    ));
    common::tiny_guest_images(&client, &ns).await;

    let volumes: Api<VirtualMachineVolume> = Api::namespaced(client.clone(), &ns);
    let v = VirtualMachineVolume::new(
        "shared-data",
        serde_json::from_value(json!({"size": "64Mi", "storage": "shared"})).unwrap(),
    );
    volumes.create(&PostParams::default(), &v).await.unwrap();
    // On host 1 first: the VM selects it, then host 2 joins.
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    let spec = json!({
        "runStrategy": "Always",
        "memory": "128Mi",
        "nodeSelector": {LABEL: run, "kubernetes.io/hostname": states[0].0},
        "boot": {"kernel": {"name": "tiny-kernel"}, "initrd": {"name": "tiny-initrd"},
                 "cmdline": cmdline(Some("pooled"))},
        "disks": [{"name": "data", "volume": {"name": "shared-data"}}],
    });
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    for (node, _) in &states {
        let l = json!({"metadata": {"labels": {"kubernetes.io/hostname": node}}});
        nodes
            .patch(node, &PatchParams::default(), &Patch::Merge(l))
            .await
            .unwrap();
    }
    let uid = create(&vms, "ha", spec).await;
    let on_a = states[0].1.join("vms").join(&uid).join("console.log");
    console_says(&on_a, 0, "vmlet-disk-wrote=pooled", 120).await;
    // From now on the VM may run on either node; its spec stops writing.
    vms.patch(
        "ha",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"spec": {"nodeSelector": {"kubernetes.io/hostname": null},
                                       "boot": {"cmdline": cmdline(None)}}}),
        ),
    )
    .await
    .unwrap();

    let t = Instant::now();
    proxy.cut();
    let moved = common::wait_for(Duration::from_secs(120), || async {
        let st = vms.get("ha").await.ok()?.status?;
        (st.node_name.as_deref() == Some(states[1].0.as_str())).then_some(())
    })
    .await;
    assert!(
        moved.is_some(),
        "never moved: {:?}",
        vms.get("ha").await.unwrap().status
    );
    let on_b = states[1].1.join("vms").join(&uid).join("console.log");
    console_says(&on_b, 0, "vmlet-disk-read=vmlet-marker:pooled", 120).await;
    println!(
        "pooled volume failover: the guest read its marker on host 2 {:.1} s after host 1 was cut off",
        t.elapsed().as_secs_f64()
    );
    proxy.heal();

    // A snapshot of it (on host 2) lives on the pool; a clone of that snapshot on host
    // 1's local storage boots on host 1 with the marker.
    let snaps: Api<VirtualMachineSnapshot> = Api::namespaced(client.clone(), &ns);
    let s = VirtualMachineSnapshot::new(
        "ha-snap",
        serde_json::from_value(json!({"vmName": "ha"})).unwrap(),
    );
    snaps.create(&PostParams::default(), &s).await.unwrap();
    let ready = common::wait_for(Duration::from_secs(120), || async {
        let st = snaps.get("ha-snap").await.ok()?.status?;
        (st.ready_to_use == Some(true)).then_some(st)
    })
    .await
    .expect("the snapshot on the pool never became ready");
    assert_eq!(ready.volumes[0].storage, "shared");
    let v = VirtualMachineVolume::new(
        "cloned",
        serde_json::from_value(
            json!({"size": "64Mi", "source": {"snapshot": {"name": "ha-snap", "disk": "data"}}}),
        )
        .unwrap(),
    );
    volumes.create(&PostParams::default(), &v).await.unwrap();
    let spec = json!({
        "runStrategy": "Always",
        "memory": "128Mi",
        "nodeSelector": {LABEL: run, "kubernetes.io/hostname": states[0].0},
        "boot": {"kernel": {"name": "tiny-kernel"}, "initrd": {"name": "tiny-initrd"},
                 "cmdline": cmdline(None)},
        "disks": [{"name": "data", "volume": {"name": "cloned"}}],
    });
    let clone_uid = create(&vms, "clone", spec).await;
    let on_a = states[0].1.join("vms").join(&clone_uid).join("console.log");
    console_says(&on_a, 0, "vmlet-disk-read=vmlet-marker:pooled", 180).await;
    let cloned = volumes.get("cloned").await.unwrap().status.unwrap();
    assert_eq!(cloned.node.as_deref(), Some(states[0].0.as_str()));
    common::delete_vms_and_namespace(&client, &ns).await;
    for (node, _) in &states {
        common::forget_node(&client, node).await;
    }
}
