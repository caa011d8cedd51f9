//! Services for VMs: a Service without a Pod selector that carries the
//! `vmlet.dev/selector` annotation gets EndpointSlices, kept by the controller, that hold
//! the addresses of the VMs (in its namespace) the selector matches, with the Service's
//! ports; an endpoint is ready while its VM's `Ready` condition is true. Everything that
//! reads EndpointSlices (kube-proxy, DNS, ingress and mesh controllers) then treats the
//! VMs as it treats Pods.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, ResourceExt};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};

use super::{Context, FIELD_MANAGER};
use crate::api::{ENDPOINTSLICE_MANAGER, SERVICE_SELECTOR_ANNOTATION, VirtualMachine, conditions};

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

/// What a Service's annotation comes to: the slices it should have, or why none.
#[derive(Debug, PartialEq)]
pub enum Want {
    /// Not a Service for VMs (no annotation): vmlet keeps no slices for it.
    NotOurs,
    /// The annotation cannot be followed; the reason and message of the Event that says so.
    Refused(&'static str, String),
    Slices(Vec<EndpointSlice>),
}

/// The EndpointSlices of `svc`: one per address family that its VMs have addresses in
/// (an IPv4 one, empty, when none has any), each endpoint a VM's first confirmed address
/// in that family, ready when the VM is Ready, with the Service's ports (a numeric targetPort
/// is the port on the VM; a named one has nothing to name on a VM and is refused).
pub fn desired(svc: &Service, vms: &[Arc<VirtualMachine>]) -> Want {
    let Some(text) = svc.annotations().get(SERVICE_SELECTOR_ANNOTATION) else {
        return Want::NotOurs;
    };
    let spec = svc.spec.clone().unwrap_or_default();
    if spec.selector.as_ref().is_some_and(|s| !s.is_empty()) {
        return Want::Refused(
            "SelectorConflict",
            format!(
                "the Service selects Pods; {SERVICE_SELECTOR_ANNOTATION} needs a Service without spec.selector"
            ),
        );
    }
    let sel = match super::selector::parse(text) {
        Ok(s) => s,
        Err(e) => {
            return Want::Refused(
                "InvalidSelector",
                format!("{SERVICE_SELECTOR_ANNOTATION}: {e}"),
            );
        }
    };
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        let port = match &p.target_port {
            Some(IntOrString::Int(n)) => *n,
            None => p.port,
            Some(IntOrString::String(name)) => {
                return Want::Refused(
                    "NamedTargetPort",
                    format!(
                        "port {}: a VM has no named port {name:?}; give targetPort as a number",
                        p.port
                    ),
                );
            }
        };
        ports.push(EndpointPort {
            name: p.name.clone(),
            port: Some(port),
            protocol: Some(p.protocol.clone().unwrap_or_else(|| "TCP".into())),
            app_protocol: p.app_protocol.clone(),
        });
    }
    let ns = svc.namespace().unwrap_or_default();
    let mut chosen: Vec<&Arc<VirtualMachine>> = vms
        .iter()
        .filter(|vm| vm.namespace().as_deref() == Some(ns.as_str()))
        .filter(|vm| super::selector::matches(&sel, vm.labels()))
        .collect();
    chosen.sort_by_key(|vm| vm.name_any());
    let mut by_family: BTreeMap<&'static str, Vec<Endpoint>> = BTreeMap::new();
    for vm in chosen {
        for (family, ip) in first_per_family(vm) {
            by_family.entry(family).or_default().push(endpoint(vm, ip));
        }
    }
    if by_family.is_empty() {
        by_family.insert("IPv4", Vec::new());
    }
    Want::Slices(
        by_family
            .into_iter()
            .map(|(family, endpoints)| slice(svc, family, endpoints, ports.clone()))
            .collect(),
    )
}

/// The VM's first confirmed address in each family (one the node saw it use, not only
/// what its guest agent claims), across its interfaces in order.
fn first_per_family(vm: &VirtualMachine) -> Vec<(&'static str, String)> {
    let mut out: Vec<(&'static str, String)> = Vec::new();
    let ips = vm
        .status
        .iter()
        .flat_map(|s| s.interfaces.iter())
        .flat_map(|i| i.confirmed_addresses.iter());
    for ip in ips {
        let Ok(parsed) = ip.parse::<std::net::IpAddr>() else {
            continue;
        };
        let family = if parsed.is_ipv4() { "IPv4" } else { "IPv6" };
        if !out.iter().any(|(f, _)| *f == family) {
            out.push((family, parsed.to_string()));
        }
    }
    out
}

fn endpoint(vm: &VirtualMachine, ip: String) -> Endpoint {
    let status = vm.status.clone().unwrap_or_default();
    let ready = conditions::is_true(&status.conditions, conditions::Type::Ready);
    let terminating = vm.metadata.deletion_timestamp.is_some()
        || status.phase == Some(crate::api::vm::Phase::Stopping);
    Endpoint {
        addresses: vec![ip],
        conditions: Some(EndpointConditions {
            ready: Some(ready && !terminating),
            serving: Some(ready),
            terminating: Some(terminating),
        }),
        node_name: status.node_name.clone(),
        target_ref: Some(ObjectReference {
            api_version: Some("vmlet.dev/v1alpha1".into()),
            kind: Some("VirtualMachine".into()),
            name: vm.metadata.name.clone(),
            namespace: vm.metadata.namespace.clone(),
            uid: vm.metadata.uid.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice(
    svc: &Service,
    family: &str,
    endpoints: Vec<Endpoint>,
    ports: Vec<EndpointPort>,
) -> EndpointSlice {
    let name = svc.name_any();
    EndpointSlice {
        metadata: kube::api::ObjectMeta {
            name: Some(format!("{name}-vmlet-{}", family.to_lowercase())),
            namespace: svc.namespace(),
            labels: Some(BTreeMap::from([
                (SERVICE_NAME_LABEL.to_string(), name.clone()),
                (
                    MANAGED_BY_LABEL.to_string(),
                    ENDPOINTSLICE_MANAGER.to_string(),
                ),
            ])),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Service".into(),
                name,
                uid: svc.uid().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: None,
            }]),
            ..Default::default()
        },
        address_type: family.to_string(),
        endpoints,
        ports: Some(ports),
    }
}

/// Whether the slice as stored already says what `want` says.
fn same(have: &EndpointSlice, want: &EndpointSlice) -> bool {
    have.address_type == want.address_type
        && have.endpoints == want.endpoints
        && have.ports.clone().unwrap_or_default() == want.ports.clone().unwrap_or_default()
        && have.metadata.labels == want.metadata.labels
        && have.metadata.owner_references == want.metadata.owner_references
}

pub async fn reconcile(svc: Arc<Service>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = svc.namespace().unwrap_or_default();
    let slices: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
    let mine = ListParams::default().labels(&format!(
        "{SERVICE_NAME_LABEL}={},{MANAGED_BY_LABEL}={ENDPOINTSLICE_MANAGER}",
        svc.name_any()
    ));
    let have = slices.list(&mine).await?.items;
    // Read fresh, not from the controller's VM cache: the VM event that brought us here
    // may be ahead of it. The API server filters with the annotation's selector (the
    // same syntax), once it has parsed here.
    let vms = match svc.annotations().get(SERVICE_SELECTOR_ANNOTATION) {
        Some(text) if super::selector::parse(text).is_ok() => {
            let api: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &ns);
            let list = api.list(&ListParams::default().labels(text)).await?;
            list.items.into_iter().map(Arc::new).collect()
        }
        _ => Vec::new(),
    };
    let want = match desired(&svc, &vms) {
        Want::Slices(s) if svc.metadata.deletion_timestamp.is_none() => s,
        Want::Refused(reason, note) => {
            refuse(&ctx, &svc, reason, note).await;
            Vec::new()
        }
        _ => Vec::new(),
    };
    for w in &want {
        let current = have.iter().find(|h| h.metadata.name == w.metadata.name);
        if current.is_some_and(|h| same(h, w)) {
            continue;
        }
        slices
            .patch(
                &w.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(w),
            )
            .await?;
    }
    for h in &have {
        if !want.iter().any(|w| w.metadata.name == h.metadata.name) {
            slices
                .delete(&h.name_any(), &DeleteParams::default())
                .await?;
        }
    }
    Ok(Action::await_change())
}

async fn refuse(ctx: &Context, svc: &Service, reason: &str, note: String) {
    ctx.record(svc, EventType::Warning, reason, note, "KeepEndpoints");
}

pub fn error_policy(_svc: Arc<Service>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_error("services", "kube");
    tracing::warn!(error = %err, "keeping a Service's endpoints failed");
    Action::requeue(Duration::from_secs(5))
}

/// Runs the Services controller: a Service is looked at again when it changes, when one
/// of its slices does, and when a VM in its namespace does.
pub async fn run(
    ctx: Arc<Context>,
    vms: impl futures::Stream<Item = Result<VirtualMachine, watcher::Error>> + Send + 'static,
) {
    let client = ctx.client.clone();
    let (services, writer) = reflector::store::<Service>();
    let svc_stream = reflector::reflector(
        writer,
        crate::watch::slim(watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        )),
    )
    .default_backoff()
    .touched_objects();
    let by_namespace = services.clone();
    Controller::for_stream(svc_stream, services)
        .owns(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default()
                .labels(&format!("{MANAGED_BY_LABEL}={ENDPOINTSLICE_MANAGER}")),
        )
        .watches_stream(vms, move |vm: VirtualMachine| {
            let ns = vm.namespace();
            by_namespace
                .state()
                .into_iter()
                .filter(|s| s.namespace() == ns)
                .filter(|s| s.annotations().contains_key(SERVICE_SELECTOR_ANNOTATION))
                .map(|s| ObjectRef::from(&*s))
                .collect::<Vec<_>>()
        })
        .with_config(
            kube::runtime::controller::Config::default().debounce(Duration::from_millis(200)),
        )
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::vm::{InterfaceStatus, Phase};
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn svc(annotation: Option<&str>, ports: Vec<ServicePort>, pod_selector: bool) -> Service {
        let mut s = Service {
            metadata: kube::api::ObjectMeta {
                name: Some("web".into()),
                namespace: Some("ns".into()),
                uid: Some("svc-uid".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                ports: Some(ports),
                selector: pod_selector.then(|| BTreeMap::from([("app".into(), "x".into())])),
                ..Default::default()
            }),
            ..Default::default()
        };
        if let Some(a) = annotation {
            s.annotations_mut()
                .insert(SERVICE_SELECTOR_ANNOTATION.into(), a.into());
        }
        s
    }

    fn port(port: i32, target: Option<IntOrString>) -> ServicePort {
        ServicePort {
            name: Some(format!("p{port}")),
            port,
            target_port: target,
            ..Default::default()
        }
    }

    fn vm(
        name: &str,
        ns: &str,
        app: &str,
        ips: &[&str],
        ready: bool,
        phase: Phase,
    ) -> Arc<VirtualMachine> {
        let mut vm = VirtualMachine::new(name, Default::default());
        vm.metadata.namespace = Some(ns.into());
        vm.metadata.uid = Some(format!("{name}-uid"));
        vm.labels_mut().insert("app".into(), app.into());
        vm.status = Some(crate::api::VirtualMachineStatus {
            phase: Some(phase),
            node_name: Some("n1".into()),
            interfaces: vec![InterfaceStatus {
                name: "net".into(),
                ip_address: ips.first().map(|s| s.to_string()),
                ip_addresses: ips.iter().map(|s| s.to_string()).collect(),
                confirmed_addresses: ips.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }],
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                reason: "x".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            }],
            ..Default::default()
        });
        Arc::new(vm)
    }

    /// (slice name, address type, [(address, ready, terminating)], [port])
    type Summary = Vec<(String, String, Vec<(String, bool, bool)>, Vec<i32>)>;

    fn summary(want: Want) -> Result<Summary, &'static str> {
        match want {
            Want::NotOurs => Err("not ours"),
            Want::Refused(r, _) => Err(r),
            Want::Slices(s) => Ok(s
                .into_iter()
                .map(|s| {
                    let eps = s
                        .endpoints
                        .iter()
                        .map(|e| {
                            let c = e.conditions.clone().unwrap();
                            (
                                e.addresses[0].clone(),
                                c.ready.unwrap(),
                                c.terminating.unwrap(),
                            )
                        })
                        .collect();
                    let ports = s.ports.unwrap().iter().map(|p| p.port.unwrap()).collect();
                    (s.metadata.name.unwrap(), s.address_type, eps, ports)
                })
                .collect()),
        }
    }

    #[test]
    #[allow(clippy::type_complexity)] // a table
    fn slices_hold_the_selected_vms_addresses_with_the_services_ports() {
        use Phase::*;
        let p80 = vec![port(80, Some(IntOrString::Int(8080)))];
        let web = |n, ips: &[&str], ready| vm(n, "ns", "web", ips, ready, Running);
        let s = |n: &str, fam: &str, eps: Vec<(&str, bool, bool)>, ports: Vec<i32>| {
            (
                n.to_string(),
                fam.to_string(),
                eps.into_iter()
                    .map(|(a, r, t)| (a.to_string(), r, t))
                    .collect(),
                ports,
            )
        };
        let cases: Vec<(
            &str,
            Service,
            Vec<Arc<VirtualMachine>>,
            Result<Summary, &str>,
        )> = vec![
            (
                "no annotation",
                svc(None, p80.clone(), false),
                vec![web("a", &["10.0.0.1"], true)],
                Err("not ours"),
            ),
            (
                "a Pod selector too",
                svc(Some("app=web"), p80.clone(), true),
                vec![],
                Err("SelectorConflict"),
            ),
            (
                "a bad selector",
                svc(Some("app in (web"), p80.clone(), false),
                vec![],
                Err("InvalidSelector"),
            ),
            (
                "a named target port",
                svc(
                    Some("app=web"),
                    vec![port(80, Some(IntOrString::String("http".into())))],
                    false,
                ),
                vec![],
                Err("NamedTargetPort"),
            ),
            (
                "nothing selected: one empty IPv4 slice",
                svc(Some("app=web"), p80.clone(), false),
                vec![vm("a", "ns", "db", &["10.0.0.1"], true, Running)],
                Ok(vec![s("web-vmlet-ipv4", "IPv4", vec![], vec![8080])]),
            ),
            (
                "ready and not ready, sorted by VM; another namespace is left out",
                svc(Some("app=web"), p80.clone(), false),
                vec![
                    web("b", &["10.0.0.2"], false),
                    web("a", &["10.0.0.1"], true),
                    vm("c", "other", "web", &["10.0.0.3"], true, Running),
                ],
                Ok(vec![s(
                    "web-vmlet-ipv4",
                    "IPv4",
                    vec![("10.0.0.1", true, false), ("10.0.0.2", false, false)],
                    vec![8080],
                )]),
            ),
            (
                "a VM without an address has no endpoint",
                svc(Some("app=web"), p80.clone(), false),
                vec![web("a", &[], true)],
                Ok(vec![s("web-vmlet-ipv4", "IPv4", vec![], vec![8080])]),
            ),
            (
                "dual stack: a slice per family, the first address of each",
                svc(Some("app=web"), vec![port(53, None)], false),
                vec![web("a", &["10.0.0.1", "10.0.0.9", "fd00::1"], true)],
                Ok(vec![
                    s(
                        "web-vmlet-ipv4",
                        "IPv4",
                        vec![("10.0.0.1", true, false)],
                        vec![53],
                    ),
                    s(
                        "web-vmlet-ipv6",
                        "IPv6",
                        vec![("fd00::1", true, false)],
                        vec![53],
                    ),
                ]),
            ),
            (
                "a stopping VM is terminating, not ready",
                svc(Some("app=web"), p80.clone(), false),
                vec![vm("a", "ns", "web", &["10.0.0.1"], true, Stopping)],
                Ok(vec![s(
                    "web-vmlet-ipv4",
                    "IPv4",
                    vec![("10.0.0.1", false, true)],
                    vec![8080],
                )]),
            ),
        ];
        for (why, svc, vms, want) in cases {
            assert_eq!(summary(desired(&svc, &vms)), want, "{why}");
        }
    }

    #[test]
    fn a_slice_names_its_service_and_vm() {
        let vms = vec![vm("a", "ns", "web", &["10.0.0.1"], true, Phase::Running)];
        let Want::Slices(s) = desired(&svc(Some("app=web"), vec![port(80, None)], false), &vms)
        else {
            panic!("no slices");
        };
        let labels = s[0].metadata.labels.clone().unwrap();
        assert_eq!(labels[SERVICE_NAME_LABEL], "web");
        assert_eq!(labels[MANAGED_BY_LABEL], ENDPOINTSLICE_MANAGER);
        assert_eq!(
            s[0].metadata.owner_references.as_ref().unwrap()[0].uid,
            "svc-uid"
        );
        let t = s[0].endpoints[0].target_ref.clone().unwrap();
        assert_eq!(
            (t.kind.as_deref(), t.name.as_deref()),
            (Some("VirtualMachine"), Some("a"))
        );
        assert_eq!(s[0].endpoints[0].node_name.as_deref(), Some("n1"));
        assert_eq!(
            s[0].ports.as_ref().unwrap()[0].protocol.as_deref(),
            Some("TCP")
        );
    }
}
