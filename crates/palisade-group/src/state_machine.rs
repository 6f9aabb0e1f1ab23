//! The replicated state machine of one group: applies [`Command`]s to the
//! group's [`StateTree`], builds and installs snapshots.
//!
//! Apply is deterministic: given the same entries every replica produces the
//! same records and the same [`CommandResult`]s. Storage failures are
//! environmental and returned as openraft storage errors, which stop the
//! group on this node instead of letting it diverge.
//!
//! Snapshots are a bincode list of every record of the state tree (user keys,
//! dedup results, applied id, membership). The copy is taken in
//! `get_snapshot_builder`, which openraft calls between applies, so it is
//! consistent; encoding and persisting it runs concurrently with applies.

use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use palisade_storage::{Flusher, SnapshotStore, StateBatch, StateTree, StoreError};
use serde::{Deserialize, Serialize};

use crate::types::{Command, CommandResult, GroupId, NodeId, OpResult, TxnOp, TypeConfig};

const APPLIED: &str = "applied";
const MEMBERSHIP: &str = "membership";

type Membership = StoredMembership<NodeId, BasicNode>;
type SnapMeta = SnapshotMeta<NodeId, BasicNode>;

/// State machine of one group.
pub struct StateMachine {
    group: GroupId,
    state: StateTree,
    /// Holds the latest snapshot (meta + data).
    snapshots: SnapshotStore,
    flusher: Flusher,
    /// Disambiguates snapshot ids built at the same log id.
    built: u64,
    /// Snapshots installed from a leader since start (for status and tests).
    installed: Arc<AtomicU64>,
}

impl StateMachine {
    pub fn new(
        group: GroupId,
        state: StateTree,
        snapshots: SnapshotStore,
        flusher: Flusher,
    ) -> Result<Self, StoreError> {
        let applied: Option<LogId<NodeId>> = state.meta(APPLIED)?.flatten();
        state.set_revision(applied.map_or(0, |l| l.index));
        Ok(Self {
            group,
            state,
            snapshots,
            flusher,
            built: 0,
            installed: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Counter of snapshots installed from a leader.
    pub fn installed_counter(&self) -> Arc<AtomicU64> {
        self.installed.clone()
    }

    fn apply_command(
        batch: &mut StateBatch<'_>,
        revision: u64,
        cmd: &Command,
    ) -> Result<CommandResult, StoreError> {
        if let Some(id) = &cmd.request_id
            && let Some(done) = batch.dedup_get(id.client_id, id.seq)?
        {
            // A retry of a write that already applied: answer as before.
            return decode_result(&done);
        }
        let txn = &cmd.txn;
        let mut succeeded = true;
        for c in &txn.compares {
            if !c.holds(batch.get(&c.key)?.as_ref()) {
                succeeded = false;
                break;
            }
        }
        let branch = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        let mut results = Vec::with_capacity(branch.len());
        for op in branch {
            results.push(match op {
                TxnOp::Put { key, value } => OpResult::Put {
                    prev: batch.put(key, value.clone(), revision)?,
                },
                TxnOp::Delete { key } => OpResult::Delete {
                    prev: batch.delete(key)?,
                },
                TxnOp::Get { key } => OpResult::Get {
                    record: batch.get(key)?,
                },
            });
        }
        let result = CommandResult {
            revision,
            succeeded,
            results,
        };
        if let Some(id) = &cmd.request_id {
            batch.dedup_put(id.client_id, id.seq, encode_result(&result)?);
            batch.dedup_forget_below(id.client_id, id.first_incomplete_seq.min(id.seq))?;
        }
        Ok(result)
    }

    fn read_snapshot(&self) -> Result<Option<(SnapMeta, Vec<u8>)>, StoreError> {
        let Some((meta, data)) = self.snapshots.load()? else {
            return Ok(None);
        };
        Ok(Some((decode(&meta)?, data)))
    }
}

/// Persists a snapshot as the group's current one.
fn save_snapshot(
    snapshots: &SnapshotStore,
    meta: &SnapMeta,
    data: &[u8],
) -> Result<(), StoreError> {
    snapshots.save(&encode(meta)?, data)
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    Ok(bincode::serde::encode_to_vec(
        v,
        bincode::config::standard(),
    )?)
}

fn decode<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, StoreError> {
    Ok(bincode::serde::decode_from_slice(b, bincode::config::standard())?.0)
}

fn encode_result(r: &CommandResult) -> Result<Vec<u8>, StoreError> {
    encode(r)
}

fn decode_result(b: &[u8]) -> Result<CommandResult, StoreError> {
    decode(b)
}

fn sm_write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(&e).into()
}

fn sm_read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_state_machine(&e).into()
}

/// Builds a snapshot from a copy taken between applies.
pub struct SnapshotBuilder {
    group: GroupId,
    /// Set when the copy could not be taken; building then fails.
    copy_error: Option<String>,
    records: Vec<(Vec<u8>, Vec<u8>)>,
    applied: Option<LogId<NodeId>>,
    membership: Membership,
    snapshots: SnapshotStore,
    flusher: Flusher,
    seq: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        if let Some(e) = &self.copy_error {
            let e = StoreError::Corrupt {
                what: format!("copying the state for a snapshot: {e}"),
            };
            return Err(StorageIOError::read_state_machine(&e).into());
        }
        let records = std::mem::take(&mut self.records);
        let data = encode(&records).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let snapshot_id = match &self.applied {
            Some(l) => format!("g{}-{}-{}-{}", self.group, l.leader_id, l.index, self.seq),
            None => format!("g{}-empty-{}", self.group, self.seq),
        };
        let meta = SnapshotMeta {
            last_log_id: self.applied,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        save_snapshot(&self.snapshots, &meta, &data)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        self.flusher
            .sync()
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        tracing::info!(group = self.group, index = ?self.applied.map(|l| l.index), bytes = data.len(), "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        let applied = self
            .state
            .meta::<Option<LogId<NodeId>>>(APPLIED)
            .map_err(sm_read_err)?
            .flatten();
        let membership = self
            .state
            .meta::<Membership>(MEMBERSHIP)
            .map_err(sm_read_err)?
            .unwrap_or_default();
        Ok((applied, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = self.state.batch();
        let mut results = Vec::new();
        let mut last = None;
        for entry in entries {
            let revision = entry.log_id.index;
            let result = match &entry.payload {
                EntryPayload::Blank => CommandResult {
                    revision,
                    succeeded: true,
                    results: Vec::new(),
                },
                EntryPayload::Normal(cmd) => {
                    Self::apply_command(&mut batch, revision, cmd).map_err(sm_write_err)?
                }
                EntryPayload::Membership(m) => {
                    let stored = StoredMembership::new(Some(entry.log_id), m.clone());
                    batch.set_meta(MEMBERSHIP, &stored).map_err(sm_write_err)?;
                    CommandResult {
                        revision,
                        succeeded: true,
                        results: Vec::new(),
                    }
                }
            };
            results.push(result);
            last = Some(entry.log_id);
        }
        if let Some(last) = last {
            batch.set_meta(APPLIED, &Some(last)).map_err(sm_write_err)?;
            batch.set_revision(last.index);
            batch.commit().map_err(sm_write_err)?;
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        self.built += 1;
        // Called between applies, so these reads see one consistent state.
        let copy = (|| -> Result<_, StoreError> {
            let records = self.state.export()?;
            let applied: Option<LogId<NodeId>> = self.state.meta(APPLIED)?.flatten();
            let membership: Membership = self.state.meta(MEMBERSHIP)?.unwrap_or_default();
            Ok((records, applied, membership))
        })();
        // This method cannot fail; a failed copy is reported by build_snapshot.
        let (copy, copy_error) = match copy {
            Ok(c) => (c, None),
            Err(e) => (
                (Vec::new(), None, Membership::default()),
                Some(e.to_string()),
            ),
        };
        let (records, applied, membership) = copy;
        SnapshotBuilder {
            group: self.group,
            copy_error,
            records,
            applied,
            membership,
            snapshots: self.snapshots.clone(),
            flusher: self.flusher.clone(),
            seq: self.built,
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let snap_err = |e: StoreError| {
            StorageError::from(StorageIOError::write_snapshot(Some(meta.signature()), &e))
        };
        let records: Vec<(Vec<u8>, Vec<u8>)> = decode(&data).map_err(snap_err)?;
        let revision = meta.last_log_id.map_or(0, |l| l.index);
        self.state.import(records, revision).map_err(snap_err)?;
        // The copied meta records already say this; writing them again makes
        // the state agree with `meta` even if the sender's copy was older.
        let mut batch = self.state.batch();
        batch
            .set_meta(APPLIED, &meta.last_log_id)
            .map_err(snap_err)?;
        batch
            .set_meta(MEMBERSHIP, &meta.last_membership)
            .map_err(snap_err)?;
        batch.set_revision(revision);
        batch.commit().map_err(snap_err)?;
        save_snapshot(&self.snapshots, meta, &data).map_err(snap_err)?;
        self.flusher
            .sync()
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        self.installed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(group = self.group, index = revision, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let snap = self
            .read_snapshot()
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(snap.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}
