//! The part of a VirtualMachine's status the controller writes: `nodeName` (the binding)
//! and the placement conditions (Scheduled, NodeHealthy, DisksLeftBehind). The agent
//! writes the rest (phase and the runtime conditions); docs/status.md has who writes
//! what.
//!
//! Every controller write of a VM's status goes through [`apply`] with the controller's
//! whole part, as server-side apply expects of one manager: a field it stops sending is a
//! field it drops. Nothing is forced, because no other component writes these fields.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, ResourceExt};
use serde_json::json;

use super::FIELD_MANAGER;
use crate::api::conditions::{self, Type, Writer};
use crate::api::{VirtualMachine, VirtualMachineStatus};

/// The controller's part of one VM's status.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    pub node_name: Option<String>,
    /// Only types the controller writes, in a stable order.
    pub conditions: Vec<Condition>,
}

impl Binding {
    /// The controller's part as it stands in `status`.
    pub fn of(status: Option<&VirtualMachineStatus>) -> Self {
        let status = status.cloned().unwrap_or_default();
        let mut conditions: Vec<Condition> = status
            .conditions
            .into_iter()
            .filter(|c| Type::written_by(&c.type_, Writer::Controller))
            .collect();
        conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
        Binding {
            node_name: status.node_name,
            conditions,
        }
    }

    /// With condition `type_` set (its transition time kept when its status is the same).
    pub fn with(
        mut self,
        vm: &VirtualMachine,
        type_: Type,
        ok: bool,
        reason: &str,
        message: impl Into<String>,
    ) -> Self {
        debug_assert_eq!(type_.writer(), Writer::Controller);
        let c = conditions::new(
            &self.conditions,
            type_,
            ok,
            reason,
            message,
            vm.metadata.generation,
            Time(Timestamp::now()),
        );
        self.conditions.retain(|o| o.type_ != c.type_);
        self.conditions.push(c);
        self.conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
        self
    }

    pub fn bound_to(mut self, node: Option<&str>) -> Self {
        self.node_name = node.map(str::to_string);
        self
    }

    /// Whether writing `self` over what `vm` shows changes anything (a condition counts as
    /// unchanged when only its transition time would differ).
    pub fn differs_from(&self, vm: &VirtualMachine) -> bool {
        let old = Binding::of(vm.status.as_ref());
        let key = |c: &Condition| {
            (
                c.type_.clone(),
                c.status.clone(),
                c.reason.clone(),
                c.message.clone(),
                c.observed_generation,
            )
        };
        old.node_name != self.node_name
            || old
                .conditions
                .iter()
                .map(key)
                .ne(self.conditions.iter().map(key))
    }
}

/// Pure: the JSON patch that voids what the old node's agent reported about the VM's
/// instance there (its phase, runtime conditions, domain, interfaces, hardware), for
/// when the VM leaves that node. Kept: what outlives an instance (startTime,
/// restartCount, lastRestartRequest). The resourceVersion is tested first.
pub fn void_report(vm: &VirtualMachine) -> Option<serde_json::Value> {
    let st = vm.status.as_ref()?;
    let mut ops = vec![
        json!({"op": "test", "path": "/metadata/resourceVersion", "value": vm.resource_version()}),
    ];
    let present = [
        ("phase", st.phase.is_some()),
        ("observedGeneration", st.observed_generation.is_some()),
        ("domainUUID", st.domain_uuid.is_some()),
        ("interfaces", !st.interfaces.is_empty()),
        ("vcpus", st.vcpus.is_some()),
        ("memory", st.memory.is_some()),
        ("accel", st.accel.is_some()),
    ];
    for (field, there) in present {
        if there {
            ops.push(json!({"op": "remove", "path": format!("/status/{field}")}));
        }
    }
    // From the end, so that the indices stay right.
    for (i, c) in st.conditions.iter().enumerate().rev() {
        if Type::written_by(&c.type_, Writer::Agent) {
            ops.push(json!({"op": "test", "path": format!("/status/conditions/{i}/type"), "value": c.type_}));
            ops.push(json!({"op": "remove", "path": format!("/status/conditions/{i}")}));
        }
    }
    (ops.len() > 1).then_some(serde_json::Value::Array(ops))
}

/// Writes the controller's part of `vm`'s status when it differs from what `vm` shows,
/// with `vm`'s resourceVersion as precondition: a decision taken on a stale copy fails
/// with 409 and is taken again on fresh data. Returns the VM as written, if written.
///
/// A VM that leaves its node (unbound) also loses the old node's report first: the
/// phase and runtime conditions described an instance that no longer runs, and the next
/// node's agent writes its own (until then the phase reads Pending, the schema's
/// default). That is a handoff, not a second writer: no value of the agent's is set.
pub async fn apply(
    api: &Api<VirtualMachine>,
    vm: &VirtualMachine,
    new: Binding,
) -> Result<Option<VirtualMachine>, kube::Error> {
    if !new.differs_from(vm) {
        return Ok(None);
    }
    let leaves = new.node_name.is_none() && Binding::of(vm.status.as_ref()).node_name.is_some();
    let voided;
    let vm = match void_report(vm).filter(|_| leaves) {
        Some(ops) => {
            let ops: json_patch::Patch =
                serde_json::from_value(ops).map_err(kube::Error::SerdeError)?;
            voided = api
                .patch_status(
                    &vm.name_any(),
                    &crate::patch::by(FIELD_MANAGER),
                    &Patch::Json::<()>(ops),
                )
                .await?;
            &voided
        }
        None => vm,
    };
    let mut status = json!({"conditions": new.conditions});
    if let Some(node) = &new.node_name {
        status["nodeName"] = json!(node);
    }
    let patch = json!({
        "apiVersion": "vmlet.dev/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"resourceVersion": vm.resource_version()},
        "status": status,
    });
    api.patch_status(
        &vm.name_any(),
        &PatchParams::apply(FIELD_MANAGER),
        &Patch::Apply(&patch),
    )
    .await
    .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(node: Option<&str>, conds: &[(&str, &str, &str)]) -> VirtualMachine {
        let mut vm = VirtualMachine::new("v", serde_json::from_value(json!({})).unwrap());
        vm.metadata.generation = Some(1);
        vm.status = Some(VirtualMachineStatus {
            node_name: node.map(str::to_string),
            conditions: conds
                .iter()
                .map(|(t, s, r)| Condition {
                    type_: t.to_string(),
                    status: s.to_string(),
                    reason: r.to_string(),
                    message: String::new(),
                    observed_generation: Some(1),
                    last_transition_time: Time(Timestamp::from_second(0).unwrap()),
                })
                .collect(),
            ..Default::default()
        });
        vm
    }

    #[test]
    fn the_controller_reads_and_writes_only_its_part() {
        let v = vm(
            Some("a"),
            &[
                ("Ready", "True", "Running"),
                ("Scheduled", "True", "Scheduled"),
            ],
        );
        let b = Binding::of(v.status.as_ref());
        assert_eq!(b.node_name.as_deref(), Some("a"));
        assert_eq!(
            b.conditions.len(),
            1,
            "the agent's Ready is not the controller's"
        );
        assert!(!b.differs_from(&v), "nothing changed: no write");
        let moved = b.clone().bound_to(Some("b"));
        assert!(moved.differs_from(&v));
        let lost = b.with(&v, Type::NodeHealthy, false, "NodeLost", "");
        assert!(lost.differs_from(&v));
        assert_eq!(lost.node_name.as_deref(), Some("a"), "the binding is kept");
        assert_eq!(
            lost.conditions
                .iter()
                .map(|c| c.type_.as_str())
                .collect::<Vec<_>>(),
            ["NodeHealthy", "Scheduled"]
        );
    }

    #[test]
    fn leaving_a_node_voids_only_the_agents_report() {
        let mut v = vm(
            Some("a"),
            &[
                ("Ready", "True", "Running"),
                ("Scheduled", "True", "Scheduled"),
                ("DomainDefined", "True", "Defined"),
            ],
        );
        v.metadata.resource_version = Some("7".into());
        let st = v.status.as_mut().unwrap();
        st.phase = Some(crate::api::vm::Phase::Running);
        st.restart_count = Some(2);
        let ops = void_report(&v).unwrap();
        let paths: Vec<&str> = ops
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o["op"] == "remove")
            .map(|o| o["path"].as_str().unwrap())
            .collect();
        assert_eq!(
            paths,
            [
                "/status/phase",
                "/status/conditions/2",
                "/status/conditions/0"
            ]
        );
        let mut doc = serde_json::to_value(&v).unwrap();
        let ops: json_patch::Patch = serde_json::from_value(ops).unwrap();
        json_patch::patch(&mut doc, &ops).unwrap();
        let after: VirtualMachine = serde_json::from_value(doc).unwrap();
        let st = after.status.unwrap();
        assert_eq!(st.phase, None);
        assert_eq!(st.restart_count, Some(2), "what outlives an instance stays");
        assert_eq!(st.conditions.len(), 1);
        assert_eq!(st.conditions[0].type_, "Scheduled");
        // Nothing of the agent's there: nothing to void.
        let bare = vm(Some("a"), &[("Scheduled", "True", "Scheduled")]);
        assert!(void_report(&bare).is_none());
    }

    #[test]
    fn the_same_condition_again_keeps_its_time_and_writes_nothing() {
        let v = vm(Some("a"), &[("Scheduled", "True", "Scheduled")]);
        let again = Binding::of(v.status.as_ref()).with(&v, Type::Scheduled, true, "Scheduled", "");
        assert!(!again.differs_from(&v));
        assert_eq!(
            again.conditions[0].last_transition_time,
            Time(Timestamp::from_second(0).unwrap())
        );
        let unbound = Binding::of(v.status.as_ref()).bound_to(None);
        assert!(unbound.differs_from(&v));
    }
}
