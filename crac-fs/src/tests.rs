//! Unit tests of the rules, as the caller's own user; the other user's side (a folder or link
//! planted by `nobody`) is played for real by the end-to-end tests.

use super::*;
use std::os::unix::fs::symlink;

/// The process's umask is shared by every test thread: tests that change it ([`with_umask`])
/// run alone, the others (holding a [`Scratch`]) side by side.
static UMASK: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// A test's folder; while it lives, no other test changes the umask.
struct Scratch(PathBuf, Option<std::sync::RwLockReadGuard<'static, ()>>);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let guard = UMASK.read().unwrap_or_else(|e| e.into_inner());
        let mut scratch = Scratch::unguarded(name);
        scratch.1 = Some(guard);
        scratch
    }

    /// For a test that changes the umask itself, through [`with_umask`].
    fn unguarded(name: &str) -> Scratch {
        let path = std::env::temp_dir().join(format!("crac-fs-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        ensure_dir(&path).unwrap();
        Scratch(path, None)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

/// Runs `f` with the process's umask set to `mask`; tests that change it take turns.
fn with_umask<T>(mask: u32, f: impl FnOnce() -> T) -> T {
    /// Puts the umask back, even when `f` panics.
    struct Restore(nix::sys::stat::Mode);
    impl Drop for Restore {
        fn drop(&mut self) {
            nix::sys::stat::umask(self.0);
        }
    }
    let _alone = UMASK.write().unwrap_or_else(|e| e.into_inner());
    let _restore = Restore(nix::sys::stat::umask(
        nix::sys::stat::Mode::from_bits_truncate(mask),
    ));
    f()
}

#[test]
fn folders_and_files_are_private_whatever_the_umask() {
    for mask in [0o000, 0o022, 0o077, 0o777] {
        let scratch = Scratch::unguarded(&format!("umask{mask:o}"));
        with_umask(mask, || {
            let deep = scratch.0.join("a/b");
            ensure_dir(&deep).unwrap();
            assert_eq!(mode(&scratch.0.join("a")), 0o700, "umask {mask:o}");
            assert_eq!(mode(&deep), 0o700, "umask {mask:o}");
            let file = deep.join("f");
            create_file(&file).unwrap();
            assert_eq!(mode(&file), 0o600, "umask {mask:o}");
            let log = deep.join("log");
            open_append(&log).unwrap().write_all(b"x").unwrap();
            assert_eq!(mode(&log), 0o600, "umask {mask:o}");
            write_atomic(&deep.join("w"), b"y").unwrap();
            assert_eq!(mode(&deep.join("w")), 0o600, "umask {mask:o}");
            let temp = TempDir::new_in(&deep, "t").unwrap();
            assert_eq!(mode(temp.path()), 0o700, "umask {mask:o}");
        });
    }
}

#[test]
fn a_link_where_crac_writes_is_refused_not_followed() {
    let scratch = Scratch::new("link");
    let victim = scratch.0.join("victim");
    fs::write(&victim, b"root's").unwrap();
    let link = scratch.0.join("link");
    symlink(&victim, &link).unwrap();

    assert_eq!(
        create_file(&link).unwrap_err().kind(),
        io::ErrorKind::AlreadyExists
    );
    let err = open_append(&link).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("cannot be trusted: it is a symbolic link"),
        "{err}"
    );
    let err = ensure_dir(&link).unwrap_err();
    assert!(err.to_string().contains("it is a symbolic link"), "{err}");
    write_atomic(&link, b"new").unwrap();
    assert_eq!(
        fs::read(&victim).unwrap(),
        b"root's",
        "written through the link"
    );
    assert_eq!(fs::read(&link).unwrap(), b"new");
    assert!(!fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn a_folder_others_may_write_is_refused_and_ones_own_readable_folder_tightened() {
    let scratch = Scratch::new("modes");
    let open = scratch.0.join("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
    let err = ensure_dir(&open).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{} cannot be trusted: other users may write to it (mode 777), so anything in it \
             may have been planted; check it, then chmod 700 it",
            open.display()
        )
    );
    assert!(check_dir(&open).is_err());
    let err = ensure_dir(&open.join("below")).unwrap_err();
    assert!(err.to_string().contains("and it is not sticky"), "{err}");

    fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).unwrap();
    ensure_dir(&open.join("below")).unwrap();

    let readable = scratch.0.join("readable");
    fs::create_dir(&readable).unwrap();
    fs::set_permissions(&readable, fs::Permissions::from_mode(0o755)).unwrap();
    ensure_dir(&readable).unwrap();
    assert_eq!(mode(&readable), 0o700);
}

#[test]
fn a_hard_linked_log_is_refused() {
    let scratch = Scratch::new("hardlink");
    let other = scratch.0.join("other");
    fs::write(&other, b"").unwrap();
    let log = scratch.0.join("log");
    fs::hard_link(&other, &log).unwrap();
    let err = open_append(&log).unwrap_err();
    assert!(
        err.to_string().contains("other names (a hard link"),
        "{err}"
    );
}

#[test]
fn only_regular_files_are_read_and_only_up_to_the_bound() {
    let scratch = Scratch::new("regular");
    let fifo = scratch.0.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let err = open_regular(&fifo).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(
        err.to_string(),
        format!(
            "{} is a FIFO, not a regular file: crac reads only regular files",
            fifo.display()
        )
    );
    let err = open_regular(Path::new("/dev/zero")).unwrap_err();
    assert!(err.to_string().contains("is a character device"), "{err}");
    assert!(open_regular(&scratch.0).is_err());

    let file = scratch.0.join("f");
    fs::write(&file, b"12345").unwrap();
    assert_eq!(read_bounded(&file, 5).unwrap(), b"12345");
    let err = read_bounded(&file, 4).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
}

#[test]
fn a_secret_file_others_may_read_is_refused() {
    let scratch = Scratch::new("private");
    let key = scratch.0.join("key");
    fs::write(&key, b"secret").unwrap();
    for bad in [0o644, 0o640, 0o604, 0o620] {
        fs::set_permissions(&key, fs::Permissions::from_mode(bad)).unwrap();
        let err = read_private(&key, 100).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(
            err.to_string(),
            format!(
                "{} holds secret keys but other users may read it (mode {bad:o}): chmod 600 it, \
                 and replace the keys if someone else may have read them",
                key.display()
            )
        );
    }
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(read_private(&key, 100).unwrap(), b"secret");
    assert_eq!(
        read_private(&key, 3).unwrap_err().kind(),
        io::ErrorKind::InvalidData
    );
    let fifo = scratch.0.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    assert_eq!(
        read_private(&fifo, 100).unwrap_err().kind(),
        io::ErrorKind::InvalidInput
    );
    if geteuid().is_root() {
        // Another user's key, however private, is not the caller's to use.
        nix::unistd::chown(&key, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let err = read_private(&key, 100).unwrap_err();
        assert!(
            err.to_string()
                .contains("holds secret keys but belongs to uid 65534"),
            "{err}"
        );
    }
}

#[test]
fn tighten_tree_takes_away_others_access() {
    let scratch = Scratch::new("tighten");
    let sub = scratch.0.join("sub");
    fs::create_dir(&sub).unwrap();
    fs::set_permissions(&sub, fs::Permissions::from_mode(0o755)).unwrap();
    let file = sub.join("pages-1.img");
    fs::write(&file, b"secret").unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    let exe = scratch.0.join("x");
    fs::write(&exe, b"").unwrap();
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&scratch.0, fs::Permissions::from_mode(0o755)).unwrap();
    tighten_tree(&scratch.0).unwrap();
    assert_eq!(mode(&scratch.0), 0o700);
    assert_eq!(mode(&sub), 0o700);
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(&exe), 0o700);
}

#[test]
fn temp_dirs_have_unguessable_names_and_go_away() {
    let scratch = Scratch::new("temp");
    let a = TempDir::new_in(&scratch.0, "crac-check").unwrap();
    let b = TempDir::new_in(&scratch.0, "crac-check").unwrap();
    assert_ne!(a.path(), b.path());
    let name = a.path().file_name().unwrap().to_str().unwrap().to_owned();
    assert!(
        name.starts_with("crac-check.") && name.len() == "crac-check.".len() + 6,
        "{name}"
    );
    let path = a.path().to_owned();
    fs::write(path.join("inside"), b"").unwrap();
    drop(a);
    assert!(!path.exists());
    let kept = b.keep();
    assert!(kept.exists());
}

#[test]
fn read_trusted_takes_only_the_callers_private_regular_files() {
    let scratch = Scratch::new("trusted");
    let file = scratch.0.join("cache");
    write_atomic(&file, b"noted").unwrap();
    assert_eq!(read_trusted(&file, 100).unwrap(), b"noted");

    fs::set_permissions(&file, fs::Permissions::from_mode(0o666)).unwrap();
    let err = read_trusted(&file, 100).unwrap_err();
    assert!(is_untrusted(&err), "{err}");
    assert!(
        err.to_string()
            .ends_with("other users may write to it (mode 666)"),
        "{err}"
    );
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();

    let link = scratch.0.join("link");
    symlink(&file, &link).unwrap();
    assert!(is_untrusted(&read_trusted(&link, 100).unwrap_err()));

    fs::set_permissions(&scratch.0, fs::Permissions::from_mode(0o777)).unwrap();
    let err = read_trusted(&file, 100).unwrap_err();
    assert!(
        err.to_string()
            .contains("other users may write to it (mode 777)"),
        "{err}"
    );
    fs::set_permissions(&scratch.0, fs::Permissions::from_mode(0o700)).unwrap();

    assert_eq!(
        read_trusted(&file, 2).unwrap_err().kind(),
        io::ErrorKind::InvalidData
    );
    assert!(!is_untrusted(&io::Error::from_raw_os_error(libc::EACCES)));
}

#[test]
fn a_shared_folder_is_sticky_and_open_to_all_whatever_the_umask() {
    let scratch = Scratch::unguarded("shared");
    for (i, mask) in [0o000, 0o022, 0o077].into_iter().enumerate() {
        let dir = scratch.0.join(format!("shared-{i}"));
        with_umask(mask, || create_shared_dir(&dir)).unwrap();
        assert_eq!(mode(&dir), 0o1777);
        assert_eq!(
            create_shared_dir(&dir).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
    }
    // A link there is not made into a shared folder, nor is what it leads to.
    let target = scratch.0.join("target");
    ensure_dir(&target).unwrap();
    symlink(&target, scratch.0.join("link")).unwrap();
    assert!(create_shared_dir(&scratch.0.join("link")).is_err());
    assert_eq!(mode(&target), 0o700);
}

#[test]
fn moving_aside_keeps_the_entry_under_an_unguessable_name_and_follows_no_link() {
    let scratch = Scratch::new("aside");
    let planted = scratch.0.join("42");
    symlink("/etc", &planted).unwrap();
    let aside = move_aside(&planted).unwrap();
    assert!(!planted.exists() && fs::symlink_metadata(&planted).is_err());
    let name = aside.file_name().unwrap().to_str().unwrap().to_owned();
    assert!(
        name.starts_with("42.foreign-") && name.len() == "42.foreign-".len() + 16,
        "{name}"
    );
    assert_eq!(fs::read_link(&aside).unwrap(), Path::new("/etc"));
    // Twice: two names.
    ensure_dir(&planted).unwrap();
    let again = move_aside(&planted).unwrap();
    assert_ne!(again, aside);
    assert!(fs::symlink_metadata(&again).unwrap().is_dir());
    assert_eq!(
        move_aside(&planted).unwrap_err().kind(),
        io::ErrorKind::NotFound
    );
}

#[test]
fn a_folder_made_for_another_user_is_theirs_and_private_whatever_the_umask() {
    let scratch = Scratch::unguarded("for");
    let (uid, gid) = if geteuid().is_root() {
        (65534, 65534)
    } else {
        (geteuid().as_raw(), nix::unistd::getegid().as_raw())
    };
    for (i, mask) in [0o000, 0o022].into_iter().enumerate() {
        let dir = scratch.0.join(format!("for-{i}"));
        with_umask(mask, || create_dir_for(&dir, uid, gid)).unwrap();
        let meta = fs::symlink_metadata(&dir).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (uid, gid, 0o700)
        );
        assert_eq!(
            create_dir_for(&dir, uid, gid).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
    }
}

#[test]
fn the_folder_rule_takes_root_or_the_given_uid_and_no_other_writer_unless_sticky() {
    let scratch = Scratch::new("trusted-folder");
    let me = geteuid().as_raw();
    let meta = |path: &Path| fs::symlink_metadata(path).unwrap();
    let dir = scratch.0.join("base");
    create_dir(&dir).unwrap();
    assert_eq!(trusted_folder(&meta(&dir), me), Ok(()));
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o770)).unwrap();
    assert_eq!(
        trusted_folder(&meta(&dir), me),
        Err(Distrust::Writable(0o770))
    );
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777)).unwrap();
    assert_eq!(trusted_folder(&meta(&dir), me), Ok(()));
    let link = scratch.0.join("link");
    symlink(&dir, &link).unwrap();
    assert_eq!(
        trusted_folder(&meta(&link), me),
        Err(Distrust::NotAFolder("a symbolic link"))
    );
    let file = scratch.0.join("file");
    fs::write(&file, b"").unwrap();
    assert_eq!(
        trusted_folder(&meta(&file), me),
        Err(Distrust::NotAFolder("a file"))
    );
    // Another user's: as root, a folder given to nobody, asked for a third uid; otherwise
    // one's own, asked for another uid.
    let (owner, asked) = if me == 0 {
        nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        (65534, 1000)
    } else {
        (me, me + 1)
    };
    assert_eq!(
        trusted_folder(&meta(&dir), asked),
        Err(Distrust::Owner(owner))
    );
}
