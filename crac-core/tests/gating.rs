//! Request gating for async services: the `Send` critical section and the tower layer.
#![cfg(all(feature = "tokio", feature = "tower"))]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crac_core::tower::CheckpointGateLayer;
use crac_core::{from_fns, AsyncCriticalSection, Coordinator, ErrorKind, Limits};
use tower::{Service, ServiceBuilder, ServiceExt};

type Log = Arc<Mutex<Vec<String>>>;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn logging(log: &Log) -> impl crac_core::Resource + 'static {
    let (b, a) = (log.clone(), log.clone());
    from_fns(
        "hooks",
        move |_| {
            b.lock().unwrap().push("before".into());
            Ok(())
        },
        move |_| {
            a.lock().unwrap().push("after".into());
            Ok(())
        },
    )
}

#[test]
fn the_async_guard_is_send_and_can_be_held_across_awaits() {
    fn send<T: Send + Sync>() {}
    send::<AsyncCriticalSection>();
    send::<crac_core::EnterAsync>();
    let rt = runtime();
    let c = Coordinator::new();
    let c2 = c.clone();
    rt.block_on(async move {
        tokio::spawn(async move {
            let _guard = c2.critical_section_async().await;
            tokio::task::yield_now().await;
        })
        .await
        .unwrap();
    });
    c.simulate().unwrap();
}

#[test]
fn requests_wait_during_a_checkpoint_without_blocking_a_worker_and_go_on_after_restore() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let log = Log::default();
    let c = Coordinator::new();
    let _hooks = c.context().register(logging(&log));

    let checkpoint = c.checkpoint().unwrap();
    assert!(c.is_quiesced());
    let (c2, l2) = (c.clone(), log.clone());
    let request = rt.spawn(async move {
        let _guard = c2.critical_section_async().await;
        l2.lock().unwrap().push("request".into());
    });
    // The only worker thread is not blocked: other tasks run while the request waits.
    let other = rt.block_on(async {
        let other = tokio::spawn(async { "other task ran" }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        other
    });
    assert_eq!(other, "other task ran");
    assert!(!request.is_finished());
    assert_eq!(*log.lock().unwrap(), ["before"]);

    checkpoint
        .complete(crac_core::RestoreReason::Restored)
        .unwrap();
    rt.block_on(request).unwrap();
    assert_eq!(*log.lock().unwrap(), ["before", "after", "request"]);
}

#[test]
fn a_checkpoint_waits_for_async_guards_in_flight_and_gives_up_at_its_limit() {
    let rt = runtime();
    let log = Log::default();
    let c = Coordinator::new();
    c.set_limits(Limits::default().with_quiesce(Duration::from_millis(300)));
    let _hooks = c.context().register(logging(&log));

    // A request that ends soon: the checkpoint waits for it, then runs its hooks.
    let guard = rt.block_on(c.critical_section_async());
    let c2 = c.clone();
    let waiter = std::thread::spawn(move || {
        let checkpoint = c2.checkpoint().unwrap();
        checkpoint
            .complete(crac_core::RestoreReason::Resumed)
            .unwrap();
    });
    std::thread::sleep(Duration::from_millis(100));
    log.lock().unwrap().push("request done".into());
    drop(guard);
    waiter.join().unwrap();
    assert_eq!(*log.lock().unwrap(), ["request done", "before", "after"]);

    // A request that does not end: the checkpoint is refused, no hook runs, requests go on.
    let held = rt.block_on(c.critical_section_async());
    let err = c.checkpoint().unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Quiesce { held: 1, .. }),
        "{err}"
    );
    rt.block_on(async { drop(c.critical_section_async().await) });
    drop(held);
}

#[test]
fn the_layer_lets_no_request_run_between_before_checkpoint_and_after_restore_and_loses_none() {
    let rt = runtime();
    let c = Coordinator::new();
    let events = Log::default();
    let _hooks = c.context().register(logging(&events));
    let served = Arc::new(AtomicU64::new(0));

    let (e, s) = (events.clone(), served.clone());
    let service = ServiceBuilder::new()
        .layer(CheckpointGateLayer::with_coordinator(c.clone()))
        .service_fn(move |n: u64| {
            let (e, s) = (e.clone(), s.clone());
            async move {
                e.lock().unwrap().push(format!("start {n}"));
                tokio::time::sleep(Duration::from_millis(1)).await;
                e.lock().unwrap().push(format!("end {n}"));
                s.fetch_add(1, Ordering::SeqCst);
                Ok::<u64, std::convert::Infallible>(n * 2)
            }
        });

    const REQUESTS: u64 = 400;
    let clients = rt.spawn(async move {
        let mut tasks = Vec::new();
        for n in 0..REQUESTS {
            let mut service = service.clone();
            tasks.push(tokio::spawn(async move {
                service.ready().await.unwrap().call(n).await.unwrap()
            }));
            if n % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await.unwrap());
        }
        answers
    });
    // Checkpoints while the requests come in.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(5));
        c.simulate().unwrap();
    }
    let answers = rt.block_on(clients).unwrap();

    assert_eq!(answers, (0..REQUESTS).map(|n| n * 2).collect::<Vec<_>>());
    assert_eq!(served.load(Ordering::SeqCst), REQUESTS);
    let events = events.lock().unwrap();
    let mut inside = false;
    let mut cycles = 0;
    for event in events.iter() {
        match event.as_str() {
            "before" => {
                inside = true;
                cycles += 1;
            }
            "after" => inside = false,
            request => assert!(!inside, "{request} ran during a checkpoint: {events:?}"),
        }
    }
    assert_eq!(cycles, 3);
}

/// The gate needs no runtime: here a hand-written executor (park the thread until woken)
/// drives the guard's future while a checkpoint holds the gate shut.
#[test]
fn gating_needs_no_runtime_any_executor_drives_it() {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Wake, Waker};

    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }

    let c = Coordinator::new();
    let checkpoint = c.checkpoint().unwrap();
    let c2 = c.clone();
    let (waiting, is_waiting) = std::sync::mpsc::channel();
    let request = std::thread::spawn(move || {
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut enter = pin!(c2.critical_section_async());
        loop {
            if let Poll::Ready(guard) = enter.as_mut().poll(&mut cx) {
                break guard;
            }
            let _ = waiting.send(());
            std::thread::park();
        }
    });
    // Pending while the checkpoint runs...
    is_waiting.recv().unwrap();
    assert!(!request.is_finished());
    checkpoint
        .complete(crac_core::RestoreReason::Resumed)
        .unwrap();
    // ...then woken by its end, with a guard that holds the next checkpoint off.
    let guard = request.join().unwrap();
    c.set_limits(Limits::default().with_quiesce(Duration::from_millis(50)));
    assert!(matches!(
        c.checkpoint().unwrap_err().kind(),
        ErrorKind::Quiesce { held: 1, .. }
    ));
    drop(guard);
    c.simulate().unwrap();
}

/// No checkpoint running: the layer calls the inner service at once, in `call` (nothing is
/// moved into a boxed future); during one, only once the gate opens.
#[test]
fn the_layer_calls_the_inner_service_at_once_unless_a_checkpoint_runs() {
    let rt = runtime();
    let c = Coordinator::new();
    let called = Arc::new(AtomicU64::new(0));
    let seen = called.clone();
    let mut service = ServiceBuilder::new()
        .layer(CheckpointGateLayer::with_coordinator(c.clone()))
        .service_fn(move |n: u64| {
            seen.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok::<u64, std::convert::Infallible>(n))
        });
    rt.block_on(service.ready()).unwrap();
    let first = service.call(1);
    assert_eq!(called.load(Ordering::SeqCst), 1);
    assert_eq!(rt.block_on(first).unwrap(), 1);

    let checkpoint = c.checkpoint().unwrap();
    rt.block_on(service.ready()).unwrap();
    let second = rt.spawn(service.call(2));
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(called.load(Ordering::SeqCst), 1);
    checkpoint
        .complete(crac_core::RestoreReason::Resumed)
        .unwrap();
    assert_eq!(rt.block_on(second).unwrap().unwrap(), 2);
    assert_eq!(called.load(Ordering::SeqCst), 2);
}

/// Sections entered and left from many threads at once (the lock-free path) never overlap a
/// checkpoint's hooks, and the count the checkpoint waits on never drifts.
#[test]
fn sections_from_many_threads_never_overlap_a_checkpoint() {
    let c = Coordinator::new();
    let inside = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = inside.clone();
    let _hooks = c.context().register(from_fns(
        "overlap",
        move |_| {
            assert_eq!(
                seen.load(Ordering::SeqCst),
                0,
                "a section was held during the hooks"
            );
            Ok(())
        },
        |_| Ok(()),
    ));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (c, inside, stop) = (c.clone(), inside.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut entered = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let _section = c.critical_section();
                    inside.fetch_add(1, Ordering::SeqCst);
                    inside.fetch_sub(1, Ordering::SeqCst);
                    entered += 1;
                }
                entered
            })
        })
        .collect();
    for _ in 0..200 {
        c.simulate().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let entered: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(entered > 0);
    // Every section left: a checkpoint with a 0 quiescing limit finds none held.
    c.set_limits(Limits::default().with_quiesce(Duration::ZERO));
    c.simulate().unwrap();
}
