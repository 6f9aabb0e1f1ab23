//! Proposal batching: concurrent client transactions of one group go into
//! one Raft entry.
//!
//! Why: openraft 0.9's core task waits for each append's fsync before it
//! handles the next message, and it appends one entry per `client_write`.
//! Without batching a leader therefore fsyncs once per write and its write
//! rate is one flush cycle per write (about 2k/s on a 2-core VM), however
//! many clients wait.
//!
//! How: one driver task per group keeps at most one batch in flight. While
//! it is in flight, new transactions queue; the next batch takes every
//! queued transaction whose keys are disjoint from the keys already in it
//! (a later one that overlaps waits for the following batch, keeping the
//! arrival order of writes to a key). A batch of one is proposed as a plain
//! command, so a lone writer pays nothing extra. The commands of a batch
//! apply in order at the entry's revision, each with its own request id
//! (deduplication) and result; disjoint keys mean no key gets two versions
//! at one revision.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::error::{GroupError, SharedError};
use crate::propose;
use crate::types::{Command, CommandOp, CommandResult, GroupId, Raft};

/// Most transactions in one entry.
const MAX_BATCH: usize = 256;

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
                reason: "write batcher stopped".into(),
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
    let mut carried: Option<Pending> = None;
    loop {
        // Wait for a free slot first, so the batch collects everything that
        // queued meanwhile.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let first = match carried.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let mut keys = first.keys.clone();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) if p.keys.is_disjoint(&keys) => {
                    keys.extend(p.keys.iter().cloned());
                    batch.push(p);
                }
                Ok(p) => {
                    // Overlaps a write in this batch: first in the next.
                    carried = Some(p);
                    break;
                }
                Err(_) => break,
            }
        }
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
