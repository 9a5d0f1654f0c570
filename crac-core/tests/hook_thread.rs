//! The hook thread's life, alone in its test process so that threads can be counted exactly.

use std::thread;
use std::time::{Duration, Instant};

use crac_core::{from_fns, Coordinator, ErrorKind, Limits};

fn hook_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "crac-hooks")
        })
        .count()
}

#[test]
fn the_hook_thread_is_reused_replaced_when_stuck_and_gone_when_idle() {
    let c = Coordinator::new();
    c.set_limits(Limits::default().with_hook(Some(Duration::from_millis(100))));
    let _a = c.context().register(from_fns("a", |_| Ok(()), |_| Ok(())));
    assert_eq!(hook_threads(), 0, "no thread before the first cycle");
    for _ in 0..5 {
        c.simulate().unwrap();
    }
    assert_eq!(hook_threads(), 1, "one thread serves cycle after cycle");

    let slow = c.context().register(from_fns(
        "slow",
        |_| {
            thread::sleep(Duration::from_millis(400));
            Ok(())
        },
        |_| Ok(()),
    ));
    assert_eq!(c.checkpoint().unwrap_err().kind(), ErrorKind::Refused);
    drop(slow);
    // The stuck thread was let go; a new one serves the next cycle, in time.
    let started = Instant::now();
    c.simulate().unwrap();
    assert!(started.elapsed() < Duration::from_millis(300));
    assert_eq!(hook_threads(), 2, "the stuck thread and its replacement");

    // Idle for longer than the thread waits for work: both are gone.
    thread::sleep(Duration::from_millis(2600));
    assert_eq!(hook_threads(), 0);
}
