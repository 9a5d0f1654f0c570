//! Feature `tracing`: a span per cycle and per hook, with their outcome, and nothing printed
//! by the library itself.
#![cfg(feature = "tracing")]

use std::io::Write;
use std::sync::{Arc, Mutex};

use crac_core::{from_fns, Coordinator, RestoreReason};
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::fmt::MakeWriter;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

#[test]
fn each_cycle_and_each_hook_is_a_span_with_its_outcome() {
    let captured = Captured::default();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_span_events(FmtSpan::CLOSE)
            .finish(),
    )
    .unwrap();

    let c = Coordinator::new();
    let _ok = c
        .context()
        .register(from_fns("cache", |_| Ok(()), |_| Ok(())));
    c.simulate_with(RestoreReason::Resumed).unwrap();
    let _bad = c.context().register(from_fns(
        "pool",
        |_| Err("still 3 connections open".into()),
        |_| Ok(()),
    ));
    c.simulate().unwrap_err();

    let out = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    let has = |needles: &[&str]| {
        lines
            .iter()
            .any(|line| needles.iter().all(|needle| line.contains(needle)))
    };
    // The first cycle: the hook's span closes with its outcome, inside the cycle's span.
    assert!(
        has(&[
            "crac.cycle{generation=0}:crac.hook{resource=\"cache\" phase=\"before_checkpoint\"",
            "outcome=\"ok\"",
            "close"
        ]),
        "{out}"
    );
    assert!(
        has(&[
            "crac.cycle",
            "reason=\"resumed\"",
            "outcome=\"ok\"",
            "crac cycle ended"
        ]),
        "{out}"
    );
    // The second: the failure is a warning naming the resource, and the cycle says refused.
    assert!(
        has(&[
            "WARN",
            "resource=\"pool\"",
            "crac hook failed: still 3 connections open"
        ]),
        "{out}"
    );
    assert!(
        has(&[
            "WARN",
            "crac.cycle{generation=1",
            "reason=\"aborted\"",
            "outcome=\"refused\""
        ]),
        "{out}"
    );
}
