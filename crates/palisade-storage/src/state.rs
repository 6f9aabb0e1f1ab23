//! The replicated key-value state of one group, on the `g{g}/state` tree.
//!
//! Records (see [`crate::keys`] for the byte layout): user keys with their
//! revision metadata, deduplication results of recent writes, and metadata
//! such as the applied log id and membership.
//!
//! All writes of one apply call go through a [`StateBatch`]: an in-memory
//! overlay that later operations of the same batch read through (so entry
//! n+1 sees entry n), committed with one atomic `apply_batch` together with
//! the new applied log id. A crash therefore leaves the tree at some applied
//! log id with exactly the effects of the entries up to it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::StoreError;
use crate::error::{decode, encode};
use crate::keys::{decode_user_key, dedup_key, meta_key, user_key, user_keys_end};

/// A raw record of the state tree: encoded key and value.
pub type RawRecord = (Vec<u8>, Vec<u8>);

/// A user key with its record.
pub type KeyEntry = (Vec<u8>, KeyRecord);

/// The latest version of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub value: Vec<u8>,
    /// Revision of the put that created the key since it last did not exist.
    pub create_revision: u64,
    /// Revision of the latest put.
    pub mod_revision: u64,
    /// Puts since creation (1 after the first).
    pub version: u64,
}

/// Handle to one group's state tree. Cheap to clone.
#[derive(Clone)]
pub struct StateTree {
    tree: sled::Tree,
    /// sled iterators are not snapshots: a scan running while a batch commits
    /// could see half a transaction. Commits take this lock for writing,
    /// multi-record reads for reading.
    commit_lock: Arc<RwLock<()>>,
    /// Log index of the last applied entry (the group's revision), published
    /// under `commit_lock` together with the batch that applied it.
    revision: Arc<AtomicU64>,
}

impl StateTree {
    pub(crate) fn open(db: &sled::Db, group: u64) -> Result<Self, StoreError> {
        Ok(Self {
            tree: db.open_tree(format!("g{group}/state"))?,
            commit_lock: Arc::new(RwLock::new(())),
            revision: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The revision (applied log index) the state currently reflects.
    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }

    /// Sets the published revision (at start-up, from the durable applied id).
    pub fn set_revision(&self, revision: u64) {
        self.revision.store(revision, Ordering::Release);
    }

    /// Reads the latest record of `key`, with the revision it was read at.
    pub fn get(&self, key: &[u8]) -> Result<(Option<KeyRecord>, u64), StoreError> {
        let _guard = self.commit_lock.read().unwrap_or_else(|p| p.into_inner());
        let record = self
            .tree
            .get(user_key(key))?
            .map(|v| decode(&v))
            .transpose()?;
        Ok((record, self.revision()))
    }

    /// Up to `limit` records with `start <= key < end` (`end = None`: no upper
    /// bound), in key order, read atomically at one revision.
    pub fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<ScanResult, StoreError> {
        let _guard = self.commit_lock.read().unwrap_or_else(|p| p.into_inner());
        let (records, more) = self.scan_unlocked(start, end, limit)?;
        Ok(ScanResult {
            records,
            more,
            revision: self.revision(),
        })
    }

    fn scan_unlocked(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<(Vec<KeyEntry>, bool), StoreError> {
        let lo = user_key(start);
        let hi = end.map(user_key).unwrap_or_else(user_keys_end);
        let mut out = Vec::new();
        for item in self.tree.range(lo..hi) {
            let (k, v) = item?;
            if out.len() == limit {
                return Ok((out, true));
            }
            let key = decode_user_key(&k).ok_or_else(|| StoreError::Corrupt {
                what: "non-user record inside the user key range".into(),
            })?;
            out.push((key.to_vec(), decode(&v)?));
        }
        Ok((out, false))
    }

    /// Reads a metadata value.
    pub fn meta<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StoreError> {
        self.tree
            .get(meta_key(name))?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Starts a batch of writes.
    pub fn batch(&self) -> StateBatch<'_> {
        StateBatch {
            state: self,
            overlay: BTreeMap::new(),
            revision: None,
        }
    }

    /// A consistent copy of every record, for a snapshot. Must not run
    /// concurrently with a batch commit (the state machine calls it between
    /// applies).
    pub fn export(&self) -> Result<Vec<RawRecord>, StoreError> {
        self.tree
            .iter()
            .map(|item| {
                item.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(StoreError::from)
            })
            .collect()
    }

    /// Replaces the whole state with `records` (from a snapshot), atomically.
    pub fn import(
        &self,
        records: Vec<(Vec<u8>, Vec<u8>)>,
        revision: u64,
    ) -> Result<(), StoreError> {
        let _guard = self.commit_lock.write().unwrap_or_else(|p| p.into_inner());
        let mut batch = sled::Batch::default();
        for item in self.tree.iter() {
            let (k, _) = item?;
            batch.remove(k);
        }
        for (k, v) in records {
            batch.insert(k, v);
        }
        self.tree.apply_batch(batch)?;
        self.set_revision(revision);
        Ok(())
    }

    /// Number of user keys (linear scan; for status and tests).
    pub fn user_key_count(&self) -> Result<usize, StoreError> {
        let mut n = 0;
        for item in self.tree.range(user_key(b"")..user_keys_end()) {
            item?;
            n += 1;
        }
        Ok(n)
    }
}

/// Staged writes against a [`StateTree`], read-your-writes within the batch.
pub struct StateBatch<'a> {
    state: &'a StateTree,
    /// Encoded key → new encoded value (`None`: delete).
    overlay: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Revision to publish once the batch is committed.
    revision: Option<u64>,
}

/// Records read by [`StateTree::scan`].
#[derive(Debug)]
pub struct ScanResult {
    pub records: Vec<KeyEntry>,
    /// More records exist in the range past the limit.
    pub more: bool,
    /// The revision the records were read at.
    pub revision: u64,
}

impl StateBatch<'_> {
    fn raw_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.overlay.get(key) {
            Some(v) => Ok(v.clone()),
            None => Ok(self.state.tree.get(key)?.map(|v| v.to_vec())),
        }
    }

    /// Reads `key` as this batch would leave it.
    pub fn get(&self, key: &[u8]) -> Result<Option<KeyRecord>, StoreError> {
        self.raw_get(&user_key(key))?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Sets `key` to `value` at `revision`; returns the previous record.
    pub fn put(
        &mut self,
        key: &[u8],
        value: Vec<u8>,
        revision: u64,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let prev = self.get(key)?;
        let record = match &prev {
            Some(p) => KeyRecord {
                value,
                create_revision: p.create_revision,
                mod_revision: revision,
                version: p.version + 1,
            },
            None => KeyRecord {
                value,
                create_revision: revision,
                mod_revision: revision,
                version: 1,
            },
        };
        self.overlay.insert(user_key(key), Some(encode(&record)?));
        Ok(prev)
    }

    /// Deletes `key`; returns the previous record.
    pub fn delete(&mut self, key: &[u8]) -> Result<Option<KeyRecord>, StoreError> {
        let prev = self.get(key)?;
        if prev.is_some() {
            self.overlay.insert(user_key(key), None);
        }
        Ok(prev)
    }

    /// The stored result of write `(client_id, seq)`, if still retained.
    pub fn dedup_get(&self, client_id: u64, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.raw_get(&dedup_key(client_id, seq))
    }

    /// Retains the result of write `(client_id, seq)`.
    pub fn dedup_put(&mut self, client_id: u64, seq: u64, result: Vec<u8>) {
        self.overlay
            .insert(dedup_key(client_id, seq).to_vec(), Some(result));
    }

    /// Forgets the results of `client_id`'s writes below `seq`: the client
    /// said it no longer awaits them.
    pub fn dedup_forget_below(&mut self, client_id: u64, seq: u64) -> Result<(), StoreError> {
        let lo = dedup_key(client_id, 0);
        let hi = dedup_key(client_id, seq);
        for item in self.state.tree.range(lo..hi) {
            let (k, _) = item?;
            self.overlay.insert(k.to_vec(), None);
        }
        let staged: Vec<Vec<u8>> = self
            .overlay
            .range(lo.to_vec()..hi.to_vec())
            .map(|(k, _)| k.clone())
            .collect();
        for k in staged {
            self.overlay.insert(k, None);
        }
        Ok(())
    }

    /// Stages a metadata value.
    pub fn set_meta<T: Serialize>(&mut self, name: &str, value: &T) -> Result<(), StoreError> {
        self.overlay.insert(meta_key(name), Some(encode(value)?));
        Ok(())
    }

    /// Publishes `revision` as the group's revision when the batch commits.
    pub fn set_revision(&mut self, revision: u64) {
        self.revision = Some(revision);
    }

    /// Applies every staged write atomically.
    pub fn commit(self) -> Result<(), StoreError> {
        let _guard = self
            .state
            .commit_lock
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let mut batch = sled::Batch::default();
        for (k, v) in self.overlay {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        self.state.tree.apply_batch(batch)?;
        if let Some(revision) = self.revision {
            self.state.set_revision(revision);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, StateTree) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let t = StateTree::open(&db, 1).unwrap();
        (dir, t)
    }

    #[test]
    fn revisions_and_versions_follow_writes() {
        let (_d, t) = tree();
        let mut b = t.batch();
        assert_eq!(b.put(b"k", b"a".to_vec(), 5).unwrap(), None);
        let prev = b.put(b"k", b"b".to_vec(), 6).unwrap().unwrap();
        assert_eq!((prev.value.as_slice(), prev.version), (&b"a"[..], 1));
        b.commit().unwrap();
        let r = t.get(b"k").unwrap().0.unwrap();
        assert_eq!((r.create_revision, r.mod_revision, r.version), (5, 6, 2));

        let mut b = t.batch();
        assert!(b.delete(b"k").unwrap().is_some());
        assert_eq!(b.get(b"k").unwrap(), None, "a batch reads its own writes");
        b.put(b"k", b"c".to_vec(), 9).unwrap();
        b.commit().unwrap();
        let r = t.get(b"k").unwrap().0.unwrap();
        assert_eq!(
            (r.create_revision, r.mod_revision, r.version),
            (9, 9, 1),
            "recreated after delete"
        );
    }

    #[test]
    fn uncommitted_batch_changes_nothing() {
        let (_d, t) = tree();
        let mut b = t.batch();
        b.put(b"k", b"v".to_vec(), 1).unwrap();
        drop(b);
        assert_eq!(t.get(b"k").unwrap().0, None);
    }

    #[test]
    fn scan_respects_bounds_limit_and_skips_meta() {
        let (_d, t) = tree();
        let mut b = t.batch();
        for (i, k) in ["a", "b", "c", "d"].iter().enumerate() {
            b.put(k.as_bytes(), vec![i as u8], i as u64 + 1).unwrap();
        }
        b.set_meta("applied", &7u64).unwrap();
        b.dedup_put(1, 1, vec![1]);
        b.commit().unwrap();
        let keys = |r: ScanResult| {
            (
                r.records.into_iter().map(|(k, _)| k).collect::<Vec<_>>(),
                r.more,
            )
        };
        let all = keys(t.scan(b"", None, 10).unwrap());
        assert_eq!(
            all,
            (
                vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec(), b"d".to_vec()],
                false
            )
        );
        let some = keys(t.scan(b"b", Some(b"d"), 10).unwrap());
        assert_eq!(some, (vec![b"b".to_vec(), b"c".to_vec()], false));
        let lim = keys(t.scan(b"", None, 2).unwrap());
        assert_eq!(lim, (vec![b"a".to_vec(), b"b".to_vec()], true));
        assert_eq!(t.meta::<u64>("applied").unwrap(), Some(7));
        assert_eq!(t.user_key_count().unwrap(), 4);
    }

    #[test]
    fn dedup_records_are_forgotten_below_the_client_watermark() {
        let (_d, t) = tree();
        let mut b = t.batch();
        for seq in 1..=4 {
            b.dedup_put(7, seq, vec![seq as u8]);
        }
        b.dedup_put(8, 1, vec![9]);
        b.commit().unwrap();
        let mut b = t.batch();
        b.dedup_forget_below(7, 3).unwrap();
        b.commit().unwrap();
        let b = t.batch();
        assert_eq!(b.dedup_get(7, 2).unwrap(), None);
        assert_eq!(b.dedup_get(7, 3).unwrap(), Some(vec![3]));
        assert_eq!(
            b.dedup_get(8, 1).unwrap(),
            Some(vec![9]),
            "other clients untouched"
        );
    }

    #[test]
    fn export_import_round_trips() {
        let (_d, t) = tree();
        let mut b = t.batch();
        b.put(b"x", b"1".to_vec(), 3).unwrap();
        b.set_meta("applied", &3u64).unwrap();
        b.set_revision(3);
        b.commit().unwrap();
        assert_eq!(t.revision(), 3);
        let copy = t.export().unwrap();
        let (_d2, t2) = tree();
        let mut b = t2.batch();
        b.put(b"stale", b"gone".to_vec(), 1).unwrap();
        b.commit().unwrap();
        t2.import(copy.clone(), 3).unwrap();
        assert_eq!(t2.export().unwrap(), copy);
        assert_eq!(t2.get(b"stale").unwrap(), (None, 3));
    }
}
