//! The agent's socket is removed when the process ends, and the application's own handling of
//! SIGTERM/SIGINT is kept. These need no CRIU.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::util::{
    self, after_all, agent_dir, concat, read_lines, wait_until, Scratch, Target, BEFORE_ALL,
};

fn ends_with(env: &[(&str, &str)], signal: Option<Signal>) -> (WaitStatus, Vec<String>, bool) {
    let scratch = Scratch::new("signals");
    let target = Target::start(&scratch.join("t"), env);
    let pid = target.pid;
    assert!(agent_dir(pid).join("agent.sock").exists());
    if let Some(signal) = signal {
        kill(Pid::from_raw(pid as i32), signal).expect("signal");
    }
    let hooks_log = target.dir.join("hooks.log");
    let status = target.wait_exit(Duration::from_secs(10));
    (status, read_lines(&hooks_log), agent_dir(pid).exists())
}

#[test]
fn sigterm_still_terminates_and_the_socket_is_removed() {
    let (status, _, left) = ends_with(&[], Some(Signal::SIGTERM));
    assert!(
        matches!(status, WaitStatus::Signaled(_, Signal::SIGTERM, _)),
        "{status:?}"
    );
    assert!(!left, "agent folder left behind");
}

#[test]
fn sigint_still_terminates_and_the_socket_is_removed() {
    let (status, _, left) = ends_with(&[], Some(Signal::SIGINT));
    assert!(
        matches!(status, WaitStatus::Signaled(_, Signal::SIGINT, _)),
        "{status:?}"
    );
    assert!(!left, "agent folder left behind");
}

#[test]
fn an_application_handler_installed_before_the_agent_keeps_working() {
    let (status, hooks, left) = ends_with(
        &[("CRAC_TEST_OWN_SIGTERM", "before")],
        Some(Signal::SIGTERM),
    );
    assert!(matches!(status, WaitStatus::Exited(_, 0)), "{status:?}");
    assert_eq!(hooks, ["graceful exit"]);
    assert!(!left, "agent folder left behind");
}

#[test]
fn an_application_handler_installed_after_the_agent_keeps_working() {
    let (status, hooks, left) =
        ends_with(&[("CRAC_TEST_OWN_SIGTERM", "after")], Some(Signal::SIGTERM));
    assert!(matches!(status, WaitStatus::Exited(_, 0)), "{status:?}");
    assert_eq!(hooks, ["graceful exit"]);
    assert!(!left, "agent folder left behind");
}

#[test]
fn a_normal_exit_removes_the_socket() {
    let (status, _, left) = ends_with(&[("CRAC_TEST_EXIT_AFTER", "5")], None);
    assert!(matches!(status, WaitStatus::Exited(_, 0)), "{status:?}");
    assert!(!left, "agent folder left behind");
}

/// An application that handles SIGTERM and goes on serving for a while (draining) keeps its
/// agent meanwhile: a checkpoint then still runs its hooks. The socket goes when it exits.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_draining_application_keeps_its_agent_until_it_exits() {
    for when in ["before", "after"] {
        let Some(env) = util::env() else { return };
        let scratch = Scratch::new("draining");
        let target = Target::start(
            &scratch.join("t"),
            &[
                ("CRAC_TEST_OWN_SIGTERM", when),
                ("CRAC_TEST_DRAIN_MS", "3000"),
            ],
        );
        let pid = target.pid;
        kill(Pid::from_raw(pid as i32), Signal::SIGTERM).expect("SIGTERM");
        wait_until(Duration::from_secs(5), "the application to drain", || {
            target.hooks() == ["draining"]
        });
        assert!(
            agent_dir(pid).join("agent.sock").exists(),
            "handler installed {when} the agent: the socket went while the process lives on"
        );
        let dump = env.dump(pid, &scratch.join("img"), &["--leave-running"], &[]);
        assert!(dump.ok(), "{dump:?}");
        wait_until(Duration::from_secs(10), "after_restore (resumed)", || {
            target.hooks().len() == 7
        });
        let mut expected = vec!["draining".to_owned()];
        expected.extend(concat(&BEFORE_ALL, &after_all("resumed", 1)));
        assert_eq!(target.hooks(), expected, "{dump:?}");
        let status = target.wait_exit(Duration::from_secs(10));
        assert!(matches!(status, WaitStatus::Exited(_, 0)), "{status:?}");
        assert!(
            !agent_dir(pid).exists(),
            "agent folder left behind after the exit"
        );
    }
}
