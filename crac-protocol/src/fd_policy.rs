//! File-descriptor policies: rules that decide, by kind and by path or address pattern,
//! about the descriptors a checkpoint finds open (OpenJDK CRaC's file-descriptor policies),
//! as written in a `CRAC_POLICY` file ([`Policy`]); and a descriptor as the agent reports it
//! ([`Descriptor`], with its likely [`Owner`]). The preflight (crac-action) ignores or
//! refuses by a policy; the agent closes by one, in its own process, and lists its process's
//! descriptors.

use std::fmt;
use std::path::Path;

/// The environment variable naming a policy file ([`crate::env::POLICY`]).
pub const POLICY_ENV: &str = crate::env::POLICY;

/// What kind of descriptor a rule is about: its second word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A TCP socket with a peer.
    Tcp,
    /// A connected Unix stream socket (to the preflight: one connected outside the tree).
    Unix,
    /// A terminal.
    Tty,
    /// A kind of file CRIU cannot dump at all.
    Unsupported,
    /// An open deleted file (to the preflight: one bigger than CRIU's ghost limit).
    Ghost,
    /// A file lock (flock, POSIX or OFD) held through the descriptor.
    Lock,
}

impl Kind {
    /// The kind's word in a rule.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Tcp => "tcp",
            Kind::Unix => "unix",
            Kind::Tty => "tty",
            Kind::Unsupported => "unsupported",
            Kind::Ghost => "ghost",
            Kind::Lock => "lock",
        }
    }

    /// The kind a rule's word names.
    pub fn parse(word: &str) -> Option<Kind> {
        [
            Kind::Tcp,
            Kind::Unix,
            Kind::Tty,
            Kind::Unsupported,
            Kind::Ghost,
            Kind::Lock,
        ]
        .into_iter()
        .find(|k| k.as_str() == word)
    }
}

/// What to do with descriptors a rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not a problem: CRIU is left to deal with it (an option given another way, say).
    Ignore,
    /// A problem, whatever CRIU's options: the checkpoint is refused.
    Refuse,
    /// Closed by the service's own agent once its `before_checkpoint` hooks have run (the
    /// descriptor is pointed at `/dev/null`, so the number stays valid for whoever owns it):
    /// for what a library keeps open that no hook can reach. Only an agent can do this: to
    /// crac-action's preflight a `close` rule is no rule.
    Close,
}

/// Rules that decide about descriptors by kind and pattern, first match wins.
///
/// One rule per line: `ignore|refuse|close KIND PATTERN`, where KIND is `tcp`, `unix`, `tty`,
/// `unsupported`, `ghost`, `lock` or `any`, and PATTERN a glob (`*` any run of characters) matched
/// against the address or path (`*:5432`, `/var/log/*`). `#` starts a comment.
///
/// ```text
/// # the log shipper's socket is dumped with --ext-unix-sk by our wrapper
/// ignore unix /run/shipper.sock
/// # never checkpoint while connected to the primary database
/// refuse tcp *-> 10.0.0.5:5432
/// # a metrics library's connection: close it (the agent does, in the service)
/// close tcp * -> *:8125
/// ```
///
/// The operator's policy (`CRAC_POLICY` in crac's or CRIU's environment) is applied by the
/// preflight; the service's (`CRAC_POLICY` in its own environment, or
/// `crac_agent::Builder::fd_policy`) by its agent, which carries out `close`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    verdict: Verdict,
    kind: Option<Kind>,
    pattern: String,
}

/// The largest policy file read: a policy is a few lines; a bigger file is not one.
pub const MAX_POLICY_LEN: u64 = 1 << 20;

/// A policy file that cannot be read or does not parse: where and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}{}: {message}", if *line == 0 { String::new() } else { format!(":{line}:{column}") })]
pub struct PolicyError {
    /// The file.
    pub file: String,
    /// The line, from 1; 0 when the file could not be read.
    pub line: usize,
    /// The column, from 1.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl Policy {
    /// Reads a policy file: a regular file of at most [`MAX_POLICY_LEN`] bytes, so that a
    /// FIFO that nobody writes cannot hang a checkpoint, nor `/dev/zero` fill memory.
    ///
    /// # Errors
    ///
    /// When it cannot be read (not a regular file, too big, not UTF-8) or a line does not
    /// parse, with the line and column.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let unreadable = |why: String| PolicyError {
            file: path.display().to_string(),
            line: 0,
            column: 0,
            message: format!(
                "cannot read it ({why}); a policy is a regular file of at most {} MiB",
                MAX_POLICY_LEN >> 20
            ),
        };
        let bytes = crac_fs::read_bounded(path, MAX_POLICY_LEN)
            .map_err(|err| unreadable(err.to_string()))?;
        let text = String::from_utf8(bytes).map_err(|err| unreadable(err.to_string()))?;
        Policy::parse(&path.display().to_string(), &text)
    }

    /// Parses a policy's text; `file` names it in errors.
    ///
    /// # Errors
    ///
    /// When a line does not parse, with the line and column.
    pub fn parse(file: &str, text: &str) -> Result<Policy, PolicyError> {
        let mut rules = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let content = raw.split('#').next().unwrap_or("");
            let mut words = Vec::new();
            let mut at = 0;
            for word in content.split_whitespace() {
                let column = content[at..].find(word).map_or(at, |i| at + i);
                at = column + word.len();
                words.push((column + 1, word));
            }
            let error = |column: usize, message: String| PolicyError {
                file: file.to_owned(),
                line: n + 1,
                column,
                message,
            };
            let Some(&(column, verdict)) = words.first() else {
                continue;
            };
            let verdict = match verdict {
                "ignore" => Verdict::Ignore,
                "refuse" => Verdict::Refuse,
                "close" => Verdict::Close,
                other => {
                    return Err(error(
                        column,
                        format!("expected `ignore`, `refuse` or `close`, found `{other}`"),
                    ))
                }
            };
            let Some(&(column, kind)) = words.get(1) else {
                return Err(error(
                    content.trim_end().len() + 1,
                    "expected a kind (tcp, unix, tty, unsupported, ghost, lock or any)".into(),
                ));
            };
            let kind = match kind {
                "any" => None,
                other => Some(Kind::parse(other).ok_or_else(|| {
                    error(
                        column,
                        format!(
                            "unknown kind `{other}`: expected tcp, unix, tty, unsupported, \
                             ghost, lock or any"
                        ),
                    )
                })?),
            };
            let Some(&(column, _)) = words.get(2) else {
                return Err(error(
                    content.trim_end().len() + 1,
                    "expected a pattern (a path or address, `*` for any characters)".into(),
                ));
            };
            // The pattern is the rest of the line: addresses hold spaces ("a -> b").
            let pattern = content[column - 1..].trim().to_owned();
            rules.push(Rule {
                verdict,
                kind,
                pattern,
            });
        }
        Ok(Policy { rules })
    }

    /// Whether any rule says `verdict`.
    pub fn says(&self, verdict: Verdict) -> bool {
        self.rules.iter().any(|r| r.verdict == verdict)
    }

    /// The first rule's verdict on a descriptor of `kind` that is `what`, if a rule matches.
    pub fn verdict(&self, kind: Kind, what: &str) -> Option<Verdict> {
        self.rules
            .iter()
            .find(|r| r.kind.is_none_or(|k| k == kind) && glob(&r.pattern, what))
            .map(|r| r.verdict)
    }

    /// The first `any` rule's verdict on a descriptor of no nameable kind that is `what`.
    pub fn verdict_any(&self, what: &str) -> Option<Verdict> {
        self.rules
            .iter()
            .find(|r| r.kind.is_none() && glob(&r.pattern, what))
            .map(|r| r.verdict)
    }
}

/// Whether `text` matches `pattern`, where `*` stands for any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || !text[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// One of this process's descriptors, as a policy sees it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Descriptor {
    /// The descriptor number.
    pub fd: i32,
    /// Its kind, when it is one a rule can name besides `any` (`tcp` with a peer, a
    /// connected `unix` stream, a `tty`, an `unsupported` one, a deleted file as `ghost`).
    pub kind: Option<String>,
    /// What it is: a path, or `local -> peer` for a connected socket.
    pub what: String,
    /// The resource that most likely holds it, where the agent can tell (`descriptors`
    /// replies only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
}

/// Whether a descriptor's link target (`/proc/PID/fd/N`) is a terminal: a pseudo-terminal
/// (`/dev/pts/N`) or a virtual console (`/dev/ttyN`).
pub fn is_terminal(target: &str) -> bool {
    target.starts_with("/dev/pts/")
        || target
            .strip_prefix("/dev/tty")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The kind of anonymous inode a descriptor's link target names, if CRIU cannot dump it.
pub fn unsupported(target: &str) -> Option<&'static str> {
    let name = target.strip_prefix("anon_inode:")?;
    [
        ("[io_uring]", "io_uring"),
        ("[userfaultfd]", "userfaultfd"),
        ("[perf_event]", "perf event"),
        ("kvm-vm", "KVM virtual machine"),
        ("kvm-vcpu", "KVM virtual CPU"),
    ]
    .into_iter()
    .find(|(prefix, _)| name.starts_with(prefix))
    .map(|(_, kind)| kind)
}

impl fmt::Display for Descriptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fd {}: ", self.fd)?;
        if let Some(kind) = &self.kind {
            write!(f, "{kind} ")?;
        }
        f.write_str(&self.what)?;
        if let Some(owner) = &self.owner {
            write!(f, " [{owner}]")?;
        }
        Ok(())
    }
}

/// Who most likely holds a descriptor, and how sure the agent is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Owner {
    /// The resource's full name.
    pub resource: String,
    /// How the agent knows.
    pub how: Ownership,
}

/// How the agent knows who holds a descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Ownership {
    /// The resource declares it (crac-core's `Resource::descriptors`).
    Declared,
    /// It appeared while the resource's last `after_restore` ran, and is still open: most
    /// likely that hook opened it.
    AfterRestore,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.how {
            Ownership::Declared => write!(
                f,
                "held by resource \"{}\", which declares it",
                self.resource
            ),
            Ownership::AfterRestore => write!(
                f,
                "most likely resource \"{}\"'s: opened while its after_restore ran, open since",
                self.resource
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn only_a_bounded_regular_file_is_read_as_a_policy() {
        let dir = crac_fs::TempDir::new("crac-policy-test").unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Would block for good at the open, or read without end, if it were read.
        let started = std::time::Instant::now();
        let err = Policy::load(&fifo).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{0}: cannot read it ({0} is a FIFO, not a regular file: crac reads only regular \
                 files); a policy is a regular file of at most 1 MiB",
                fifo.display()
            )
        );
        let err = Policy::load(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "/dev/zero: cannot read it (/dev/zero is a character device, not a regular file: \
             crac reads only regular files); a policy is a regular file of at most 1 MiB"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        let big = dir.path().join("big");
        let mut text = "ignore tcp *\n".repeat((MAX_POLICY_LEN / 13) as usize);
        fs::write(&big, &text).unwrap();
        assert!(Policy::load(&big).is_ok());
        text.push_str("ignore tcp *\n");
        fs::write(&big, &text).unwrap();
        let err = Policy::load(&big).unwrap_err().to_string();
        assert!(err.contains("is larger than 1048576 bytes"), "{err}");
        let parsed = dir.path().join("bad");
        fs::write(&parsed, "ignore tcp *\nallow tcp *\n").unwrap();
        let err = Policy::load(&parsed).unwrap_err();
        assert_eq!((err.line, err.column), (2, 1));
        assert!(err
            .to_string()
            .starts_with(&format!("{}:2:1: ", parsed.display())));
    }

    #[test]
    fn policies_parse_and_match_first_rule_first() {
        let policy = Policy::parse(
            "p",
            "# comment\n\nignore unix /run/shipper.sock\nrefuse tcp * -> 10.0.0.5:5432\nignore any *\n",
        )
        .unwrap();
        assert_eq!(
            policy.verdict(Kind::Unix, "/run/shipper.sock"),
            Some(Verdict::Ignore)
        );
        assert_eq!(
            policy.verdict(Kind::Tcp, "10.0.0.1:4000 -> 10.0.0.5:5432"),
            Some(Verdict::Refuse)
        );
        assert_eq!(
            policy.verdict(Kind::Tty, "/dev/pts/3"),
            Some(Verdict::Ignore)
        );
        assert_eq!(Policy::default().verdict(Kind::Tty, "/dev/pts/3"), None);
    }

    #[test]
    fn a_policy_that_does_not_parse_says_where() {
        let err = Policy::parse("crac.policy", "ignore tcp *\n  allow tcp *\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "crac.policy:2:3: expected `ignore`, `refuse` or `close`, found `allow`"
        );
        let err = Policy::parse("p", "refuse sockets *").unwrap_err();
        assert_eq!(
            err.to_string(),
            "p:1:8: unknown kind `sockets`: expected tcp, unix, tty, unsupported, ghost, lock or any"
        );
        let err = Policy::parse("p", "refuse tcp").unwrap_err();
        assert_eq!(
            err.to_string(),
            "p:1:11: expected a pattern (a path or address, `*` for any characters)"
        );
    }

    #[test]
    fn globs() {
        assert!(glob("*:5432", "1.2.3.4:5432"));
        assert!(glob("/var/log/*", "/var/log/a.log"));
        assert!(!glob("/var/log/*", "/var/lib/a"));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "axxcyyb"));
        assert!(glob("exact", "exact"));
    }
}
