//! The process the end-to-end tests checkpoint: resources that log their hooks, in-memory
//! state that must survive, and a heartbeat that shows whether it still runs.
//!
//! Configured by environment:
//! - `CRAC_TEST_DIR` (required): where it writes `hooks.log`, `state` and `ready`.
//! - `CRAC_TEST_RESOURCES`: resource names, in registration order (default `first,second,third`).
//! - `CRAC_TEST_FAIL`: a resource whose before_checkpoint fails.
//! - `CRAC_TEST_HANG`: a resource whose before_checkpoint sleeps: `name` for a minute,
//!   `name:MS` for MS milliseconds.
//! - `CRAC_TEST_HOOK_LIMIT_MS`: the per-hook time limit.
//! - `CRAC_TEST_NO_AGENT=1`: do not start the agent.
//! - `CRAC_TEST_CHILD=1`: also start a child process like this one, in `$CRAC_TEST_DIR/child`.
//! - `CRAC_TEST_OWN_SIGTERM=before|after`: handle SIGTERM itself (a graceful exit with status
//!   0), installing the handler before or after the agent starts.
//! - `CRAC_TEST_EXIT_AFTER=N`: return from main after N heartbeats.
//! - `CRAC_TEST_SELF_CHECKPOINT=leave|stop`: once ready, checkpoint itself (destination from
//!   `CRAC_CHECKPOINT_TO`) and log `self-checkpoint: <reason>` or `self-checkpoint error: ...`.
//! - `CRAC_TEST_ORDER_LOG`: a log shared by a parent and its child; each hook appends
//!   `<pid> <line>`, so the order across processes shows.
//!
//! `state` holds `pid token counter generation`: the token is random and lives only in memory,
//! so a restored process that shows the same token really is the same memory.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crac_core::{CheckpointInfo, Coordinator, HookError, Limits, Resource, RestoreInfo};

struct Logged {
    name: String,
    log: PathBuf,
    order_log: Option<PathBuf>,
    fail: bool,
    hang: Option<Duration>,
}

impl Logged {
    fn append(&self, line: &str) {
        append(&self.log, line);
        if let Some(order_log) = &self.order_log {
            append(order_log, &format!("{} {line}", std::process::id()));
        }
    }
}

impl Resource for Logged {
    fn name(&self) -> std::borrow::Cow<'_, str> {
        self.name.as_str().into()
    }
    fn before_checkpoint(&self, _: &CheckpointInfo) -> Result<(), HookError> {
        self.append(&format!("before {}", self.name));
        if let Some(hang) = self.hang {
            std::thread::sleep(hang);
        }
        if self.fail {
            return Err(format!("{} cannot go down", self.name).into());
        }
        Ok(())
    }
    fn after_restore(&self, info: &RestoreInfo) -> Result<(), HookError> {
        self.append(&format!(
            "after {} {} gen={}",
            self.name, info.reason, info.generation
        ));
        Ok(())
    }
}

fn main() {
    let dir = PathBuf::from(std::env::var_os("CRAC_TEST_DIR").expect("CRAC_TEST_DIR is set"));
    fs::create_dir_all(&dir).expect("test dir");
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let names = var("CRAC_TEST_RESOURCES").unwrap_or_else(|| "first,second,third".into());
    let fail = var("CRAC_TEST_FAIL");
    let hang = var("CRAC_TEST_HANG");
    let coordinator = Coordinator::global();
    if let Some(ms) = var("CRAC_TEST_HOOK_LIMIT_MS") {
        let ms: u64 = ms.parse().expect("CRAC_TEST_HOOK_LIMIT_MS is a number");
        coordinator.set_limits(Limits::default().with_hook(Some(Duration::from_millis(ms))));
    }
    for name in names.split(',') {
        coordinator
            .context()
            .register(Logged {
                name: name.to_owned(),
                log: dir.join("hooks.log"),
                order_log: var("CRAC_TEST_ORDER_LOG").map(PathBuf::from),
                fail: fail.as_deref() == Some(name),
                hang: hang_of(hang.as_deref(), name),
            })
            .keep();
    }
    let terminate = Arc::new(AtomicBool::new(false));
    let own_sigterm = var("CRAC_TEST_OWN_SIGTERM");
    let handle_sigterm = || {
        signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&terminate))
            .expect("SIGTERM handler");
    };
    if own_sigterm.as_deref() == Some("before") {
        handle_sigterm();
    }
    let _agent = if var("CRAC_TEST_NO_AGENT").is_none() {
        Some(crac_agent::start().expect("agent starts"))
    } else {
        None
    };
    if own_sigterm.as_deref() == Some("after") {
        handle_sigterm();
    }
    let exit_after: Option<u64> = var("CRAC_TEST_EXIT_AFTER").map(|n| n.parse().expect("a count"));
    let mut child = None;
    if var("CRAC_TEST_CHILD").is_some() {
        let child_dir = dir.join("child");
        let spawned = Command::new(std::env::current_exe().expect("own exe"))
            .env("CRAC_TEST_DIR", &child_dir)
            .env_remove("CRAC_TEST_CHILD")
            .env("CRAC_TEST_RESOURCES", "child-a,child-b")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("child starts");
        child = Some(spawned);
        // Report ready only once the child is ready, so the test dumps both with agents.
        wait_for(&child_dir.join("ready"));
    }
    let token: u64 = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64
        ^ (u64::from(std::process::id()) << 32);
    fs::write(dir.join("ready"), std::process::id().to_string()).expect("ready file");
    if let Some(mode) = var("CRAC_TEST_SELF_CHECKPOINT") {
        let line = match crac_agent::SelfCheckpoint::new()
            .leave_running(mode == "leave")
            .run()
        {
            Ok(reason) => format!("self-checkpoint: {reason}"),
            Err(err) => format!("self-checkpoint error: {err}"),
        };
        append(&dir.join("hooks.log"), &line);
    }
    let mut counter: u64 = 0;
    loop {
        if terminate.load(Ordering::SeqCst) {
            append(&dir.join("hooks.log"), "graceful exit");
            break;
        }
        if exit_after.is_some_and(|n| counter >= n) {
            break;
        }
        {
            // Work that a checkpoint must not cut, and that must not run before after_restore.
            let _work = coordinator.critical_section();
            counter += 1;
            let state = format!(
                "{} {token} {counter} {}\n",
                std::process::id(),
                coordinator.generation()
            );
            let tmp = dir.join("state.tmp");
            fs::write(&tmp, state).expect("state file");
            fs::rename(&tmp, dir.join("state")).expect("state file");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(mut child) = child {
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn hang_of(spec: Option<&str>, name: &str) -> Option<Duration> {
    let (who, ms) = match spec?.split_once(':') {
        Some((who, ms)) => (who, ms.parse().expect("CRAC_TEST_HANG=name:MS")),
        None => (spec?, 60_000),
    };
    (who == name).then(|| Duration::from_millis(ms))
}

fn append(path: &Path, line: &str) {
    // One write of a short line to an O_APPEND file: lines from two processes never interleave.
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("log is writable");
    file.write_all(format!("{line}\n").as_bytes())
        .expect("log is writable");
}

fn wait_for(path: &Path) {
    for _ in 0..500 {
        if path.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{} did not appear", path.display());
}
