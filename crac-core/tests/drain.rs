//! Draining: the flag a checkpoint raises for servers, the connections it waits for, the
//! `Connection: close` of the HTTP layer, and the hyper serve loop against a real socket.
#![cfg(feature = "tokio")]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crac_core::{from_fns, Coordinator, ErrorKind, HookError, Limits, RestoreReason};

type Log = Arc<Mutex<Vec<String>>>;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A resource that notes whether the coordinator drained, and how many connections were
/// counted, when each of its hooks ran.
fn observer(c: &Coordinator, log: &Log) -> crac_core::Registration {
    let (cb, ca, b, a) = (c.clone(), c.clone(), log.clone(), log.clone());
    c.context().register(from_fns(
        "observer",
        move |_| {
            let line = format!(
                "before draining={} open={}",
                cb.is_draining(),
                cb.connections()
            );
            b.lock().unwrap().push(line);
            Ok(())
        },
        move |info| {
            let line = format!("after {} draining={}", info.reason, ca.is_draining());
            a.lock().unwrap().push(line);
            Ok(())
        },
    ))
}

#[test]
fn draining_is_on_from_the_start_of_a_checkpoint_until_its_cycle_ends_whatever_the_end() {
    let c = Coordinator::new();
    let log = Log::default();
    let _observer = observer(&c, &log);
    assert!(!c.is_draining());

    c.simulate().unwrap();
    assert!(!c.is_draining());
    let checkpoint = c.checkpoint().unwrap();
    assert!(c.is_draining());
    checkpoint.complete(RestoreReason::Resumed).unwrap();
    assert!(!c.is_draining());
    assert_eq!(
        *log.lock().unwrap(),
        [
            "before draining=true open=0",
            "after restored draining=true",
            "before draining=true open=0",
            "after resumed draining=true",
        ]
    );

    // Refused by a hook: rolled back, and draining is off again.
    let _refuses = c.context().register(from_fns(
        "refuses",
        |_| Err(HookError::from("not now")),
        |_| Ok(()),
    ));
    assert!(matches!(
        c.simulate().unwrap_err().kind(),
        ErrorKind::Refused
    ));
    assert!(!c.is_draining());
    drop(_refuses);

    // Refused for a critical section still held: off again as well.
    c.set_limits(Limits::default().with_quiesce(Duration::from_millis(20)));
    let held = c.critical_section();
    let c2 = c.clone();
    let refused = std::thread::spawn(move || c2.simulate().unwrap_err())
        .join()
        .unwrap();
    assert!(matches!(refused.kind(), ErrorKind::Quiesce { held: 1, .. }));
    assert!(!c.is_draining());
    drop(held);
}

#[test]
fn a_checkpoint_waits_for_the_counted_connections_to_close_before_any_hook_runs() {
    let rt = runtime();
    let c = Coordinator::new();
    let log = Log::default();
    let _observer = observer(&c, &log);

    // A "server" with two connections, each closed once draining starts.
    let mut closers = Vec::new();
    for n in 0..2 {
        let (connection, c2, l) = (c.connection(), c.clone(), log.clone());
        closers.push(rt.spawn(async move {
            c2.draining(true).await;
            l.lock().unwrap().push(format!("closed {n}"));
            drop(connection);
        }));
    }
    assert_eq!(c.connections(), 2);
    c.simulate().unwrap();
    for closer in closers {
        rt.block_on(closer).unwrap();
    }
    let mut log = log.lock().unwrap().clone();
    log[..2].sort();
    assert_eq!(
        log,
        [
            "closed 0",
            "closed 1",
            "before draining=true open=0",
            "after restored draining=true",
        ]
    );
}

#[test]
fn a_connection_that_stays_open_holds_the_checkpoint_only_up_to_the_drain_limit() {
    let c = Coordinator::new();
    c.set_limits(Limits::default().with_drain(Duration::from_millis(30)));
    let log = Log::default();
    let _observer = observer(&c, &log);
    let _stays = c.connection();
    c.simulate().unwrap();
    // It went on, and the hooks (and after them the preflight) saw what was left open.
    assert_eq!(log.lock().unwrap()[0], "before draining=true open=1");
}

#[test]
fn a_server_waiting_for_draining_to_end_is_woken_when_the_cycle_ends() {
    let rt = runtime();
    let c = Coordinator::new();
    let checkpoint = c.checkpoint().unwrap();
    let resumed = Arc::new(AtomicBool::new(false));
    let (c2, r) = (c.clone(), resumed.clone());
    let waiter = rt.spawn(async move {
        c2.draining(false).await;
        r.load(Ordering::SeqCst)
    });
    resumed.store(true, Ordering::SeqCst);
    checkpoint.complete(RestoreReason::Resumed).unwrap();
    // It saw the flag set before the cycle ended: it was woken by the end, not before.
    assert!(rt.block_on(waiter).unwrap());
}

#[cfg(feature = "http")]
#[test]
fn the_http_layer_says_connection_close_only_while_draining() {
    use crac_core::tower::CheckpointGateLayer;
    use tower::{Service, ServiceBuilder, ServiceExt};

    let rt = runtime();
    let c = Coordinator::new();
    let service = ServiceBuilder::new()
        .layer(CheckpointGateLayer::with_coordinator(c.clone()).close_connections())
        .service_fn(|()| async { Ok::<_, std::convert::Infallible>(http::Response::new("hi")) });
    let ask = |service: &mut _| -> Option<String> {
        let service: &mut tower::util::BoxCloneService<(), http::Response<&str>, _> = service;
        let response =
            rt.block_on(async { service.ready().await.unwrap().call(()).await.unwrap() });
        assert_eq!(*response.body(), "hi");
        response
            .headers()
            .get(http::header::CONNECTION)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let mut service = tower::util::BoxCloneService::new(service);
    assert_eq!(ask(&mut service), None);

    // A counted connection keeps the checkpoint in its draining phase, gate still open.
    let connection = c.connection();
    let c2 = c.clone();
    let checkpoint = std::thread::spawn(move || c2.checkpoint().map(|_| ()).is_ok());
    while !c.is_draining() {
        std::thread::yield_now();
    }
    assert_eq!(ask(&mut service).as_deref(), Some("close"));
    drop(connection);
    assert!(checkpoint.join().unwrap());
    assert_eq!(ask(&mut service), None);
}

#[cfg(feature = "serve")]
mod serve {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpStream;

    use super::*;

    /// One request on a keep-alive connection: the status line, the headers (lowercase) and
    /// the body.
    fn get(stream: &mut BufReader<TcpStream>, path: &str) -> (String, Vec<String>, String) {
        write!(stream.get_mut(), "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let mut status = String::new();
        stream.read_line(&mut status).unwrap();
        let mut headers = Vec::new();
        let mut length = 0;
        loop {
            let mut line = String::new();
            stream.read_line(&mut line).unwrap();
            let line = line.trim_end().to_ascii_lowercase();
            if line.is_empty() {
                break;
            }
            if let Some(n) = line.strip_prefix("content-length: ") {
                length = n.parse().unwrap();
            }
            headers.push(line);
        }
        let mut body = vec![0; length];
        stream.read_exact(&mut body).unwrap();
        (
            status.trim_end().to_owned(),
            headers,
            String::from_utf8(body).unwrap(),
        )
    }

    fn connect(port: u16) -> BufReader<TcpStream> {
        BufReader::new(TcpStream::connect(("127.0.0.1", port)).unwrap())
    }

    /// The serve loop over a service that answers whether the cycle had ended when it ran.
    fn start(
        rt: &tokio::runtime::Runtime,
        c: &Coordinator,
        ended: &Arc<AtomicBool>,
        grace: Duration,
    ) -> u16 {
        let ended = ended.clone();
        let app = tower::service_fn(move |_: http::Request<hyper::body::Incoming>| {
            let ended = ended.load(Ordering::SeqCst);
            async move {
                Ok::<_, std::convert::Infallible>(http::Response::new(format!("ended={ended}")))
            }
        });
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let serve = crac_core::serve::serve(listener, app)
            .with_coordinator(c.clone())
            .idle_grace(grace);
        rt.spawn(serve.into_future());
        port
    }

    use std::future::IntoFuture;

    #[test]
    fn idle_keep_alive_connections_are_closed_and_new_ones_wait_for_the_cycle_to_end() {
        let rt = runtime();
        let c = Coordinator::new();
        let log = Log::default();
        let _observer = observer(&c, &log);
        let ended = Arc::new(AtomicBool::new(false));
        let port = start(&rt, &c, &ended, Duration::from_millis(20));

        let mut idle = connect(port);
        let (status, headers, body) = get(&mut idle, "/");
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("HTTP/1.1 200 OK", "ended=false")
        );
        assert!(
            !headers.contains(&"connection: close".to_owned()),
            "{headers:?}"
        );
        // A second request on the same connection: it is kept alive.
        get(&mut idle, "/");
        assert_eq!(c.connections(), 1);

        let checkpoint = c.checkpoint().unwrap();
        // The hooks ran with the idle connection gone: the server closed it (EOF here).
        assert_eq!(log.lock().unwrap()[0], "before draining=true open=0");
        let mut rest = Vec::new();
        assert_eq!(idle.read_to_end(&mut rest).unwrap(), 0);

        // A client arriving now is queued, not refused, and served once the cycle has ended.
        let late = std::thread::spawn(move || get(&mut connect(port), "/"));
        ended.store(true, Ordering::SeqCst);
        checkpoint.complete(RestoreReason::Resumed).unwrap();
        let (status, _, body) = late.join().unwrap();
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("HTTP/1.1 200 OK", "ended=true")
        );
    }

    #[test]
    fn a_client_that_sends_during_the_grace_is_answered_with_connection_close() {
        let rt = runtime();
        let c = Coordinator::new();
        let ended = Arc::new(AtomicBool::new(false));
        // A grace longer than the drain limit: only the client's own close ends it in time.
        c.set_limits(Limits::default().with_drain(Duration::from_secs(30)));
        let port = start(&rt, &c, &ended, Duration::from_secs(60));
        let mut client = connect(port);
        get(&mut client, "/");

        let c2 = c.clone();
        let checkpoint = std::thread::spawn(move || {
            let checkpoint = c2.checkpoint().unwrap();
            let open = c2.connections();
            checkpoint.complete(RestoreReason::Resumed).unwrap();
            open
        });
        while !c.is_draining() {
            std::thread::yield_now();
        }
        let (status, headers, _) = get(&mut client, "/");
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(
            headers.contains(&"connection: close".to_owned()),
            "{headers:?}"
        );
        let mut rest = Vec::new();
        assert_eq!(client.read_to_end(&mut rest).unwrap(), 0);
        drop(client);
        assert_eq!(checkpoint.join().unwrap(), 0);
    }
}
