//! The command line, parsed and nothing else: names are pinned here, and every command's help
//! ends with an example.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

const EXIT_CODES: &str = "\
Exit codes: 0 done; 1 the operation failed (CRIU or a hook failed; the service keeps running);
2 bad input (unknown PID, pid 1 or crac's own ancestor, missing, damaged or changed image, bad
option); 3 checkpoint/restore is not possible here (no usable CRIU, not root, store not
writable); 4 checkpoint: the image was made (the service stopped, unless --leave-running) but
could not be finished or filed in the store: it is kept, and the message says where and how to
restore it; 5 restore: the service was restored and runs, but an after_restore hook failed or
timed out (named). `crac run` returns the service's own exit status.";

/// Checkpoint and restore Rust services with CRIU, coordinating their hooks.
#[derive(Debug, Parser)]
#[command(name = "crac", version, after_help = EXIT_CODES)]
pub(crate) struct Cli {
    /// The image store (default: $CRAC_STORE; as root /var/lib/crac/images, otherwise
    /// ~/.local/share/crac/images).
    #[arg(long, global = true, value_name = "DIR")]
    pub store: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Tell whether checkpoint/restore is possible here, and if not, why and how to fix it.
    #[command(
        name = "check",
        after_help = "Example:\n  crac check\n  crac check --json"
    )]
    Check(JsonFlag),

    /// Checkpoint a running process (and its children) into the image store.
    #[command(
        name = "checkpoint",
        after_help = "Examples:\n  crac checkpoint 4242 --name web\n  crac checkpoint 4242 --name web --leave-running --replace\n  crac checkpoint 4242 --name web --encrypt-to age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p\n  crac checkpoint 4242 --dir /srv/images/web -- --ext-unix-sk"
    )]
    Checkpoint(CheckpointArgs),

    /// Restore a checkpointed process; its after_restore hooks run before this returns.
    #[command(
        name = "restore",
        after_help = "Examples:\n  crac restore web --detach\n  crac restore /srv/images/web\n  crac restore web --detach --tcp-close\n  crac restore web --detach --identity /root/.config/crac/key.txt"
    )]
    Restore(RestoreArgs),

    /// List, inspect, remove, export and import images.
    #[command(name = "images", subcommand)]
    Images(ImagesCommand),

    /// Processes on this machine that run an agent, with their state and resources.
    #[command(name = "ps", after_help = "Example:\n  crac ps --json")]
    Ps(JsonFlag),

    /// The state of one process's agent.
    #[command(name = "status", after_help = "Example:\n  crac status 4242")]
    Status(StatusArgs),

    /// Move a running service to another host (stop-and-copy or post-copy), or a podman
    /// container (--container, stop-and-copy), or receive one (--receive).
    #[command(
        name = "migrate",
        after_help = "Examples:\n  crac migrate 4242 --to 10.0.0.2:7777 --key /etc/crac/migrate.key --strategy post-copy\n  crac migrate --receive --listen 10.0.0.2:7777 --key /etc/crac/migrate.key --on-address 'ip route ...'\n  crac migrate 4242 --to 10.0.0.2:7777 --key /etc/crac/migrate.key --address 10.0.9.1/32 --tcp-established\n  crac migrate --container web --to 10.0.0.2:7777 --key /etc/crac/migrate.key --address 10.0.9.1/32"
    )]
    Migrate(MigrateArgs),

    /// Start a service warm from its image if there is a good one, cold otherwise.
    #[command(
        name = "run",
        after_help = "Examples:\n  crac run --image web -- ./target/release/web --port 8080\n  crac run --image web --restore-only --log /var/log/web.log -- ./web"
    )]
    Run(RunArgs),

    /// Replace a running service with a new version: keep its memory (state), hand its
    /// listening sockets over (handoff), or stop it and start the new one (restart).
    #[command(
        name = "upgrade",
        after_help = "Examples:\n  crac upgrade 4242 -- ./target/release/web-v2 --port 8080\n  crac upgrade 4242 --level handoff --ready-timeout 20 -- ./web-v2\n  crac upgrade 4242 --level state --env LOG_LEVEL=debug -- ./web\n\nExit codes: 0 upgraded; 1 the new version failed (killed: the old one serves on, never told to retire); 2 bad input; 3 the level asked for cannot be done here."
    )]
    Upgrade(UpgradeArgs),
}

/// `--json`.
#[derive(Debug, Args)]
pub(crate) struct JsonFlag {
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `crac checkpoint`.
#[derive(Debug, Args)]
pub(crate) struct CheckpointArgs {
    /// The process to checkpoint (the root of the tree that is dumped).
    pub pid: u32,
    /// The image's name in the store (default: the process's executable name).
    #[arg(long, conflicts_with = "dir")]
    pub name: Option<String>,
    /// Write the images into this folder instead of the store.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Replace an image of the same name.
    #[arg(long)]
    pub replace: bool,
    /// Keep the process running after the dump (it is told after_restore "resumed").
    #[arg(long)]
    pub leave_running: bool,
    /// Dump established TCP connections (CRIU's --tcp-established); a restore brings them back
    /// open (same addresses needed), or closed with `crac restore --tcp-close`. Listening
    /// sockets need no option: they are always kept, and a client that connects during the
    /// dump is left out of the image (CRIU's --skip-in-flight).
    #[arg(long)]
    pub tcp_established: bool,
    /// Dump file locks (CRIU's --file-locks).
    #[arg(long)]
    pub file_locks: bool,
    /// Flush the image to disk before it gets its name in the store, so that it survives a
    /// power loss (costs time that grows with the image; CRIU itself does not flush).
    #[arg(long)]
    pub sync: bool,
    /// Seconds to wait for the hooks before the dump is aborted.
    #[arg(long, value_name = "S", default_value_t = 30.0)]
    pub timeout: f64,
    /// Make restores of this image lazy by default (`crac restore --eager` overrides): the
    /// service runs before its memory has arrived, and answers sooner the more it has.
    #[arg(long)]
    pub lazy_restore: bool,
    /// Run the hooks and the preflight (what this CRIU, with these options, would refuse),
    /// then roll back: nothing is dumped. Lists what would stop the checkpoint; exit code 0
    /// when nothing would. CRAC_POLICY applies.
    #[arg(long, conflicts_with_all = ["leave_running", "sync", "replace", "for_self", "self_worker"])]
    pub dry_run: bool,
    /// Keep the image encrypted at rest (age) to this recipient, `age1…` (repeat for more):
    /// CRIU dumps into a private tmpfs, and only the encrypted image reaches the store, so the
    /// process's memory is never written to a disk in plain. Restore it with `crac restore
    /// NAME --identity FILE`.
    #[arg(long = "encrypt-to", value_name = "RECIPIENT", conflicts_with_all = ["dir", "dry_run", "for_self", "self_worker"])]
    pub encrypt_to: Vec<String>,
    /// As --encrypt-to, for each recipient listed in FILE (one `age1…` per line).
    #[arg(long = "recipients-file", value_name = "FILE", conflicts_with_all = ["dir", "dry_run", "for_self", "self_worker"])]
    pub recipients_file: Vec<PathBuf>,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
    /// Internal: run on behalf of the process itself (the self-checkpoint API).
    #[arg(long = "self", hide = true)]
    pub for_self: bool,
    /// Internal: the detached worker of --self.
    #[arg(long, hide = true)]
    pub self_worker: bool,
    /// More options for `criu dump`, after `--`.
    #[arg(last = true, value_name = "CRIU_ARGS")]
    pub criu_args: Vec<String>,
}

/// A number of seconds above 0.
fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(secs) if secs > 0.0 && secs.is_finite() => Ok(secs),
        _ => Err(format!("{text:?} is not a number of seconds above 0")),
    }
}

impl RunArgs {
    /// `--log -`: the service writes to crac run's own stdout and stderr.
    pub(crate) fn output_passed_on(&self) -> bool {
        self.log.as_deref() == Some(std::path::Path::new("-"))
    }
}

/// `crac restore`.
#[derive(Debug, Args)]
pub(crate) struct RestoreArgs {
    /// An image name in the store, or an image folder (a path with a `/`).
    pub image: String,
    /// Return once the process runs (CRIU's -d) instead of waiting for it to exit.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Restore the TCP connections an image made with --tcp-established holds, closed (as
    /// podman's option of the same name): for a copy whose clients are gone. The service's
    /// after_restore sees how many came back closed (RestoreInfo::tcp).
    #[arg(long)]
    pub tcp_close: bool,
    /// Run the service before its memory has arrived: CRIU's page server (`criu lazy-pages`)
    /// hands it each page when first touched, then the rest; crac returns once every page is
    /// in, and kills the restored tree if the server fails (its memory would be incomplete).
    #[arg(long, conflicts_with = "eager")]
    pub lazy: bool,
    /// Restore every page before the service runs, even for an image checkpointed with
    /// --lazy-restore.
    #[arg(long)]
    pub eager: bool,
    /// A setting for the restored service, K=V (repeat for more): its after_restore hooks
    /// find it in RestoreInfo::env. The process's own environment stays the image's.
    #[arg(long = "env", value_name = "K=V", value_parser = parse_setting)]
    pub env: Vec<(String, String)>,
    /// Decrypt an image kept encrypted (`crac checkpoint --encrypt-to`) with the identity in
    /// FILE (yours, readable by you only): into a private tmpfs, removed once the restore is
    /// done, so its plaintext never reaches a disk.
    #[arg(long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// Restore even though PATH, a file the service had open for writing, changed since the
    /// checkpoint (repeat for more): for a service that reopens and rereads it in
    /// after_restore.
    #[arg(long = "allow-changed", value_name = "PATH")]
    pub allow_changed: Vec<PathBuf>,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `crac migrate`.
#[derive(Debug, Args)]
pub(crate) struct MigrateArgs {
    /// The service to move (the root of its process tree).
    #[arg(
        required_unless_present_any = ["receive", "container"],
        conflicts_with_all = ["receive", "container"]
    )]
    pub pid: Option<u32>,
    /// Move this podman container whole instead (stop-and-copy): podman checkpoints it, crac's
    /// hooks run through crac-action (named by its org.criu.config annotation), the archive
    /// goes over the migration's connection, and the destination's podman restores it.
    #[arg(long, value_name = "NAME", conflicts_with = "receive")]
    pub container: Option<String>,
    /// A global option for podman, before its command (repeat for more), at either end: where
    /// its storage is, which runtime, e.g. --podman-arg=--root=/srv/podman. podman's own
    /// CONTAINERS_CONF and CONTAINERS_STORAGE_CONF work too.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub podman_arg: Vec<String>,
    /// Where the destination's `crac migrate --receive` listens.
    #[arg(
        long,
        value_name = "HOST:PORT",
        required_unless_present = "receive",
        conflicts_with = "receive"
    )]
    pub to: Option<std::net::SocketAddr>,
    /// The pre-shared key both ends hold (a file private to its owner, at least 32 bytes:
    /// `head -c 32 /dev/urandom | base64 > FILE; chmod 600 FILE`).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// How the service moves. stop-and-copy: it is down from the dump until its whole image
    /// is restored at the destination. post-copy: it runs at the destination before its memory
    /// has arrived (CRIU's lazy pages, relayed over the migration's connection; the source
    /// keeps the frozen service until the last page is there, and resumes it if the transfer
    /// fails). Pre-copy needs the kernel's memory tracking (`crac check` says).
    #[arg(long, default_value = "stop-and-copy", value_parser = ["stop-and-copy", "post-copy"])]
    pub strategy: String,
    /// The service address that moves with it (one IPv4 address, `IP/32`): released here
    /// after the dump, added at the destination before the restore.
    #[arg(long, value_name = "IP/32", conflicts_with = "receive")]
    pub address: Option<String>,
    /// Move established TCP connections too (CRIU's --tcp-established): with the address,
    /// clients keep their connections.
    #[arg(long, conflicts_with_all = ["receive", "container"])]
    pub tcp_established: bool,
    /// Seconds the hooks may take before the checkpoint is aborted.
    #[arg(
        long,
        value_name = "S",
        default_value_t = 30.0,
        conflicts_with_all = ["receive", "container"]
    )]
    pub timeout: f64,
    /// Seconds a silent link is waited for before it counts as cut.
    #[arg(long, value_name = "S", default_value_t = 30.0)]
    pub link_timeout: f64,
    /// Receive a migration: listen, check, file the image in this host's store, restore.
    #[arg(long, requires = "listen")]
    pub receive: bool,
    /// Where to listen for the source (with --receive).
    #[arg(long, value_name = "ADDR:PORT", requires = "receive")]
    pub listen: Option<std::net::SocketAddr>,
    /// The device that gets the service address here (with --receive).
    #[arg(long, value_name = "DEV", default_value = "lo", requires = "receive")]
    pub address_device: String,
    /// A shell command run once the service runs here, the service address as $1: what sends
    /// its clients here (a route, a gratuitous ARP, a load balancer's API).
    #[arg(long, value_name = "CMD", requires = "receive")]
    pub on_address: Option<String>,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
    /// More options for `criu dump`, after `--`.
    #[arg(last = true, value_name = "CRIU_ARGS", conflicts_with_all = ["receive", "container"])]
    pub criu_args: Vec<String>,
}

/// `K=V` for `--env`.
fn parse_setting(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value))
            if !name.is_empty() && !name.contains('\0') && !value.contains('\0') =>
        {
            Ok((name.to_owned(), value.to_owned()))
        }
        _ => Err(format!(
            "expected NAME=VALUE, e.g. LOG_LEVEL=debug, not {text:?}"
        )),
    }
}

/// `crac images ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum ImagesCommand {
    /// The images in the store, oldest first.
    #[command(name = "list", after_help = "Example:\n  crac images list --json")]
    List(JsonFlag),
    /// One image's metadata.
    #[command(name = "show", after_help = "Example:\n  crac images show web")]
    Show(ShowArgs),
    /// Remove images.
    #[command(name = "rm", after_help = "Example:\n  crac images rm web old-web")]
    Rm(RmArgs),
    /// Check an image's contents: every image file and the executable against the SHA-256
    /// recorded at the checkpoint (a restore does the same first).
    #[command(name = "verify", after_help = "Example:\n  crac images verify web")]
    Verify(ShowArgs),
    /// Disk use per image and in total.
    #[command(name = "du", after_help = "Example:\n  crac images du")]
    Du(JsonFlag),
    /// Remove old images; first file the complete images of interrupted checkpoints in the store
    /// and remove what interrupted dumps and imports left.
    #[command(
        name = "prune",
        after_help = "Examples:\n  crac images prune --keep 3\n  crac images prune --older-than 7d"
    )]
    Prune(PruneArgs),
    /// Write one image to a portable, compressed, checksummed archive, encrypted with age if
    /// asked (an image holds the service's memory: its keys and passwords).
    #[command(
        name = "export",
        after_help = "Examples:\n  crac images export web web.crac\n  crac images export web web.crac.age --encrypt-to age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p\n  crac images export web web.crac.age --recipients-file ops-team.txt"
    )]
    Export(ExportArgs),
    /// Read an archive made by `export` into the store (sizes checked before anything is
    /// written, checksums before the image is filed; an encrypted one needs --identity).
    #[command(
        name = "import",
        after_help = "Examples:\n  crac images import web.crac --name web-from-prod\n  crac images import web.crac.age --identity /root/.config/crac/key.txt"
    )]
    Import(ImportArgs),
    /// Make an age identity (a secret key) for encrypted archives: writes it to a new file,
    /// readable by you only, and prints its recipient (the public key) for
    /// `export --encrypt-to`.
    #[command(
        name = "keygen",
        after_help = "Example:\n  crac images keygen --output /root/.config/crac/key.txt"
    )]
    Keygen(KeygenArgs),
}

/// `crac images show` and `crac images verify`.
#[derive(Debug, Args)]
pub(crate) struct ShowArgs {
    /// The image.
    pub name: String,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `crac images rm`.
#[derive(Debug, Args)]
pub(crate) struct RmArgs {
    /// The images to remove.
    #[arg(required = true)]
    pub names: Vec<String>,
}

/// `crac images prune`.
#[derive(Debug, Args)]
pub(crate) struct PruneArgs {
    /// Keep this many of the newest images.
    #[arg(long, value_name = "N")]
    pub keep: Option<usize>,
    /// Remove images older than this (90s, 30m, 12h, 7d).
    #[arg(long, value_name = "AGE")]
    pub older_than: Option<String>,
}

/// `crac images export`.
#[derive(Debug, Args)]
pub(crate) struct ExportArgs {
    /// The image.
    pub name: String,
    /// The archive to write.
    pub file: PathBuf,
    /// Encrypt the archive (age format) to this recipient, an age X25519 public key `age1…`
    /// (repeat for more: any one of them can import it). Public keys only: a secret key is
    /// never given on the command line.
    #[arg(long = "encrypt-to", value_name = "RECIPIENT")]
    pub encrypt_to: Vec<String>,
    /// Encrypt the archive to the recipients listed in FILE, one `age1…` per line (`#`
    /// comments and blank lines ignored), as age's --recipients-file. Repeatable; combines
    /// with --encrypt-to.
    #[arg(long = "recipients-file", value_name = "FILE")]
    pub recipients_file: Vec<PathBuf>,
}

/// `crac images import`.
#[derive(Debug, Args)]
pub(crate) struct ImportArgs {
    /// The archive to read.
    pub file: PathBuf,
    /// The name to give the image (default: its name in the archive).
    #[arg(long)]
    pub name: Option<String>,
    /// Decrypt an encrypted archive with the identities (secret keys, `AGE-SECRET-KEY-1…`)
    /// in FILE, as `crac images keygen` or `age-keygen` write it. The file must be yours and
    /// readable by you only.
    #[arg(long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// Accept an image up to N times the archive's size (real images compress 2 to 10 times,
    /// so more suggests a decompression bomb): raise it only for an archive you trust whose
    /// image is mostly zero pages.
    #[arg(long, value_name = "N", default_value_t = crac_cli::archive::DEFAULT_MAX_RATIO, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_ratio: u64,
}

/// `crac images keygen`.
#[derive(Debug, Args)]
pub(crate) struct KeygenArgs {
    /// Where to write the identity; the file must not exist (mode 0600).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: PathBuf,
}

/// `crac status`.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// The process.
    pub pid: u32,
    /// Also list the process's descriptors, as its agent sees them (number, kind, path or
    /// addresses): what a checkpoint would find open.
    #[arg(long)]
    pub descriptors: bool,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `crac run`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// The image to restore from.
    #[arg(long)]
    pub image: String,
    /// Fail instead of starting cold when the image is missing, invalid or fails to restore.
    #[arg(long)]
    pub restore_only: bool,
    /// Restore lazily (see `crac restore --lazy`); if the page server fails, the restored
    /// service is killed and the command started cold.
    #[arg(long, conflicts_with = "eager")]
    pub lazy: bool,
    /// Restore eagerly even if the image says --lazy-restore.
    #[arg(long)]
    pub eager: bool,
    /// Where a cold-started service's stdout and stderr go (a checkpointable service must not
    /// write to a terminal). Default: `STORE/IMAGE.log`. `-`: to this command's own stdout
    /// and stderr (a container's log pipe), which a restore hands the restored service in
    /// place of the pipes it had.
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Seconds the restore may take (after_restore hooks included) before CRIU and what it
    /// restored are killed and the service starts cold (fails with --restore-only). Default:
    /// `$CRAC_RESTORE_TIMEOUT`, else 60.
    #[arg(long, value_name = "S", value_parser = positive_seconds)]
    pub restore_timeout: Option<f64>,
    /// As `crac restore --allow-changed`: restore even though PATH changed since the
    /// checkpoint (repeat for more).
    #[arg(long = "allow-changed", value_name = "PATH")]
    pub allow_changed: Vec<PathBuf>,
    /// The service's command line, for a cold start.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// `crac upgrade`.
#[derive(Debug, Args)]
pub(crate) struct UpgradeArgs {
    /// The running service (or the `crac run` it runs under, which then does the upgrade and
    /// stays its parent).
    pub pid: u32,
    /// How: `state` (checkpoint and restore with the new settings; the executable and what
    /// it maps unchanged), `handoff` (the new version gets the listening sockets), `restart`
    /// (stop, then start), or `auto`: the highest that applies.
    #[arg(long, value_enum, default_value_t = UpgradeLevel::Auto)]
    pub level: UpgradeLevel,
    /// Seconds the new version has to say READY=1 (on NOTIFY_SOCKET) before it is stopped
    /// (SIGTERM, SIGKILL after the drain timeout) and the old one serves on.
    #[arg(long, value_name = "S", default_value_t = 30.0)]
    pub ready_timeout: f64,
    /// Seconds the new version must keep running once ready before the old one is told to
    /// retire.
    #[arg(long, value_name = "S", default_value_t = 0.5)]
    pub settle: f64,
    /// Seconds the old version has to finish its requests and exit once told to retire;
    /// then its open connections are named and it is killed (SIGKILL).
    #[arg(long, value_name = "S", default_value_t = 30.0)]
    pub drain_timeout: f64,
    /// A setting for the new version, K=V (repeat for more): in its environment, or, at level
    /// state, in its after_restore hooks' RestoreInfo::env.
    #[arg(long = "env", value_name = "K=V", value_parser = parse_setting)]
    pub env: Vec<(String, String)>,
    /// Where the new version's stdout and stderr go (appended). Default: `STORE/NAME.log`,
    /// NAME the program's file name.
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// The new version's command line.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// `crac upgrade --level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum UpgradeLevel {
    /// The highest level that applies.
    Auto,
    /// Checkpoint and restore: memory kept.
    State,
    /// The listening sockets handed to the new version: nothing refused.
    Handoff,
    /// Stop the old version, start the new one: a downtime, measured.
    Restart,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_opens_with_crac_s_own_headline() {
        let help = Cli::command().render_help().to_string();
        assert!(
            help.starts_with(
                "Checkpoint and restore Rust services with CRIU, coordinating their hooks\n"
            ),
            "{help}"
        );
    }

    #[test]
    fn names_and_values_parse() {
        let cli = Cli::try_parse_from([
            "crac",
            "checkpoint",
            "42",
            "--name",
            "web",
            "--leave-running",
            "--",
            "--shell-job",
        ])
        .unwrap();
        let Command::Checkpoint(args) = cli.command else {
            panic!("not checkpoint")
        };
        assert_eq!(args.pid, 42);
        assert_eq!(args.name.as_deref(), Some("web"));
        assert!(args.leave_running);
        assert_eq!(args.criu_args, ["--shell-job"]);
        assert_eq!(args.timeout, 30.0);

        let cli = Cli::try_parse_from([
            "crac", "run", "--image", "web", "--", "./web", "--port", "1",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.command, ["./web", "--port", "1"]);

        let cli = Cli::try_parse_from([
            "crac",
            "upgrade",
            "42",
            "--level",
            "handoff",
            "--env",
            "APP_VERSION=v2",
            "--",
            "./web",
            "--port",
            "1",
        ])
        .unwrap();
        let Command::Upgrade(args) = cli.command else {
            panic!("not upgrade")
        };
        assert_eq!((args.pid, args.level), (42, UpgradeLevel::Handoff));
        assert_eq!(args.env, [("APP_VERSION".to_owned(), "v2".to_owned())]);
        assert_eq!(args.command, ["./web", "--port", "1"]);
        assert_eq!(
            (args.ready_timeout, args.settle, args.drain_timeout),
            (30.0, 0.5, 30.0)
        );

        let cli = Cli::try_parse_from(["crac", "--store", "/s", "images", "prune", "--keep", "2"])
            .unwrap();
        assert_eq!(cli.store, Some(PathBuf::from("/s")));
        assert!(matches!(
            cli.command,
            Command::Images(ImagesCommand::Prune(PruneArgs { keep: Some(2), .. }))
        ));
    }

    #[test]
    fn bad_input_is_refused_by_the_parser() {
        for args in [
            &["crac", "checkpoint", "notapid"][..],
            &["crac", "checkpoint", "1", "--name", "a", "--dir", "/x"],
            &["crac", "run", "--image", "web"],
            &["crac", "upgrade", "42"],
            &[
                "crac", "upgrade", "42", "--level", "sideways", "--", "./web",
            ],
            &["crac", "images", "rm"],
            &["crac", "frobnicate"],
            &["crac", "migrate", "1", "--key", "k"],
            &["crac", "migrate", "--receive", "--key", "k"],
            &[
                "crac",
                "migrate",
                "1",
                "--to",
                "10.0.0.2:1",
                "--key",
                "k",
                "--strategy",
                "pre-copy",
            ],
            &[
                "crac",
                "migrate",
                "1",
                "--to",
                "10.0.0.2:1",
                "--key",
                "k",
                "--receive",
                "--listen",
                "0.0.0.0:1",
            ],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?} parsed");
        }
    }
}
