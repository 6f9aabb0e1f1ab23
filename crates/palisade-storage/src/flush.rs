//! Group commit: one fsync covers the pending writes of every group.
//!
//! Writers put their data into sled first, then [`Flusher::submit`] a
//! completion. The flusher thread takes every completion queued so far, calls
//! `Db::flush()` once (which syncs all trees), and then runs the completions.
//! Because a completion is queued only after its write is in sled, the flush
//! that runs after dequeuing it covers the write. Under load many appends from
//! many groups share one fsync, so fsyncs per write fall below one.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

/// What to run once the data it waits for is durable (or the flush failed).
pub type Completion = Box<dyn FnOnce(io::Result<()>) + Send>;

/// Counters that explain durability cost.
#[derive(Debug, Default)]
pub struct FlushStats {
    /// Number of `Db::flush()` calls made by the flusher.
    pub flushes: AtomicU64,
    /// Number of completions those flushes covered.
    pub completions: AtomicU64,
}

/// Handle to a node's flusher thread. Cloning shares the thread.
#[derive(Clone)]
pub struct Flusher {
    tx: mpsc::Sender<Completion>,
    stats: Arc<FlushStats>,
}

impl Flusher {
    /// Starts the flusher thread for `db`. It exits when every handle is gone.
    pub fn start(db: sled::Db) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Completion>();
        let stats = Arc::new(FlushStats::default());
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("palisade-flusher".into())
            .spawn(move || run(db, rx, &thread_stats))?;
        Ok(Self { tx, stats })
    }

    /// Runs `done` after the next flush that starts after this call.
    pub fn submit(&self, done: Completion) {
        if let Err(mpsc::SendError(done)) = self.tx.send(done) {
            done(Err(io::Error::other("flusher stopped")));
        }
    }

    /// Waits until everything written before this call is durable.
    pub async fn sync(&self) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move |res| {
            let _ = tx.send(res);
        }));
        rx.await
            .map_err(|_| io::Error::other("flusher dropped a completion"))?
    }

    /// Flush counters.
    pub fn stats(&self) -> &FlushStats {
        &self.stats
    }
}

fn run(db: sled::Db, rx: mpsc::Receiver<Completion>, stats: &FlushStats) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let result = db.flush().map(|_| ()).map_err(|e| e.to_string());
        stats.flushes.fetch_add(1, Ordering::Relaxed);
        stats
            .completions
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        if let Err(e) = &result {
            tracing::error!(error = %e, "flush failed; failing every waiting write");
        }
        for done in batch {
            done(result.clone().map_err(io::Error::other));
        }
    }
}
