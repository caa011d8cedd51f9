//! Golden files: `tests/golden/<case>.yaml` (a VirtualMachine, optionally its class and
//! images) renders to exactly `tests/golden/<case>.xml`. Regenerate with
//! `VMLET_UPDATE_GOLDEN=1 cargo test --test golden` and review the diff by eye.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use vmlet::agent::domain::Domain;
use vmlet::agent::node::{Accel, NodeFacts};
use vmlet::agent::render::{self, LocalImage};
use vmlet::api::{VirtualMachine, VirtualMachineClass, VirtualMachineImage};

fn render_case(yaml: &str) -> String {
    let mut vm: Option<VirtualMachine> = None;
    let mut class = None;
    let mut images = BTreeMap::new();
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(yaml).unwrap();
    for v in docs {
        match v["kind"].as_str() {
            Some("VirtualMachine") => vm = Some(serde_json::from_value(v).unwrap()),
            Some("VirtualMachineClass") => {
                class = Some(
                    serde_json::from_value::<VirtualMachineClass>(v)
                        .unwrap()
                        .spec,
                )
            }
            Some("VirtualMachineImage") => {
                let img: VirtualMachineImage = serde_json::from_value(v).unwrap();
                let name = img.metadata.name.clone().unwrap();
                let format = if serde_json::to_value(img.spec.format).unwrap() == "qcow2" {
                    "qcow2"
                } else {
                    "raw"
                };
                images.insert(
                    name.clone(),
                    LocalImage {
                        path: PathBuf::from(format!("/var/lib/vmlet/images/{name}")),
                        format,
                    },
                );
            }
            other => panic!("unexpected kind {other:?}"),
        }
    }
    let vm = vm.expect("a VirtualMachine");
    let ann = vm.metadata.annotations.clone().unwrap_or_default();
    let accel = if ann.get("golden.vmlet.dev/accel").map(String::as_str) == Some("kvm") {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    let facts = NodeFacts {
        node: "node-1".into(),
        state_dir: PathBuf::from("/var/lib/vmlet"),
        accel,
        uefi: ann.get("golden.vmlet.dev/uefi").map(String::as_str) == Some("true"),
        domain_type: vmlet::agent::node::domain_type(&["qemu".into(), "kvm".into()], accel),
    };
    let domain =
        render::render(&vm, class.as_ref(), &images.clone().into(), &facts).expect("renders");
    let (xml, _) = render::finish(domain.clone()).unwrap();
    let parsed = Domain::from_xml(&xml).expect("output parses");
    let mut expect = domain;
    expect.metadata.vm.hash = parsed.metadata.vm.hash.clone();
    assert_eq!(parsed, expect, "what parses back equals what was rendered");
    xml
}

#[test]
fn golden_files() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("VMLET_UPDATE_GOLDEN").is_some();
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 12,
        "at least 12 golden cases, found {}",
        cases.len()
    );
    let mut failures = Vec::new();
    for case in cases {
        let got = render_case(&std::fs::read_to_string(&case).unwrap());
        let golden = case.with_extension("xml");
        if update {
            std::fs::write(&golden, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_default();
        if got != want {
            failures.push(format!("{}:\n{got}", golden.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "golden files differ (VMLET_UPDATE_GOLDEN=1 to regenerate):\n{}",
        failures.join("\n")
    );
}
