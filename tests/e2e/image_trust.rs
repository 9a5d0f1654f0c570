//! Images hold a service's memory and a restore runs it as root: another local user (played
//! for real, as `nobody`) can neither read an image, plant or swap one, nor redirect crac's
//! writes, whatever the umask. The threat model (docs/security.md) names these tests.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Output;

use crate::util::{self, as_nobody, text, Crac, Scratch, Target};

/// The umasks every test here runs crac under.
const UMASKS: [u32; 2] = [0o022, 0o000];

/// `crac ARGS` under umask `mask`.
fn crac_under(crac: &Crac, mask: u32, args: &[&str]) -> Output {
    util::with_umask(&mut crac.command(args), mask)
        .output()
        .expect("crac runs")
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).expect("stat").mode() & 0o7777
}

/// Every file and folder under `dir` (itself included) is its owner's alone.
fn assert_private_tree(dir: &Path) {
    assert_eq!(mode(dir) & 0o077, 0, "{} is {:o}", dir.display(), mode(dir));
    for entry in fs::read_dir(dir).expect("read") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            assert_private_tree(&path);
        } else {
            assert_eq!(
                mode(&path) & 0o077,
                0,
                "{} is {:o}",
                path.display(),
                mode(&path)
            );
        }
    }
}

/// A `--dir` image and a store image, made under umask 022 and 000: folders 0700, CRIU's files
/// and crac's own (metadata, notes, caches) 0600, and `nobody` cannot read the memory.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn images_and_stores_are_private_whatever_the_umask() {
    let Some(_env) = util::env() else { return };
    for mask in UMASKS {
        let scratch = Scratch::new(&format!("private-{mask:o}"));
        fs::set_permissions(&scratch.path, fs::Permissions::from_mode(0o755)).unwrap();
        let crac = Crac::new(&scratch);

        let target = Target::start(&scratch.join("t"), &[]);
        let pid = target.pid.to_string();
        let dir = scratch.join("img");
        let out = crac_under(
            &crac,
            mask,
            &["checkpoint", &pid, "--dir", dir.to_str().unwrap()],
        );
        assert!(out.status.success(), "umask {mask:o}: {}", text(&out));
        target.reap_dumped();
        assert_eq!(mode(&dir), 0o700, "umask {mask:o}");
        assert_private_tree(&dir);
        let pages = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().contains("pages-"))
            .expect("a pages file");
        let tried = as_nobody(&format!("cat {}", pages.display()));
        assert!(!tried.status.success(), "nobody read the memory");
        assert!(
            String::from_utf8_lossy(&tried.stderr).contains("Permission denied"),
            "{}",
            text(&tried)
        );

        let target = Target::start(&scratch.join("t2"), &[]);
        let pid = target.pid.to_string();
        let out = crac_under(&crac, mask, &["checkpoint", &pid, "--name", "web"]);
        assert!(out.status.success(), "umask {mask:o}: {}", text(&out));
        target.reap_dumped();
        assert_eq!(mode(&crac.store), 0o700, "umask {mask:o}");
        assert_private_tree(&crac.store);
        assert!(crac
            .store
            .join(crac_cli::metadata::KNOWN_HASHES_FILE)
            .is_file());
        assert!(crac
            .store
            .join("web")
            .join(crac_cli::metadata::VERIFIED_FILE)
            .is_file());
    }
}

/// `crac check` dumps a process of its own into a scratch folder. `nobody` plants links, named
/// as that folder used to be (after crac's pid), for the next few thousand pids, pointing at a
/// folder of theirs: crac writes nothing there, leaves nothing behind, and says all is well.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn crac_check_cannot_be_pointed_elsewhere() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("check-trap");
    fs::set_permissions(&scratch.path, fs::Permissions::from_mode(0o755)).unwrap();
    let trap = scratch.join("trap");
    fs::create_dir(&trap).unwrap();
    fs::set_permissions(&trap, fs::Permissions::from_mode(0o777)).unwrap();
    let next = fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .unwrap()
        .trim()
        .parse::<u32>()
        .unwrap();
    let planted = as_nobody(&format!(
        "for p in $(seq {} {}); do ln -s {} /tmp/crac-check-$p; done",
        next + 1,
        next + 2000,
        trap.display()
    ));
    assert!(planted.status.success(), "{}", text(&planted));
    let crac = Crac::new(&scratch);
    let out = crac.run(&["check"]);
    for p in next + 1..=next + 2000 {
        let _ = fs::remove_file(format!("/tmp/crac-check-{p}"));
    }
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("[ok] sockets"),
        "{}",
        text(&out)
    );
    assert_eq!(
        fs::read_dir(&trap).unwrap().count(),
        0,
        "crac wrote through nobody's link"
    );
    let left: Vec<String> = fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("crac-check."))
        .collect();
    assert!(left.is_empty(), "scratch folders left: {left:?}");
}

/// A store or an image folder that others may write to may hold what they planted (their
/// memory in place of the service's, a forged "found intact" note): nothing there is listed,
/// verified or restored, and the message says why. Made private again, the same image
/// restores.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_store_or_image_folder_others_may_write_to_is_refused() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("open-folders");
    let crac = Crac::new(&scratch);

    let restored = crac.checkpoint_new(&scratch.join("t"), "web", &[]);
    let store_refusal = format!(
        "{} cannot be trusted: other users may write to it (mode 777), so anything in it may \
         have been planted; check it, then chmod 700 it; crac neither lists, restores nor files \
         images in the store {} until that is fixed",
        crac.store.display(),
        crac.store.display()
    );
    fs::set_permissions(&crac.store, fs::Permissions::from_mode(0o777)).unwrap();
    for args in [
        &["images", "list"][..],
        &["images", "verify", "web"],
        &["restore", "web", "--detach"],
        &["images", "prune", "--keep", "0"],
    ] {
        let out = crac.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(&store_refusal),
            "{args:?}: {}",
            text(&out)
        );
    }
    assert!(crac.store.join("web").is_dir(), "prune removed the image");
    fs::set_permissions(&crac.store, fs::Permissions::from_mode(0o700)).unwrap();

    // The same for an image named by its folder.
    let image = crac.store.join("web");
    fs::set_permissions(&image, fs::Permissions::from_mode(0o777)).unwrap();
    let out = crac.run(&["restore", image.to_str().unwrap(), "--detach"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "{} cannot be trusted: other users may write to it (mode 777), so anything in it \
             may have been planted; check it, then chmod 700 it: another user could swap the \
             image's files after any check, so it is neither verified nor restored",
            image.display()
        )),
        "{}",
        text(&out)
    );
    fs::set_permissions(&image, fs::Permissions::from_mode(0o700)).unwrap();

    let out = crac.run(&["restore", "web", "--detach"]);
    assert!(out.status.success(), "{}", text(&out));
    restored.assert_serving(0);
    restored.terminate();
}

/// The metadata is sealed: an edit of the pid or of CRIU's options (which a restore acts on)
/// is refused as tampering by `verify` and by `restore`, before CRIU runs.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn edited_metadata_is_refused_before_criu_runs() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("edited-meta");
    let crac = Crac::new(&scratch);
    drop(crac.checkpoint_new(&scratch.join("t"), "web", &[]));

    let path = crac.store.join("web/crac-meta.json");
    let mut meta: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    meta["options"]["extra_criu_args"] = serde_json::json!(["--shell-job"]);
    fs::write(&path, serde_json::to_vec_pretty(&meta).unwrap()).unwrap();
    let refusal = format!(
        "crac-meta.json in {} does not match its digest: it was changed after the checkpoint \
         (by hand or by damage), so the image cannot be trusted",
        crac.store.join("web").display()
    );
    for args in [
        &["images", "verify", "web"][..],
        &["restore", "web", "--detach"],
    ] {
        let out = crac.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(&refusal),
            "{args:?}: {}",
            text(&out)
        );
    }
    assert!(
        !crac.store.join("web/restore.log").exists(),
        "CRIU ran on a tampered image"
    );
}

/// `crac run`'s store and log are private under umask 000, and a log path where `nobody`
/// planted a link to a root-only file is refused, the file untouched.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn crac_run_keeps_its_store_and_log_private() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("run-private");
    fs::set_permissions(&scratch.path, fs::Permissions::from_mode(0o755)).unwrap();
    let crac = Crac::new(&scratch);
    let out = crac_under(
        &crac,
        0o000,
        &["run", "--image", "svc", "--", "sh", "-c", "echo secret"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(mode(&crac.store), 0o700);
    let log = crac.store.join("svc.log");
    assert_eq!(mode(&log), 0o600);
    assert_eq!(fs::read_to_string(&log).unwrap(), "secret\n");

    let shared = scratch.join("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
    let victim = scratch.join("victim");
    fs::write(&victim, "root's\n").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
    let planted_log = shared.join("svc.log");
    let planted = as_nobody(&format!(
        "ln -s {} {}",
        victim.display(),
        planted_log.display()
    ));
    assert!(planted.status.success(), "{}", text(&planted));
    let out = crac_under(
        &crac,
        0o000,
        &[
            "run",
            "--image",
            "svc",
            "--log",
            planted_log.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "echo overwritten",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "cannot open the log {}: {} cannot be trusted: it is a symbolic link",
            planted_log.display(),
            planted_log.display()
        )),
        "{}",
        text(&out)
    );
    assert_eq!(fs::read_to_string(&victim).unwrap(), "root's\n");
}
