//! Proposal batching: concurrent client transactions of one group go into
//! one Raft entry.
//!
//! Why: openraft 0.9's core task waits for each append's fsync before it
//! handles the next message, and it appends one entry per `client_write`.
//! Without batching a leader therefore fsyncs once per write and its write
//! rate is one flush cycle per write (about 2k/s on a 2-core VM), however
//! many clients wait.
//!
//! How: one driver task per group keeps at most [`IN_FLIGHT`] batches in
//! flight. Meanwhile new transactions queue; the next batch takes, in
//! arrival order, every queued transaction whose keys are disjoint from the
//! keys already in it and from the keys of every transaction it passed over.
//! A transaction that overlaps waits for a later batch, and so does every
//! later one that shares a key with it, which keeps the arrival order of
//! writes to each key; the rest of the queue still fills the batch, so one
//! hot key does not shrink every batch to a single write. A batch of one is
//! proposed as a plain command, so a lone writer pays nothing extra. The
//! commands of a batch apply in order at the entry's revision, each with its
//! own request id (deduplication) and result; disjoint keys mean no key gets
//! two versions at one revision.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::error::{GroupError, SharedError};
use crate::propose;
use crate::types::{Command, CommandOp, CommandResult, GroupId, Raft};

/// Most transactions in one entry.
const MAX_BATCH: usize = 256;

/// Most queued transactions one batch looks at beyond the ones it takes, so
/// a queue of conflicting writes cannot make the driver spin on it.
const MAX_EXAMINED: usize = 4 * MAX_BATCH;

/// Batches proposed and not yet answered, per group. Two let the next
/// batch's append overlap the previous one's replication round trip.
const IN_FLIGHT: usize = 2;

struct Pending {
    cmd: Command,
    keys: BTreeSet<Vec<u8>>,
    timeout: Duration,
    done: oneshot::Sender<Result<CommandResult, SharedError>>,
}

/// The keys a batchable command touches, or `None` when it must be proposed
/// alone.
pub(crate) fn batch_keys(cmd: &Command) -> Option<BTreeSet<Vec<u8>>> {
    match &cmd.op {
        CommandOp::Txn(txn) => Some(txn.keys().map(<[u8]>::to_vec).collect()),
        _ => None,
    }
}

/// Queues client transactions of one group for its driver task.
#[derive(Clone)]
pub(crate) struct WriteBatcher {
    group: GroupId,
    tx: mpsc::UnboundedSender<Pending>,
}

impl WriteBatcher {
    /// Starts the driver task for `raft` (it ends when the batcher is
    /// dropped).
    pub(crate) fn start(group: GroupId, raft: Raft) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(drive(group, raft, rx));
        Self { group, tx }
    }

    /// Proposes `cmd` (a transaction touching `keys`, see [`batch_keys`])
    /// as part of the next batch and waits up to `timeout` for its result.
    pub(crate) async fn write(
        &self,
        cmd: Command,
        keys: BTreeSet<Vec<u8>>,
        timeout: Duration,
    ) -> Result<CommandResult, GroupError> {
        let (done, rx) = oneshot::channel();
        let pending = Pending {
            cmd,
            keys,
            timeout,
            done,
        };
        if self.tx.send(pending).is_err() {
            return Err(GroupError::Stopped {
                group: self.group,
                source: std::sync::Arc::new(crate::error::Gone("write batcher stopped")),
            });
        }
        match tokio::time::timeout(timeout, rx).await {
            // Proposed (or about to be): it may still apply.
            Err(_) => Err(GroupError::UnknownOutcome { group: self.group }),
            Ok(Err(_)) => Err(GroupError::UnknownOutcome { group: self.group }),
            Ok(Ok(r)) => r.map_err(|f| f.into_group_error(self.group)),
        }
    }
}

async fn drive(group: GroupId, raft: Raft, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
    // Transactions passed over by earlier batches, in arrival order.
    let mut deferred: VecDeque<Pending> = VecDeque::new();
    loop {
        // Wait for a free slot first, so the batch collects everything that
        // queued meanwhile.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let first = match deferred.pop_front() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let mut next = Collecting::new(first);
        for p in std::mem::take(&mut deferred) {
            next.offer(p, &mut deferred);
        }
        let mut examined = 0;
        while next.batch.len() < MAX_BATCH && examined < MAX_EXAMINED {
            match rx.try_recv() {
                Ok(p) => next.offer(p, &mut deferred),
                Err(_) => break,
            }
            examined += 1;
        }
        let mut batch = next.batch;
        // Callers that already gave up need no answer.
        batch.retain(|p| !p.done.is_closed());
        if batch.is_empty() {
            continue;
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            run_batch(group, &raft, batch).await;
            drop(permit);
        });
    }
}

/// A batch being put together.
struct Collecting {
    batch: Vec<Pending>,
    /// Keys written by the batch.
    keys: BTreeSet<Vec<u8>>,
    /// Keys of the transactions passed over: a later transaction touching
    /// one of them must not overtake the earlier one.
    blocked: BTreeSet<Vec<u8>>,
}

impl Collecting {
    fn new(first: Pending) -> Self {
        Self {
            keys: first.keys.clone(),
            batch: vec![first],
            blocked: BTreeSet::new(),
        }
    }

    /// Takes `p` into the batch, or passes it over onto `deferred`.
    fn offer(&mut self, p: Pending, deferred: &mut VecDeque<Pending>) {
        if self.batch.len() < MAX_BATCH
            && p.keys.is_disjoint(&self.keys)
            && p.keys.is_disjoint(&self.blocked)
        {
            self.keys.extend(p.keys.iter().cloned());
            self.batch.push(p);
        } else {
            self.blocked.extend(p.keys.iter().cloned());
            deferred.push_back(p);
        }
    }
}

/// Proposes `batch` (one command alone, several as a batch entry) and
/// answers each of its callers.
async fn run_batch(group: GroupId, raft: &Raft, mut batch: Vec<Pending>) {
    let timeout = batch
        .iter()
        .map(|p| p.timeout)
        .max()
        .unwrap_or(Duration::from_secs(5));
    if batch.len() == 1 {
        let p = batch.remove(0);
        let r = propose(group, raft, p.cmd, timeout).await;
        let _ = p
            .done
            .send(r.map_err(|e| SharedError::from_group_error(&e)));
        return;
    }
    let cmds: Vec<Command> = batch.iter().map(|p| p.cmd.clone()).collect();
    let n = cmds.len();
    let entry = Command {
        request_id: None,
        op: CommandOp::Batch(cmds),
    };
    match propose(group, raft, entry, timeout).await {
        Ok(result) if result.batch.len() == n => {
            for (p, r) in batch.into_iter().zip(result.batch) {
                let _ = p.done.send(Ok(r));
            }
        }
        Ok(result) => {
            // Cannot happen with a state machine of this version; the
            // writes applied, but their results are not known here.
            tracing::error!(
                group,
                expected = n,
                got = result.batch.len(),
                "batch result has the wrong length"
            );
            for p in batch {
                let _ = p.done.send(Err(SharedError::UnknownOutcome));
            }
        }
        Err(e) => {
            let f = SharedError::from_group_error(&e);
            for p in batch {
                let _ = p.done.send(Err(f.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Txn;

    fn pending(keys: &[&str]) -> Pending {
        let (done, _) = oneshot::channel();
        Pending {
            cmd: Command {
                request_id: None,
                op: CommandOp::Txn(Txn::default()),
            },
            keys: keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
            timeout: Duration::from_secs(1),
            done,
        }
    }

    fn keys(p: &Pending) -> Vec<String> {
        p.keys
            .iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect()
    }

    #[test]
    fn a_conflicting_write_waits_without_closing_the_batch_or_being_overtaken() {
        let mut deferred = VecDeque::new();
        let mut next = Collecting::new(pending(&["a"]));
        for p in [
            pending(&["b"]),
            pending(&["a", "c"]), // overlaps the batch: waits
            pending(&["c"]),      // would overtake the write above on c: waits
            pending(&["d"]),
            pending(&["a"]), // hot key: waits behind the first
        ] {
            next.offer(p, &mut deferred);
        }
        let taken: Vec<Vec<String>> = next.batch.iter().map(keys).collect();
        assert_eq!(taken, vec![vec!["a"], vec!["b"], vec!["d"]]);
        let waiting: Vec<Vec<String>> = deferred.iter().map(keys).collect();
        assert_eq!(waiting, vec![vec!["a", "c"], vec!["c"], vec!["a"]]);

        // The next batch starts with the oldest waiting write and keeps the
        // order per key.
        let mut again = VecDeque::new();
        let mut next = Collecting::new(deferred.pop_front().unwrap());
        for p in deferred {
            next.offer(p, &mut again);
        }
        let taken: Vec<Vec<String>> = next.batch.iter().map(keys).collect();
        assert_eq!(taken, vec![vec!["a", "c"]]);
        let waiting: Vec<Vec<String>> = again.iter().map(keys).collect();
        assert_eq!(waiting, vec![vec!["c"], vec!["a"]]);
    }

    #[test]
    fn a_batch_stops_at_its_size_limit() {
        let mut deferred = VecDeque::new();
        let mut next = Collecting::new(pending(&["k0"]));
        for i in 1..=MAX_BATCH {
            next.offer(pending(&[&format!("k{i}")]), &mut deferred);
        }
        assert_eq!(next.batch.len(), MAX_BATCH);
        assert_eq!(deferred.len(), 1);
    }
}
