//! What other local users and an image's sender can make `crac` print, wait for or say
//! (issue 18, items 4 and 6): escape sequences from image metadata and from another user's
//! agent are shown escaped, silent agents cost `crac ps` one short bound between them, a
//! `CRAC_POLICY` that is a FIFO or `/dev/zero` is refused at once, a second checkpoint of a pid
//! is told the first runs, a restore on a full disk says what it could not write, and the
//! restore's pidfile is where nobody else can make it first.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::util::{self, read_lines, text, wait_until, Crac, Scratch, Target};

/// OSC 52: writes "evil" to the clipboard of the terminal that shows it.
const CLIPBOARD: &str = "\x1b]52;c;ZXZpbA==\x07";
/// CSI 2J, CSI H: clears the screen.
const CLEAR: &str = "\x1b[2J\x1b[H";
/// OSC 0: sets the window title.
const TITLE: &str = "\x1b]0;owned\x07";
/// The C1 CSI (U+009B), which a terminal obeys as ESC [.
const C1_CSI: &str = "\u{9b}31m";

const NOBODY: u32 = 65534;

/// Whether `bytes` hold anything a terminal would act on: C0 controls but newline and tab,
/// DEL, and C1 controls (U+0080..U+009F, in UTF-8 0xC2 0x80..0x9F).
fn raw_controls(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    text.chars()
        .filter(|&c| {
            (c < ' ' && c != '\n' && c != '\t') || c == '\x7f' || ('\u{80}'..='\u{9f}').contains(&c)
        })
        .map(|c| format!("{:?}", c))
        .collect()
}

fn assert_terminal_safe(out: &Output) {
    for stream in [&out.stdout, &out.stderr] {
        let found = raw_controls(stream);
        assert!(
            found.is_empty(),
            "raw controls {found:?} in:\n{}",
            text(out)
        );
    }
}

/// `crac ARGS` under umask `mask`.
fn run_with_umask(crac: &Crac, args: &[&str], mask: u32, env: &[(&str, &str)]) -> Output {
    let mut cmd = crac.command(args);
    cmd.envs(env.iter().copied());
    util::with_umask(&mut cmd, mask)
        .output()
        .expect("crac runs")
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn image_metadata_is_shown_escaped() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("hostile-show");
    let crac = Crac::new(&scratch);
    let target = Target::start(&scratch.join("t"), &[]);
    let out = run_with_umask(
        &crac,
        &["checkpoint", &target.pid.to_string(), "--name", "svc"],
        0,
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    target.reap_dumped();

    // Whoever made or sent the image wrote these fields.
    let path = crac.store.join("svc/crac-meta.json");
    let mut meta: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    meta["command_line"] =
        serde_json::json!(["svc", CLIPBOARD, format!("x\n  valid:     yes{CLEAR}")]);
    meta["kernel"] = Value::from(format!("6.1{TITLE}"));
    meta["criu_version"] = Value::from(format!("4.2{C1_CSI}\x7f"));
    meta["hooks"][0]["resource"] = Value::from(format!("db{CLIPBOARD}"));
    // Sealed, as the sender of an archive can: the image passes every check, and only the
    // printing stands between these fields and the terminal.
    crac_cli::metadata::seal(&mut meta);
    fs::write(&path, serde_json::to_vec(&meta).unwrap()).unwrap();

    let out = crac.run(&["images", "show", "svc"]);
    // Whatever the validity line says of an edited image, the fields are shown escaped.
    assert_terminal_safe(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("`svc \\x1b]52;c;ZXZpbA==\\x07 x\\n  valid:     yes\\x1b[2J\\x1b[H`"),
        "{}",
        text(&out)
    );
    assert!(
        stdout.contains("Linux 6.1\\x1b]0;owned\\x07 on"),
        "{stdout}"
    );
    assert!(stdout.contains("CRIU 4.2\\u{9b}31m\\x7f,"), "{stdout}");
    assert!(stdout.contains(" db\\x1b]52;c;ZXZpbA==\\x07 "), "{stdout}");
    // The forged line stays inside the process line: one `valid:` line, crac's.
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("  valid:")).count(),
        1,
        "{stdout}"
    );

    // JSON: the same strings, read back whole, with no raw control on the terminal.
    let out = crac.run(&["images", "show", "svc", "--json"]);
    assert_terminal_safe(&out);
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["metadata"]["command_line"][1], CLIPBOARD);
    assert_eq!(
        shown["metadata"]["criu_version"],
        format!("4.2{C1_CSI}\x7f")
    );

    // The list too.
    let out = crac.run(&["images", "list"]);
    assert_terminal_safe(&out);
}

/// A fake agent: it listens at its agent path with a queue of one, fills the queue itself and
/// never accepts, so that connecting to it blocks (a blocking `connect` waits for room).
const FULL_QUEUE_AGENT: &str = r#"
use Socket; use Fcntl;
my $d = "/tmp/crac/$$"; mkdir $d, 0700 or die "mkdir $d: $!";
socket(S, PF_UNIX, SOCK_STREAM, 0) or die; bind(S, pack_sockaddr_un("$d/agent.sock")) or die;
listen(S, 0) or die;
my @own;
for (1..4) {
    socket(my $c, PF_UNIX, SOCK_STREAM, 0) or die;
    fcntl($c, F_SETFL, fcntl($c, F_GETFL, 0) | O_NONBLOCK);
    connect($c, pack_sockaddr_un("$d/agent.sock"));
    push @own, $c;
}
open(my $ready, ">", "$ARGV[0]/ready") or die; close $ready;
sleep 1000;
"#;

/// A process run by nobody with its own agent (a crac-test-target, or a fake), a session
/// leader; killed (stopped or not) when dropped.
struct NobodysTarget {
    pid: u32,
    child: Child,
}

impl NobodysTarget {
    /// A crac-test-target with these resources.
    fn start(dir: &Path, resources: &str) -> NobodysTarget {
        let mut cmd = Command::new(util::bin("crac-test-target"));
        cmd.env("CRAC_TEST_DIR", dir)
            .env("CRAC_TEST_RESOURCES", resources);
        NobodysTarget::spawn(dir, cmd)
    }

    /// [`FULL_QUEUE_AGENT`].
    fn start_full_queue(dir: &Path) -> NobodysTarget {
        let mut cmd = Command::new("perl");
        cmd.arg("-e").arg(FULL_QUEUE_AGENT).arg(dir);
        NobodysTarget::spawn(dir, cmd)
    }

    /// Runs `what` as nobody in `dir` (made nobody's), and waits for `dir/ready`.
    fn spawn(dir: &Path, what: Command) -> NobodysTarget {
        // Its agent listens in the shared fallback base, which must stay root's.
        util::shared_agent_base();
        fs::create_dir_all(dir).unwrap();
        std::os::unix::fs::chown(dir, Some(NOBODY), Some(NOBODY)).unwrap();
        let mut cmd = Command::new("setpriv");
        cmd.args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--",
        ])
        .arg(what.get_program())
        .args(what.get_args())
        .envs(what.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        util::session_leader(&mut cmd);
        let child = cmd.spawn().expect("the target starts as nobody");
        let pid = child.id();
        let target = NobodysTarget { pid, child };
        wait_until(
            Duration::from_secs(10),
            "nobody's target to be ready",
            || dir.join("ready").exists(),
        );
        let owner = fs::metadata(format!("/proc/{pid}")).unwrap().uid();
        assert_eq!(owner, NOBODY);
        target
    }

    /// Stops the process (SIGSTOP): its agent's socket still takes connections, and nothing
    /// answers them, as a user's fake agent that never replies.
    fn stop(&self) {
        kill(Pid::from_raw(self.pid as i32), Signal::SIGSTOP).unwrap();
    }
}

/// The folder of a `nobody` process's agent: with no runtime folder of its own, the shared
/// fallback base.
fn nobodys_agent_dir(pid: u32) -> std::path::PathBuf {
    std::path::Path::new(crac_protocol::location::FALLBACK_DIR).join(pid.to_string())
}

impl Drop for NobodysTarget {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(nobodys_agent_dir(self.pid));
    }
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn another_users_agent_cannot_write_to_the_terminal_nor_stall_ps() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("hostile-agents");
    let crac = Crac::new(&scratch);
    let evil = NobodysTarget::start(
        &scratch.join("evil"),
        &format!("a{CLIPBOARD},b{CLEAR},c{C1_CSI}{TITLE},d\n   1 idle    0  forged row"),
    );
    let silent: Vec<NobodysTarget> = (0..5)
        .map(|n| NobodysTarget::start(&scratch.join(&format!("silent{n}")), "quiet"))
        .collect();
    for target in &silent {
        target.stop();
    }
    let stuck = NobodysTarget::start_full_queue(&scratch.join("stuck"));

    let started = Instant::now();
    let out = crac.run(&["ps"]);
    let took = started.elapsed();
    assert!(out.status.success(), "{}", text(&out));
    // Asked one after the other with the old 2 s limit, five silent agents took 10 s, and
    // the one with a full queue kept crac ps waiting for good.
    assert!(took < Duration::from_secs(2), "crac ps took {took:?}");
    assert_terminal_safe(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let row = stdout
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{} ", evil.pid)))
        .unwrap_or_else(|| panic!("no row for pid {}:\n{stdout}", evil.pid));
    // The resources column, cut to 30 characters once escaped.
    assert!(row.contains(" a\\x1b]52;c;ZXZpbA==\\x07,b\\x1b… "), "{row}");
    assert!(!stdout.contains("\n   1 idle"), "a forged row: {stdout}");
    for target in silent.iter().chain([&stuck]) {
        let at = stdout
            .find(&format!("\n{:>8}  unresponsive ", target.pid))
            .unwrap_or_else(|| panic!("pid {} not listed as unresponsive:\n{stdout}", target.pid));
        let next = stdout[at + 1..].lines().nth(1).unwrap_or_default();
        assert_eq!(
            next.trim(),
            format!(
                "the agent at {} did not reply within 0.5s",
                nobodys_agent_dir(target.pid).join("agent.sock").display()
            ),
            "{stdout}"
        );
    }

    let out = crac.run(&["ps", "--json"]);
    assert_terminal_safe(&out);
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["pid"] == evil.pid)
        .expect("nobody's agent is listed");
    assert_eq!(row["resources"][0], format!("a{CLIPBOARD}"));
    assert_eq!(row["resources"][2], format!("c{C1_CSI}{TITLE}"));

    let out = crac.run(&["status", &evil.pid.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_terminal_safe(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("resources (after_restore order): a\\x1b]52;c;ZXZpbA==\\x07, b\\x1b[2J\\x1b[H, c\\u{9b}31m\\x1b]0;owned\\x07, d\\n   1 idle    0  forged row\n"),
        "{stdout}"
    );

    // A silent agent asked alone, and one whose queue is full: a bounded, clear failure.
    for pid in [silent[0].pid, stuck.pid] {
        let started = Instant::now();
        let out = crac.run(&["status", &pid.to_string()]);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!(
                "crac: the agent at {} did not reply within 2s\n",
                nobodys_agent_dir(pid).join("agent.sock").display()
            )
        );
    }
}

/// Runs `cmd`, killing it and failing if it takes longer than `limit`.
fn bounded(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("it starts");
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("still running after {limit:?}: {}", text(&out));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_policy_that_is_a_fifo_or_a_device_is_refused_at_once() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("hostile-policy");
    let crac = Crac::new(&scratch);
    let target = Target::start(&scratch.join("t"), &[]);
    let pid = target.pid.to_string();
    let fifo = scratch.join("policy.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
    let big = scratch.join("policy.big");
    fs::write(&big, "ignore tcp *\n".repeat(100_000)).unwrap();
    let fifo = fifo.display().to_string();
    let big = big.display().to_string();
    for (mask, policy, why) in [
        (
            0o022,
            fifo.as_str(),
            format!("{fifo} is a FIFO, not a regular file"),
        ),
        (
            0o000,
            "/dev/zero",
            "/dev/zero is a character device, not a regular file".to_owned(),
        ),
        (
            0o000,
            big.as_str(),
            format!("{big} is larger than 1048576 bytes"),
        ),
    ] {
        let mut cmd = crac.command(&["checkpoint", &pid, "--name", "svc"]);
        cmd.env("CRAC_POLICY", policy);
        util::with_umask(&mut cmd, mask);
        let out = bounded(cmd, Duration::from_secs(30));
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!(
                "crac-action: pre-dump: CRAC_POLICY: {policy}: cannot read it ({why}"
            )),
            "{stderr}"
        );
        assert!(
            stderr.contains("a policy is a regular file of at most 1 MiB"),
            "{stderr}"
        );
        // Refused before any agent was told: no hook ran, and the service serves on.
        assert!(target.hooks().is_empty(), "{:?}", target.hooks());
        let now = target.state().unwrap().counter;
        target.assert_serving(now);
    }
    assert!(
        crac.listing().iter().all(|name| !name.starts_with("svc")),
        "{:?}",
        crac.listing()
    );
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_second_checkpoint_of_a_pid_is_told_the_first_runs() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("hostile-twice");
    let crac = Crac::new(&scratch);
    // Its last before_checkpoint takes 1.5 s: the first checkpoint is under way meanwhile.
    let target = Target::start(&scratch.join("t"), &[("CRAC_TEST_HANG", "first:1500")]);
    let pid = target.pid.to_string();
    let mut first = crac.command(&["checkpoint", &pid, "--name", "one"]);
    let first = util::with_umask(&mut first, 0o000)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lock = PathBuf::from(format!("/run/crac-locks/{pid}.lock"));
    wait_until(
        Duration::from_secs(10),
        "the first checkpoint's hooks",
        || target.hooks().len() >= 2,
    );
    // Made private whatever the umask.
    assert_eq!(
        fs::metadata("/run/crac-locks")
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o700
    );
    let held = fs::metadata(&lock).expect("the first holds the pid's lock");
    assert_eq!((held.mode() & 0o7777, held.uid()), (0o600, 0));

    let second = run_with_umask(&crac, &["checkpoint", &pid, "--name", "two"], 0o022, &[]);
    assert_eq!(second.status.code(), Some(1), "{}", text(&second));
    assert_eq!(
        String::from_utf8_lossy(&second.stderr),
        format!(
            "crac: another crac checkpoint of pid {pid} is running (pid {}); wait for it to finish (it stops the service unless it was given --leave-running)\n",
            first.id()
        )
    );
    let first = first.wait_with_output().unwrap();
    assert!(first.status.success(), "{}", text(&first));
    assert!(!lock.exists(), "the lock stays behind");
    // One checkpoint's hooks, the second told nothing.
    assert_eq!(read_lines(&target.dir.join("hooks.log")), util::BEFORE_ALL);
    target.reap_dumped();
    assert_eq!(crac.listing(), ["one"]);
}

/// A small tmpfs mounted for a test, unmounted when dropped.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(path: PathBuf, size: &str) -> SmallDisk {
        fs::create_dir_all(&path).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount: {}", text(&out));
        SmallDisk { path }
    }

    /// Writes a file until the file system is full.
    fn fill(&self) {
        use std::io::Write;
        let mut file = fs::File::create(self.path.join("fill")).unwrap();
        let block = vec![0u8; 64 << 10];
        loop {
            match file.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(err) => {
                    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
                    break;
                }
            }
        }
        // The last partial block too.
        while file.write(&[0u8]).is_ok_and(|n| n == 1) {}
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_restore_on_a_full_disk_says_what_it_could_not_write() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("hostile-full");
    let disk = SmallDisk::mount(scratch.join("disk"), "8m");
    let crac = Crac {
        store: disk.path.join("store"),
    };
    let target = Target::start(&scratch.join("t"), &[]);
    let pid = target.pid;
    let out = run_with_umask(
        &crac,
        &["checkpoint", &pid.to_string(), "--name", "svc"],
        0,
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let restored = Target::restored(&target);
    target.reap_dumped();
    disk.fill();

    let out = run_with_umask(&crac, &["restore", "svc", "--detach"], 0o022, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = crac.store.join("svc/restore.log");
    assert!(
        stdout.contains(&format!(
            "  CRIU's log {} (0 bytes) holds none of crac-action's lines: the file system it is on is full (no space left), so CRIU could not write it; free space there. The restore succeeded, but whether the after_restore hooks ran, and how, is not known from here: `crac status {pid}` asks its agent\n",
            log.display()
        )),
        "{}",
        text(&out)
    );
    assert!(!stdout.contains("no agent"), "{stdout}");
    // They did run.
    wait_until(Duration::from_secs(10), "the after_restore hooks", || {
        restored.hooks().len() == 6
    });
    assert_eq!(
        restored.hooks(),
        util::concat(&util::BEFORE_ALL, &util::after_all("restored", 1))
    );
    drop(restored);
    drop(disk);
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn the_restores_pidfile_is_where_nobody_else_can_make_it() {
    let Some(env) = util::env() else { return };
    let scratch = Scratch::new("hostile-pidfile");
    let crac = Crac::new(&scratch);
    // A CRIU that, as it starts a restore, has nobody try to make the pidfile it was given
    // first (which fails the restore when it succeeds), and notes the pidfile's folder.
    let record = scratch.join("record");
    let wrapper = scratch.join("criu");
    fs::write(
        &wrapper,
        format!(
            r#"#!/bin/sh
if [ "$1" = restore ]; then
  prev=
  for a in "$@"; do
    if [ "$prev" = --pidfile ]; then
      stat -c '%a %u' "$(dirname "$a")" > {record}
      setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups -- touch "$a" 2>> {record} && echo "nobody made it" >> {record}
      echo "$a" >> {record}
    fi
    prev=$a
  done
fi
exec {criu} "$@"
"#,
            record = record.display(),
            criu = env.criu.path.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    let restored = crac.checkpoint_new(&scratch.join("t"), "svc", &[]);
    let pid = restored.pid;

    let crac_criu = wrapper.display().to_string();
    let out = run_with_umask(
        &crac,
        &["restore", "svc", "--detach"],
        0,
        &[("CRAC_CRIU", &crac_criu)],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&format!("restored pid {pid} from ")),
        "{}",
        text(&out)
    );
    let lines = read_lines(&record);
    assert_eq!(lines.len(), 3, "{lines:?}");
    // A private folder of root's, which nobody could enter.
    assert_eq!(lines[0], "700 0");
    assert!(lines[1].ends_with("Permission denied"), "{lines:?}");
    let pidfile = PathBuf::from(&lines[2]);
    let folder = pidfile.parent().unwrap();
    assert!(
        folder
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("crac-restore."),
        "{lines:?}"
    );
    assert!(!folder.exists(), "the pidfile's folder stays behind");
    wait_until(Duration::from_secs(10), "the after_restore hooks", || {
        restored.hooks().len() == 6
    });
    drop(restored);
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_restore_of_a_pid_another_crac_is_restoring_is_told_so() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("hostile-restore-lock");
    let crac = Crac::new(&scratch);
    let restored = crac.checkpoint_new(&scratch.join("t"), "svc", &[]);
    let pid = restored.pid;

    // Another crac restore of that pid under way: its lock, taken as crac takes it.
    let lock = PathBuf::from(format!("/run/crac-locks/{pid}.lock"));
    let file = fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&lock)
        .unwrap();
    let mut held = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).unwrap();
    use std::io::Write;
    writeln!(held, "4242 restore").unwrap();
    let out = run_with_umask(&crac, &["restore", "svc", "--detach"], 0, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("crac: another crac restore of pid {pid} is running (pid 4242); wait for it to finish\n")
    );
    assert!(!restored.is_alive());
    fs::remove_file(&lock).unwrap();
    drop(held);

    let out = run_with_umask(&crac, &["restore", "svc", "--detach"], 0, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!lock.exists(), "the lock stays behind");
    wait_until(Duration::from_secs(10), "the after_restore hooks", || {
        restored.hooks().len() == 6
    });
}
