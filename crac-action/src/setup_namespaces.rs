//! setup-namespaces: the restored tree's namespaces exist and its tasks do not run yet. A
//! network namespace that the runtime had CRIU restore empty (runc, podman's `--network none`)
//! has its loopback interface down, so a listener on 127.0.0.1 that the service kept would be
//! unreachable: it is brought up here (see [`crate::netns::loopback_up`]).

use std::io::Write;

use crate::agents::log;
use crate::criu::Invocation;
use crate::error::ActionError;
use crate::netns;

const STEP: &str = "setup-namespaces";

/// Runs the step.
///
/// # Errors
///
/// None: a loopback that stays down is logged, and the restore goes on (the service may not
/// need it).
pub fn run(inv: &Invocation, out: &mut dyn Write) -> Result<(), ActionError> {
    let Some(init) = inv.init_pid else {
        return Ok(());
    };
    match netns::loopback_up(init) {
        Ok(true) => log(
            out,
            STEP,
            &format!("brought up the loopback interface of pid {init}'s network namespace, which was restored down"),
        ),
        Ok(false) => {}
        Err(err) => log(
            out,
            STEP,
            &format!("cannot bring up the loopback interface of pid {init}'s network namespace ({err}); listeners on 127.0.0.1 in it stay unreachable"),
        ),
    }
    Ok(())
}
