//! Agent folders cannot be denied or taken by other users, played for real: `nobody` plants
//! folders and links where agents and restores put their sockets (`runuser -u nobody`), a
//! service runs as another unprivileged uid (`setpriv`), and a crafted `crac-agents.json`
//! names folders an agent never uses. Each runs under umask 022 and 000.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::stat::{umask, Mode};

use crate::util::{self, as_nobody, bin, text, wait_until, Crac, Scratch, Target};

/// The other local user.
const NOBODY: u32 = 65534;
/// An unprivileged service's uid (no passwd entry needed with setpriv).
const SERVICE_UID: u32 = 64999;
const FALLBACK: &str = "/tmp/crac";
const MASKS: [u32; 2] = [0o022, 0o000];

/// Runs `f` with the process's umask set to `mask` (the tests take turns: util::env).
fn with_umask<T>(mask: u32, f: impl FnOnce() -> T) -> T {
    let old = umask(Mode::from_bits_truncate(mask));
    let out = f();
    umask(old);
    out
}

/// The folders (or links) `nobody` planted, removed when dropped (after checking nothing was
/// put in them, when asked to).
struct Planted(Vec<PathBuf>);

/// Where nobody's planted links lead (nothing must be made there).
fn link_target() -> PathBuf {
    PathBuf::from(format!("/tmp/crac-e2e-nobody-links-{}", std::process::id()))
}

impl Planted {
    /// `nobody` makes `<base>/<pid>` (mode 0777) for the next `count` pids, as a user who wants
    /// to deny or take the agent folders of services yet to start would. Only what nobody
    /// actually made is kept (a folder that is there already is someone else's).
    fn next_pids(base: &Path, count: u32) -> Planted {
        Planted::next_pids_as(base, count, false)
    }

    /// As [`Planted::next_pids`], with links to [`link_target`]`/<pid>` if `links`.
    fn next_pids_as(base: &Path, count: u32, links: bool) -> Planted {
        let last: u32 = fs::read_to_string("/proc/sys/kernel/ns_last_pid")
            .expect("ns_last_pid")
            .trim()
            .parse()
            .expect("a pid");
        let pid_max: u32 = fs::read_to_string("/proc/sys/kernel/pid_max")
            .expect("pid_max")
            .trim()
            .parse()
            .expect("a number");
        let first = last + 1;
        let end = (last + count).min(pid_max - 1);
        let plant = |range: String| {
            if links {
                format!(
                    "ln -s -t {} {}/{range} 2>/dev/null",
                    base.display(),
                    link_target().display()
                )
            } else {
                format!("mkdir -m 0777 {}/{range} 2>/dev/null", base.display())
            }
        };
        let mut script = plant(format!("{{{first}..{end}}}"));
        if end - first + 1 < count {
            // Pids wrap around to 300 after pid_max.
            script.push_str("; ");
            script.push_str(&plant(format!("{{300..{}}}", 300 + count)));
        }
        as_nobody(&format!("{script}; true"));
        let planted = (first..=end)
            .chain(300..300 + count)
            .map(|pid| base.join(pid.to_string()))
            .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| m.uid() == NOBODY))
            .collect();
        Planted(planted)
    }

    fn has(&self, path: &Path) -> bool {
        self.0.iter().any(|p| p == path)
    }

    /// Every planted folder is still nobody's, 0777, and empty, every link still nobody's and
    /// leading nowhere: nothing was written into them.
    fn assert_untouched(&self) {
        assert!(!link_target().exists(), "something was made through a link");
        for path in &self.0 {
            let meta =
                fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if meta.file_type().is_symlink() {
                assert_eq!(meta.uid(), NOBODY, "{}", path.display());
                continue;
            }
            assert_eq!(
                (meta.uid(), meta.mode() & 0o7777),
                (NOBODY, 0o777),
                "{}",
                path.display()
            );
            assert_eq!(
                fs::read_dir(path).expect("read").count(),
                0,
                "{} received something",
                path.display()
            );
        }
    }
}

impl Drop for Planted {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = fs::remove_dir_all(path);
        }
    }
}

/// The entries of `base` that are `<name>.foreign-*` (moved aside by root) or `<name>.XXXXXX`
/// (an agent's folder of its own).
fn beside(base: &Path, name: &str, foreign: bool) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(base)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let n = p.file_name().unwrap().to_string_lossy().into_owned();
                    match n.strip_prefix(&format!("{name}.")) {
                        Some(rest) if foreign => rest.starts_with("foreign-"),
                        Some(rest) => rest.len() == 6 && !rest.contains('-'),
                        None => false,
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// Removes the paths when dropped.
struct Remove(Vec<PathBuf>);

impl Drop for Remove {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = fs::remove_dir_all(path).or_else(|_| fs::remove_file(path));
        }
    }
}

/// A target running as `uid` (setpriv), with a folder of its own, without XDG_RUNTIME_DIR or
/// CRAC_AGENT_DIR (so its agent uses /tmp/crac).
fn start_as(scratch: &Scratch, uid: u32, name: &str) -> Target {
    let dir = scratch.join(name);
    fs::create_dir(&dir).expect("the target's folder");
    std::os::unix::fs::chown(&dir, Some(uid), Some(uid)).expect("chown");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
    let wrapper = scratch.join(&format!("{name}-as-{uid}"));
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nunset XDG_RUNTIME_DIR CRAC_AGENT_DIR\nexec setpriv --reuid={uid} --regid={uid} --clear-groups -- {} \"$@\"\n",
            bin("crac-test-target").display()
        ),
    )
    .expect("wrapper");
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).expect("chmod");
    Target::start_with(&wrapper, &dir, &[], None)
}

/// The agent's socket of `pid`, as `crac status` reports it (the agent answered, idle).
fn status_socket(crac: &Crac, pid: u32, env: &[(&str, &str)]) -> String {
    let out = crac_ok(crac, &["status", &pid.to_string()], env);
    let first = out.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(&format!("pid {pid}")) && first.contains(": idle, "),
        "{out}"
    );
    out.lines()
        .find_map(|l| l.strip_prefix("  socket: "))
        .unwrap_or_else(|| panic!("no socket line: {out}"))
        .to_owned()
}

fn crac_ok(crac: &Crac, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = crac
        .command(args)
        .envs(env.iter().copied())
        .output()
        .expect("crac runs");
    assert!(out.status.success(), "crac {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (a) nobody plants /tmp/crac/<pid> for the next pids, and cannot touch /run/crac: a root
/// service still starts (its agent is in /run/crac), answers `crac status` and is
/// checkpointed, and nothing of nobody's is written into. With `CRAC_AGENT_DIR=/tmp/crac` (a
/// root service told to use the shared base) the planted folder is moved aside and the agent
/// takes its own path.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn folders_planted_for_the_next_pids_deny_no_root_service() {
    let Some(_env) = util::env() else { return };
    util::shared_agent_base();
    for mask in MASKS {
        let scratch = Scratch::new("planted-root");
        with_umask(mask, || {
            let crac = Crac::new(&scratch);
            // nobody cannot make /run/crac, nor anything in it.
            let out = as_nobody("mkdir /run/crac/planted || mkdir -p /run/crac/planted");
            assert!(!out.status.success(), "{}", text(&out));
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
                "{}",
                text(&out)
            );

            let planted = Planted::next_pids(Path::new(FALLBACK), 3000);
            let target = Target::start(&scratch.join("t"), &[]);
            let pid = target.pid;
            let usual = Path::new(FALLBACK).join(pid.to_string());
            assert!(
                planted.has(&usual),
                "pid {pid} was not among the planted ones"
            );
            let socket = format!("/run/crac/{pid}/agent.sock");
            assert_eq!(status_socket(&crac, pid, &[]), socket);
            let folder = fs::symlink_metadata(format!("/run/crac/{pid}")).expect("folder");
            assert_eq!((folder.uid(), folder.mode() & 0o7777), (0, 0o700));
            let base = fs::symlink_metadata("/run/crac").expect("base");
            assert_eq!((base.uid(), base.mode() & 0o022), (0, 0));
            let pid_s = pid.to_string();
            crac_ok(
                &crac,
                &["checkpoint", &pid_s, "--name", "a", "--leave-running"],
                &[],
            );
            wait_until(Duration::from_secs(10), "after_restore (resumed)", || {
                target.hooks().len() == 6
            });
            planted.assert_untouched();
            drop(target);

            // Root told to use the shared base: nobody's folder at its path is moved aside.
            let planted = Planted::next_pids(Path::new(FALLBACK), 3000);
            let shared = [("CRAC_AGENT_DIR", FALLBACK)];
            let target = Target::start(&scratch.join("t2"), &shared);
            let pid = target.pid;
            let usual = Path::new(FALLBACK).join(pid.to_string());
            assert!(
                planted.has(&usual),
                "pid {pid} was not among the planted ones"
            );
            let aside = beside(Path::new(FALLBACK), &pid.to_string(), true);
            let _aside = Remove(aside.clone());
            assert_eq!(aside.len(), 1, "{aside:?}");
            let moved = fs::symlink_metadata(&aside[0]).expect("moved");
            assert_eq!((moved.uid(), moved.mode() & 0o7777), (NOBODY, 0o777));
            assert_eq!(fs::read_dir(&aside[0]).expect("read").count(), 0);
            let folder = fs::symlink_metadata(&usual).expect("folder");
            assert_eq!((folder.uid(), folder.mode() & 0o7777), (0, 0o700));
            assert_eq!(
                status_socket(&crac, pid, &shared),
                format!("{}/agent.sock", usual.display())
            );
            let pid_s = pid.to_string();
            crac_ok(
                &crac,
                &["checkpoint", &pid_s, "--name", "a2", "--leave-running"],
                &shared,
            );
            wait_until(Duration::from_secs(10), "after_restore (resumed)", || {
                target.hooks().len() == 6
            });
            let planted_others =
                Planted(planted.0.iter().filter(|p| **p != usual).cloned().collect());
            planted_others.assert_untouched();
            drop(target);
            let _ = fs::remove_dir_all(&usual);
        });
    }
}

/// Whether this root may dump another uid's process: CRIU reads its rlimits (prlimit), which
/// takes CAP_SYS_RESOURCE (some sandboxes' root lacks it).
fn can_dump_other_users() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    fs::read_to_string("/proc/self/status")
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|caps| u64::from_str_radix(caps.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// (b) A service of an unprivileged uid, whose /tmp/crac/<pid> nobody planted, a folder or a
/// link (the sticky
/// base forbids moving it): it starts anyway, in a folder of its own with an unguessable name,
/// where crac finds it (`status`, `ps`), checkpoints it (kill) and restores it; where root
/// lacks CAP_SYS_RESOURCE, CRIU cannot dump another uid's process at all, and the test stops
/// after crac-action found the agent and ran its hooks.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn an_unprivileged_service_whose_folder_was_taken_starts_and_is_checkpointed() {
    let Some(_env) = util::env() else { return };
    util::shared_agent_base();
    for mask in MASKS {
        let scratch = Scratch::new("planted-user");
        with_umask(mask, || {
            let crac = Crac::new(&scratch);
            // Folders, then links.
            let planted = Planted::next_pids_as(Path::new(FALLBACK), 3000, mask == 0);
            let target = start_as(&scratch, SERVICE_UID, "t");
            let pid = target.pid;
            let usual = Path::new(FALLBACK).join(pid.to_string());
            assert!(
                planted.has(&usual),
                "pid {pid} was not among the planted ones"
            );
            let own = beside(Path::new(FALLBACK), &pid.to_string(), false);
            let _own = Remove(own.clone());
            assert_eq!(own.len(), 1, "{own:?}");
            let meta = fs::symlink_metadata(&own[0]).expect("its folder");
            assert_eq!((meta.uid(), meta.mode() & 0o7777), (SERVICE_UID, 0o700));
            let socket = format!("{}/agent.sock", own[0].display());
            assert_eq!(status_socket(&crac, pid, &[]), socket);
            let ps = crac_ok(&crac, &["ps", "--json"], &[]);
            let ps: serde_json::Value = serde_json::from_str(&ps).expect("JSON");
            let row = ps
                .as_array()
                .expect("rows")
                .iter()
                .find(|r| r["pid"] == pid)
                .unwrap_or_else(|| panic!("crac ps does not list pid {pid}: {ps}"));
            assert_eq!(row["socket"], socket.as_str());

            let pid_s = pid.to_string();
            if !can_dump_other_users() {
                // CRIU reads another uid's rlimits only with CAP_SYS_RESOURCE, which root
                // lacks here: crac-action finds the agent and runs its hooks, then CRIU stops.
                let out = crac.run(&["checkpoint", &pid_s, "--name", "b"]);
                let said = text(&out);
                assert!(!out.status.success(), "{said}");
                for line in [
                    format!("crac-action: pre-dump: pid {pid}: before_checkpoint ok, 3 hooks"),
                    "Can't get rlimit".to_owned(),
                ] {
                    assert!(said.contains(&line), "{line}\n{said}");
                }
                wait_until(Duration::from_secs(10), "after_restore (aborted)", || {
                    target.hooks().len() == 6
                });
                assert_eq!(target.hooks()[3..], util::after_all("aborted", 0));
                target.assert_serving(0);
                planted.assert_untouched();
                return;
            }
            crac_ok(&crac, &["checkpoint", &pid_s, "--name", "b"], &[]);
            assert_eq!(target.hooks(), util::BEFORE_ALL);
            let restored = Target::restored(&target);
            target.reap_dumped();
            let out = crac_ok(&crac, &["restore", "b", "--detach"], &[]);
            assert!(
                out.contains("after_restore (restored) ok, 3 hooks"),
                "{out}"
            );
            assert_eq!(restored.hooks()[3..], util::after_all("restored", 1));
            assert_eq!(
                fs::metadata(format!("/proc/{pid}"))
                    .expect("restored")
                    .uid(),
                SERVICE_UID
            );
            // And again, from the restored process.
            crac_ok(
                &crac,
                &["checkpoint", &pid_s, "--name", "b2", "--leave-running"],
                &[],
            );
            wait_until(Duration::from_secs(10), "after_restore (resumed)", || {
                restored.hooks().len() == 12
            });
            planted.assert_untouched();
            drop(restored);
        });
    }
}

/// (c) Between a checkpoint (which killed the service) and its restore, nobody plants a
/// folder, or a link to a folder of theirs, where the restored agent's socket goes (a root
/// service using the shared base, whose folder crac removed after the kill): pre-restore moves
/// it aside and makes root's own; the restored service runs its after_restore and can be
/// checkpointed again; nothing reached nobody's folder.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_folder_planted_before_a_restore_is_moved_aside_and_the_service_comes_back_whole() {
    let Some(_env) = util::env() else { return };
    util::shared_agent_base();
    for (mask, link) in [(0o022, false), (0o000, true)] {
        let scratch = Scratch::new("planted-restore");
        with_umask(mask, || {
            let crac = Crac::new(&scratch);
            let shared = [("CRAC_AGENT_DIR", FALLBACK)];
            let target = Target::start(&scratch.join("t"), &shared);
            let pid = target.pid;
            let pid_s = pid.to_string();
            let usual = Path::new(FALLBACK).join(&pid_s);
            crac_ok(&crac, &["checkpoint", &pid_s, "--name", "c"], &shared);
            let restored = Target::restored(&target);
            target.reap_dumped();
            // crac removed the dead agent's folder; so would a reboot or a /tmp cleaner.
            let _ = fs::remove_dir_all(&usual);
            let bait = format!("/tmp/crac-e2e-nobody-{}", std::process::id());
            let _bait = Remove(vec![PathBuf::from(&bait)]);
            let plant = if link {
                format!("mkdir -m 0777 {bait} && ln -s {bait} {}", usual.display())
            } else {
                format!("mkdir -m 0777 {}", usual.display())
            };
            let out = as_nobody(&plant);
            assert!(out.status.success(), "{}", text(&out));
            let out = crac_ok(&crac, &["restore", "c", "--detach"], &shared);
            assert!(
                out.contains("after_restore (restored) ok, 3 hooks"),
                "{out}"
            );
            assert_eq!(restored.hooks()[3..], util::after_all("restored", 1));
            let aside = beside(Path::new(FALLBACK), &pid_s, true);
            let _aside = Remove(aside.clone());
            assert_eq!(aside.len(), 1, "{aside:?}");
            let moved = fs::symlink_metadata(&aside[0]).expect("moved aside");
            assert_eq!(moved.uid(), NOBODY);
            assert_eq!(moved.file_type().is_symlink(), link);
            let nobodys = if link {
                PathBuf::from(&bait)
            } else {
                aside[0].clone()
            };
            assert_eq!(fs::read_dir(&nobodys).expect("read").count(), 0);
            let folder = fs::symlink_metadata(&usual).expect("root's folder");
            assert!(folder.is_dir());
            assert_eq!((folder.uid(), folder.mode() & 0o7777), (0, 0o700));
            assert!(usual.join("agent.sock").exists());
            // Checkpointable again.
            crac_ok(
                &crac,
                &["checkpoint", &pid_s, "--name", "c2", "--leave-running"],
                &shared,
            );
            wait_until(Duration::from_secs(10), "after_restore (resumed)", || {
                restored.hooks().len() == 12
            });
            drop(restored);
            let _ = fs::remove_dir_all(&usual);
        });
    }
}

/// (d) A crafted crac-agents.json (a folder in /etc owned by nobody, one outside every base
/// agents use) is refused by pre-restore, naming the entry, before anything is made: not
/// those folders, nor the image's real one.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_crafted_agents_list_is_refused_and_nothing_is_created() {
    let Some(env) = util::env() else { return };
    for mask in MASKS {
        let scratch = Scratch::new("crafted");
        let images = scratch.join("img");
        fs::create_dir(&images).expect("images");
        with_umask(mask, || {
            let target = Target::start(&scratch.join("t"), &[]);
            let pid = target.pid;
            let dump = env.dump(pid, &images, &[], &[]);
            assert!(dump.ok(), "{dump:?}");
            target.reap_dumped();
            let real = PathBuf::from(format!("/run/crac/{pid}"));
            let _ = fs::remove_dir_all(&real);
            let evil = [
                (format!("/etc/crac-e2e-evil-{pid}"), "is not named"),
                (
                    format!("/var/tmp/crac-e2e-{pid}/{pid}"),
                    "is not in a base folder agents use",
                ),
            ];
            for (path, why) in &evil {
                let list = serde_json::json!({
                    "format": 1,
                    "agents": [
                        {"pid": pid, "ns_pid": pid, "dir": real, "uid": 0, "gid": 0},
                        {"pid": pid, "ns_pid": pid, "dir": path, "uid": NOBODY, "gid": NOBODY, "mode": 0o4777},
                    ]
                });
                fs::write(images.join("crac-agents.json"), list.to_string()).expect("craft");
                let run = env.restore(&images);
                assert!(!run.ok(), "{run:?}");
                let expected = format!(
                    "crac-action: pre-restore: crac-agents.json in the image names {path} as the agent folder of pid {pid} (owner uid {NOBODY}), which {why}"
                );
                assert!(run.log.contains(&expected), "{expected}\n{run:?}");
                assert!(
                    run.log.contains("Refusing to create it or anything else"),
                    "{run:?}"
                );
                assert!(!Path::new(path).exists(), "{path} was created");
                assert!(!Path::new(&format!("/var/tmp/crac-e2e-{pid}")).exists());
                assert!(
                    !real.exists(),
                    "the image's own folder was made before the check"
                );
                assert!(
                    crac_action::tree::ProcessId::of(pid).is_none(),
                    "restored anyway"
                );
            }
        });
    }
}

/// (e) nobody made /tmp/crac itself (seen so only in a mount namespace of the service's own,
/// so that other services on this machine keep the real one): a service of an unprivileged
/// uid, which has no runtime folder, still starts, in a private base of its own,
/// `/tmp/crac-<uid>.XXXXXX`, where crac finds and asks its agent; nobody's folder gets nothing.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_shared_base_made_by_another_user_denies_no_service() {
    let Some(_env) = util::env() else { return };
    util::shared_agent_base();
    for mask in MASKS {
        let scratch = Scratch::new("taken-base");
        let crac = Crac::new(&scratch);
        let taken = scratch.join("nobodys-crac");
        fs::create_dir(&taken).expect("nobody's folder");
        std::os::unix::fs::chown(&taken, Some(NOBODY), Some(NOBODY)).expect("chown");
        fs::set_permissions(&taken, fs::Permissions::from_mode(0o777)).expect("chmod");
        let dir = scratch.join("t");
        fs::create_dir(&dir).expect("the target's folder");
        std::os::unix::fs::chown(&dir, Some(SERVICE_UID), Some(SERVICE_UID)).expect("chown");
        with_umask(mask, || {
            let before = private_bases();
            let target = Target::start_in_namespaces(
                &dir,
                &[],
                &["--mount", "--propagation", "private"],
                &format!(
                    "mount --bind {} {FALLBACK} || exit 1\n\
                     unset XDG_RUNTIME_DIR CRAC_AGENT_DIR\n\
                     exec setsid setpriv --reuid={SERVICE_UID} --regid={SERVICE_UID} --clear-groups \"$0\"",
                    taken.display()
                ),
            );
            let made: Vec<PathBuf> = private_bases()
                .into_iter()
                .filter(|b| !before.contains(b))
                .collect();
            let _made = Remove(made.clone());
            assert_eq!(made.len(), 1, "{made:?}");
            let base = fs::symlink_metadata(&made[0]).expect("private base");
            assert_eq!(
                (base.uid(), base.mode() & 0o7777),
                (SERVICE_UID, 0o700),
                "{}",
                made[0].display()
            );
            let socket = status_socket(&crac, target.pid, &[]);
            assert_eq!(
                socket,
                format!(
                    "{}/1/agent.sock inside the root of pid {}",
                    made[0].display(),
                    target.pid
                )
            );
            assert_eq!(fs::read_dir(&taken).expect("read").count(), 0);
            let shared = fs::symlink_metadata(FALLBACK).expect("/tmp/crac");
            assert_eq!((shared.uid(), shared.mode() & 0o7777), (0, 0o1777));
            drop(target);
        });
    }
}

/// The private bases `/tmp/crac-<SERVICE_UID>.XXXXXX` there are now.
fn private_bases() -> Vec<PathBuf> {
    fs::read_dir("/tmp")
        .expect("/tmp")
        .flatten()
        .map(|e| e.path())
        .filter(|p| crac_protocol::location::private_base_uid(p) == Some(SERVICE_UID))
        .collect()
}
