//! `crac`: the operators' command. Each command lives in its own module; the work is done by
//! the `crac_cli` library (checkpoint, restore, store, metadata, archive), this binary parses,
//! prints and maps outcomes to exit codes.

mod check;
mod checkpoint;
mod cli;
mod images;
mod migrate;
mod output;
mod progress;
mod ps;
mod restore;
mod run;
mod upgrade;

use std::process::ExitCode;

use clap::Parser;
use crac_cli::error::{FailureKind, OpError};
use crac_cli::store::Store;

use crate::cli::{Cli, Command};
use crate::output::errln;
use crate::output::Out;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(err) = crac_cli::capabilities::pass_on() {
        // CRIU then lacks them, and says so.
        errln!("crac: warning: cannot pass this crac's file capabilities on to CRIU: {err}");
    }
    if let (Some(_), Command::Ps(_) | Command::Status(_)) = (&cli.store, &cli.command) {
        // Accepted by every command (it is global), but these two read no store: say so
        // rather than ignore it.
        let err = OpError::new(
            FailureKind::BadInput,
            "--store: `crac ps` and `crac status` read no image store (they ask running processes); drop --store",
        );
        output::print_error(&err, false);
        return ExitCode::from(err.kind.exit_code());
    }
    let store = match cli.store {
        Some(root) => Store::open(root),
        None => Store::open_default(),
    };
    let (json, result) = match cli.command {
        Command::Check(args) => (args.json, check::run(&store, Out::new(args.json))),
        Command::Checkpoint(args) => (args.json, checkpoint::run(&store, args)),
        Command::Restore(args) => (args.json, restore::run(&store, args)),
        Command::Images(command) => images::run(&store, command),
        Command::Ps(args) => (args.json, ps::ps(Out::new(args.json))),
        Command::Status(args) => (
            args.json,
            ps::status(args.pid, args.descriptors, Out::new(args.json)),
        ),
        Command::Migrate(args) => (args.json, migrate::run(&store, args)),
        Command::Run(args) => (false, run::run(&store, args)),
        Command::Upgrade(args) => (false, upgrade::run(&store, args)),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            output::print_error(&err, json);
            ExitCode::from(err.kind.exit_code())
        }
    }
}
