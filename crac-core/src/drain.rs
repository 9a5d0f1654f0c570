//! Draining: while a checkpoint (or a retiring upgrade) is under way, servers close their client
//! connections gracefully and stop accepting new ones, so that no established connection is
//! left for CRIU to refuse or to freeze.
//!
//! The coordinator sets the flag before it quiesces and clears it when the cycle ends. Servers
//! read it ([`Coordinator::is_draining`](crate::Coordinator::is_draining)), wait for it to
//! change ([`Coordinator::draining`](crate::Coordinator::draining)), and count their client
//! connections ([`Coordinator::connection`](crate::Coordinator::connection)), which a
//! checkpoint waits (bounded, [`Limits::drain`](crate::Limits::drain)) to see gone.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

#[derive(Default)]
pub(crate) struct Drain {
    on: AtomicBool,
    connections: AtomicUsize,
    /// Tasks waiting in [`DrainChange`]; taken only to wait or to wake.
    waiting: Mutex<Waiters>,
    /// Signalled when the last connection counted ends.
    gone: Condvar,
}

/// Wakers by the id of their [`DrainChange`], which takes its own out when dropped: a server
/// waits for a change on every connection, and most connections end without one.
#[derive(Default)]
struct Waiters {
    next: u64,
    by_id: HashMap<u64, Waker>,
}

impl Drain {
    fn lock(&self) -> MutexGuard<'_, Waiters> {
        // Each update is one insert or removal: a poisoned lock holds consistent data.
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn is_on(&self) -> bool {
        self.on.load(SeqCst)
    }

    pub(crate) fn set(&self, on: bool) {
        if self.on.swap(on, SeqCst) == on {
            return;
        }
        // Whoever saw the old value registered under this lock before it is taken here.
        let waiting = std::mem::take(&mut self.lock().by_id);
        waiting.into_values().for_each(Waker::wake);
    }

    pub(crate) fn connections(&self) -> usize {
        self.connections.load(SeqCst)
    }

    pub(crate) fn connection(self: &Arc<Self>) -> ClientConnection {
        self.connections.fetch_add(1, SeqCst);
        ClientConnection {
            drain: Arc::clone(self),
        }
    }

    /// Waits up to `limit` for the connections counted to end; returns how many are left.
    pub(crate) fn wait_gone(&self, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        let mut waiting = self.lock();
        loop {
            let left = self.connections();
            let now = Instant::now();
            if left == 0 || now >= deadline {
                return left;
            }
            waiting = self
                .gone
                .wait_timeout(waiting, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    pub(crate) fn change(self: &Arc<Self>, to: bool) -> DrainChange {
        DrainChange {
            drain: Arc::clone(self),
            to,
            id: None,
        }
    }
}

/// A client connection a server counts (see [`Coordinator::connection`](crate::Coordinator::connection)):
/// a checkpoint waits for it to end while draining. Drop it when the connection is closed.
#[must_use = "the connection is counted as long as this guard lives"]
pub struct ClientConnection {
    drain: Arc<Drain>,
}

impl Drop for ClientConnection {
    fn drop(&mut self) {
        if self.drain.connections.fetch_sub(1, SeqCst) == 1 {
            // Under the lock, so a checkpoint cannot be between its look and its wait.
            let _waiting = self.drain.lock();
            self.drain.gone.notify_all();
        }
    }
}

impl fmt::Debug for ClientConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConnection").finish_non_exhaustive()
    }
}

/// The future of [`Coordinator::draining`](crate::Coordinator::draining): ready once draining
/// is on (or off, as asked).
#[must_use = "futures do nothing unless awaited"]
pub struct DrainChange {
    drain: Arc<Drain>,
    to: bool,
    /// Where its waker is kept, once it has waited.
    id: Option<u64>,
}

impl Future for DrainChange {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.drain.is_on() == self.to {
            return Poll::Ready(());
        }
        {
            let drain = Arc::clone(&self.drain);
            let mut waiting = drain.lock();
            let id = *self.id.get_or_insert_with(|| {
                waiting.next += 1;
                waiting.next
            });
            waiting.by_id.insert(id, cx.waker().clone());
        }
        // Looked at again once registered: a change in between has woken the waker above.
        if self.drain.is_on() == self.to {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl Drop for DrainChange {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.drain.lock().by_id.remove(&id);
        }
    }
}

impl fmt::Debug for DrainChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainChange")
            .field("to", &self.to)
            .finish_non_exhaustive()
    }
}
