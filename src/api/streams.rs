//! `subresources.vmlet.dev`: the aggregated API that opens a VM's serial console or VNC
//! display, and the one-line handshake its server sends the agent of the VM's node over
//! mutual TLS before the bytes flow.

use serde::{Deserialize, Serialize};

/// The aggregated API's group and version.
pub const GROUP: &str = "subresources.vmlet.dev";
pub const VERSION: &str = "v1alpha1";
/// The APIService that registers it: `<version>.<group>`.
pub const API_SERVICE: &str = "v1alpha1.subresources.vmlet.dev";

/// What a stream connects to.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StreamKind {
    /// The serial console, interactive.
    Console,
    /// The VNC server (RFB).
    Vnc,
}

impl StreamKind {
    /// The subresource's name under `virtualmachines/`.
    pub fn subresource(self) -> &'static str {
        match self {
            StreamKind::Console => "console",
            StreamKind::Vnc => "vnc",
        }
    }

    pub fn from_subresource(s: &str) -> Option<Self> {
        match s {
            "console" => Some(StreamKind::Console),
            "vnc" => Some(StreamKind::Vnc),
            _ => None,
        }
    }
}

/// The first line the API component sends the agent: which VM (its uid guards against a
/// VM recreated under the same name meanwhile) and what to open.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct StreamRequest {
    pub kind: StreamKind,
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// The agent's one-line answer; raw bytes follow when there is no error.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamReply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Handshake lines are short; a longer one is refused.
pub const MAX_HANDSHAKE: usize = 4096;
