//! The contract of ../shared/notes/semantics.md ("Our contract"), point by point, through the
//! public API only.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crac_core::{
    from_fns, CheckpointInfo, Context, Coordinator, ErrorKind, HookError, HookFailure, Limits,
    Phase, Priority, Resource, RestoreInfo, RestoreReason,
};

type Log = Arc<Mutex<Vec<String>>>;

/// Records every hook call as "name:before" or "name:after:reason"; fails or panics on demand.
struct Recorder {
    name: String,
    log: Log,
    before: Behaviour,
    after: Behaviour,
}

#[derive(Clone, Copy)]
enum Behaviour {
    Ok,
    Fail,
    Panic,
    Sleep(Duration),
}

impl Behaviour {
    fn run(self, what: &str) -> Result<(), HookError> {
        match self {
            Behaviour::Ok => Ok(()),
            Behaviour::Fail => Err(format!("{what} broke").into()),
            Behaviour::Panic => panic!("{what} exploded"),
            Behaviour::Sleep(d) => {
                thread::sleep(d);
                Ok(())
            }
        }
    }
}

impl Resource for Recorder {
    fn name(&self) -> std::borrow::Cow<'_, str> {
        self.name.as_str().into()
    }
    fn before_checkpoint(&self, _: &CheckpointInfo) -> Result<(), HookError> {
        self.log
            .lock()
            .unwrap()
            .push(format!("{}:before", self.name));
        self.before.run(&self.name)
    }
    fn after_restore(&self, info: &RestoreInfo) -> Result<(), HookError> {
        self.log
            .lock()
            .unwrap()
            .push(format!("{}:after:{}", self.name, info.reason));
        self.after.run(&self.name)
    }
}

fn rec(name: &str, log: &Log) -> Recorder {
    with(name, log, Behaviour::Ok, Behaviour::Ok)
}

fn with(name: &str, log: &Log, before: Behaviour, after: Behaviour) -> Recorder {
    Recorder {
        name: name.into(),
        log: log.clone(),
        before,
        after,
    }
}

fn take(log: &Log) -> Vec<String> {
    std::mem::take(&mut *log.lock().unwrap())
}

// 1. Ordering.

#[test]
fn before_runs_in_reverse_registration_order_and_after_in_registration_order() {
    let log = Log::default();
    let c = Coordinator::new();
    let _a = c.context().register(rec("a", &log));
    let _b = c.context().register(rec("b", &log));
    let _c = c.context().register(rec("c", &log));
    c.simulate().unwrap();
    assert_eq!(
        take(&log),
        [
            "c:before",
            "b:before",
            "a:before",
            "a:after:restored",
            "b:after:restored",
            "c:after:restored"
        ]
    );
}

#[test]
fn priorities_go_down_last_and_come_up_first() {
    let log = Log::default();
    let c = Coordinator::new();
    let _app = c.context().register(rec("app", &log));
    let _infra = c
        .context()
        .register_with(Priority::Infrastructure, rec("pool", &log));
    let _core = c
        .context()
        .register_with(Priority::Core, rec("agent", &log));
    c.simulate().unwrap();
    assert_eq!(
        take(&log),
        [
            "app:before",
            "pool:before",
            "agent:before",
            "agent:after:restored",
            "pool:after:restored",
            "app:after:restored"
        ]
    );
}

#[test]
fn nested_contexts_keep_their_slot_and_their_own_order() {
    let log = Log::default();
    let c = Coordinator::new();
    let storage = Context::new("storage");
    let _first = c.context().register(rec("first", &log));
    let _storage = c.context().register(storage.clone());
    let _last = c.context().register(rec("last", &log));
    // Registered into the nested context after it was nested: still in its slot.
    let _x = storage.register(rec("x", &log));
    let _y = storage.register(rec("y", &log));
    assert_eq!(
        c.context().resource_names(),
        ["first", "storage/x", "storage/y", "last"]
    );
    c.simulate().unwrap();
    assert_eq!(
        take(&log),
        [
            "last:before",
            "y:before",
            "x:before",
            "first:before",
            "first:after:restored",
            "x:after:restored",
            "y:after:restored",
            "last:after:restored"
        ]
    );
}

#[test]
#[should_panic(expected = "would make a cycle")]
fn nesting_a_context_inside_itself_is_refused() {
    let outer = Context::new("outer");
    let inner = Context::new("inner");
    outer.register(inner.clone()).keep();
    let _b = inner.register(outer.clone());
}

#[test]
fn a_context_used_as_a_plain_resource_aggregates_its_failures() {
    let log = Log::default();
    let ctx = Context::new("group");
    let _a = ctx.register(with("a", &log, Behaviour::Fail, Behaviour::Ok));
    let _b = ctx.register(with("b", &log, Behaviour::Fail, Behaviour::Ok));
    let info = sample_checkpoint_info();
    let err = Resource::before_checkpoint(&ctx, &info).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("before_checkpoint of \"a\" failed: a broke"),
        "{text}"
    );
    assert!(
        text.contains("before_checkpoint of \"b\" failed: b broke"),
        "{text}"
    );
}

fn sample_checkpoint_info() -> CheckpointInfo {
    // CheckpointInfo is non-exhaustive: get one the way a resource would.
    let got = Arc::new(Mutex::new(None));
    let c = Coordinator::new();
    let g = got.clone();
    let _r = c.context().register(from_fns(
        "grab",
        move |info| {
            *g.lock().unwrap() = Some(info.clone());
            Ok(())
        },
        |_| Ok(()),
    ));
    c.simulate().unwrap();
    let info = got.lock().unwrap().take().unwrap();
    info
}

// 2. Everyone is told; rollback; one error naming every failure.

#[test]
fn a_failing_and_a_panicking_hook_skip_nobody_and_everyone_told_is_rolled_back() {
    let log = Log::default();
    let c = Coordinator::new();
    let _a = c.context().register(rec("a", &log));
    let _b = c
        .context()
        .register(with("b", &log, Behaviour::Fail, Behaviour::Fail));
    let _c = c
        .context()
        .register(with("c", &log, Behaviour::Panic, Behaviour::Ok));
    let _d = c.context().register(rec("d", &log));
    let err = c.checkpoint().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused);
    assert_eq!(
        take(&log),
        [
            "d:before",
            "c:before",
            "b:before",
            "a:before",
            "a:after:aborted",
            "b:after:aborted",
            "c:after:aborted",
            "d:after:aborted"
        ]
    );
    assert_eq!(
        err.to_string(),
        "checkpoint refused: before_checkpoint of \"c\" panicked: c exploded; \
         before_checkpoint of \"b\" failed: b broke; after_restore of \"b\" failed: b broke; \
         the resources that were told were rolled back (after_restore, reason aborted)"
    );
    let failed: Vec<_> = err
        .failures()
        .map(|r| (r.resource().to_owned(), r.phase()))
        .collect();
    assert_eq!(
        failed,
        [
            ("c".to_owned(), Phase::BeforeCheckpoint),
            ("b".to_owned(), Phase::BeforeCheckpoint),
            ("b".to_owned(), Phase::AfterRestore)
        ]
    );
    assert_eq!(err.hooks().len(), 8);
    // Nothing was checkpointed, and the next cycle can run.
    assert_eq!(c.generation(), 0);
    assert!(c.last_restore().is_none());
    drop(_b);
    drop(_c);
    c.simulate().unwrap();
}

#[test]
fn after_restore_failures_are_reported_but_everyone_is_told() {
    let log = Log::default();
    let c = Coordinator::new();
    let _a = c
        .context()
        .register(with("a", &log, Behaviour::Ok, Behaviour::Fail));
    let _b = c.context().register(rec("b", &log));
    let err = c.simulate().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AfterRestoreFailed);
    assert_eq!(
        err.to_string(),
        "after_restore failed: after_restore of \"a\" failed: a broke"
    );
    assert_eq!(
        take(&log),
        [
            "b:before",
            "a:before",
            "a:after:restored",
            "b:after:restored"
        ]
    );
    // The cycle did happen.
    assert_eq!(c.generation(), 1);
}

// 3. Reason, generation, time.

#[test]
fn reason_generation_and_restore_time_are_reported() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let c = Coordinator::new();
    let s = seen.clone();
    let gens = Arc::new(Mutex::new(Vec::new()));
    let g = gens.clone();
    let _r = c.context().register(from_fns(
        "r",
        move |info| {
            g.lock().unwrap().push(info.generation);
            Ok(())
        },
        move |info| {
            s.lock().unwrap().push((info.reason, info.generation));
            Ok(())
        },
    ));
    let before = std::time::SystemTime::now();
    c.simulate_with(RestoreReason::Resumed).unwrap();
    c.simulate_with(RestoreReason::Aborted).unwrap();
    c.simulate_with(RestoreReason::Restored).unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        [
            (RestoreReason::Resumed, 1),
            (RestoreReason::Aborted, 1),
            (RestoreReason::Restored, 2)
        ]
    );
    assert_eq!(*gens.lock().unwrap(), [0, 1, 1]);
    assert_eq!(c.generation(), 2);
    let last = c.last_restore().unwrap();
    assert_eq!(last.reason, RestoreReason::Restored);
    assert!(last.at >= before);
}

#[test]
fn reasons_round_trip_through_their_names() {
    for reason in [
        RestoreReason::Restored,
        RestoreReason::Resumed,
        RestoreReason::Aborted,
    ] {
        assert_eq!(RestoreReason::parse(reason.as_str()), Some(reason));
    }
    assert_eq!(RestoreReason::parse("Restored"), None);
}

// 4. Owned registration.

#[test]
fn dropping_the_registration_unregisters() {
    let log = Log::default();
    let c = Coordinator::new();
    let a = c.context().register(rec("a", &log));
    let b = c.context().register(rec("b", &log));
    drop(a);
    b.unregister();
    c.simulate().unwrap();
    assert!(take(&log).is_empty());
    assert!(c.context().is_empty());
}

#[test]
fn kept_registrations_stay() {
    let log = Log::default();
    let c = Coordinator::new();
    c.context().register(rec("a", &log)).keep();
    c.simulate().unwrap();
    assert_eq!(take(&log), ["a:before", "a:after:restored"]);
}

#[test]
fn registering_during_a_cycle_takes_effect_next_cycle() {
    let log = Log::default();
    let c = Coordinator::new();
    let late: Arc<Mutex<Vec<crac_core::Registration>>> = Arc::default();
    let (ctx, l, log2) = (c.context().clone(), late.clone(), log.clone());
    let _r = c.context().register(from_fns(
        "registrar",
        move |_| {
            let n = l.lock().unwrap().len();
            l.lock()
                .unwrap()
                .push(ctx.register(rec(&format!("late{n}"), &log2)));
            Ok(())
        },
        |_| Ok(()),
    ));
    c.simulate().unwrap();
    assert!(
        take(&log).is_empty(),
        "registered mid-cycle, told in the same cycle"
    );
    c.simulate().unwrap();
    assert_eq!(take(&log), ["late0:before", "late0:after:restored"]);
}

#[test]
fn a_resource_unregistered_mid_cycle_still_comes_back_up() {
    let log = Log::default();
    let c = Coordinator::new();
    let victim = Arc::new(Mutex::new(Some(c.context().register(rec("victim", &log)))));
    let checkpoint = c.checkpoint().unwrap();
    victim.lock().unwrap().take();
    checkpoint.complete(RestoreReason::Restored).unwrap();
    assert_eq!(take(&log), ["victim:before", "victim:after:restored"]);
    c.simulate().unwrap();
    assert!(take(&log).is_empty());
}

#[test]
fn static_resources_are_in_the_global_context() {
    crac_core::register_static!(crac_core::Priority::Core, || Box::new(from_fns(
        "static-one",
        |_| Ok(()),
        |_| Ok(())
    )));
    assert!(crac_core::global_context()
        .resource_names()
        .contains(&"static-one".to_owned()));
}

// 5. One cycle at a time.

#[test]
fn a_second_checkpoint_while_one_is_pending_is_refused() {
    let c = Coordinator::new();
    let first = c.checkpoint().unwrap();
    let err = c.checkpoint().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InProgress);
    assert!(err
        .to_string()
        .starts_with("a checkpoint is already in progress"));
    first.complete(RestoreReason::Resumed).unwrap();
    c.simulate().unwrap();
}

#[test]
fn a_checkpoint_requested_from_inside_a_hook_is_an_error_not_a_deadlock() {
    for limits in [Limits::default(), Limits::unlimited()] {
        let c = Coordinator::new();
        c.set_limits(limits);
        let inner_result = Arc::new(Mutex::new(None));
        let (c2, r) = (c.clone(), inner_result.clone());
        let _r = c.context().register(from_fns(
            "reentrant",
            move |_| {
                *r.lock().unwrap() = Some(c2.simulate().unwrap_err().kind());
                Ok(())
            },
            |_| Ok(()),
        ));
        c.simulate().unwrap();
        assert_eq!(*inner_result.lock().unwrap(), Some(ErrorKind::Recursive));
    }
}

#[test]
fn dropping_a_pending_checkpoint_aborts_it() {
    let log = Log::default();
    let c = Coordinator::new();
    let _a = c.context().register(rec("a", &log));
    drop(c.checkpoint().unwrap());
    assert_eq!(take(&log), ["a:before", "a:after:aborted"]);
    assert_eq!(c.generation(), 0);
    c.simulate().unwrap();
}

// 6. Time limits.

#[test]
fn a_hook_that_overruns_is_named_and_the_others_are_still_told() {
    let log = Log::default();
    let c = Coordinator::new();
    c.set_limits(Limits::default().with_hook(Some(Duration::from_millis(100))));
    let _a = c.context().register(rec("a", &log));
    let _slow = c.context().register(with(
        "slow",
        &log,
        Behaviour::Sleep(Duration::from_secs(3)),
        Behaviour::Ok,
    ));
    let _c = c.context().register(rec("c", &log));
    let started = Instant::now();
    let err = c.checkpoint().unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "waited for the hung hook"
    );
    assert_eq!(err.kind(), ErrorKind::Refused);
    let failures: Vec<_> = err.failures().collect();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].resource(), "slow");
    assert!(matches!(
        failures[0].failure(),
        Some(HookFailure::TimedOut { limit }) if *limit == Duration::from_millis(100)
    ));
    assert!(
        err.to_string()
            .contains("before_checkpoint of \"slow\" timed out: still running after 100ms"),
        "{err}"
    );
    // "slow" is still running its before hook, so it is not told to come back; the others are.
    assert_eq!(
        take(&log),
        [
            "c:before",
            "slow:before",
            "a:before",
            "a:after:aborted",
            "c:after:aborted"
        ]
    );
}

/// Hooks of one resource never overlap: while the hook that overran still runs, the next
/// cycle does not call that resource (which refuses the checkpoint), and when it returns at
/// last, its resource, taken down for a checkpoint that was refused, is told to come back.
#[test]
fn a_resource_whose_hook_overran_is_left_alone_until_it_returns_then_brought_back() {
    let log = Log::default();
    let c = Coordinator::new();
    c.set_limits(Limits::default().with_hook(Some(Duration::from_millis(100))));
    let _a = c.context().register(rec("a", &log));
    let _slow = c.context().register(with(
        "slow",
        &log,
        Behaviour::Sleep(Duration::from_millis(700)),
        Behaviour::Ok,
    ));
    let first = c.checkpoint().unwrap_err();
    assert_eq!(first.failures().count(), 1);
    assert_eq!(take(&log), ["slow:before", "a:before", "a:after:aborted"]);

    // The overrunning call still runs: not called again, reported, the checkpoint refused.
    let second = c.checkpoint().unwrap_err();
    let failures: Vec<_> = second.failures().collect();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].resource(), "slow");
    assert!(matches!(
        failures[0].failure(),
        Some(HookFailure::StillRunning)
    ));
    assert!(
        second.to_string().contains(
            "before_checkpoint of \"slow\" not run: its hook of an earlier cycle, which overran, is still running"
        ),
        "{second}"
    );
    assert_eq!(take(&log), ["a:before", "a:after:aborted"]);

    // It returns: told "aborted", like the rest of its cycle; then it takes part again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !log
        .lock()
        .unwrap()
        .contains(&"slow:after:aborted".to_owned())
    {
        assert!(
            Instant::now() < deadline,
            "the late before_checkpoint was never undone"
        );
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(take(&log), ["slow:after:aborted"]);
    c.set_limits(Limits::default().with_hook(Some(Duration::from_secs(5))));
    c.simulate().unwrap();
    assert_eq!(
        take(&log),
        [
            "slow:before",
            "a:before",
            "a:after:restored",
            "slow:after:restored"
        ]
    );
}

#[test]
fn the_phase_limit_stops_calling_hooks_and_names_those_not_run() {
    let log = Log::default();
    let c = Coordinator::new();
    c.set_limits(
        Limits::default()
            .with_hook(None)
            .with_phase(Some(Duration::from_millis(150))),
    );
    let _a = c.context().register(rec("a", &log));
    let _b = c.context().register(with(
        "b",
        &log,
        Behaviour::Sleep(Duration::from_millis(100)),
        Behaviour::Ok,
    ));
    let _c = c.context().register(with(
        "c",
        &log,
        Behaviour::Sleep(Duration::from_millis(100)),
        Behaviour::Ok,
    ));
    let err = c.checkpoint().unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("before_checkpoint of \"b\" timed out: still running after 150ms"),
        "{text}"
    );
    assert!(
        text.contains(
            "before_checkpoint of \"a\" not run: the phase time limit of 150ms ran out before its turn"
        ),
        "{text}"
    );
    // c went down in time and comes back up; b is still running; a was never told.
    assert_eq!(take(&log), ["c:before", "b:before", "c:after:aborted"]);
}

// 7. Critical sections.

#[test]
fn a_checkpoint_waits_for_held_critical_sections() {
    let log = Log::default();
    let c = Coordinator::new();
    let _a = c.context().register(rec("a", &log));
    let (c2, log2) = (c.clone(), log.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = thread::spawn(move || {
        let _cs = c2.critical_section();
        tx.send(()).unwrap();
        thread::sleep(Duration::from_millis(200));
        log2.lock().unwrap().push("work done".into());
    });
    rx.recv().unwrap();
    c.simulate().unwrap();
    worker.join().unwrap();
    assert_eq!(take(&log), ["work done", "a:before", "a:after:restored"]);
}

#[test]
fn new_critical_sections_wait_until_after_restore_has_finished() {
    let log = Log::default();
    let c = Coordinator::new();
    let _a = c.context().register(rec("a", &log));
    let checkpoint = c.checkpoint().unwrap();
    assert!(c.is_quiesced());
    assert!(c.try_critical_section(Duration::from_millis(50)).is_none());
    let (c2, log2) = (c.clone(), log.clone());
    let waiter = thread::spawn(move || {
        let _cs = c2.critical_section();
        log2.lock().unwrap().push("work".into());
    });
    thread::sleep(Duration::from_millis(100));
    log.lock().unwrap().push("restoring".into());
    checkpoint.complete(RestoreReason::Restored).unwrap();
    waiter.join().unwrap();
    assert_eq!(
        take(&log),
        ["a:before", "restoring", "a:after:restored", "work"]
    );
    assert!(!c.is_quiesced());
}

#[test]
fn critical_sections_held_too_long_refuse_the_checkpoint_before_any_hook() {
    let log = Log::default();
    let c = Coordinator::new();
    c.set_limits(Limits::default().with_quiesce(Duration::from_millis(100)));
    let _a = c.context().register(rec("a", &log));
    let c2 = c.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = thread::spawn(move || {
        let _cs = c2.critical_section();
        tx.send(()).unwrap();
        release_rx.recv().unwrap();
    });
    rx.recv().unwrap();
    let err = c.checkpoint().unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::Quiesce { held: 1, .. }));
    assert!(err
        .to_string()
        .starts_with("checkpoint refused: 1 critical section(s) still held after waiting"));
    assert!(take(&log).is_empty());
    // The gate is open again.
    assert!(c.try_critical_section(Duration::from_millis(10)).is_some());
    release_tx.send(()).unwrap();
    holder.join().unwrap();
}

#[test]
fn a_thread_holding_a_critical_section_cannot_wait_for_itself() {
    let c = Coordinator::new();
    let _cs = c.critical_section();
    assert_eq!(c.checkpoint().unwrap_err().kind(), ErrorKind::HeldByCaller);
}

#[test]
fn hooks_may_enter_critical_sections() {
    let c = Coordinator::new();
    let c2 = c.clone();
    let entered = Arc::new(AtomicUsize::new(0));
    let e = entered.clone();
    let _r = c.context().register(from_fns(
        "uses-app-code",
        move |_| {
            let _cs = c2.critical_section();
            e.fetch_add(1, Ordering::SeqCst);
            Ok(())
        },
        |_| Ok(()),
    ));
    c.simulate().unwrap();
    assert_eq!(entered.load(Ordering::SeqCst), 1);
}

// 8. Simulated cycle: a report of every hook with durations.

#[test]
fn the_simulated_cycle_reports_every_hook() {
    let log = Log::default();
    let c = Coordinator::new();
    let _a = c.context().register(rec("a", &log));
    let _b = c.context().register(rec("b", &log));
    let report = c.simulate().unwrap();
    let seen: Vec<_> = report
        .hooks()
        .iter()
        .map(|r| format!("{}:{}", r.resource(), r.phase()))
        .collect();
    assert_eq!(
        seen,
        [
            "b:before_checkpoint",
            "a:before_checkpoint",
            "a:after_restore",
            "b:after_restore"
        ]
    );
    assert!(report.hooks().iter().all(|r| r.is_ok()));
}

#[test]
fn waiting_for_the_end_of_a_cycle() {
    let c = Coordinator::new();
    assert!(c.wait_idle(Some(Duration::from_millis(1))));
    assert!(c.last_cycle().is_none());
    let checkpoint = c.checkpoint().unwrap();
    assert!(!c.wait_idle(Some(Duration::from_millis(20))));
    let c2 = c.clone();
    let waiter = thread::spawn(move || c2.wait_idle(None));
    thread::sleep(Duration::from_millis(50));
    checkpoint.complete(RestoreReason::Aborted).unwrap();
    assert!(waiter.join().unwrap());
    assert_eq!(c.last_cycle().unwrap().reason, RestoreReason::Aborted);
    assert!(
        c.last_restore().is_none(),
        "an aborted cycle is not a restore"
    );
    assert!(!crac_core::in_critical_section());
    let _cs = c.critical_section();
    assert!(crac_core::in_critical_section());
}

// 9. Draining.

#[test]
fn a_checkpoint_drains_first_and_its_hooks_run_once_the_counted_connections_closed() {
    let c = Coordinator::new();
    let log = Log::default();
    let (c2, l) = (c.clone(), log.clone());
    let _observer = c.context().register(crac_core::from_fns(
        "observer",
        move |_| {
            let line = format!(
                "before: draining {}, open {}",
                c2.is_draining(),
                c2.connections()
            );
            l.lock().unwrap().push(line);
            Ok(())
        },
        |_| Ok(()),
    ));
    // A server thread that closes its one connection once draining is on.
    let connection = c.connection();
    let (c3, l) = (c.clone(), log.clone());
    let server = thread::spawn(move || {
        while !c3.is_draining() {
            thread::yield_now();
        }
        l.lock().unwrap().push("closed".to_owned());
        drop(connection);
    });
    c.simulate().unwrap();
    server.join().unwrap();
    assert_eq!(take(&log), ["closed", "before: draining true, open 0"]);
    assert!(!c.is_draining(), "draining ends with the cycle");
}

// 10. Retirement.

#[test]
fn retiring_drains_tells_every_retire_hook_once_in_order_and_wakes_the_waiters() {
    let c = Coordinator::new();
    let told = Arc::new(Mutex::new(Vec::new()));
    for name in ["state", "broken", "cache"] {
        let told = told.clone();
        c.on_retire(name, move || {
            if name == "broken" {
                panic!("disk full");
            }
            told.lock().unwrap().push(name);
        });
    }
    assert!(!c.is_draining() && !c.is_retiring());
    assert!(!c.wait_retired(Some(Duration::from_millis(10))));
    let c2 = c.clone();
    let waiter = thread::spawn(move || c2.wait_retired(None));
    let retired = c.retire();
    assert_eq!(retired.failed, ["broken: panicked: disk full"]);
    assert!(retired.heard);
    assert!(waiter.join().unwrap());
    assert!(c.is_draining() && c.is_retiring());
    assert_eq!(*told.lock().unwrap(), ["state", "cache"]);
    // Once: a second call tells nobody again.
    assert!(c.retire().failed.is_empty());
    assert_eq!(told.lock().unwrap().len(), 2);
    // No checkpoint hook ran, and checkpoints still work (a retiring service may be dumped).
    assert!(c.simulate().is_ok());
    // A process where nothing listens for retirement (no hook, nobody waiting) is told so.
    let deaf = Coordinator::new();
    let retired = deaf.retire();
    assert!(!retired.heard && retired.failed.is_empty());
    assert!(deaf.is_draining());
}
