//! The agent's decisions for one VM, apart from the I/O that observes and acts: from what
//! the spec asks, what libvirt shows and what the agent remembers between reconciles, the
//! steps to take. Pure, and tested as a table; reconcile.rs observes, plans, executes.

use std::time::{Duration, Instant};

use super::libvirt::RunState;
use crate::api::vm::{Phase, RunStrategy};

/// A domain that has run this long since its last start is healthy again: the next
/// failure's backoff starts over from 1 s.
pub const STABLE_AFTER: Duration = Duration::from_secs(60);

/// While fenced or while a live migration holds the VM: look again this soon.
pub const HOLD: Duration = Duration::from_secs(2);
/// While a migration from this node is unsettled.
pub const UNSETTLED: Duration = Duration::from_secs(5);
/// While a shutdown is under way.
pub const SHUTDOWN_POLL: Duration = Duration::from_secs(1);

/// Restart delay after `failures` failures in a row: 1 s doubling up to 5 minutes.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.min(9).saturating_sub(1)).min(Duration::from_secs(300))
}

/// What the agent remembers about a VM between reconciles (lost on restart, which only
/// costs a shorter backoff or a repeated ACPI request).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VmRuntime {
    /// When we asked the guest to shut down; destroy after the grace period.
    pub shutdown_since: Option<Instant>,
    /// We stopped the domain ourselves: a destroyed state is not a failure then.
    pub stopped_by_us: bool,
    /// Earliest time the next restart after a failure may happen.
    pub next_restart: Option<Instant>,
    /// Failures in a row, for the exponential backoff.
    pub failures: u32,
    /// When this agent last started the domain.
    pub started_at: Option<Instant>,
    /// Why the last start failed, until a start works.
    pub start_error: Option<String>,
}

/// How a VM that is being deleted, or lacks the agent's finalizer, is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Deleted, and never ours (or already cleaned up): nothing to do.
    Ignore,
    /// Deleted while ours: stop and remove the domain and files, then the finalizer.
    Cleanup,
    /// Ours: bring the domain to the spec.
    Apply,
    /// Not ours yet: add the finalizer (a patch that also proves the binding), then apply.
    Adopt,
}

/// Pure: the first decision of every reconcile of a VM bound to this node.
pub fn entry(deleting: bool, has_finalizer: bool) -> Entry {
    match (deleting, has_finalizer) {
        (true, false) => Entry::Ignore,
        (true, true) => Entry::Cleanup,
        (false, true) => Entry::Apply,
        (false, false) => Entry::Adopt,
    }
}

/// Everything a lifecycle decision depends on, observed by the caller.
#[derive(Debug, Clone)]
pub struct Observation<'a> {
    pub now: Instant,
    /// The agent has fenced itself: the VM may already run elsewhere.
    pub fenced: bool,
    /// A live migration from this node is copying the VM: the domain is libvirt's.
    pub copying_out: bool,
    /// The VM object was just read from the API server, not from the cache.
    pub fresh: bool,
    pub strategy: RunStrategy,
    /// The power annotation says "on" (runStrategy Manual).
    pub power_on: bool,
    /// The restart annotation, and the request the status says was handled last.
    pub restart_token: Option<&'a str>,
    pub last_restart_request: Option<&'a str>,
    /// `kubectl vm drain` asks this node to shut the VM down and keep it down.
    pub evicted_here: bool,
    /// The VM's status has a start time: it ran somewhere before.
    pub ran_before: bool,
    pub phase: Option<Phase>,
    /// The VM's termination grace period.
    pub grace: Duration,
    /// The domain's state here; None when libvirt has no such domain.
    pub domain: Option<RunState>,
    /// The hash the defined domain was rendered with, and the spec's now.
    pub defined_hash: Option<&'a str>,
    pub hash: &'a str,
    /// An unfinished migration from this node (see [`needs_migration_check`]).
    pub migration_unsettled: bool,
    /// How often a settled VM is looked at again.
    pub default_requeue: Duration,
}

/// One thing to do, in the order of [`Plan::steps`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Read the VM from the API server; stop here if it is no longer bound to this node.
    ConfirmBound,
    /// Make the VM's files (disks, seed): before a definition names them, before a start.
    Prepare,
    Define,
    Start,
    /// Ask the guest to power off (ACPI).
    Shutdown,
    Destroy,
}

/// The libvirt start that is due failed before and its backoff still holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartFailure {
    pub failures: u32,
    pub error: String,
    pub remaining: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Touch nothing, write nothing; look again after `requeue`.
    Hold {
        requeue: Duration,
        why: &'static str,
    },
    Act(Acts),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Acts {
    pub steps: Vec<Step>,
    /// Whether the VM should run now (the status reports it).
    pub want_running: bool,
    pub requeue: Duration,
    /// A restart waits for its backoff this long.
    pub backing_off: Option<Duration>,
    /// After the steps: report this instead of a status.
    pub start_failed: Option<StartFailure>,
    /// The runtime record once every step has succeeded.
    pub runtime: VmRuntime,
    /// A restart request (annotation) is waiting to be acted on.
    pub restart_pending: bool,
}

/// Pure: whether the unsettled-migration check (a list of migrations) can change the
/// plan: only a VM that ran, and whose domain here is not running, could be one whose
/// guest libvirt moved away while this agent was down.
pub fn needs_migration_check(domain: Option<RunState>, ran_before: bool) -> bool {
    ran_before && !domain.is_some_and(RunState::active)
}

/// Pure: whether the VM should be running now, given its strategy and what happened.
pub fn want_running(o: &Observation<'_>, rt: &VmRuntime) -> bool {
    let running = o.domain.is_some_and(RunState::active);
    let failed = failed(o.domain, rt);
    match o.strategy {
        RunStrategy::Halted => false,
        RunStrategy::Always => true,
        RunStrategy::Manual => o.power_on,
        RunStrategy::Once => running || !o.ran_before,
        RunStrategy::RerunOnFailure => {
            // A guest that powered itself off has finished: it stays stopped.
            let finished = !running && o.ran_before && !failed && !rt.stopped_by_us;
            let was_finished = o.phase == Some(Phase::Stopped) && o.ran_before;
            running || failed || !(finished || was_finished)
        }
    }
}

/// A crash, or a destroy that was not ours.
fn failed(domain: Option<RunState>, rt: &VmRuntime) -> bool {
    matches!(domain, Some(RunState::Crashed))
        || (matches!(domain, Some(RunState::Destroyed)) && !rt.stopped_by_us)
}

/// Pure: the plan for one reconcile of a VM bound to this node and not being deleted.
pub fn plan(o: &Observation<'_>, rt: &VmRuntime) -> Plan {
    if o.fenced {
        return Plan::Hold {
            requeue: HOLD,
            why: "fenced: the VM may run elsewhere",
        };
    }
    if o.copying_out {
        return Plan::Hold {
            requeue: HOLD,
            why: "a live migration is copying it",
        };
    }
    // libvirt may have moved the guest while this agent was down: the definition it left
    // here (shut off, or gone) must not start a second copy. The migration settles first
    // (agent::migration), and then this definition goes.
    if o.domain == Some(RunState::MigratedAway) || o.migration_unsettled {
        return Plan::Hold {
            requeue: UNSETTLED,
            why: "a migration from this node is unsettled",
        };
    }
    let running = o.domain.is_some_and(RunState::active);
    let restart_pending = o.restart_token.is_some() && o.restart_token != o.last_restart_request;
    let halted = o.strategy == RunStrategy::Halted;
    let mut want = want_running(o, rt);
    if o.evicted_here {
        want = false;
    }
    if restart_pending && !halted {
        // Stop first if it runs; start once it is down, whatever the strategy says.
        want = !running;
    }
    let mut acts = Acts {
        steps: Vec::new(),
        want_running: want,
        requeue: o.default_requeue,
        backing_off: None,
        start_failed: None,
        runtime: rt.clone(),
        restart_pending,
    };
    define_steps(o, running, &mut acts.steps);
    match (want, running) {
        (true, false) => start(o, &mut acts),
        (false, true) => stop(o, &mut acts),
        (true, true) => keep_running(o, &mut acts),
        (false, false) => {}
    }
    Plan::Act(acts)
}

/// A VM that ran and has no domain here may just have moved away (a settled migration
/// undefined it a moment before the cache saw the new binding): a definition made from a
/// stale cache would be a stranded copy, so the binding is confirmed first. A new VM, or a
/// stopped one whose definition is outdated, is (re)defined, its files made first.
fn define_steps(o: &Observation<'_>, running: bool, steps: &mut Vec<Step>) {
    if o.domain.is_none() && o.ran_before && !o.fresh {
        steps.push(Step::ConfirmBound);
    }
    if o.domain.is_none() || (!running && o.defined_hash != Some(o.hash)) {
        steps.extend([Step::Prepare, Step::Define]);
    }
}

fn start(o: &Observation<'_>, acts: &mut Acts) {
    let rt = &mut acts.runtime;
    if failed(o.domain, rt) && rt.next_restart.is_none() {
        rt.failures += 1;
        rt.next_restart = Some(o.now + backoff(rt.failures));
    }
    if let Some(at) = rt.next_restart.filter(|at| *at > o.now) {
        let remaining = at - o.now;
        match &rt.start_error {
            Some(error) => {
                acts.start_failed = Some(StartFailure {
                    failures: rt.failures,
                    error: error.clone(),
                    remaining,
                });
            }
            None => {
                acts.backing_off = Some(remaining);
                acts.requeue = remaining;
            }
        }
        return;
    }
    // The seed follows the spec at every boot; and a stale cache must not start a VM
    // that has moved on.
    if !acts.steps.contains(&Step::Prepare) {
        acts.steps.push(Step::Prepare);
    }
    if !o.fresh && !acts.steps.contains(&Step::ConfirmBound) {
        acts.steps.push(Step::ConfirmBound);
    }
    acts.steps.push(Step::Start);
    *rt = VmRuntime {
        shutdown_since: None,
        stopped_by_us: false,
        next_restart: None,
        failures: rt.failures,
        started_at: Some(o.now),
        start_error: None,
    };
}

/// The runtime after a start libvirt refused: one more failure, the next try after the
/// backoff, and the error kept for the status until a start works.
pub fn start_refused(rt: &VmRuntime, now: Instant, error: String) -> (VmRuntime, StartFailure) {
    let failures = rt.failures + 1;
    let wait = backoff(failures);
    let next = VmRuntime {
        failures,
        next_restart: Some(now + wait),
        start_error: Some(error.clone()),
        ..rt.clone()
    };
    (
        next,
        StartFailure {
            failures,
            error,
            remaining: wait,
        },
    )
}

fn stop(o: &Observation<'_>, acts: &mut Acts) {
    let rt = &mut acts.runtime;
    rt.stopped_by_us = true;
    match rt.shutdown_since {
        None => {
            acts.steps.push(Step::Shutdown);
            rt.shutdown_since = Some(o.now);
            acts.requeue = SHUTDOWN_POLL;
        }
        Some(since) if o.now.saturating_duration_since(since) >= o.grace => {
            acts.steps.push(Step::Destroy);
        }
        Some(_) => acts.requeue = SHUTDOWN_POLL,
    }
}

fn keep_running(o: &Observation<'_>, acts: &mut Acts) {
    let rt = &mut acts.runtime;
    let stable = rt
        .started_at
        .is_none_or(|t| o.now.saturating_duration_since(t) >= STABLE_AFTER);
    if rt.failures > 0 && stable && o.domain == Some(RunState::Running) {
        rt.failures = 0;
    } else if rt.failures > 0 && !stable {
        // Come back when it has proven stable.
        acts.requeue = acts.requeue.min(STABLE_AFTER);
    }
}

/// Pure: the restart request the status records as handled after this reconcile: one
/// that was pending, once the domain has started again (or, for a halted VM, is down).
pub fn restart_handled<'a>(
    o: &Observation<'a>,
    restart_pending: bool,
    started_now: bool,
    now_running: bool,
) -> Option<&'a str> {
    let halted = o.strategy == RunStrategy::Halted;
    o.restart_token
        .filter(|_| restart_pending && (started_now || (halted && !now_running)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use RunState::*;
    use Step::*;

    const HASH: &str = "h1";
    const DEFAULT: Duration = Duration::from_secs(30);

    fn base(now: Instant) -> Observation<'static> {
        Observation {
            now,
            fenced: false,
            copying_out: false,
            fresh: false,
            strategy: RunStrategy::Always,
            power_on: false,
            restart_token: None,
            last_restart_request: None,
            evicted_here: false,
            ran_before: false,
            phase: None,
            grace: Duration::from_secs(30),
            domain: None,
            defined_hash: None,
            hash: HASH,
            migration_unsettled: false,
            default_requeue: DEFAULT,
        }
    }

    /// A defined domain in `state`, rendered from the current spec.
    fn defined(o: &mut Observation<'static>, state: RunState) {
        o.domain = Some(state);
        o.defined_hash = Some(HASH);
        o.ran_before = true;
    }

    fn acts(p: Plan) -> Acts {
        match p {
            Plan::Act(a) => a,
            Plan::Hold { why, .. } => panic!("held: {why}"),
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// (name, set-up of the observation and runtime, the steps, want_running, requeue)
    type Case = (
        &'static str,
        fn(&mut Observation<'static>, &mut VmRuntime, Instant),
        &'static [Step],
        bool,
        Duration,
    );

    #[test]
    fn plans_follow_the_table() {
        let cases: &[Case] = &[
            // -- a new VM, each run strategy
            (
                "new Always starts",
                |_, _, _| {},
                &[Prepare, Define, ConfirmBound, Start],
                true,
                DEFAULT,
            ),
            (
                "new Always, fresh read: no confirmation",
                |o, _, _| o.fresh = true,
                &[Prepare, Define, Start],
                true,
                DEFAULT,
            ),
            (
                "new Halted is defined, not started",
                |o, _, _| o.strategy = RunStrategy::Halted,
                &[Prepare, Define],
                false,
                DEFAULT,
            ),
            (
                "new Manual without power stays off",
                |o, _, _| o.strategy = RunStrategy::Manual,
                &[Prepare, Define],
                false,
                DEFAULT,
            ),
            (
                "new Manual power on starts",
                |o, _, _| {
                    o.strategy = RunStrategy::Manual;
                    o.power_on = true;
                },
                &[Prepare, Define, ConfirmBound, Start],
                true,
                DEFAULT,
            ),
            (
                "new Once starts",
                |o, _, _| o.strategy = RunStrategy::Once,
                &[Prepare, Define, ConfirmBound, Start],
                true,
                DEFAULT,
            ),
            (
                "new RerunOnFailure starts",
                |o, _, _| o.strategy = RunStrategy::RerunOnFailure,
                &[Prepare, Define, ConfirmBound, Start],
                true,
                DEFAULT,
            ),
            // -- running, nothing to do
            (
                "running Always: nothing",
                |o, _, _| defined(o, Running),
                &[],
                true,
                DEFAULT,
            ),
            (
                "running Once: nothing",
                |o, _, _| {
                    defined(o, Running);
                    o.strategy = RunStrategy::Once;
                },
                &[],
                true,
                DEFAULT,
            ),
            (
                "running Manual on: nothing",
                |o, _, _| {
                    defined(o, Running);
                    o.strategy = RunStrategy::Manual;
                    o.power_on = true;
                },
                &[],
                true,
                DEFAULT,
            ),
            (
                "paused counts as running",
                |o, _, _| defined(o, Paused),
                &[],
                true,
                DEFAULT,
            ),
            // -- stopping
            (
                "Halted while running: ACPI shutdown",
                |o, _, _| {
                    defined(o, Running);
                    o.strategy = RunStrategy::Halted;
                },
                &[Shutdown],
                false,
                secs(1),
            ),
            (
                "Manual power off: ACPI shutdown",
                |o, _, _| {
                    defined(o, Running);
                    o.strategy = RunStrategy::Manual;
                },
                &[Shutdown],
                false,
                secs(1),
            ),
            (
                "shutdown within grace: wait",
                |o, rt, now| {
                    defined(o, Running);
                    o.strategy = RunStrategy::Halted;
                    rt.shutdown_since = Some(now - secs(10));
                },
                &[],
                false,
                secs(1),
            ),
            (
                "shutdown past grace: destroy",
                |o, rt, now| {
                    defined(o, Running);
                    o.strategy = RunStrategy::Halted;
                    rt.shutdown_since = Some(now - secs(31));
                },
                &[Destroy],
                false,
                DEFAULT,
            ),
            (
                "zero grace: destroy at the next look",
                |o, rt, now| {
                    defined(o, Running);
                    o.strategy = RunStrategy::Halted;
                    o.grace = Duration::ZERO;
                    rt.shutdown_since = Some(now);
                },
                &[Destroy],
                false,
                DEFAULT,
            ),
            (
                "drained off this node: shutdown",
                |o, _, _| {
                    defined(o, Running);
                    o.evicted_here = true;
                },
                &[Shutdown],
                false,
                secs(1),
            ),
            (
                "drained and down: stays down",
                |o, rt, _| {
                    defined(o, ShutOff);
                    o.evicted_here = true;
                    rt.stopped_by_us = true;
                },
                &[],
                false,
                DEFAULT,
            ),
            // -- guests that stop by themselves
            (
                "Once, guest powered off: stays off",
                |o, _, _| {
                    defined(o, ShutOff);
                    o.strategy = RunStrategy::Once;
                },
                &[],
                false,
                DEFAULT,
            ),
            (
                "RerunOnFailure, guest powered off: stays off",
                |o, _, _| {
                    defined(o, ShutOff);
                    o.strategy = RunStrategy::RerunOnFailure;
                },
                &[],
                false,
                DEFAULT,
            ),
            (
                "RerunOnFailure, already Stopped: stays off",
                |o, _, _| {
                    defined(o, ShutOff);
                    o.strategy = RunStrategy::RerunOnFailure;
                    o.phase = Some(Phase::Stopped);
                },
                &[],
                false,
                DEFAULT,
            ),
            (
                "Always, guest powered off: started again",
                |o, _, _| defined(o, ShutOff),
                &[Prepare, ConfirmBound, Start],
                true,
                DEFAULT,
            ),
            // -- crashes and the backoff
            (
                "crash: first restart waits 1 s",
                |o, _, _| defined(o, Crashed),
                &[],
                true,
                secs(1),
            ),
            (
                "RerunOnFailure crash: restart waits 1 s",
                |o, _, _| {
                    defined(o, Crashed);
                    o.strategy = RunStrategy::RerunOnFailure;
                },
                &[],
                true,
                secs(1),
            ),
            (
                "destroyed by someone else: a failure",
                |o, _, _| defined(o, Destroyed),
                &[],
                true,
                secs(1),
            ),
            (
                "destroyed by us (Halted): no restart",
                |o, rt, _| {
                    defined(o, Destroyed);
                    o.strategy = RunStrategy::Halted;
                    rt.stopped_by_us = true;
                },
                &[],
                false,
                DEFAULT,
            ),
            (
                "backoff over: restart",
                |o, rt, now| {
                    defined(o, Crashed);
                    rt.failures = 1;
                    rt.next_restart = Some(now - secs(1));
                },
                &[Prepare, ConfirmBound, Start],
                true,
                DEFAULT,
            ),
            (
                "backoff running: wait the rest",
                |o, rt, now| {
                    defined(o, Crashed);
                    rt.failures = 3;
                    rt.next_restart = Some(now + secs(3));
                },
                &[],
                true,
                secs(3),
            ),
            (
                "running, failures, not yet stable: look again by then",
                |o, rt, now| {
                    defined(o, Running);
                    rt.failures = 2;
                    rt.started_at = Some(now - secs(10));
                },
                &[],
                true,
                DEFAULT.min(STABLE_AFTER),
            ),
            // -- spec changes
            (
                "stopped, definition outdated: redefine",
                |o, _, _| {
                    defined(o, ShutOff);
                    o.defined_hash = Some("old");
                    o.strategy = RunStrategy::Halted;
                },
                &[Prepare, Define],
                false,
                DEFAULT,
            ),
            (
                "stopped outdated, Always: redefine once, start",
                |o, _, _| {
                    defined(o, ShutOff);
                    o.defined_hash = Some("old");
                },
                &[Prepare, Define, ConfirmBound, Start],
                true,
                DEFAULT,
            ),
            (
                "running, definition outdated: no redefinition",
                |o, _, _| {
                    defined(o, Running);
                    o.defined_hash = Some("old");
                },
                &[],
                true,
                DEFAULT,
            ),
            // -- restart requests
            (
                "restart requested while running: shutdown",
                |o, _, _| {
                    defined(o, Running);
                    o.restart_token = Some("t2");
                    o.last_restart_request = Some("t1");
                },
                &[Shutdown],
                false,
                secs(1),
            ),
            (
                "restart requested, now down: start",
                |o, rt, _| {
                    defined(o, ShutOff);
                    rt.stopped_by_us = true;
                    o.restart_token = Some("t2");
                },
                &[Prepare, ConfirmBound, Start],
                true,
                DEFAULT,
            ),
            (
                "restart already handled: nothing",
                |o, _, _| {
                    defined(o, Running);
                    o.restart_token = Some("t1");
                    o.last_restart_request = Some("t1");
                },
                &[],
                true,
                DEFAULT,
            ),
            (
                "restart of a Manual VM that is off: starts it",
                |o, rt, _| {
                    defined(o, ShutOff);
                    o.strategy = RunStrategy::Manual;
                    rt.stopped_by_us = true;
                    o.restart_token = Some("t");
                },
                &[Prepare, ConfirmBound, Start],
                true,
                DEFAULT,
            ),
            (
                "restart of a Halted VM: stays down",
                |o, rt, _| {
                    defined(o, ShutOff);
                    o.strategy = RunStrategy::Halted;
                    rt.stopped_by_us = true;
                    o.restart_token = Some("t");
                },
                &[],
                false,
                DEFAULT,
            ),
            // -- a VM that ran elsewhere (failover, migration) arrives without a domain
            (
                "ran before, no domain, cached: confirm then define and start",
                |o, _, _| o.ran_before = true,
                &[ConfirmBound, Prepare, Define, Start],
                true,
                DEFAULT,
            ),
            (
                "ran before, no domain, fresh: define and start",
                |o, _, _| {
                    o.ran_before = true;
                    o.fresh = true;
                },
                &[Prepare, Define, Start],
                true,
                DEFAULT,
            ),
            (
                "ran before, Once, no domain: defined, not started",
                |o, _, _| {
                    o.ran_before = true;
                    o.strategy = RunStrategy::Once;
                },
                &[ConfirmBound, Prepare, Define],
                false,
                DEFAULT,
            ),
        ];
        let now = Instant::now();
        for (name, setup, steps, want, requeue) in cases {
            let mut o = base(now);
            let mut rt = VmRuntime::default();
            setup(&mut o, &mut rt, now);
            let a = acts(plan(&o, &rt));
            assert_eq!(a.steps, *steps, "{name}: steps");
            assert_eq!(a.want_running, *want, "{name}: want_running");
            assert_eq!(a.requeue, *requeue, "{name}: requeue");
        }
        assert!(cases.len() >= 40, "{} cases", cases.len());
    }

    #[test]
    fn holds_touch_nothing() {
        let now = Instant::now();
        let rt = VmRuntime::default();
        type Hold = (&'static str, fn(&mut Observation<'static>), Duration);
        let cases: [Hold; 5] = [
            ("fenced", |o| o.fenced = true, HOLD),
            (
                "fenced beats everything",
                |o| {
                    o.fenced = true;
                    o.copying_out = true;
                    o.migration_unsettled = true;
                },
                HOLD,
            ),
            (
                "migration source copying",
                |o| {
                    defined(o, Running);
                    o.copying_out = true;
                },
                HOLD,
            ),
            (
                "domain migrated away",
                |o| defined(o, MigratedAway),
                UNSETTLED,
            ),
            (
                "unsettled migration, domain gone",
                |o| {
                    o.ran_before = true;
                    o.migration_unsettled = true;
                },
                UNSETTLED,
            ),
        ];
        for (name, setup, requeue) in cases {
            let mut o = base(now);
            setup(&mut o);
            match plan(&o, &rt) {
                Plan::Hold { requeue: r, .. } => assert_eq!(r, requeue, "{name}"),
                Plan::Act(a) => panic!("{name}: acted {a:?}"),
            }
        }
    }

    #[test]
    fn the_runtime_follows_starts_failures_and_stops() {
        let now = Instant::now();
        // A start resets what a start resets, and keeps the failure count.
        let mut o = base(now);
        defined(&mut o, Crashed);
        let rt = VmRuntime {
            failures: 2,
            next_restart: Some(now - secs(1)),
            start_error: None,
            stopped_by_us: true,
            shutdown_since: Some(now - secs(100)),
            started_at: None,
        };
        let a = acts(plan(&o, &rt));
        assert_eq!(a.steps.last(), Some(&Start));
        assert_eq!(
            a.runtime,
            VmRuntime {
                failures: 2,
                started_at: Some(now),
                ..VmRuntime::default()
            }
        );
        // A crash with no restart scheduled counts a failure and schedules one.
        let a = acts(plan(&o, &VmRuntime::default()));
        assert_eq!(
            (a.runtime.failures, a.runtime.next_restart),
            (1, Some(now + secs(1)))
        );
        assert_eq!(a.backing_off, Some(secs(1)));
        // A start that libvirt refused shows its error while the backoff runs.
        let (after, failure) = start_refused(&VmRuntime::default(), now, "no memory".into());
        assert_eq!(failure.failures, 1);
        let a = acts(plan(&o, &after));
        assert_eq!(
            a.start_failed,
            Some(StartFailure {
                failures: 1,
                error: "no memory".into(),
                remaining: secs(1)
            })
        );
        assert!(a.steps.is_empty());
        // Stable for a minute: the failure count starts over.
        let mut o = base(now);
        defined(&mut o, Running);
        let rt = VmRuntime {
            failures: 4,
            started_at: Some(now - STABLE_AFTER),
            ..Default::default()
        };
        assert_eq!(acts(plan(&o, &rt)).runtime.failures, 0);
        // A shutdown marks the stop as ours, so the destroyed state is no failure.
        let mut o = base(now);
        defined(&mut o, Running);
        o.strategy = RunStrategy::Halted;
        let a = acts(plan(&o, &VmRuntime::default()));
        assert!(a.runtime.stopped_by_us);
        assert_eq!(a.runtime.shutdown_since, Some(now));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), secs(1));
        assert_eq!(backoff(2), secs(2));
        assert_eq!(backoff(5), secs(16));
        assert_eq!(backoff(30), secs(256));
    }

    #[test]
    fn entry_and_small_decisions() {
        assert_eq!(entry(true, false), Entry::Ignore);
        assert_eq!(entry(true, true), Entry::Cleanup);
        assert_eq!(entry(false, true), Entry::Apply);
        assert_eq!(entry(false, false), Entry::Adopt);
        assert!(needs_migration_check(None, true));
        assert!(needs_migration_check(Some(ShutOff), true));
        assert!(!needs_migration_check(Some(Running), true));
        assert!(!needs_migration_check(None, false));
        let now = Instant::now();
        let mut o = base(now);
        o.restart_token = Some("t");
        assert_eq!(restart_handled(&o, true, true, true), Some("t"));
        assert_eq!(restart_handled(&o, true, false, false), None);
        assert_eq!(restart_handled(&o, false, true, true), None);
        o.strategy = RunStrategy::Halted;
        assert_eq!(restart_handled(&o, true, false, false), Some("t"));
    }
}
