//! The node's background tasks (reconciler, coordinator, lease expiry,
//! history retention), so that `Node::shutdown` stops every one of them.
//!
//! Each task gets a [`Shutdown`] signal and holds only a weak reference to
//! the node: it ends when told to or when the node is gone, whichever comes
//! first, and never keeps a stopped node alive.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Resolves once the node shuts down.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Waits for the shutdown signal.
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// Whether shutdown has begun.
    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    /// Sleeps for `d`; returns false when shutdown came first.
    pub async fn sleep(&mut self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => !self.is_set(),
            _ = self.wait() => false,
        }
    }
}

/// The set of background tasks of one node.
pub struct Tasks {
    signal: watch::Sender<bool>,
    handles: Mutex<Vec<(&'static str, JoinHandle<()>)>>,
}

impl Default for Tasks {
    fn default() -> Self {
        Self {
            signal: watch::channel(false).0,
            handles: Mutex::new(Vec::new()),
        }
    }
}

impl Tasks {
    /// Starts `task`, named for logs.
    pub fn spawn<F, Fut>(&self, name: &'static str, task: F)
    where
        F: FnOnce(Shutdown) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let fut = task(Shutdown(self.signal.subscribe()));
        let handle = tokio::spawn(fut);
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name, handle));
    }

    /// Signals every task and waits (bounded) for them to end.
    pub async fn stop(&self) {
        self.signal.send_replace(true);
        let handles = std::mem::take(&mut *self.handles.lock().unwrap_or_else(|p| p.into_inner()));
        for (name, mut handle) in handles {
            if tokio::time::timeout(Duration::from_secs(5), &mut handle)
                .await
                .is_err()
            {
                tracing::warn!(
                    task = name,
                    "background task did not stop in time; aborting it"
                );
                handle.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_ends_every_task() {
        let tasks = Tasks::default();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..3 {
            let tx = tx.clone();
            tasks.spawn("test", move |mut shutdown| async move {
                while shutdown.sleep(Duration::from_millis(5)).await {}
                let _ = tx.send(());
            });
        }
        tasks.stop().await;
        drop(tx);
        let mut ended = 0;
        while rx.recv().await.is_some() {
            ended += 1;
        }
        assert_eq!(ended, 3);
    }
}
