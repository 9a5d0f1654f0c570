//! Async hooks that misbehave during a real checkpoint: each refusal names the resource and
//! says what happened, every resource told is rolled back, and the service runs on.

use crate::util::{self, after_all, concat, text, Crac, Scratch, Target, BEFORE_ALL};

/// Checkpoints a target whose async resource misbehaves as `mode` says, and checks the
/// refusal says `expected`.
fn refused(mode: &str, expected: &str) {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new(&format!("async-{mode}"));
    let crac = Crac::new(&scratch);
    let target = Target::start(
        &scratch.join("t"),
        &[
            ("CRAC_TEST_ASYNC", mode),
            ("CRAC_TEST_HOOK_LIMIT_MS", "300"),
        ],
    );
    let before = target.assert_serving(1);
    let pid = target.pid.to_string();

    let out = crac.run(&["checkpoint", &pid, "--name", "web"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(expected), "{}", text(&out));
    assert!(
        stderr.contains(&format!(
            "pid {pid} is still running; hooks that ran were rolled back"
        )),
        "{}",
        text(&out)
    );
    // Everyone else was told, and brought back up; the service goes on serving.
    assert_eq!(
        target.hooks(),
        concat(&BEFORE_ALL, &after_all("aborted", 0))
    );
    assert!(target.is_alive());
    target.assert_serving(before.counter);
    assert!(
        crac.listing().is_empty(),
        "a refused checkpoint left an image"
    );
    target.terminate();
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn an_async_hook_that_panics_refuses_the_checkpoint_by_name() {
    refused(
        "panic",
        "before_checkpoint of \"async\" panicked: async hook exploded",
    );
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn an_async_hook_that_never_completes_is_cancelled_by_name() {
    refused(
        "pending",
        "before_checkpoint of \"async\" cancelled: still pending after 300ms, its future was dropped",
    );
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn an_async_hook_whose_runtime_has_shut_down_refuses_the_checkpoint_by_name() {
    refused(
        "shutdown",
        "before_checkpoint of \"async\" not run: the tokio runtime this resource was registered with has shut down",
    );
}
