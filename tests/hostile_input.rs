//! Hostile input: each case is refused by the API server with a message naming the field,
//! or admitted and rendered harmless (escaped, pruned, or never reaching the domain XML).
//! The test prints which, case by case. Hostile images (symlinks out of the root, bad
//! checksums, backing files, disguised formats) are refused by the agent: see
//! agent_test_driver.rs, `bad_images_keep_the_vm_off_and_say_why`.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use vmlet::agent::domain::Domain;
use vmlet::agent::node::{Accel, NodeFacts};
use vmlet::agent::render::{self, LocalImage};
use vmlet::api::VirtualMachine;

enum Expect {
    /// The API server refuses it; the message names this field.
    Refused(&'static str),
    /// Admitted; rendering keeps it inert (checked on the object the server returns).
    Harmless(&'static str),
}

fn vm(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachine", "metadata": {"name": name}, "spec": spec})
}

fn with(extra: Value) -> Value {
    let mut spec = json!({"memory": "64Mi"});
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    spec
}

fn image(name: &str, source: Value) -> Value {
    json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachineImage", "metadata": {"name": name},
           "spec": {"format": "qcow2", "source": source}})
}

fn http(url: &str) -> Value {
    json!({"http": {"url": url, "sha256": "a".repeat(64)}})
}

fn cases() -> Vec<(&'static str, Value, Expect)> {
    use Expect::*;
    let disk = |name: &str| json!({"disks": [{"name": name, "blank": {"size": "1Gi"}}]});
    let cmdline = |c: &str| json!({"boot": {"kernel": {"name": "k"}, "cmdline": c}});
    vec![
        (
            "unicode VM name",
            vm("vm-ü", with(json!({}))),
            Refused("metadata.name"),
        ),
        (
            "over-long VM name",
            vm(&"a".repeat(254), with(json!({}))),
            Refused("metadata.name"),
        ),
        (
            "path traversal as disk name",
            vm("h1", with(disk("../../etc"))),
            Refused("spec.disks[0].name"),
        ),
        (
            "XML in a disk name",
            vm("h2", with(disk("<a>"))),
            Refused("spec.disks[0].name"),
        ),
        (
            "quote in a network name",
            vm(
                "h3",
                with(json!({"networks": [{"name": "a'b", "user": {}}]})),
            ),
            Refused("spec.networks[0].name"),
        ),
        (
            "attribute injection in a bridge",
            vm(
                "h4",
                with(json!({"networks": [{"name": "n", "bridge": {"name": "br0' type='x"}}]})),
            ),
            Refused("spec.networks[0].bridge.name"),
        ),
        (
            "newline in a bridge",
            vm(
                "h5",
                with(json!({"networks": [{"name": "n", "bridge": {"name": "br0\n"}}]})),
            ),
            Refused("spec.networks[0].bridge.name"),
        ),
        (
            "bridge longer than IFNAMSIZ",
            vm(
                "h6",
                with(
                    json!({"networks": [{"name": "n", "bridge": {"name": "bridge-name-too-long"}}]}),
                ),
            ),
            Refused("spec.networks[0].bridge.name"),
        ),
        (
            "element injection in a libvirt network",
            vm(
                "h7",
                with(
                    json!({"networks": [{"name": "n", "network": {"name": "default'/><hostdev"}}]}),
                ),
            ),
            Refused("spec.networks[0].network.name"),
        ),
        (
            "element injection in the CPU model",
            vm(
                "h8",
                with(json!({"cpu": {"model": "host-model'/><devices>"}})),
            ),
            Refused("spec.cpu.model"),
        ),
        (
            "MAC with trailing junk",
            vm(
                "h9",
                with(
                    json!({"networks": [{"name": "n", "user": {}, "macAddress": "52:54:00:00:00:00'"}]}),
                ),
            ),
            Refused("spec.networks[0].macAddress"),
        ),
        (
            "negative memory",
            vm("h10", json!({"memory": "-1"})),
            Refused("spec.memory"),
        ),
        (
            "absurd memory",
            vm("h11", json!({"memory": "99999999999999999999Gi"})),
            Refused("spec.memory"),
        ),
        (
            "memory in exponent form",
            vm("h12", json!({"memory": "1e9"})),
            Refused("spec.memory"),
        ),
        (
            "zero-size disk",
            vm(
                "h13",
                with(json!({"disks": [{"name": "d", "blank": {"size": "0"}}]})),
            ),
            Refused("spec.disks[0].blank.size"),
        ),
        (
            "petabyte disk",
            vm(
                "h14",
                with(json!({"disks": [{"name": "d", "blank": {"size": "1Pi"}}]})),
            ),
            Refused("spec.disks[0].blank.size"),
        ),
        (
            "a thousand cores",
            vm("h15", with(json!({"cpu": {"cores": 1000}}))),
            Refused("spec.cpu.cores"),
        ),
        (
            "negative sockets",
            vm("h16", with(json!({"cpu": {"sockets": -1}}))),
            Refused("spec.cpu.sockets"),
        ),
        (
            "too many disks",
            vm(
                "h17",
                with(
                    json!({"disks": (0..17).map(|i| json!({"name": format!("d{i}"), "blank": {"size": "1Gi"}})).collect::<Vec<_>>()}),
                ),
            ),
            Refused("spec.disks"),
        ),
        (
            "too many NICs",
            vm(
                "h18",
                with(
                    json!({"networks": (0..9).map(|i| json!({"name": format!("n{i}"), "user": {}})).collect::<Vec<_>>()}),
                ),
            ),
            Refused("spec.networks"),
        ),
        (
            "cloud-init over 64 KiB",
            vm(
                "h19",
                with(
                    json!({"disks": [{"name": "s", "cloudInit": {"userData": "x".repeat(65537)}}]}),
                ),
            ),
            Refused("spec.disks[0].cloudInit.userData"),
        ),
        (
            "NUL in the cmdline",
            vm("h20", with(cmdline("console=ttyS0\u{0}init=/bin/sh"))),
            Refused("spec.boot.cmdline"),
        ),
        (
            "C1 control in the cmdline",
            vm("h21", with(cmdline("a\u{85}b"))),
            Refused("spec.boot.cmdline"),
        ),
        (
            "over-long cmdline",
            vm("h22", with(cmdline(&"a".repeat(3000)))),
            Refused("spec.boot.cmdline"),
        ),
        (
            "negative grace period",
            vm("h23", with(json!({"terminationGracePeriodSeconds": -5}))),
            Refused("spec.terminationGracePeriodSeconds"),
        ),
        (
            "file:// image URL",
            image("i1", http("file:///etc/shadow")),
            Refused("spec.source.http.url"),
        ),
        (
            "javascript: image URL",
            image("i2", http("javascript:alert(1)")),
            Refused("spec.source.http.url"),
        ),
        (
            "gopher image URL",
            image("i3", http("gopher://example.com/x")),
            Refused("spec.source.http.url"),
        ),
        (
            "URL without a host",
            image("i4", http("http:///x.qcow2")),
            Refused("spec.source.http.url"),
        ),
        (
            "upper-case checksum",
            image(
                "i5",
                json!({"http": {"url": "http://a/b", "sha256": "A".repeat(64)}}),
            ),
            Refused("spec.source.http.sha256"),
        ),
        (
            "hostPath traversal",
            image(
                "i6",
                json!({"hostPath": {"path": "/var/lib/vmlet/images/../../../etc/shadow"}}),
            ),
            Refused("spec.source.hostPath.path"),
        ),
        (
            "relative hostPath",
            image("i7", json!({"hostPath": {"path": "images/x"}})),
            Refused("spec.source.hostPath.path"),
        ),
        (
            "newline in a hostPath",
            image(
                "i8",
                json!({"hostPath": {"path": "/var/lib/vmlet/images/a\nb"}}),
            ),
            Refused("spec.source.hostPath.path"),
        ),
        (
            "class with 5 TiB",
            json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachineClass", "metadata": {"name": "k1"}, "spec": {"memory": "5Ti"}}),
            Refused("spec.memory"),
        ),
        (
            "class with 9 threads per core",
            json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachineClass", "metadata": {"name": "k2"}, "spec": {"cpu": {"threads": 9}}}),
            Refused("spec.cpu.threads"),
        ),
        (
            "element injection in the cmdline",
            vm(
                "ok1",
                with(cmdline(
                    "x</cmdline></os><devices><hostdev mode='subsystem'/></devices><os><cmdline>",
                )),
            ),
            Harmless("escaped into the cmdline text"),
        ),
        (
            "XML metacharacters in the cmdline",
            vm("ok2", with(cmdline("a&b \"c\" 'd' ]]> <!-- e -->"))),
            Harmless("escaped into the cmdline text"),
        ),
        (
            "XML in cloud-init user data",
            vm(
                "ok3",
                with(
                    json!({"disks": [{"name": "s", "cloudInit": {"userData": "</domain><hostdev/>"}}]}),
                ),
            ),
            Harmless("goes to the seed ISO, never the domain XML"),
        ),
        (
            "XML in labels and annotations",
            json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": "ok4", "annotations": {"x": "<hostdev/>"}}, "spec": {"memory": "64Mi"}}),
            Harmless("metadata never reaches the domain XML"),
        ),
        (
            "an unknown hostDevices field",
            vm(
                "ok5",
                with(json!({"hostDevices": [{"pci": "0000:00:02.0"}]})),
            ),
            Harmless("pruned by the structural schema"),
        ),
    ]
}

fn resource(kind: &str) -> ApiResource {
    let plural = match kind {
        "VirtualMachine" => "virtualmachines",
        "VirtualMachineImage" => "virtualmachineimages",
        _ => "virtualmachineclasses",
    };
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("vmlet.dev", "v1alpha1", kind),
        plural,
    )
}

/// Renders the object the server admitted and checks nothing became markup.
fn assert_inert(obj: &DynamicObject) {
    let mut v = serde_json::to_value(obj).unwrap();
    v["metadata"]["uid"] = json!("11111111-2222-4333-8444-555555555555");
    v["metadata"]["namespace"] = json!("ns");
    let vm: VirtualMachine = serde_json::from_value(v).unwrap();
    let images: BTreeMap<String, LocalImage> = [(
        "k".to_string(),
        LocalImage {
            path: PathBuf::from("/var/lib/vmlet/images/k"),
            format: "raw",
        },
    )]
    .into();
    let facts = NodeFacts {
        node: "n".into(),
        state_dir: PathBuf::from("/var/lib/vmlet"),
        accel: Accel::Tcg,
        uefi: false,
        domain_type: "qemu".into(),
    };
    let domain = render::render(&vm, None, &images.clone().into(), &facts).unwrap();
    let (xml, _) = render::finish(domain).unwrap();
    let parsed = Domain::from_xml(&xml).unwrap();
    assert!(
        !xml.contains("<hostdev") && !xml.contains("</domain><"),
        "markup leaked:\n{xml}"
    );
    assert_eq!(xml.matches("<devices>").count(), 1);
    assert_eq!(parsed.os.cmdline, vm.spec.boot.and_then(|b| b.cmdline));
}

#[tokio::test]
async fn hostile_inputs_are_refused_or_harmless() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "hostile").await;
    let cases = cases();
    assert!(cases.len() >= 30);
    let mut failures = Vec::new();
    for (case, obj, expect) in cases {
        let kind = obj["kind"].as_str().unwrap().to_string();
        let ar = resource(&kind);
        let api: Api<DynamicObject> = if kind == "VirtualMachineClass" {
            Api::all_with(client.clone(), &ar)
        } else {
            Api::namespaced_with(client.clone(), &ns, &ar)
        };
        let dyn_obj: DynamicObject = serde_json::from_value(obj).unwrap();
        let res = api
            .create(
                &PostParams {
                    dry_run: true,
                    ..Default::default()
                },
                &dyn_obj,
            )
            .await;
        match (expect, res) {
            (Expect::Refused(field), Err(kube::Error::Api(s)))
                if s.code == 422 || s.code == 400 =>
            {
                if s.message.contains(field) {
                    println!(
                        "refused   {case:<40} {}",
                        s.message.lines().next().unwrap_or_default()
                    );
                } else {
                    failures.push(format!(
                        "{case}: refused, but the message does not name {field}: {}",
                        s.message
                    ));
                }
            }
            (Expect::Refused(_), other) => {
                failures.push(format!("{case}: not refused: {:?}", other.map(|_| ())))
            }
            (Expect::Harmless(how), Ok(admitted)) => {
                assert_inert(&admitted);
                if case.contains("unknown")
                    && serde_json::to_string(&admitted.data)
                        .unwrap()
                        .contains("hostDevices")
                {
                    failures.push(format!("{case}: stored"));
                }
                println!("harmless  {case:<40} {how}");
            }
            (Expect::Harmless(_), Err(e)) => {
                failures.push(format!("{case}: refused unexpectedly: {e}"))
            }
        }
    }
    common::delete_namespace(&client, &ns).await;
    assert!(failures.is_empty(), "{failures:#?}");
}
