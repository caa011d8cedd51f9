//! `GET /console/{namespace}/{name}[?follow=1]`: a VM's serial console log, for
//! `kubectl vm console`. The caller's bearer token is checked with a TokenReview and the
//! caller must be allowed `get` on `virtualmachines/console` (a SubjectAccessReview), as
//! the kubelet does for its own API. Only VMs bound to this node are served, and the file
//! is found by the VM's uid, never by a path from the request.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::Context;
use super::layout::console_log;
use crate::http::{Body, Bytes, Reply, Request};

/// The most a non-following request returns: the end of the log.
const TAIL_BYTES: u64 = 1 << 20;

async fn authorize(ctx: &Context, token: &str, namespace: &str, name: &str) -> Result<(), Reply> {
    let reviews: Api<TokenReview> = Api::all(ctx.client.clone());
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            ..Default::default()
        },
        ..Default::default()
    };
    let status = reviews
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| Reply::error(503, format!("token review failed: {e}")))?
        .status
        .unwrap_or_default();
    let user = match (status.authenticated, status.user) {
        (Some(true), Some(user)) => user,
        _ => return Err(Reply::error(401, "invalid bearer token")),
    };
    let sar = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username.clone(),
            uid: user.uid,
            groups: user.groups,
            extra: user.extra,
            resource_attributes: Some(ResourceAttributes {
                group: Some("vmlet.dev".into()),
                resource: Some("virtualmachines".into()),
                subresource: Some("console".into()),
                verb: Some("get".into()),
                namespace: Some(namespace.into()),
                name: Some(name.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let reviews: Api<SubjectAccessReview> = Api::all(ctx.client.clone());
    let allowed = reviews
        .create(&PostParams::default(), &sar)
        .await
        .map_err(|e| Reply::error(503, format!("access review failed: {e}")))?
        .status
        .is_some_and(|s| s.allowed);
    if !allowed {
        let who = user.username.unwrap_or_default();
        return Err(Reply::error(
            403,
            format!("{who} may not get virtualmachines/console {namespace}/{name}"),
        ));
    }
    Ok(())
}

pub async fn handle(ctx: &Context, req: Request) -> Reply {
    let parts: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    let [_, namespace, name] = parts[..] else {
        return Reply::error(404, "use /console/NAMESPACE/NAME");
    };
    let Some(token) = req.bearer.as_deref() else {
        return Reply::error(401, "a bearer token is required");
    };
    if let Err(reply) = authorize(ctx, token, namespace, name).await {
        return reply;
    }
    let vm = ctx.vms.state().into_iter().find(|vm| {
        vm.metadata.namespace.as_deref() == Some(namespace)
            && vm.metadata.name.as_deref() == Some(name)
    });
    let Some(uid) = vm.and_then(|vm| vm.metadata.uid.clone()) else {
        return Reply::error(
            404,
            format!("no VM {namespace}/{name} on node {}", ctx.node),
        );
    };
    let path = console_log(&ctx.facts.state_dir, &uid);
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(_) => return Reply::error(404, "the VM has no console output yet"),
    };
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let _ = file
        .seek(std::io::SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))
        .await;
    if !req.flag("follow") {
        let mut buf = Vec::new();
        let _ = file.read_to_end(&mut buf).await;
        return Reply::ok("text/plain; charset=utf-8", buf);
    }
    // Follow: what is there, then what the guest writes, until the client goes away.
    let stream = futures::stream::unfold(file, |mut file| async move {
        loop {
            let mut buf = vec![0u8; 64 * 1024];
            match file.read(&mut buf).await {
                Ok(0) => tokio::time::sleep(Duration::from_millis(200)).await,
                Ok(n) => {
                    buf.truncate(n);
                    return Some((Bytes::from(buf), file));
                }
                Err(_) => return None,
            }
        }
    });
    Reply {
        status: 200,
        content_type: "text/plain; charset=utf-8",
        body: Body::Stream(stream.boxed()),
    }
}
