//! A service with an embedded database: it writes an event into it every 100 ms, closes it in
//! `before_checkpoint` and opens it again in `after_restore`, where it reads where the
//! database is (the next event's number) instead of trusting what its memory says.
//!
//! Start it with
//! `setsid target/debug/embedded-db /var/lib/web/events.redb </dev/null >>db.log 2>&1 &`,
//! then, as root, `crac checkpoint PID --name db` and `crac restore db --detach`. A database held open is refused by crac's preflight before CRIU runs (its lock:
//! `pid 4242 fd 3: lock /var/lib/web/events.redb (flock, exclusive) (CRIU refuses ...)`):
//! closing it is what lets the checkpoint through, and leaves the file complete on disk.
//!
//! The database is [redb](https://docs.rs/redb): pure Rust (it builds in seconds, where
//! SQLite's bundled C takes a minute of a two-core machine), one file, ACID commits (a closed
//! database is whole on disk), and it holds an exclusive `flock` on its file while open, as
//! SQLite holds POSIX locks on its `-shm` file in WAL mode: the lock a checkpoint must see
//! released. What is shown holds for either.
//!
//! crac records the file, which the service had open for writing when the checkpoint started,
//! and refuses to restore the image once the file has changed (an older image after the
//! database moved on): `the file /var/lib/web/events.redb changed since the checkpoint (...):
//! the process had it open for writing; restoring would resume it against a newer file`. This
//! service reads its place from the database in `after_restore`, so it copes with a newer
//! file: `crac restore db --detach --allow-changed /var/lib/web/events.redb` restores it, and
//! it carries on from the database's last event.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crac_core::{CheckpointInfo, HookError, Resource, RestoreInfo};
use crac_examples::lock;
use redb::{Database, ReadableTable, TableDefinition};

/// Event number -> when it was written (ms since the epoch).
const EVENTS: TableDefinition<'_, u64, u64> = TableDefinition::new("events");

/// The database, open between checkpoints.
struct Events {
    path: PathBuf,
    db: Mutex<Option<Database>>,
    /// The next event's number: read from the database whenever it is opened.
    next: AtomicU64,
}

impl Events {
    /// Opens the database (made if missing) and reads where it is.
    fn open(&self) -> Result<(), crac_core::HookError> {
        let db = Database::create(&self.path)?;
        let write = db.begin_write()?;
        let last = {
            let table = write.open_table(EVENTS)?;
            let last = table.last()?.map(|(number, _)| number.value());
            last
        };
        write.commit()?;
        self.next.store(last.map_or(1, |n| n + 1), SeqCst);
        *lock(&self.db) = Some(db);
        Ok(())
    }

    /// Writes the next event; called inside a critical section, so never while closed.
    fn write(&self) -> Result<u64, crac_core::HookError> {
        let guard = lock(&self.db);
        let db = guard.as_ref().expect("open outside checkpoints");
        let number = self.next.load(SeqCst);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let write = db.begin_write()?;
        write.open_table(EVENTS)?.insert(number, now)?;
        write.commit()?;
        self.next.store(number + 1, SeqCst);
        Ok(number)
    }
}

impl Resource for Events {
    fn name(&self) -> std::borrow::Cow<'_, str> {
        "events-db".into()
    }

    fn before_checkpoint(&self, _: &CheckpointInfo) -> Result<(), HookError> {
        // Dropping the database commits nothing new (every write committed) and closes the
        // file, which releases its lock.
        drop(lock(&self.db).take());
        println!(
            "before_checkpoint: closed the database before event {}",
            self.next.load(SeqCst)
        );
        Ok(())
    }

    fn after_restore(&self, info: &RestoreInfo) -> Result<(), HookError> {
        // Restored, resumed or aborted: the database may have moved on meanwhile (an image
        // is restored after the original ran on), so where it is comes from the file.
        self.open()
            .map_err(|e| format!("cannot open {}: {e}", self.path.display()))?;
        println!(
            "after_restore ({}): opened the database, next event {}",
            info.reason,
            self.next.load(SeqCst)
        );
        Ok(())
    }
}

fn main() -> Result<(), crac_core::HookError> {
    let path = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .ok_or("usage: embedded-db DATABASE_FILE")?;
    let events = Arc::new(Events {
        path,
        db: Mutex::new(None),
        next: AtomicU64::new(1),
    });
    events.open()?;
    crac_core::global_context().register(events.clone()).keep();
    let _agent = crac_agent::start()?;
    println!(
        "pid {}, next event {}",
        std::process::id(),
        events.next.load(SeqCst)
    );
    loop {
        {
            // A checkpoint waits for a write to end; one that would start meanwhile waits
            // for the restore, when the database is open again.
            let _section = crac_core::critical_section();
            let number = events.write()?;
            println!("wrote event {number}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
