//! What the agent tells the API about a VM: phase, conditions and the rest, written with
//! server-side apply as `vmlet-agent`, and only when something changed.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::api::{Api, Patch, PatchParams, ResourceExt};
use kube::runtime::events::{Event, EventType};
use serde::Serialize;
use serde_json::json;

use super::libvirt::RunState;
use super::render::Hardware;
use super::{Context, FIELD_MANAGER};
use crate::api::conditions;
use crate::api::quantity::Bytes;
use crate::api::vm::{InterfaceStatus, Phase};
use crate::api::{VirtualMachine, VirtualMachineStatus};

/// What becomes of a VM that cannot run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Something on the node may fix itself or be fixed there (a download, a missing
    /// package, libvirt): the agent keeps trying and the VM is Pending.
    Retrying,
    /// The spec (or an object it names) must change first: the VM is Failed.
    NeedsChange,
}

/// How often a VM whose problem is `Retrying` is tried again.
pub const PROBLEM_RETRY: Duration = Duration::from_secs(15);

/// Why a VM cannot run, as a condition reason and message.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
    pub retry: Retry,
    /// When the agent tries again, if not after [`PROBLEM_RETRY`] (a start's backoff).
    pub after: Option<Duration>,
}

impl Problem {
    pub fn retrying(reason: &'static str, message: impl Into<String>) -> Self {
        Problem {
            reason,
            message: message.into(),
            retry: Retry::Retrying,
            after: None,
        }
    }

    pub fn needs_change(reason: &'static str, message: impl Into<String>) -> Self {
        Problem {
            reason,
            message: message.into(),
            retry: Retry::NeedsChange,
            after: None,
        }
    }

    pub fn after(mut self, d: Duration) -> Self {
        self.after = Some(d);
        self
    }

    /// When the agent looks at the VM again.
    pub fn requeue(&self) -> Duration {
        match self.retry {
            Retry::Retrying => self.after.unwrap_or(PROBLEM_RETRY),
            // Changes to the VM trigger a reconcile; the periodic one catches changes to
            // the objects it names.
            Retry::NeedsChange => super::REQUEUE,
        }
    }

    /// The condition message: what went wrong, then what happens next.
    fn condition_message(&self) -> String {
        match self.retry {
            // A problem with its own timing says when in its message.
            Retry::Retrying if self.after.is_some() => self.message.clone(),
            Retry::Retrying => format!(
                "{}; the agent retries every {} s",
                self.message,
                PROBLEM_RETRY.as_secs()
            ),
            Retry::NeedsChange => format!(
                "{}; change the VM (or what it names) and the agent tries again",
                self.message
            ),
        }
    }
}

/// What one reconcile saw and did.
#[derive(Debug, Default)]
pub struct Observed {
    pub defined: bool,
    pub state: Option<RunState>,
    pub want_running: bool,
    pub stopped_by_us: bool,
    /// The agent asked the guest to shut down and waits for it (or the grace period).
    pub shutting_down: bool,
    pub restart_required: bool,
    pub backing_off: Option<Duration>,
    /// Failures in a row (for the backoff message).
    pub failures: u32,
    pub restarted: bool,
    pub started_now: bool,
    pub addresses: Vec<super::libvirt::Address>,
    /// The readiness probe's verdict, when the VM has one.
    pub readiness: Option<super::probes::Readiness>,
    pub hardware: Option<Hardware>,
    /// A restart request that was carried out in this reconcile.
    pub restart_handled: Option<String>,
}

/// The part of the status the agent owns.
#[derive(Serialize, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
struct AgentStatus {
    phase: Phase,
    #[serde(skip_serializing_if = "Option::is_none")]
    observed_generation: Option<i64>,
    conditions: Vec<Condition>,
    #[serde(rename = "domainUUID", skip_serializing_if = "Option::is_none")]
    domain_uuid: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    interfaces: Vec<InterfaceStatus>,
    restart_count: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    start_time: Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vcpus: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory: Option<String>,
    accel: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_restart_request: Option<String>,
}

fn phase_of(o: &Observed, problem: Option<&Problem>) -> Phase {
    let running = matches!(o.state, Some(RunState::Running | RunState::Paused));
    if let Some(p) = problem {
        if running {
            return Phase::Running;
        }
        return match p.retry {
            Retry::Retrying => Phase::Pending,
            Retry::NeedsChange => Phase::Failed,
        };
    }
    match o.state {
        None => Phase::Pending,
        // Asked to shut down: not ready for traffic, though the guest still runs.
        Some(RunState::Running | RunState::Paused) if o.shutting_down => Phase::Stopping,
        // Moved by a migration not yet settled: the guest runs, on the target.
        Some(RunState::Running | RunState::Paused | RunState::MigratedAway) => Phase::Running,
        Some(RunState::ShuttingDown) => Phase::Stopping,
        Some(RunState::Other) => Phase::Unknown,
        Some(s @ (RunState::ShutOff | RunState::Crashed | RunState::Destroyed)) => {
            let failure = s == RunState::Crashed || (s == RunState::Destroyed && !o.stopped_by_us);
            match (o.want_running, o.backing_off.is_some(), failure) {
                (true, true, _) => Phase::Failed,
                (true, false, _) => Phase::Starting,
                (false, _, true) => Phase::Failed,
                (false, _, false) => Phase::Stopped,
            }
        }
    }
}

fn desired(
    vm: &VirtualMachine,
    ctx: &Context,
    o: &Observed,
    problem: Option<&Problem>,
) -> AgentStatus {
    let old = vm.status.clone().unwrap_or_default();
    let generation = vm.metadata.generation;
    let now = Time(Timestamp::now());
    let phase = phase_of(o, problem);
    let cond = |t: conditions::Type, ok: bool, reason: &str, msg: String| {
        conditions::new(&old.conditions, t, ok, reason, msg, generation, now.clone())
    };
    let (ready_reason, ready_msg) = match (problem, phase, o.state) {
        (Some(p), _, _) => (p.reason.to_string(), p.condition_message()),
        (None, Phase::Running, Some(RunState::Paused)) => {
            ("Paused".into(), "the domain is paused".into())
        }
        (None, Phase::Running, _) => match &o.readiness {
            Some(r) => (r.reason.to_string(), r.message.clone()),
            None => ("Running".into(), "the domain is running".into()),
        },
        (None, Phase::Failed, _) if o.backing_off.is_some() => (
            "CrashLoopBackOff".into(),
            format!(
                "the domain stopped unexpectedly ({} in a row); restarting in {:.1} s",
                o.failures,
                o.backing_off.unwrap_or_default().as_secs_f64()
            ),
        ),
        (None, Phase::Failed, _) => ("Failed".into(), "the domain stopped unexpectedly".into()),
        (None, p, _) => (
            p.as_str().to_string(),
            format!("the VM is {}", p.as_str().to_lowercase()),
        ),
    };
    let conditions = vec![
        cond(
            conditions::Type::Ready,
            phase == Phase::Running
                && o.state == Some(RunState::Running)
                && problem.is_none()
                && o.readiness.as_ref().is_none_or(|r| r.ready),
            &ready_reason,
            ready_msg,
        ),
        cond(
            conditions::Type::DomainDefined,
            o.defined,
            if o.defined { "Defined" } else { "NotDefined" },
            if o.defined {
                "the libvirt domain is defined".into()
            } else {
                "no libvirt domain yet".into()
            },
        ),
        cond(
            conditions::Type::RestartRequired,
            o.restart_required,
            if o.restart_required {
                "SpecChanged"
            } else {
                "UpToDate"
            },
            if o.restart_required {
                "the spec changed in a way that takes effect only after a restart".into()
            } else {
                "the running domain matches the spec".into()
            },
        ),
    ];
    let interfaces = interfaces(vm, o);
    AgentStatus {
        phase,
        observed_generation: generation,
        conditions,
        domain_uuid: o.defined.then(|| vm.uid()).flatten(),
        interfaces,
        restart_count: old.restart_count.unwrap_or(0) + i32::from(o.restarted),
        start_time: if o.started_now {
            Some(now.clone())
        } else {
            old.start_time.clone()
        },
        vcpus: o.hardware.as_ref().map(|h| h.vcpus() as i32).or(old.vcpus),
        memory: o
            .hardware
            .as_ref()
            .map(|h| Bytes(h.memory_bytes).to_string())
            .or(old.memory.clone()),
        accel: ctx.facts.accel.as_str().to_string(),
        last_restart_request: o
            .restart_handled
            .clone()
            .or(old.last_restart_request.clone()),
    }
}

/// Each network's MAC and the addresses known for it, once the domain is defined.
fn interfaces(vm: &VirtualMachine, o: &Observed) -> Vec<InterfaceStatus> {
    if !o.defined {
        return Vec::new();
    }
    vm.spec
        .networks
        .iter()
        .map(|n| {
            let mac = super::layout::mac_of(&vm.uid().unwrap_or_default(), n);
            let learned = addresses_of(&mac, &o.addresses);
            InterfaceStatus {
                name: n.name.clone(),
                mac: Some(mac),
                ip_address: learned.ips.first().cloned(),
                ip_addresses: learned.ips,
                address_source: learned.source,
                confirmed_addresses: learned.confirmed,
            }
        })
        .collect()
}

/// What is known of one interface's addresses.
#[derive(Debug, PartialEq)]
pub(super) struct Learned {
    pub source: Option<crate::api::vm::AddressSource>,
    /// From the most trusted source that knows any, IPv4 first.
    pub ips: Vec<String>,
    /// Those of `ips` the node itself saw (a lease, the neighbour table).
    pub confirmed: Vec<String>,
}

/// The addresses of the interface with this MAC. Link-local, loopback and multicast
/// addresses are left out: nothing outside the guest's link reaches the VM at them.
pub(super) fn addresses_of(mac: &str, all: &[super::libvirt::Address]) -> Learned {
    use crate::api::vm::AddressSource;
    let reachable = |ip: &std::net::IpAddr| {
        let local = match ip {
            std::net::IpAddr::V4(v4) => v4.is_link_local(),
            std::net::IpAddr::V6(v6) => v6.is_unicast_link_local(),
        };
        !local && !ip.is_loopback() && !ip.is_unspecified() && !ip.is_multicast()
    };
    let mine = all.iter().filter(|a| a.mac.eq_ignore_ascii_case(mac));
    let usable = mine.filter_map(|a| Some((a.source, a.ip.parse::<std::net::IpAddr>().ok()?)));
    let usable: Vec<_> = usable.filter(|(_, ip)| reachable(ip)).collect();
    let Some(best) = usable.iter().map(|(s, _)| *s).min() else {
        return Learned {
            source: None,
            ips: Vec::new(),
            confirmed: Vec::new(),
        };
    };
    let mut ips: Vec<std::net::IpAddr> = usable
        .iter()
        .filter(|(s, _)| *s == best)
        .map(|(_, ip)| *ip)
        .collect();
    // Stable: IPv4 before IPv6, each in the order the source gave.
    let mut seen = std::collections::HashSet::new();
    ips.retain(|ip| seen.insert(*ip));
    ips.sort_by_key(|ip| ip.is_ipv6());
    let seen_by_node = |ip: &std::net::IpAddr| {
        usable
            .iter()
            .any(|(s, u)| u == ip && *s != AddressSource::GuestAgent)
    };
    let text = |v: Vec<std::net::IpAddr>| v.into_iter().map(|ip| ip.to_string()).collect();
    Learned {
        source: Some(best),
        confirmed: text(ips.iter().copied().filter(seen_by_node).collect()),
        ips: text(ips),
    }
}

/// The agent-owned part of the status as it stands now.
fn current(old: &VirtualMachineStatus) -> Option<AgentStatus> {
    Some(AgentStatus {
        phase: old.phase?,
        observed_generation: old.observed_generation,
        conditions: old
            .conditions
            .iter()
            .filter(|c| conditions::Type::written_by(&c.type_, conditions::Writer::Agent))
            .cloned()
            .collect(),
        domain_uuid: old.domain_uuid.clone(),
        interfaces: old.interfaces.clone(),
        restart_count: old.restart_count.unwrap_or(0),
        start_time: old.start_time.clone(),
        vcpus: old.vcpus,
        memory: old.memory.clone(),
        accel: old.accel.clone().unwrap_or_default(),
        last_restart_request: old.last_restart_request.clone(),
    })
}

/// Writes the agent's part of the status, of which the agent is the one writer (the
/// controller writes nodeName and the placement conditions). Forced, as Kubernetes asks
/// of controllers for the fields they own: the phase can be owned by whoever made the
/// status appear (the CRD's default, Pending, is attributed to that request), e.g. the
/// controller voiding the old node's report when it unbinds the VM.
async fn apply(vm: &VirtualMachine, ctx: &Context, new: &AgentStatus) -> Result<(), kube::Error> {
    let api: Api<VirtualMachine> =
        Api::namespaced(ctx.client.clone(), &vm.namespace().unwrap_or_default());
    let patch =
        json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachine", "status": new});
    let written = api
        .patch_status(
            &vm.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    ctx.wrote(written);
    ctx.metrics.status_written();
    Ok(())
}

/// Sets only the phase, the rest of the agent's part as it stands: while a live
/// migration copies the guest away (Migrating), when the reconcile holds the VM.
pub async fn set_phase(
    vm: &VirtualMachine,
    ctx: &Context,
    phase: Phase,
) -> Result<(), kube::Error> {
    let Some(mut new) = current(&vm.status.clone().unwrap_or_default()) else {
        return Ok(());
    };
    if new.phase == phase {
        return Ok(());
    }
    new.phase = phase;
    apply(vm, ctx, &new).await
}

/// The Event a status change is worth, if any: its type and a reason that names what
/// happened. A problem's reason names the step that failed. A new VM reaching Running is
/// the success path: its status says so, and an Event per VM would cost the API server a
/// write per VM in a burst. Restarts, stops, crashes and moves are news.
pub fn event_of(
    old: Option<Phase>,
    new: Phase,
    ran_before: bool,
    problem: Option<&'static str>,
) -> Option<(EventType, &'static str)> {
    use EventType::{Normal, Warning};
    if let Some(reason) = problem {
        return Some((Warning, reason));
    }
    if old == Some(new) {
        return None;
    }
    match (old, new) {
        (Some(Phase::Migrating), Phase::Running) => Some((Normal, "Migrated")),
        (_, Phase::Running) if !ran_before => None,
        (_, Phase::Running) => Some((Normal, "Started")),
        (_, Phase::Stopped) => Some((Normal, "Stopped")),
        (Some(Phase::Running), Phase::Failed) => Some((Warning, "Crashed")),
        (_, Phase::Failed) => Some((Warning, "Failed")),
        (_, Phase::Migrating) => Some((Normal, "Migrating")),
        (_, Phase::Unknown) => Some((Warning, "StateUnknown")),
        (_, Phase::Pending | Phase::Starting | Phase::Stopping) => None,
    }
}

pub async fn write(
    vm: &VirtualMachine,
    ctx: &Context,
    o: Observed,
    problem: Option<Problem>,
) -> Result<(), kube::Error> {
    let new = desired(vm, ctx, &o, problem.as_ref());
    let old = vm.status.clone().unwrap_or_default();
    if current(&old).as_ref() == Some(&new) {
        return Ok(());
    }
    apply(vm, ctx, &new).await?;
    let ready = new.conditions.first();
    let old_ready = conditions::find(&old.conditions, conditions::Type::Ready);
    let problem_news =
        problem.is_some() && old_ready.map(|c| &c.reason) != ready.map(|c| &c.reason);
    let what = event_of(
        old.phase,
        new.phase,
        old.start_time.is_some(),
        problem
            .as_ref()
            .filter(|_| problem_news || old.phase != Some(new.phase))
            .map(|p| p.reason),
    );
    if let Some((type_, reason)) = what {
        let ev = Event {
            type_,
            reason: reason.to_string(),
            note: ready.map(|c| c.message.clone()),
            action: "Reconcile".into(),
            secondary: None,
        };
        let reference = vm.object_ref(&());
        // Off the reconcile's path: an Event is news for people, and must not delay the
        // next VM's start when the API server is busy.
        let recorder = ctx.recorder.clone();
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&ev, &reference).await {
                tracing::debug!(error = %e, "event not recorded");
            }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::libvirt::Address;
    use crate::api::vm::AddressSource::{self, *};

    fn a(mac: &str, ip: &str, source: AddressSource) -> Address {
        Address {
            mac: mac.into(),
            ip: ip.into(),
            source,
        }
    }

    #[test]
    #[allow(clippy::type_complexity)] // a table
    fn events_name_what_happened_and_skip_the_success_path() {
        use EventType::{Normal, Warning};
        use Phase::*;
        // (old phase, new phase, ran before, problem) -> Event
        let table: [(
            Option<Phase>,
            Phase,
            bool,
            Option<&'static str>,
            Option<(EventType, &str)>,
        ); 12] = [
            (None, Running, false, None, None),
            (Some(Pending), Running, false, None, None),
            (Some(Starting), Running, false, None, None),
            (
                Some(Stopped),
                Running,
                true,
                None,
                Some((Normal, "Started")),
            ),
            (Some(Failed), Running, true, None, Some((Normal, "Started"))),
            (
                Some(Migrating),
                Running,
                true,
                None,
                Some((Normal, "Migrated")),
            ),
            (
                Some(Running),
                Stopped,
                true,
                None,
                Some((Normal, "Stopped")),
            ),
            (
                Some(Running),
                Failed,
                true,
                None,
                Some((Warning, "Crashed")),
            ),
            (
                Some(Starting),
                Failed,
                false,
                None,
                Some((Warning, "Failed")),
            ),
            (
                Some(Running),
                Unknown,
                true,
                None,
                Some((Warning, "StateUnknown")),
            ),
            (Some(Running), Running, true, None, None),
            (
                None,
                Pending,
                false,
                Some("ImageNotFound"),
                Some((Warning, "ImageNotFound")),
            ),
        ];
        for (old, new, ran, problem, want) in table {
            let got = event_of(old, new, ran, problem);
            assert_eq!(
                got.map(|(t, r)| (format!("{t:?}"), r)),
                want.map(|(t, r)| (format!("{t:?}"), r)),
                "{old:?} -> {new:?} ran={ran} {problem:?}"
            );
        }
    }

    #[test]
    #[allow(clippy::type_complexity)] // a table
    fn addresses_come_from_the_most_trusted_source_that_knows_any() {
        const M: &str = "52:54:00:aa:bb:cc";
        let other = "52:54:00:00:00:01";
        let cases: Vec<(&str, Vec<Address>, Option<AddressSource>, Vec<&str>)> = vec![
            ("nothing known", vec![], None, vec![]),
            (
                "a lease",
                vec![a(M, "10.76.0.100", Lease)],
                Some(Lease),
                vec!["10.76.0.100"],
            ),
            (
                "the MAC is matched without regard to case",
                vec![a(&M.to_uppercase(), "10.76.0.100", Lease)],
                Some(Lease),
                vec!["10.76.0.100"],
            ),
            (
                "another interface's addresses are not this one's",
                vec![
                    a(other, "10.76.0.7", GuestAgent),
                    a(M, "10.76.0.100", Lease),
                ],
                Some(Lease),
                vec!["10.76.0.100"],
            ),
            (
                "the neighbour table beats a stale lease",
                vec![a(M, "10.76.0.100", Lease), a(M, "10.76.0.5", Neighbour)],
                Some(Neighbour),
                vec!["10.76.0.5"],
            ),
            (
                "the guest agent beats both and gives every address, IPv4 first",
                vec![
                    a(M, "fd00::5", GuestAgent),
                    a(M, "10.76.0.100", Lease),
                    a(M, "10.76.0.5", GuestAgent),
                    a(M, "10.1.0.5", GuestAgent),
                    a(M, "10.76.0.5", Neighbour),
                ],
                Some(GuestAgent),
                vec!["10.76.0.5", "10.1.0.5", "fd00::5"],
            ),
            (
                "link-local and loopback addresses are left out",
                vec![
                    a(M, "fe80::5054:ff:feaa:bbcc", GuestAgent),
                    a(M, "127.0.0.1", GuestAgent),
                    a(M, "169.254.1.1", GuestAgent),
                    a(M, "10.76.0.100", Lease),
                ],
                Some(Lease),
                vec!["10.76.0.100"],
            ),
            (
                "a source repeating an address lists it once; garbage is skipped",
                vec![
                    a(M, "10.76.0.5", GuestAgent),
                    a(M, "10.76.0.5", GuestAgent),
                    a(M, "not-an-ip", GuestAgent),
                ],
                Some(GuestAgent),
                vec!["10.76.0.5"],
            ),
        ];
        for (why, all, source, ips) in cases {
            let got = addresses_of(M, &all);
            let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            assert_eq!((got.source, got.ips), (source, strings(&ips)), "{why}");
        }
    }

    #[test]
    fn only_what_the_node_saw_is_confirmed() {
        const M: &str = "52:54:00:aa:bb:cc";
        // The guest agent says what the guest likes; a lease or the neighbour table
        // is the node's own view.
        for (all, confirmed) in [
            (vec![a(M, "10.76.0.5", GuestAgent)], vec![]),
            (
                vec![
                    a(M, "10.96.0.1", GuestAgent),
                    a(M, "10.76.0.5", GuestAgent),
                    a(M, "10.76.0.5", Lease),
                ],
                vec!["10.76.0.5"],
            ),
            (vec![a(M, "10.76.0.5", Neighbour)], vec!["10.76.0.5"]),
            (
                vec![a(M, "10.76.0.5", Lease), a(M, "10.76.0.6", Lease)],
                vec!["10.76.0.5", "10.76.0.6"],
            ),
            (vec![a(M, "224.0.0.1", Lease)], vec![]),
        ] {
            let got = addresses_of(M, &all);
            assert_eq!(got.confirmed, confirmed, "{all:?}");
        }
    }
}
