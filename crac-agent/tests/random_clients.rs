//! A bounded randomized run of scripted clients against a real agent (the fuzz target's
//! scripts, `crac_test_support::agent_clients`, from a seeded generator): every client that
//! waits gets one valid reply, the agent keeps answering, and the hooks balance.
//! `CRAC_RANDOM_SEED` repeats a run; `CRAC_RANDOM_SCRIPTS` runs more scripts (default 1000).
//! `scripts/fuzz.sh` fuzzes the same scripts with libFuzzer.

use crac_test_support::agent_clients as clients;

use std::time::{SystemTime, UNIX_EPOCH};

/// splitmix64: enough randomness for scripts, and a seed repeats a run.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {value:?}")),
    )
}

#[test]
fn random_clients_always_get_an_answer_and_the_hooks_balance() {
    let seed = env_number("CRAC_RANDOM_SEED").unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let scripts = env_number("CRAC_RANDOM_SCRIPTS").unwrap_or(1000);
    let base = std::env::temp_dir().join(format!("crac-random-clients-{}", std::process::id()));
    let rig = clients::Rig::start(&base);
    let mut random = Random(seed);
    let mut checkpoints = 0;
    for number in 0..scripts {
        let len = (random.next() % 96) as usize;
        let input = random.bytes(len);
        match rig.run(&input) {
            Ok(begun) => checkpoints += begun,
            Err(err) => panic!(
                "script {number} of seed {seed} (CRAC_RANDOM_SEED={seed} repeats it): {err}\ninput: {input:02x?}"
            ),
        }
    }
    eprintln!("{scripts} scripts of seed {seed}: {checkpoints} checkpoints begun");
    // Random bytes reach the state machine, not only the parser.
    assert!(
        checkpoints >= scripts / 40,
        "only {checkpoints} checkpoints began in {scripts} scripts (seed {seed})"
    );
}
