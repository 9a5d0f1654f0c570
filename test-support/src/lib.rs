//! Test support shared by crac-rs's test crates (not published).
//!
//! - [`may_run`] and [`root`]: what a test that needs more than a plain `cargo test` has (root,
//!   CRIU, runc and podman, PostgreSQL) decides when it starts. Such a test carries
//!   `#[ignore = "needs ..."]`, so that a plain `cargo test` reports it as ignored, never as
//!   passed; `scripts/test.sh` runs it with `--include-ignored`. Run so, it fails in CI
//!   (`CI=true`) when what it needs is missing, and elsewhere says why and how to run it, and
//!   returns.
//! - [`podman`]: podman with `--runtime runc` on a storage of its own, for the end-to-end tests
//!   and the benchmarks; [`docker`]: a private dockerd; [`registry`]: a private registry.
//! - [`agent_clients`]: scripted clients against a real agent, for crac-agent's randomized test
//!   and the fuzz target.
//! - [`http_load`]: a bounded HTTP load on loopback that counts what clients see (refused,
//!   failed, every answer's latency), for the upgrade tests and benchmark.
#![forbid(unsafe_code)]

pub mod agent_clients;
pub mod docker;
mod engine;
pub mod http_load;
pub mod podman;
pub mod registry;

/// Whether this is a CI run (`CI=true` or `CI=1`): there a test that cannot run fails.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether a test that needs more than a plain `cargo test` has may go on: `problem` says what
/// is missing here (None: nothing). Without a problem, true. With one, a panic in CI, and
/// elsewhere a line saying why and how to run it (`how`), then false: the test returns.
///
/// `what` names the kind of test in those lines ("end-to-end test", "container test").
///
/// # Panics
///
/// In CI when `problem` is set, and whenever the test was not marked
/// `#[ignore = "needs ..."]` (it runs without `--ignored` or `--include-ignored`), so that no
/// test that needs root or CRIU is reported as passed by a plain `cargo test`.
pub fn may_run(what: &str, problem: Option<String>, how: &str) -> bool {
    let marked = std::env::args().any(|arg| arg == "--include-ignored" || arg == "--ignored");
    match verdict(what, marked, in_ci(), problem, how) {
        Verdict::Run => true,
        Verdict::Skip(line) => {
            eprintln!("{line}");
            false
        }
        Verdict::Fail(message) => panic!("{message}"),
    }
}

/// What [`may_run`] does.
#[derive(Debug, PartialEq)]
enum Verdict {
    Run,
    /// Returns after printing this line.
    Skip(String),
    /// Panics with this message.
    Fail(String),
}

/// [`may_run`]'s decision, given whether the test was marked ignored (it runs with `--ignored`
/// or `--include-ignored`) and whether this is CI.
fn verdict(what: &str, marked: bool, ci: bool, problem: Option<String>, how: &str) -> Verdict {
    if !marked {
        return Verdict::Fail(format!(
            "this {what} needs more than a plain `cargo test` has: mark it \
             #[ignore = \"needs ...: scripts/test.sh runs it\"], so that a plain run reports it \
             as ignored, not passed"
        ));
    }
    match problem {
        None => Verdict::Run,
        Some(problem) if ci => Verdict::Fail(format!("{what} cannot run in CI: {problem}")),
        Some(problem) => Verdict::Skip(format!("SKIPPED {what}: {problem}. To run it: {how}")),
    }
}

/// [`may_run`] for a test that needs root and nothing else, `why` saying what for ("to drop a
/// child to another uid").
///
/// # Panics
///
/// As [`may_run`].
pub fn root(why: &str) -> bool {
    let problem = (!nix::unistd::geteuid().is_root()).then(|| format!("it needs root {why}"));
    may_run("test", problem, "as root, scripts/test.sh")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict_of(marked: bool, ci: bool, problem: Option<&str>) -> Verdict {
        let problem = problem.map(str::to_owned);
        verdict(
            "end-to-end test",
            marked,
            ci,
            problem,
            "as root, scripts/test.sh",
        )
    }

    #[test]
    fn a_test_not_marked_ignored_fails_wherever_it_runs() {
        let fail = Verdict::Fail(
            "this end-to-end test needs more than a plain `cargo test` has: mark it \
             #[ignore = \"needs ...: scripts/test.sh runs it\"], so that a plain run reports it \
             as ignored, not passed"
                .to_owned(),
        );
        for ci in [false, true] {
            assert_eq!(verdict_of(false, ci, None), fail);
            assert_eq!(verdict_of(false, ci, Some("CRIU needs root")), fail);
        }
    }

    #[test]
    fn a_marked_test_runs_when_nothing_is_missing() {
        assert_eq!(verdict_of(true, false, None), Verdict::Run);
        assert_eq!(verdict_of(true, true, None), Verdict::Run);
    }

    #[test]
    fn what_is_missing_fails_in_ci_and_is_said_with_the_way_to_run_it_elsewhere() {
        assert_eq!(
            verdict_of(true, true, Some("CRIU needs root")),
            Verdict::Fail("end-to-end test cannot run in CI: CRIU needs root".to_owned())
        );
        assert_eq!(
            verdict_of(true, false, Some("CRIU needs root")),
            Verdict::Skip(
                "SKIPPED end-to-end test: CRIU needs root. To run it: as root, scripts/test.sh"
                    .to_owned()
            )
        );
    }
}
