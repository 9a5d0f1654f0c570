//! The smallest service crac-rs can checkpoint: one resource, the agent, a loop of work.
//! Start it with `setsid target/debug/hello </dev/null >>hello.log 2>&1 &`, then, as root,
//! `crac checkpoint PID --name hello`, `crac restore hello --detach` and read hello.log.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use crac_core::{CheckpointInfo, HookError, Resource, RestoreInfo};

/// Counts the work done; a real service closes its connections in `before_checkpoint`.
struct Counter(AtomicU64);

impl Resource for Counter {
    fn name(&self) -> std::borrow::Cow<'_, str> {
        "counter".into()
    }
    fn before_checkpoint(&self, _: &CheckpointInfo) -> Result<(), HookError> {
        println!("before_checkpoint at tick {}", self.0.load(SeqCst));
        Ok(())
    }
    fn after_restore(&self, info: &RestoreInfo) -> Result<(), HookError> {
        // `restored` (from an image), `resumed` (`--leave-running`) or `aborted` (refused)
        let (reason, ticks) = (info.reason, self.0.load(SeqCst));
        println!("after_restore ({reason}) at tick {ticks}");
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let counter = Arc::new(Counter(AtomicU64::new(0)));
    crac_core::global_context().register(counter.clone()).keep();
    let agent = crac_agent::start()?; // the socket crac-action talks to
    let (pid, socket) = (std::process::id(), agent.socket_path().display());
    println!("pid {pid}, agent at {socket}");
    loop {
        {
            // A checkpoint waits for this to end; one opened meanwhile waits for the restore.
            let _section = crac_core::critical_section();
            counter.0.fetch_add(1, SeqCst);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
