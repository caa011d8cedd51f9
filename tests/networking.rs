//! Reachable VMs with real QEMU (TCG here) on libvirtd, an in-process agent and
//! controller: tiny guests on a libvirt network of this test's own (isolated: DHCP from
//! libvirt's dnsmasq, no route out) get addresses by DHCP and serve a marker over HTTP
//! (`vmlet.net=1 vmlet.http=M`). Checked: the address in status is the lease's (learned
//! from the guest agent); a Service with the `vmlet.dev/selector` annotation gets an
//! EndpointSlice with it; an HTTP GET to it returns the marker; readiness probes by
//! HTTP, TCP (a closed port keeps its VM not Ready) and exec through the guest agent;
//! a halted VM's endpoint is not ready within 10 s.
//!
//! Needs `hack/libvirt.sh up` (make test runs it) and dnsmasq (hack/deps.sh).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use vmlet::agent::libvirt::Connection;
use vmlet::api::{VirtualMachine, conditions};

const LABEL: &str = "vmlet.dev/networking-test";

/// A libvirt network of this test's own, removed when dropped.
struct Network {
    name: String,
}

impl Network {
    fn create() -> Network {
        let pid = std::process::id();
        let name = format!("vmlet-net-{pid}");
        let _ = common::virsh(&["net-destroy", &name]);
        // Bridge names are at most 15 bytes.
        let bridge = format!("vmnet{}", pid % 1_000_000);
        let xml = format!(
            "<network><name>{name}</name><bridge name='{bridge}' stp='off'/>\
             <ip address='10.76.0.1' netmask='255.255.255.0'>\
             <dhcp><range start='10.76.0.100' end='10.76.0.200'/></dhcp></ip></network>"
        );
        let file = std::env::temp_dir().join(format!("{name}.xml"));
        std::fs::write(&file, xml).unwrap();
        let out = common::virsh(&["net-create", file.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "net-create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Network { name }
    }

    /// The address the network's DHCP server leased to `mac`.
    fn lease(&self, mac: &str) -> Option<String> {
        let out = common::virsh(&["net-dhcp-leases", &self.name, "--mac", mac]);
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .find(|w| w.starts_with("10.76.0."))
            .map(|w| w.split('/').next().unwrap_or(w).to_string())
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = common::virsh(&["net-destroy", &self.name]);
    }
}

struct Lab {
    client: kube::Client,
    ns: String,
    node: String,
    net: Network,
    _dir: tempfile::TempDir,
}

async fn lab() -> Lab {
    vmlet::telemetry::init(Default::default());
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "net").await;
    let dir = common::qemu_tempdir();
    let node = format!("net-{}", std::process::id());
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
    // The defaults users get: acceleration chosen by the agent.
    let args = vmlet::agent::Args {
        accel: vmlet::agent::accel::AccelChoice::Auto,
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
        net: Network::create(),
        _dir: dir,
    }
}

impl Lab {
    fn vms(&self) -> Api<VirtualMachine> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// A guest on the lab's network serving `marker`, labelled app=web, with `probe`.
    async fn vm(&self, name: &str, marker: &str, probe: serde_json::Value) {
        let spec = json!({
            "runStrategy": "Always",
            "memory": "128Mi",
            "nodeSelector": {LABEL: self.node},
            "guestAgent": true,
            "readinessProbe": probe,
            "boot": {"kernel": {"name": "tiny-kernel"}, "initrd": {"name": "tiny-initrd"},
                     "cmdline": format!("console=ttyS0 panic=-1 vmlet.net=1 vmlet.qga=1 vmlet.http={marker}")},
            "networks": [{"name": "net", "network": {"name": self.net.name}}],
        });
        let mut vm = VirtualMachine::new(name, serde_json::from_value(spec).unwrap());
        vm.metadata.labels = Some([("app".to_string(), "web".to_string())].into());
        self.vms()
            .create(&PostParams::default(), &vm)
            .await
            .unwrap();
    }

    async fn get(&self, name: &str) -> VirtualMachine {
        self.vms().get(name).await.unwrap()
    }

    /// Waits until `f` holds of the VM; panics with its status otherwise.
    async fn wait_vm(
        &self,
        name: &str,
        secs: u64,
        what: &str,
        f: impl Fn(&VirtualMachine) -> bool,
    ) {
        let ok = common::wait_for(Duration::from_secs(secs), || async {
            f(&self.get(name).await).then_some(())
        })
        .await;
        assert!(
            ok.is_some(),
            "{name}: never {what}; status: {}",
            serde_json::to_string(&self.get(name).await.status).unwrap()
        );
    }

    /// The endpoints of the Service's slices, as (address, ready).
    async fn endpoints(&self, svc: &str) -> Vec<(String, bool)> {
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &self.ns);
        let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={svc}"));
        slices
            .list(&lp)
            .await
            .unwrap()
            .items
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .map(|e| {
                let ready = e.conditions.as_ref().and_then(|c| c.ready) == Some(true);
                (e.addresses[0].clone(), ready)
            })
            .collect()
    }
}

fn ips(vm: &VirtualMachine) -> Vec<String> {
    vm.status
        .as_ref()
        .and_then(|s| s.interfaces.first())
        .map(|i| i.ip_addresses.clone())
        .unwrap_or_default()
}

fn ready(vm: &VirtualMachine) -> Option<(bool, String)> {
    let c = conditions::find(&vm.status.as_ref()?.conditions, conditions::Type::Ready)?;
    Some((c.status == "True", c.reason.clone()))
}

#[tokio::test(flavor = "multi_thread")]
async fn vms_behind_a_service_are_reached_at_the_addresses_their_status_shows() {
    let lab = lab().await;
    // Three guests at once: an HTTP probe on the port the guest serves, a TCP probe on
    // a port nothing listens on, a command run by the guest agent.
    lab.vm(
        "web",
        "web-marker",
        json!({"httpGet": {"port": 80}, "periodSeconds": 2}),
    )
    .await;
    lab.vm(
        "closed",
        "closed-marker",
        json!({"tcpSocket": {"port": 81}, "periodSeconds": 2, "failureThreshold": 1}),
    )
    .await;
    lab.vm("exec", "exec-marker", json!({"exec": {"command": ["/bin/sh", "-c", "test -e /www/index.html"]}, "periodSeconds": 2}))
        .await;
    let svc: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "annotations": {"vmlet.dev/selector": "app=web"}},
        "spec": {"ports": [{"name": "http", "port": 8080, "targetPort": 80}]},
    }))
    .unwrap();
    Api::<Service>::namespaced(lab.client.clone(), &lab.ns)
        .create(&PostParams::default(), &svc)
        .await
        .unwrap();

    // 1. The address: learned from the guest agent, the one the network leased.
    let t = Instant::now();
    lab.wait_vm("web", 240, "had an address", |vm| !ips(vm).is_empty())
        .await;
    let learned = t.elapsed();
    let vm = lab.get("web").await;
    let iface = &vm.status.as_ref().unwrap().interfaces[0];
    let ip = iface.ip_addresses[0].clone();
    assert_eq!(
        iface.ip_address.as_deref(),
        Some(ip.as_str()),
        "the IP column shows the first"
    );
    // The lease may be seen before the guest agent reports the address: the agent
    // looks again every 30 s once it has one.
    lab.wait_vm("web", 60, "showed the guest agent's word", |vm| {
        vm.status
            .as_ref()
            .and_then(|s| s.interfaces.first())
            .and_then(|i| i.address_source)
            == Some(vmlet::api::vm::AddressSource::GuestAgent)
    })
    .await;
    assert!(
        iface.confirmed_addresses.contains(&ip),
        "the node saw the lease: {:?}",
        iface.confirmed_addresses
    );
    let mac = iface.mac.clone().unwrap();
    assert_eq!(
        lab.net.lease(&mac).as_deref(),
        Some(ip.as_str()),
        "the lease of {mac}"
    );
    eprintln!(
        "address {ip} in status {:.1} s after the VM was made",
        learned.as_secs_f64()
    );

    // 2. Ready through its HTTP probe; the slice holds it, ready.
    lab.wait_vm("web", 120, "Ready", |vm| ready(vm).is_some_and(|r| r.0))
        .await;
    assert_eq!(ready(&lab.get("web").await).unwrap().1, "ProbeSucceeded");
    let in_slice = common::wait_for(Duration::from_secs(30), || async {
        lab.endpoints("web")
            .await
            .contains(&(ip.clone(), true))
            .then_some(())
    })
    .await;
    assert!(
        in_slice.is_some(),
        "slice: {:?}",
        lab.endpoints("web").await
    );

    // 3. An HTTP GET to the address in status returns the marker.
    let body = reqwest::Client::new()
        .get(format!("http://{ip}/"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body.trim(), "vmlet-http:web-marker");

    // 4. The exec probe (run by the guest agent) makes its VM Ready too.
    lab.wait_vm("exec", 120, "Ready", |vm| ready(vm).is_some_and(|r| r.0))
        .await;

    // 5. A probe on a closed port keeps its VM not Ready, its endpoint not ready.
    lab.wait_vm("closed", 120, "had an address", |vm| !ips(vm).is_empty())
        .await;
    let closed_ip = ips(&lab.get("closed").await)[0].clone();
    lab.wait_vm("closed", 60, "ProbeFailed", |vm| {
        ready(vm).is_some_and(|r| !r.0 && r.1 == "ProbeFailed")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (ok, reason) = ready(&lab.get("closed").await).unwrap();
    assert!(!ok, "a closed port made the VM Ready ({reason})");
    let has_closed = common::wait_for(Duration::from_secs(30), || async {
        lab.endpoints("web")
            .await
            .contains(&(closed_ip.clone(), false))
            .then_some(())
    })
    .await;
    assert!(
        has_closed.is_some(),
        "slice: {:?}",
        lab.endpoints("web").await
    );

    // 6. Halted: its endpoint is not ready (or gone) within 10 s.
    lab.vms()
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"runStrategy": "Halted"}})),
        )
        .await
        .unwrap();
    let t = Instant::now();
    let gone = common::wait_for(Duration::from_secs(10), || async {
        (!lab.endpoints("web").await.contains(&(ip.clone(), true))).then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "halted, still ready: {:?}",
        lab.endpoints("web").await
    );
    eprintln!(
        "halted VM's endpoint not ready after {:.1} s",
        t.elapsed().as_secs_f64()
    );

    common::delete_vms_and_namespace(&lab.client, &lab.ns).await;
    common::forget_node(&lab.client, &lab.node).await;
}
