//! crac-action's contract with CRIU, exercised by running the binary the way CRIU does (no
//! arguments, stdin closed, CRTOOLS_* in the environment). These need no CRIU; one needs root.

use std::process::{Command, Output, Stdio};

use crate::util::{bin, Scratch, Target};

fn action(env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin("crac-action"));
    cmd.env_remove("CRTOOLS_SCRIPT_ACTION")
        .env_remove("CRTOOLS_INIT_PID")
        .env_remove("CRAC_REQUIRE_AGENT")
        .env_remove("CRAC_ACTION_TIMEOUT")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("crac-action runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn actions_it_has_nothing_to_do_at_exit_0_silently() {
    for step in [
        "pre-restore",
        "network-lock",
        "query-ext-files",
        "some-future-step",
    ] {
        let out = action(&[("CRTOOLS_SCRIPT_ACTION", step)]);
        assert_eq!(out.status.code(), Some(0), "{step}: {}", stderr(&out));
        assert!(out.stderr.is_empty() && out.stdout.is_empty(), "{step}");
    }
}

#[test]
fn run_outside_criu_it_says_how_it_is_meant_to_run() {
    let out = action(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        "crac-action: CRTOOLS_SCRIPT_ACTION is not set: crac-action is run by CRIU, as in \
         `criu dump --action-script $(command -v crac-action) ...`\n"
    );
}

#[test]
fn malformed_settings_are_usage_errors() {
    let out = action(&[
        ("CRTOOLS_SCRIPT_ACTION", "pre-dump"),
        ("CRTOOLS_INIT_PID", "1"),
        ("CRAC_ACTION_TIMEOUT", "forever"),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        "crac-action: pre-dump: CRAC_ACTION_TIMEOUT=\"forever\": expected a number of seconds above 0, e.g. 30 or 2.5\n"
    );
    let out = action(&[
        ("CRTOOLS_SCRIPT_ACTION", "pre-dump"),
        ("CRTOOLS_INIT_PID", "x"),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        "crac-action: pre-dump: CRTOOLS_INIT_PID is \"x\", not a process id\n"
    );
}

#[test]
#[ignore = "needs root, as under CRIU: scripts/test.sh runs it"]
fn a_tree_without_agents_passes_with_one_line_unless_agents_are_required() {
    if !crac_test_support::root("to look into agent folders, as crac-action under CRIU") {
        return;
    }
    let scratch = Scratch::new("action-no-agent");
    let target = Target::start(&scratch.join("t"), &[("CRAC_TEST_NO_AGENT", "1")]);
    let pid = target.pid.to_string();
    let out = action(&[
        ("CRTOOLS_SCRIPT_ACTION", "pre-dump"),
        ("CRTOOLS_INIT_PID", &pid),
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stderr(&out).starts_with(&format!(
        "crac-action: pre-dump: no agent in the process tree of pid {pid} (no socket at "
    )));
    assert_eq!(stderr(&out).lines().count(), 1);
    let out = action(&[
        ("CRTOOLS_SCRIPT_ACTION", "post-resume"),
        ("CRTOOLS_INIT_PID", &pid),
        ("CRAC_REQUIRE_AGENT", "1"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).starts_with(&format!(
        "crac-action: post-resume: no agent in the process tree of pid {pid}"
    )));
}
