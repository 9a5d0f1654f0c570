//! What the podman and docker helpers share: running the engine's command, asserting that it
//! succeeded, and reading a container's init pid from `inspect`.

use std::process::{Command, Output, Stdio};

/// Runs `cmd` (the engine `program`) with no stdin, its output captured.
pub(crate) fn output(mut cmd: Command, program: &str) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"))
}

/// `out`, asserting that it succeeded (`what` says what it did).
pub(crate) fn succeeded(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what}: exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The pid that `inspect -f {{.State.Pid}}` printed.
pub(crate) fn init_pid(out: &Output) -> u32 {
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a pid")
}
