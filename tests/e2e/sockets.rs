//! Services keep their sockets, end to end against the real CRIU with real clients: a TCP
//! listener and a UDP socket go into the image and answer after the restore; clients that
//! connect while a checkpoint is taken wait and are served; an established connection is kept
//! (`crac checkpoint --tcp-established`) or comes back closed (`crac restore --tcp-close`), and
//! the service's after_restore can tell which.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::util::{
    self, field, read_lines, status, status_hooks, text, udp_ask, wait_until, Crac, Scratch, Target,
};

/// A listener and a UDP socket survive a killing dump and a restore: same port, same memory,
/// a new instance id, no hook closed or reopened anything.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_kept_listener_and_udp_socket_answer_after_a_restore() {
    let Some(env) = util::env() else { return };
    let scratch = Scratch::new("sockets-kept");
    let target = Target::start(&scratch.join("t"), &[("CRAC_TEST_LISTEN", "0")]);
    let (tcp, udp) = target.ports();
    let before = status(tcp);
    let token = field(&before, "token");
    assert_eq!(udp_ask(udp, "ping"), format!("udp {token} ping"));

    let images = scratch.join("img");
    let dump = env.dump(target.pid, &images, &["--skip-in-flight"], &[]);
    assert!(dump.ok(), "{dump:?}");
    let restored = Target::restored(&target);
    target.reap_dumped();
    assert!(
        TcpStream::connect(("127.0.0.1", tcp)).is_err(),
        "something answers while the service is gone"
    );

    let restore = env.restore(&images);
    assert!(restore.ok(), "{restore:?}");
    let after = status(tcp);
    assert_eq!(field(&after, "token"), token, "not the same memory");
    assert_eq!(field(&after, "generation"), 1);
    assert_ne!(
        field(&after, "instance"),
        field(&before, "instance"),
        "a restored copy renews what is unique"
    );
    assert_eq!(udp_ask(udp, "pong"), format!("udp {token} pong"));
    assert_eq!(
        restored.hooks(),
        [
            "before third",
            "before second",
            "before first",
            "after first restored gen=1",
            "after second restored gen=1",
            "after third restored gen=1"
        ]
    );
}

/// A client that connects while the hooks run waits in the listener's queue: the dump leaves
/// it out of the image (--skip-in-flight), and after a --leave-running dump the service serves
/// it, only once after_restore has run.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_client_that_connects_during_a_checkpoint_is_served_after_it() {
    let Some(env) = util::env() else { return };
    let scratch = Scratch::new("sockets-queued");
    let target = Target::start(
        &scratch.join("t"),
        &[
            ("CRAC_TEST_LISTEN", "0"),
            ("CRAC_TEST_HANG", "second:1500"),
            ("CRAC_TEST_HOOK_LIMIT_MS", "10000"),
        ],
    );
    let (tcp, _) = target.ports();
    assert_eq!(field(&status(tcp), "generation"), 0);
    let images = scratch.join("img");
    std::thread::scope(|scope| {
        let dump = scope.spawn(|| {
            env.dump(
                target.pid,
                &images,
                // -v4: CRIU says when it leaves a queued connection out.
                &["--leave-running", "--skip-in-flight", "-v4"],
                &[],
            )
        });
        wait_until(Duration::from_secs(10), "the hooks to start", || {
            target.hooks().iter().any(|l| l == "before second")
        });
        // The kernel completes the handshake; the service does not accept while the
        // checkpoint is in progress.
        let mut client = TcpStream::connect(("127.0.0.1", tcp)).expect("connect");
        client.write_all(b"STATUS\n").expect("send");
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut reply = String::new();
        BufReader::new(&client)
            .read_line(&mut reply)
            .expect("an answer after the checkpoint");
        let dump = dump.join().expect("dump thread");
        assert!(dump.ok(), "{dump:?}");
        assert!(
            dump.log.contains("Skipping in-flight connection"),
            "the client was not in the listener's queue during the dump: {dump:?}"
        );
        let reply: serde_json::Value = serde_json::from_str(&reply).expect("JSON");
        assert_eq!(
            field(&reply, "generation"),
            1,
            "served before after_restore"
        );
        assert!(
            status_hooks(&reply).contains(&"after third resumed gen=1".to_owned()),
            "{reply}"
        );
    });
}

/// Sends `line` on a held connection and reads the echo.
pub(crate) fn echo(conn: &mut TcpStream, line: &str) -> std::io::Result<String> {
    conn.write_all(format!("{line}\n").as_bytes())?;
    let mut reply = String::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with('\n') {
        if conn.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed",
            ));
        }
        reply.push(byte[0] as char);
    }
    Ok(reply.trim_end().to_owned())
}

/// A service holding an established connection, checkpointed (killed) by `crac checkpoint
/// --tcp-established` as image `held`.
struct Held {
    /// The client's end of the connection.
    conn: TcpStream,
    /// The service's TCP port.
    tcp: u16,
    /// The service, once restored.
    restored: Target,
    crac: Crac,
    _scratch: Scratch,
}

/// A target serving on TCP, and a connection it holds (echoing lines), checked once.
pub(crate) fn holding(scratch: &Scratch) -> (Target, TcpStream) {
    let target = Target::start(&scratch.join("t"), &[("CRAC_TEST_LISTEN", "0")]);
    let (tcp, _) = target.ports();
    let mut conn = TcpStream::connect(("127.0.0.1", tcp)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    conn.write_all(b"HOLD\n").expect("send");
    assert_eq!(echo(&mut conn, "a").expect("echo before"), "echo:a");
    (target, conn)
}

fn held_connection_checkpointed(name: &str) -> Held {
    let scratch = Scratch::new(name);
    let crac = Crac::new(&scratch);
    let (target, conn) = holding(&scratch);
    let (tcp, _) = target.ports();
    let pid = target.pid.to_string();
    let out = crac.run(&["checkpoint", &pid, "--name", "held", "--tcp-established"]);
    assert!(out.status.success(), "{}", text(&out));
    let restored = Target::restored(&target);
    target.reap_dumped();
    Held {
        conn,
        tcp,
        restored,
        crac,
        _scratch: scratch,
    }
}

/// `crac checkpoint --tcp-established` then `crac restore`: the connection carries data both
/// ways after the restore, and after_restore was told it was kept.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn an_established_connection_carries_data_both_ways_after_a_restore() {
    let Some(_env) = util::env() else { return };
    let Held {
        mut conn,
        tcp,
        restored,
        crac,
        _scratch,
    } = held_connection_checkpointed("sockets-established");
    let out = crac.run(&["restore", "held", "--detach"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(echo(&mut conn, "b").expect("echo after"), "echo:b");
    assert_eq!(echo(&mut conn, "c").expect("echo after"), "echo:c");
    let after = status(tcp);
    assert_eq!(
        (field(&after, "tcp_kept"), field(&after, "tcp_closed")),
        (1, 0)
    );
    assert_eq!(field(&after, "generation"), 1);
    assert!(read_lines(&restored.dir.join("connections.log")).is_empty());
}

/// `crac restore --tcp-close`: the connection comes back closed, both ends see it, and
/// after_restore was told so.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_connection_restored_with_tcp_close_is_closed_and_the_service_knows() {
    let Some(_env) = util::env() else { return };
    let Held {
        mut conn,
        tcp,
        restored,
        crac,
        _scratch,
    } = held_connection_checkpointed("sockets-tcp-close");
    let out = crac.run(&["restore", "held", "--detach", "--tcp-close"]);
    assert!(out.status.success(), "{}", text(&out));
    let after = status(tcp);
    assert_eq!(
        (field(&after, "tcp_kept"), field(&after, "tcp_closed")),
        (0, 1)
    );
    // The client's end: the service's side is gone, so the connection is reset or ends.
    match echo(&mut conn, "b") {
        Err(err) => assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
            ),
            "{err}"
        ),
        Ok(reply) => panic!("the closed connection answered {reply:?}"),
    }
    // The service's end: its reader sees the socket is no longer connected.
    wait_until(
        Duration::from_secs(10),
        "the service to see its connection end",
        || {
            read_lines(&restored.dir.join("connections.log"))
                .iter()
                .any(|l| l.starts_with("held connection ended"))
        },
    );
}
