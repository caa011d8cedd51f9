//! Each node's entry in a VirtualMachineImage's status: downloading (with the bytes so
//! far), ready (with the cached size), or failed (with the reason). Each agent writes only
//! its own entry, under a field manager of its own (the list is a map keyed by node), and
//! only when the entry changed; the controller sums the entries up into `status.phase`.

use kube::api::{Api, Patch, PatchParams, ResourceExt};
use serde_json::json;

use super::Context;
use super::images::ImageError;
use crate::api::image::{ImageNodeStatus, ImagePhase, VirtualMachineImage};

/// What one use of the image on this node found.
pub enum Found<'a> {
    Ready {
        size: Option<u64>,
    },
    Downloading {
        bytes: Option<u64>,
    },
    Failed(&'a ImageError),
    /// A published image's source is not ready to copy on this node.
    Waiting {
        reason: &'static str,
        message: String,
    },
}

/// Pure: this node's entry for what was found.
pub fn entry(node: &str, found: &Found<'_>) -> ImageNodeStatus {
    let to_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    match found {
        Found::Ready { size } => ImageNodeStatus {
            node: node.to_string(),
            phase: ImagePhase::Ready,
            size: size.map(to_i64),
            ..Default::default()
        },
        Found::Downloading { bytes } => ImageNodeStatus {
            node: node.to_string(),
            phase: ImagePhase::Downloading,
            bytes: bytes.map(to_i64),
            ..Default::default()
        },
        Found::Waiting { reason, message } => ImageNodeStatus {
            node: node.to_string(),
            phase: ImagePhase::Pending,
            reason: Some(reason.to_string()),
            message: Some(message.clone()),
            ..Default::default()
        },
        Found::Failed(e) => ImageNodeStatus {
            node: node.to_string(),
            phase: ImagePhase::Failed,
            reason: Some(e.reason().to_string()),
            message: Some(e.to_string()),
            ..Default::default()
        },
    }
}

/// Writes this node's entry when it differs from the one the image shows. A failure is
/// logged, not returned: the VM's own status already says what the image lacks.
pub async fn report(ctx: &Context, img: &VirtualMachineImage, found: Found<'_>) {
    let want = entry(&ctx.node, &found);
    let shown = img
        .status
        .as_ref()
        .and_then(|s| s.nodes.iter().find(|n| n.node == ctx.node));
    if shown == Some(&want) {
        return;
    }
    let api: Api<VirtualMachineImage> =
        Api::namespaced(ctx.client.clone(), &img.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": "vmlet.dev/v1alpha1",
        "kind": "VirtualMachineImage",
        "status": {"nodes": [want]},
    });
    // A manager per node: an apply removes what its manager owned and left out, so a
    // shared one would delete the other nodes' entries.
    let manager = format!("{}-{}", super::FIELD_MANAGER, ctx.node);
    if let Err(e) = api
        .patch_status(
            &img.name_any(),
            &PatchParams::apply(&manager).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        tracing::debug!(image = %img.name_any(), error = %e, "image status not written");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_say_what_this_node_found() {
        let ready = entry("n1", &Found::Ready { size: Some(42) });
        assert_eq!(
            (ready.phase, ready.size, ready.bytes),
            (ImagePhase::Ready, Some(42), None)
        );
        let dl = entry("n1", &Found::Downloading { bytes: Some(7) });
        assert_eq!((dl.phase, dl.bytes), (ImagePhase::Downloading, Some(7)));
        let err = ImageError::NotAFile("/x".into());
        let failed = entry("n1", &Found::Failed(&err));
        assert_eq!(failed.phase, ImagePhase::Failed);
        assert_eq!(failed.reason.as_deref(), Some("ImagePathRefused"));
        assert_eq!(
            failed.message.as_deref(),
            Some("hostPath /x is not a regular file")
        );
        assert_eq!(failed.node, "n1");
    }
}
