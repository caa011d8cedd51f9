//! `crds/` must hold exactly what `vmlet crd` prints. Regenerate with `make crds`
//! (VMLET_UPDATE_CRDS=1 cargo test --test crds).

use std::path::Path;

#[test]
fn crds_dir_matches_code() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let update = std::env::var_os("VMLET_UPDATE_CRDS").is_some();
    let mut expected_files: Vec<String> = Vec::new();
    for (file, crd) in vmlet::api::crds() {
        let want = vmlet::api::crd_yaml(&crd);
        let path = dir.join(file);
        expected_files.push(file.to_string());
        if update {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &want).unwrap();
            continue;
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "crds/{file} drifted from the code: run `make crds`"
        );
    }
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    present.sort();
    expected_files.sort();
    assert_eq!(
        present, expected_files,
        "crds/ holds files the code does not generate"
    );
}

#[test]
fn every_field_has_a_description() {
    fn walk(path: &str, v: &serde_json::Value, missing: &mut Vec<String>) {
        let Some(obj) = v.as_object() else { return };
        if let Some(props) = obj.get("properties").and_then(|p| p.as_object()) {
            for (k, sub) in props {
                let p = format!("{path}.{k}");
                // apiVersion/kind/metadata are Kubernetes' own.
                let standard = matches!(k.as_str(), "apiVersion" | "kind" | "metadata");
                if !standard && sub.get("description").is_none() {
                    missing.push(p.clone());
                }
                walk(&p, sub, missing);
            }
        }
        if let Some(items) = obj.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    let mut missing = Vec::new();
    for (file, crd) in vmlet::api::crds() {
        let v = serde_json::to_value(&crd).unwrap();
        for ver in v["spec"]["versions"].as_array().unwrap() {
            walk(file, &ver["schema"]["openAPIV3Schema"], &mut missing);
        }
    }
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:#?}"
    );
}
