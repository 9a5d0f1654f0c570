//! Services with files: the file locks the preflight names before CRIU runs (a pidfile's flock,
//! one inherited from flock(1), POSIX and OFD locks, an open SQLite database's), the locks
//! `--file-locks` brings back, and the files a service wrote to, which a restore refuses once
//! they changed (the embedded-db example's cycle).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::util::{self, bin, reap, text, wait_until, Crac, Scratch, Target};

/// Why the preflight refuses a lock the service took.
const OWN: &str = "CRIU refuses a process holding a file lock without --file-locks: release it \
     in a before_checkpoint hook (a database: close it, and open it again in after_restore), or \
     checkpoint with --file-locks, which takes the lock into the image (a restore then needs the \
     same file, and fails while another process holds a conflicting lock on it)";
/// Why it refuses one that came with an inherited descriptor.
const INHERITED: &str = "CRIU refuses a process holding a file lock without --file-locks, and \
     this one came with a descriptor the service inherited (a service started under flock(1) \
     without -o): start it with flock -o, or checkpoint with --file-locks, which takes the lock \
     into the image (a restore then needs the same file, and fails while another process holds \
     a conflicting lock on it)";
/// Why it refuses a POSIX lock on a mapped file, --file-locks or not.
const MAPPED: &str = "CRIU does not bring back a POSIX lock on a file the process has mapped, \
     --file-locks or not (restoring the mapping closes the file, which drops the lock; SQLite's \
     -shm file in WAL mode is one, and a restored connection without its lock lets another \
     reset the file under it): close it in a before_checkpoint hook (a database: close it, and \
     open it again in after_restore)";

/// The descriptor of `pid` open on `path`.
fn fd_on(pid: u32, path: &Path) -> u32 {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the process's descriptors")
        .flatten()
        .find(|e| fs::read_link(e.path()).is_ok_and(|l| l == path))
        .and_then(|e| e.file_name().to_str()?.parse().ok())
        .unwrap_or_else(|| panic!("pid {pid} has no descriptor on {}", path.display()))
}

/// The kernel's lock table's line for a lock of `kind` on `path`.
fn table_line(kind: &str, path: &Path) -> Option<String> {
    let inode = fs::metadata(path).expect("the locked file").ino();
    fs::read_to_string("/proc/locks")
        .expect("/proc/locks")
        .lines()
        .find(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&kind)
                && f.get(5)
                    .is_some_and(|dev| dev.ends_with(&format!(":{inode}")))
        })
        .map(str::to_owned)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A pidfile's flock, a flock inherited from flock(1), a POSIX and an OFD lock: each named by
/// the preflight (and a dry run) before CRIU runs, the service running on; with --file-locks,
/// restored holding each of them, as the kernel's table and other processes see.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn each_file_lock_is_named_before_criu_runs_and_file_locks_brings_it_back() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("locks");
    let crac = Crac::new(&scratch);
    let [pidfile, posix, ofd, outer] =
        ["service.pid", "posix.lock", "ofd.lock", "job.lock"].map(|n| scratch.join(n));
    let locks = format!(
        "flock:{},posix:{},ofd:{}",
        pidfile.display(),
        posix.display(),
        ofd.display()
    );
    let target = Target::start_under(
        &["flock", "-n", &outer.display().to_string(), "setsid"],
        &scratch.join("t"),
        &[("CRAC_TEST_LOCK", &locks)],
    );
    let pid = target.pid;
    let taker = crac_action::tree::parent_of(pid).expect("flock(1), the target's parent");
    let before = target.assert_serving(0);
    let line = |path: &PathBuf, what: &str| {
        format!(
            "pid {pid} fd {}: lock {} ({what})",
            fd_on(pid, path),
            path.display()
        )
    };
    let named = [
        line(
            &outer,
            &format!(
                "flock, exclusive, on an inherited descriptor: taken by pid {taker}, outside the tree"
            ),
        ),
        line(&pidfile, "flock, exclusive"),
        line(&posix, "POSIX lock, exclusive"),
        line(&ofd, "OFD lock, exclusive"),
    ];
    let refused: Vec<String> = named
        .iter()
        .zip([INHERITED, OWN, OWN, OWN])
        .map(|(lock, why)| format!("{lock} ({why})"))
        .collect();

    let pid_arg = pid.to_string();
    let out = crac.run(&["checkpoint", &pid_arg, "--dry-run"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    for line in &refused {
        assert!(
            stdout(&out).contains(&format!("BAD  {line}\n")),
            "{line}\n{}",
            text(&out)
        );
    }
    let out = crac.run(&["checkpoint", &pid_arg, "--name", "locked"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr(&out).contains(&format!(
            "preflight: CRIU would refuse 4 descriptors of the tree: {} (CRAC_PREFLIGHT=off skips this check)",
            refused.join("; ")
        )),
        "{}",
        text(&out)
    );
    assert!(!crac.listing().contains(&"locked".to_owned()));
    let still = target.assert_serving(before.counter);
    assert_eq!(still.token, before.token);

    let out = crac.run(&["checkpoint", &pid_arg, "--dry-run", "--file-locks"]);
    assert!(out.status.success(), "{}", text(&out));
    for lock in &named {
        assert!(
            stdout(&out).contains(&format!(
                "LOCK {lock} (taken into the image: --file-locks)\n"
            )),
            "{lock}\n{}",
            text(&out)
        );
    }
    let out = crac.run(&["checkpoint", &pid_arg, "--name", "locked", "--file-locks"]);
    assert!(out.status.success(), "{}", text(&out));
    let restored = Target::restored(&target);
    target.reap_dumped();
    let out = crac.run(&["restore", "locked", "--detach"]);
    assert!(out.status.success(), "{}", text(&out));
    let after = restored.assert_serving(before.counter);
    assert_eq!(after.token, before.token, "the same memory");

    // The kernel's table has each lock again, held by the restored process (an OFD lock is
    // held by no process).
    for (kind, path, holder) in [
        ("FLOCK", &pidfile, pid.to_string()),
        ("FLOCK", &outer, pid.to_string()),
        ("POSIX", &posix, pid.to_string()),
        ("OFDLCK", &ofd, "-1".to_owned()),
    ] {
        let found = table_line(kind, path)
            .unwrap_or_else(|| panic!("no {kind} lock on {} after the restore", path.display()));
        let f: Vec<&str> = found.split_whitespace().collect();
        assert_eq!((f[3], f[4]), ("WRITE", holder.as_str()), "{found}");
    }
    // And other processes cannot take them.
    for path in [&pidfile, &outer] {
        let status = Command::new("flock")
            .arg("-n")
            .arg(path)
            .arg("true")
            .status()
            .expect("flock runs");
        assert_eq!(status.code(), Some(1), "{} was free", path.display());
    }
    for path in [&posix, &ofd] {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let whole = libc::flock {
            l_type: libc::F_WRLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        let taken = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_OFD_SETLK(&whole));
        assert_eq!(
            taken,
            Err(nix::errno::Errno::EAGAIN),
            "{} was free",
            path.display()
        );
    }
}

/// An SQLite database in WAL mode held open (the sqlite3 shell): its POSIX locks named before
/// CRIU runs, the one on its `-shm` file, which it has mapped, even with --file-locks (CRIU
/// would not bring it back); the shell runs on.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn an_open_sqlite_database_is_named_by_its_locks() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("sqlite");
    let crac = Crac::new(&scratch);
    let db = scratch.join("app.db");
    let ready = scratch.join("ready");
    let script = scratch.join("script.sql");
    fs::write(
        &script,
        format!(
            "PRAGMA journal_mode=WAL;\nCREATE TABLE t(x);\nINSERT INTO t VALUES(42);\n\
             .shell sh -c \"echo ok > {}; exec sleep 600\"\n",
            ready.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("sqlite3");
    cmd.arg(&db)
        .stdin(fs::File::open(&script).unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    util::session_leader(&mut cmd);
    let mut shell = cmd.spawn().expect("sqlite3 runs");
    let pid = shell.id();
    wait_until(Duration::from_secs(10), "sqlite3 to run its script", || {
        ready.exists()
    });
    let shm = scratch.join("app.db-shm");
    let named = [
        format!(
            "pid {pid} fd {}: lock {} (POSIX lock, shared, bytes 1073741826-1073742335) ({OWN})",
            fd_on(pid, &db),
            db.display()
        ),
        format!(
            "pid {pid} fd {}: lock {} (POSIX lock, shared, bytes 128-128, on a file it has mapped) ({MAPPED})",
            fd_on(pid, &shm),
            shm.display()
        ),
    ];
    let pid_arg = pid.to_string();
    let out = crac.run(&["checkpoint", &pid_arg, "--name", "db"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr(&out).contains(&format!(
            "preflight: CRIU would refuse 2 descriptors of the tree: {}; {} (",
            named[0], named[1]
        )),
        "{}",
        text(&out)
    );
    let out = crac.run(&["checkpoint", &pid_arg, "--name", "db", "--file-locks"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr(&out).contains(&format!(
            "preflight: CRIU would refuse 1 descriptor of the tree: {} (",
            named[1]
        )),
        "{}",
        text(&out)
    );
    assert!(!crac.listing().contains(&"db".to_owned()));
    assert!(
        table_line("POSIX", &shm).is_some(),
        "sqlite3 holds its lock still"
    );
    assert_eq!(shell.try_wait().expect("try_wait"), None, "sqlite3 runs on");
    let tree = crac_action::tree::descendants(pid);
    for &member in tree.iter().rev() {
        let _ = kill(Pid::from_raw(member as i32), Signal::SIGKILL);
    }
    let _ = shell.wait();
    // sqlite3's children come to this subreaper, if nobody reaped them first.
    for &member in &tree[1..] {
        let _ = nix::sys::wait::waitpid(Pid::from_raw(member as i32), None);
    }
}

/// The embedded-db example: a checkpoint lets it through (its database closed by its hook),
/// its image restores while the database is unchanged; once the restored copy has written and
/// been checkpointed again, the older image is refused by the database's name, `crac run`
/// starts cold saying why, and `--allow-changed` restores it, carrying on from the database.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn an_image_is_refused_once_the_database_it_wrote_moved_on() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("embedded-db");
    let crac = Crac::new(&scratch);
    let db = scratch.join("events.redb");
    let log = scratch.join("db.log");
    let start = || {
        let mut cmd = Command::new(bin("embedded-db"));
        cmd.arg(&db).stdin(Stdio::null());
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        cmd.stdout(out.try_clone().unwrap()).stderr(out);
        util::session_leader(&mut cmd);
        cmd.spawn().expect("embedded-db runs")
    };
    let lines = || util::read_lines(&log);
    let wrote_past = |n: usize| {
        wait_until(Duration::from_secs(10), "events to be written", || {
            lines()
                .iter()
                .filter(|l| l.starts_with("wrote event"))
                .count()
                > n
        })
    };
    let mut service = start();
    let pid = service.id();
    let pid_arg = pid.to_string();
    wrote_past(3);
    let out = crac.run(&["checkpoint", &pid_arg, "--name", "first"]);
    assert!(out.status.success(), "{}", text(&out));
    let _ = service.wait();
    let out = crac.run(&["images", "show", "first"]);
    assert!(
        stdout(&out).contains(&format!("  written:   {} (", db.display())),
        "{}",
        text(&out)
    );
    let out = crac.run(&["restore", "first", "--detach"]);
    assert!(out.status.success(), "{}", text(&out));
    let written = lines()
        .iter()
        .filter(|l| l.starts_with("wrote event"))
        .count();
    wrote_past(written + 3);
    let out = crac.run(&["checkpoint", &pid_arg, "--name", "second"]);
    assert!(out.status.success(), "checkpointed again: {}", text(&out));
    reap(pid, Duration::from_secs(10));

    let refusal = format!("the file {} changed since the checkpoint (", db.display());
    let reason =
        "): the process had it open for writing; restoring would resume it against a newer file";
    for args in [
        &["restore", "first", "--detach"][..],
        &["images", "verify", "first"],
    ] {
        let out = crac.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(
            stderr(&out).contains(&refusal) && stderr(&out).contains(reason),
            "{args:?}: {}",
            text(&out)
        );
    }
    // crac run starts the service cold, saying why.
    let mut run = crac
        .command(&["run", "--image", "first", "--"])
        .arg(bin("embedded-db"))
        .arg(&db)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("crac run");
    let mut said = String::new();
    {
        use std::io::BufRead;
        let mut err = std::io::BufReader::new(run.stderr.take().unwrap());
        while !said.contains("crac run: started cold as pid ") {
            let mut line = String::new();
            if err.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            said.push_str(&line);
        }
    }
    assert!(
        said.contains("crac run: no warm start: image ") && said.contains(&refusal),
        "{said}"
    );
    // The cold service, which writes to the store's log for the image (crac run's own is
    // told only once the service's pid is known to it).
    let cold: i32 = said
        .split("crac run: started cold as pid ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .expect("the cold service's pid");
    let cold_log = crac.store.join("first.log");
    wait_until(Duration::from_secs(10), "the cold service to write", || {
        util::read_lines(&cold_log)
            .iter()
            .filter(|l| l.starts_with("wrote event"))
            .count()
            > 2
    });
    let _ = kill(Pid::from_raw(cold), Signal::SIGTERM);
    let _ = run.wait();

    // Allowed: restored, and it carries on from the database, not from its memory (the
    // event it was about to write when the image was made).
    let number_after = |prefix: &str, lines: &[String]| -> Vec<u64> {
        lines
            .iter()
            .filter_map(|l| l.strip_prefix(prefix)?.parse().ok())
            .collect()
    };
    let in_memory = number_after(
        "before_checkpoint: closed the database before event ",
        &lines(),
    )[0];
    let db_last = *number_after("wrote event ", &util::read_lines(&cold_log))
        .last()
        .expect("events");
    let out = crac.run(&[
        "restore",
        "first",
        "--detach",
        "--allow-changed",
        &db.display().to_string(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let reopened = "after_restore (restored): opened the database, next event ";
    wait_until(
        Duration::from_secs(10),
        "the restored copy to open the database",
        || number_after(reopened, &lines()).len() == 2,
    );
    let next = number_after(reopened, &lines())[1];
    // The last event the cold run wrote, or one more it committed before SIGTERM took it.
    assert!(
        next > in_memory && (db_last + 1..=db_last + 2).contains(&next),
        "next {next}, image's {in_memory}, last logged {db_last}"
    );
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    reap(pid, Duration::from_secs(10));
    // A killed agent cannot remove its folder.
    let _ = fs::remove_dir_all(util::agent_dir(pid));
}
