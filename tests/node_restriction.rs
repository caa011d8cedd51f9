//! Least privilege with real tokens: a ServiceAccount token bound to an agent Pod on node
//! A (issued by the control plane; the Pod needs no kubelet) lets the agent write only
//! A's VMs, A's Hypervisor and A's Lease. The chart's RBAC and ValidatingAdmissionPolicy
//! are installed from the chart itself.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use serde_json::json;
use vmlet::api::{Hypervisor, VirtualMachine, VirtualMachineMigration};

fn tool(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".cache/bin")
        .join(name)
}

fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new(tool(cmd))
        .args(args)
        .env("KUBECONFIG", common::kubeconfig_path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.unwrap_or_default().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn client_with_token(token: &str) -> kube::Client {
    let kc = Kubeconfig::read_from(common::kubeconfig_path()).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    config.auth_info = AuthInfo {
        token: Some(token.to_string().into()),
        ..Default::default()
    };
    kube::Client::try_from(config).unwrap()
}

fn denied<T: std::fmt::Debug>(res: Result<T, kube::Error>, text: &str) -> Result<(), String> {
    match res {
        Err(kube::Error::Api(s)) if s.message.contains(text) => Ok(()),
        other => Err(format!("expected a refusal saying {text:?}, got {other:?}")),
    }
}

/// The policy takes effect a moment after it is created: retry a refusal for a while.
async fn eventually_denied<T, F, Fut>(text: &str, mut f: F)
where
    T: std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let mut last = String::new();
    for _ in 0..50 {
        match denied(f().await, text) {
            Ok(()) => return,
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_token_writes_only_its_own_node() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "noderestrict").await;
    let release = format!("nr{}", std::process::id());
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/vmlet");
    let rendered = run(
        "helm",
        &[
            "template",
            &release,
            chart.to_str().unwrap(),
            "-n",
            &ns,
            "--kube-version",
            "v1.37.2",
            "--show-only",
            "templates/serviceaccounts.yaml",
            "--show-only",
            "templates/rbac-agent.yaml",
            "--show-only",
            "templates/node-restriction.yaml",
        ],
        None,
    );
    run("kubectl", &["apply", "-f", "-"], Some(&rendered));

    let (node_a, node_b) = (format!("{release}-a"), format!("{release}-b"));
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    for (node, pod) in [(&node_a, "agent-a"), (&node_b, "agent-b")] {
        let n: Node = serde_json::from_value(json!({"metadata": {"name": node}})).unwrap();
        nodes.create(&PostParams::default(), &n).await.unwrap();
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": pod},
            "spec": {"nodeName": node, "serviceAccountName": format!("{release}-agent"),
                     "containers": [{"name": "agent", "image": "vmlet:test"}]}
        }))
        .unwrap();
        pods.create(&PostParams::default(), &p).await.unwrap();
    }
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    for (vm, node) in [("vm-a", &node_a), ("vm-b", &node_b), ("vm-a2", &node_a)] {
        let v = VirtualMachine::new(
            vm,
            serde_json::from_value(json!({"memory": "64Mi"})).unwrap(),
        );
        vms.create(&PostParams::default(), &v).await.unwrap();
        let bind = json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachine", "status": {"nodeName": node}});
        vms.patch_status(
            vm,
            &PatchParams::apply("vmlet-controller"),
            &Patch::Apply(&bind),
        )
        .await
        .unwrap();
    }

    let sa = format!("{release}-agent");
    let token = run(
        "kubectl",
        &[
            "create",
            "token",
            &sa,
            "-n",
            &ns,
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            "agent-a",
        ],
        None,
    );
    let agent = client_with_token(token.trim()).await;
    let a_vms: Api<VirtualMachine> = Api::namespaced(agent.clone(), &ns);
    let a_hvs: Api<Hypervisor> = Api::all(agent.clone());
    let a_leases: Api<Lease> = Api::namespaced(agent.clone(), "kube-node-lease");
    let pp = PatchParams::apply("vmlet-agent").force();
    let phase = json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachine", "status": {"phase": "Running"}});
    let hv = |name: &str| json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "Hypervisor", "metadata": {"name": name}, "spec": {}});
    let lease = |name: &str| json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": name}, "spec": {"holderIdentity": "x"}});

    // Refused: B's VM, taking B's VM, B's Hypervisor and Lease.
    let take = json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachine", "status": {"nodeName": node_a}});
    let lease_b = format!("vmlet-{node_b}");
    eventually_denied("may only update VirtualMachines bound to its node", || {
        let (api, pp, body) = (a_vms.clone(), pp.clone(), phase.clone());
        async move { api.patch_status("vm-b", &pp, &Patch::Apply(body)).await }
    })
    .await;
    eventually_denied("may only update VirtualMachines bound to its node", || {
        let (api, body) = (a_vms.clone(), take.clone());
        let pp = PatchParams::apply("vmlet-agent-migration").force();
        async move { api.patch_status("vm-b", &pp, &Patch::Apply(body)).await }
    })
    .await;
    eventually_denied("may only write its own Hypervisor", || {
        let (api, pp, body, name) = (a_hvs.clone(), pp.clone(), hv(&node_b), node_b.clone());
        async move { api.patch(&name, &pp, &Patch::Apply(body)).await }
    })
    .await;
    eventually_denied("may only write its own heartbeat Lease", || {
        let (api, pp, body, name) = (
            a_leases.clone(),
            pp.clone(),
            lease(&lease_b),
            lease_b.clone(),
        );
        async move { api.patch(&name, &pp, &Patch::Apply(body)).await }
    })
    .await;
    // An image's status: its own node's entry, not another's, not the phase.
    let images: Api<vmlet::api::VirtualMachineImage> = Api::namespaced(client.clone(), &ns);
    let img = vmlet::api::VirtualMachineImage::new(
        "img",
        serde_json::from_value(json!({"format": "raw", "source": {"hostPath": {"path": "/x"}}}))
            .unwrap(),
    );
    images.create(&PostParams::default(), &img).await.unwrap();
    let a_images: Api<vmlet::api::VirtualMachineImage> = Api::namespaced(agent.clone(), &ns);
    let entry = |node: &str| json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachineImage", "status": {"nodes": [{"node": node, "phase": "Ready"}]}});
    eventually_denied(
        "may only write its own node entry of an image status",
        || {
            let (api, body) = (a_images.clone(), entry(&node_b));
            let pp = PatchParams::apply(&format!("vmlet-agent-{node_b}")).force();
            async move { api.patch_status("img", &pp, &Patch::Apply(body)).await }
        },
    )
    .await;
    denied(
        a_images
            .patch_status(
                "img",
                &PatchParams::apply("vmlet-agent-x").force(),
                &Patch::Apply(json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachineImage", "status": {"phase": "Ready"}})),
            )
            .await,
        "may only write its own node entry of an image status",
    )
    .unwrap();
    a_images
        .patch_status(
            "img",
            &PatchParams::apply(&format!("vmlet-agent-{node_a}")).force(),
            &Patch::Apply(entry(&node_a)),
        )
        .await
        .expect("an agent writes its own node's entry");
    storage(&client, &agent, &ns, &node_a, &node_b).await;
    // RBAC: an agent never creates VMs.
    let new_vm = VirtualMachine::new(
        "sneaky",
        serde_json::from_value(json!({"memory": "64Mi"})).unwrap(),
    );
    denied(
        a_vms.create(&PostParams::default(), &new_vm).await,
        "forbidden",
    )
    .unwrap();

    // Allowed: its own VM, Hypervisor and Lease.
    a_vms
        .patch_status("vm-a", &pp, &Patch::Apply(&phase))
        .await
        .expect("own VM");
    a_hvs
        .patch(&node_a, &pp, &Patch::Apply(&hv(&node_a)))
        .await
        .expect("own Hypervisor");
    a_leases
        .patch(
            &format!("vmlet-{node_a}"),
            &pp,
            &Patch::Apply(&lease(&format!("vmlet-{node_a}"))),
        )
        .await
        .expect("own Lease");
    // The binding is the controller's, even a live migration's: an agent cannot give its
    // VM away, nor write the controller's conditions.
    let give = json!({"status": {"nodeName": node_b}});
    let err = a_vms
        .patch_status("vm-a", &PatchParams::default(), &Patch::Merge(&give))
        .await
        .expect_err("an agent moved a binding");
    assert!(err.to_string().contains("not their binding"), "{err}");
    let healthy = json!({"status": {"conditions": [{"type": "NodeHealthy", "status": "True",
        "reason": "Forged", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
    let err = a_vms
        .patch_status("vm-a", &PatchParams::default(), &Patch::Merge(&healthy))
        .await
        .expect_err("an agent wrote a controller condition");
    assert!(
        err.to_string().contains("conditions the controller owns"),
        "{err}"
    );

    // A volume: how its data stands is the agent's to say; who holds it and where it
    // lives are the controller's.
    let volumes: Api<vmlet::api::VirtualMachineVolume> = Api::namespaced(client.clone(), &ns);
    let v = vmlet::api::VirtualMachineVolume::new(
        "vol",
        serde_json::from_value(json!({"size": "64Mi"})).unwrap(),
    );
    volumes.create(&PostParams::default(), &v).await.unwrap();
    let a_volumes: Api<vmlet::api::VirtualMachineVolume> = Api::namespaced(agent.clone(), &ns);
    let ready = json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachineVolume",
        "status": {"phase": "Ready", "allocatedBytes": 67108864}});
    a_volumes
        .patch_status("vol", &pp, &Patch::Apply(&ready))
        .await
        .expect("an agent says how a volume's data stands");
    let grab = json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachineVolume",
        "status": {"phase": "Ready", "allocatedBytes": 67108864, "user": "vm-a"}});
    let err = a_volumes
        .patch_status("vol", &pp, &Patch::Apply(&grab))
        .await
        .expect_err("an agent claimed a volume");
    assert!(err.to_string().contains("who holds a volume"), "{err}");

    // Its own VM's spec, labels and annotations are the tenant's: refused. Its own
    // finalizer comes and goes.
    let own_only = "may change only its own finalizer there";
    for (what, body) in [
        ("spec", json!({"spec": {"memory": "128Mi"}})),
        (
            "cloud-init",
            json!({"spec": {"disks": [{"name": "s", "cloudInit": {"userData": "#cloud-config\nruncmd: [id]"}}]}}),
        ),
        ("labels", json!({"metadata": {"labels": {"team": "other"}}})),
        (
            "annotations",
            json!({"metadata": {"annotations": {"vmlet.dev/power": "on"}}}),
        ),
        (
            "another finalizer",
            json!({"metadata": {"finalizers": ["example.com/hold"]}}),
        ),
    ] {
        eventually_denied(own_only, || {
            let (api, body) = (a_vms.clone(), body.clone());
            async move {
                api.patch("vm-a2", &PatchParams::default(), &Patch::Merge(body))
                    .await
            }
        })
        .await;
        println!("refused: the agent changing its own VM's {what}");
    }
    a_vms
        .patch(
            "vm-a2",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["vmlet.dev/domain"]}})),
        )
        .await
        .expect("add its finalizer");
    a_vms
        .patch(
            "vm-a2",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .expect("remove its finalizer");

    // Migrations: never moved by an agent; each phase written only by its role.
    let migs: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), &ns);
    let a_migs: Api<VirtualMachineMigration> = Api::namespaced(agent.clone(), &ns);
    for (name, source, target) in [("from-a", &node_a, &node_b), ("to-a", &node_b, &node_a)] {
        let m = VirtualMachineMigration::new(
            name,
            serde_json::from_value(json!({"vmName": "vm-a"})).unwrap(),
        );
        migs.create(&PostParams::default(), &m).await.unwrap();
        let st = json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachineMigration",
            "status": {"phase": "Scheduling", "sourceNode": source, "targetNode": target}});
        migs.patch_status(
            name,
            &PatchParams::apply("vmlet-controller"),
            &Patch::Apply(&st),
        )
        .await
        .unwrap();
    }
    let mig_status = |v: serde_json::Value| json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachineMigration", "status": v});
    let role = "may not move a migration or set a phase its role does not write";
    for (name, body, what) in [
        (
            "from-a",
            mig_status(json!({"targetNode": node_a})),
            "retarget a migration",
        ),
        (
            "to-a",
            mig_status(json!({"phase": "Running"})),
            "start a copy as its target",
        ),
        (
            "to-a",
            mig_status(json!({"phase": "Failed"})),
            "fail a migration as its target",
        ),
    ] {
        eventually_denied(role, || {
            let (api, body, pp) = (a_migs.clone(), body.clone(), pp.clone());
            async move { api.patch_status(name, &pp, &Patch::Apply(body)).await }
        })
        .await;
        println!("refused: the agent trying to {what}");
    }
    denied(
        a_migs
            .patch(
                "to-a",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
            )
            .await,
        own_only,
    )
    .unwrap();
    a_migs
        .patch_status(
            "from-a",
            &pp,
            &Patch::Apply(mig_status(json!({"phase": "Running"}))),
        )
        .await
        .expect("the source starts its copy");
    migs.patch_status(
        "to-a",
        &PatchParams::apply("vmlet-agent-migration-source").force(),
        &Patch::Apply(mig_status(json!({"phase": "Running"}))),
    )
    .await
    .unwrap();
    a_migs
        .patch_status(
            "to-a",
            &PatchParams::apply("vmlet-agent-migration-target-settle").force(),
            &Patch::Apply(mig_status(json!({"phase": "Succeeded"}))),
        )
        .await
        .expect("the target settles a migration its source left");

    // A token of the same ServiceAccount not bound to a Pod carries no node: refused.
    let loose = run("kubectl", &["create", "token", &sa, "-n", &ns], None);
    let loose_vms: Api<VirtualMachine> =
        Api::namespaced(client_with_token(loose.trim()).await, &ns);
    denied(
        loose_vms
            .patch_status("vm-b", &pp, &Patch::Apply(&phase))
            .await,
        "token bound to a Pod",
    )
    .unwrap();

    // Clean up what is not namespaced.
    for n in [&node_a, &node_b] {
        let _ = nodes.delete(n, &DeleteParams::default()).await;
        let _ = Api::<Hypervisor>::all(client.clone())
            .delete(n, &DeleteParams::default())
            .await;
        let _ = Api::<Lease>::namespaced(client.clone(), "kube-node-lease")
            .delete(&format!("vmlet-{n}"), &DeleteParams::default())
            .await;
    }
    let cluster_scoped: String = rendered
        .split("\n---")
        .filter(|d| {
            d.contains("kind: ValidatingAdmissionPolicy") || d.contains("kind: ClusterRole")
        })
        .collect::<Vec<_>>()
        .join("\n---\n");
    run(
        "kubectl",
        &["delete", "--ignore-not-found", "-f", "-"],
        Some(&cluster_scoped),
    );
    common::delete_namespace(&client, &ns).await;
}

/// Storage: an agent publishes an image once, as itself, and holds only the image
/// finalizer; it writes only restores and snapshots its own node carries out, and never
/// claims a volume.
async fn storage(
    client: &kube::Client,
    agent: &kube::Client,
    ns: &str,
    node_a: &str,
    node_b: &str,
) {
    use vmlet::api::volume::{VirtualMachineRestore, VirtualMachineSnapshot, VirtualMachineVolume};
    let pp = PostParams::default();
    let images: Api<vmlet::api::VirtualMachineImage> = Api::namespaced(client.clone(), ns);
    let a_images: Api<vmlet::api::VirtualMachineImage> = Api::namespaced(agent.clone(), ns);
    let published = vmlet::api::VirtualMachineImage::new(
        "tpl",
        serde_json::from_value(json!({"format": "qcow2", "source": {"volume": {"name": "v"}}}))
            .unwrap(),
    );
    images.create(&pp, &published).await.unwrap();
    let publish = |node: &str| {
        json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachineImage",
        "status": {"published": {"storage": "local", "node": node, "sizeBytes": 1}}})
    };
    let by = PatchParams::apply("vmlet-agent-publish").force();
    let once = "publish an image once as its own";
    eventually_denied(once, || {
        let (api, body, by) = (a_images.clone(), publish(node_b), by.clone());
        async move { api.patch_status("tpl", &by, &Patch::Apply(body)).await }
    })
    .await;
    a_images
        .patch_status("tpl", &by, &Patch::Apply(publish(node_a)))
        .await
        .expect("an agent publishes an image as its own");
    let mut again = publish(node_a);
    again["status"]["published"]["sizeBytes"] = json!(2);
    denied(
        a_images
            .patch_status("tpl", &by, &Patch::Apply(again))
            .await,
        once,
    )
    .unwrap();
    let merge = |v: serde_json::Value| Patch::Merge(v);
    a_images
        .patch(
            "tpl",
            &PatchParams::default(),
            &merge(json!({"metadata": {"finalizers": ["vmlet.dev/image"]}})),
        )
        .await
        .expect("an agent holds the image finalizer");
    denied(
        a_images
            .patch(
                "tpl",
                &PatchParams::default(),
                &merge(json!({"metadata": {"labels": {"x": "y"}}})),
            )
            .await,
        "may change only its own finalizer",
    )
    .unwrap();
    a_images
        .patch(
            "tpl",
            &PatchParams::default(),
            &merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .expect("an agent lets the image finalizer go");

    // A restore names the node that carries it out: its own, never another's.
    let restores: Api<VirtualMachineRestore> = Api::namespaced(client.clone(), ns);
    let a_restores: Api<VirtualMachineRestore> = Api::namespaced(agent.clone(), ns);
    let r = VirtualMachineRestore::new(
        "r",
        serde_json::from_value(json!({"vmName": "vm-a", "snapshotName": "s"})).unwrap(),
    );
    restores.create(&pp, &r).await.unwrap();
    let restore = |node: &str| {
        json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachineRestore",
        "status": {"phase": "Pending", "node": node}})
    };
    let by = PatchParams::apply("vmlet-agent").force();
    eventually_denied("may only write restores its node carries out", || {
        let (api, body, by) = (a_restores.clone(), restore(node_b), by.clone());
        async move { api.patch_status("r", &by, &Patch::Apply(body)).await }
    })
    .await;
    a_restores
        .patch_status("r", &by, &Patch::Apply(restore(node_a)))
        .await
        .expect("an agent writes a restore it carries out");

    // Snapshots: only those its node takes. Volumes: never who holds them.
    let snaps: Api<VirtualMachineSnapshot> = Api::namespaced(client.clone(), ns);
    let s = VirtualMachineSnapshot::new(
        "s",
        serde_json::from_value(json!({"vmName": "vm-b"})).unwrap(),
    );
    snaps.create(&pp, &s).await.unwrap();
    let a_snaps: Api<VirtualMachineSnapshot> = Api::namespaced(agent.clone(), ns);
    let snap = json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachineSnapshot",
        "status": {"phase": "InProgress", "node": node_b}});
    denied(
        a_snaps.patch_status("s", &by, &Patch::Apply(snap)).await,
        "may only write snapshots its node takes",
    )
    .unwrap();
    let vols: Api<VirtualMachineVolume> = Api::namespaced(client.clone(), ns);
    let v = VirtualMachineVolume::new("v", serde_json::from_value(json!({"size": "1Gi"})).unwrap());
    vols.create(&pp, &v).await.unwrap();
    let a_vols: Api<VirtualMachineVolume> = Api::namespaced(agent.clone(), ns);
    let claim = json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachineVolume",
        "status": {"user": "vm-a", "node": node_a}});
    denied(
        a_vols.patch_status("v", &by, &Patch::Apply(claim)).await,
        "may not change who holds a volume",
    )
    .unwrap();
}
