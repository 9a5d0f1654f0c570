//! The agent's protocol and request handling, fuzzed through its real socket: each input is a
//! script of clients (well-formed, mutated and raw requests, sent in pieces, followed by more
//! data, abandoned, or held open in silence) against one agent that lives for the whole run.
//! What must hold is in `test-support/src/agent_clients.rs`, which the randomized test in CI
//! shares. A panic anywhere, the agent's thread included, is a crash.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

use crac_test_support::agent_clients as clients;

static RIG: OnceLock<clients::Rig> = OnceLock::new();

fuzz_target!(|input: &[u8]| {
    let rig = RIG.get_or_init(|| {
        // scripts/fuzz.sh names a folder it removes afterwards.
        let base = std::env::var_os("CRAC_FUZZ_DIR")
            .map_or_else(std::env::temp_dir, PathBuf::from)
            .join(format!("agent-{}", std::process::id()));
        clients::Rig::start(&base)
    });
    if let Err(err) = rig.run(input).map(drop) {
        panic!("{err}");
    }
});
