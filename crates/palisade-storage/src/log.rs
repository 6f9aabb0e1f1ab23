//! openraft's `RaftLogStorage` on the node's write-ahead log, with group
//! commit.
//!
//! The entries (bincode) live in the node's [`Wal`]; the sled tree
//! `g{g}/raft` holds `vote`, `committed` and `purged`.
//!
//! Durability: `append` writes the entries to the log file and hands
//! openraft's callback to the node's [`Flusher`]; openraft learns the entries
//! are stored only after the sync that covers them. `save_vote`, `truncate`
//! and `purge` wait for their writes to be durable before returning;
//! `save_committed` does not (it is a restart hint, see there).
//!
//! Logs written by earlier versions into the sled tree `g{g}/log` are moved
//! into the write-ahead log when the group opens.

use std::fmt::Debug;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    Entry, LogId, OptionalSend, RaftLogId, RaftLogReader, RaftTypeConfig, StorageError,
    StorageIOError, Vote,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{decode, encode};
use crate::keys::decode_log_key;
use crate::{Flusher, StoreError, Wal};

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "purged";
/// Set when this replica's log was found damaged (see [`mark_damaged`]).
const QUARANTINE: &str = "quarantine";

/// Records durably-to-be (the caller flushes) that group `group`'s log on
/// this node was damaged by `why`: the replica may have lost entries it
/// acknowledged, so it must not vote until a leader has re-sent them (see
/// [`LogStore::quarantine`]). The committed-index hint goes too: after a cut
/// the log may end in entries a later truncate had removed, and re-applying
/// "up to the hint, clamped to the log" could apply one of them.
///
/// A vote the replica won (committed, for itself) is kept but marked not
/// won: openraft restarts a replica holding such a vote straight into
/// leadership, with no election, and a leader that lost entries of its own
/// term would hand out their log ids again to different entries — which a
/// follower still holding the originals would take as already present.
pub(crate) fn mark_damaged(db: &sled::Db, group: u64, why: &str) -> Result<(), StoreError> {
    let raft = db.open_tree(format!("g{group}/raft"))?;
    raft.remove(COMMITTED)?;
    if let Some(bytes) = raft.get(VOTE)? {
        let mut vote: Vote<u64> = decode(&bytes)?;
        if vote.committed {
            vote.committed = false;
            raft.insert(VOTE, encode(&vote)?)?;
        }
    }
    raft.insert(QUARANTINE, encode(&why.to_string())?)?;
    Ok(())
}

/// Drops group `group`'s committed-index hint (after a torn write was cut;
/// the state is then rebuilt only up to what was applied).
pub(crate) fn forget_committed(db: &sled::Db, group: u64) -> Result<(), StoreError> {
    db.open_tree(format!("g{group}/raft"))?.remove(COMMITTED)?;
    Ok(())
}

/// The Raft log of one group.
pub struct LogStore<C: RaftTypeConfig> {
    group: u64,
    wal: Wal,
    raft: sled::Tree,
    flusher: Flusher,
    _types: PhantomData<C>,
}

impl<C: RaftTypeConfig> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        Self {
            group: self.group,
            wal: self.wal.clone(),
            raft: self.raft.clone(),
            flusher: self.flusher.clone(),
            _types: PhantomData,
        }
    }
}

impl<C: RaftTypeConfig> LogStore<C> {
    pub(crate) fn open(
        db: &sled::Db,
        wal: &Wal,
        group: u64,
        flusher: Flusher,
    ) -> Result<Self, StoreError> {
        let store = Self {
            group,
            wal: wal.clone(),
            raft: db.open_tree(format!("g{group}/raft"))?,
            flusher,
            _types: PhantomData,
        };
        store.migrate_sled_log(db)?;
        if let Some(purged) = store.read_raft::<LogId<C::NodeId>>(PURGED)? {
            store.wal.release(group, purged.index)?;
        }
        Ok(store)
    }

    /// Moves entries an earlier version kept in the sled tree `g{g}/log`
    /// into the write-ahead log (durably), then empties the tree.
    fn migrate_sled_log(&self, db: &sled::Db) -> Result<(), StoreError> {
        let name = format!("g{}/log", self.group);
        if !db
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == name.as_bytes())
        {
            return Ok(());
        }
        let tree = db.open_tree(&name)?;
        if tree.is_empty() {
            return Ok(());
        }
        let mut moved = 0usize;
        let mut chunk = Vec::new();
        for item in tree.iter() {
            let (k, v) = item?;
            let index = decode_log_key(&k).ok_or_else(|| StoreError::Corrupt {
                what: format!("group {}: malformed key in the old log tree", self.group),
            })?;
            chunk.push((index, v.to_vec()));
            if chunk.len() == 1024 {
                moved += chunk.len();
                self.wal.append(self.group, &std::mem::take(&mut chunk))?;
            }
        }
        moved += chunk.len();
        self.wal.append(self.group, &chunk)?;
        self.wal
            .sync()
            .map_err(|e| StoreError::Flush(e.to_string()))?;
        tree.clear()?;
        db.flush()?;
        tracing::info!(
            group = self.group,
            entries = moved,
            "moved the Raft log from sled into the write-ahead log"
        );
        Ok(())
    }

    /// The group this log belongs to.
    pub fn group(&self) -> u64 {
        self.group
    }

    /// Why this replica is quarantined, if it is: its log was found damaged
    /// and it may lack entries it acknowledged. Such a replica must neither
    /// vote nor campaign (a majority counting on its lost copy could elect a
    /// leader without them) until a leader has given them back.
    pub fn quarantine(&self) -> Result<Option<String>, StoreError> {
        self.read_raft(QUARANTINE)
    }

    /// Ends the quarantine, durably.
    pub async fn lift_quarantine(&self) -> Result<(), StoreError> {
        self.raft.remove(QUARANTINE)?;
        self.sync_db().await
    }

    fn read_raft<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StoreError> {
        self.raft.get(name)?.map(|v| decode(&v)).transpose()
    }

    fn write_raft<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StoreError> {
        self.raft.insert(name, encode(value)?)?;
        Ok(())
    }

    /// Waits until the log is durable.
    async fn sync_log(&self) -> Result<(), StoreError> {
        self.flusher
            .sync()
            .await
            .map_err(|e| StoreError::Flush(e.to_string()))
    }

    /// Waits until sled is durable.
    async fn sync_db(&self) -> Result<(), StoreError> {
        self.flusher
            .sync_db()
            .await
            .map_err(|e| StoreError::Flush(e.to_string()))
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId<C::NodeId>>, StoreError>
    where
        C::Entry: DeserializeOwned,
    {
        let Some((_, last)) = self.wal.bounds(self.group) else {
            return Ok(None);
        };
        match self.wal.read(self.group, last..last + 1)?.pop() {
            None => Ok(None),
            Some((_, v)) => {
                let entry: C::Entry = decode(&v)?;
                Ok(Some(entry.get_log_id().clone()))
            }
        }
    }
}

fn io_err<NID: openraft::NodeId>(e: StoreError) -> StorageError<NID> {
    StorageIOError::write_logs(&e).into()
}

fn read_err<NID: openraft::NodeId>(e: StoreError) -> StorageError<NID> {
    StorageIOError::read_logs(&e).into()
}

/// `range` as a half-open range of indexes.
fn index_range(range: &impl RangeBounds<u64>) -> std::ops::Range<u64> {
    let start = match range.start_bound() {
        Bound::Included(i) => *i,
        Bound::Excluded(i) => i.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(i) => i.saturating_add(1),
        Bound::Excluded(i) => *i,
        Bound::Unbounded => u64::MAX,
    };
    start..end
}

impl<C> RaftLogReader<C> for LogStore<C>
where
    C: RaftTypeConfig<Entry = Entry<C>>,
    C::D: Serialize + DeserializeOwned,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, StorageError<C::NodeId>> {
        let stored = self
            .wal
            .read(self.group, index_range(&range))
            .map_err(read_err)?;
        let mut out = Vec::with_capacity(stored.len());
        for (index, v) in stored {
            let entry: C::Entry = decode(&v).map_err(read_err)?;
            if index != entry.log_id.index {
                return Err(read_err(StoreError::Corrupt {
                    what: format!(
                        "group {}: log key does not match entry {}",
                        self.group, entry.log_id
                    ),
                }));
            }
            out.push(entry);
        }
        Ok(out)
    }
}

impl<C> RaftLogStorage<C> for LogStore<C>
where
    C: RaftTypeConfig<Entry = Entry<C>>,
    C::D: Serialize + DeserializeOwned,
{
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, StorageError<C::NodeId>> {
        let purged: Option<LogId<C::NodeId>> = self.read_raft(PURGED).map_err(read_err)?;
        let last = self.last_entry_log_id().map_err(read_err)?;
        // After a crash between recording `purged` and deleting the entries,
        // entries at or below `purged` may remain; `purged` still wins.
        let last = std::cmp::max(last, purged.clone());
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        let res = async {
            self.write_raft(VOTE, vote)?;
            self.sync_db().await
        };
        res.await.map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<C::NodeId>>, StorageError<C::NodeId>> {
        self.read_raft(VOTE)
            .map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<C::NodeId>>,
    ) -> Result<(), StorageError<C::NodeId>> {
        // Not waited on: the committed id is a restart hint (how far to
        // re-apply), not a safety fact — a lost update only means re-applying
        // less and learning the rest from the leader. It rides on the next
        // flush instead of costing an fsync on every commit (which put one
        // extra fsync per write on the leader's critical path). Because sled
        // recovers a prefix of the operations, a recovered committed id never
        // points past the entries appended before it; `read_committed` still
        // clamps it to the log.
        self.write_raft(COMMITTED, &committed).map_err(io_err)
    }

    async fn read_committed(
        &mut self,
    ) -> Result<Option<LogId<C::NodeId>>, StorageError<C::NodeId>> {
        let committed = self
            .read_raft::<Option<LogId<C::NodeId>>>(COMMITTED)
            .map_err(read_err)?
            .flatten();
        let purged: Option<LogId<C::NodeId>> = self.read_raft(PURGED).map_err(read_err)?;
        let last = std::cmp::max(self.last_entry_log_id().map_err(read_err)?, purged);
        Ok(match (committed, last) {
            (Some(c), Some(l)) if c.index > l.index => Some(l),
            (Some(_), None) => None,
            (c, _) => c,
        })
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<C>,
    ) -> Result<(), StorageError<C::NodeId>>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        for entry in entries {
            let bytes = encode(&entry).map_err(io_err)?;
            encoded.push((entry.log_id.index, bytes));
        }
        self.wal.append(self.group, &encoded).map_err(io_err)?;
        self.flusher
            .submit(Box::new(move |res| callback.log_io_completed(res)));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        tracing::debug!(group = self.group, index = log_id.index, "truncating log");
        self.wal
            .truncate(self.group, log_id.index)
            .map_err(io_err)?;
        self.sync_log().await.map_err(io_err)
    }

    async fn purge(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        tracing::debug!(group = self.group, index = log_id.index, "purging log");
        // The state that covers the purged entries (applied before the
        // snapshot that triggered this purge) is not flushed on apply; make it
        // durable before the entries that could rebuild it disappear.
        self.sync_db().await.map_err(io_err)?;
        self.write_raft(PURGED, &log_id).map_err(io_err)?;
        self.sync_db().await.map_err(io_err)?;
        self.wal.release(self.group, log_id.index).map_err(io_err)
    }
}
