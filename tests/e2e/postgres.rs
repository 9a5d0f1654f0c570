//! The axum + PostgreSQL example (`pg-service`) through a real checkpoint and restore, against
//! a real PostgreSQL: a throwaway cluster that scripts/postgres.sh makes and removes.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::util::{self, free_port, text, wait_until, Crac, Scratch};

/// A PostgreSQL cluster of the test's own, on a free loopback port; stopped and removed when
/// dropped.
struct Postgres {
    dir: PathBuf,
    port: u16,
    url: String,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/postgres.sh")
}

impl Postgres {
    /// Starts a cluster, or returns None (saying how to enable it) when PostgreSQL is not
    /// installed here outside CI. In CI a PostgreSQL that cannot start fails the test.
    fn start(scratch: &Scratch) -> Option<Postgres> {
        // The server runs as the `postgres` user, which must reach its folder whatever the
        // umask this test runs under.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&scratch.path, fs::Permissions::from_mode(0o755))
            .expect("scratch folder permissions");
        let dir = scratch.join("pg");
        let port = free_port();
        let out = Command::new(script())
            .arg("start")
            .arg(&dir)
            .arg(port.to_string())
            .stdin(Stdio::null())
            .output()
            .expect("scripts/postgres.sh runs");
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr).trim_end().to_owned();
            crac_test_support::may_run(
                "PostgreSQL test",
                Some(why),
                "as root, scripts/postgres.sh install",
            );
            return None;
        }
        let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Some(Postgres { dir, port, url })
    }

    /// One value from `sql`, asked with psql.
    fn query(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-Atc",
                sql,
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .stdin(Stdio::null())
            .output()
            .expect("psql runs");
        assert!(out.status.success(), "psql {sql:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// How many connections the service holds, as PostgreSQL sees them.
    fn service_connections(&self) -> u64 {
        self.query(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'crac-pg-service'",
        )
        .parse()
        .expect("a count")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .status();
    }
}

/// One HTTP/1.1 exchange on a kept-alive connection: the status and the body.
fn http(stream: &mut BufReader<TcpStream>, method: &str, path: &str, body: &str) -> (u16, String) {
    write!(
        stream.get_mut(),
        "{method} {path} HTTP/1.1\r\nhost: test\r\ncontent-type: text/plain\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .and_then(|()| stream.get_mut().flush())
    .expect("send a request");
    let mut line = String::new();
    stream.read_line(&mut line).expect("a status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP status line: {line:?}"));
    let mut length = 0;
    loop {
        line.clear();
        stream.read_line(&mut line).expect("a header");
        if line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().expect("a length");
            }
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).expect("the body");
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn connect(port: u16) -> BufReader<TcpStream> {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to pg-service");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    BufReader::new(stream)
}

fn get_json(port: u16, path: &str) -> serde_json::Value {
    let (status, body) = http(&mut connect(port), "GET", path, "");
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// pg-service as a session leader with no terminal, its log appended to `log` (a restored
/// process keeps writing to the same file).
fn start_service(port: u16, url: &str, log: &Path) -> Child {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let mut cmd = Command::new(util::bin("pg-service"));
    cmd.args(["--port", &port.to_string(), "--database", url])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log);
    util::session_leader(&mut cmd);
    let child = cmd.spawn().expect("pg-service starts");
    util::wait_listening(port, Duration::from_secs(20), "pg-service to answer");
    child
}

const CLIENTS: usize = 6;

#[test]
#[ignore = "needs root, CRIU >= 4.2 and PostgreSQL: scripts/test.sh runs it"]
fn pg_service_closes_its_pool_for_the_checkpoint_and_loses_no_request() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("pg");
    let Some(pg) = Postgres::start(&scratch) else {
        return;
    };
    let crac = Crac::new(&scratch);
    let port = free_port();
    let log = scratch.join("service.log");
    let mut service = start_service(port, &pg.url, &log);
    let pid = service.id();

    let mut conn = connect(port);
    for i in 0..3 {
        let (status, body) = http(&mut conn, "POST", "/notes", &format!("before {i}"));
        assert_eq!(status, 200, "{body}");
    }
    drop(conn);
    let before = get_json(port, "/instance");
    assert!(pg.service_connections() >= 1);

    // Clients on kept-alive connections write notes before, during and after the checkpoint:
    // each until it has written a few after the restore.
    let written = Arc::new(AtomicUsize::new(0));
    let restored = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (written, restored) = (Arc::clone(&written), Arc::clone(&restored));
            thread::spawn(move || {
                let mut conn = connect(port);
                let mut answers = Vec::new();
                let mut after_restore = 0;
                while after_restore < 5 {
                    if restored.load(Ordering::SeqCst) {
                        after_restore += 1;
                    }
                    let body = format!("client {c} note {}", answers.len());
                    let answer = http(&mut conn, "POST", "/notes", &body);
                    answers.push((body, answer));
                    written.fetch_add(1, Ordering::SeqCst);
                    thread::sleep(Duration::from_millis(5));
                }
                answers
            })
        })
        .collect();
    wait_until(Duration::from_secs(20), "every client to write", || {
        written.load(Ordering::SeqCst) >= 2 * CLIENTS
    });

    let out = crac.run(&[
        "checkpoint",
        &pid.to_string(),
        "--name",
        "pg",
        "--tcp-established",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    service.wait().expect("reap the dumped service");
    // While it is an image, PostgreSQL holds none of its connections.
    assert_eq!(pg.service_connections(), 0);

    let out = crac.run(&["restore", "pg", "--detach"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("after_restore (restored) ok, 2 hooks"),
        "{stdout}"
    );

    restored.store(true, Ordering::SeqCst);

    let answers: Vec<(String, (u16, String))> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("a client"))
        .collect();
    let failed: Vec<_> = answers
        .iter()
        .filter(|(_, (status, _))| *status != 200)
        .collect();
    assert!(failed.is_empty(), "requests failed: {failed:?}");

    // Every row is there once: those written before the checkpoint and every client's.
    let notes = get_json(port, "/notes");
    let mut bodies: Vec<String> = notes
        .as_array()
        .expect("a list")
        .iter()
        .map(|n| n["body"].as_str().expect("a body").to_owned())
        .collect();
    bodies.sort();
    let mut expected: Vec<String> = (0..3).map(|i| format!("before {i}")).collect();
    expected.extend(answers.iter().map(|(body, _)| body.clone()));
    expected.sort();
    assert_eq!(bodies, expected);

    // A new instance id, and a working pool again.
    let after = get_json(port, "/instance");
    assert_eq!(after["pid"], pid);
    assert_eq!(after["generation"], 1);
    assert_eq!(after["last_restore"], "restored");
    assert_ne!(after["instance"], before["instance"]);
    assert!(pg.service_connections() >= 1);

    // No request ran between the pool's closing and its reopening.
    let lines: Vec<String> = fs::read_to_string(&log)
        .expect("the service's log")
        .lines()
        .map(str::to_owned)
        .collect();
    let closed = lines
        .iter()
        .position(|l| l.contains("postgres pool closed"))
        .unwrap_or_else(|| panic!("no 'pool closed' line: {lines:#?}"));
    let reopened = lines
        .iter()
        .position(|l| l.contains("postgres pool reopened reason=restored"))
        .unwrap_or_else(|| panic!("no 'pool reopened' line: {lines:#?}"));
    assert!(closed < reopened, "{lines:#?}");
    let during: Vec<_> = lines[closed..reopened]
        .iter()
        .filter(|l| l.contains("note written"))
        .collect();
    assert!(
        during.is_empty(),
        "requests ran during the checkpoint: {during:#?}"
    );
    assert!(
        lines[..closed].iter().any(|l| l.contains("note written"))
            && lines[reopened..].iter().any(|l| l.contains("note written")),
        "the clients did not write both before and after the checkpoint: {lines:#?}"
    );

    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).expect("stop the restored service");
    util::reap(pid, Duration::from_secs(10));
}
