//! Group commit: one fsync covers the pending log writes of every group.
//!
//! Writers append to the node's [`Wal`] first, then [`Flusher::submit`] a
//! completion. The flusher thread takes every completion queued so far, syncs
//! the log once, and then runs the completions. Because a completion is
//! queued only after its write is in the log file, the sync that runs after
//! dequeuing it covers the write. Under load many appends from many groups
//! share one fsync, so fsyncs per write fall below one.
//!
//! The rarely written sled state (votes, snapshots, purge points) is made
//! durable with [`Flusher::sync_db`].

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use crate::Wal;

/// What to run once the data it waits for is durable (or the flush failed).
pub type Completion = Box<dyn FnOnce(io::Result<()>) + Send>;

/// Counters that explain durability cost.
#[derive(Debug, Default)]
pub struct FlushStats {
    /// Number of log syncs and sled flushes.
    pub flushes: AtomicU64,
    /// Number of completions those flushes covered.
    pub completions: AtomicU64,
}

/// How a node makes writes durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FlushMode {
    /// A flusher thread batches every waiting write into one fsync
    /// (production: group commit).
    #[default]
    Thread,
    /// Each `submit` flushes synchronously on the caller's thread before it
    /// returns. No batching, no extra thread: deterministic simulations use
    /// this, since a completion from another OS thread would arrive at a
    /// time the simulation does not control.
    Inline,
}

/// Handle to a node's flusher. Cloning shares it.
#[derive(Clone)]
pub struct Flusher {
    target: Target,
    wal: Wal,
    db: sled::Db,
    mode: FlushMode,
    stats: Arc<FlushStats>,
}

#[derive(Clone)]
enum Target {
    Thread(mpsc::Sender<Completion>),
    Inline,
}

impl Flusher {
    /// A flusher in `mode` for the log `wal` and the database `db`.
    pub fn new(wal: Wal, db: sled::Db, mode: FlushMode) -> io::Result<Self> {
        let stats = Arc::new(FlushStats::default());
        let target = match mode {
            FlushMode::Thread => {
                let (tx, rx) = mpsc::channel::<Completion>();
                let thread_stats = stats.clone();
                let thread_wal = wal.clone();
                // The thread exits when every handle is gone.
                std::thread::Builder::new()
                    .name("palisade-flusher".into())
                    .spawn(move || run(thread_wal, rx, &thread_stats))?;
                Target::Thread(tx)
            }
            FlushMode::Inline => Target::Inline,
        };
        Ok(Self {
            target,
            wal,
            db,
            mode,
            stats,
        })
    }

    /// Runs `done` after the next flush that starts after this call.
    pub fn submit(&self, done: Completion) {
        match &self.target {
            Target::Thread(tx) => {
                if let Err(mpsc::SendError(done)) = tx.send(done) {
                    done(Err(io::Error::other("flusher stopped")));
                }
            }
            Target::Inline => {
                let result = self.wal.sync();
                self.stats.flushes.fetch_add(1, Ordering::Relaxed);
                self.stats.completions.fetch_add(1, Ordering::Relaxed);
                done(result);
            }
        }
    }

    /// Waits until everything appended to the log before this call is
    /// durable.
    pub async fn sync(&self) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move |res| {
            let _ = tx.send(res);
        }));
        rx.await
            .map_err(|_| io::Error::other("flusher dropped a completion"))?
    }

    /// Flushes sled: makes every sled write issued before this call durable.
    pub async fn sync_db(&self) -> io::Result<()> {
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        let flush = |db: &sled::Db| {
            db.flush()
                .map(|_| ())
                .map_err(|e| io::Error::other(e.to_string()))
        };
        match self.mode {
            // A simulation must not hand work to another thread.
            FlushMode::Inline => flush(&self.db),
            FlushMode::Thread => {
                let db = self.db.clone();
                tokio::task::spawn_blocking(move || flush(&db))
                    .await
                    .map_err(|e| io::Error::other(e.to_string()))?
            }
        }
    }

    /// Flush counters.
    pub fn stats(&self) -> &FlushStats {
        &self.stats
    }
}

fn run(wal: Wal, rx: mpsc::Receiver<Completion>, stats: &FlushStats) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let result = wal.sync().map_err(|e| e.to_string());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_modes_complete_every_submission_after_a_flush() {
        for mode in [FlushMode::Thread, FlushMode::Inline] {
            let dir = tempfile::tempdir().unwrap();
            let db = sled::Config::new()
                .path(dir.path())
                .flush_every_ms(None)
                .open()
                .unwrap();
            let wal =
                Wal::open(&dir.path().join("wal"), crate::wal::DEFAULT_SEGMENT_BYTES).unwrap();
            let flusher = Flusher::new(wal.clone(), db, mode).unwrap();
            let (tx, rx) = mpsc::channel();
            for i in 0..10u8 {
                wal.append(1, &[(u64::from(i) + 1, vec![i])]).unwrap();
                let tx = tx.clone();
                flusher.submit(Box::new(move |r| tx.send(r.is_ok()).unwrap()));
            }
            let done: Vec<bool> = (0..10).map(|_| rx.recv().unwrap()).collect();
            assert!(done.iter().all(|ok| *ok), "{mode:?}");
            let s = flusher.stats();
            assert_eq!(s.completions.load(Ordering::Relaxed), 10);
            assert!(s.flushes.load(Ordering::Relaxed) >= 1);
            if mode == FlushMode::Inline {
                assert_eq!(
                    s.flushes.load(Ordering::Relaxed),
                    10,
                    "inline mode flushes per submission"
                );
            }
        }
    }
}
