//! Preflight: what CRIU would refuse is listed before CRIU seizes the tree, in one refusal,
//! and the service goes on untouched (its connections included).

use crate::sockets::{echo, holding};
use crate::util::{self, after_all, concat, text, Crac, Scratch, Target, BEFORE_ALL};

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn an_established_connection_is_listed_before_criu_runs_and_the_service_goes_on() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("preflight-tcp");
    let crac = Crac::new(&scratch);
    let (target, mut conn) = holding(&scratch);
    let pid = target.pid.to_string();
    let (tcp, _) = target.ports();
    let client = conn.local_addr().expect("client address").port();

    let out = crac.run(&["checkpoint", &pid, "--name", "web"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The target reads and writes the connection through two descriptors.
    let listed = format!("preflight: CRIU would refuse 2 descriptors of the tree: pid {pid} fd ");
    assert!(stderr.contains(&listed), "{}", text(&out));
    let entry = format!(
        ": tcp 127.0.0.1:{tcp} -> 127.0.0.1:{client} (CRIU refuses a connected TCP socket \
         without --tcp-established: close it in a before_checkpoint hook, or dump with \
         --tcp-established)"
    );
    assert_eq!(stderr.matches(&entry).count(), 2, "{}", text(&out));
    // CRIU never saw it: no "Connected TCP socket" from CRIU itself.
    assert!(!stderr.contains("Connected TCP socket"), "{}", text(&out));
    // The hooks ran and were rolled back; the connection is still there and works.
    assert_eq!(
        target.hooks(),
        concat(&BEFORE_ALL, &after_all("aborted", 0))
    );
    assert_eq!(echo(&mut conn, "b").expect("echo after"), "echo:b");
    assert!(crac.listing().is_empty());

    // With --tcp-established, CRIU accepts it and so does the preflight.
    let out = crac.run(&["checkpoint", &pid, "--name", "web", "--tcp-established"]);
    assert!(out.status.success(), "{}", text(&out));
    let restored = Target::restored(&target);
    target.reap_dumped();
    let out = crac.run(&["restore", "web", "--detach"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(echo(&mut conn, "c").expect("echo after restore"), "echo:c");
    restored.terminate();
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_policy_ignores_or_refuses_and_a_bad_one_stops_everything_with_its_line() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("preflight-policy");
    let crac = Crac::new(&scratch);
    let (target, mut conn) = holding(&scratch);
    let pid = target.pid.to_string();
    let policy = scratch.join("crac.policy");

    // A policy that does not parse: nothing is told, nothing dumped, and it says where.
    std::fs::write(&policy, "# rules\nignore tcp *\nallow unix /run/x.sock\n").unwrap();
    let out = crac
        .command(&["checkpoint", &pid, "--name", "web"])
        .env("CRAC_POLICY", &policy)
        .output()
        .expect("crac runs");
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "CRAC_POLICY: {}:3:1: expected `ignore`, `refuse` or `close`, found `allow`",
            policy.display()
        )),
        "{}",
        text(&out)
    );
    assert!(target.hooks().is_empty(), "hooks ran despite a bad policy");

    // Ignoring the connection hands it to CRIU, which refuses it in its own words.
    std::fs::write(&policy, "ignore tcp *\n").unwrap();
    let out = crac
        .command(&["checkpoint", &pid, "--name", "web"])
        .env("CRAC_POLICY", &policy)
        .output()
        .expect("crac runs");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("preflight: CRIU would refuse"), "{stderr}");
    assert!(stderr.contains("Connected TCP socket"), "{stderr}");

    // Refusing it refuses even what CRIU would take (--tcp-established).
    std::fs::write(&policy, "refuse tcp 127.0.0.1:* -> *\n").unwrap();
    let out = crac
        .command(&["checkpoint", &pid, "--name", "web", "--tcp-established"])
        .env("CRAC_POLICY", &policy)
        .output()
        .expect("crac runs");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("(refused by the preflight policy (CRAC_POLICY))"),
        "{}",
        text(&out)
    );
    assert_eq!(echo(&mut conn, "still").expect("echo"), "echo:still");
    assert!(crac.listing().is_empty());
    target.terminate();
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_dry_run_runs_the_hooks_lists_what_would_fail_and_rolls_back_without_dumping() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("preflight-dry-run");
    let crac = Crac::new(&scratch);
    let (target, mut conn) = holding(&scratch);
    let pid = target.pid.to_string();
    let (tcp, _) = target.ports();

    let out = crac.run(&["checkpoint", &pid, "--dry-run"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0],
        format!("pid {pid}: before_checkpoint: identity ok, third ok, second ok, first ok"),
        "{stdout}"
    );
    let bad: Vec<&&str> = lines.iter().filter(|l| l.starts_with("BAD  ")).collect();
    assert_eq!(bad.len(), 2, "{stdout}");
    assert!(
        bad.iter()
            .all(|l| l.contains(&format!(": tcp 127.0.0.1:{tcp} -> 127.0.0.1:"))),
        "{stdout}"
    );
    assert!(
        lines
            .last()
            .unwrap()
            .ends_with("2 CRIU would refuse; hooks rolled back, nothing dumped"),
        "{stdout}"
    );
    assert_eq!(
        target.hooks(),
        concat(&BEFORE_ALL, &after_all("aborted", 0))
    );
    assert_eq!(echo(&mut conn, "x").expect("echo"), "echo:x");

    // With the option that makes CRIU take the connection, nothing would stop it.
    let out = crac.run(&["checkpoint", &pid, "--dry-run", "--tcp-established"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap()
            .starts_with("OK: "),
        "{}",
        text(&out)
    );
    assert!(crac.listing().is_empty(), "a dry run wrote into the store");
    assert_eq!(target.state().expect("state").generation, 0);
    target.terminate();
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn the_service_s_own_policy_closes_what_no_hook_reaches_and_the_checkpoint_goes_through() {
    use std::io::Write;
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("preflight-close");
    let crac = Crac::new(&scratch);
    let policy = scratch.join("service.policy");
    std::fs::write(
        &policy,
        "# a library's connection\nclose tcp 127.0.0.1:* -> *\n",
    )
    .unwrap();
    let target = Target::start(
        &scratch.join("t"),
        &[
            ("CRAC_TEST_LISTEN", "0"),
            ("CRAC_POLICY", policy.to_str().unwrap()),
        ],
    );
    let (tcp, _) = target.ports();
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", tcp)).expect("connect");
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"HOLD\n").unwrap();
    assert_eq!(echo(&mut conn, "a").unwrap(), "echo:a");
    let pid = target.pid.to_string();
    let client = conn.local_addr().unwrap().port();
    let held = format!("tcp 127.0.0.1:{tcp} -> 127.0.0.1:{client}");

    // The agent lists its process's descriptors, the held connection among them.
    let out = crac.run(&["status", &pid, "--descriptors"]);
    assert!(out.status.success(), "{}", text(&out));
    let listed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(listed.matches(&held).count(), 2, "{listed}");

    // A dry run says the policy would close it, and that nothing else is in the way.
    let out = crac.run(&["checkpoint", &pid, "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        said.lines()
            .filter(|l| l.starts_with("CLOSE ")
                && l.contains(&held)
                && l.ends_with("(its descriptor policy closes it)"))
            .count(),
        2,
        "{said}"
    );
    assert_eq!(
        echo(&mut conn, "b").unwrap(),
        "echo:b",
        "a dry run closed it"
    );

    // The real one closes it once the hooks have run, and CRIU dumps without it.
    let out = crac.run(&["checkpoint", &pid, "--name", "svc"]);
    assert!(out.status.success(), "{}", text(&out));
    let log = std::fs::read_to_string(crac.store.join("svc/dump.log")).unwrap();
    assert!(
        log.contains(&format!("pid {pid}: closed by its descriptor policy: fd "))
            && log.contains(&held),
        "{log}"
    );
    assert!(echo(&mut conn, "c").is_err(), "the connection was closed");
    let restored = Target::restored(&target);
    target.reap_dumped();
    let out = crac.run(&["restore", "svc", "--detach"]);
    assert!(out.status.success(), "{}", text(&out));
    restored.assert_serving(0);
    restored.terminate();
}

#[test]
fn a_service_policy_that_does_not_parse_stops_its_agent_with_the_line() {
    let scratch = Scratch::new("preflight-bad-service-policy");
    let policy = scratch.join("service.policy");
    std::fs::write(&policy, "close tcp\n").unwrap();
    // The target starts its agent with `.expect("agent starts")`: the error is its panic.
    let out = std::process::Command::new(util::bin("crac-test-target"))
        .env("CRAC_TEST_DIR", scratch.join("t"))
        .env("CRAC_POLICY", &policy)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("the target runs");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "CRAC_POLICY: {}:1:10: expected a pattern (a path or address, `*` for any characters)",
            policy.display()
        )),
        "{}",
        text(&out)
    );
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_refused_descriptor_names_the_resource_most_likely_holding_it() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("preflight-owner");
    let crac = Crac::new(&scratch);
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = upstream.local_addr().expect("address").to_string();
    let target = Target::start(
        &scratch.join("t"),
        &[
            ("CRAC_TEST_CONNECT", &format!("third:{addr}")),
            ("CRAC_TEST_RECONNECT", &format!("second:{addr}")),
        ],
    );
    let pid = target.pid.to_string();
    let port_of = |(conn, _): (std::net::TcpStream, _)| conn.peer_addr().expect("peer").port();
    let declared = port_of(upstream.accept().expect("third's connection"));
    let why = "(CRIU refuses a connected TCP socket without --tcp-established: close it in a \
               before_checkpoint hook, or dump with --tcp-established)";
    let held = format!(
        ": tcp 127.0.0.1:{declared} -> {addr} {why} [held by resource \"third\", which declares it]"
    );

    // Resource third declares its connection: the refusal says it holds it.
    let out = crac.run(&["checkpoint", &pid, "--name", "svc"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "preflight: CRIU would refuse 1 descriptor of the tree: pid {pid} fd "
        )) && stderr.contains(&held),
        "{}",
        text(&out)
    );

    // The rollback ran second's after_restore, which connected and kept the connection: the
    // dry run names second as most likely responsible for that one.
    let reopened = port_of(upstream.accept().expect("second's connection"));
    let opened = format!(
        ": tcp 127.0.0.1:{reopened} -> {addr} {why} [most likely resource \"second\"'s: opened \
         while its after_restore ran, open since]"
    );
    let out = crac.run(&["checkpoint", &pid, "--dry-run"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let bad: Vec<&str> = stdout.lines().filter(|l| l.starts_with("BAD  ")).collect();
    assert_eq!(bad.len(), 2, "{stdout}");
    assert!(
        bad.iter()
            .any(|l| l.starts_with(&format!("BAD  pid {pid} fd ")) && l.ends_with(&held)),
        "{stdout}"
    );
    assert!(
        bad.iter()
            .any(|l| l.starts_with(&format!("BAD  pid {pid} fd ")) && l.ends_with(&opened)),
        "{stdout}"
    );

    // The agent's listing says the same of every connection second's after_restore opened
    // (the dry run's rollback opened one more).
    let again = port_of(upstream.accept().expect("second's second connection"));
    let out = crac.run(&["status", &pid, "--descriptors"]);
    assert!(out.status.success(), "{}", text(&out));
    let listed = String::from_utf8_lossy(&out.stdout);
    for port in [reopened, again] {
        assert!(
            listed.lines().any(|l| l.ends_with(&format!(
                ": tcp 127.0.0.1:{port} -> {addr} [most likely resource \"second\"'s: opened \
                 while its after_restore ran, open since]"
            ))),
            "{listed}"
        );
    }
    assert!(
        listed.lines().any(|l| l.ends_with(&format!(
            ": tcp 127.0.0.1:{declared} -> {addr} [held by resource \"third\", which declares it]"
        ))),
        "{listed}"
    );
    assert!(crac.listing().is_empty());
    target.terminate();
}

/// A listener with a connection it has not accepted yet: CRIU without `--skip-in-flight`
/// refuses it ("In-flight connection"). Here the connection comes while the hooks run (the
/// service accepts nothing then); the preflight names the listener before CRIU does, and the
/// service, rolled back, accepts the connection and answers it.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_listener_with_a_connection_not_accepted_is_listed_when_criu_would_refuse_it() {
    use std::io::{BufRead, BufReader, Write};
    let Some(env) = util::env() else { return };
    let scratch = Scratch::new("preflight-in-flight");
    let marker = scratch.join("in-hook");
    let hook = format!("first:touch {} && sleep 1", marker.display());
    let target = Target::start(
        &scratch.join("t"),
        &[("CRAC_TEST_LISTEN", "0"), ("CRAC_TEST_BEFORE_SH", &hook)],
    );
    let (tcp, _) = target.ports();

    let (run, conn) = std::thread::scope(|scope| {
        let dump = scope.spawn(|| env.dump(target.pid, &scratch.join("img"), &[], &[]));
        util::wait_until(
            std::time::Duration::from_secs(10),
            "the hook to run",
            || marker.exists(),
        );
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", tcp)).expect("connect");
        conn.write_all(b"STATUS\n").expect("send");
        (dump.join().expect("the dump's thread"), conn)
    });
    assert!(!run.ok(), "{run:?}");
    let listed = format!(
        "preflight: CRIU would refuse 1 descriptor of the tree: pid {} fd ",
        target.pid
    );
    let entry = format!(
        ": tcp 127.0.0.1:{tcp} (listening, 1 connection not accepted) (CRIU refuses a listener \
         with connections not accepted yet (\"In-flight connection\"): dump with \
         --skip-in-flight, which leaves them out of the image (crac checkpoint passes it))"
    );
    assert!(
        run.log.contains(&listed) && run.log.contains(&entry),
        "{run:?}"
    );
    assert!(!run.log.contains("In-flight connection (l)"), "{run:?}");
    assert_eq!(
        target.hooks(),
        concat(&BEFORE_ALL, &after_all("aborted", 0))
    );
    // Rolled back, the service accepts the connection and answers it.
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    let mut answer = String::new();
    BufReader::new(conn)
        .read_line(&mut answer)
        .expect("an answer");
    assert!(
        answer.contains(&format!("\"pid\":{}", target.pid)),
        "{answer}"
    );
    target.terminate();
}
