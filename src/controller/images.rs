//! Each VirtualMachineImage's `status.phase`, summed up from its nodes' entries (which
//! the agents write, each its own): the controller is the phase's one writer.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams, ResourceExt};
use kube::runtime::controller::Action;
use serde_json::json;

use super::Context;
use crate::api::image::{ImagePhase, VirtualMachineImage};

const MANAGER: &str = "vmlet-controller-images";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
}

pub async fn reconcile(img: Arc<VirtualMachineImage>, ctx: Arc<Context>) -> Result<Action, Error> {
    let status = img.status.clone().unwrap_or_default();
    let phase = ImagePhase::of_nodes(&status.nodes);
    if status.phase != Some(phase) {
        let api: Api<VirtualMachineImage> =
            Api::namespaced(ctx.client.clone(), &img.namespace().unwrap_or_default());
        let patch = json!({
            "apiVersion": "vmlet.dev/v1alpha1",
            "kind": "VirtualMachineImage",
            "status": {"phase": phase},
        });
        api.patch_status(
            &img.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }
    Ok(Action::await_change())
}

pub fn error_policy(img: Arc<VirtualMachineImage>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_error("images", "kube");
    tracing::warn!(image = %img.name_any(), error = %err, "image phase not written");
    Action::requeue(Duration::from_secs(5))
}
