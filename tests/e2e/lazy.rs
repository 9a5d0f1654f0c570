//! Lazy restore: the service runs before its memory has arrived, serves the right data from
//! every part of its heap, and is killed (not left with missing memory) if the page server
//! dies.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::util::{self, text, wait_until, Crac, Scratch, Target};

/// One request to the target's TCP port; its reply.
fn ask(port: u16, request: &str) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    stream
        .write_all(format!("{request}\n").as_bytes())
        .expect("send");
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).expect("reply");
    line.trim_end().to_owned()
}

/// A target with `mib` MiB of heap, checkpointed (stopped) into image `svc`.
fn checkpointed(scratch: &Scratch, mib: &str, lazy_default: bool) -> (Crac, Target, u16) {
    let crac = Crac::new(scratch);
    let target = Target::start(
        &scratch.join("t"),
        &[("CRAC_TEST_MIB", mib), ("CRAC_TEST_LISTEN", "0")],
    );
    let (tcp, _) = target.ports();
    assert_eq!(ask(tcp, "HEAP"), format!("heap ok {mib} MiB"));
    let pid = target.pid.to_string();
    let mut args = vec!["checkpoint", pid.as_str(), "--name", "svc"];
    if lazy_default {
        args.push("--lazy-restore");
    }
    let out = crac.run(&args);
    assert!(out.status.success(), "{}", text(&out));
    let restored = Target::restored(&target);
    target.reap_dumped();
    (crac, restored, tcp)
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_lazily_restored_service_serves_every_part_of_its_heap() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("lazy");
    // The image says: restore lazily.
    let (crac, restored, tcp) = checkpointed(&scratch, "64", true);
    let out = crac.run(&["restore", "svc", "--detach"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("every page arrived "), "{stdout}");
    assert!(
        crac.store.join("svc/lazy-pages.log").exists(),
        "CRIU's page server did not run"
    );
    assert_eq!(ask(tcp, "HEAP"), "heap ok 64 MiB");
    let state = restored.assert_serving(0);
    assert_eq!(state.generation, 1);
    restored.terminate();
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_page_server_that_dies_midway_takes_the_restored_tree_with_it_and_run_starts_cold() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("lazy-killed");
    let (crac, restored, _) = checkpointed(&scratch, "512", false);
    let pid = restored.pid;

    let restore = crac
        .command(&["restore", "svc", "--detach", "--lazy"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("crac restore runs");
    // Once the restored tree runs its hooks, its memory is still on the way: stop the server
    // there, then kill it.
    wait_until(Duration::from_secs(30), "the restored hooks", || {
        restored.hooks().iter().any(|l| l.contains("restored"))
    });
    let server = page_server(&crac);
    kill(Pid::from_raw(server as i32), Signal::SIGSTOP).unwrap();
    kill(Pid::from_raw(server as i32), Signal::SIGKILL).unwrap();
    let out = restore.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The tree is killed, unless a fault on a page that never came ended it first.
    let said = format!(
        "CRIU's page server was killed by SIGKILL before every page of the restored tree had \
         arrived; the restored tree (pid {pid}"
    );
    assert!(
        stderr.contains(&format!(
            "{said}, 1 process) was killed rather than left to run on with memory that never \
             arrived"
        )) || stderr.contains(&format!("{said}) had already exited")),
        "{}",
        text(&out)
    );
    util::reap(pid, Duration::from_secs(10));
    assert!(
        kill(Pid::from_raw(pid as i32), None).is_err(),
        "the tree is gone"
    );
    assert!(
        !util::agent_dir(pid).exists(),
        "the killed tree's agent folder is left behind"
    );

    // crac run does the same, then starts the service cold.
    let dir = scratch.join("cold");
    fs::create_dir_all(&dir).unwrap();
    let stderr = scratch.join("run.stderr");
    let mut run = crac
        .command(&["run", "--image", "svc", "--lazy", "--"])
        .arg(util::bin("crac-test-target"))
        .env("CRAC_TEST_DIR", &dir)
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("crac run starts");
    wait_until(Duration::from_secs(30), "the restored hooks", || {
        restored
            .hooks()
            .iter()
            .filter(|l| l.contains("restored"))
            .count()
            > 3
    });
    let server = page_server(&crac);
    kill(Pid::from_raw(server as i32), Signal::SIGSTOP).unwrap();
    kill(Pid::from_raw(server as i32), Signal::SIGKILL).unwrap();
    // crac run says it started cold once the spawn returned, which may be after the service
    // is ready.
    wait_until(Duration::from_secs(30), "the cold start", || {
        dir.join("ready").exists()
            && fs::read_to_string(&stderr).is_ok_and(|s| s.contains("crac run: started cold"))
    });
    let said = fs::read_to_string(&stderr).unwrap();
    assert!(
        said.contains("crac run: CRIU's page server was killed by SIGKILL before every page"),
        "{said}"
    );
    assert!(said.contains("crac run: started cold as pid "), "{said}");
    kill(Pid::from_raw(run.id() as i32), Signal::SIGTERM).unwrap();
    run.wait().unwrap();
}

/// CRIU's page server for an image of `crac`'s store (CRIU runs through a loader here: found
/// by its arguments, not its name).
fn page_server(crac: &Crac) -> u32 {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|&p| {
            // The verb `lazy-pages`, not the restore's own `--lazy-pages` flag.
            fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
                let args: Vec<_> = c.split(|&b| b == 0).map(String::from_utf8_lossy).collect();
                args.iter().any(|a| a == "lazy-pages")
                    && args
                        .iter()
                        .any(|a| a.contains(&*crac.store.to_string_lossy()))
            })
        })
        .expect("CRIU's page server runs")
}
