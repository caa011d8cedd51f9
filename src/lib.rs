//! vmlet: virtual machines as Kubernetes custom resources.
//!
//! `api` holds the CRD types; `agent` turns VMs bound to a node into libvirt domains;
//! `controller` places VMs on nodes. Controller and agent never import each other.

pub mod agent;
pub mod api;
pub mod controller;
pub mod http;
pub mod kubeconfig;
pub mod kubectl;
pub mod patch;
pub mod shutdown;
pub mod telemetry;
pub mod watch;
