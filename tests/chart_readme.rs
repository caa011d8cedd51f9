//! charts/vmlet/README.md is generated from values.yaml: every value with its default
//! and the comment above it. `make chart-readme` (VMLET_UPDATE_GOLDEN=1) rewrites it;
//! this test fails while it differs.

use std::path::Path;

/// One value: its dotted path, its default as written, and its comment.
#[derive(Debug, PartialEq)]
struct Value {
    path: String,
    default: String,
    doc: String,
}

/// Pure: the values of a values.yaml, in file order. A key with nothing after the colon
/// opens a section; a key with a value (scalar, `{}`, `[]`, flow map) is one value; the
/// comment lines right above a key document it.
fn values(yaml: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut doc: Vec<String> = Vec::new();
    for line in yaml.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if trimmed.is_empty() {
            doc.clear();
            continue;
        }
        if let Some(c) = trimmed.strip_prefix('#') {
            doc.push(c.trim().to_string());
            continue;
        }
        if trimmed.starts_with("- ") {
            continue; // items of a list default belong to its key
        }
        let Some((key, rest)) = trimmed.split_once(':') else {
            continue;
        };
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        let path: Vec<&str> = stack
            .iter()
            .map(|(_, k)| k.as_str())
            .chain([key.trim()])
            .collect();
        let path = path.join(".");
        // A trailing comment on the value line documents it too.
        let (value, trailing) = match rest.split_once(" #") {
            Some((v, c)) if !v.contains('"') || v.matches('"').count() % 2 == 0 => {
                (v.trim(), Some(c.trim()))
            }
            _ => (rest.trim(), None),
        };
        let mut text = doc.join(" ");
        if let Some(t) = trailing {
            text = format!("{text} {t}").trim().to_string();
        }
        if value.is_empty() {
            if !text.is_empty() {
                out.push(Value {
                    path: path.clone(),
                    default: String::new(),
                    doc: text,
                });
            }
            stack.push((indent, key.trim().to_string()));
        } else {
            out.push(Value {
                path,
                default: value.to_string(),
                doc: text,
            });
        }
        doc.clear();
    }
    out
}

/// The README: a short header and one table of every value.
fn readme(values: &[Value]) -> String {
    let mut s = String::from(
        "# vmlet chart\n\n\
         Runs vmlet: the controller (a Deployment), one agent per labelled hypervisor node (a\n\
         DaemonSet) and the API component for consoles. Install, upgrade and clean-up:\n\
         docs/install.md; alerts: docs/runbooks.md. `values.schema.json` refuses unknown\n\
         keys and values outside their set.\n\n\
         Generated from values.yaml by `make chart-readme`; edit the comments there.\n\n\
         | value | default | description |\n|---|---|---|\n",
    );
    for v in values {
        let default = if v.default.is_empty() {
            String::new()
        } else {
            format!("`{}`", v.default.replace('|', "\\|"))
        };
        s.push_str(&format!(
            "| `{}` | {} | {} |\n",
            v.path,
            default,
            v.doc.replace('|', "\\|")
        ));
    }
    s
}

#[test]
fn parses_paths_defaults_and_comments() {
    let yaml = "# The image.\nimage:\n  # Where from.\n  repository: vmlet\n  tag: \"\"  # default: appVersion\n\nlist: []\nagent:\n  nodeSelector:\n    a: \"b\"\n  # Pools.\n  pools:\n    - x\n";
    let got = values(yaml);
    let want = [
        ("image", "", "The image."),
        ("image.repository", "vmlet", "Where from."),
        ("image.tag", "\"\"", "default: appVersion"),
        ("list", "[]", ""),
        ("agent.nodeSelector.a", "\"b\"", ""),
        ("agent.pools", "", "Pools."),
    ];
    let got: Vec<(&str, &str, &str)> = got
        .iter()
        .map(|v| (v.path.as_str(), v.default.as_str(), v.doc.as_str()))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn chart_readme_is_generated_from_values() {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/vmlet");
    let values = values(&std::fs::read_to_string(chart.join("values.yaml")).unwrap());
    assert!(values.len() > 40, "{} values", values.len());
    let want = readme(&values);
    let path = chart.join("README.md");
    if std::env::var_os("VMLET_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "charts/vmlet/README.md is not what values.yaml gives: run make chart-readme"
    );
}
