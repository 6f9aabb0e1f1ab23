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
use palisade_shard::ClusterMap;
use palisade_storage::{
    Flusher, LeaseRecord, LockRecord, SnapshotStore, StateBatch, StateTree, StoreError,
};
use serde::{Deserialize, Serialize};

use crate::slots::SlotOutcome;
use crate::types::{
    Command, CommandOp, CommandResult, GroupId, LEASE_GROUP_SHIFT, NodeId, OpResult, Rejection,
    Txn, TxnOp, TypeConfig,
};

const APPLIED: &str = "applied";
const MEMBERSHIP: &str = "membership";
/// Meta record of the meta group holding the cluster map.
const CLUSTER_MAP: &str = "cluster_map";

type Membership = StoredMembership<NodeId, BasicNode>;
type SnapMeta = SnapshotMeta<NodeId, BasicNode>;

/// The cluster map as the meta group's state holds it, and where each new
/// version is published for the node (its router, reconciler, coordinator).
pub struct MapState {
    map: Arc<ClusterMap>,
    publish: tokio::sync::watch::Sender<Arc<ClusterMap>>,
}

impl MapState {
    /// A publisher starting from the empty map.
    pub fn new(publish: tokio::sync::watch::Sender<Arc<ClusterMap>>) -> Self {
        Self {
            map: Arc::new(ClusterMap::default()),
            publish,
        }
    }
}

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
    /// The meta group only: the cluster map.
    map: Option<MapState>,
}

/// What one `apply` call works on.
struct Apply<'a> {
    batch: StateBatch<'a>,
    group: GroupId,
    /// The meta group only: the map as the entries so far leave it.
    map: Option<ClusterMap>,
}

impl StateMachine {
    pub fn new(
        group: GroupId,
        state: StateTree,
        snapshots: SnapshotStore,
        flusher: Flusher,
        map: Option<MapState>,
    ) -> Result<Self, StoreError> {
        let applied: Option<LogId<NodeId>> = state.meta(APPLIED)?.flatten();
        state.set_applied(applied.map_or(0, |l| l.index));
        let mut sm = Self {
            group,
            state,
            snapshots,
            flusher,
            built: 0,
            installed: Arc::new(AtomicU64::new(0)),
            map,
        };
        sm.load_map()?;
        Ok(sm)
    }

    /// Reads the stored cluster map (meta group) and publishes it.
    fn load_map(&mut self) -> Result<(), StoreError> {
        let Some(m) = &mut self.map else {
            return Ok(());
        };
        let stored: ClusterMap = self.state.meta(CLUSTER_MAP)?.unwrap_or_default();
        m.map = Arc::new(stored);
        m.publish.send_replace(m.map.clone());
        Ok(())
    }

    /// Counter of snapshots installed from a leader.
    pub fn installed_counter(&self) -> Arc<AtomicU64> {
        self.installed.clone()
    }

    fn apply_command(
        ctx: &mut Apply<'_>,
        log_id: &LogId<NodeId>,
        revision: u64,
        cmd: &Command,
    ) -> Result<CommandResult, StoreError> {
        let batch = &mut ctx.batch;
        if let Some(id) = &cmd.request_id
            && let Some(done) = batch.dedup_get(id.client_id, id.seq)?
        {
            // A retry of a write that already applied: answer as before.
            return decode_result(&done);
        }
        if let Some(why) = crate::slots::check_write(batch, &cmd.op) {
            // Not this group's to write (now): nothing happened, and nothing
            // is remembered for the request id, so a retry where the slot
            // lives applies it.
            return Ok(rejected(revision, why));
        }
        let result = match &cmd.op {
            CommandOp::Txn(txn) => Self::apply_txn(batch, revision, txn)?,
            // Compactions are applied by `apply`, in a batch of their own.
            CommandOp::Compact { .. } => CommandResult {
                revision,
                ..CommandResult::default()
            },
            CommandOp::LeaseGrant { ttl_ms } => {
                // Only in logs of earlier versions: the id embeds the group.
                let id = (ctx.group << LEASE_GROUP_SHIFT) | revision;
                Self::grant(batch, revision, id, *ttl_ms)?
            }
            CommandOp::LeaseGrantIn { ttl_ms, slot } => {
                let id = palisade_shard::lease_id(*slot, revision);
                Self::grant(batch, revision, id, *ttl_ms)?
            }
            CommandOp::LeaseRevoke { id } => Self::end_lease(batch, revision, *id)?,
            CommandOp::Batch(cmds) => {
                let mut each = Vec::with_capacity(cmds.len());
                for inner in cmds {
                    each.push(match inner.op {
                        // Never produced (the proposer batches client
                        // transactions only); answered, not applied.
                        CommandOp::Batch(_)
                        | CommandOp::Compact { .. }
                        | CommandOp::Map(_)
                        | CommandOp::Slots(_) => applied(revision, Vec::new()),
                        _ => Self::apply_command(ctx, log_id, revision, inner)?,
                    });
                }
                CommandResult {
                    batch: each,
                    ..applied(revision, Vec::new())
                }
            }
            CommandOp::Lock { name, lease } => Self::lock(batch, log_id, revision, name, *lease)?,
            CommandOp::Unlock { name, token } => match batch.lock_get(name)? {
                Some(held) if held.token == *token => {
                    batch.lock_delete(name);
                    if let Some(mut lease) = batch.lease_get(held.lease)? {
                        lease.locks.remove(name);
                        batch.lease_put(held.lease, &lease)?;
                    }
                    applied(revision, Vec::new())
                }
                other => rejected(
                    revision,
                    Rejection::NotLockHolder {
                        current: other.map_or(0, |l| l.token),
                    },
                ),
            },
            CommandOp::Map(m) => match &mut ctx.map {
                None => rejected(
                    revision,
                    Rejection::BadSlots("only the meta group holds the cluster map".into()),
                ),
                Some(map) => {
                    let mut next = map.clone();
                    match next.apply(m) {
                        Ok(r) => {
                            batch.set_meta(CLUSTER_MAP, &next)?;
                            *map = next;
                            applied(revision, vec![OpResult::Map(r)])
                        }
                        Err(e) => rejected(revision, Rejection::Map(e)),
                    }
                }
            },
            // Applied by `apply` (they may move the revision).
            CommandOp::Slots(_) => applied(revision, Vec::new()),
        };
        let batch = &mut ctx.batch;
        if let Some(id) = &cmd.request_id {
            batch.dedup_put(id.client_id, id.seq, encode_result(&result)?);
            batch.dedup_forget_below(id.client_id, id.first_incomplete_seq.min(id.seq))?;
        }
        if result.rejected.is_none() {
            let slots = crate::slots::written_slots(&cmd.op);
            if !slots.is_empty() {
                let group = ctx.group;
                crate::observe::report(|| crate::observe::ApplyEvent {
                    group,
                    index: log_id.index,
                    what: crate::observe::Applied::Write { slots },
                });
            }
        }
        Ok(result)
    }

    fn grant(
        batch: &mut StateBatch<'_>,
        revision: u64,
        id: u64,
        ttl_ms: u64,
    ) -> Result<CommandResult, StoreError> {
        let record = LeaseRecord {
            ttl_ms,
            ..LeaseRecord::default()
        };
        batch.lease_put(id, &record)?;
        Ok(applied(
            revision,
            vec![OpResult::LeaseGranted { id, ttl_ms }],
        ))
    }

    /// Ends lease `id`: deletes the keys still attached to it and releases
    /// the locks still held with it.
    fn end_lease(
        batch: &mut StateBatch<'_>,
        revision: u64,
        id: u64,
    ) -> Result<CommandResult, StoreError> {
        let Some(lease) = batch.lease_get(id)? else {
            return Ok(rejected(revision, Rejection::LeaseNotFound { id }));
        };
        for key in &lease.keys {
            if batch.get(key)?.is_some_and(|r| r.lease == id) {
                batch.delete(key, revision)?;
            }
        }
        for name in &lease.locks {
            if batch.lock_get(name)?.is_some_and(|l| l.lease == id) {
                batch.lock_delete(name);
            }
        }
        batch.lease_delete(id);
        Ok(applied(revision, Vec::new()))
    }

    /// Takes lock `name` with `lease` if it is free; re-taking it with the
    /// same lease returns the token it already has.
    fn lock(
        batch: &mut StateBatch<'_>,
        log_id: &LogId<NodeId>,
        revision: u64,
        name: &[u8],
        lease_id: u64,
    ) -> Result<CommandResult, StoreError> {
        let Some(mut lease) = batch.lease_get(lease_id)? else {
            return Ok(rejected(
                revision,
                Rejection::LeaseNotFound { id: lease_id },
            ));
        };
        match batch.lock_get(name)? {
            Some(held) if held.lease == lease_id => Ok(applied(
                revision,
                vec![OpResult::LockAcquired {
                    token: held.token,
                    term: held.term,
                }],
            )),
            Some(held) => Ok(rejected(
                revision,
                Rejection::LockHeld {
                    lease: held.lease,
                    token: held.token,
                },
            )),
            None => {
                // The entry's revision: unique and increasing across every
                // leader of the group, unlike a term, and across moves of
                // the lock's slot (see `slots`).
                let record = LockRecord {
                    lease: lease_id,
                    token: revision,
                    term: log_id.leader_id.term,
                };
                batch.lock_put(name, &record)?;
                lease.locks.insert(name.to_vec());
                batch.lease_put(lease_id, &lease)?;
                Ok(applied(
                    revision,
                    vec![OpResult::LockAcquired {
                        token: record.token,
                        term: record.term,
                    }],
                ))
            }
        }
    }

    fn apply_txn(
        batch: &mut StateBatch<'_>,
        revision: u64,
        txn: &Txn,
    ) -> Result<CommandResult, StoreError> {
        // The fence is checked in the same apply as the write: no window
        // between the check and the effect.
        if let Some(fence) = &txn.fence {
            let current = batch.lock_get(&fence.lock)?.map_or(0, |l| l.token);
            if current == 0 || current != fence.token {
                return Ok(rejected(
                    revision,
                    Rejection::StaleFence {
                        lock: fence.lock.clone(),
                        current,
                    },
                ));
            }
        }
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
        for op in branch {
            if let TxnOp::Put { lease, .. } = op
                && *lease != 0
                && batch.lease_get(*lease)?.is_none()
            {
                return Ok(rejected(revision, Rejection::LeaseNotFound { id: *lease }));
            }
        }
        let mut results = Vec::with_capacity(branch.len());
        for op in branch {
            results.push(match op {
                TxnOp::Put { key, value, lease } => {
                    let prev = batch.get(key)?;
                    let was = prev.as_ref().map_or(0, |r| r.lease);
                    if was != *lease {
                        Self::detach(batch, key, was)?;
                        Self::attach(batch, key, *lease)?;
                    }
                    OpResult::Put {
                        prev: batch.put_with_lease(key, value.clone(), revision, *lease)?,
                    }
                }
                TxnOp::Delete { key } => {
                    let prev = batch.delete(key, revision)?;
                    if let Some(p) = &prev {
                        Self::detach(batch, key, p.lease)?;
                    }
                    OpResult::Delete { prev }
                }
                TxnOp::Get { key } => OpResult::Get {
                    record: batch.get(key)?,
                },
            });
        }
        Ok(CommandResult {
            revision,
            succeeded,
            results,
            rejected: None,
            batch: Vec::new(),
        })
    }

    fn attach(batch: &mut StateBatch<'_>, key: &[u8], lease: u64) -> Result<(), StoreError> {
        if lease != 0
            && let Some(mut record) = batch.lease_get(lease)?
        {
            record.keys.insert(key.to_vec());
            batch.lease_put(lease, &record)?;
        }
        Ok(())
    }

    fn detach(batch: &mut StateBatch<'_>, key: &[u8], lease: u64) -> Result<(), StoreError> {
        if lease != 0
            && let Some(mut record) = batch.lease_get(lease)?
        {
            record.keys.remove(key);
            batch.lease_put(lease, &record)?;
        }
        Ok(())
    }

    fn read_snapshot(&self) -> Result<Option<(SnapMeta, Vec<u8>)>, StoreError> {
        let Some((meta, data)) = self.snapshots.load()? else {
            return Ok(None);
        };
        Ok(Some((decode(&meta)?, data)))
    }
}

fn applied(revision: u64, results: Vec<OpResult>) -> CommandResult {
    CommandResult {
        revision,
        succeeded: true,
        results,
        rejected: None,
        batch: Vec::new(),
    }
}

fn rejected(revision: u64, why: Rejection) -> CommandResult {
    CommandResult {
        revision,
        succeeded: false,
        results: Vec::new(),
        rejected: Some(why),
        batch: Vec::new(),
    }
}

/// Commits `batch` as the effects of the entries up to `last` (nothing to
/// do when no entry was applied).
fn commit_applied(
    mut batch: StateBatch<'_>,
    last: Option<LogId<NodeId>>,
) -> Result<(), StoreError> {
    if let Some(last) = last {
        batch.set_meta(APPLIED, &Some(last))?;
        batch.set_applied(last.index);
        batch.commit()?;
    }
    Ok(())
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
            .sync_db()
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
        let mut ctx = Apply {
            batch: self.state.batch(),
            group: self.group,
            map: self.map.as_ref().map(|m| (*m.map).clone()),
        };
        let map_before = ctx.map.clone();
        let mut results = Vec::new();
        let mut last = None;
        for entry in entries {
            let index = entry.log_id.index;
            let revision = index + ctx.batch.rev_offset();
            let result = match &entry.payload {
                EntryPayload::Blank => applied(revision, Vec::new()),
                EntryPayload::Normal(Command {
                    op: CommandOp::Compact { revision: to },
                    ..
                }) => {
                    // Compaction reads the committed tree, so first commit
                    // what this call applied so far (with its applied id, so
                    // a crash in between re-applies nothing twice).
                    let done = std::mem::replace(&mut ctx.batch, self.state.batch());
                    commit_applied(done, last).map_err(sm_write_err)?;
                    // Never past this entry: revisions above it do not exist.
                    let succeeded = ctx
                        .batch
                        .compact((*to).min(revision))
                        .map_err(sm_write_err)?;
                    CommandResult {
                        succeeded,
                        ..applied(revision, Vec::new())
                    }
                }
                EntryPayload::Normal(Command {
                    op: CommandOp::Slots(cmd),
                    ..
                }) => {
                    let outcome = crate::slots::apply(&mut ctx.batch, self.group, index, cmd)
                        .map_err(sm_write_err)?;
                    tracing::debug!(
                        group = self.group,
                        index,
                        command = cmd.describe(),
                        outcome = outcome.describe(),
                        "slot command applied"
                    );
                    if !matches!(
                        outcome,
                        SlotOutcome::Refused(_) | SlotOutcome::Pinned { .. }
                    ) && let Some(own) = ctx.batch.ownership()
                    {
                        let group = self.group;
                        crate::observe::report(|| crate::observe::ApplyEvent {
                            group,
                            index,
                            what: crate::observe::Applied::Ownership {
                                owned: own.owned.clone(),
                                frozen: own.frozen.clone(),
                            },
                        });
                    }
                    match outcome {
                        SlotOutcome::Applied => applied(revision, Vec::new()),
                        SlotOutcome::Lifted(offset) => applied(index + offset, Vec::new()),
                        SlotOutcome::Refused(why) => rejected(revision, Rejection::BadSlots(why)),
                        SlotOutcome::Pinned { lease, slots } => {
                            rejected(revision, Rejection::Pinned { lease, slots })
                        }
                    }
                }
                EntryPayload::Normal(cmd) => {
                    Self::apply_command(&mut ctx, &entry.log_id, revision, cmd)
                        .map_err(sm_write_err)?
                }
                EntryPayload::Membership(m) => {
                    let stored = StoredMembership::new(Some(entry.log_id), m.clone());
                    ctx.batch
                        .set_meta(MEMBERSHIP, &stored)
                        .map_err(sm_write_err)?;
                    applied(revision, Vec::new())
                }
            };
            results.push(result);
            last = Some(entry.log_id);
        }
        commit_applied(ctx.batch, last).map_err(sm_write_err)?;
        if let (Some(state), Some(map)) = (&mut self.map, ctx.map)
            && Some(&map) != map_before.as_ref()
        {
            state.map = Arc::new(map);
            state.publish.send_replace(state.map.clone());
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        self.built += 1;
        // Called between applies, so these reads see one consistent state.
        let copy = (|| -> Result<_, StoreError> {
            // openraft purges the log up to this snapshot afterwards (after
            // a flush): the state that covers those entries must be in sled
            // by then, not only in the pending overlay.
            self.state.persist()?;
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
        let index = meta.last_log_id.map_or(0, |l| l.index);
        self.state.import(records, index).map_err(snap_err)?;
        // The copied meta records already say this; writing them again makes
        // the state agree with `meta` even if the sender's copy was older.
        let mut batch = self.state.batch();
        batch
            .set_meta(APPLIED, &meta.last_log_id)
            .map_err(snap_err)?;
        batch
            .set_meta(MEMBERSHIP, &meta.last_membership)
            .map_err(snap_err)?;
        batch.set_applied(index);
        batch.commit().map_err(snap_err)?;
        // The log up to the snapshot is purged next; sled must hold it all.
        self.state.persist().map_err(snap_err)?;
        save_snapshot(&self.snapshots, meta, &data).map_err(snap_err)?;
        self.flusher
            .sync_db()
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        self.load_map().map_err(snap_err)?;
        self.installed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(group = self.group, index, "installed snapshot");
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

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, RaftSnapshotBuilder};
    use palisade_storage::NodeStore;

    use super::*;
    use crate::types::{Compare, CompareOp, CompareTarget, RequestId, Txn};

    fn open(dir: &std::path::Path) -> StateMachine {
        let store = NodeStore::open(dir, 8 * 1024 * 1024).unwrap();
        StateMachine::new(
            1,
            store.state_tree(1).unwrap(),
            store.snapshot_store(1).unwrap(),
            store.flusher().clone(),
            None,
        )
        .unwrap()
    }

    fn entry(index: u64, cmd: Command) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(cmd),
        }
    }

    fn put(key: &str, value: &str) -> Command {
        Command::txn(
            None,
            Txn::single(TxnOp::Put {
                key: key.into(),
                value: value.into(),
                lease: 0,
            }),
        )
    }

    fn cas(key: &str, expect: &str, new: &str) -> Command {
        Command::txn(
            None,
            Txn {
                compares: vec![Compare {
                    key: key.into(),
                    op: CompareOp::Equal,
                    target: CompareTarget::Value(expect.into()),
                }],
                success: vec![TxnOp::Put {
                    key: key.into(),
                    value: new.into(),
                    lease: 0,
                }],
                failure: vec![TxnOp::Get { key: key.into() }],
                fence: None,
            },
        )
    }

    /// A batch entry applies its transactions in order at its own revision,
    /// answers each separately, and deduplicates each by its request id.
    #[tokio::test]
    async fn a_batch_entry_applies_each_transaction_with_its_own_result() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open(dir.path());
        let with_id = |seq: u64, cmd: Command| Command {
            request_id: Some(RequestId {
                client_id: 9,
                seq,
                first_incomplete_seq: 1,
            }),
            ..cmd
        };
        let batch = |cmds: Vec<Command>| Command {
            request_id: None,
            op: CommandOp::Batch(cmds),
        };
        let results = sm
            .apply(vec![
                entry(1, put("a", "1")),
                entry(
                    2,
                    batch(vec![
                        with_id(1, put("b", "x")),
                        with_id(2, cas("a", "1", "2")),
                        with_id(3, cas("c", "nope", "3")),
                    ]),
                ),
                // A retry of seq 1 in a later batch answers as before and
                // writes nothing.
                entry(3, batch(vec![with_id(1, put("b", "y")), put("d", "4")])),
            ])
            .await
            .unwrap();
        let b2 = &results[1].batch;
        assert_eq!(b2.len(), 3);
        assert!(b2.iter().all(|r| r.revision == 2));
        assert!(b2[0].succeeded && b2[1].succeeded && !b2[2].succeeded);
        let b3 = &results[2].batch;
        assert_eq!(b3.len(), 2);
        assert_eq!(b3[0], b2[0], "the retry gets the first answer");
        assert_eq!(b3[1].revision, 3);
        let rec = |k: &[u8]| sm.state.get(k).unwrap().0.unwrap();
        assert_eq!(
            (rec(b"a").value, rec(b"a").mod_revision),
            (b"2".to_vec(), 2)
        );
        assert_eq!(
            (rec(b"b").value, rec(b"b").mod_revision),
            (b"x".to_vec(), 2)
        );
        assert_eq!(rec(b"d").mod_revision, 3);
        assert_eq!(sm.state.get(b"c").unwrap().0, None);
        // History: the version of `a` replaced at revision 2 is readable
        // at revision 1.
        let at1 = sm.state.get_at(b"a", 1).unwrap();
        assert_eq!(at1.0.map(|r| r.value), Some(b"1".to_vec()));
    }

    #[tokio::test]
    async fn applies_puts_txns_and_deletes_with_revisions() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open(dir.path());
        let del = Command::txn(None, Txn::single(TxnOp::Delete { key: b"b".to_vec() }));
        let results = sm
            .apply(vec![
                entry(1, put("a", "1")),
                entry(2, cas("a", "1", "2")),
                entry(3, cas("a", "1", "3")),
                entry(4, put("b", "x")),
                entry(5, del),
            ])
            .await
            .unwrap();
        assert_eq!(
            results.iter().map(|r| r.revision).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        assert!(
            results[1].succeeded,
            "entry 2 sees entry 1 within one batch"
        );
        assert!(!results[2].succeeded);
        match &results[2].results[0] {
            OpResult::Get { record: Some(r) } => assert_eq!(r.value, b"2"),
            other => panic!("failure branch should read the key: {other:?}"),
        }
        assert!(matches!(
            &results[4].results[0],
            OpResult::Delete { prev: Some(_) }
        ));
        let (a, rev) = sm.state.get(b"a").unwrap();
        let a = a.unwrap();
        assert_eq!(
            (
                a.value.as_slice(),
                a.create_revision,
                a.mod_revision,
                a.version
            ),
            (&b"2"[..], 1, 2, 2)
        );
        assert_eq!(rev, 5);
        assert_eq!(sm.state.get(b"b").unwrap().0, None);
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(5));
    }

    #[tokio::test]
    async fn a_request_id_applies_once_and_is_forgotten_when_the_client_moves_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open(dir.path());
        let with_id = |value: &str, seq, first| Command {
            request_id: Some(RequestId {
                client_id: 9,
                seq,
                first_incomplete_seq: first,
            }),
            ..put("k", value)
        };
        let r = sm
            .apply(vec![
                entry(1, with_id("a", 1, 1)),
                entry(2, with_id("b", 1, 1)),
            ])
            .await
            .unwrap();
        assert_eq!(r[0], r[1], "the retry answers with the first result");
        let rec = sm.state.get(b"k").unwrap().0.unwrap();
        assert_eq!((rec.value.as_slice(), rec.version), (&b"a"[..], 1));
        // Seq 2 says seq 1 is done: its record goes, so a (buggy) replay of
        // seq 1 would apply again — the client promised it never will.
        sm.apply(vec![entry(3, with_id("c", 2, 2))]).await.unwrap();
        let batch = sm.state.batch();
        assert_eq!(batch.dedup_get(9, 1).unwrap(), None);
        assert!(batch.dedup_get(9, 2).unwrap().is_some());
    }

    #[tokio::test]
    async fn compaction_applies_in_order_with_the_writes_around_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open(dir.path());
        let compact = |revision| Command {
            request_id: None,
            op: CommandOp::Compact { revision },
        };
        let results = sm
            .apply(vec![
                entry(1, put("k", "1")),
                entry(2, put("k", "2")),
                entry(3, put("k", "3")),
                entry(4, compact(3)),
                entry(5, put("k", "5")),
                entry(6, compact(100)),
            ])
            .await
            .unwrap();
        assert!(results[3].succeeded);
        assert!(results[5].succeeded, "clamped to its own revision");
        assert_eq!(sm.state.compacted(), 6);
        assert_eq!(sm.state.get_at(b"k", 6).unwrap().0.unwrap().value, b"5");
        assert!(sm.state.get_at(b"k", 5).is_err());
        let r = sm.apply(vec![entry(7, compact(2))]).await.unwrap();
        assert!(!r[0].succeeded, "compaction never moves backwards");
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(7));
    }

    #[tokio::test]
    async fn locks_hand_out_increasing_tokens_and_fence_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open(dir.path());
        let op = |op| Command {
            request_id: None,
            op,
        };
        let fenced = |value: &str, token| {
            let mut c = put("data", value);
            if let CommandOp::Txn(t) = &mut c.op {
                t.fence = Some(crate::types::Fence {
                    lock: b"L".to_vec(),
                    token,
                });
            }
            c
        };
        let r = sm
            .apply(vec![
                entry(1, op(CommandOp::LeaseGrant { ttl_ms: 1000 })),
                entry(2, op(CommandOp::LeaseGrant { ttl_ms: 1000 })),
            ])
            .await
            .unwrap();
        let lease = |r: &CommandResult| match r.results[0] {
            OpResult::LeaseGranted { id, .. } => id,
            _ => panic!("no lease"),
        };
        let (a, b) = (lease(&r[0]), lease(&r[1]));
        assert_eq!(a, (1 << LEASE_GROUP_SHIFT) | 1);
        let r = sm
            .apply(vec![
                entry(
                    3,
                    op(CommandOp::Lock {
                        name: b"L".to_vec(),
                        lease: a,
                    }),
                ),
                entry(
                    4,
                    op(CommandOp::Lock {
                        name: b"L".to_vec(),
                        lease: b,
                    }),
                ),
                entry(5, fenced("a1", 3)),
                entry(6, op(CommandOp::LeaseRevoke { id: a })),
                entry(
                    7,
                    op(CommandOp::Lock {
                        name: b"L".to_vec(),
                        lease: b,
                    }),
                ),
                entry(8, fenced("a2", 3)),
                entry(9, fenced("b1", 7)),
            ])
            .await
            .unwrap();
        assert!(matches!(
            r[0].results[0],
            OpResult::LockAcquired { token: 3, .. }
        ));
        assert!(matches!(
            r[1].rejected,
            Some(Rejection::LockHeld { token: 3, .. })
        ));
        assert!(r[2].rejected.is_none());
        assert!(matches!(
            r[4].results[0],
            OpResult::LockAcquired { token: 7, .. }
        ));
        assert_eq!(
            r[5].rejected,
            Some(Rejection::StaleFence {
                lock: b"L".to_vec(),
                current: 7
            })
        );
        assert!(r[6].rejected.is_none());
        assert_eq!(sm.state.get(b"data").unwrap().0.unwrap().value, b"b1");
    }

    #[tokio::test]
    async fn snapshot_installs_an_identical_state_elsewhere() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut source = open(d1.path());
        let entries: Vec<_> = (1..=20)
            .map(|i| entry(i, put(&format!("k{i}"), &i.to_string())))
            .collect();
        source.apply(entries).await.unwrap();
        let mut builder = source.get_snapshot_builder().await;
        // Applies after the copy must not leak into the snapshot.
        source
            .apply(vec![entry(21, put("late", "x"))])
            .await
            .unwrap();
        let snap = builder.build_snapshot().await.unwrap();
        assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(20));

        let mut target = open(d2.path());
        target
            .apply(vec![entry(1, put("stale", "gone"))])
            .await
            .unwrap();
        target
            .install_snapshot(&snap.meta, snap.snapshot)
            .await
            .unwrap();
        assert_eq!(target.state.get(b"k7").unwrap().0.unwrap().value, b"7");
        assert_eq!(target.state.get(b"stale").unwrap().0, None);
        assert_eq!(target.state.get(b"late").unwrap().0, None);
        assert_eq!(target.state.revision(), 20);
        assert_eq!(target.installed.load(Ordering::Relaxed), 1);
        let current = target.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, snap.meta);
    }

    /// A key or lock of a lease granted before the cluster map pins its
    /// slot to the group: freezing it is refused (typed) until the lease
    /// ends, while other slots freeze.
    #[tokio::test]
    async fn a_lease_from_before_the_map_pins_the_slots_of_its_keys() {
        use crate::types::SlotCommand;
        use palisade_shard::{SlotSet, slot_of};
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open(dir.path());
        let op = |op| Command {
            request_id: None,
            op,
        };
        let r = sm
            .apply(vec![entry(1, op(CommandOp::LeaseGrant { ttl_ms: 60_000 }))])
            .await
            .unwrap();
        let OpResult::LeaseGranted { id: lease, .. } = r[0].results[0] else {
            panic!("no lease");
        };
        let mut held = put("{a}key", "v");
        if let CommandOp::Txn(t) = &mut held.op {
            t.success = vec![TxnOp::Put {
                key: b"{a}key".to_vec(),
                value: b"v".to_vec(),
                lease,
            }];
        }
        let (pinned, free) = (slot_of(b"{a}key"), slot_of(b"{b}key"));
        assert_ne!(pinned, free);
        let slots = |cmd| op(CommandOp::Slots(cmd));
        let freeze = |move_id, s| {
            slots(SlotCommand::Freeze {
                move_id,
                slots: SlotSet::of([s]),
            })
        };
        let r = sm
            .apply(vec![
                entry(2, held),
                entry(
                    3,
                    slots(SlotCommand::Adopt {
                        slots: SlotSet::of([pinned, free]),
                    }),
                ),
                entry(4, freeze(1, pinned)),
                entry(5, freeze(2, free)),
            ])
            .await
            .unwrap();
        assert_eq!(
            r[2].rejected,
            Some(Rejection::Pinned {
                lease,
                slots: SlotSet::of([pinned])
            })
        );
        assert_eq!(r[3].rejected, None, "another slot freezes");
        let r = sm
            .apply(vec![
                entry(6, op(CommandOp::LeaseRevoke { id: lease })),
                entry(
                    7,
                    slots(SlotCommand::Unfreeze {
                        move_id: 2,
                        slots: SlotSet::of([free]),
                    }),
                ),
                entry(8, freeze(3, pinned)),
            ])
            .await
            .unwrap();
        assert_eq!(r[2].rejected, None, "free once the lease ended");
    }
}
