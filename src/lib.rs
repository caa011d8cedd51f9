//! vmlet: virtual machines as Kubernetes custom resources.
//!
//! `api` holds the CRD types; `agent` turns VMs bound to a node into libvirt domains;
//! `controller` places VMs on nodes; `subresources` serves the aggregated API that opens
//! VM consoles and displays through the agents. None of the three imports another.

pub mod agent;
pub mod api;
pub mod controller;
pub mod http;
pub mod kubeconfig;
pub mod kubectl;
pub mod memory;
pub mod patch;
pub mod shutdown;
pub mod subresources;
pub mod telemetry;
pub mod tls;
pub mod watch;
