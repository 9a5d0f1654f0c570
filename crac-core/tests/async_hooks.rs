//! Async resources (feature `tokio`): the same contract as sync ones, on the application's
//! runtime, and what happens when the runtime or the future misbehaves.
#![cfg(feature = "tokio")]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crac_core::{
    from_async_fns, from_fns, Coordinator, ErrorKind, HookError, HookFailure, Limits, Phase,
    Priority, RestoreReason,
};
use tokio::runtime::{Builder, Handle, Runtime};

type Log = Arc<Mutex<Vec<String>>>;

fn take(log: &Log) -> Vec<String> {
    std::mem::take(&mut *log.lock().unwrap())
}

fn runtime() -> Runtime {
    Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("app-runtime")
        .enable_all()
        .build()
        .unwrap()
}

/// An async resource that logs "name:before" / "name:after:reason" after yielding to the
/// runtime's timer, so the hooks really are asynchronous.
fn async_rec(name: &'static str, log: &Log) -> impl crac_core::AsyncResource + 'static {
    let (b, a) = (log.clone(), log.clone());
    from_async_fns(
        name,
        move |_| {
            let b = b.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                b.lock().unwrap().push(format!("{name}:before"));
                Ok(())
            }
        },
        move |info| {
            let a = a.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                a.lock()
                    .unwrap()
                    .push(format!("{name}:after:{}", info.reason));
                Ok(())
            }
        },
    )
}

fn sync_rec(name: &'static str, log: &Log) -> impl crac_core::Resource + 'static {
    let (b, a) = (log.clone(), log.clone());
    from_fns(
        name,
        move |_| {
            b.lock().unwrap().push(format!("{name}:before"));
            Ok(())
        },
        move |info| {
            a.lock()
                .unwrap()
                .push(format!("{name}:after:{}", info.reason));
            Ok(())
        },
    )
}

#[test]
fn async_and_sync_resources_interleave_in_one_order() {
    let rt = runtime();
    let log = Log::default();
    let c = Coordinator::new();
    let ctx = c.context();
    let _a = ctx.register(sync_rec("a", &log));
    let _b = ctx.register_async(rt.handle().clone(), async_rec("b", &log));
    let _infra = ctx.register_async_with(
        Priority::Infrastructure,
        rt.handle().clone(),
        async_rec("infra", &log),
    );
    let _c = ctx.register(sync_rec("c", &log));

    let report = c.simulate().unwrap();
    assert_eq!(
        take(&log),
        [
            "c:before",
            "b:before",
            "a:before",
            "infra:before",
            "infra:after:restored",
            "a:after:restored",
            "b:after:restored",
            "c:after:restored",
        ]
    );
    let names: Vec<_> = report
        .phase(Phase::AfterRestore)
        .map(|r| r.resource())
        .collect();
    assert_eq!(names, ["infra", "a", "b", "c"]);
    assert_eq!(ctx.resource_names(), ["infra", "a", "b", "c"]);
}

#[test]
fn async_hooks_run_on_the_runtime_they_were_registered_with() {
    let rt = runtime();
    let seen = Arc::new(Mutex::new(None));
    let c = Coordinator::new();
    let s = seen.clone();
    let _r = c.context().register_async(
        rt.handle().clone(),
        from_async_fns(
            "where",
            move |_| {
                let s = s.clone();
                async move {
                    // The runtime's own I/O, timers and tasks work here.
                    assert_eq!(Handle::current().metrics().num_workers(), 2);
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                    let addr = listener.local_addr()?;
                    let accept = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
                    tokio::net::TcpStream::connect(addr).await?;
                    accept.await??;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    // Once it has waited, the runtime's threads drive it.
                    let thread = std::thread::current().name().map(str::to_owned);
                    *s.lock().unwrap() = thread;
                    Ok(())
                }
            },
            |_| async { Ok(()) },
        ),
    );
    c.simulate().unwrap();
    assert_eq!(seen.lock().unwrap().as_deref(), Some("app-runtime"));
}

#[test]
fn a_failing_or_panicking_async_hook_refuses_the_checkpoint_and_everyone_told_is_rolled_back() {
    let rt = runtime();
    let log = Log::default();
    let c = Coordinator::new();
    let _first = c.context().register(sync_rec("first", &log));
    let _ok = c
        .context()
        .register_async(rt.handle().clone(), async_rec("ok", &log));
    let _failing = c.context().register_async(
        rt.handle().clone(),
        from_async_fns(
            "failing",
            |_| async { Err::<(), HookError>("pool would not close".into()) },
            |_| async { Ok(()) },
        ),
    );
    let _panicking = c.context().register_async(
        rt.handle().clone(),
        from_async_fns(
            "panicking",
            |_| async {
                tokio::task::yield_now().await;
                panic!("hook exploded")
            },
            |_| async { Ok(()) },
        ),
    );

    let err = c.simulate().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused);
    assert_eq!(
        err.to_string(),
        "checkpoint refused: before_checkpoint of \"panicking\" panicked: hook exploded; \
         before_checkpoint of \"failing\" failed: pool would not close; \
         the resources that were told were rolled back (after_restore, reason aborted)"
    );
    assert_eq!(
        take(&log),
        [
            "ok:before",
            "first:before",
            "first:after:aborted",
            "ok:after:aborted"
        ]
    );
    // The runtime survived the panic and serves the next cycle.
    assert!(rt.block_on(async { tokio::spawn(async { 7 }).await.unwrap() }) == 7);
}

#[test]
fn an_async_hook_that_never_completes_is_cancelled_at_its_limit_and_named() {
    let rt = runtime();
    let log = Log::default();
    let dropped = Arc::new(AtomicBool::new(false));
    let c = Coordinator::new();
    c.set_limits(Limits::default().with_hook(Some(Duration::from_millis(200))));
    let _other = c.context().register(sync_rec("other", &log));
    let d = dropped.clone();
    let a = log.clone();
    let _stuck = c.context().register_async(
        rt.handle().clone(),
        from_async_fns(
            "stuck",
            move |_| {
                let guard = DropFlag(d.clone());
                async move {
                    let _held = guard;
                    std::future::pending::<()>().await;
                    Ok(())
                }
            },
            move |info| {
                let a = a.clone();
                async move {
                    a.lock()
                        .unwrap()
                        .push(format!("stuck:after:{}", info.reason));
                    Ok(())
                }
            },
        ),
    );

    let err = c.simulate().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused);
    let failure = err.failures().next().unwrap();
    assert_eq!(failure.resource(), "stuck");
    assert!(matches!(
        failure.failure(),
        Some(HookFailure::Cancelled { limit }) if *limit == Duration::from_millis(200)
    ));
    assert!(
        err.to_string().contains(
            "before_checkpoint of \"stuck\" cancelled: still pending after 200ms, \
             its future was dropped"
        ),
        "{err}"
    );
    assert!(
        dropped.load(Ordering::SeqCst),
        "the cancelled future was dropped"
    );
    // It was called and is over, so it is told to come back, like everyone told.
    assert_eq!(
        take(&log),
        ["other:before", "other:after:aborted", "stuck:after:aborted"]
    );
    // Not left busy: the next cycle calls it again (and cancels it again).
    let again = c.simulate().unwrap_err();
    assert!(matches!(
        again.failures().next().unwrap().failure(),
        Some(HookFailure::Cancelled { .. })
    ));
}

struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[test]
fn an_async_hook_that_blocks_its_thread_past_the_grace_is_abandoned_like_a_sync_one() {
    let rt = runtime();
    let c = Coordinator::new();
    c.set_limits(Limits::default().with_hook(Some(Duration::from_millis(100))));
    let _blocking = c.context().register_async(
        rt.handle().clone(),
        from_async_fns(
            "blocking",
            |_| async {
                std::thread::sleep(Duration::from_millis(2500));
                Ok(())
            },
            |_| async { Ok(()) },
        ),
    );
    let err = c.simulate().unwrap_err();
    let failure = err.failures().next().unwrap();
    assert_eq!(failure.resource(), "blocking");
    assert!(
        matches!(failure.failure(), Some(HookFailure::TimedOut { .. })),
        "{err}"
    );
    // Still running: the next cycle leaves it alone rather than overlapping its hooks.
    let again = c.simulate().unwrap_err();
    assert!(
        matches!(
            again.failures().next().unwrap().failure(),
            Some(HookFailure::StillRunning)
        ),
        "{again}"
    );
}

#[test]
fn a_runtime_shut_down_before_the_checkpoint_is_a_named_error_and_the_rest_roll_back() {
    let rt = runtime();
    let handle = rt.handle().clone();
    let log = Log::default();
    let c = Coordinator::new();
    let _first = c.context().register(sync_rec("first", &log));
    let _pool = c.context().register_async(handle, async_rec("pool", &log));
    rt.shutdown_timeout(Duration::from_secs(1));

    let err = c.simulate().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused);
    assert_eq!(
        err.to_string(),
        "checkpoint refused: before_checkpoint of \"pool\" not run: the tokio runtime this \
         resource was registered with has shut down; keep the runtime alive for as long as \
         the resource is registered (drop the Registration before shutting the runtime down); \
         the resources that were told were rolled back (after_restore, reason aborted)"
    );
    assert_eq!(take(&log), ["first:before", "first:after:aborted"]);
}

#[test]
fn a_cycle_without_limits_asked_on_a_runtime_thread_refuses_instead_of_blocking_it() {
    let rt = Builder::new_current_thread().enable_all().build().unwrap();
    let c = Coordinator::new();
    c.set_limits(Limits::unlimited());
    let _pool = c
        .context()
        .register_async(rt.handle().clone(), async_rec("pool", &Log::default()));
    let err = rt.block_on(async { c.simulate().unwrap_err() });
    assert_eq!(err.kind(), ErrorKind::Refused);
    assert!(
        err.to_string().contains(
            "before_checkpoint of \"pool\" not run: it was due on a thread of a tokio runtime \
             with no time limits"
        ),
        "{err}"
    );
}

#[test]
fn without_limits_a_cycle_asked_from_outside_the_runtime_runs_async_hooks_inline() {
    let rt = runtime();
    let log = Log::default();
    let c = Coordinator::new();
    c.set_limits(Limits::unlimited());
    let _pool = c
        .context()
        .register_async(rt.handle().clone(), async_rec("pool", &log));
    c.simulate_with(RestoreReason::Resumed).unwrap();
    assert_eq!(take(&log), ["pool:before", "pool:after:resumed"]);
}

#[test]
fn a_checkpoint_asked_from_an_async_hook_is_refused_as_recursive() {
    let rt = runtime();
    let c = Coordinator::new();
    let inner = c.clone();
    let seen = Arc::new(Mutex::new(None));
    let s = seen.clone();
    let _r = c.context().register_async(
        Handle::clone(rt.handle()),
        from_async_fns(
            "recursive",
            move |_| {
                let (inner, s) = (inner.clone(), s.clone());
                async move {
                    *s.lock().unwrap() = Some(inner.checkpoint().unwrap_err().kind());
                    Ok(())
                }
            },
            |_| async { Ok(()) },
        ),
    );
    c.simulate().unwrap();
    assert_eq!(*seen.lock().unwrap(), Some(ErrorKind::Recursive));
}
