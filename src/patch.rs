//! Small write helpers the agent, the controller and the plugin share.

use kube::api::{Api, Patch, PatchParams, ResourceExt};
use serde_json::json;

/// Plain (non-apply) patch parameters under a field manager.
pub fn by(manager: &str) -> PatchParams {
    PatchParams {
        field_manager: Some(manager.into()),
        ..Default::default()
    }
}

/// Sets annotation `key` on `obj` to `value`, or removes it (None), by a merge patch.
pub async fn annotate<K>(
    api: &Api<K>,
    obj: &K,
    key: &str,
    value: Option<&str>,
    manager: &str,
) -> Result<K, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = json!({"metadata": {"annotations": {key: value}}});
    api.patch(&obj.name_any(), &by(manager), &Patch::Merge(&patch))
        .await
}

/// Adds finalizer `name` to `obj` by a JSON patch conditioned on the resourceVersion
/// seen: a changed object fails with 409 and is looked at again.
pub async fn add_finalizer<K>(api: &Api<K>, obj: &K, name: &str) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    if obj.finalizers().iter().any(|f| f == name) {
        return Ok(());
    }
    let (path, value) = if obj.finalizers().is_empty() {
        ("/metadata/finalizers", json!([name]))
    } else {
        ("/metadata/finalizers/-", json!(name))
    };
    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": obj.resource_version()},
        {"op": "add", "path": path, "value": value},
    ]))
    .map_err(kube::Error::SerdeError)?;
    api.patch(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Json::<()>(ops),
    )
    .await?;
    Ok(())
}

/// Removes finalizer `name` from `obj` by a JSON patch that tests it is still at the index
/// seen; an object already gone, or whose list moved meanwhile, is left to its next event.
pub async fn remove_finalizer<K>(api: &Api<K>, obj: &K, name: &str) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let Some(at) = obj.finalizers().iter().position(|f| f == name) else {
        return Ok(());
    };
    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": format!("/metadata/finalizers/{at}"), "value": name},
        {"op": "remove", "path": format!("/metadata/finalizers/{at}")},
    ]))
    .map_err(kube::Error::SerdeError)?;
    match api
        .patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Json::<()>(ops),
        )
        .await
    {
        Err(kube::Error::Api(s)) if matches!(s.code, 404 | 409 | 422) => Ok(()),
        other => other.map(|_| ()),
    }
}
