//! An action script that is a shell wrapper running crac-action twice, without `exec`: the
//! way an operator sets `CRAC_*` for a runtime, and what a CRIU that runs each action twice
//! (CRIU 4.1 under runc) does. crac-action must take CRIU's pid from CRIU's environment, not
//! from its parent (the shell), and every step run twice must have the outcome of one run:
//! hooks once, one watcher.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;

use crate::util::{self, after_all, bin, concat, wait_until, Scratch, Target, BEFORE_ALL};

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_wrapper_that_runs_crac_action_twice_gets_one_cycle() {
    let Some(env) = util::env() else { return };
    let scratch = Scratch::new("twice");
    let wrapper = scratch.join("crac-action-twice.sh");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n# crac-action run twice, and not with exec: the shell stays its parent\n{0} || exit $?\n{0}\n",
            bin("crac-action").display()
        ),
    )
    .expect("wrapper");
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).expect("chmod");
    let target = Target::start(&scratch.join("t"), &[]);
    target.assert_serving(3);
    let pid = target.pid.to_string();
    let images = scratch.join("img");

    let watchers_before = util::watchers();
    let dump = env.criu_with(
        &wrapper,
        &["dump", "-t", &pid, "--leave-running"],
        &images,
        "dump.log",
        &[],
    );
    assert!(dump.ok(), "{dump:?}");
    wait_until(Duration::from_secs(10), "after_restore (resumed)", || {
        target.hooks().len() >= 6
    });
    // Give a second, wrong, cycle the time to show up if there were one.
    std::thread::sleep(Duration::from_millis(300));
    let expected = concat(&BEFORE_ALL, &after_all("resumed", 1));
    assert_eq!(target.hooks(), expected, "{dump:?}");
    let lines = dump.action_lines();
    assert!(
        lines.iter().any(|l| l.contains(&format!(
            "pre-dump: pid {pid}: before_checkpoint ok, already done for this cycle"
        ))),
        "{dump:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("a watcher for CRIU pid")
            && l.ends_with("runs already (this step ran before)")),
        "{dump:?}"
    );
    wait_until(Duration::from_secs(5), "the watcher to exit", || {
        util::watchers()
            .iter()
            .all(|pid| watchers_before.contains(pid))
    });

    // The original ends (its agent removes its folder); a restore through the wrapper runs
    // each after_restore once.
    let restored = Target::restored(&target);
    let status = target.terminate();
    assert!(
        matches!(status, WaitStatus::Signaled(_, Signal::SIGTERM, _)),
        "{status:?}"
    );
    let restore = env.criu_with(&wrapper, &["restore", "-d"], &images, "restore.log", &[]);
    assert!(restore.ok(), "{restore:?}");
    assert_eq!(
        restored.hooks()[6..],
        after_all("restored", 1),
        "{restore:?}"
    );
    assert!(
        restore.action_lines().iter().any(|l| l.ends_with(&format!(
            "post-resume: pid {pid}: no checkpoint pending, already came back up"
        ))),
        "{restore:?}"
    );
}
