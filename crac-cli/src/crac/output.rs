//! Printing: text for people, one JSON document for scripts (`--json`), errors on stderr.
//!
//! Much of what crac prints comes from sources it does not control: an image's metadata (which
//! whoever made or sent the image wrote), any local user's agent (its resource names, states
//! and errors), CRIU's log (which quotes file names and crac-action's lines). A control
//! character among them would be obeyed by the terminal of whoever runs crac, usually root's:
//! an escape sequence can set the window title, clear the screen, rewrite what was printed
//! above, or (OSC 52) write the clipboard. So every character that a terminal would act on is
//! shown escaped instead ([`safe`], [`field`]), at the one place output leaves crac
//! ([`Out::print`], [`print_error`], [`print_line`], [`say`], and the macros [`outln!`] and
//! [`errln!`] over the last two), whatever the source.
//!
//! A reader that went away is no failure of crac's (`crac ps | head -1`, a supervisor that
//! closed its end of `crac run`'s stderr): what crac did stands, and the rest of its output is
//! dropped, where `println!` would panic and end a `crac run` that supervises a service.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::{self, Write as _};

use serde::Serialize;

use crac_cli::error::OpError;

/// Where a command's result goes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Out {
    json: bool,
}

impl Out {
    pub(crate) fn new(json: bool) -> Out {
        Out { json }
    }

    /// Prints `value` as JSON in --json mode, or the text `text` makes otherwise.
    pub(crate) fn print<T: Serialize>(&self, value: &T, text: impl FnOnce() -> String) {
        if self.json {
            write_line(
                &mut io::stdout().lock(),
                &safe_json(serde_json::to_string_pretty(value).expect("results serialise")),
            );
        } else {
            let text = text();
            if !text.is_empty() {
                print_line(text.trim_end());
            }
        }
    }
}

/// An error: always on stderr as text, safe for a terminal; with --json also as a JSON document
/// on stdout, so a script that parses stdout sees it.
pub(crate) fn print_error(err: &OpError, json: bool) {
    // One line each, as they are meant to be: a newline in what they quote (a command line,
    // an agent's error) cannot start a line of its own.
    let mut stderr = io::stderr().lock();
    write_line(&mut stderr, &format!("crac: {}", field(&err.message)));
    for line in &err.details {
        write_line(&mut stderr, &format!("  {}", field(line)));
    }
    drop(stderr);
    if json {
        #[derive(Serialize)]
        struct ErrorDoc<'a> {
            ok: bool,
            error: &'a OpError,
        }
        write_line(
            &mut io::stdout().lock(),
            &safe_json(
                serde_json::to_string_pretty(&ErrorDoc {
                    ok: false,
                    error: err,
                })
                .expect("errors serialise"),
            ),
        );
    }
}

pub(crate) use crac_cli::units::bytes;

/// "84.2 ms".
pub(crate) fn millis(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else {
        format!("{ms:.1} ms")
    }
}

/// A line on stderr (a notice, a warning) that may quote what crac does not control, made safe
/// for a terminal ([`safe`]).
pub(crate) fn say(line: &str) {
    write_line(&mut io::stderr().lock(), &safe(line));
}

/// A line of a command's result on stdout, made safe for a terminal ([`safe`]).
pub(crate) fn print_line(line: &str) {
    write_line(&mut io::stdout().lock(), &safe(line));
}

/// Writes `line` and a newline to `to`; a reader that went away is no error, and any other
/// failure is said once on stderr (the result itself stands: the exit code says it).
fn write_line(to: &mut dyn io::Write, line: &str) {
    match writeln!(to, "{line}") {
        Err(err) if err.kind() != io::ErrorKind::BrokenPipe => {
            let _ = writeln!(io::stderr(), "crac: cannot write its output: {err}");
        }
        _ => {}
    }
}

/// `println!` through [`print_line`]: a result line, made safe, that a closed pipe does not
/// turn into a panic.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::print_line(&format!($($arg)*))
    };
}

/// `eprintln!` through [`say`]: a notice, made safe, that a closed stderr does not turn into
/// a panic.
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::output::say(&format!($($arg)*))
    };
}

pub(crate) use {errln, outln};

/// Whether a terminal acts on `c` rather than showing it: the C0 controls (ESC among them),
/// DEL, and the C1 controls (U+0080 to U+009F: U+009B is CSI, U+009D OSC), which terminals
/// honour in UTF-8 too.
fn is_terminal_control(c: char) -> bool {
    matches!(c, '\0'..='\x1f' | '\x7f' | '\u{80}'..='\u{9f}')
}

/// `text` made safe to print on a terminal, keeping its layout: every control character but
/// newline and tab is shown escaped (`\x1b` for ESC, `\u{9b}` for the C1 CSI, `\r`), so an
/// escape sequence is shown, not obeyed. For whole outputs; a value within a line is
/// [`field`].
pub(crate) fn safe(text: &str) -> Cow<'_, str> {
    escape(text, |c| c != '\n' && c != '\t')
}

/// A value that must stay within its line (a name, a state, an error in a table): as [`safe`],
/// and newlines and tabs escaped too (`\n`, `\t`), so that it cannot start a line of its own
/// that would look like crac's.
pub(crate) fn field(text: &str) -> Cow<'_, str> {
    escape(text, |_| true)
}

fn escape(text: &str, escaped: impl Fn(char) -> bool) -> Cow<'_, str> {
    let shown = |c: char| !is_terminal_control(c) || !escaped(c);
    if text.chars().all(shown) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if shown(c) {
            out.push(c);
            continue;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\0'..='\x7f' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            _ => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
        }
    }
    Cow::Owned(out)
}

/// A JSON document made safe for a terminal: serde_json escapes the C0 controls in strings,
/// but writes DEL and the C1 controls as they are; here they become `\u007f`, `\u009b`, which
/// every JSON reader reads back as the same characters. (They can only be inside strings:
/// JSON's own syntax is ASCII text.)
fn safe_json(json: String) -> String {
    if !json.chars().any(is_terminal_control_unescaped) {
        return json;
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if is_terminal_control_unescaped(c) {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

/// The controls serde_json leaves as they are: DEL and C1 (and, outside strings, the newlines
/// and indentation of a pretty document, which are kept).
fn is_terminal_control_unescaped(c: char) -> bool {
    matches!(c, '\x7f' | '\u{80}'..='\u{9f}')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// OSC 52: writes "evil" (base64 ZXZpbA==) to the clipboard of the terminal that shows it.
    const CLIPBOARD: &str = "\x1b]52;c;ZXZpbA==\x07";
    /// CSI 2J, CSI H: clears the screen and moves to its top.
    const CLEAR: &str = "\x1b[2J\x1b[H";
    /// OSC 0: sets the window title.
    const TITLE: &str = "\x1b]0;owned\x1b\\";

    #[test]
    fn escape_sequences_are_shown_not_obeyed() {
        assert_eq!(safe(CLIPBOARD), "\\x1b]52;c;ZXZpbA==\\x07");
        assert_eq!(safe(CLEAR), "\\x1b[2J\\x1b[H");
        assert_eq!(safe(TITLE), "\\x1b]0;owned\\x1b\\");
        for text in [CLIPBOARD, CLEAR, TITLE] {
            for shown in [safe(text), field(text)] {
                assert!(!shown.chars().any(is_terminal_control), "{shown:?}");
            }
        }
    }

    #[test]
    fn c1_controls_and_del_are_escaped() {
        // U+009B is CSI on its own, U+009D OSC: "\u{9b}2J" clears a screen as ESC [ 2J does.
        assert_eq!(
            safe("a\u{9b}2J\u{9d}0;t\u{9c}b\x7f"),
            "a\\u{9b}2J\\u{9d}0;t\\u{9c}b\\x7f"
        );
        assert_eq!(safe("\r\0\x08"), "\\r\\x00\\x08");
    }

    #[test]
    fn the_layout_is_kept_but_a_field_stays_on_its_line() {
        let text = "line one\n\tindented\n";
        assert!(matches!(safe(text), Cow::Borrowed(_)));
        assert_eq!(
            field("db\n  1234  idle  fake row\tx"),
            "db\\n  1234  idle  fake row\\tx"
        );
    }

    #[test]
    fn ordinary_text_is_unchanged_unicode_included() {
        for text in ["plain", "caf\u{e9} \u{2014} \u{1f600}", "\u{a0}\u{ff}"] {
            assert!(matches!(field(text), Cow::Borrowed(t) if t == text));
        }
    }

    #[test]
    fn json_keeps_its_meaning_without_raw_controls() {
        let value = serde_json::json!({ "name": format!("{CLIPBOARD}\u{9b}2J\x7f") });
        let json = safe_json(serde_json::to_string_pretty(&value).unwrap());
        assert!(
            !json.chars().any(|c| is_terminal_control(c) && c != '\n'),
            "{json:?}"
        );
        let back: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back, value);
    }
}
