//! `crac-bench-target`: the process `crac-bench` checkpoints, restores and watches idle.
//!
//! It registers `--resources N` no-op resources (hooks that return at once), allocates and
//! touches `--mib N` MiB of memory (every page written, so every page is resident and dumped),
//! starts the agent unless `--no-agent`, writes its PID to `DIR/ready`, then parks its main
//! thread for good: no timer, no heartbeat, so any wake-up of the process is someone else's.
//!
//! ```text
//! crac-bench-target --dir DIR [--resources N] [--mib N] [--no-agent]
//! ```

use std::hint::black_box;
use std::path::PathBuf;

use crac_core::{from_fns, global_context};

fn main() {
    let mut dir: Option<PathBuf> = None;
    let mut resources = 0usize;
    let mut mib = 0usize;
    let mut agent = true;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--dir" => dir = Some(PathBuf::from(value())),
            "--resources" => resources = value().parse().unwrap_or_else(|_| usage("--resources N")),
            "--mib" => mib = value().parse().unwrap_or_else(|_| usage("--mib N")),
            "--no-agent" => agent = false,
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    let dir = dir.unwrap_or_else(|| usage("--dir is required"));

    for i in 0..resources {
        global_context()
            .register(from_fns(format!("r{i}"), |_| Ok(()), |_| Ok(())))
            .keep();
    }
    // Every page written (not just allocated): resident, and in the image.
    let memory: Vec<u8> = vec![0x5a; mib << 20];
    black_box(&memory);
    let _agent = agent.then(|| crac_agent::start().expect("the agent starts"));

    std::fs::create_dir_all(&dir).expect("the ready folder");
    let tmp = dir.join("ready.tmp");
    std::fs::write(&tmp, std::process::id().to_string()).expect("ready file");
    std::fs::rename(&tmp, dir.join("ready")).expect("ready file");
    loop {
        std::thread::park();
        black_box(&memory);
    }
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "crac-bench-target: {problem}\nusage: crac-bench-target --dir DIR [--resources N] [--mib N] [--no-agent]"
    );
    std::process::exit(2);
}
