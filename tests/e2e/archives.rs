//! Archives from someone else, end to end through the `crac` command: a decompression bomb is
//! refused before anything is written, an import killed half-way is removed (never filed as
//! an image), and an encrypted archive (age) is imported only with its identity, whole and
//! authentic, and restores. Images come from real checkpoints.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::util::{self, bin, text, wait_until, Crac, Scratch, Target};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exit code 2 with exactly `message` as crac's error line.
fn refused_with(out: &Output, message: &str) {
    assert_eq!(out.status.code(), Some(2), "{}", text(out));
    assert_eq!(stderr(out), format!("crac: {message}\n"), "{}", text(out));
}

/// The bytes under `dir`, 0 while it is missing or changing under the walk.
fn tree_bytes(dir: &Path) -> u64 {
    crac_cli::store::dir_bytes(dir).unwrap_or(0)
}

/// Runs `crac ARGS` and returns its output with the most bytes the store held meanwhile
/// beyond what it held before.
fn run_watching(crac: &Crac, args: &[&str]) -> (Output, u64) {
    let before = tree_bytes(&crac.store);
    let child = crac
        .command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("crac runs");
    let mut child = child;
    let mut peak = 0;
    while child.try_wait().expect("crac's status").is_none() {
        peak = peak.max(tree_bytes(&crac.store));
        std::thread::sleep(Duration::from_millis(1));
    }
    let out = child.wait_with_output().expect("crac ends");
    (
        out,
        peak.max(tree_bytes(&crac.store)).saturating_sub(before),
    )
}

/// `crac ARGS` under umask 000.
fn run_umask_000(crac: &Crac, args: &[&str]) -> Output {
    util::with_umask(&mut crac.command(args), 0o000)
        .output()
        .expect("crac runs")
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_decompression_bomb_is_refused_before_anything_is_written() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("archive-bomb");
    let crac = Crac::new(&scratch);
    drop(crac.checkpoint_new(&scratch.join("web"), "web", &[]));

    // A real image, doctored into one of 256 MiB of zero pages: its archive is a few
    // kilobytes that expand 10 000-fold, as a bomb does (and as an image of little but zero
    // pages could).
    let image = scratch.join("zeros");
    fs::create_dir(&image).unwrap();
    for entry in fs::read_dir(crac.store.join("web")).unwrap().flatten() {
        fs::copy(entry.path(), image.join(entry.file_name())).unwrap();
    }
    let pages = fs::read_dir(&image)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("pages-"))
        })
        .expect("a pages file");
    fs::write(&pages, vec![0u8; 256 << 20]).unwrap();
    let mut meta = crac_cli::metadata::read(&image).unwrap();
    let mut files = crac_cli::metadata::list_image_files(&image).unwrap();
    crac_cli::metadata::hash_files(&image, &mut files).unwrap();
    meta.image_bytes = files.iter().map(|f| f.size).sum();
    meta.files = files;
    crac_cli::metadata::write(&image, &meta).unwrap();
    let bomb = scratch.join("bomb.crac");
    let out = crac.run(&[
        "images",
        "export",
        image.to_str().unwrap(),
        bomb.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = crac.run(&["images", "rm", "web"]);
    assert!(out.status.success(), "{}", text(&out));

    let archive_bytes = fs::metadata(&bomb).unwrap().len();
    let declared: u64 = meta.files.iter().map(|f| f.size).sum::<u64>()
        + fs::metadata(image.join("crac-meta.json")).unwrap().len();
    let ratio = declared / archive_bytes;
    assert!(ratio > 1000, "{declared} in {archive_bytes} bytes");
    let (out, peak) = run_watching(&crac, &["images", "import", bomb.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let message = stderr(&out);
    assert!(
        message.starts_with(&format!("crac: archive {} (", bomb.display())),
        "{}",
        text(&out)
    );
    assert!(
        message.ends_with(&format!(
            " declares an image of {:.1} MiB, {ratio} times its own size, more than the 1000 \
             times an image archive is let expand (real images compress 2 to 10 times): it may \
             be a decompression bomb; if you trust its sender and the image is mostly zero \
             pages, import it with --max-ratio {}; nothing was imported\n",
            declared as f64 / (1 << 20) as f64,
            ratio + 1
        )),
        "{}",
        text(&out)
    );
    assert_eq!(peak, 0, "the refused import wrote into the store");
    assert_eq!(crac.listing(), Vec::<String>::new());

    // The override the message names imports it.
    let out = crac.run(&[
        "images",
        "import",
        bomb.to_str().unwrap(),
        "--max-ratio",
        &(ratio + 1).to_string(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(crac.listing(), ["zeros"]);
    let out = crac.run(&["images", "verify", "zeros"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn an_import_killed_half_way_is_removed_never_filed() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("archive-killed");
    let crac = Crac::new(&scratch);
    // 64 MiB of pages, each of its own: an import that takes a while.
    drop(crac.checkpoint_new(&scratch.join("web"), "web", &[("CRAC_TEST_MIB", "64")]));
    let archive = scratch.join("web.crac");
    let out = crac.run(&["images", "export", "web", archive.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let out = crac.run(&["images", "rm", "web"]);
    assert!(out.status.success(), "{}", text(&out));

    let mut import = crac
        .command(&["images", "import", archive.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("crac runs");
    let folder = format!(".importing-web-{}-", import.id());
    let working = || {
        fs::read_dir(&crac.store).ok().and_then(|read| {
            read.flatten()
                .find(|e| e.file_name().to_string_lossy().starts_with(&folder))
                .map(|e| e.path())
        })
    };
    wait_until(Duration::from_secs(60), "the import to write 8 MiB", || {
        working().is_some_and(|dir| tree_bytes(&dir) > 8 << 20)
    });
    kill(Pid::from_raw(import.id() as i32), Signal::SIGKILL).unwrap();
    import.wait().unwrap();
    let left = working().expect("the killed import's folder");
    let written = tree_bytes(&left);
    assert!(
        written < 64 << 20,
        "the import had finished ({written} bytes)"
    );

    let out = crac.run(&["images", "list"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        stdout(&out),
        format!("no images in {}\n", crac.store.display())
    );
    let out = crac.run(&["images", "prune", "--keep", "5"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "removed {} (left by an interrupted import: its files were never all checked, so \
             nothing of it was filed; import the archive again)\n",
            left.display()
        ),
        "{}",
        text(&out)
    );
    assert_eq!(crac.listing(), Vec::<String>::new());

    // And the archive, imported again, is whole.
    let out = crac.run(&["images", "import", archive.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let out = crac.run(&["images", "verify", "web"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn an_encrypted_archive_imports_only_with_its_identity_and_restores() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("archive-age");
    let crac = Crac::new(&scratch);
    let restored = crac.checkpoint_new(&scratch.join("web"), "web", &[]);

    // A key made under umask 000 is still the owner's alone; the recipient is printed.
    let key = scratch.join("key.txt");
    let out = run_umask_000(
        &crac,
        &["images", "keygen", "--output", key.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out));
    let recipient = stdout(&out).trim().to_owned();
    assert!(recipient.starts_with("age1"), "{}", text(&out));
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let peek = Command::new("runuser")
        .args(["-u", "nobody", "--", "cat"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(!peek.status.success(), "nobody read the key");
    let other = scratch.join("other.txt");
    let out = crac.run(&["images", "keygen", "-o", other.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));

    let archive = scratch.join("web.crac.age");
    let out = run_umask_000(
        &crac,
        &[
            "images",
            "export",
            "web",
            archive.to_str().unwrap(),
            "--encrypt-to",
            &recipient,
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout(&out).ends_with(", encrypted to 1 recipient\n"),
        "{}",
        text(&out)
    );
    assert_eq!(
        fs::metadata(&archive).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let bytes = fs::read(&archive).unwrap();
    assert!(bytes.starts_with(b"age-encryption.org/v1\n"));
    fs::remove_dir_all(crac.store.join("web")).unwrap();
    let empty = crac.listing();

    // Without the identity, with another one, with a key file others may read: refused.
    let out = crac.run(&["images", "import", archive.to_str().unwrap()]);
    refused_with(
        &out,
        &format!(
            "archive {} is encrypted (age); pass --identity FILE, a file with a secret key it \
             was encrypted to; nothing was imported",
            archive.display()
        ),
    );
    let out = crac.run(&[
        "images",
        "import",
        archive.to_str().unwrap(),
        "--identity",
        other.to_str().unwrap(),
    ]);
    refused_with(
        &out,
        &format!(
            "cannot decrypt archive {}: no identity in {} opens it: it was encrypted to other \
             recipients (use the identity file of one it was exported to), or its header was \
             modified; nothing was imported",
            archive.display(),
            other.display()
        ),
    );
    fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
    let out = crac.run(&[
        "images",
        "import",
        archive.to_str().unwrap(),
        "--identity",
        key.to_str().unwrap(),
    ]);
    refused_with(
        &out,
        &format!(
            "cannot use key file {}: {} holds secret keys but other users may read it (mode \
             640): chmod 600 it, and replace the keys if someone else may have read them; \
             nothing was imported",
            key.display(),
            key.display()
        ),
    );
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();

    // Tampered with on the way: one bit of the payload, or the end cut off.
    for (tag, contents) in [
        ("flipped", {
            let mut copy = bytes.clone();
            let middle = copy.len() / 2;
            copy[middle] ^= 0x01;
            copy
        }),
        ("cut", bytes[..bytes.len() - 1000].to_vec()),
    ] {
        let file = scratch.join(&format!("{tag}.age"));
        fs::write(&file, contents).unwrap();
        let (out, _) = run_watching(
            &crac,
            &[
                "images",
                "import",
                file.to_str().unwrap(),
                "--identity",
                key.to_str().unwrap(),
            ],
        );
        refused_with(
            &out,
            &format!(
                "archive {} is damaged: its encrypted data fails authentication (it was \
                 modified or truncated after it was encrypted); nothing was imported",
                file.display()
            ),
        );
        assert_eq!(crac.listing(), empty, "{tag}");
    }

    // The intact archive with its identity: imported, and it restores.
    let out = crac.run(&[
        "images",
        "import",
        archive.to_str().unwrap(),
        "--identity",
        key.to_str().unwrap(),
        "--name",
        "copy",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        stdout(&out),
        format!("imported {} (decrypted) as copy\n", archive.display())
    );
    let out = crac.run(&["restore", "copy", "--detach"]);
    assert!(out.status.success(), "{}", text(&out));
    restored.assert_serving(0);
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_recipients_file_encrypts_to_each_of_its_recipients() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("archive-recipients");
    let crac = Crac::new(&scratch);
    drop(crac.checkpoint_new(&scratch.join("web"), "web", &[]));
    let mut recipients = String::from("# the operators\n");
    let mut keys = Vec::new();
    for who in ["alice", "bob"] {
        let key = scratch.join(&format!("{who}.txt"));
        let out = crac.run(&["images", "keygen", "--output", key.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out));
        recipients.push_str(&stdout(&out));
        keys.push(key);
    }
    let list = scratch.join("recipients.txt");
    fs::write(&list, &recipients).unwrap();
    let archive = scratch.join("web.age");
    let out = crac.run(&[
        "images",
        "export",
        "web",
        archive.to_str().unwrap(),
        "--recipients-file",
        list.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout(&out).ends_with(", encrypted to 2 recipients\n"),
        "{}",
        text(&out)
    );
    for (key, name) in keys.iter().zip(["a", "b"]) {
        let out = crac.run(&[
            "images",
            "import",
            archive.to_str().unwrap(),
            "--identity",
            key.to_str().unwrap(),
            "--name",
            name,
        ]);
        assert!(out.status.success(), "{}", text(&out));
    }
    assert_eq!(crac.listing(), ["a", "b", "web"]);

    // A secret key where a recipient belongs is refused, and nothing is written.
    let secret = fs::read_to_string(&keys[0]).unwrap();
    let secret = secret.lines().last().unwrap();
    let out = crac.run(&[
        "images",
        "export",
        "web",
        scratch.join("x.age").to_str().unwrap(),
        "--encrypt-to",
        secret,
    ]);
    refused_with(
        &out,
        "a secret key (AGE-SECRET-KEY-1…) was given as a recipient: give its recipient, the \
         public key `age1…` that `crac images keygen` printed, and count the secret key as \
         exposed (other users can see command lines); nothing was exported",
    );
    assert!(!stderr(&out).contains(&secret[16..]), "{}", text(&out));
    assert!(!scratch.join("x.age").exists());
}

/// The entries of /dev/shm whose names start with `prefix`.
fn shm_entries(prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir("/dev/shm")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// Whether any file under `dir` holds `needle`.
fn tree_holds(dir: &Path, needle: &[u8]) -> bool {
    fs::read_dir(dir).unwrap().flatten().any(|e| {
        if e.file_type().unwrap().is_dir() {
            tree_holds(&e.path(), needle)
        } else {
            fs::read(e.path())
                .unwrap()
                .windows(needle.len())
                .any(|w| w == needle)
        }
    })
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn an_image_kept_encrypted_in_the_store_restores_from_memory_only() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("archive-sealed");
    let crac = Crac::new(&scratch);
    let target = Target::start(&scratch.join("t"), &[]);
    let token = target.assert_serving(0).token.to_le_bytes();
    let pid = target.pid.to_string();

    // The token, random and in memory only, is in a plain image: the search below can find it.
    let out = crac.run(&["checkpoint", &pid, "--name", "plain", "--leave-running"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(tree_holds(&crac.store.join("plain"), &token));

    let key = scratch.join("key.txt");
    let out = crac.run(&["images", "keygen", "--output", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let recipient = stdout(&out).trim().to_owned();
    let dumps = shm_entries("crac-dump.");
    let out = run_umask_000(
        &crac,
        &[
            "checkpoint",
            &pid,
            "--name",
            "web",
            "--encrypt-to",
            &recipient,
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let said = stdout(&out);
    assert!(
        said.contains("\n  encrypted at rest (age); the plaintext dump, on a tmpfs, is gone\n"),
        "{said}"
    );
    assert!(
        said.ends_with("restore it with: crac restore web --identity FILE\n"),
        "{said}"
    );
    let restored = Target::restored(&target);
    target.reap_dumped();
    assert_eq!(
        shm_entries("crac-dump."),
        dumps,
        "the plaintext dump is left"
    );

    // The store holds the encrypted image only, private, and not the memory's contents.
    let web = crac.store.join("web");
    let files: Vec<String> = fs::read_dir(&web)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files, ["crac-image.age"]);
    assert_eq!(
        fs::metadata(web.join("crac-image.age"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert!(fs::read(web.join("crac-image.age"))
        .unwrap()
        .starts_with(b"age-encryption.org/v1\n"));
    assert!(
        !tree_holds(&web, &token),
        "the token is in the store in plain"
    );
    let out = crac.run(&["images", "list"]);
    assert!(
        stdout(&out).contains("(encrypted at rest: crac restore NAME --identity FILE)"),
        "{}",
        text(&out)
    );

    // crac run would start cold and self-checkpoint in plain over it: refused.
    let out = crac.run(&[
        "run",
        "--image",
        "web",
        "--",
        bin("crac-test-target").to_str().unwrap(),
    ]);
    refused_with(
        &out,
        "image web is kept encrypted (crac checkpoint --encrypt-to), which crac run does not \
         restore, and a cold start's self-checkpoint would replace it with an unencrypted one: \
         restore it with `crac restore web --identity FILE`, or give crac run another --image",
    );

    let out = crac.run(&["images", "verify", "web"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).starts_with("crac: image web is kept encrypted: every file is checked"),
        "{}",
        text(&out)
    );

    let out = crac.run(&["restore", "web", "--detach"]);
    refused_with(
        &out,
        &format!(
            "the image at {} is encrypted (age); pass --identity FILE, a file with a secret key \
             it was encrypted to; nothing was restored",
            web.display()
        ),
    );
    let out = crac.run(&[
        "restore",
        "plain",
        "--detach",
        "--identity",
        key.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("is not encrypted, but --identity was given"),
        "{}",
        text(&out)
    );

    let restores = shm_entries("crac-restore.");
    let out = crac.run(&[
        "restore",
        "web",
        "--detach",
        "--identity",
        key.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout(&out).starts_with(&format!(
            "restored pid {} from {} in ",
            restored.pid,
            web.display()
        )),
        "{}",
        text(&out)
    );
    let state = restored.assert_serving(0);
    assert_eq!(state.token.to_le_bytes(), token, "not the same memory");

    // Exported, it is an encrypted archive already, which imports with the identity.
    let archive = scratch.join("web.age");
    let out = crac.run(&[
        "images",
        "export",
        "web",
        archive.to_str().unwrap(),
        "--encrypt-to",
        &recipient,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("is kept encrypted (to the recipients it was checkpointed for)"),
        "{}",
        text(&out)
    );
    let out = crac.run(&["images", "export", "web", archive.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        fs::read(&archive).unwrap(),
        fs::read(web.join("crac-image.age")).unwrap()
    );
    let out = crac.run(&[
        "images",
        "import",
        archive.to_str().unwrap(),
        "--name",
        "copy",
        "--identity",
        key.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = crac.run(&["images", "verify", "copy"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        shm_entries("crac-restore."),
        restores,
        "the decrypted image is left"
    );
    assert_eq!(files, ["crac-image.age"]);
}
