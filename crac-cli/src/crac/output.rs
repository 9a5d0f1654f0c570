//! Printing: text for people, one JSON document for scripts (`--json`), errors on stderr.

use serde::Serialize;

use crac_cli::driver::OpError;

/// Where a command's result goes.
#[derive(Clone, Copy, Debug)]
pub struct Out {
    json: bool,
}

impl Out {
    pub fn new(json: bool) -> Out {
        Out { json }
    }

    /// Prints `value` as JSON in --json mode, or the text `text` makes otherwise.
    pub fn print<T: Serialize>(&self, value: &T, text: impl FnOnce() -> String) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(value).expect("results serialise")
            );
        } else {
            let text = text();
            if !text.is_empty() {
                println!("{}", text.trim_end());
            }
        }
    }
}

/// An error: always on stderr as text; with --json also as a JSON document on stdout, so a
/// script that parses stdout sees it.
pub fn print_error(err: &OpError, json: bool) {
    eprintln!("crac: {}", err.message);
    for line in &err.details {
        eprintln!("  {line}");
    }
    if json {
        #[derive(Serialize)]
        struct ErrorDoc<'a> {
            ok: bool,
            error: &'a OpError,
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&ErrorDoc {
                ok: false,
                error: err
            })
            .expect("errors serialise")
        );
    }
}

/// "12.3 MiB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// "84.2 ms".
pub fn millis(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else {
        format!("{ms:.1} ms")
    }
}
