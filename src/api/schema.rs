//! Schema pieces that derive macros cannot express: list-maps and CEL on generated types.

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde_json::{Value, json};

/// Marks a generated array schema as a list-map keyed by `keys`, so that server-side
/// apply merges entries by key and the API server refuses duplicate keys.
fn list_map<T: JsonSchema>(g: &mut SchemaGenerator, keys: &[&str], max_items: u32) -> Schema {
    let mut schema = g.subschema_for::<Vec<T>>();
    let obj = schema.ensure_object();
    obj.insert("x-kubernetes-list-type".into(), json!("map"));
    obj.insert("x-kubernetes-list-map-keys".into(), json!(keys));
    obj.insert("maxItems".into(), json!(max_items));
    schema
}

pub fn conditions(g: &mut SchemaGenerator) -> Schema {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
    let mut s = list_map::<Condition>(g, &["type"], 32);
    s.ensure_object().insert(
        "description".into(),
        json!("Observations of the object's state, one per type."),
    );
    s
}

pub fn disks(g: &mut SchemaGenerator) -> Schema {
    list_map::<super::vm::Disk>(g, &["name"], super::vm::MAX_DISKS)
}

pub fn networks(g: &mut SchemaGenerator) -> Schema {
    list_map::<super::vm::Network>(g, &["name"], super::vm::MAX_NETWORKS)
}

pub fn interfaces(g: &mut SchemaGenerator) -> Schema {
    list_map::<super::vm::InterfaceStatus>(g, &["name"], super::vm::MAX_NETWORKS)
}

pub fn image_nodes(g: &mut SchemaGenerator) -> Schema {
    list_map::<super::image::ImageNodeStatus>(g, &["node"], 10_000)
}

/// A byte quantity between `min` and `max` (inclusive), checked by pattern and CEL.
fn bytes(min: &str, max: &str) -> Schema {
    let rule = format!(
        "quantity(self).compareTo(quantity('{min}')) >= 0 && quantity(self).compareTo(quantity('{max}')) <= 0"
    );
    json_schema!({
        "type": "string",
        "pattern": super::quantity::PATTERN,
        "maxLength": 24,
        "x-kubernetes-validations": [{
            "rule": rule,
            "message": format!("must be between {min} and {max}"),
        }],
    })
}

fn optional(mut s: Schema, description: &str) -> Schema {
    s.ensure_object()
        .insert("description".into(), Value::from(description));
    s
}

pub fn memory(_: &mut SchemaGenerator) -> Schema {
    optional(
        bytes("16Mi", "4Ti"),
        "Guest memory, e.g. 512Mi or 2Gi (16Mi to 4Ti). Overrides the class's memory.",
    )
}

pub fn disk_size(_: &mut SchemaGenerator) -> Schema {
    optional(
        bytes("1Mi", "64Ti"),
        "Size of the disk, e.g. 10Gi (1Mi to 64Ti).",
    )
}

pub fn volume_size(_: &mut SchemaGenerator) -> Schema {
    optional(
        bytes("1Mi", "64Ti"),
        "The volume's size, e.g. 10Gi (1Mi to 64Ti); it may grow, never shrink.",
    )
}

pub fn reserved_memory(_: &mut SchemaGenerator) -> Schema {
    optional(
        bytes("0", "1Ti"),
        "Host memory kept back from guests (for the host, libvirt and QEMU overhead).",
    )
}
