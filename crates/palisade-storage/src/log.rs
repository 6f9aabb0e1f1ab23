//! openraft's `RaftLogStorage` on sled, with group commit.
//!
//! Trees (per group): `g{g}/log` maps the big-endian index to the bincode
//! entry; `g{g}/raft` holds `vote`, `committed` and `purged`.
//!
//! Durability: `append` writes the entries into sled and hands openraft's
//! callback to the node's [`Flusher`]; openraft learns the entries are stored
//! only after the fsync that covers them. `save_vote`, `truncate` and `purge`
//! wait for a flush before returning; `save_committed` does not (it is a
//! restart hint, see there).

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
use crate::keys::{decode_log_key, log_key};
use crate::{Flusher, StoreError};

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "purged";

/// The Raft log of one group.
pub struct LogStore<C: RaftTypeConfig> {
    group: u64,
    log: sled::Tree,
    raft: sled::Tree,
    flusher: Flusher,
    _types: PhantomData<C>,
}

impl<C: RaftTypeConfig> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        Self {
            group: self.group,
            log: self.log.clone(),
            raft: self.raft.clone(),
            flusher: self.flusher.clone(),
            _types: PhantomData,
        }
    }
}

impl<C: RaftTypeConfig> LogStore<C> {
    pub(crate) fn open(db: &sled::Db, group: u64, flusher: Flusher) -> Result<Self, StoreError> {
        Ok(Self {
            group,
            log: db.open_tree(format!("g{group}/log"))?,
            raft: db.open_tree(format!("g{group}/raft"))?,
            flusher,
            _types: PhantomData,
        })
    }

    /// The group this log belongs to.
    pub fn group(&self) -> u64 {
        self.group
    }

    fn read_raft<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StoreError> {
        self.raft.get(name)?.map(|v| decode(&v)).transpose()
    }

    fn write_raft<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StoreError> {
        self.raft.insert(name, encode(value)?)?;
        Ok(())
    }

    async fn sync(&self) -> Result<(), StoreError> {
        self.flusher
            .sync()
            .await
            .map_err(|e| StoreError::Flush(e.to_string()))
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId<C::NodeId>>, StoreError>
    where
        C::Entry: DeserializeOwned,
    {
        match self.log.last()? {
            None => Ok(None),
            Some((_, v)) => {
                let entry: C::Entry = decode(&v)?;
                Ok(Some(entry.get_log_id().clone()))
            }
        }
    }

    /// Removes every entry whose index lies in `range` (sled has no range
    /// delete; a batch keeps it one write).
    fn remove_range(&self, range: impl RangeBounds<[u8; 8]>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for item in self.log.range(range) {
            let (k, _) = item?;
            batch.remove(k);
        }
        self.log.apply_batch(batch)?;
        Ok(())
    }
}

fn io_err<NID: openraft::NodeId>(e: StoreError) -> StorageError<NID> {
    StorageIOError::write_logs(&e).into()
}

fn read_err<NID: openraft::NodeId>(e: StoreError) -> StorageError<NID> {
    StorageIOError::read_logs(&e).into()
}

fn encode_bound(b: Bound<&u64>) -> Bound<[u8; 8]> {
    match b {
        Bound::Included(i) => Bound::Included(log_key(*i)),
        Bound::Excluded(i) => Bound::Excluded(log_key(*i)),
        Bound::Unbounded => Bound::Unbounded,
    }
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
        let start = encode_bound(range.start_bound());
        let end = encode_bound(range.end_bound());
        let mut out = Vec::new();
        for item in self.log.range((start, end)) {
            let (k, v) = item.map_err(|e| read_err(e.into()))?;
            let entry: C::Entry = decode(&v).map_err(read_err)?;
            if decode_log_key(&k) != Some(entry.log_id.index) {
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
            self.sync().await
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
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = encode(&entry).map_err(io_err)?;
            batch.insert(&log_key(entry.log_id.index), bytes);
        }
        self.log.apply_batch(batch).map_err(|e| io_err(e.into()))?;
        self.flusher
            .submit(Box::new(move |res| callback.log_io_completed(res)));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        tracing::debug!(group = self.group, index = log_id.index, "truncating log");
        self.remove_range(log_key(log_id.index)..).map_err(io_err)?;
        self.sync().await.map_err(io_err)
    }

    async fn purge(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        tracing::debug!(group = self.group, index = log_id.index, "purging log");
        // The state that covers the purged entries (applied before the
        // snapshot that triggered this purge) is not flushed on apply; make it
        // durable before the entries that could rebuild it disappear.
        self.sync().await.map_err(io_err)?;
        self.write_raft(PURGED, &log_id).map_err(io_err)?;
        self.remove_range(..=log_key(log_id.index))
            .map_err(io_err)?;
        self.sync().await.map_err(io_err)
    }
}
