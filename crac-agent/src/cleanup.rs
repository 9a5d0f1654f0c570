//! Removing the socket when the process ends: at normal exit (`atexit`) and when SIGTERM or
//! SIGINT kills the process, without taking the signals away from the application, and never
//! while it lives on: an application that handles SIGTERM and keeps running (draining its
//! requests) keeps its agent, and can still be checkpointed.
//!
//! - A signal whose disposition is the default (terminate) gets a one-shot handler
//!   (`SA_RESETHAND`) that removes the socket and raises the signal again, so the process still
//!   dies of it, with the same status. If the application later installs its own handler with
//!   signal-hook, that library chains ours before its own actions: we see that someone else
//!   owns the signal now, and leave the socket alone (the application decides whether the
//!   process ends; if it exits, `atexit` removes the socket).
//! - A signal the application already handles is left to it, for the same reason.
//! - An ignored signal stays ignored: the process does not end, so the socket stays.
//! - The init of a pid namespace (pid 1, as a container's main process is) gets no handler
//!   for a signal left at its default: the kernel does not deliver such a signal to it (the
//!   process would not end), and a handler would make it remove its socket and live on
//!   without one.
//!
//! Everything reachable from a signal handler here is async-signal-safe: atomics, `getpid`,
//! `lstat`, `unlink`, `rmdir`, `sigaction`, `raise`. Paths are leaked `CString`s published through
//! atomic pointers, so a handler never sees a freed one.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr;
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU64, Ordering};
use std::sync::Once;

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

static SOCKET: AtomicPtr<libc::c_char> = AtomicPtr::new(ptr::null_mut());
static DIR: AtomicPtr<libc::c_char> = AtomicPtr::new(ptr::null_mut());
/// The agent's private base folder, if it had to make one (removed after `DIR`, if empty).
static BASE: AtomicPtr<libc::c_char> = AtomicPtr::new(ptr::null_mut());
/// The process whose files these are: a forked child inherits the handlers but must not
/// remove its parent's socket.
static OWNER: AtomicI32 = AtomicI32::new(0);

/// The device and inode of the socket file when this process last knew the file at the path
/// to be its own (0: not known). Only that file is removed: copies restored from one image into
/// pid namespaces of their own share the path (all are pid 1), and the one that ends must not
/// take the socket of the one that bound the path last.
static SOCKET_DEV: AtomicU64 = AtomicU64::new(0);
static SOCKET_INODE: AtomicU64 = AtomicU64::new(0);

static INSTALL: Once = Once::new();

/// Publishes the files to remove and installs the exit and signal hooks (once per process).
pub(crate) fn arm(socket: &Path, dir: &Path, private_base: Option<&Path>, signals: bool) {
    SOCKET.store(leak(socket), Ordering::SeqCst);
    DIR.store(leak(dir), Ordering::SeqCst);
    BASE.store(private_base.map_or(ptr::null_mut(), leak), Ordering::SeqCst);
    // Just bound: the file at the path is this process's socket.
    own_socket_file(file_identity(socket));
    OWNER.store(std::process::id() as i32, Ordering::SeqCst);
    INSTALL.call_once(|| {
        // SAFETY: `at_exit` is an `extern "C" fn()` that only touches atomics and calls
        // async-signal-safe functions; registering it has no other precondition.
        unsafe { libc::atexit(at_exit) };
        if signals {
            for signal in [Signal::SIGTERM, Signal::SIGINT] {
                install_signal_cleanup(signal);
            }
        }
    });
}

/// Notes the device and inode of the file at the socket's path, known to be this process's
/// socket.
pub(crate) fn own_socket_file(file: Option<(u64, u64)>) {
    let (dev, ino) = file.unwrap_or((0, 0));
    // A handler that reads a new device with an old inode (or the reverse) finds no match and
    // leaves the file: the safe side.
    SOCKET_INODE.store(0, Ordering::SeqCst);
    SOCKET_DEV.store(dev, Ordering::SeqCst);
    SOCKET_INODE.store(ino, Ordering::SeqCst);
}

/// The device and inode of the file at `path`, not following a link.
pub(crate) fn file_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Forgets the files (after they were removed by a clean stop).
pub(crate) fn disarm() {
    SOCKET.store(ptr::null_mut(), Ordering::SeqCst);
    DIR.store(ptr::null_mut(), Ordering::SeqCst);
    BASE.store(ptr::null_mut(), Ordering::SeqCst);
}

fn leak(path: &Path) -> *mut libc::c_char {
    // A path with an interior NUL cannot have been bound, so it cannot reach here.
    CString::new(path.as_os_str().as_bytes())
        .map(CString::into_raw)
        .unwrap_or(ptr::null_mut())
}

/// Removes the socket file, the process's folder and its private base, if any.
/// Async-signal-safe.
pub(crate) fn remove_files() {
    // SAFETY: getpid has no preconditions and is async-signal-safe.
    if OWNER.load(Ordering::SeqCst) != unsafe { libc::getpid() } {
        return;
    }
    let socket = SOCKET.swap(ptr::null_mut(), Ordering::SeqCst);
    let dir = DIR.swap(ptr::null_mut(), Ordering::SeqCst);
    let base = BASE.swap(ptr::null_mut(), Ordering::SeqCst);
    // SAFETY: non-null pointers here come from CString::into_raw and are never freed, so they
    // are valid NUL-terminated strings; lstat, unlink and rmdir are async-signal-safe.
    unsafe {
        let (dev, ino) = (
            SOCKET_DEV.load(Ordering::SeqCst),
            SOCKET_INODE.load(Ordering::SeqCst),
        );
        // An all-zero stat is a valid value for lstat to overwrite.
        let mut stat: libc::stat = std::mem::zeroed();
        if !socket.is_null()
            && ino != 0
            && libc::lstat(socket, &mut stat) == 0
            && stat.st_dev == dev
            && stat.st_ino == ino
        {
            libc::unlink(socket);
        }
        if !dir.is_null() {
            libc::rmdir(dir);
        }
        if !base.is_null() {
            libc::rmdir(base);
        }
    }
}

extern "C" fn at_exit() {
    remove_files();
}

extern "C" fn on_default_signal(signal: libc::c_int) {
    // SA_RESETHAND reset our disposition to the default on entry. If it is still the default,
    // we were called by the kernel: remove the socket, raise again and die of the signal as
    // the process would have without us (the signal is blocked until we return, then
    // delivered). If it is anything else, another handler took over and chained to us: the
    // process may live on, so the socket stays, and the rest is left to that handler.
    // SAFETY: sigaction with a null new action only reads the current one; raise is
    // async-signal-safe. `current` is plain data that sigaction fills in.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(signal, ptr::null(), &mut current) == 0
            && current.sa_sigaction == libc::SIG_DFL
        {
            remove_files();
            libc::raise(signal);
        }
    }
}

fn install_signal_cleanup(signal: Signal) {
    let signum = signal as libc::c_int;
    // SAFETY: sigaction with a null new action only reads the current disposition into
    // `current`, plain data it fills in.
    let current = unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(signum, ptr::null(), &mut current) != 0 {
            return;
        }
        current.sa_sigaction
    };
    // An ignored or handled signal is the application's: the process may live on.
    if current != libc::SIG_DFL {
        return;
    }
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } == 1 {
        return;
    }
    let ours = SigAction::new(
        SigHandler::Handler(on_default_signal),
        SaFlags::SA_RESETHAND | SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: `on_default_signal` is async-signal-safe (see above) and replaces only the
    // default disposition, which it re-creates before re-raising.
    let _ = unsafe { sigaction(signal, &ours) };
}
