//! Durable storage for a palisade node: one write-ahead log and one sled
//! `Db`, both shared by every Raft group the node hosts.
//!
//! # What this crate owns
//!
//! - [`NodeStore`]: opens the node's storage and hands out per-group
//!   handles. The Raft log entries of all groups live in the [`Wal`]
//!   (`wal/` under the store's directory). Each group `g` owns three sled
//!   trees:
//!   - `g{g}/raft`: the vote, the committed log id and the last purged log id;
//!   - `g{g}/state`: the replicated key-value state (see [`state`]);
//!   - `g{g}/snap`: the last snapshot this replica built or installed.
//!
//!   The `raft` tree also records which replica (Raft member id) of the
//!   group the node holds ([`ReplicaRecord`]). A node-level `node` tree
//!   records facts about the node itself (its id, its cluster's id; data
//!   written before the cluster map also recorded the number of data
//!   groups there).
//! - [`Flusher`]: **group commit**. One flusher thread per node collects the
//!   appends of *all* groups that wait for durability and covers them with a
//!   single `fdatasync` of the log.
//! - [`LogStore`]: openraft's `RaftLogStorage` on the log and the `raft`
//!   tree. Appended entries are acknowledged to openraft only after the sync
//!   that covers them; votes are durable before `save_vote` returns (the
//!   committed id is a restart hint that rides on a later flush).
//! - [`StateTree`]: the key-value records with `create_revision`,
//!   `mod_revision` and `version`, request-deduplication records, and the
//!   applied log id, all written in one atomic batch per apply call.
//!
//! # Crash model
//!
//! The log keeps every entry acknowledged as stored (see [`wal`]). sled
//! recovers a prefix of the operations issued before a crash; anything after
//! the last completed `flush()` may be lost. The log is therefore the source
//! of truth: the state tree is not flushed on every apply (it is rebuilt by
//! re-applying committed entries on restart), and the log is purged only
//! after a flush has made the state that covers it durable. If the state
//! survived further than the log (a follower applies entries it has not
//! synced yet), openraft purges the log up to the applied id on start.
//!
//! Version history (MVCC) lives in the same tree: see [`state`].

pub mod error;
pub mod flush;
pub mod keys;
pub mod log;
pub mod ownership;
pub mod snapshot;
pub mod space;
pub mod state;
pub mod wal;

use std::path::Path;

pub use error::StoreError;
pub use flush::{FlushMode, FlushStats, Flusher};
pub use log::LogStore;
pub use ownership::{ImportProgress, Ownership};
pub use snapshot::SnapshotStore;
pub use space::DiskGuard;
pub use state::{
    KeyEntry, KeyHistory, KeyRecord, LeaseRecord, LockRecord, PastVersion, RawRecord, ScanResult,
    StateBatch, StateTree, Version,
};
pub use wal::Wal;

/// Default bound on sled's page cache: sled's own default is 1 GiB, far too
/// much for a node that may run next to four others on a laptop.
pub const DEFAULT_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// Key of the replica record in a group's `raft` tree.
const REPLICA: &str = "replica";

/// Which replica of a group a node's storage holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaRecord {
    /// The replica's Raft member id (0: written before replica ids existed,
    /// which means the node's own id).
    pub replica: u64,
    /// The group's epoch in the cluster map when this node first opened the
    /// replica: the map proves the replica removed only once the group's
    /// epoch is past this and the replica is no longer listed.
    pub added_epoch: u64,
}

/// The node's sled database and write-ahead log, plus the group-commit
/// flusher.
#[derive(Clone)]
pub struct NodeStore {
    db: sled::Db,
    wal: Wal,
    flusher: Flusher,
    disk: DiskGuard,
}

/// Records what a bad record in the log means for every group stored here,
/// durably, before the log cuts it: corruption quarantines each replica
/// (the damaged record's own header cannot be trusted to say whose it was);
/// either kind drops the committed-index hints.
fn record_damage(db: &sled::Db, damage: &wal::Damage) -> Result<(), StoreError> {
    for group in stored_groups(db) {
        if damage.is_corruption() {
            log::mark_damaged(db, group, &damage.to_string())?;
        } else {
            log::forget_committed(db, group)?;
        }
    }
    db.flush()?;
    Ok(())
}

/// Deletes sled snapshot files whose writing never finished
/// (`snap.*.generating`). sled 0.34 writes a snapshot there and renames it
/// when complete, but on open it reads the newest `snap.*` file whatever
/// its suffix, so one left by a crash (or a full disk: an empty one) makes
/// every later open fail as corrupt (sled issue #1527). Such a file never
/// holds anything the finished snapshots and sled's log do not.
fn remove_unfinished_sled_snapshots(path: &Path) -> Result<(), StoreError> {
    let Ok(entries) = std::fs::read_dir(path) else {
        return Ok(()); // a new directory
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("snap.") && name.ends_with(".generating") {
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(entry.path()).map_err(|e| {
                StoreError::Flush(format!("removing {}: {e}", entry.path().display()))
            })?;
            tracing::warn!(
                file = %entry.path().display(),
                bytes = size,
                "removed an unfinished sled snapshot (left by a crash or a full disk)"
            );
        }
    }
    Ok(())
}

/// Groups `db` has storage for, ascending.
fn stored_groups(db: &sled::Db) -> Vec<u64> {
    let mut groups: Vec<u64> = db
        .tree_names()
        .iter()
        .filter_map(|n| {
            let name = std::str::from_utf8(n).ok()?;
            name.strip_prefix('g')?.strip_suffix("/raft")?.parse().ok()
        })
        .collect();
    groups.sort_unstable();
    groups.dedup();
    groups
}

impl NodeStore {
    /// Opens (or creates) the database under `path`, with group commit.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        Self::open_with(path, cache_bytes, FlushMode::Thread)
    }

    /// Opens the database with the given flush mode.
    pub fn open_with(path: &Path, cache_bytes: u64, mode: FlushMode) -> Result<Self, StoreError> {
        remove_unfinished_sled_snapshots(path)?;
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            // Durability is driven by our flusher; sled's timer would only add
            // fsyncs that nobody waits for.
            .flush_every_ms(None)
            .open()?;
        let wal = Wal::open_reporting(&path.join("wal"), wal::DEFAULT_SEGMENT_BYTES, |damage| {
            record_damage(&db, damage)
        })?;
        let flusher = Flusher::new(wal.clone(), db.clone(), mode)
            .map_err(|e| StoreError::Flush(format!("cannot start the flusher thread: {e}")))?;
        Ok(Self {
            db,
            wal,
            flusher,
            disk: DiskGuard::new(path),
        })
    }

    /// The disk-space alarm of the filesystem this store lives on.
    pub fn disk(&self) -> &DiskGuard {
        &self.disk
    }

    /// The group-commit flusher shared by all groups of this node.
    pub fn flusher(&self) -> &Flusher {
        &self.flusher
    }

    /// The Raft log store of `group`.
    pub fn log_store<C: openraft::RaftTypeConfig>(
        &self,
        group: u64,
    ) -> Result<LogStore<C>, StoreError> {
        LogStore::open(&self.db, &self.wal, group, self.flusher.clone())
    }

    /// The replicated key-value state of `group`.
    pub fn state_tree(&self, group: u64) -> Result<StateTree, StoreError> {
        StateTree::open(&self.db, group)
    }

    /// Where `group` keeps its latest snapshot.
    pub fn snapshot_store(&self, group: u64) -> Result<SnapshotStore, StoreError> {
        SnapshotStore::open(&self.db, group)
    }

    /// Reads a node-level fact recorded at bootstrap.
    pub fn node_fact(&self, name: &str) -> Result<Option<u64>, StoreError> {
        let tree = self.db.open_tree("node")?;
        match tree.get(name)? {
            None => Ok(None),
            Some(v) => {
                let bytes: [u8; 8] = v.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    what: format!("node fact {name}: expected 8 bytes, found {}", v.len()),
                })?;
                Ok(Some(u64::from_be_bytes(bytes)))
            }
        }
    }

    /// Records a node-level fact durably.
    pub fn set_node_fact(&self, name: &str, value: u64) -> Result<(), StoreError> {
        let tree = self.db.open_tree("node")?;
        tree.insert(name, &value.to_be_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    /// The replica of `group` this node's storage holds, if it holds one.
    pub fn replica_record(&self, group: u64) -> Result<Option<ReplicaRecord>, StoreError> {
        let name = format!("g{group}/raft");
        if !self.has_tree(&name) {
            return Ok(None);
        }
        let tree = self.db.open_tree(name)?;
        match tree.get(REPLICA)? {
            Some(v) => Ok(Some(error::decode(&v)?)),
            // Written before replica ids existed: the node's own id.
            None if tree.get("vote")?.is_some() => Ok(Some(ReplicaRecord {
                replica: 0,
                added_epoch: 0,
            })),
            None => Ok(None),
        }
    }

    /// Records (durably) which replica of `group` this node's storage holds.
    pub fn set_replica_record(&self, group: u64, record: &ReplicaRecord) -> Result<(), StoreError> {
        let tree = self.db.open_tree(format!("g{group}/raft"))?;
        tree.insert(REPLICA, error::encode(record)?)?;
        self.db.flush()?;
        Ok(())
    }

    /// Groups this node has storage for, ascending.
    pub fn stored_groups(&self) -> Vec<u64> {
        stored_groups(&self.db)
    }

    fn has_tree(&self, name: &str) -> bool {
        self.db
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == name.as_bytes())
    }

    /// Deletes everything this node stores for `group`: its log entries,
    /// vote, state and snapshot. The group must be closed. Idempotent; a
    /// crash half-way leaves a group that the next call finishes deleting
    /// (the caller only deletes replicas the cluster map has removed).
    pub fn destroy_group(&self, group: u64) -> Result<(), StoreError> {
        self.wal.truncate(group, 0)?;
        self.wal
            .sync()
            .map_err(|e| StoreError::Flush(e.to_string()))?;
        // The `raft` tree (vote, replica id) goes last: while it exists the
        // group is still listed by `stored_groups`, so an interrupted
        // deletion is finished later.
        for tree in ["state", "snap", "log", "raft"] {
            let name = format!("g{group}/{tree}");
            if self.has_tree(&name) {
                self.db.drop_tree(name)?;
            }
        }
        self.db.flush()?;
        Ok(())
    }

    /// Bytes sled and the log occupy on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()? + self.wal.size_on_disk())
    }

    /// Flushes everything now (at shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.wal
            .sync()
            .map_err(|e| StoreError::Flush(e.to_string()))?;
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens the store at `path`, waiting out the file lock a just-dropped
    /// store's sled threads may still hold on a busy machine.
    fn open_store(path: &Path) -> NodeStore {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match NodeStore::open(path, 8 << 20) {
                Ok(store) => return store,
                Err(e)
                    if e.to_string().contains("lock") && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => panic!("opening the store: {e}"),
            }
        }
    }

    openraft::declare_raft_types!(
        Types:
            D = u64,
            R = u64,
            SnapshotData = std::io::Cursor<Vec<u8>>,
    );

    #[test]
    fn an_unfinished_sled_snapshot_does_not_stop_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open_store(dir.path());
            let state = store.state_tree(1).unwrap();
            let mut b = state.batch();
            b.put(b"k", b"v".to_vec(), 1).unwrap();
            b.set_applied(1);
            b.commit().unwrap();
            state.persist().unwrap();
        }
        // What a full disk leaves behind: an empty snapshot being written,
        // sorting after every finished one.
        std::fs::write(dir.path().join("snap.FFFFFFFFFFFFFFF0.generating"), b"").unwrap();
        let store = open_store(dir.path());
        assert!(!dir.path().join("snap.FFFFFFFFFFFFFFF0.generating").exists());
        assert!(store.state_tree(1).unwrap().get(b"k").unwrap().0.is_some());
    }

    #[test]
    fn corruption_quarantines_every_stored_group_and_a_torn_write_none() {
        let dir = tempfile::tempdir().unwrap();
        let corrupt_first_record = |dir: &Path| {
            use std::os::unix::fs::FileExt;
            let seg = std::fs::read_dir(dir.join("wal"))
                .unwrap()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|x| x == "wal"))
                .unwrap();
            let file = std::fs::OpenOptions::new().write(true).open(seg).unwrap();
            file.write_all_at(&[0xee; 4], 8 + 8 + 2).unwrap();
        };
        {
            let store = open_store(dir.path());
            for g in [0u64, 2] {
                let log = store.log_store::<Types>(g).unwrap();
                assert_eq!(log.quarantine().unwrap(), None);
                store.wal.append(g, &[(1, vec![1]), (2, vec![2])]).unwrap();
            }
            store.flush().unwrap();
        }
        // Group 2's replica had won its vote (it led): that must not
        // survive the damage, or it would restart as leader unelected.
        {
            let store = open_store(dir.path());
            let raft = store.db.open_tree("g2/raft").unwrap();
            let won = openraft::Vote::new_committed(7, 2u64);
            raft.insert("vote", error::encode(&won).unwrap()).unwrap();
            store.flush().unwrap();
        }
        corrupt_first_record(dir.path());
        let store = open_store(dir.path());
        let stored = store.db.open_tree("g2/raft").unwrap().get("vote").unwrap();
        let vote: openraft::Vote<u64> = error::decode(&stored.unwrap()).unwrap();
        assert!(!vote.committed, "the won vote is marked not won");
        assert_eq!(vote.leader_id.term, 7, "the term stays");
        for g in [0u64, 2] {
            let why = store.log_store::<Types>(g).unwrap().quarantine().unwrap();
            assert!(why.is_some_and(|w| w.contains("corruption")), "group {g}");
        }
        drop(store);
        // It stays recorded across restarts (the log itself is clean now).
        let store = open_store(dir.path());
        assert!(
            store
                .log_store::<Types>(2)
                .unwrap()
                .quarantine()
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn a_destroyed_group_leaves_nothing_behind_even_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open_store(dir.path());
            for g in [1u64, 3] {
                store.wal.append(g, &[(1, vec![1]), (2, vec![2])]).unwrap();
                let state = store.state_tree(g).unwrap();
                let mut b = state.batch();
                b.put(b"k", b"v".to_vec(), 2).unwrap();
                b.set_applied(2);
                b.commit().unwrap();
                state.persist().unwrap();
                let record = ReplicaRecord {
                    replica: 1_048_576 + g,
                    added_epoch: 4,
                };
                store.set_replica_record(g, &record).unwrap();
                assert_eq!(store.replica_record(g).unwrap(), Some(record));
            }
            assert_eq!(store.stored_groups(), vec![1, 3]);
            store.destroy_group(3).unwrap();
            store.destroy_group(3).unwrap();
            assert_eq!(store.stored_groups(), vec![1]);
            assert_eq!(store.replica_record(3).unwrap(), None);
            store.flush().unwrap();
        }
        let store = open_store(dir.path());
        assert_eq!(store.stored_groups(), vec![1]);
        assert_eq!(store.wal.bounds(3), None, "the log entries stay deleted");
        assert_eq!(store.wal.bounds(1), Some((1, 2)));
        assert_eq!(store.state_tree(3).unwrap().get(b"k").unwrap().0, None);
        assert!(store.state_tree(1).unwrap().get(b"k").unwrap().0.is_some());
    }
}
