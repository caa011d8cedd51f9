//! A VM's readiness probe, shaped as a Pod's: one handler, then periods and thresholds
//! with Kubernetes' defaults.

use std::time::Duration;

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How the node's agent finds out whether the VM is ready for traffic.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[x_kube(validation = Rule::new("[has(self.tcpSocket), has(self.httpGet), has(self.exec)].exists_one(x, x)").message("exactly one of tcpSocket, httpGet or exec must be set"))]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    /// Ready when a TCP connection to the port of the guest's address opens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocketAction>,
    /// Ready when an HTTP GET to the guest's address answers with a status from 200 to 399.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGetAction>,
    /// Ready when the command, run in the guest by the QEMU guest agent, exits 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecAction>,
    /// Seconds after the domain starts before the first probe. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub initial_delay_seconds: Option<i32>,
    /// Seconds between probes. Default 10, at least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub period_seconds: Option<i32>,
    /// Seconds one probe may take. Default 1, at least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: Option<i32>,
    /// Successes in a row that make a not-ready VM ready. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub success_threshold: Option<i32>,
    /// Failures in a row that make a ready VM not ready. Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_threshold: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TcpSocketAction {
    /// The port on the guest's address.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpGetAction {
    /// The port on the guest's address.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// The request's path. Default "/".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^/[\x21-\x7e]*$"))]
    pub path: Option<String>,
    /// http (default) or https (the guest's certificate is not verified, as kubelet does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<Scheme>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Scheme {
    #[default]
    Http,
    Https,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecAction {
    /// The program (an absolute path in the guest) and its arguments; no shell.
    #[schemars(length(min = 1, max = 64))]
    pub command: Vec<String>,
}

impl Probe {
    pub fn initial_delay(&self) -> Duration {
        secs(self.initial_delay_seconds, 0)
    }
    pub fn period(&self) -> Duration {
        secs(self.period_seconds, 10)
    }
    pub fn timeout(&self) -> Duration {
        secs(self.timeout_seconds, 1)
    }
    pub fn success_threshold(&self) -> u32 {
        self.success_threshold.unwrap_or(1).max(1) as u32
    }
    pub fn failure_threshold(&self) -> u32 {
        self.failure_threshold.unwrap_or(3).max(1) as u32
    }
}

fn secs(v: Option<i32>, default: u64) -> Duration {
    Duration::from_secs(v.map(|v| v.max(0) as u64).unwrap_or(default))
}
