//! Before an agent fences itself it asks its peers whether they reach the API server. An
//! agent cannot tell being cut off from an API server outage by itself; its peers can.
//!
//! - A peer that reaches the API server means this node is isolated: fence.
//! - When this agent and the peers that answer "cannot reach it either" are a strict
//!   majority of all hypervisors, it is an outage: do not fence. The controller moves VMs
//!   off silent nodes only while silent nodes are at most half of all hypervisors
//!   (`2 * lost <= total`), so it never moves the VMs of a group that skipped fencing:
//!   that group alone is more than half, and all of it is silent.
//! - Otherwise (no answer, or a minority) fence, as without peers.
//!
//! Answers are authenticated with HMAC-SHA256 over the asker's random nonce, under a key
//! every agent of the cluster shares (`--peer-key-file`; the chart makes it a Secret), so
//! an observer on the node network can neither forge nor replay "cannot reach it either"
//! to keep a cut-off node from fencing. Without a key, agents fence as they always did.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// How long one peer may take to answer.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(1);

/// What the watchdog does once renewals have failed for the fence delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Fence,
    /// An outage shared by a majority: keep the domains running.
    Outage,
}

/// Pure: `total` hypervisors known (this one included); one answer per peer asked:
/// Some(reachable) when it answered with a valid MAC, None otherwise.
pub fn decide(total: usize, answers: &[Option<bool>]) -> Verdict {
    if answers.contains(&Some(true)) {
        return Verdict::Fence;
    }
    let silent = 1 + answers.iter().filter(|a| **a == Some(false)).count();
    if 2 * silent > total.max(silent) {
        Verdict::Outage
    } else {
        Verdict::Fence
    }
}

/// A peer's answer on the wire.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Answer {
    pub node: String,
    pub reachable: bool,
    pub mac: String,
}

fn mac(key: &[u8], nonce: &str, node: &str, reachable: bool) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(format!("vmlet-peer-v1|{nonce}|{node}|{reachable}").as_bytes());
    m
}

/// The answer this agent gives to `nonce`.
pub fn answer(key: &[u8], nonce: &str, node: &str, reachable: bool) -> Answer {
    Answer {
        node: node.to_string(),
        reachable,
        mac: hex::encode(mac(key, nonce, node, reachable).finalize().into_bytes()),
    }
}

/// Whether `a` is `node`'s genuine answer to `nonce` (constant-time MAC check).
pub fn verify(key: &[u8], nonce: &str, node: &str, a: &Answer) -> Option<bool> {
    let tag = hex::decode(&a.mac).ok()?;
    (a.node == node)
        .then(|| mac(key, nonce, node, a.reachable).verify_slice(&tag).ok())
        .flatten()
        .map(|()| a.reachable)
}

/// A fresh random nonce (hex).
pub fn nonce() -> std::io::Result<String> {
    let mut b = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut b)?;
    Ok(hex::encode(b))
}

/// Asks each peer (name, agent URL) at once; each gets [`PEER_TIMEOUT`].
pub async fn ask(
    http: &reqwest::Client,
    key: &[u8],
    peers: &[(String, String)],
) -> Vec<Option<bool>> {
    let Ok(nonce) = nonce() else {
        return vec![None; peers.len()];
    };
    let asks = peers.iter().map(|(node, url)| {
        let nonce = nonce.clone();
        async move {
            let url = format!("{}/peer/apiserver?nonce={nonce}", url.trim_end_matches('/'));
            let body = tokio::time::timeout(PEER_TIMEOUT, async {
                http.get(&url)
                    .send()
                    .await?
                    .error_for_status()?
                    .bytes()
                    .await
            })
            .await
            .ok()?
            .ok()?;
            // An answer is a few dozen bytes: anything else is not one.
            if body.len() > 4096 {
                return None;
            }
            let resp: Answer = serde_json::from_slice(&body).ok()?;
            verify(key, &nonce, node, &resp)
        }
    });
    futures::future::join_all(asks).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_majority_that_cannot_reach_the_api_server_does_not_fence() {
        use Verdict::*;
        let (y, n, x) = (Some(true), Some(false), None);
        // (hypervisors, answers from the others) -> verdict
        let table: [(usize, &[Option<bool>], Verdict); 10] = [
            (1, &[], Outage),           // alone: nowhere to move its VMs anyway
            (2, &[x], Fence),           // half is not a majority
            (2, &[n], Outage),          // both silent
            (2, &[y], Fence),           // the other reaches it: isolated
            (3, &[x, x], Fence),        // nobody answers
            (3, &[n, x], Outage),       // 2 of 3 silent
            (3, &[n, y], Fence),        // one reaches it
            (5, &[n, x, x, x], Fence),  // 2 of 5
            (5, &[n, n, x, x], Outage), // 3 of 5
            (4, &[n, x, x], Fence),     // 2 of 4: the controller may move them
        ];
        for (total, answers, want) in table {
            assert_eq!(decide(total, answers), want, "{total} {answers:?}");
        }
    }

    #[test]
    fn answers_are_bound_to_key_nonce_and_node() {
        let a = answer(b"k", "n1", "node-a", false);
        assert_eq!(verify(b"k", "n1", "node-a", &a), Some(false));
        assert_eq!(verify(b"other", "n1", "node-a", &a), None, "wrong key");
        assert_eq!(verify(b"k", "n2", "node-a", &a), None, "replayed");
        assert_eq!(verify(b"k", "n1", "node-b", &a), None, "another node's");
        let forged = Answer {
            reachable: true,
            ..a.clone()
        };
        assert_eq!(verify(b"k", "n1", "node-a", &forged), None, "flipped");
    }
}
