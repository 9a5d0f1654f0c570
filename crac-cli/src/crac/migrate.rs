//! `crac migrate`: move a running service or a podman container (`--container`) to another
//! host (the source), or receive one (`--receive`, the destination). The work is `crac_cli::migrate`'s.

use std::net::SocketAddr;
use std::time::Duration;

use crac_cli::error::{FailureKind, OpError};
use crac_cli::migrate::container::{self, ContainerRequest};
use crac_cli::migrate::net::ServiceAddress;
use crac_cli::migrate::receive::{self, ReceiveRequest};
use crac_cli::migrate::source::{self, MigrateOutcome, MigrateRequest};
use crac_cli::store::Store;

use crate::cli::MigrateArgs;
use crate::output::{bytes, millis, say, Out};

pub(crate) fn run(store: &Store, args: MigrateArgs) -> Result<u8, OpError> {
    let seconds = |name: &str, value: f64| {
        if value.is_finite() && value > 0.0 {
            Ok(Duration::from_secs_f64(value))
        } else {
            Err(OpError::new(
                FailureKind::BadInput,
                format!("--{name} {value} is not a number of seconds above 0"),
            ))
        }
    };
    let link_timeout = seconds("link-timeout", args.link_timeout)?;
    let mut notice = |line: &str| say(&format!("crac: {line}"));
    let out = Out::new(args.json);
    if args.receive {
        let request = ReceiveRequest {
            listen: args.listen.expect("clap requires --listen with --receive"),
            key: args.key,
            store: store.clone(),
            address_device: args.address_device,
            on_address: args.on_address,
            link_timeout,
            podman_args: args.podman_arg,
        };
        let outcome = receive::receive(
            &request,
            &mut |addr| say(&format!("crac: waiting for a migration on {addr}")),
            &mut notice,
        )?;
        out.print(&outcome, || {
            let what = match &outcome.container {
                Some(name) => format!("the container {name}"),
                None => "the service".to_owned(),
            };
            format!(
                "received from {}: {what} runs here as pid {} (restored in {}, {} in all){}\n",
                outcome.source,
                outcome.pid,
                millis(outcome.restore_ms),
                millis(outcome.total_ms),
                match &outcome.image {
                    Some(image) => format!("; its image is {}", image.display()),
                    None => String::new(),
                }
            )
        });
        return Ok(0);
    }
    seconds("timeout", args.timeout)?;
    let address = ServiceAddress::parse_optional(args.address.as_deref())?;
    let to = args.to.expect("clap requires --to without --receive");
    if let Some(name) = args.container {
        let request = ContainerRequest {
            name,
            to,
            strategy: args.strategy,
            key: args.key,
            store: store.clone(),
            address,
            link_timeout,
            podman_args: args.podman_arg,
        };
        let outcome = container::migrate(&request, &mut notice)?;
        out.print(&outcome, || {
            format!(
                "{}\n",
                moved(
                    &format!("the container {}", request.name),
                    request.to,
                    &outcome,
                    "checkpoint",
                    "archive"
                )
            )
        });
        return Ok(0);
    }
    let request = MigrateRequest {
        pid: args.pid.expect("clap requires a pid without --receive"),
        to,
        strategy: args.strategy,
        key: args.key,
        store: store.clone(),
        address,
        tcp_established: args.tcp_established,
        timeout_secs: args.timeout,
        link_timeout,
        criu_args: args.criu_args,
    };
    let outcome = source::migrate(&request, &mut notice)?;
    out.print(&outcome, || {
        format!(
            "{}{}\n",
            moved(
                &format!("pid {}", request.pid),
                request.to,
                &outcome,
                "dump",
                "image"
            ),
            if outcome.lock_rules_removed > 0 {
                format!(
                    "; {} network-lock rules removed here",
                    outcome.lock_rules_removed
                )
            } else {
                String::new()
            }
        )
    });
    Ok(0)
}

/// What a finished migration of `what` to `to` says: where it runs, how long it was down
/// (`freeze` naming what stopped it) and what was sent for its `image`.
fn moved(
    what: &str,
    to: SocketAddr,
    outcome: &MigrateOutcome,
    freeze: &str,
    image: &str,
) -> String {
    format!(
        "moved {what} to {to} ({}): it runs there as pid {}; down for {} ({freeze} {}), {} in all, {} sent for a {} {image}",
        outcome.strategy,
        outcome.pid,
        millis(outcome.downtime_ms),
        millis(outcome.dump_ms),
        millis(outcome.total_ms),
        bytes(outcome.bytes_sent),
        bytes(outcome.image_bytes),
    )
}
