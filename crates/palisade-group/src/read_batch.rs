//! ReadIndex batching: concurrent linearizable reads of one group share a
//! leadership round.
//!
//! openraft's `get_read_log_id` sends a heartbeat to every follower and
//! waits for a quorum — one round per call. Under many concurrent reads that
//! is most of the leader's work. Here a read joins the *pending* round: the
//! round that has not started yet. One driver task at a time runs rounds;
//! each round takes every read that joined before it started and answers
//! them all with its read index.
//!
//! Why this stays linearizable: a read joins a round that starts *after*
//! the read arrived, so the round's read index covers every write committed
//! before the read arrived (the same argument as a read with its own round;
//! etcd batches its ReadIndex requests the same way). A read never joins a
//! round already in flight — that round may have confirmed leadership before
//! the read arrived.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::error::SharedError;

/// A round's outcome, shared by its readers.
pub(crate) type RoundResult = Result<u64, SharedError>;

#[derive(Default)]
struct State {
    /// The round that has not started yet, with the timeout it will use.
    pending: Option<(watch::Sender<Option<RoundResult>>, Duration)>,
    /// Whether a driver task is running rounds.
    driving: bool,
}

/// Batches the leadership rounds of one group.
#[derive(Clone, Default)]
pub(crate) struct ReadBatcher {
    state: Arc<Mutex<State>>,
}

impl ReadBatcher {
    /// Joins the pending round (starting a driver if none runs) and waits
    /// for its read index. `round(timeout)` performs one leadership round.
    pub(crate) async fn read_index<F, Fut>(
        &self,
        timeout: Duration,
        round: F,
    ) -> Result<u64, SharedError>
    where
        F: Fn(Duration) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = RoundResult> + Send + 'static,
    {
        let mut rx = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let rx = match &st.pending {
                Some((tx, _)) => tx.subscribe(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    st.pending = Some((tx, timeout));
                    rx
                }
            };
            if !st.driving {
                st.driving = true;
                tokio::spawn(drive(self.state.clone(), round));
            }
            rx
        };
        let waited = tokio::time::timeout(timeout, rx.wait_for(Option::is_some)).await;
        match waited {
            Ok(Ok(result)) => result.clone().unwrap_or_else(|| {
                Err(SharedError::NoQuorum(
                    "read round ended without a result".into(),
                ))
            }),
            Ok(Err(_)) => Err(SharedError::Stopped(std::sync::Arc::new(
                crate::error::Gone("read round abandoned"),
            ))),
            Err(_) => Err(SharedError::NoQuorum(format!(
                "leadership not confirmed within {timeout:?}"
            ))),
        }
    }
}

/// Runs rounds while reads are pending; each round answers every read that
/// joined before it started.
async fn drive<F, Fut>(state: Arc<Mutex<State>>, round: F)
where
    F: Fn(Duration) -> Fut,
    Fut: std::future::Future<Output = RoundResult>,
{
    loop {
        let taken = {
            let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
            match st.pending.take() {
                Some(p) => p,
                None => {
                    st.driving = false;
                    return;
                }
            }
        };
        let (tx, timeout) = taken;
        let result = round(timeout).await;
        // Readers that gave up dropped their receivers; nothing to do then.
        let _ = tx.send(Some(result));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// Many concurrent reads share few rounds, and a read that arrives while
    /// a round is in flight gets a *later* round's index, never the one in
    /// flight.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reads_share_rounds_that_start_after_they_arrive() {
        let batcher = ReadBatcher::default();
        let rounds = Arc::new(AtomicU64::new(0));
        let round = {
            let rounds = rounds.clone();
            move |_t: Duration| {
                let rounds = rounds.clone();
                async move {
                    // The "read index" of a round is its start order.
                    let n = rounds.fetch_add(1, Ordering::SeqCst) + 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok(n)
                }
            }
        };
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let b = batcher.clone();
            let r = round.clone();
            let started = rounds.clone();
            tasks.push(tokio::spawn(async move {
                let before = started.load(Ordering::SeqCst);
                let got = b.read_index(Duration::from_secs(5), r).await.unwrap();
                (before, got)
            }));
        }
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        for (rounds_started_before, got) in &results {
            assert!(
                got > rounds_started_before,
                "a read was answered by round {got}, which had started before it arrived"
            );
        }
        let total = rounds.load(Ordering::SeqCst);
        assert!(
            total < 20,
            "100 concurrent reads took {total} rounds; they should share them"
        );

        // Errors reach every reader of the round.
        let failing = |_t: Duration| async { Err(SharedError::NoQuorum("test".into())) };
        let e = batcher
            .read_index(Duration::from_secs(1), failing)
            .await
            .unwrap_err();
        assert!(matches!(e, SharedError::NoQuorum(_)));
    }
}
