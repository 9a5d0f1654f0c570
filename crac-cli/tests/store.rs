//! The image store, image metadata and archives, on fake images (no CRIU needed).
//!
//! Every test works in its own scratch folder and names its store root explicitly: tests run
//! in parallel, so none of them sets `CRAC_STORE`.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crac_cli::archive::{self, ArchiveError};
use crac_cli::metadata::{
    self, DumpOptions, FileEntry, HookTiming, Metadata, MetadataError, Timings, METADATA_FILE,
};
use crac_cli::store::{self, Store, StoreError};

const PAGES_LEN: usize = 64 * 1024;

/// A folder under the system temporary folder, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "crac-store-test-{tag}-{}-{nanos}",
            std::process::id()
        ));
        fs::create_dir_all(&path).expect("create scratch folder");
        // Private whatever the umask: crac refuses to write under a folder others may write to
        // (under umask 000 this one would be 0777).
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).expect("chmod scratch");
        Scratch(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn store(&self) -> Store {
        Store::open(self.0.join("images"))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_millis(),
    )
    .expect("milliseconds fit in u64")
}

/// Incompressible bytes (a linear congruential generator), so that archive offsets map to
/// image data.
fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (state >> 16) as u8
        })
        .collect()
}

/// Writes a fake image into `dir`: three CRIU files, a log and the metadata.
fn make_image(dir: &Path, name: &str, pid: u32, created_unix_ms: u64) -> Metadata {
    fs::create_dir_all(dir).expect("create image folder");
    fs::write(dir.join("inventory.img"), [0x54u8; 64]).expect("write inventory.img");
    fs::write(dir.join("pages-1.img"), noise(PAGES_LEN, pid)).expect("write pages-1.img");
    fs::write(dir.join("core-1.img"), "core ".repeat(60)).expect("write core-1.img");
    fs::write(dir.join("dump.log"), "criu said things\n").expect("write dump.log");
    let files = metadata::list_image_files(dir).expect("list image files");
    let (kernel, arch) = metadata::this_machine();
    let meta = Metadata {
        format: metadata::FORMAT,
        name: name.to_owned(),
        pid,
        ns_pid: Some(pid),
        command_line: vec!["/usr/bin/service".to_owned(), "--port=8080".to_owned()],
        executable: "/usr/bin/service".to_owned(),
        created_unix_ms,
        image_bytes: files.iter().map(|f| f.size).sum(),
        criu_version: "4.2.1".to_owned(),
        kernel,
        arch,
        options: DumpOptions {
            leave_running: true,
            tcp_established: false,
            file_locks: false,
            timeout_secs: 30.0,
            extra_criu_args: vec![],
            network_lock: None,
            lazy_restore: false,
        },
        hooks: vec![HookTiming {
            pid,
            resource: "db-pool".to_owned(),
            phase: "before_checkpoint".to_owned(),
            duration_us: 1500,
        }],
        timings: Timings {
            hooks_ms: 1.5,
            dump_ms: 120.0,
            hash_ms: 0.0,
            total_ms: 130.0,
            criu: None,
        },
        crac_version: "0.1.0".to_owned(),
        files,
        executable_sha256: None,
        mapped_files: Vec::new(),
        cpu_features: Vec::new(),
        env_sha256: Default::default(),
        stdio_pipes: Default::default(),
        capabilities: Vec::new(),
        bounding_set: Vec::new(),
        written_files: Vec::new(),
    };
    metadata::write(dir, &meta).expect("write metadata");
    meta
}

/// Adds a fake image to `store` the way `crac checkpoint` does.
fn add_image(store: &Store, name: &str, pid: u32, created_unix_ms: u64) -> PathBuf {
    let mut staging = store.begin(name).expect("begin");
    make_image(staging.path(), name, pid, created_unix_ms);
    staging.commit(false).expect("commit")
}

/// Everything in the store's root folder, hidden folders included.
fn root_contents(store: &Store) -> BTreeSet<String> {
    match fs::read_dir(store.root()) {
        Ok(read) => read
            .map(|e| {
                e.expect("read store root")
                    .file_name()
                    .into_string()
                    .expect("UTF-8 name")
            })
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

fn names(store: &Store) -> Vec<String> {
    store
        .list()
        .expect("list")
        .into_iter()
        .map(|e| e.name)
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// Every file of an image folder and its bytes.
fn folder_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(dir)
        .expect("read image folder")
        .map(|e| {
            let e = e.expect("read image folder");
            let name = e.file_name().into_string().expect("UTF-8 name");
            let bytes = fs::read(e.path()).expect("read image file");
            (name, bytes)
        })
        .collect();
    files.sort();
    files
}

const NAME_RULE: &str =
    "use 1 to 100 letters, digits, '.', '_' or '-', not starting with '.' or '-'";

#[test]
fn names_are_validated_with_the_reason() {
    for good in ["web", "a", "web-1.2_x", "0", &"a".repeat(100)] {
        assert!(
            store::validate_name(good).is_ok(),
            "{good:?} should be valid"
        );
        assert!(
            Store::validate_name(good).is_ok(),
            "{good:?} should be valid"
        );
    }
    let long = "a".repeat(101);
    let cases = [
        ("", "it is empty"),
        ("a/b", "'/' is not allowed"),
        ("a b", "' ' is not allowed"),
        ("héllo", "'é' is not allowed"),
        (".hidden", "it starts with '.'"),
        ("..", "it starts with '.'"),
        ("-x", "it starts with '-'"),
        (long.as_str(), "it is 101 characters long"),
    ];
    for (bad, reason) in cases {
        let err = store::validate_name(bad).expect_err(bad);
        assert!(matches!(err, StoreError::InvalidName { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("invalid image name {bad:?}: {reason}; {NAME_RULE}")
        );
    }
}

#[test]
fn staging_commit_moves_the_image_into_place() {
    let scratch = Scratch::new("commit");
    let store = scratch.store();
    let mut staging = store.begin("web").expect("begin");
    assert_eq!(staging.name(), "web");
    let staging_path = staging.path().to_owned();
    let staging_name = staging_path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("staging name")
        .to_owned();
    assert!(
        staging_name.starts_with(&format!(".staging-web-{}-", std::process::id())),
        "{staging_name}"
    );
    assert_eq!(staging_path.parent(), Some(store.root()));
    let mode = fs::metadata(store.root())
        .expect("root")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    make_image(&staging_path, "web", 7, 1000);
    assert!(names(&store).is_empty(), "a staging image is not listed");

    let path = staging.commit(false).expect("commit");
    assert_eq!(path, store.root().join("web"));
    assert!(!staging_path.exists());
    assert_eq!(root_contents(&store), set(&["web"]));
    assert_eq!(metadata::read(&path).expect("metadata").pid, 7);
    assert_eq!(store.resolve("web").expect("resolve"), path);
}

#[test]
fn commit_refuses_an_existing_name_unless_replacing() {
    let scratch = Scratch::new("replace");
    let store = scratch.store();
    add_image(&store, "web", 1, 1000);

    let mut staging = store.begin("web").expect("begin");
    make_image(staging.path(), "web", 2, 2000);
    let err = staging.commit(false).expect_err("name taken");
    drop(staging);
    assert!(matches!(err, StoreError::Exists { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "an image named web already exists: use --replace or another --name"
    );
    assert_eq!(
        root_contents(&store),
        set(&["web"]),
        "the staging folder went"
    );
    let dir = store.root().join("web");
    assert_eq!(metadata::read(&dir).expect("metadata").pid, 1);

    let mut staging = store.begin("web").expect("begin");
    make_image(staging.path(), "web", 3, 3000);
    assert_eq!(staging.commit(true).expect("replace"), dir);
    assert_eq!(metadata::read(&dir).expect("metadata").pid, 3);
    assert_eq!(
        fs::read(dir.join("pages-1.img")).expect("pages"),
        noise(PAGES_LEN, 3)
    );
    assert_eq!(root_contents(&store), set(&["web"]), "the old image went");
    assert_eq!(
        store.check_absent("web").expect_err("taken").to_string(),
        "an image named web already exists: use --replace or another --name"
    );
    assert!(store.check_absent("api").is_ok());
}

#[test]
fn dropping_an_uncommitted_staging_removes_it() {
    let scratch = Scratch::new("drop");
    let store = scratch.store();
    add_image(&store, "kept", 1, 1000);
    let staging = store.begin("web").expect("begin");
    make_image(staging.path(), "web", 2, 2000);
    assert_eq!(root_contents(&store).len(), 2);
    drop(staging);
    assert_eq!(root_contents(&store), set(&["kept"]));
}

#[test]
fn clean_stale_staging_removes_dead_processes_folders_only() {
    let scratch = Scratch::new("stale");
    let store = scratch.store();
    add_image(&store, "web", 1, 1000);
    // Above the kernel's PID limit (2^22), so never a live process.
    let dead = 99_999_999;
    let live = std::process::id();
    let root = store.root();
    make_image(&root.join(format!(".staging-web-{dead}-1")), "web", 2, 2000);
    make_image(
        &root.join(format!(".removing-old-{dead}-2")),
        "old",
        3,
        3000,
    );
    make_image(&root.join(format!(".old-web-{dead}-3")), "web", 4, 4000);
    make_image(&root.join(format!(".old-gone-{dead}-4")), "gone", 5, 5000);
    make_image(&root.join(format!(".staging-api-{live}-5")), "api", 6, 6000);
    fs::create_dir(root.join(".other")).expect("mkdir");

    let mut removed = store.clean_stale_staging().expect("clean");
    removed.sort();
    let mut expected = vec![
        root.join(format!(".old-web-{dead}-3")),
        root.join(format!(".removing-old-{dead}-2")),
        root.join(format!(".staging-web-{dead}-1")),
    ];
    expected.sort();
    assert_eq!(removed, expected);
    assert_eq!(
        root_contents(&store),
        set(&[".other", &format!(".staging-api-{live}-5"), "gone", "web"])
    );
    // The replaced image whose replacement never arrived is back under its name.
    assert_eq!(metadata::read(&root.join("gone")).expect("metadata").pid, 5);
    assert_eq!(metadata::read(&root.join("web")).expect("metadata").pid, 1);
    assert!(store.clean_stale_staging().expect("clean").is_empty());
}

#[test]
fn list_is_ordered_by_creation_then_name_and_skips_non_images() {
    let scratch = Scratch::new("list");
    let store = scratch.store();
    assert!(store.list().expect("missing root").is_empty());

    add_image(&store, "c", 1, 3000);
    add_image(&store, "b", 2, 1000);
    add_image(&store, "a", 3, 1000);
    // A corrupt image falls back to its folder's modification time: now, the newest.
    let corrupt = store.root().join("z");
    make_image(&corrupt, "z", 4, 0);
    fs::write(corrupt.join(METADATA_FILE), "{").expect("corrupt");
    // Not images: a plain file, a hidden folder, a folder with a non-image name, a link.
    fs::write(store.root().join("notes.txt"), "x").expect("file");
    fs::create_dir(store.root().join(".staging-x-1-1")).expect("hidden");
    fs::create_dir(store.root().join("has space")).expect("odd name");
    std::os::unix::fs::symlink(store.root().join("c"), store.root().join("link")).expect("link");

    let entries = store.list().expect("list");
    let order: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(order, ["a", "b", "c", "z"]);
    let a = &entries[0];
    assert_eq!(a.path, store.root().join("a"));
    assert_eq!(a.created_unix_ms, 1000);
    assert_eq!(a.metadata.as_ref().expect("metadata").pid, 3);
    let on_disk: u64 = fs::read_dir(&a.path)
        .expect("read")
        .map(|e| e.expect("entry").metadata().expect("stat").len())
        .sum();
    assert_eq!(a.bytes, on_disk);
    assert!(a.bytes > PAGES_LEN as u64);
    let z = &entries[3];
    assert!(matches!(z.metadata, Err(MetadataError::Corrupt { .. })));
    assert!(z.created_unix_ms + 60_000 > now_ms(), "mtime fallback");
}

#[test]
fn remove_deletes_one_image_and_names_unknown_ones() {
    let scratch = Scratch::new("rm");
    let store = scratch.store();
    add_image(&store, "a", 1, 1000);
    add_image(&store, "b", 2, 2000);
    let corrupt = store.root().join("broken");
    make_image(&corrupt, "broken", 3, 3000);
    fs::write(corrupt.join(METADATA_FILE), "not json").expect("corrupt");

    store.remove("a").expect("rm a");
    store.remove("broken").expect("rm broken");
    assert_eq!(root_contents(&store), set(&["b"]));
    let err = store.remove("a").expect_err("gone");
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "no image named a in {} (see `crac images list`)",
            store.root().display()
        )
    );
    assert!(matches!(
        store.remove("../b"),
        Err(StoreError::InvalidName { .. })
    ));
    assert_eq!(root_contents(&store), set(&["b"]));
}

#[test]
fn resolve_takes_names_and_folders() {
    let scratch = Scratch::new("resolve");
    let store = scratch.store();
    let web = add_image(&store, "web", 1, 1000);
    assert_eq!(store.resolve("web").expect("name"), web);
    let by_path = web.to_str().expect("UTF-8 path");
    assert_eq!(store.resolve(by_path).expect("path"), web);
    // A link in the store is not an image, by name; by path it is followed.
    let link = store.root().join("link");
    std::os::unix::fs::symlink(&web, &link).expect("link");
    assert!(matches!(
        store.resolve("link"),
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(
        store
            .resolve(link.to_str().expect("UTF-8 path"))
            .expect("path"),
        link
    );

    let err = store.resolve("api").expect_err("no such image");
    assert_eq!(
        err.to_string(),
        format!(
            "no image named api in {} (see `crac images list`)",
            store.root().display()
        )
    );
    let missing = scratch.path().join("nowhere");
    let err = store
        .resolve(missing.to_str().expect("UTF-8 path"))
        .expect_err("no such folder");
    assert_eq!(
        err.to_string(),
        format!(
            "no image folder at {} (No such file or directory)",
            missing.display()
        )
    );
    let file = web.join("core-1.img");
    let err = store
        .resolve(file.to_str().expect("UTF-8 path"))
        .expect_err("a file");
    assert_eq!(
        err.to_string(),
        format!("no image folder at {} (Not a directory)", file.display())
    );
}

#[test]
fn du_counts_images_and_working_folders() {
    let scratch = Scratch::new("du");
    let store = scratch.store();
    assert_eq!(
        store.du().expect("du of nothing"),
        store::DiskUsage::default()
    );
    let old = add_image(&store, "old", 1, 1000);
    let new = add_image(&store, "new", 2, 2000);
    let staging = store.begin("next").expect("begin");
    fs::write(staging.path().join("pages-1.img"), [0u8; 100]).expect("write");

    let size = |dir: &Path| -> u64 {
        fs::read_dir(dir)
            .expect("read")
            .map(|e| e.expect("entry").metadata().expect("stat").len())
            .sum()
    };
    let usage = store.du().expect("du");
    assert_eq!(
        usage.images,
        vec![
            ("old".to_owned(), size(&old)),
            ("new".to_owned(), size(&new))
        ]
    );
    assert_eq!(usage.staging, 100);
    assert_eq!(usage.total, size(&old) + size(&new) + 100);
}

#[test]
fn prune_keeps_the_newest() {
    let scratch = Scratch::new("prune-keep");
    let store = scratch.store();
    for i in 0..5 {
        add_image(&store, &format!("img{i}"), i + 1, 1000 * u64::from(i + 1));
    }
    let removed = store.prune(Some(2), None).expect("prune");
    assert_eq!(removed, ["img2", "img1", "img0"]);
    assert_eq!(names(&store), ["img3", "img4"]);
    assert!(store.prune(Some(2), None).expect("prune").is_empty());
    assert_eq!(store.prune(Some(0), None).expect("prune"), ["img4", "img3"]);
    assert!(root_contents(&store).is_empty());
}

#[test]
fn prune_removes_images_older_than_an_age() {
    let scratch = Scratch::new("prune-age");
    let store = scratch.store();
    let now = now_ms();
    let day = 24 * 60 * 60 * 1000;
    add_image(&store, "ten-days", 1, now - 10 * day);
    add_image(&store, "three-days", 2, now - 3 * day);
    add_image(&store, "an-hour", 3, now - 60 * 60 * 1000);
    add_image(&store, "a-minute", 4, now - 60 * 1000);
    let removed = store
        .prune(None, Some(Duration::from_secs(2 * 24 * 60 * 60)))
        .expect("prune");
    assert_eq!(removed, ["three-days", "ten-days"]);
    assert_eq!(names(&store), ["an-hour", "a-minute"]);
}

#[test]
fn prune_with_both_keeps_the_newest_whatever_their_age() {
    let scratch = Scratch::new("prune-both");
    let store = scratch.store();
    let now = now_ms();
    let day = 24 * 60 * 60 * 1000;
    add_image(&store, "d10", 1, now - 10 * day);
    add_image(&store, "d9", 2, now - 9 * day);
    add_image(&store, "d8", 3, now - 8 * day);
    add_image(&store, "h1", 4, now - 60 * 60 * 1000);
    let removed = store
        .prune(Some(3), Some(Duration::from_secs(2 * 24 * 60 * 60)))
        .expect("prune");
    assert_eq!(removed, ["d10"]);
    assert_eq!(names(&store), ["d9", "d8", "h1"]);

    let err = store.prune(None, None).expect_err("no rule");
    assert_eq!(
        err.to_string(),
        "prune needs a number of images to keep, an age, or both"
    );
    assert_eq!(names(&store), ["d9", "d8", "h1"]);
}

#[test]
fn parse_age_accepts_seconds_minutes_hours_days() {
    let ok = [
        ("90s", 90),
        ("30m", 30 * 60),
        ("12h", 12 * 60 * 60),
        ("7d", 7 * 24 * 60 * 60),
        ("0s", 0),
    ];
    for (text, secs) in ok {
        assert_eq!(
            store::parse_age(text),
            Ok(Duration::from_secs(secs)),
            "{text}"
        );
    }
    for bad in ["", "7", "d", "7w", "1.5h", "-1d", " 7d", "7D", "7dd", "é"] {
        assert_eq!(
            store::parse_age(bad),
            Err(format!(
                "invalid age {bad:?}: use a whole number followed by s, m, h or d \
                 (e.g. 90s, 30m, 12h, 7d)"
            )),
            "{bad}"
        );
    }
    assert_eq!(
        store::parse_age("99999999999999999999d"),
        Err("age \"99999999999999999999d\" is too large".to_owned())
    );
}

#[test]
fn metadata_round_trips_and_lists_only_image_files() {
    let scratch = Scratch::new("meta");
    let dir = scratch.path().join("img");
    let meta = make_image(&dir, "img", 42, 1234);
    assert_eq!(
        meta.files,
        vec![
            FileEntry {
                name: "core-1.img".to_owned(),
                size: 300,
                sha256: None
            },
            FileEntry {
                name: "inventory.img".to_owned(),
                size: 64,
                sha256: None
            },
            FileEntry {
                name: "pages-1.img".to_owned(),
                size: PAGES_LEN as u64,
                sha256: None
            },
        ]
    );
    assert_eq!(metadata::read(&dir).expect("read"), meta);
    let mode = fs::metadata(dir.join(METADATA_FILE))
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        set(&[
            "core-1.img",
            "crac-meta.json",
            "dump.log",
            "inventory.img",
            "pages-1.img"
        ]),
        fs::read_dir(&dir)
            .expect("read")
            .map(|e| e.expect("entry").file_name().into_string().expect("UTF-8"))
            .collect::<BTreeSet<_>>(),
        "no temporary file left"
    );

    // A newer crac's extra fields are ignored.
    let mut value = serde_json::to_value(&meta).expect("to json");
    value["restore_hints"] = serde_json::json!({"cpu": "any"});
    metadata::seal(&mut value);
    fs::write(dir.join(METADATA_FILE), value.to_string()).expect("write");
    assert_eq!(metadata::read(&dir).expect("read"), meta);
}

#[test]
fn metadata_errors_say_what_is_wrong_and_what_to_do() {
    let scratch = Scratch::new("meta-errors");
    let dir = scratch.path().join("web");
    fs::create_dir(&dir).expect("mkdir");
    let err = metadata::read(&dir).expect_err("missing");
    assert!(matches!(err, MetadataError::Missing { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "no crac-meta.json in {}: not an image made by `crac checkpoint` (or it was deleted)",
            dir.display()
        )
    );

    fs::write(dir.join(METADATA_FILE), "{not json").expect("write");
    let err = metadata::read(&dir).expect_err("corrupt");
    assert!(matches!(err, MetadataError::Corrupt { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "crac-meta.json in {} is corrupt (key must be a string at line 1 column 2): \
             remove the image with `crac images rm web`",
            dir.display()
        )
    );
    assert!(
        std::error::Error::source(&err).is_some(),
        "the JSON error is kept"
    );

    let meta = make_image(&dir, "web", 1, 1000);
    let mut value = serde_json::to_value(&meta).expect("to json");
    value.as_object_mut().expect("object").remove("pid");
    metadata::seal(&mut value);
    fs::write(dir.join(METADATA_FILE), value.to_string()).expect("write");
    let err = metadata::read(&dir).expect_err("no pid");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "crac-meta.json in {} is corrupt (missing field `pid` at line 1 column ",
            dir.display()
        )) && text.ends_with("): remove the image with `crac images rm web`"),
        "{text}"
    );

    fs::write(
        dir.join(METADATA_FILE),
        r#"{"format": 2, "crac_version": "9.1.0", "renamed": true}"#,
    )
    .expect("write");
    let err = metadata::read(&dir).expect_err("newer");
    assert!(
        matches!(err, MetadataError::UnsupportedFormat { found: 2, .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "crac-meta.json in {} has format 2, but this crac ({}) reads only format 1: \
             use crac 9.1.0 or newer",
            dir.display(),
            env!("CARGO_PKG_VERSION")
        )
    );
}

#[test]
fn validate_lists_every_missing_and_truncated_file() {
    let scratch = Scratch::new("validate");
    let dir = scratch.path().join("web");
    let meta = make_image(&dir, "web", 1, 1000);
    assert!(metadata::validate(&dir, &meta).is_ok());

    OpenOptions::new()
        .write(true)
        .open(dir.join("pages-1.img"))
        .and_then(|f| f.set_len(4096))
        .expect("truncate");
    fs::remove_file(dir.join("core-1.img")).expect("remove");
    let err = metadata::validate(&dir, &meta).expect_err("damaged");
    assert_eq!(err.problems().len(), 2);
    assert_eq!(err.dir(), dir);
    assert_eq!(
        err.to_string(),
        format!(
            "image {} cannot be restored: image file core-1.img is missing; \
             image file pages-1.img is truncated: 4096 bytes, expected {PAGES_LEN} \
             (the image is damaged: make it again with `crac checkpoint`)",
            dir.display()
        )
    );
}

#[test]
fn validate_refuses_a_foreign_architecture_and_a_missing_inventory() {
    let scratch = Scratch::new("validate-arch");
    let dir = scratch.path().join("web");
    let mut meta = make_image(&dir, "web", 1, 1000);
    let here = std::env::consts::ARCH;
    let other = if here == "aarch64" {
        "x86_64"
    } else {
        "aarch64"
    };
    meta.arch = other.to_owned();
    let err = metadata::validate(&dir, &meta).expect_err("foreign");
    assert_eq!(
        err.to_string(),
        format!(
            "image {} cannot be restored: image was made on {other}, this machine is {here} \
             (restore it on a machine of that architecture)",
            dir.display()
        )
    );

    meta.arch = here.to_owned();
    meta.files.retain(|f| f.name != "inventory.img");
    let err = metadata::validate(&dir, &meta).expect_err("no inventory");
    assert_eq!(
        err.to_string(),
        format!(
            "image {} cannot be restored: incomplete image: no inventory.img \
             (the image is damaged: make it again with `crac checkpoint`)",
            dir.display()
        )
    );
    meta.files.clear();
    assert_eq!(
        metadata::validate(&dir, &meta)
            .expect_err("empty")
            .problems()
            .len(),
        1
    );
}

#[test]
fn export_then_import_gives_identical_bytes() {
    let scratch = Scratch::new("roundtrip");
    let here = Store::open(scratch.path().join("here"));
    let there = Store::open(scratch.path().join("there"));
    let original = add_image(&here, "web", 7, 1000);
    let file = scratch.path().join("web.crac.tar.zst");

    let summary = archive::export(&here, "web", &file).expect("export");
    let exported: Vec<(String, Vec<u8>)> = folder_bytes(&original)
        .into_iter()
        .filter(|(name, _)| name != "dump.log")
        .collect();
    assert_eq!(summary.files, 4);
    assert_eq!(
        summary.bytes_in,
        exported.iter().map(|(_, b)| b.len() as u64).sum::<u64>()
    );
    assert_eq!(summary.bytes_out, fs::metadata(&file).expect("stat").len());
    let mode = fs::metadata(&file).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        fs::read_dir(scratch.path())
            .expect("read")
            .map(|e| e.expect("entry").file_name().into_string().expect("UTF-8"))
            .collect::<BTreeSet<_>>(),
        set(&["here", "web.crac.tar.zst"]),
        "no temporary file beside the archive"
    );

    assert_eq!(archive::import(&there, &file, None).expect("import"), "web");
    assert_eq!(folder_bytes(&there.root().join("web")), exported);
    assert_eq!(root_contents(&there), set(&["web"]));

    // Under another name, beside the original: only the metadata's name changes.
    assert_eq!(
        archive::import(&here, &file, Some("web2")).expect("import as web2"),
        "web2"
    );
    let copy = here.root().join("web2");
    let meta = metadata::read(&copy).expect("metadata");
    assert_eq!(meta.name, "web2");
    assert_eq!(
        meta,
        Metadata {
            name: "web2".to_owned(),
            ..metadata::read(&original).expect("metadata")
        }
    );
    for (name, bytes) in exported.iter().filter(|(n, _)| n != METADATA_FILE) {
        assert_eq!(&fs::read(copy.join(name)).expect("read"), bytes, "{name}");
    }
}

/// Decodes an archive with the zstd and tar crates directly: (path, bytes) per entry.
fn unpack(file: &Path) -> Vec<(String, Vec<u8>)> {
    let decoder = zstd::Decoder::new(File::open(file).expect("open")).expect("zstd");
    let mut archive = tar::Archive::new(decoder);
    archive
        .entries()
        .expect("entries")
        .map(|e| {
            let mut e = e.expect("entry");
            let path = String::from_utf8(e.path_bytes().into_owned()).expect("UTF-8");
            let mut bytes = Vec::new();
            e.read_to_end(&mut bytes).expect("read entry");
            (path, bytes)
        })
        .collect()
}

/// One archive entry to [`pack`]: path, type, contents.
type RawEntry<'a> = (&'a str, tar::EntryType, &'a [u8]);

/// Writes entries as a zstd-compressed tar, paths set byte for byte (the tar crate's own
/// path setter refuses `..`, which these tests need).
fn pack(file: &Path, entries: &[RawEntry<'_>]) {
    let encoder = zstd::Encoder::new(File::create(file).expect("create"), 3).expect("zstd");
    let mut builder = tar::Builder::new(encoder);
    for (path, kind, bytes) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(*kind);
        header.set_size(bytes.len() as u64);
        header.set_mode(0o600);
        let name = &mut header.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        if *kind == tar::EntryType::Symlink {
            header.set_link_name("/etc/passwd").expect("link name");
        }
        header.set_cksum();
        builder.append(&header, *bytes).expect("append");
    }
    builder
        .into_inner()
        .expect("tar")
        .finish()
        .expect("zstd finish");
}

#[test]
fn the_manifest_comes_first_and_lists_every_file() {
    let scratch = Scratch::new("manifest");
    let store = scratch.store();
    let dir = add_image(&store, "web", 7, 1000);
    let file = scratch.path().join("web.tar.zst");
    archive::export(&store, "web", &file).expect("export");

    let entries = unpack(&file);
    let paths: Vec<&str> = entries.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "crac-archive.json",
            "image/crac-meta.json",
            "image/core-1.img",
            "image/inventory.img",
            "image/pages-1.img"
        ]
    );
    let manifest: serde_json::Value = serde_json::from_slice(&entries[0].1).expect("json");
    assert_eq!(manifest["format"], 1);
    assert_eq!(manifest["name"], "web");
    let files = manifest["files"].as_array().expect("files");
    assert_eq!(files.len(), 4);
    for (listed, (path, bytes)) in files.iter().zip(&entries[1..]) {
        assert_eq!(
            format!("image/{}", listed["name"].as_str().expect("name")),
            *path
        );
        assert_eq!(listed["size"], bytes.len() as u64);
        use sha2::Digest;
        let digest: String = sha2::Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(listed["sha256"], digest.as_str());
        let name = path.strip_prefix("image/").expect("prefix");
        assert_eq!(&fs::read(dir.join(name)).expect("read"), bytes);
    }
}

#[test]
fn a_modified_file_is_named_and_nothing_is_imported() {
    let scratch = Scratch::new("checksum");
    let here = Store::open(scratch.path().join("here"));
    let there = Store::open(scratch.path().join("there"));
    add_image(&there, "kept", 1, 1000);
    add_image(&here, "web", 7, 1000);
    let good = scratch.path().join("good.tar.zst");
    archive::export(&here, "web", &good).expect("export");

    // The same archive with one byte of pages-1.img changed, repacked.
    let mut entries = unpack(&good);
    let pages = entries
        .iter_mut()
        .find(|(p, _)| p == "image/pages-1.img")
        .expect("pages entry");
    pages.1[1000] ^= 0x01;
    let bad = scratch.path().join("bad.tar.zst");
    let repacked: Vec<RawEntry<'_>> = entries
        .iter()
        .map(|(p, b)| (p.as_str(), tar::EntryType::Regular, b.as_slice()))
        .collect();
    pack(&bad, &repacked);

    let before = root_contents(&there);
    let err = archive::import(&there, &bad, None).expect_err("modified");
    assert!(matches!(err, ArchiveError::Damaged { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "archive {} is damaged: pages-1.img does not match its checksum (the file was \
             modified or corrupted in transit); nothing was imported",
            bad.display()
        )
    );
    assert_eq!(root_contents(&there), before);
}

#[test]
fn a_flipped_byte_or_a_cut_archive_is_refused_and_nothing_is_imported() {
    let scratch = Scratch::new("damaged");
    let here = Store::open(scratch.path().join("here"));
    let there = Store::open(scratch.path().join("there"));
    add_image(&there, "kept", 1, 1000);
    add_image(&here, "web", 7, 1000);
    let good = scratch.path().join("good.tar.zst");
    archive::export(&here, "web", &good).expect("export");
    let bytes = fs::read(&good).expect("read");
    let before = root_contents(&there);

    let mut flipped = bytes.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0xff;
    let damaged = |name: &str, contents: &[u8]| {
        let file = scratch.path().join(name);
        fs::write(&file, contents).expect("write");
        let err = archive::import(&there, &file, None).expect_err(name);
        assert!(
            matches!(err, ArchiveError::Damaged { .. }),
            "{name}: {err:?}"
        );
        assert_eq!(root_contents(&there), before, "{name}: store unchanged");
        (file, err.to_string())
    };

    // The middle of the archive is incompressible page data, stored as is: the flip lands in
    // pages-1.img.
    let (file, text) = damaged("flipped.tar.zst", &flipped);
    assert_eq!(
        text,
        format!(
            "archive {} is damaged: pages-1.img does not match its checksum (the file was \
             modified or corrupted in transit); nothing was imported",
            file.display()
        )
    );
    let (file, text) = damaged("half.tar.zst", &bytes[..bytes.len() / 2]);
    assert_eq!(
        text,
        format!(
            "archive {} is damaged: the compressed data is corrupt or truncated \
             (incomplete frame); nothing was imported",
            file.display()
        )
    );
    // Only zstd's closing checksum is cut: every file arrived, the stream did not end.
    let (file, text) = damaged("tail.tar.zst", &bytes[..bytes.len() - 4]);
    assert_eq!(
        text,
        format!(
            "archive {} is damaged: the compressed data is corrupt or truncated \
             (incomplete frame); nothing was imported",
            file.display()
        )
    );
    let (_, text) = damaged("empty.tar.zst", b"");
    assert!(
        text.contains("is damaged: the compressed data is corrupt or truncated"),
        "{text}"
    );

    // And the intact archive still imports.
    assert_eq!(archive::import(&there, &good, None).expect("import"), "web");
}

#[test]
fn entries_that_are_not_listed_plain_files_are_refused() {
    let scratch = Scratch::new("refused");
    let here = scratch.store();
    let there = Store::open(scratch.path().join("there"));
    add_image(&here, "web", 7, 1000);
    let good = scratch.path().join("good.tar.zst");
    archive::export(&here, "web", &good).expect("export");
    let entries = unpack(&good);
    let regular: Vec<RawEntry<'_>> = entries
        .iter()
        .map(|(p, b)| (p.as_str(), tar::EntryType::Regular, b.as_slice()))
        .collect();

    let cases: Vec<(&str, RawEntry<'_>, &str)> = vec![
        (
            "dotdot",
            ("image/../evil", tar::EntryType::Regular, b"x"),
            "is not a file directly under image/",
        ),
        (
            "absolute",
            ("/etc/evil", tar::EntryType::Regular, b"x"),
            "is not a file directly under image/",
        ),
        (
            "nested",
            ("image/sub/core-1.img", tar::EntryType::Regular, b"x"),
            "is not a file directly under image/",
        ),
        (
            "symlink",
            ("image/extra.img", tar::EntryType::Symlink, b""),
            "is not a regular file (tar type Symlink)",
        ),
        (
            "folder",
            ("image/", tar::EntryType::Directory, b""),
            "is not a regular file (tar type Directory)",
        ),
        (
            "unlisted",
            ("image/extra.img", tar::EntryType::Regular, b"x"),
            "is not listed in crac-archive.json",
        ),
    ];
    for (tag, evil, reason) in cases {
        // The bad entry right after the manifest.
        let mut contents = vec![regular[0], evil];
        contents.extend_from_slice(&regular[1..]);
        let file = scratch.path().join(format!("{tag}.tar.zst"));
        pack(&file, &contents);
        let err = archive::import(&there, &file, None).expect_err(tag);
        assert!(
            matches!(err, ArchiveError::Refused { .. }),
            "{tag}: {err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "archive {} contains {:?}, which {reason}; nothing was imported",
                file.display(),
                evil.0
            ),
            "{tag}"
        );
        assert!(root_contents(&there).is_empty(), "{tag}: store unchanged");
    }

    let mut twice = regular.clone();
    twice.push(regular[2]);
    let file = scratch.path().join("twice.tar.zst");
    pack(&file, &twice);
    let err = archive::import(&there, &file, None).expect_err("twice");
    assert_eq!(
        err.to_string(),
        format!(
            "archive {} contains \"{}\", which appears twice; nothing was imported",
            file.display(),
            regular[2].0
        )
    );

    let file = scratch.path().join("no-manifest.tar.zst");
    pack(&file, &regular[1..]);
    let err = archive::import(&there, &file, None).expect_err("no manifest");
    assert_eq!(
        err.to_string(),
        format!(
            "{} is not a crac image archive: it does not start with crac-archive.json; \
             nothing was imported",
            file.display()
        )
    );

    let file = scratch.path().join("missing.tar.zst");
    pack(&file, &regular[..regular.len() - 1]);
    let err = archive::import(&there, &file, None).expect_err("missing file");
    assert_eq!(
        err.to_string(),
        format!(
            "archive {} is damaged: pages-1.img is missing; nothing was imported",
            file.display()
        )
    );
    assert!(root_contents(&there).is_empty());
}

#[test]
fn import_refuses_an_existing_name() {
    let scratch = Scratch::new("import-exists");
    let store = scratch.store();
    let web = add_image(&store, "web", 7, 1000);
    let file = scratch.path().join("web.tar.zst");
    archive::export(&store, "web", &file).expect("export");
    let before = folder_bytes(&web);

    let err = archive::import(&store, &file, None).expect_err("exists");
    assert!(matches!(err, ArchiveError::Exists { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "an image named web already exists: import under another name with --name, or remove \
         the old one with `crac images rm web`; nothing was imported"
    );
    let err = archive::import(&store, &file, Some("../x")).expect_err("bad name");
    assert_eq!(
        err.to_string(),
        format!("invalid image name \"../x\": '/' is not allowed; {NAME_RULE}")
    );
    assert_eq!(root_contents(&store), set(&["web"]));
    assert_eq!(folder_bytes(&web), before);
}

#[test]
fn export_fails_cleanly() {
    let scratch = Scratch::new("export-fails");
    let store = scratch.store();
    let web = add_image(&store, "web", 7, 1000);
    let blocker = scratch.path().join("a-file");
    fs::write(&blocker, "not a folder").expect("write");

    let target = blocker.join("web.tar.zst");
    let err = archive::export(&store, "web", &target).expect_err("unwritable");
    assert!(matches!(err, ArchiveError::Write { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "cannot write archive {} (Not a directory): choose a folder you can write to with \
             enough space; nothing was exported",
            target.display()
        )
    );

    let err = archive::export(&store, "api", &scratch.path().join("api.tar.zst"))
        .expect_err("no such image");
    assert_eq!(
        err.to_string(),
        format!(
            "no image named api in {} (see `crac images list`)",
            store.root().display()
        )
    );

    OpenOptions::new()
        .write(true)
        .open(web.join("pages-1.img"))
        .and_then(|f| f.set_len(4096))
        .expect("truncate");
    let target = scratch.path().join("web.tar.zst");
    let err = archive::export(&store, "web", &target).expect_err("damaged image");
    assert!(matches!(err, ArchiveError::Invalid { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "image {} cannot be restored: image file pages-1.img is truncated: 4096 bytes, \
             expected {PAGES_LEN} (the image is damaged: make it again with `crac checkpoint`); \
             nothing was exported",
            web.display()
        )
    );
    assert_eq!(
        fs::read_dir(scratch.path())
            .expect("read")
            .map(|e| e.expect("entry").file_name().into_string().expect("UTF-8"))
            .collect::<BTreeSet<_>>(),
        set(&["a-file", "images"]),
        "no archive and no temporary file"
    );
}

#[test]
fn an_unwritable_store_says_how_to_fix_it() {
    let scratch = Scratch::new("unwritable");
    // Root is not stopped by permissions; sysfs refuses new folders to everyone.
    let (root, locked) = if nix::unistd::geteuid().is_root() {
        (PathBuf::from("/sys/crac-store-test/images"), None)
    } else {
        let locked = scratch.path().join("locked");
        fs::create_dir(&locked).expect("mkdir");
        fs::set_permissions(&locked, fs::Permissions::from_mode(0o500)).expect("chmod");
        (locked.join("images"), Some(locked))
    };
    // What the file system says, to compare the wording with.
    let cause = fs::create_dir_all(&root).expect_err("the folder must not be writable");
    let errno = nix::errno::Errno::from_raw(cause.raw_os_error().expect("an OS error"));
    assert!(
        matches!(
            errno,
            nix::errno::Errno::EACCES | nix::errno::Errno::EPERM | nix::errno::Errno::EROFS
        ),
        "{errno:?}"
    );

    let store = Store::open(&root);
    let err = store.begin("web").expect_err("unwritable");
    assert!(matches!(err, StoreError::NotWritable { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "image store {} is not writable ({}): set CRAC_STORE to a writable folder or run as root",
            root.display(),
            errno.desc()
        )
    );
    if let Some(locked) = locked {
        fs::set_permissions(&locked, fs::Permissions::from_mode(0o700)).expect("chmod back");
    }
}

#[test]
fn an_image_cannot_be_resolved_until_committed() {
    let scratch = Scratch::new("whole");
    let store = scratch.store();
    let mut staging = store.begin("web").expect("begin");
    let mut f = File::create(staging.path().join("inventory.img")).expect("create");
    f.write_all(b"inventory").expect("write");
    drop(f);
    assert!(store.resolve("web").is_err());
    let path = staging.commit(false).expect("commit");
    assert_eq!(
        fs::read(path.join("inventory.img")).expect("read"),
        b"inventory"
    );
}

/// A dump CRIU finished (its `stats-dump` is there) whose crac was killed: what crac wrote
/// before CRIU ran is the pending file, and there is no metadata yet.
fn make_killed_dump(dir: &Path, name: &str, pid: u32, finished: bool) {
    let meta = make_image(dir, name, pid, 1000);
    fs::rename(dir.join(METADATA_FILE), dir.join(metadata::PENDING_FILE)).expect("pending file");
    if finished {
        fs::write(dir.join(metadata::DUMP_DONE_FILE), b"stats").expect("stats-dump");
    }
    assert_eq!(meta.pid, pid);
}

#[test]
fn recover_files_complete_dumps_and_removes_the_rest() {
    let scratch = Scratch::new("recover");
    let store = scratch.store();
    add_image(&store, "api", 1, 1000);
    let dead = 99_999_999;
    let root = store.root().to_owned();
    make_killed_dump(&root.join(format!(".staging-web-{dead}-1")), "web", 2, true);
    make_killed_dump(&root.join(format!(".staging-api-{dead}-2")), "api", 3, true);
    make_killed_dump(
        &root.join(format!(".staging-half-{dead}-3")),
        "half",
        4,
        false,
    );
    // An import killed half-way: metadata and CRIU's stats-dump came first, a page file not.
    let import = root.join(format!(".staging-imp-{dead}-4"));
    make_image(&import, "imp", 5, 1000);
    fs::write(import.join(metadata::DUMP_DONE_FILE), b"stats").expect("stats-dump");
    fs::remove_file(import.join("pages-1.img")).expect("a file missing");

    let recovery = store.recover().expect("recover");
    assert!(recovery.stuck.is_empty(), "{:?}", recovery.stuck);
    let mut names: Vec<(String, u32)> = recovery
        .recovered
        .iter()
        .map(|r| (r.name.clone(), r.pid))
        .collect();
    names.sort();
    // The image that had the name keeps it: a recovered image never replaces one.
    let api = store.resolve("api").expect("api");
    assert_eq!(metadata::read(&api).expect("api's metadata").pid, 1);
    assert_eq!(names.len(), 2);
    assert_eq!(names[1], ("web".to_owned(), 2));
    assert!(
        names[0].0.starts_with("api-recovered-") && names[0].1 == 3,
        "{names:?}"
    );
    let mut removed = recovery.removed.clone();
    removed.sort();
    assert_eq!(
        removed,
        [
            root.join(format!(".staging-half-{dead}-3")),
            root.join(format!(".staging-imp-{dead}-4")),
        ]
    );
    for (name, pid) in &names {
        let dir = store.resolve(name).expect("filed");
        let meta = metadata::read(&dir).expect("metadata");
        assert_eq!((&meta.name, meta.pid), (name, *pid));
        assert!(meta.files.iter().all(|f| f.sha256.is_some()), "{meta:?}");
        metadata::verify(&dir, &meta, metadata::Check::Full).expect("a recovered image verifies");
        assert!(!dir.join(metadata::PENDING_FILE).exists());
    }
    assert_eq!(store.list().expect("list").len(), 3);
}

#[test]
fn verify_trusts_only_files_unchanged_since_found_intact() {
    let scratch = Scratch::new("verify");
    let dir = scratch.path().join("img");
    let mut meta = make_image(&dir, "img", 7, 1000);
    metadata::hash_files(&dir, &mut meta.files).expect("hash");
    metadata::write(&dir, &meta).expect("metadata");
    metadata::verify(&dir, &meta, metadata::Check::Full).expect("intact");
    assert!(dir.join(metadata::VERIFIED_FILE).is_file());
    assert!(metadata::list_image_files(&dir)
        .expect("list")
        .iter()
        .all(|f| f.name != metadata::VERIFIED_FILE));

    // Same size, other content, written in place: the change time moved, so even a restore's
    // quick check reads the file again.
    let pages = dir.join("pages-1.img");
    let mut bytes = fs::read(&pages).expect("pages");
    bytes[10] ^= 0xff;
    fs::write(&pages, &bytes).expect("rewrite");
    for check in [metadata::Check::Changed, metadata::Check::Full] {
        let err = metadata::verify(&dir, &meta, check).expect_err("damaged");
        assert!(
            err.to_string().contains(
                "image file pages-1.img does not hold what was dumped (its SHA-256 differs)"
            ),
            "{err}"
        );
    }
}

#[test]
fn known_hashes_follow_the_files_they_describe() {
    let scratch = Scratch::new("known");
    let lib = scratch.path().join("libfoo.so");
    fs::write(&lib, b"version 1").expect("lib");
    let known_path = scratch.path().join(metadata::KNOWN_HASHES_FILE);
    let name = lib.display().to_string();

    let mut known = metadata::KnownHashes::load(&known_path);
    let (first, _) = known
        .hash(&name, File::open(&lib).expect("open"))
        .expect("hash");
    known.save(&known_path);
    let mut known = metadata::KnownHashes::load(&known_path);
    let (again, _) = known
        .hash(&name, File::open(&lib).expect("open"))
        .expect("hash");
    assert_eq!(again, first);

    // Same size, other content: the identity changed, so it is hashed anew.
    fs::write(&lib, b"version 2").expect("rewrite");
    let (changed, _) = known
        .hash(&name, File::open(&lib).expect("open"))
        .expect("hash");
    assert_ne!(changed, first);
    assert_eq!(
        changed,
        crac_cli::hashing::sha256_of(File::open(&lib).expect("open")).expect("sha")
    );

    // A file that is gone is forgotten.
    fs::remove_file(&lib).expect("remove");
    known.save(&known_path);
    let json = fs::read_to_string(&known_path).expect("saved");
    assert!(!json.contains("libfoo.so"), "{json}");
}

/// The metadata is covered by a digest of itself: an edit (here, of the pid and of a file's
/// recorded digest) reads as tampering, blamed on the metadata, not on the file it describes.
#[test]
fn metadata_that_does_not_match_its_digest_is_refused_as_tampered() {
    let scratch = Scratch::new("tampered");
    let dir = scratch.path().join("web");
    let mut meta = make_image(&dir, "web", 7, 1000);
    metadata::hash_files(&dir, &mut meta.files).expect("hash");
    metadata::write(&dir, &meta).expect("metadata");
    let sealed: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join(METADATA_FILE)).expect("read")).expect("JSON");
    assert_eq!(
        sealed[metadata::DIGEST_FIELD].as_str().map(str::len),
        Some(64),
        "{sealed}"
    );

    let tampered = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut value = sealed.clone();
        edit(&mut value);
        fs::write(dir.join(METADATA_FILE), value.to_string()).expect("write");
        metadata::read(&dir).expect_err("tampered").to_string()
    };
    let changed = format!(
        "crac-meta.json in {} does not match its digest: it was changed after the checkpoint \
         (by hand or by damage), so the image cannot be trusted; remove it with `crac images \
         rm web` and make it again with `crac checkpoint`",
        dir.display()
    );
    assert_eq!(tampered(&|v| v["pid"] = 1.into()), changed);
    assert_eq!(
        tampered(&|v| v["options"]["extra_criu_args"] = serde_json::json!(["--shell-job"])),
        changed
    );
    assert_eq!(
        tampered(&|v| v["files"][0]["sha256"] = "00".repeat(32).into()),
        changed,
        "a damaged digest is the metadata's fault, not the file's"
    );
    assert_eq!(
        tampered(&|v| {
            v.as_object_mut()
                .expect("object")
                .remove(metadata::DIGEST_FIELD);
        }),
        changed.replace("does not match its digest", "has no digest of itself")
    );

    // Layout and field order do not matter; the content does.
    let mut reordered = String::from("{");
    let fields = sealed.as_object().expect("object");
    for (i, (key, value)) in fields.iter().rev().enumerate() {
        if i > 0 {
            reordered.push_str(",\n  ");
        }
        reordered.push_str(&format!(
            "{}: {value}",
            serde_json::Value::from(key.as_str())
        ));
    }
    reordered.push('}');
    fs::write(dir.join(METADATA_FILE), reordered).expect("write");
    assert_eq!(metadata::read(&dir).expect("same content"), meta);
}

/// A store another user may write to may hold images they planted: nothing in it is listed,
/// resolved, filed, recovered or pruned, and the message says why.
#[test]
fn a_store_others_may_write_to_is_not_used() {
    let scratch = Scratch::new("open-store");
    let store = scratch.store();
    add_image(&store, "web", 1, 1000);
    fs::set_permissions(store.root(), fs::Permissions::from_mode(0o777)).expect("chmod");
    let expected = format!(
        "{} cannot be trusted: other users may write to it (mode 777), so anything in it may \
         have been planted; check it, then chmod 700 it; crac neither lists, restores nor files \
         images in the store {} until that is fixed",
        store.root().display(),
        store.root().display()
    );
    let errors = [
        store.list().map(|_| ()).expect_err("list"),
        store.resolve("web").map(|_| ()).expect_err("resolve"),
        store.begin("new").map(|_| ()).expect_err("begin"),
        store.recover().map(|_| ()).expect_err("recover"),
        store.prune(Some(0), None).map(|_| ()).expect_err("prune"),
        store.remove("web").expect_err("remove"),
        store.check_writable().expect_err("check_writable"),
    ];
    for err in errors {
        assert!(matches!(err, StoreError::Untrusted { .. }), "{err:?}");
        assert_eq!(err.to_string(), expected);
    }
    assert!(store.root().join("web").is_dir(), "nothing was touched");

    // A store of one's own that others may only read (made by an older crac) is tightened.
    fs::set_permissions(store.root(), fs::Permissions::from_mode(0o755)).expect("chmod");
    store.begin("new").expect("begin");
    assert_eq!(
        fs::metadata(store.root())
            .expect("root")
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
}

/// The restore's quick check skips files a note says were found intact: a note in a folder
/// others may write to, or that others may write to itself, is not believed.
#[test]
fn a_forged_intact_note_is_not_believed() {
    let scratch = Scratch::new("forged-note");
    let dir = scratch.path().join("img");
    let mut meta = make_image(&dir, "img", 7, 1000);
    metadata::hash_files(&dir, &mut meta.files).expect("hash");
    metadata::write(&dir, &meta).expect("metadata");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
    metadata::verify(&dir, &meta, metadata::Check::Full).expect("intact");

    // Another user's memory in place of the service's, and a note forged to vouch for it.
    let pages = dir.join("pages-1.img");
    let mut bytes = fs::read(&pages).expect("pages");
    bytes[10] ^= 0xff;
    fs::write(&pages, &bytes).expect("rewrite");
    metadata::note_intact(&dir, &meta, &Default::default());
    let note = dir.join(metadata::VERIFIED_FILE);
    fs::set_permissions(&note, fs::Permissions::from_mode(0o666)).expect("chmod");
    let err = metadata::verify(&dir, &meta, metadata::Check::Changed).expect_err("forged");
    assert!(
        err.to_string()
            .contains("image file pages-1.img does not hold what was dumped"),
        "{err}"
    );

    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod");
    let err = metadata::verify(&dir, &meta, metadata::Check::Changed).expect_err("open folder");
    assert!(
        err.to_string().contains(&format!(
            "{} cannot be trusted: other users may write to it (mode 777), so anything in it \
             may have been planted; check it, then chmod 700 it: another user could swap the \
             image's files after any check, so it is neither verified nor restored",
            dir.display()
        )),
        "{err}"
    );
}

/// Only regular files are hashed: an executable path that names a FIFO or /dev/zero is an
/// error at once, not a hang or an endless read.
#[test]
fn verify_reads_only_regular_files() {
    let scratch = Scratch::new("fifo");
    let dir = scratch.path().join("img");
    let mut meta = make_image(&dir, "img", 7, 1000);
    let fifo = scratch.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("fifo");
    for path in [fifo.display().to_string(), "/dev/zero".to_owned()] {
        meta.executable = path.clone();
        meta.executable_sha256 = Some("00".repeat(32));
        let err = metadata::verify(&dir, &meta, metadata::Check::Full).expect_err("refused");
        assert!(
            err.to_string()
                .contains("not a regular file: crac reads only regular files"),
            "{path}: {err}"
        );
    }
}

/// Timings are floats: the seal covers them as read back, so every float must read back
/// exactly as written.
#[test]
fn sealed_metadata_reads_back_whatever_its_floats() {
    let scratch = Scratch::new("floats");
    let dir = scratch.path().join("web");
    let mut meta = make_image(&dir, "web", 7, 1000);
    for (i, value) in [
        0.1 + 0.2,
        1.234_567_890_123_456_7,
        1e-300,
        2.0f64.sqrt() * 1e17,
        0.0,
    ]
    .into_iter()
    .enumerate()
    {
        meta.timings.hooks_ms = value;
        meta.timings.dump_ms = value * 3.0 + i as f64;
        meta.timings.total_ms = 1.0 / (value + 3.0);
        metadata::write(&dir, &meta).expect("write");
        assert_eq!(metadata::read(&dir).expect("read back"), meta, "{value}");
    }
}

/// The SHA-256 of `len` zero bytes, lowercase hex.
fn zeros_sha256(len: u64) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    let block = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        hasher.update(&block[..n]);
        left -= n as u64;
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A decompression bomb: a well-formed archive whose manifest truthfully declares
/// `pages-1.img` as `len` zero bytes (with their digest), which zstd stores in a few kilobytes.
/// The manifest may declare `declared` instead of `len`, to play an archive of any size.
fn pack_bomb(file: &Path, len: u64, declared: u64) {
    let meta = br#"{"format":1}"#;
    let manifest = format!(
        r#"{{"format":1,"name":"bomb","files":[{{"name":"crac-meta.json","size":{},"sha256":"{}"}},{{"name":"pages-1.img","size":{declared},"sha256":"{}"}}]}}"#,
        meta.len(),
        {
            use sha2::{Digest, Sha256};
            Sha256::digest(meta)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        },
        zeros_sha256(len)
    );
    let encoder = zstd::Encoder::new(File::create(file).expect("create"), 3).expect("zstd");
    let mut builder = tar::Builder::new(encoder);
    let mut append = |path: &str, size: u64, data: &mut dyn Read| {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(size);
        header.set_mode(0o600);
        builder
            .append_data(&mut header, path, data)
            .expect("append");
    };
    append(
        "crac-archive.json",
        manifest.len() as u64,
        &mut manifest.as_bytes(),
    );
    append("image/crac-meta.json", meta.len() as u64, &mut &meta[..]);
    append("image/pages-1.img", len, &mut std::io::repeat(0).take(len));
    builder
        .into_inner()
        .expect("tar")
        .finish()
        .expect("zstd finish");
}

/// The bytes under `dir`, 0 while it is missing or changing under the walk.
fn tree_bytes(dir: &Path) -> u64 {
    crac_cli::store::dir_bytes(dir).unwrap_or(0)
}

/// Runs `f` while another thread watches the bytes under `dir`; returns `f`'s result and the
/// most it saw.
fn watching_bytes<T>(dir: &Path, f: impl FnOnce() -> T) -> (T, u64) {
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                peak = peak.max(tree_bytes(dir));
                std::thread::sleep(Duration::from_millis(1));
            }
            peak.max(tree_bytes(dir))
        });
        let result = f();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        (result, watcher.join().expect("watcher"))
    })
}

#[test]
fn a_decompression_bomb_is_refused_before_anything_is_written() {
    let scratch = Scratch::new("bomb");
    let store = scratch.store();
    fs::create_dir_all(store.root()).expect("store root");
    fs::set_permissions(store.root(), fs::Permissions::from_mode(0o700)).expect("chmod");
    let bomb = scratch.path().join("bomb.crac");
    let len = 256 << 20;
    pack_bomb(&bomb, len, len);
    let archive_bytes = fs::metadata(&bomb).expect("stat").len();
    assert!(archive_bytes < 100 << 10, "{archive_bytes} bytes");

    let (result, peak) = watching_bytes(store.root(), || archive::import(&store, &bomb, None));
    let err = result.expect_err("a bomb");
    let ratio = (len + 12) / archive_bytes;
    assert_eq!(
        err.to_string(),
        format!(
            "archive {} ({}) declares an image of 256.0 MiB, {ratio} times its own size, more \
             than the 1000 times an image archive is let expand (real images compress 2 to 10 \
             times): it may be a decompression bomb; if you trust its sender and the image is \
             mostly zero pages, import it with --max-ratio {}; nothing was imported",
            bomb.display(),
            format_args!("{:.1} KiB", archive_bytes as f64 / 1024.0),
            ratio + 1
        )
    );
    assert_eq!(peak, 0, "the import wrote into the store");
    assert!(
        root_contents(&store).is_empty(),
        "{:?}",
        root_contents(&store)
    );

    // Allowed to expand that much, the same archive is read and written in full, and refused
    // for what it is (its metadata is no image's): the limit was all that stood in the way.
    let options = archive::ImportOptions {
        max_ratio: ratio + 1,
        ..Default::default()
    };
    let (result, peak) = watching_bytes(store.root(), || {
        archive::import_with(&store, &bomb, &options)
    });
    let err = result.expect_err("no image");
    assert!(
        err.to_string().contains("its crac-meta.json is unusable"),
        "{err}"
    );
    assert!(peak > 1 << 20, "the watcher saw {peak} bytes");
    assert!(
        root_contents(&store).is_empty(),
        "{:?}",
        root_contents(&store)
    );
}

#[test]
fn an_image_larger_than_the_free_space_is_refused_before_anything_is_written() {
    let scratch = Scratch::new("noroom");
    let store = scratch.store();
    let archive_file = scratch.path().join("big.crac");
    // A manifest that declares a petabyte; the entries never get read.
    let declared = 1u64 << 50;
    pack_bomb(&archive_file, 4096, declared);
    let options = archive::ImportOptions {
        max_ratio: u64::MAX,
        ..Default::default()
    };
    let err = archive::import_with(&store, &archive_file, &options).expect_err("too large");
    let text = err.to_string();
    let prefix = format!(
        "archive {} declares an image of 1.0 PiB, but only ",
        archive_file.display()
    );
    let suffix = format!(
        "are free in {} (1.1 PiB needed, leaving 51.2 TiB free for everything else): free \
         some space (`crac images prune`) or import into a store on a file system with room \
         (--store DIR); nothing was imported",
        store.root().display()
    );
    assert!(
        text.starts_with(&prefix) && text.ends_with(&suffix),
        "{text}"
    );
    assert!(matches!(err, ArchiveError::NoRoom { free, .. } if free > 0));
    // The store did not exist, and still does not.
    assert!(!store.root().exists());
    assert_eq!(archive::free_margin(1 << 30), 64 << 20);
    assert_eq!(archive::free_margin(10 << 30), 512 << 20);
}

#[test]
fn no_file_grows_past_the_size_the_manifest_declares() {
    let scratch = Scratch::new("grow");
    let store = scratch.store();
    let file = scratch.path().join("grow.crac");
    // The tar entry holds 64 MiB of zeros where the manifest declares 4 KiB.
    let len = 64 << 20;
    pack_bomb(&file, len, 4096);
    let (result, peak) = watching_bytes(store.root(), || archive::import(&store, &file, None));
    let err = result.expect_err("larger than declared");
    assert_eq!(
        err.to_string(),
        format!(
            "archive {} is damaged: pages-1.img has {len} bytes, crac-archive.json says 4096; \
             nothing was imported",
            file.display()
        )
    );
    assert!(peak < 4096 + 1024, "{peak} bytes written");
    assert!(root_contents(&store).is_empty());
}

#[test]
fn an_interrupted_import_is_removed_never_filed() {
    let scratch = Scratch::new("killed-import");
    let store = scratch.store();
    // An import's working folder is of its own kind...
    let staging = store.begin_import("imp").expect("begin import");
    let name = staging
        .path()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        name.starts_with(&format!(".importing-imp-{}-", std::process::id())),
        "{name}"
    );
    assert!(store::is_import_folder(staging.path()));
    drop(staging);
    assert!(root_contents(&store).is_empty());

    // ...so that one killed once every file was in place (the image valid, CRIU's
    // stats-dump among its files, but not all checked against the archive) is removed,
    // where a dump's folder in the same state is filed.
    let dead = 99_999_999;
    let root = store.root().to_owned();
    let import = root.join(format!(".importing-imp-{dead}-1"));
    make_image(&import, "imp", 5, 1000);
    fs::write(import.join(metadata::DUMP_DONE_FILE), b"stats").expect("stats-dump");
    let meta = metadata::read(&import).expect("metadata");
    metadata::validate(&import, &meta).expect("as valid as a complete dump");
    let dump = root.join(format!(".staging-web-{dead}-2"));
    make_killed_dump(&dump, "web", 6, true);

    let recovery = store.recover().expect("recover");
    assert_eq!(recovery.removed, std::slice::from_ref(&import));
    assert!(store::is_import_folder(&import));
    assert!(!store::is_import_folder(&dump));
    assert_eq!(
        recovery
            .recovered
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        ["web"]
    );
    assert_eq!(names(&store), ["web"]);
    assert_eq!(root_contents(&store), set(&["web"]));
}

/// A new identity in `dir/NAME` (by [`archive::keygen`]) and its recipient.
fn identity(dir: &Path, name: &str) -> (PathBuf, archive::Identities, String) {
    let path = dir.join(name);
    let recipient = archive::keygen(&path).expect("keygen");
    let identities = archive::Identities::read(&path).expect("read identity");
    (path, identities, recipient)
}

#[test]
fn an_encrypted_export_imports_only_with_a_matching_identity() {
    let scratch = Scratch::new("encrypted");
    let here = scratch.store();
    let there = Store::open(scratch.path().join("there"));
    let original = add_image(&here, "web", 7, 1000);
    let (key, identities, recipient) = identity(scratch.path(), "key.txt");
    let (_, other_identities, other) = identity(scratch.path(), "other.txt");
    assert!(
        recipient.starts_with("age1") && recipient.len() == 62,
        "{recipient}"
    );
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let text = fs::read_to_string(&key).unwrap();
    assert!(
        text.contains(&format!("# public key: {recipient}\n")),
        "{text}"
    );
    assert!(text.contains("\nAGE-SECRET-KEY-1"), "{text}");

    let mut recipients = archive::Recipients::new();
    recipients.add(&recipient).expect("recipient");
    let file = scratch.path().join("web.crac.age");
    let summary = archive::export_with(&here, "web", &file, Some(&recipients)).expect("export");
    let bytes = fs::read(&file).unwrap();
    assert_eq!(summary.bytes_out, bytes.len() as u64);
    assert!(bytes.starts_with(b"age-encryption.org/v1\n-> X25519 "));
    assert_eq!(
        fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // No plaintext: neither the manifest nor the incompressible page data shows.
    let pages = fs::read(original.join("pages-1.img")).unwrap();
    assert!(!bytes.windows(64).any(|w| w == &pages[..64]));
    assert!(!bytes.windows(17).any(|w| w == b"crac-archive.json"));

    let err = archive::import(&there, &file, None).expect_err("no identity");
    assert_eq!(
        err.to_string(),
        format!(
            "archive {} is encrypted (age); pass --identity FILE, a file with a secret key it \
             was encrypted to; nothing was imported",
            file.display()
        )
    );
    let with = |identities| archive::ImportOptions {
        identities: Some(identities),
        ..Default::default()
    };
    let err = archive::import_with(&there, &file, &with(&other_identities)).expect_err("other");
    assert_eq!(
        err.to_string(),
        format!(
            "cannot decrypt archive {}: no identity in {} opens it: it was encrypted to other \
             recipients (use the identity file of one it was exported to), or its header was \
             modified; nothing was imported",
            file.display(),
            scratch.path().join("other.txt").display()
        )
    );
    assert!(root_contents(&there).is_empty());

    assert_eq!(
        archive::import_with(&there, &file, &with(&identities)).expect("import"),
        "web"
    );
    let exported: Vec<(String, Vec<u8>)> = folder_bytes(&original)
        .into_iter()
        .filter(|(name, _)| name != "dump.log")
        .collect();
    assert_eq!(folder_bytes(&there.root().join("web")), exported);

    // Two recipients: either one imports it.
    let mut both = archive::Recipients::new();
    both.add(&recipient).unwrap();
    both.add(&other).unwrap();
    let file2 = scratch.path().join("both.crac.age");
    archive::export_with(&here, "web", &file2, Some(&both)).expect("export to two");
    for (name, ids) in [("a", &identities), ("b", &other_identities)] {
        let options = archive::ImportOptions {
            name: Some(name),
            identities: Some(ids),
            ..Default::default()
        };
        archive::import_with(&there, &file2, &options).expect("either imports");
    }

    // A plain archive where an encrypted one was expected is refused.
    let plain = scratch.path().join("plain.crac");
    archive::export(&here, "web", &plain).expect("plain export");
    let options = archive::ImportOptions {
        name: Some("c"),
        identities: Some(&identities),
        ..Default::default()
    };
    let err = archive::import_with(&there, &plain, &options).expect_err("plain");
    assert_eq!(
        err.to_string(),
        format!(
            "archive {} is not encrypted, but --identity was given: it is not the encrypted \
             archive you expected (check where it came from; import it without --identity \
             only if you trust it); nothing was imported",
            plain.display()
        )
    );
    assert_eq!(names(&there), ["a", "b", "web"]);
}

#[test]
fn a_tampered_encrypted_archive_is_refused_and_nothing_is_filed() {
    let scratch = Scratch::new("tampered");
    let here = scratch.store();
    let there = Store::open(scratch.path().join("there"));
    add_image(&here, "web", 7, 1000);
    let (_, identities, recipient) = identity(scratch.path(), "key.txt");
    let mut recipients = archive::Recipients::new();
    recipients.add(&recipient).unwrap();
    let good = scratch.path().join("good.age");
    archive::export_with(&here, "web", &good, Some(&recipients)).expect("export");
    let bytes = fs::read(&good).unwrap();
    let header_end = bytes
        .windows(4)
        .position(|w| w == b"\n---")
        .expect("age header end");

    let flipped = |at: usize| {
        let mut copy = bytes.clone();
        copy[at] ^= 0x01;
        copy
    };
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        (
            "payload",
            flipped(bytes.len() / 2),
            "is damaged: its encrypted data fails authentication (it was modified or \
             truncated after it was encrypted)"
                .to_owned(),
        ),
        (
            "last byte",
            flipped(bytes.len() - 1),
            "is damaged: its encrypted data fails authentication (it was modified or \
             truncated after it was encrypted)"
                .to_owned(),
        ),
        (
            "cut",
            bytes[..bytes.len() - 100].to_vec(),
            "is damaged: its encrypted data fails authentication (it was modified or \
             truncated after it was encrypted)"
                .to_owned(),
        ),
        (
            "header mac",
            flipped(header_end + 10),
            "cannot decrypt archive {}: its age header is damaged or was modified".to_owned(),
        ),
        (
            "extra data",
            [&bytes[..], b"more"].concat(),
            "is damaged: its encrypted data fails authentication (it was modified or \
             truncated after it was encrypted)"
                .to_owned(),
        ),
    ];
    let options = archive::ImportOptions {
        identities: Some(&identities),
        ..Default::default()
    };
    for (tag, contents, expected) in cases {
        let file = scratch.path().join(format!("{tag}.age"));
        fs::write(&file, contents).unwrap();
        let err = archive::import_with(&there, &file, &options).expect_err(tag);
        let text = err.to_string();
        let expected = expected.replace("{}", &file.display().to_string());
        assert!(text.contains(&expected), "{tag}: {text}");
        assert!(text.ends_with("; nothing was imported"), "{tag}: {text}");
        assert!(
            root_contents(&there).is_empty(),
            "{tag}: {:?}",
            root_contents(&there)
        );
    }
    // Wherever the header is damaged after its first line, the message says so.
    let first_line = b"age-encryption.org/v1\n".len();
    for at in first_line..header_end + 4 + 44 {
        let file = scratch.path().join("header.age");
        fs::write(&file, flipped(at)).unwrap();
        let err = archive::import_with(&there, &file, &options).expect_err("header");
        let text = err.to_string();
        // A changed stanza names no recipient of ours any more; anything else breaks the
        // header's structure or its MAC.
        let damaged = format!(
            "cannot decrypt archive {}: its age header is damaged or was modified; nothing was \
             imported",
            file.display()
        );
        let stranger = format!(
            "cannot decrypt archive {}: no identity in {} opens it: it was encrypted to other \
             recipients (use the identity file of one it was exported to), or its header was \
             modified; nothing was imported",
            file.display(),
            scratch.path().join("key.txt").display()
        );
        assert!(text == damaged || text == stranger, "byte {at}: {text}");
    }
    assert!(root_contents(&there).is_empty());
    assert_eq!(
        archive::import_with(&there, &good, &options).expect("intact"),
        "web"
    );
}

#[test]
fn key_files_are_checked() {
    let scratch = Scratch::new("keys");
    let (key, _, recipient) = identity(scratch.path(), "key.txt");

    // A secret key others may read is refused, and never echoed.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let err = archive::Identities::read(&key).expect_err("readable by others");
    assert_eq!(
        err.to_string(),
        format!(
            "cannot use key file {}: {} holds secret keys but other users may read it (mode \
             644): chmod 600 it, and replace the keys if someone else may have read them",
            key.display(),
            key.display()
        )
    );
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();

    let bad = scratch.path().join("bad.txt");
    fs::write(&bad, "# mine\n\nAGE-SECRET-KEY-1NOTAKEY\n").unwrap();
    fs::set_permissions(&bad, fs::Permissions::from_mode(0o600)).unwrap();
    let err = archive::Identities::read(&bad).expect_err("bad line");
    assert_eq!(
        err.to_string(),
        format!(
            "cannot use key file {}: line 3 is not an age X25519 identity \
             (`AGE-SECRET-KEY-1…`, as `crac images keygen` writes it)",
            bad.display()
        )
    );
    assert!(!err.to_string().contains("NOTAKEY"));

    // keygen never overwrites.
    let err = archive::keygen(&key).expect_err("exists");
    assert_eq!(
        err.to_string(),
        format!(
            "{} exists: crac never overwrites a key file; choose another --output, or remove \
             the old key first if nothing is encrypted to it any more; no key was made",
            key.display()
        )
    );
    let ids = archive::Identities::read(&key).expect("still the same key");
    let mut expected = archive::Recipients::new();
    expected.add(&recipient).unwrap();
    assert_eq!(format!("{:?}", ids.recipients()), format!("{expected:?}"));

    // Recipients: a file as age reads one, and strings.
    let list = scratch.path().join("recipients.txt");
    fs::write(&list, format!("# ops\n{recipient}\n\n  {recipient}  \n")).unwrap();
    let mut recipients = archive::Recipients::new();
    recipients.add_file(&list).expect("recipients file");
    assert_eq!(recipients.len(), 2);
    fs::write(&list, format!("{recipient}\nage1nope\n")).unwrap();
    let err = archive::Recipients::new()
        .add_file(&list)
        .expect_err("bad line");
    assert!(
        err.to_string().starts_with(&format!(
            "cannot use key file {}: line 2 is not an age X25519 recipient (",
            list.display()
        )),
        "{err}"
    );
    fs::write(&list, "# nobody\n").unwrap();
    let err = archive::Recipients::new()
        .add_file(&list)
        .expect_err("empty");
    assert_eq!(
        err.to_string(),
        format!(
            "cannot use key file {}: it lists no recipient",
            list.display()
        )
    );
    let err = archive::Recipients::new()
        .add("AGE-SECRET-KEY-1QQQ")
        .expect_err("a secret key is no recipient");
    assert!(matches!(err, ArchiveError::SecretKeyAsRecipient), "{err}");
    assert!(!err.to_string().contains("QQQ"), "{err}");
    let err = archive::Recipients::new()
        .add("age1nope")
        .expect_err("not a key");
    assert!(
        err.to_string()
            .starts_with("invalid recipient \"age1nope\" ("),
        "{err}"
    );
}
