//! Every `CRAC_*` environment variable crac-rs reads, one constant each, with its meaning and
//! default. Every crate names a variable through its constant here; the README's
//! configuration table lists exactly these ([`ALL`]; a test holds the two together).
//!
//! Variables that only the project's own tests and fuzzing read (`CRAC_TEST_*`,
//! `CRAC_RANDOM_*`, `CRAC_FUZZ_DIR`) are not configuration and are not listed.

/// Where agents' sockets are: the base folder of `<base>/<pid>/agent.sock`. Default:
/// `/run/crac` for root, `$XDG_RUNTIME_DIR/crac` for other users, else `/tmp/crac` (see
/// [`crate::location`]). crac-action reads each service's own value from its environment.
pub const AGENT_DIR: &str = "CRAC_AGENT_DIR";

/// The crac-action binary `crac` hands CRIU as its action script. Default: `crac-action`
/// beside the `crac` executable, else on `PATH`.
pub const ACTION: &str = "CRAC_ACTION";

/// Seconds crac-action waits for all agents at one step. Default: 30.
pub const ACTION_TIMEOUT: &str = "CRAC_ACTION_TIMEOUT";

/// `1`: a dumped tree without an agent is an error instead of a log line. Default: 0.
pub const REQUIRE_AGENT: &str = "CRAC_REQUIRE_AGENT";

/// Seconds the watcher pre-dump leaves waits for CRIU to finish a dump. Default: 3600.
pub const WATCHER_TIMEOUT: &str = "CRAC_WATCHER_TIMEOUT";

/// `off`: pre-dump does not look for what CRIU would refuse. Default: `on`.
pub const PREFLIGHT: &str = "CRAC_PREFLIGHT";

/// A descriptor policy file ([`crate::fd_policy::Policy`]): in crac's or CRIU's environment,
/// the preflight's; in the service's, its agent's. Default: none.
pub const POLICY: &str = "CRAC_POLICY";

/// The CRIU to use; it must be CRIU >= 4.2. Default: `criu` on `PATH` if >= 4.2, else
/// `$CRAC_CRIU_PREFIX/bin/criu`.
pub const CRIU: &str = "CRAC_CRIU";

/// The install prefix of the CRIU `scripts/provision-criu.sh` provides. Default:
/// `/opt/crac-criu`.
pub const CRIU_PREFIX: &str = "CRAC_CRIU_PREFIX";

/// The image store's root folder. Default: `/var/lib/crac/images` for root,
/// `~/.local/share/crac/images` for other users.
pub const STORE: &str = "CRAC_STORE";

/// Where a service's self-checkpoint goes: an image name in the store, or a folder (a path
/// containing `/`). Like CRaC's `-XX:CRaCCheckpointTo`. Default: none (the caller must say).
pub const CHECKPOINT_TO: &str = "CRAC_CHECKPOINT_TO";

/// The `crac` binary a service's self-checkpoint runs. Default: `crac` beside the service's
/// executable, then on `PATH`.
pub const BIN: &str = "CRAC_BIN";

/// Set by `crac restore --env` for CRIU: the settings post-resume hands to the agents, a JSON
/// object of strings ([`crate::records::encode_restore_env`]). Default: none.
pub const RESTORE_ENV: &str = "CRAC_RESTORE_ENV";

/// Set by `crac checkpoint` for CRIU: where pre-dump writes what it did
/// ([`crate::records::PreDumpReport`]). Default: none (nothing written).
pub const HOOK_REPORT: &str = "CRAC_HOOK_REPORT";

/// Seconds `crac run` lets a restore take before it kills CRIU and what it restored, and
/// starts the service cold: the default of its `--restore-timeout`. Default: 60.
pub const RESTORE_TIMEOUT: &str = "CRAC_RESTORE_TIMEOUT";

/// Every variable above.
pub const ALL: &[&str] = &[
    AGENT_DIR,
    ACTION,
    ACTION_TIMEOUT,
    REQUIRE_AGENT,
    WATCHER_TIMEOUT,
    PREFLIGHT,
    POLICY,
    CRIU,
    CRIU_PREFIX,
    STORE,
    CHECKPOINT_TO,
    BIN,
    RESTORE_ENV,
    HOOK_REPORT,
    RESTORE_TIMEOUT,
];
