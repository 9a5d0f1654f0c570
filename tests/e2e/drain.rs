//! Draining for checkpoints: the axum example `web-service` (crac-core's serve loop and the
//! HTTP gate) under load from real HTTP clients (curl: keep-alive ones, and one that opens a
//! connection per request) goes through a plain `crac checkpoint`, killing and
//! `--leave-running`, without `--tcp-established`, and every request is answered; the same
//! service without draining (`--plain`) is refused by the preflight for its clients'
//! connections.

use std::fs;
use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

use crate::util::{self, free_port, text, wait_until, Crac, Scratch};

/// How the clients send their requests, one curl run after another.
#[derive(Clone, Copy)]
enum Client {
    /// Back to back on one kept connection: closes it itself on a `Connection: close`.
    KeepAlive,
    /// A new connection per request.
    PerRequest,
    /// On one kept connection, 3 a second: idle longer than the server's idle grace, so the
    /// server closes it while draining, racing the next request, which curl must not lose.
    Paced,
}

const CLIENTS: [Client; 5] = [
    Client::KeepAlive,
    Client::KeepAlive,
    Client::KeepAlive,
    Client::PerRequest,
    Client::Paced,
];

/// Requests per curl run: each run reuses one connection for all of them when it may.
const BATCH: usize = 40;
const PACED_BATCH: usize = 6;

/// curl is there (scripts/install-runtimes.sh installs it); in CI its absence fails.
fn curl_found() -> bool {
    let found = Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    crac_test_support::may_run(
        "draining test",
        (!found).then(|| "curl not found".to_owned()),
        "as root, scripts/install-runtimes.sh, then scripts/test.sh",
    )
}

/// Where a test here may run (CRIU, root and curl), what util::env gives it; None otherwise.
fn ready() -> Option<util::Env> {
    let env = util::env()?;
    curl_found().then_some(env)
}

/// A web-service this test started (or restored): stopped and reaped when dropped, whatever
/// the test's outcome. It is this process's child, or its orphan once restored (util::env
/// makes this process a subreaper).
struct Service {
    pid: u32,
}

impl Service {
    /// Reaps the process CRIU killed after dumping it, so that its pid is free for the restore.
    fn reap_dumped(&self) {
        util::reap(self.pid, Duration::from_secs(10));
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let pid = Pid::from_raw(self.pid as i32);
        if kill(pid, Signal::SIGTERM).is_ok() {
            let _ = waitpid(pid, None);
        }
    }
}

/// web-service as a session leader with no terminal, its log in `log`.
fn start_service(port: u16, plain: bool, log: &Path) -> Service {
    let log = fs::File::create(log).expect("log file");
    let mut cmd = Command::new(util::bin("web-service"));
    cmd.args(["--port", &port.to_string()])
        .args(plain.then_some("--plain"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log);
    util::session_leader(&mut cmd);
    let service = Service {
        pid: cmd.spawn().expect("web-service starts").id(),
    };
    util::wait_listening(port, Duration::from_secs(20), "web-service to answer");
    service
}

/// A web-service on a free port (its log `log` in `scratch`) and its clients (`retry`: see
/// [`Clients::start`]), once they have had [`WARM`] answers: the port, the service, the
/// clients.
fn under_load(scratch: &Scratch, plain: bool, log: &str, retry: bool) -> (u16, Service, Clients) {
    let port = free_port();
    let service = start_service(port, plain, &scratch.join(log));
    let clients = Clients::start(scratch, port, retry);
    clients.wait_for(0, "answers before the checkpoint");
    (port, service, clients)
}

/// What the clients saw: one line per request, `pid=N generation=N code=200` for an answer,
/// ` code=000` for a failure (curl's errors go to a file of their own beside it).
struct Clients {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    outputs: Vec<PathBuf>,
}

impl Drop for Clients {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl Clients {
    /// Starts the clients; `retry`: curl retries a failed request (for the downtime of a
    /// killing checkpoint, when nothing listens).
    fn start(scratch: &Scratch, port: u16, retry: bool) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut outputs = Vec::new();
        for (n, client) in CLIENTS.into_iter().enumerate() {
            let output = scratch.join(&format!("client-{n}.txt"));
            let file = fs::File::create(&output).expect("client output");
            let errors = fs::File::create(output.with_extension("err")).expect("client errors");
            outputs.push(output);
            let stop = Arc::clone(&stop);
            threads.push(thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let mut curl = Command::new("curl");
                    curl.args(["--silent", "--show-error", "--max-time", "60"])
                        .args(["--write-out", " code=%{http_code}\n"]);
                    let batch = match client {
                        Client::KeepAlive => BATCH,
                        Client::PerRequest => {
                            curl.args(["--header", "Connection: close"]);
                            BATCH
                        }
                        Client::Paced => {
                            curl.args(["--rate", "3/s"]);
                            PACED_BATCH
                        }
                    };
                    if retry {
                        curl.args([
                            "--retry",
                            "20",
                            "--retry-all-errors",
                            "--retry-max-time",
                            "60",
                        ]);
                    }
                    for _ in 0..batch {
                        curl.arg(format!("http://127.0.0.1:{port}/"));
                    }
                    let status = curl
                        .stdin(Stdio::null())
                        .stdout(file.try_clone().expect("client output"))
                        .stderr(errors.try_clone().expect("client errors"))
                        .status()
                        .expect("curl runs");
                    // A failed request shows as code=000 in the output; curl's own exit code
                    // says the same for its last one only.
                    let _ = status;
                }
            }));
        }
        Clients {
            stop,
            threads,
            outputs,
        }
    }

    /// Every line so far, from every client.
    fn lines(&self) -> Vec<String> {
        self.outputs
            .iter()
            .flat_map(|path| util::read_lines(path))
            .collect()
    }

    fn answered(&self, generation: u64) -> usize {
        let want = format!("generation={generation} code=200");
        self.lines().iter().filter(|l| l.ends_with(&want)).count()
    }

    /// Waits (30 s at most) for [`WARM`] answers from `generation`.
    fn wait_for(&self, generation: u64, what: &str) {
        wait_until(Duration::from_secs(30), what, || {
            self.answered(generation) >= WARM
        });
    }

    /// Stops the clients (each after its current run; dropping them stops them too) and
    /// returns every line, and what curl said on its standard error.
    fn finish(mut self) -> (Vec<String>, String) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in std::mem::take(&mut self.threads) {
            thread.join().expect("a client");
        }
        let errors = self
            .outputs
            .iter()
            .map(|path| fs::read_to_string(path.with_extension("err")).unwrap_or_default())
            .collect();
        (self.lines(), errors)
    }
}

/// Asserts every request was answered, by `pid`, before the checkpoint (generation 0) and
/// after it (generation 1).
fn assert_all_answered((lines, errors): &(Vec<String>, String), pid: u32) {
    let failed: Vec<&String> = lines.iter().filter(|l| !l.ends_with("code=200")).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:#?}\ncurl said: {errors}",
        failed.len(),
        lines.len()
    );
    for generation in [0, 1] {
        let want = format!("pid={pid} generation={generation} code=200");
        assert!(
            lines.contains(&want),
            "no answer from generation {generation} of pid {pid}"
        );
    }
}

/// Load enough to have every client connected and answered before the checkpoint.
const WARM: usize = 4 * BATCH;

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_plain_leave_running_checkpoint_of_an_axum_service_under_keep_alive_load_fails_no_request() {
    let Some(_env) = ready() else { return };
    let scratch = Scratch::new("20drain-lr");
    let crac = Crac::new(&scratch);

    // Without draining, the clients' connections make the preflight refuse.
    let (_, plain, clients) = under_load(&scratch, true, "plain.log", false);
    let out = crac.run(&[
        "checkpoint",
        &plain.pid.to_string(),
        "--name",
        "plain",
        "--leave-running",
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("CRIU refuses a connected TCP socket without --tcp-established"),
        "{}",
        text(&out)
    );
    clients.finish();
    drop(plain);

    // With draining, the same checkpoint goes through and no request fails.
    let (_, service, clients) = under_load(&scratch, false, "service.log", false);
    let pid = service.pid;
    let out = crac.run(&[
        "checkpoint",
        &pid.to_string(),
        "--name",
        "drained",
        "--leave-running",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    clients.wait_for(1, "answers after the checkpoint");
    assert_all_answered(&clients.finish(), pid);
    drop(service);
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_plain_killing_checkpoint_and_restore_of_an_axum_service_under_keep_alive_load_fails_no_request(
) {
    let Some(_env) = ready() else { return };
    let scratch = Scratch::new("20drain-kill");
    let crac = Crac::new(&scratch);
    // While the service is an image nothing listens: the clients retry until it is back.
    let (port, service, clients) = under_load(&scratch, false, "service.log", true);
    let pid = service.pid;
    let out = crac.run(&["checkpoint", &pid.to_string(), "--name", "drained"]);
    assert!(out.status.success(), "{}", text(&out));
    service.reap_dumped();

    let out = crac.run(&["restore", "drained", "--detach"]);
    assert!(out.status.success(), "{}", text(&out));
    clients.wait_for(1, "answers after the restore");
    assert_all_answered(&clients.finish(), pid);

    // The restored service still serves a client of its own.
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    std::io::Write::write_all(
        &mut stream,
        b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("an answer");
    assert!(
        answer.ends_with(&format!("pid={pid} generation=1")),
        "{answer}"
    );
    drop(service);
}
