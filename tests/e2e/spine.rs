//! The spine end to end: a real CRIU runs crac-action against crac-test-target, and each test
//! asserts what the target itself observed (its hook log, its in-memory state, its heartbeat).

use std::fs;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;

use crate::util::{
    self, after_all, agent_dir, concat, read_lines, wait_until, Scratch, Target, BEFORE_ALL,
};

/// The names in the agent folder of `pid`.
fn folder_entries(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(agent_dir(pid))
        .expect("agent folder")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// (a) A killing dump, then a restore: before hooks in reverse order before the freeze, after
/// hooks in order with reason "restored" by the time `criu restore` returns, memory intact.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn dump_and_restore_run_the_hooks_in_order_and_keep_the_state() {
    let Some(env) = util::env() else { return };
    let scratch = Scratch::new("restore");
    let target = Target::start(&scratch.join("t"), &[]);
    let before = target.assert_serving(3);

    let images = scratch.join("img");
    let dump = env.dump(target.pid, &images, &[], &[]);
    assert!(dump.ok(), "{dump:?}");
    // The hooks wrote these lines themselves, so they ran before CRIU froze the process.
    assert_eq!(target.hooks(), BEFORE_ALL, "{dump:?}");
    let frozen = target.state().expect("state");
    assert!(frozen.counter >= before.counter);
    wait_until(
        Duration::from_secs(5),
        "CRIU to kill the dumped target",
        || !target.is_alive(),
    );
    let pid = target.pid;
    let restored_view = Target::restored(&target);
    target.reap_dumped();
    // The watcher ends once CRIU has exited (its target is gone: nothing to tell).
    wait_until(Duration::from_secs(5), "the watcher to exit", || {
        util::watchers().is_empty()
    });
    // Nothing was left in the agent's folder but its socket, which the image binds again.
    assert_eq!(folder_entries(pid), ["agent.sock"]);

    let restore = env.restore(&images);
    assert!(restore.ok(), "{restore:?}");
    // post-resume blocks until the after hooks are done: no waiting needed here.
    assert_eq!(
        restored_view.hooks(),
        concat(&BEFORE_ALL, &after_all("restored", 1)),
        "{restore:?}"
    );
    let after = restored_view.assert_serving(frozen.counter);
    assert_eq!(after.pid, pid);
    assert_eq!(
        after.token, frozen.token,
        "the in-memory token changed: not the same memory"
    );
    assert_eq!(after.generation, 1);
    assert!(restore
        .action_lines()
        .iter()
        .any(|l| l.contains("post-resume: pid")
            && l.contains("after_restore (restored) ok, 3 hooks")));

    // SIGTERM still ends the restored process as by default, and the agent cleans up its socket.
    assert!(agent_dir(pid).join("agent.sock").exists());
    let status = restored_view.terminate();
    assert!(
        matches!(status, WaitStatus::Signaled(_, Signal::SIGTERM, _)),
        "{status:?}"
    );
    assert!(!agent_dir(pid).exists(), "the agent folder was left behind");
}

/// (b) --leave-running: the original is told "resumed" and keeps serving.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn leave_running_resumes_the_original() {
    let Some(env) = util::env() else { return };
    let scratch = Scratch::new("leave-running");
    let target = Target::start(&scratch.join("t"), &[]);
    target.assert_serving(3);

    let images = scratch.join("img");
    let watchers_before = util::watchers();
    let dump = env.dump(target.pid, &images, &["--leave-running"], &[]);
    assert!(dump.ok(), "{dump:?}");
    assert!(images.join("pstree.img").exists(), "no image was written");
    // The watcher tells the target once CRIU has exited; bounded wait.
    wait_until(Duration::from_secs(10), "after_restore (resumed)", || {
        target.hooks().len() == 6
    });
    assert_eq!(
        target.hooks(),
        concat(&BEFORE_ALL, &after_all("resumed", 1))
    );
    // The first heartbeat after the cycle shows the new generation.
    let state = target.assert_serving(target.state().expect("state").counter);
    assert_eq!(state.generation, 1);
    assert_eq!(
        folder_entries(target.pid),
        ["agent.sock"],
        "a file left behind"
    );
    wait_until(Duration::from_secs(5), "the watcher to exit", || {
        util::watchers()
            .iter()
            .all(|pid| watchers_before.contains(pid))
    });
}

/// (c) A failing before hook: criu fails, the target was rolled back ("aborted") and serves.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_failing_hook_aborts_the_dump_and_rolls_back() {
    let Some(env) = util::env() else { return };
    let scratch = Scratch::new("failing");
    let target = Target::start(&scratch.join("t"), &[("CRAC_TEST_FAIL", "second")]);
    target.assert_serving(3);

    let images = scratch.join("img");
    let dump = env.dump(target.pid, &images, &[], &[]);
    assert!(!dump.ok(), "{dump:?}");
    assert!(dump.log.contains(&format!(
        "crac-action: pre-dump: pid {}: checkpoint refused: before_checkpoint of \"second\" failed: second cannot go down",
        target.pid
    )), "{dump:?}");
    assert!(dump.log.contains("Pre dump script failed"), "{dump:?}");
    assert!(target.is_alive());
    assert_eq!(
        target.hooks(),
        concat(&BEFORE_ALL, &after_all("aborted", 0))
    );
    let state = target.state().expect("state");
    assert_eq!(state.generation, 0);
    target.assert_serving(state.counter);
    assert!(
        !images.join("pages-1.img").exists(),
        "a half image was written"
    );
}

/// (d) A hook that hangs: the agent's per-hook limit refuses the checkpoint in time, naming the
/// resource; the others are rolled back.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_hanging_hook_aborts_the_dump_within_the_hook_limit() {
    let Some(env) = util::env() else { return };
    let scratch = Scratch::new("hanging");
    let target = Target::start(
        &scratch.join("t"),
        &[
            ("CRAC_TEST_HANG", "second"),
            ("CRAC_TEST_HOOK_LIMIT_MS", "500"),
        ],
    );
    target.assert_serving(3);

    let dump = env.dump(target.pid, &scratch.join("img"), &[], &[]);
    assert!(!dump.ok(), "{dump:?}");
    assert!(dump.took < Duration::from_secs(10), "{dump:?}");
    assert!(
        dump.log
            .contains("before_checkpoint of \"second\" timed out: still running after 500ms"),
        "{dump:?}"
    );
    // "second" is still stuck in its hook, so only the others come back up.
    assert_eq!(
        target.hooks(),
        [
            "before third",
            "before second",
            "before first",
            "after first aborted gen=0",
            "after third aborted gen=0"
        ]
    );
    let state = target.state().expect("state");
    target.assert_serving(state.counter);
}

/// (d') An agent that does not answer in time: crac-action's own limit aborts the dump, and
/// the agent, finding nobody to hear that its hooks succeeded, rolls itself back.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn an_agent_that_does_not_answer_in_time_is_abandoned_and_rolls_back() {
    let Some(env) = util::env() else { return };
    let scratch = Scratch::new("no-answer");
    let target = Target::start(
        &scratch.join("t"),
        &[
            ("CRAC_TEST_HANG", "second:2500"),
            ("CRAC_TEST_HOOK_LIMIT_MS", "10000"),
        ],
    );
    target.assert_serving(3);

    let dump = env.dump(
        target.pid,
        &scratch.join("img"),
        &[],
        &[("CRAC_ACTION_TIMEOUT", "1")],
    );
    assert!(!dump.ok(), "{dump:?}");
    assert!(dump.took < Duration::from_millis(2500), "{dump:?}");
    assert!(
        dump.log.contains(&format!(
            "crac-action: pre-dump: pid {}: the agent at {} did not reply within 1s (CRAC_ACTION_TIMEOUT sets this limit); the dump is aborted and the tree keeps running",
            target.pid,
            agent_dir(target.pid).join("agent.sock").display()
        )),
        "{dump:?}"
    );
    assert!(target.is_alive());
    wait_until(Duration::from_secs(15), "the agent to roll back", || {
        target.hooks().len() == 6
    });
    assert_eq!(
        target.hooks(),
        concat(&BEFORE_ALL, &after_all("aborted", 0))
    );
    let state = target.state().expect("state");
    assert_eq!(state.generation, 0);
    target.assert_serving(state.counter);
}

/// (e) No agent: dump and restore succeed, with one log line each.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_process_without_an_agent_is_dumped_and_restored() {
    let Some(env) = util::env() else { return };
    let scratch = Scratch::new("no-agent");
    let target = Target::start(&scratch.join("t"), &[("CRAC_TEST_NO_AGENT", "1")]);
    target.assert_serving(3);

    let images = scratch.join("img");
    let dump = env.dump(target.pid, &images, &[], &[]);
    assert!(dump.ok(), "{dump:?}");
    assert_eq!(
        dump.action_lines(),
        [format!(
            "crac-action: pre-dump: no agent in the process tree of pid {} (no socket at {}); nothing to coordinate",
            target.pid,
            agent_dir(target.pid).join("agent.sock").display()
        )]
    );
    let frozen = target.state().expect("state");
    let restored = Target::restored(&target);
    target.reap_dumped();
    let restore = env.restore(&images);
    assert!(restore.ok(), "{restore:?}");
    let state = restored.assert_serving(frozen.counter);
    assert_eq!(state.token, frozen.token);
    assert!(restored.hooks().is_empty());
}

/// (e') With CRAC_REQUIRE_AGENT=1, a tree without an agent is not dumped.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn requiring_an_agent_refuses_a_process_without_one() {
    let Some(env) = util::env() else { return };
    let scratch = Scratch::new("require-agent");
    let target = Target::start(&scratch.join("t"), &[("CRAC_TEST_NO_AGENT", "1")]);
    let dump = env.dump(
        target.pid,
        &scratch.join("img"),
        &[],
        &[("CRAC_REQUIRE_AGENT", "1")],
    );
    assert!(!dump.ok(), "{dump:?}");
    assert!(
        dump.log.contains(&format!(
            "crac-action: pre-dump: no agent in the process tree of pid {}",
            target.pid
        )),
        "{dump:?}"
    );
    assert!(target.is_alive());
}

/// (f) A parent and a child, both with agents: children go down first, parents come up first.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_parent_and_a_child_are_both_coordinated() {
    let Some(env) = util::env() else { return };
    let scratch = Scratch::new("tree");
    let order_log = scratch.join("order.log");
    let order = order_log.to_str().expect("utf-8 path");
    let target = Target::start(
        &scratch.join("t"),
        &[("CRAC_TEST_CHILD", "1"), ("CRAC_TEST_ORDER_LOG", order)],
    );
    let child_pid: u32 = fs::read_to_string(target.dir.join("child/ready"))
        .expect("child ready")
        .trim()
        .parse()
        .expect("child pid");
    let (parent, child) = (target.pid, child_pid);

    let images = scratch.join("img");
    let dump = env.dump(target.pid, &images, &[], &[]);
    assert!(dump.ok(), "{dump:?}");
    let expected_down = [
        format!("{child} before child-b"),
        format!("{child} before child-a"),
        format!("{parent} before third"),
        format!("{parent} before second"),
        format!("{parent} before first"),
    ];
    assert_eq!(read_lines(&order_log), expected_down, "{dump:?}");

    let restored = Target::restored(&target);
    target.reap_dumped();
    // The child was re-parented to this (subreaper) process when its parent died.
    util::reap(child, Duration::from_secs(10));
    let restore = env.restore(&images);
    assert!(restore.ok(), "{restore:?}");
    let mut expected = expected_down.to_vec();
    expected.extend([
        format!("{parent} after first restored gen=1"),
        format!("{parent} after second restored gen=1"),
        format!("{parent} after third restored gen=1"),
        format!("{child} after child-a restored gen=1"),
        format!("{child} after child-b restored gen=1"),
    ]);
    assert_eq!(read_lines(&order_log), expected, "{restore:?}");
    restored.end_with_child(child);
}

/// An image restored after the original exited cleanly (its agent folder removed, as after a
/// reboot): crac-action's pre-restore puts the folder back so CRIU can bind the socket again.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn an_image_restores_after_the_original_exited_and_removed_its_socket() {
    let Some(env) = util::env() else { return };
    let scratch = Scratch::new("after-exit");
    let target = Target::start(&scratch.join("t"), &[]);
    target.assert_serving(3);
    let pid = target.pid;
    let images = scratch.join("img");
    let dump = env.dump(pid, &images, &["--leave-running"], &[]);
    assert!(dump.ok(), "{dump:?}");
    wait_until(Duration::from_secs(10), "after_restore (resumed)", || {
        target.hooks().len() == 6
    });
    let restored = Target::restored(&target);
    let status = target.terminate();
    assert!(
        matches!(status, WaitStatus::Signaled(_, Signal::SIGTERM, _)),
        "{status:?}"
    );
    assert!(!agent_dir(pid).exists());

    let restore = env.restore(&images);
    assert!(restore.ok(), "{restore:?}");
    assert!(
        restore.log.contains(&format!(
            "crac-action: pre-restore: recreated the agent folder {} for pid {pid}",
            agent_dir(pid).display()
        )),
        "{restore:?}"
    );
    let hooks = restored.hooks();
    assert_eq!(hooks[6..], after_all("restored", 1), "{restore:?}");
    let state = restored.assert_serving(restored.state().expect("state").counter);
    assert_eq!(state.generation, 1);
}
