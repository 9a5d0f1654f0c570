//! The short soak: crac-bench's item 6 with a few cycles of each kind. It fails when the cache
//! server's state does not survive a cycle, a request fails under load during a
//! `--leave-running` checkpoint, or descriptors, threads or memory grow.

use std::process::{Command, Stdio};

use crate::util::{bin, env, text};

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_short_soak_keeps_state_loses_nothing_and_stays_flat() {
    let Some(_env) = env() else { return };
    let out = Command::new(bin("crac-bench"))
        .args(["--only", "6", "--soak", "3"])
        .stdin(Stdio::null())
        .output()
        .expect("run crac-bench");
    let said = text(&out);
    assert!(out.status.success(), "the soak failed:\n{said}");
    assert!(
        said.contains("6. soak: state intact, nothing lost, flat"),
        "no verdict for the soak:\n{said}"
    );
    assert!(said.contains("(0 failed)"), "requests failed:\n{said}");
}
