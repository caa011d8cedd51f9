//! Property tests of the domain renderer: for any spec the API admits, the XML parses,
//! parses back to exactly the model that was rendered, and carries no element a string
//! could have smuggled in.

use std::collections::BTreeMap;
use std::path::PathBuf;

use proptest::prelude::*;
use vmlet::agent::domain::Domain;
use vmlet::agent::node::{Accel, NodeFacts};
use vmlet::agent::render::{self, LocalImage};
use vmlet::api::VirtualMachine;

/// Printable text as the API admits it in boot.cmdline (one line, no control characters), with the
/// XML metacharacters made likely.
fn cmdline() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just("<".to_string()),
            Just(">".to_string()),
            Just("&".to_string()),
            Just("\"".to_string()),
            Just("'".to_string()),
            Just("]]>".to_string()),
            Just("</cmdline><devices><hostdev/></devices>".to_string()),
            "[ -~]{1,8}",
            "\\PC{1,4}",
        ],
        0..24,
    )
    .prop_map(|v| v.concat())
    .prop_filter("one line, no control characters", |s| {
        !s.chars()
            .any(|c| c.is_control() || c == '\u{2028}' || c == '\u{2029}')
            && s.len() <= 2048
    })
}

fn dns_label() -> impl Strategy<Value = String> {
    "[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?"
}

fn vm() -> impl Strategy<Value = VirtualMachine> {
    (
        cmdline(),
        prop::collection::btree_set(dns_label(), 0..6),
        prop::collection::btree_set(dns_label(), 0..4),
        (1i32..=4, 1i32..=8, 1i32..=2),
        16u64..=4096,
        any::<bool>(),
        prop_oneof![Just("q35"), Just("pc")],
        "[A-Za-z0-9][A-Za-z0-9_.-]{0,14}",
    )
        .prop_map(|(cmdline, disks, nets, (sockets, cores, threads), mem, graphics, machine, bridge)| {
            let disks: Vec<_> = disks
                .into_iter()
                .enumerate()
                .map(|(i, name)| match i % 3 {
                    0 => {
                        let bus = ["virtio", "sata", "scsi"][(i / 3) % 3];
                        serde_json::json!({"name": name, "image": {"name": "base"}, "bus": bus})
                    }
                    1 => serde_json::json!({"name": name, "blank": {"size": "1Gi"}, "bus": "scsi"}),
                    _ => serde_json::json!({"name": name, "cloudInit": {"userData": "#cloud-config"}}),
                })
                .collect();
            let nets: Vec<_> = nets
                .into_iter()
                .enumerate()
                .map(|(i, name)| match i % 3 {
                    0 => serde_json::json!({"name": name, "user": {}}),
                    1 => serde_json::json!({"name": name, "bridge": {"name": bridge}}),
                    _ => serde_json::json!({"name": name, "network": {"name": bridge}, "model": "e1000e"}),
                })
                .collect();
            serde_json::from_value(serde_json::json!({
                "apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachine",
                "metadata": {"name": "p", "namespace": "ns", "uid": "11111111-2222-4333-8444-555555555555", "generation": 3},
                "spec": {
                    "memory": format!("{mem}Mi"),
                    "machine": machine,
                    "graphics": graphics,
                    "cpu": {"sockets": sockets, "cores": cores, "threads": threads},
                    "boot": {"kernel": {"name": "k"}, "cmdline": cmdline},
                    "disks": disks,
                    "networks": nets,
                }
            }))
            .unwrap()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn rendered_xml_parses_back_to_the_model(vm in vm(), kvm in any::<bool>()) {
        let mut images = BTreeMap::new();
        images.insert("base".to_string(), LocalImage { path: PathBuf::from("/var/lib/vmlet/images/sha256-x"), format: "qcow2" });
        images.insert("k".to_string(), LocalImage { path: PathBuf::from("/var/lib/vmlet/images/k"), format: "raw" });
        let facts = NodeFacts {
            node: "n".into(),
            state_dir: PathBuf::from("/var/lib/vmlet"),
            accel: if kvm { Accel::Kvm } else { Accel::Tcg },
            domain_type: if kvm { "kvm" } else { "qemu" }.into(),
            uefi: false,
        };
        let domain = render::render(&vm, None, &images.clone().into(), &facts).unwrap();
        let (xml, _) = render::finish(domain.clone()).unwrap();
        let parsed = Domain::from_xml(&xml).expect("output parses");
        let mut expect = domain;
        expect.metadata.vm.hash = parsed.metadata.vm.hash.clone();
        prop_assert_eq!(&parsed, &expect);
        // The cmdline came back as one text node: nothing it contained became markup.
        prop_assert_eq!(parsed.os.cmdline.as_deref(), vm.spec.boot.as_ref().unwrap().cmdline.as_deref());
        prop_assert_eq!(xml.matches("<devices>").count(), 1);
        prop_assert!(!xml.contains("<hostdev"));
    }
}
