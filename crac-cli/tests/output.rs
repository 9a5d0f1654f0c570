//! What `crac` does when whoever reads its output has gone (`crac images list | head -0`): the
//! command's own outcome, no panic. No CRIU needed.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// A pipe's write end whose read end is already closed: every write to it fails (EPIPE).
fn reader_gone() -> OwnedFd {
    let (read, write) = nix::unistd::pipe().expect("a pipe");
    drop(read);
    write
}

fn scratch_store(tag: &str) -> PathBuf {
    std::env::temp_dir()
        .join(format!("crac-output-{tag}-{}", std::process::id()))
        .join("store")
}

#[test]
fn a_closed_stdout_ends_no_command_in_a_panic() {
    for (tag, json) in [("text", false), ("json", true)] {
        let store = scratch_store(tag);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_crac"));
        cmd.arg("--store").arg(&store).args(["images", "list"]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(reader_gone()))
            .stderr(Stdio::piped())
            .output()
            .expect("crac runs");
        let _ = std::fs::remove_dir_all(store.parent().expect("a parent"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{tag}: {stderr}");
        assert_eq!(stderr, "", "{tag}");
    }
}
