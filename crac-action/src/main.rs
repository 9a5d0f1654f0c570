//! The `crac-action` binary: CRIU's action script. See the library's documentation.

use std::ffi::OsString;
use std::io::{self, Write};
use std::process::ExitCode;

use crac_action::criu::Invocation;
use crac_action::settings::Settings;

const HELP: &str = "\
crac-action: the CRIU action script that runs CRaC hooks at checkpoint and restore

usage (CRIU runs it, with no arguments):
  criu dump -t PID -D DIR --action-script \"$(command -v crac-action)\"
  criu restore -D DIR -d --action-script \"$(command -v crac-action)\"

environment:
  CRAC_ACTION_TIMEOUT   seconds to wait for all agents at one step (default 30)
  CRAC_REQUIRE_AGENT    1: fail when the dumped tree has no agent (default: log and pass)
  CRAC_WATCHER_TIMEOUT  seconds the watcher waits for CRIU to finish (default 3600)
  CRAC_AGENT_DIR        where agents' sockets are, if a service's own environment does not say
                        (tried after it; then /run/crac, $XDG_RUNTIME_DIR/crac, /tmp/crac)

exit codes: 0 done or nothing to do; 1 a hook failed or an agent did not answer
(at pre-dump this aborts the dump, after rolling the tree back); 2 bad environment";

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    // One write per line: CRIU's log gets whole lines, with few system calls on its
    // critical path.
    let mut err = io::LineWriter::new(io::stderr().lock());
    match args.first().and_then(|a| a.to_str()) {
        Some("-h" | "--help") => {
            println!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Some("-V" | "--version") => {
            println!("crac-action {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            let _ = writeln!(err, "crac-action: unexpected argument {other:?}; CRIU runs crac-action with none (see --help)");
            return ExitCode::from(2);
        }
        None => {}
    }
    let step = std::env::var("CRTOOLS_SCRIPT_ACTION").unwrap_or_default();
    let result = Invocation::from_env()
        .map_err(crac_action::ActionError::from)
        .and_then(|inv| {
            let settings = Settings::from_env().map_err(crac_action::ActionError::Settings)?;
            crac_action::run(&inv, &settings, &mut err)
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let prefix = if step.is_empty() {
                String::new()
            } else {
                format!("{step}: ")
            };
            let _ = writeln!(err, "crac-action: {prefix}{error}");
            exit(error.exit_code())
        }
    }
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
