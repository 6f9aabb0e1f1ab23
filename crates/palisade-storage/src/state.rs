//! The replicated key-value state of one group, on the `g{g}/state` tree.
//!
//! Records (see [`crate::keys`] for the byte layout): user keys with their
//! revision metadata, deduplication results of recent writes, metadata such
//! as the applied log id and membership, and **history**.
//!
//! # MVCC
//!
//! The latest version of a key lives in its user record, so current reads
//! and transaction compares cost one lookup. When a put supersedes a version
//! or a delete removes one, the old version moves to a history record keyed
//! by (key, its mod revision), and a delete also leaves a tombstone at its
//! own revision. The state as of revision `r` is therefore: the latest
//! record if its mod revision is ≤ `r`, else the newest history record of
//! the key at or below `r` (a tombstone, or nothing, meaning absent).
//!
//! `compact(c)` drops every history record no read at a revision ≥ `c`
//! needs; reads below `c` then fail with [`StoreError::Compacted`]. The
//! compaction point is itself replicated state (a meta record), so every
//! replica, and every snapshot, agrees on it.
//!
//! All writes of one apply call go through a [`StateBatch`]: an in-memory
//! overlay that later operations of the same batch read through (so entry
//! n+1 sees entry n). Committing a batch moves it, with the new applied log
//! id, into the tree's **pending** overlay, which every read merges over
//! sled. The pending records go to sled in one atomic `apply_batch` when
//! they grow past a bound, before a snapshot or compaction, and on
//! [`StateTree::persist`]. A crash therefore leaves sled at some applied log
//! id with exactly the effects of the entries up to it; the Raft log, kept
//! until a snapshot made the state durable, re-applies the rest.
//!
//! Why defer: sled 0.34 makes every atomic batch two synchronous writes on
//! its I/O threads, so one batch per apply cost more CPU than the rest of a
//! replicated write together (etcd's backend batches its commits for the
//! same reason).

use std::collections::BTreeMap;
use std::iter::Peekable;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use palisade_shard::{LeaseHome, Slot, SlotSet, lease_home, slot_of};

use crate::StoreError;
use crate::error::{decode, encode};
use crate::keys::{
    DEDUP, HISTORY, LEASE, LOCK, USER, decode_history_key, decode_lease_key, decode_user_key,
    dedup_key, history_end, history_key, history_prefix, lease_key, lock_key, meta_key, user_key,
    user_keys_end,
};
use crate::ownership::Ownership;

/// Meta record holding the compaction point.
const COMPACTED: &str = "compacted";
/// Meta record holding the group's slot ownership (absent: serves all).
const OWNERSHIP: &str = "ownership";
/// Meta record holding the revision offset: revision = log index + offset.
const REV_OFFSET: &str = "rev_offset";

/// A raw record of the state tree: encoded key and value.
pub type RawRecord = (Vec<u8>, Vec<u8>);

/// A user key with its record.
pub type KeyEntry = (Vec<u8>, KeyRecord);

/// The latest version of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    // Encoded as one byte string instead of a sequence of u8s: the same
    // bincode bytes, decoded without a call per byte.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Revision of the put that created the key since it last did not exist.
    pub create_revision: u64,
    /// Revision of the latest put.
    pub mod_revision: u64,
    /// Puts since creation (1 after the first).
    pub version: u64,
    /// The lease the key is attached to (0: none); deleted when it ends.
    pub lease: u64,
}

/// A lease: its time-to-live and what ends with it. Expiry times are not
/// replicated state: the group leader measures them (see the server).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub ttl_ms: u64,
    /// Keys attached to the lease.
    pub keys: std::collections::BTreeSet<Vec<u8>>,
    /// Locks held with the lease.
    pub locks: std::collections::BTreeSet<Vec<u8>>,
}

/// A held lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    /// The lease it is held with.
    pub lease: u64,
    /// The fencing token: the log index of the entry that acquired it.
    pub token: u64,
    /// Term of that entry (reported, not compared).
    pub term: u64,
}

/// A superseded version of a key, as kept in history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PastVersion {
    /// The key held this record from its mod revision on.
    Value(KeyRecord),
    /// The key was deleted at this history record's revision.
    Deleted,
}

impl PastVersion {
    fn into_record(self) -> Option<KeyRecord> {
        match self {
            PastVersion::Value(r) => Some(r),
            PastVersion::Deleted => None,
        }
    }
}

/// One retained version of a key, for [`StateTree::history`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// Revision at which this version was written (or the key deleted).
    pub revision: u64,
    /// `None`: a tombstone (the key was deleted at `revision`).
    pub record: Option<KeyRecord>,
}

/// The retained versions of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyHistory {
    /// Oldest first; the last one is the current version (or tombstone).
    pub versions: Vec<Version>,
    /// Reads at revisions below this fail: older history was compacted.
    pub compacted: u64,
    /// The revision the history was read at.
    pub revision: u64,
}

/// Pending records are written to sled once there are this many...
const PERSIST_RECORDS: usize = 512;
/// ... or once their keys and values take this many bytes.
const PERSIST_BYTES: usize = 256 * 1024;

/// Committed records not yet written to sled: encoded key → value (`None`:
/// deleted). The lock around it also publishes the group's slot ownership,
/// so a read checks ownership and reads data as of the same commit.
#[derive(Default)]
struct Pending {
    records: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    bytes: usize,
    /// `None`: no ownership record (a group from before the cluster map):
    /// every key is served.
    ownership: Option<Arc<Ownership>>,
}

impl Pending {
    fn is_full(&self) -> bool {
        self.records.len() >= PERSIST_RECORDS || self.bytes >= PERSIST_BYTES
    }
}

/// Handle to one group's state tree. Cheap to clone.
#[derive(Clone)]
pub struct StateTree {
    tree: sled::Tree,
    /// Committed records not yet in sled. The lock also makes reads atomic:
    /// sled iterators are not snapshots, so a scan running while records move
    /// to sled could see half a transaction. Commits take it for writing,
    /// reads for reading.
    pending: Arc<RwLock<Pending>>,
    /// The group's revision: the last applied entry's log index plus the
    /// revision offset. Published under the `pending` lock together with
    /// the batch that applied it.
    revision: Arc<AtomicU64>,
    /// Log index of the last applied entry, published like `revision`.
    applied: Arc<AtomicU64>,
    /// The revision offset (see [`StateBatch::set_rev_offset`]).
    offset: Arc<AtomicU64>,
    /// The compaction point, published like `revision`.
    compacted: Arc<AtomicU64>,
}

/// Where a record of the state tree belongs when slots move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecordHome {
    /// A key's record, history, a lock, or a lease of this slot.
    Slot(Slot),
    /// A request-deduplication result (copied to every importer).
    Dedup,
    /// Group metadata, or a lease of an earlier version (stays).
    Group,
}

fn record_home(encoded: &[u8]) -> RecordHome {
    match encoded.first() {
        Some(&USER) => {
            decode_user_key(encoded).map_or(RecordHome::Group, |k| RecordHome::Slot(slot_of(k)))
        }
        Some(&HISTORY) => decode_history_key(encoded)
            .map_or(RecordHome::Group, |(k, _)| RecordHome::Slot(slot_of(&k))),
        Some(&LOCK) => RecordHome::Slot(slot_of(&encoded[1..])),
        Some(&LEASE) => match decode_lease_key(encoded).and_then(lease_home) {
            Some(LeaseHome::Slot(s)) => RecordHome::Slot(s),
            _ => RecordHome::Group,
        },
        Some(&DEDUP) => RecordHome::Dedup,
        _ => RecordHome::Group,
    }
}

impl StateTree {
    pub(crate) fn open(db: &sled::Db, group: u64) -> Result<Self, StoreError> {
        let state = Self {
            tree: db.open_tree(format!("g{group}/state"))?,
            pending: Arc::new(RwLock::new(Pending::default())),
            revision: Arc::new(AtomicU64::new(0)),
            applied: Arc::new(AtomicU64::new(0)),
            offset: Arc::new(AtomicU64::new(0)),
            compacted: Arc::new(AtomicU64::new(0)),
        };
        state.load_published(&mut state.write_pending())?;
        Ok(state)
    }

    /// Loads the published meta records (compaction point, revision offset,
    /// ownership) from the stored state.
    fn load_published(&self, pending: &mut Pending) -> Result<(), StoreError> {
        let c: u64 = self.decoded(pending, &meta_key(COMPACTED))?.unwrap_or(0);
        self.compacted.store(c, Ordering::Release);
        let o: u64 = self.decoded(pending, &meta_key(REV_OFFSET))?.unwrap_or(0);
        self.offset.store(o, Ordering::Release);
        let ownership: Option<Ownership> = self.decoded(pending, &meta_key(OWNERSHIP))?;
        if let Some(own) = &ownership
            && !(own.owned.is_well_formed()
                && own.frozen.is_well_formed()
                && own.staged.is_well_formed())
        {
            return Err(StoreError::Corrupt {
                what: "the slot ownership record has the wrong size".into(),
            });
        }
        pending.ownership = ownership.map(Arc::new);
        Ok(())
    }

    /// The group's slot ownership (`None`: it serves every key, as groups
    /// written before the cluster map did).
    pub fn ownership(&self) -> Option<Arc<Ownership>> {
        self.read_pending().ownership.clone()
    }

    /// Fails unless the group serves `key`'s slot (and, for a read at
    /// revision `at` > 0, answered for it at `at`).
    fn check_serves(&self, pending: &Pending, slot: Slot, at: u64) -> Result<(), StoreError> {
        let Some(own) = &pending.ownership else {
            return Ok(());
        };
        if !own.serves(slot) {
            return Err(StoreError::NotOwned {
                slot,
                moved_to: own.moved_to.get(&slot).copied(),
            });
        }
        let since = own.since(slot);
        if at > 0 && at < since {
            return Err(StoreError::Compacted {
                requested: at,
                oldest: since,
            });
        }
        Ok(())
    }

    /// Whether a scan at `at` (0: latest) includes `key`.
    fn scan_includes(pending: &Pending, key: &[u8], at: u64) -> bool {
        match &pending.ownership {
            None => true,
            Some(own) => {
                let slot = slot_of(key);
                own.serves(slot) && (at == 0 || at >= own.since(slot))
            }
        }
    }

    fn read_pending(&self) -> RwLockReadGuard<'_, Pending> {
        self.pending.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_pending(&self) -> RwLockWriteGuard<'_, Pending> {
        self.pending.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The record at `key`, pending writes first, then sled.
    fn decoded<T: DeserializeOwned>(
        &self,
        pending: &Pending,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        match pending.records.get(key) {
            Some(Some(v)) => decode(v).map(Some),
            Some(None) => Ok(None),
            None => self.tree.get(key)?.map(|v| decode(&v)).transpose(),
        }
    }

    /// The raw record at `key`, pending writes first, then sled.
    fn raw(&self, pending: &Pending, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match pending.records.get(key) {
            Some(v) => Ok(v.clone()),
            None => Ok(self.tree.get(key)?.map(|v| v.to_vec())),
        }
    }

    /// Records with `lo <= key < hi`, pending writes merged over sled.
    fn range<'a>(&'a self, pending: &'a Pending, lo: Vec<u8>, hi: Vec<u8>) -> Merged<'a> {
        Merged::new(self, pending, lo, hi, false)
    }

    /// Like [`Self::range`], from the highest key down.
    fn range_rev<'a>(&'a self, pending: &'a Pending, lo: Vec<u8>, hi: Vec<u8>) -> Merged<'a> {
        Merged::new(self, pending, lo, hi, true)
    }

    /// Writes every pending record to sled in one atomic batch.
    pub fn persist(&self) -> Result<(), StoreError> {
        self.persist_locked(&mut self.write_pending())
    }

    fn persist_locked(&self, pending: &mut Pending) -> Result<(), StoreError> {
        if pending.records.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for (k, v) in &pending.records {
            match v {
                Some(v) => batch.insert(k.as_slice(), v.as_slice()),
                None => batch.remove(k.as_slice()),
            }
        }
        self.tree.apply_batch(batch)?;
        pending.records.clear();
        pending.bytes = 0;
        Ok(())
    }

    /// Number of committed records not yet written to sled.
    pub fn pending_records(&self) -> usize {
        self.read_pending().records.len()
    }

    /// The compaction point: the oldest revision still readable.
    pub fn compacted(&self) -> u64 {
        self.compacted.load(Ordering::Acquire)
    }

    /// Fails unless the state as of `at` is readable here (`at` between the
    /// compaction point and the applied revision).
    fn check_readable(&self, at: u64) -> Result<(), StoreError> {
        let oldest = self.compacted();
        if at < oldest {
            return Err(StoreError::Compacted {
                requested: at,
                oldest,
            });
        }
        let current = self.revision();
        if at > current {
            return Err(StoreError::FutureRevision {
                requested: at,
                current,
            });
        }
        Ok(())
    }

    /// The revision the state currently reflects: the applied log index
    /// plus the revision offset.
    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }

    /// The log index of the last applied entry.
    pub fn applied_index(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// Revision minus log index (see [`StateBatch::set_rev_offset`]).
    pub fn rev_offset(&self) -> u64 {
        self.offset.load(Ordering::Acquire)
    }

    /// Publishes `index` as the applied log index (at start-up, from the
    /// durable applied id), and the revision it stands for.
    pub fn set_applied(&self, index: u64) {
        self.applied.store(index, Ordering::Release);
        self.revision
            .store(index + self.rev_offset(), Ordering::Release);
    }

    /// Reads the latest record of `key`, with the revision it was read at.
    pub fn get(&self, key: &[u8]) -> Result<(Option<KeyRecord>, u64), StoreError> {
        let pending = self.read_pending();
        self.check_serves(&pending, slot_of(key), 0)?;
        let record = self.decoded(&pending, &user_key(key))?;
        Ok((record, self.revision()))
    }

    /// Reads `key` as of revision `at` (`0`: the latest), with the revision
    /// the answer reflects.
    pub fn get_at(&self, key: &[u8], at: u64) -> Result<(Option<KeyRecord>, u64), StoreError> {
        if at == 0 {
            return self.get(key);
        }
        let pending = self.read_pending();
        self.check_readable(at)?;
        self.check_serves(&pending, slot_of(key), at)?;
        let latest: Option<KeyRecord> = self.decoded(&pending, &user_key(key))?;
        if let Some(r) = latest
            && r.mod_revision <= at
        {
            return Ok((Some(r), at));
        }
        let past = self
            .range_rev(
                &pending,
                history_key(key, 0),
                history_key(key, at.saturating_add(1)),
            )
            .next()
            .transpose()?;
        let record = match past {
            Some((_, v)) => decode::<PastVersion>(&v)?.into_record(),
            None => None,
        };
        Ok((record, at))
    }

    /// Every retained version of `key`, oldest first, ending with the
    /// current one (or its tombstone).
    pub fn history(&self, key: &[u8]) -> Result<KeyHistory, StoreError> {
        let pending = self.read_pending();
        self.check_serves(&pending, slot_of(key), 0)?;
        let prefix = history_prefix(key);
        let mut versions = Vec::new();
        for item in self.range(&pending, prefix.clone(), prefix_end(&prefix)) {
            let (k, v) = item?;
            let (_, revision) = decode_history_key(&k).ok_or_else(|| StoreError::Corrupt {
                what: "malformed history key".into(),
            })?;
            versions.push(Version {
                revision,
                record: decode::<PastVersion>(&v)?.into_record(),
            });
        }
        if let Some(record) = self.decoded::<KeyRecord>(&pending, &user_key(key))? {
            versions.push(Version {
                revision: record.mod_revision,
                record: Some(record),
            });
        }
        Ok(KeyHistory {
            versions,
            compacted: self.compacted(),
            revision: self.revision(),
        })
    }

    /// Like [`Self::scan`] but as of revision `at` (`0`: the latest).
    pub fn scan_at(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
        at: u64,
    ) -> Result<ScanResult, StoreError> {
        if at == 0 {
            return self.scan(start, end, limit);
        }
        let pending = self.read_pending();
        self.check_readable(at)?;
        let corrupt = |what: &str| StoreError::Corrupt { what: what.into() };
        let mut latest = self.range(
            &pending,
            user_key(start),
            end.map(user_key).unwrap_or_else(user_keys_end),
        );
        let hist_hi = end.map(history_prefix).unwrap_or_else(history_end);
        let mut past = self.range(&pending, history_prefix(start), hist_hi);
        // Merge-join the two ordered streams by user key.
        let mut next_latest = latest.next().transpose()?;
        let mut next_past = past.next().transpose()?;
        let mut records = Vec::new();
        loop {
            let latest_key = match &next_latest {
                Some((k, _)) => Some(decode_user_key(k).ok_or_else(|| corrupt("user key"))?),
                None => None,
            };
            let past_key = match &next_past {
                Some((k, _)) => Some(decode_history_key(k).ok_or_else(|| corrupt("history key"))?),
                None => None,
            };
            let key: Vec<u8> = match (latest_key, &past_key) {
                (None, None) => break,
                (Some(l), None) => l.to_vec(),
                (None, Some((p, _))) => p.clone(),
                (Some(l), Some((p, _))) => l.min(p.as_slice()).to_vec(),
            };
            let mut current = None;
            if latest_key == Some(key.as_slice()) {
                if let Some((_, v)) = &next_latest {
                    let r: KeyRecord = decode(v)?;
                    if r.mod_revision <= at {
                        current = Some(r);
                    }
                }
                next_latest = latest.next().transpose()?;
            }
            // The newest history record of `key` at or below `at`.
            let mut newest = None;
            while let Some((k, v)) = &next_past {
                let (pk, rev) = decode_history_key(k).ok_or_else(|| corrupt("history key"))?;
                if pk != key {
                    break;
                }
                if rev <= at {
                    newest = Some(v.clone());
                }
                next_past = past.next().transpose()?;
            }
            let record = match (current, newest) {
                (Some(r), _) => Some(r),
                (None, Some(v)) => decode::<PastVersion>(&v)?.into_record(),
                (None, None) => None,
            };
            if let Some(r) = record
                && Self::scan_includes(&pending, &key, at)
            {
                if records.len() == limit {
                    return Ok(ScanResult {
                        records,
                        more: true,
                        revision: at,
                    });
                }
                records.push((key, r));
            }
        }
        Ok(ScanResult {
            records,
            more: false,
            revision: at,
        })
    }

    /// A lease record.
    pub fn lease(&self, id: u64) -> Result<Option<LeaseRecord>, StoreError> {
        let pending = self.read_pending();
        if let Some(LeaseHome::Slot(slot)) = lease_home(id) {
            self.check_serves(&pending, slot, 0)?;
        }
        self.decoded(&pending, &lease_key(id))
    }

    /// Every lease, by id.
    pub fn leases(&self) -> Result<Vec<(u64, LeaseRecord)>, StoreError> {
        let pending = self.read_pending();
        let mut out = Vec::new();
        let prefix = vec![crate::keys::LEASE];
        for item in self.range(&pending, prefix.clone(), prefix_end(&prefix)) {
            let (k, v) = item?;
            let id = decode_lease_key(&k).ok_or_else(|| StoreError::Corrupt {
                what: "malformed lease key".into(),
            })?;
            let served = match lease_home(id) {
                Some(LeaseHome::Slot(slot)) => self.check_serves(&pending, slot, 0).is_ok(),
                _ => true,
            };
            if served {
                out.push((id, decode(&v)?));
            }
        }
        Ok(out)
    }

    /// A lock record, with the revision it was read at.
    pub fn lock(&self, name: &[u8]) -> Result<(Option<LockRecord>, u64), StoreError> {
        let pending = self.read_pending();
        self.check_serves(&pending, slot_of(name), 0)?;
        let record = self.decoded(&pending, &lock_key(name))?;
        Ok((record, self.revision()))
    }

    /// Number of history records (superseded versions and tombstones).
    pub fn history_record_count(&self) -> Result<usize, StoreError> {
        let pending = self.read_pending();
        let mut n = 0;
        for item in self.range(&pending, vec![crate::keys::HISTORY], history_end()) {
            item?;
            n += 1;
        }
        Ok(n)
    }

    /// Up to `limit` records with `start <= key < end` (`end = None`: no upper
    /// bound), in key order, read atomically at one revision.
    pub fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<ScanResult, StoreError> {
        let pending = self.read_pending();
        let (records, more) = self.scan_locked(&pending, start, end, limit)?;
        Ok(ScanResult {
            records,
            more,
            revision: self.revision(),
        })
    }

    fn scan_locked(
        &self,
        pending: &Pending,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<(Vec<KeyEntry>, bool), StoreError> {
        let lo = user_key(start);
        let hi = end.map(user_key).unwrap_or_else(user_keys_end);
        let mut out = Vec::new();
        for item in self.range(pending, lo, hi) {
            let (k, v) = item?;
            if out.len() == limit {
                return Ok((out, true));
            }
            let key = decode_user_key(&k).ok_or_else(|| StoreError::Corrupt {
                what: "non-user record inside the user key range".into(),
            })?;
            if Self::scan_includes(pending, key, 0) {
                out.push((key.to_vec(), decode(&v)?));
            }
        }
        Ok((out, false))
    }

    /// Reads a metadata value.
    pub fn meta<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StoreError> {
        let pending = self.read_pending();
        self.decoded(&pending, &meta_key(name))
    }

    /// Starts a batch of writes.
    pub fn batch(&self) -> StateBatch<'_> {
        StateBatch {
            state: self,
            overlay: BTreeMap::new(),
            applied: None,
            compacted: None,
            offset: None,
            ownership: None,
        }
    }

    /// A consistent copy of every record, for a snapshot. Must not run
    /// concurrently with a batch commit (the state machine calls it between
    /// applies).
    pub fn export(&self) -> Result<Vec<RawRecord>, StoreError> {
        let pending = self.read_pending();
        self.range(&pending, Vec::new(), vec![0xff; 9]).collect()
    }

    /// Replaces the whole state with `records` (from a snapshot), atomically.
    pub fn import(&self, records: Vec<(Vec<u8>, Vec<u8>)>, index: u64) -> Result<(), StoreError> {
        let mut pending = self.write_pending();
        *pending = Pending::default();
        let mut batch = sled::Batch::default();
        for item in self.tree.iter() {
            let (k, _) = item?;
            batch.remove(k);
        }
        for (k, v) in records {
            batch.insert(k, v);
        }
        self.tree.apply_batch(batch)?;
        self.load_published(&mut pending)?;
        self.set_applied(index);
        Ok(())
    }

    /// Number of user keys (linear scan; for status and tests).
    pub fn user_key_count(&self) -> Result<usize, StoreError> {
        let pending = self.read_pending();
        let mut n = 0;
        for item in self.range(&pending, user_key(b""), user_keys_end()) {
            let (k, _) = item?;
            if decode_user_key(&k).is_some_and(|key| Self::scan_includes(&pending, key, 0)) {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Up to `max_bytes` (at least one record) of the records a move of
    /// `slots` carries, from encoded key `from` on: the keys' records and
    /// history, their locks and leases, and every deduplication result.
    /// Returns them with the key to continue from (`None`: done). Read
    /// atomically per call; the caller freezes the slots first, so their
    /// records do not change between calls.
    pub fn export_slots(
        &self,
        slots: &SlotSet,
        from: &[u8],
        max_bytes: usize,
    ) -> Result<(Vec<RawRecord>, Option<Vec<u8>>), StoreError> {
        let pending = self.read_pending();
        let mut out = Vec::new();
        let mut bytes = 0;
        for item in self.range(&pending, from.to_vec(), vec![0xff; 9]) {
            let (k, v) = item?;
            let wanted = match record_home(&k) {
                RecordHome::Slot(s) => slots.contains(s),
                RecordHome::Dedup => true,
                RecordHome::Group => false,
            };
            if !wanted {
                continue;
            }
            if bytes >= max_bytes && !out.is_empty() {
                return Ok((out, Some(k)));
            }
            bytes += k.len() + v.len();
            out.push((k, v));
        }
        Ok((out, None))
    }
}

/// The first key after every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: no key sorts after the prefix's range but longer 0xff runs;
    // state keys never start that way.
    vec![0xff; prefix.len() + 1]
}

type SledRange = Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>>;
type PendingRange<'a> = Box<dyn Iterator<Item = (&'a Vec<u8>, &'a Option<Vec<u8>>)> + 'a>;

/// A key range of sled with the pending records merged over it: a pending
/// value replaces sled's, a pending deletion hides it.
struct Merged<'a> {
    tree: Peekable<SledRange>,
    pending: Peekable<PendingRange<'a>>,
    reverse: bool,
}

/// Which side of a [`Merged`] yields next.
enum Side {
    Tree,
    Pending,
    /// Both hold the key: the pending record wins and sled's is skipped.
    Both,
}

impl<'a> Merged<'a> {
    fn new(
        state: &StateTree,
        pending: &'a Pending,
        lo: Vec<u8>,
        hi: Vec<u8>,
        reverse: bool,
    ) -> Self {
        let tree = state.tree.range(lo.clone()..hi.clone());
        let staged = pending.records.range(lo..hi);
        let (tree, staged): (SledRange, PendingRange<'a>) = if reverse {
            (Box::new(tree.rev()), Box::new(staged.rev()))
        } else {
            (Box::new(tree), Box::new(staged))
        };
        Self {
            tree: tree.peekable(),
            pending: staged.peekable(),
            reverse,
        }
    }

    fn next_side(&mut self) -> Option<Side> {
        let tree_key = match self.tree.peek() {
            Some(Ok((k, _))) => Some(k.as_ref()),
            // Let the caller take the error.
            Some(Err(_)) => return Some(Side::Tree),
            None => None,
        };
        let pending_key = self.pending.peek().map(|(k, _)| k.as_slice());
        Some(match (tree_key, pending_key) {
            (None, None) => return None,
            (Some(_), None) => Side::Tree,
            (None, Some(_)) => Side::Pending,
            (Some(t), Some(p)) if t == p => Side::Both,
            (Some(t), Some(p)) => {
                if (p < t) != self.reverse {
                    Side::Pending
                } else {
                    Side::Tree
                }
            }
        })
    }
}

impl Iterator for Merged<'_> {
    type Item = Result<RawRecord, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.next_side()? {
                Side::Tree => {
                    let item = self.tree.next()?;
                    return Some(
                        item.map(|(k, v)| (k.to_vec(), v.to_vec()))
                            .map_err(StoreError::from),
                    );
                }
                side @ (Side::Pending | Side::Both) => {
                    if matches!(side, Side::Both) {
                        self.tree.next();
                    }
                    let (k, v) = self.pending.next()?;
                    if let Some(v) = v {
                        return Some(Ok((k.clone(), v.clone())));
                    }
                }
            }
        }
    }
}

/// Staged writes against a [`StateTree`], read-your-writes within the batch.
pub struct StateBatch<'a> {
    state: &'a StateTree,
    /// Encoded key → new encoded value (`None`: delete).
    overlay: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Applied log index to publish once the batch is committed.
    applied: Option<u64>,
    /// Compaction point to publish once the batch is committed.
    compacted: Option<u64>,
    /// Revision offset to publish once the batch is committed.
    offset: Option<u64>,
    /// Ownership to publish once the batch is committed.
    ownership: Option<Arc<Ownership>>,
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
            None => self.state.raw(&self.state.read_pending(), key),
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
        self.put_with_lease(key, value, revision, 0)
    }

    /// Like [`Self::put`], attaching the key to `lease` (0: none).
    pub fn put_with_lease(
        &mut self,
        key: &[u8],
        value: Vec<u8>,
        revision: u64,
        lease: u64,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let prev = self.get(key)?;
        match &prev {
            Some(p) => self.retire(key, p, revision)?,
            // Deleted and recreated by one transaction: the tombstone staged
            // at this same revision never became visible to anyone.
            None => {
                self.overlay.remove(&history_key(key, revision));
            }
        }
        let record = match &prev {
            Some(p) => KeyRecord {
                value,
                create_revision: p.create_revision,
                mod_revision: revision,
                version: p.version + 1,
                lease,
            },
            None => KeyRecord {
                value,
                create_revision: revision,
                mod_revision: revision,
                version: 1,
                lease,
            },
        };
        self.overlay.insert(user_key(key), Some(encode(&record)?));
        Ok(prev)
    }

    /// Deletes `key` at `revision`, leaving a tombstone in its history;
    /// returns the previous record.
    pub fn delete(&mut self, key: &[u8], revision: u64) -> Result<Option<KeyRecord>, StoreError> {
        let prev = self.get(key)?;
        if let Some(p) = &prev {
            self.retire(key, p, revision)?;
            self.overlay.insert(user_key(key), None);
            self.overlay.insert(
                history_key(key, revision),
                Some(encode(&PastVersion::Deleted)?),
            );
        }
        Ok(prev)
    }

    /// Moves `prev`, about to be superseded at `revision`, into history. A
    /// version written and superseded by the same revision (two writes in
    /// one transaction) was never visible and is not kept.
    fn retire(&mut self, key: &[u8], prev: &KeyRecord, revision: u64) -> Result<(), StoreError> {
        if prev.mod_revision < revision {
            self.overlay.insert(
                history_key(key, prev.mod_revision),
                Some(encode(&PastVersion::Value(prev.clone()))?),
            );
        }
        Ok(())
    }

    /// Drops every history record that no read at a revision ≥ `revision`
    /// needs, and makes `revision` the oldest readable one. Returns false
    /// (and changes nothing) when history is already compacted that far.
    ///
    /// Reads the committed tree, not the overlay: it must be the first
    /// operation of its batch. Writes the pending records to sled first, so
    /// the tree is the whole committed state.
    pub fn compact(&mut self, revision: u64) -> Result<bool, StoreError> {
        debug_assert!(self.overlay.is_empty(), "compact must start its batch");
        if revision <= self.state.compacted() {
            return Ok(false);
        }
        self.state.persist()?;
        let corrupt = || StoreError::Corrupt {
            what: "malformed history key".into(),
        };
        // Per key: every record at or below `revision` but the newest is
        // unreachable; the newest is needed only when it is a value that
        // the latest record does not already cover.
        let mut pending: Option<(Vec<u8>, Vec<u8>, sled::IVec)> = None;
        let lo = vec![crate::keys::HISTORY];
        for item in self.state.tree.range(lo..history_end()) {
            let (k, v) = item?;
            let (key, rev) = decode_history_key(&k).ok_or_else(corrupt)?;
            if rev > revision {
                continue;
            }
            if let Some((pkey, pk, pv)) = pending.take() {
                if pkey == key {
                    self.overlay.insert(pk, None);
                } else {
                    self.settle(&pkey, pk, &pv, revision)?;
                }
            }
            pending = Some((key, k.to_vec(), v));
        }
        if let Some((pkey, pk, pv)) = pending {
            self.settle(&pkey, pk, &pv, revision)?;
        }
        self.set_meta(COMPACTED, &revision)?;
        self.compacted = Some(revision);
        Ok(true)
    }

    /// Keeps or drops `key`'s newest history record at or below the
    /// compaction point.
    fn settle(
        &mut self,
        key: &[u8],
        encoded: Vec<u8>,
        value: &[u8],
        revision: u64,
    ) -> Result<(), StoreError> {
        let needed = match decode::<PastVersion>(value)? {
            PastVersion::Deleted => false,
            PastVersion::Value(_) => match self.state.tree.get(user_key(key))? {
                Some(latest) => decode::<KeyRecord>(&latest)?.mod_revision > revision,
                None => true,
            },
        };
        if !needed {
            self.overlay.insert(encoded, None);
        }
        Ok(())
    }

    /// The slots of `slots` holding a key or lock of a lease from before
    /// the cluster map (homed in a group, not a slot), as this batch would
    /// leave things, with one such lease. Such records cannot move: their
    /// lease, and its expiry, would not follow them.
    pub fn legacy_leases_in(&self, slots: &SlotSet) -> Result<Option<(u64, SlotSet)>, StoreError> {
        let legacy = |id: &u64| !matches!(lease_home(*id), Some(LeaseHome::Slot(_)));
        let mut ids: std::collections::BTreeSet<u64> = self
            .state
            .leases()?
            .into_iter()
            .map(|(id, _)| id)
            .filter(legacy)
            .collect();
        ids.extend(
            self.overlay
                .keys()
                .filter(|k| k.first() == Some(&crate::keys::LEASE))
                .filter_map(|k| decode_lease_key(k))
                .filter(legacy),
        );
        let mut pinned = SlotSet::empty();
        let mut one = None;
        for id in ids {
            let Some(lease) = self.lease_get(id)? else {
                continue;
            };
            for s in lease.keys.iter().chain(&lease.locks).map(|k| slot_of(k)) {
                if slots.contains(s) {
                    pinned.insert(s);
                    one.get_or_insert(id);
                }
            }
        }
        Ok(one.map(|id| (id, pinned)))
    }

    /// A lease as this batch would leave it.
    pub fn lease_get(&self, id: u64) -> Result<Option<LeaseRecord>, StoreError> {
        self.raw_get(&lease_key(id))?
            .map(|v| decode(&v))
            .transpose()
    }

    pub fn lease_put(&mut self, id: u64, record: &LeaseRecord) -> Result<(), StoreError> {
        self.overlay
            .insert(lease_key(id).to_vec(), Some(encode(record)?));
        Ok(())
    }

    pub fn lease_delete(&mut self, id: u64) {
        self.overlay.insert(lease_key(id).to_vec(), None);
    }

    /// A lock as this batch would leave it.
    pub fn lock_get(&self, name: &[u8]) -> Result<Option<LockRecord>, StoreError> {
        self.raw_get(&lock_key(name))?
            .map(|v| decode(&v))
            .transpose()
    }

    pub fn lock_put(&mut self, name: &[u8], record: &LockRecord) -> Result<(), StoreError> {
        self.overlay.insert(lock_key(name), Some(encode(record)?));
        Ok(())
    }

    pub fn lock_delete(&mut self, name: &[u8]) {
        self.overlay.insert(lock_key(name), None);
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
        let committed: Vec<Vec<u8>> = {
            let pending = self.state.read_pending();
            self.state
                .range(&pending, lo.to_vec(), hi.to_vec())
                .map(|item| item.map(|(k, _)| k))
                .collect::<Result<_, _>>()?
        };
        for k in committed {
            self.overlay.insert(k, None);
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

    /// Publishes `index` as the applied log index when the batch commits
    /// (and `index` plus the revision offset as the revision).
    pub fn set_applied(&mut self, index: u64) {
        self.applied = Some(index);
    }

    /// The revision offset as this batch would leave it.
    pub fn rev_offset(&self) -> u64 {
        self.offset.unwrap_or_else(|| self.state.rev_offset())
    }

    /// Sets the revision offset: from here on an entry at log index `i`
    /// applies at revision `i + offset`. It only grows, so revisions stay
    /// unique and increasing; a group that imports slots raises it past the
    /// source's revisions, so the moved keys' revisions (and fencing tokens)
    /// keep increasing in their new group.
    pub fn set_rev_offset(&mut self, offset: u64) -> Result<(), StoreError> {
        debug_assert!(
            offset >= self.rev_offset(),
            "the revision offset only grows"
        );
        self.offset = Some(offset);
        self.set_meta(REV_OFFSET, &offset)
    }

    /// The slot ownership as this batch would leave it.
    pub fn ownership(&self) -> Option<Arc<Ownership>> {
        self.ownership
            .clone()
            .or_else(|| self.state.read_pending().ownership.clone())
    }

    /// Replaces the slot ownership (published when the batch commits).
    pub fn set_ownership(&mut self, ownership: Ownership) -> Result<(), StoreError> {
        self.set_meta(OWNERSHIP, &ownership)?;
        self.ownership = Some(Arc::new(ownership));
        Ok(())
    }

    /// Deletes every record a move of `slots` carries (keys, history,
    /// locks, leases; not deduplication results, which other slots may
    /// need). Returns how many records it deleted.
    pub fn delete_slots(&mut self, slots: &SlotSet) -> Result<usize, StoreError> {
        let doomed: Vec<Vec<u8>> = {
            let pending = self.state.read_pending();
            let mut keys = Vec::new();
            for item in self.state.range(&pending, Vec::new(), vec![0xff; 9]) {
                let (k, _) = item?;
                if matches!(record_home(&k), RecordHome::Slot(s) if slots.contains(s)) {
                    keys.push(k);
                }
            }
            keys
        };
        let staged: Vec<Vec<u8>> = self
            .overlay
            .iter()
            .filter(|(k, v)| {
                v.is_some() && matches!(record_home(k), RecordHome::Slot(s) if slots.contains(s))
            })
            .map(|(k, _)| k.clone())
            .collect();
        let n = doomed.len();
        for k in doomed.into_iter().chain(staged) {
            self.overlay.insert(k, None);
        }
        Ok(n)
    }

    /// Why `records` (from another node, over the network) cannot be an
    /// import of `slots`, if they cannot: each must be a record of one of
    /// those slots or a deduplication result.
    pub fn check_import(slots: &SlotSet, records: &[RawRecord]) -> Option<String> {
        records.iter().find_map(|(k, _)| match record_home(k) {
            RecordHome::Slot(s) if slots.contains(s) => None,
            RecordHome::Dedup => None,
            RecordHome::Slot(s) => Some(format!("a record of slot {s}, which is not imported")),
            RecordHome::Group => Some("a group record, which never moves".into()),
        })
    }

    /// Writes records exported by [`StateTree::export_slots`] elsewhere.
    /// Deduplication results already present here are kept.
    pub fn import_records(&mut self, records: Vec<RawRecord>) -> Result<(), StoreError> {
        for (k, v) in records {
            match record_home(&k) {
                RecordHome::Slot(_) => {
                    self.overlay.insert(k, Some(v));
                }
                RecordHome::Dedup => {
                    if self.raw_get(&k)?.is_none() {
                        self.overlay.insert(k, Some(v));
                    }
                }
                RecordHome::Group => {
                    return Err(StoreError::Corrupt {
                        what: "a slot import carried a group record".into(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Makes every staged write visible at once. They reach sled, in one
    /// atomic batch with later ones, when the pending records are persisted.
    pub fn commit(self) -> Result<(), StoreError> {
        let mut pending = self.state.write_pending();
        for (k, v) in self.overlay {
            pending.bytes += k.len() + v.as_ref().map_or(0, Vec::len);
            pending.records.insert(k, v);
        }
        if let Some(o) = self.ownership {
            pending.ownership = Some(o);
        }
        if let Some(o) = self.offset {
            self.state.offset.store(o, Ordering::Release);
        }
        if let Some(index) = self.applied {
            self.state.set_applied(index);
        }
        if let Some(c) = self.compacted {
            self.state.compacted.store(c, Ordering::Release);
        }
        if pending.is_full() {
            self.state.persist_locked(&mut pending)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_shard::{SlotSet, slot_of};

    fn tree() -> (tempfile::TempDir, StateTree) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let t = StateTree::open(&db, 1).unwrap();
        (dir, t)
    }

    fn values(scan: &ScanResult) -> Vec<(Vec<u8>, Vec<u8>, u64)> {
        scan.records
            .iter()
            .map(|(k, r)| (k.clone(), r.value.clone(), r.mod_revision))
            .collect()
    }

    #[test]
    fn values_encode_as_before_they_were_byte_strings() {
        // Records and log entries written before `serde_bytes` must still
        // decode, and new ones must read the same for older code.
        #[derive(Serialize)]
        struct Earlier {
            value: Vec<u8>,
            create_revision: u64,
            mod_revision: u64,
            version: u64,
            lease: u64,
        }
        let record = KeyRecord {
            value: (0..=255).collect(),
            create_revision: 1,
            mod_revision: 300,
            version: 2,
            lease: 70_000,
        };
        let earlier = Earlier {
            value: record.value.clone(),
            create_revision: 1,
            mod_revision: 300,
            version: 2,
            lease: 70_000,
        };
        let bytes = encode(&earlier).unwrap();
        assert_eq!(encode(&record).unwrap(), bytes);
        assert_eq!(decode::<KeyRecord>(&bytes).unwrap(), record);
    }

    #[test]
    fn reads_merge_pending_records_over_sled() {
        let (_dir, t) = tree();
        let mut b = t.batch();
        for k in [b"a", b"b", b"c"] {
            b.put(k, b"v1".to_vec(), 1).unwrap();
        }
        b.set_applied(1);
        b.commit().unwrap();
        t.persist().unwrap();
        assert_eq!(t.pending_records(), 0);

        // Revision 2 stays pending: a is overwritten (its old version moves
        // to history), b deleted, d created.
        let mut b = t.batch();
        b.put(b"a", b"v2".to_vec(), 2).unwrap();
        b.delete(b"b", 2).unwrap();
        b.put(b"d", b"v2".to_vec(), 2).unwrap();
        b.set_applied(2);
        b.commit().unwrap();
        assert!(t.pending_records() > 0);

        let check = |t: &StateTree| {
            assert_eq!(
                t.get(b"b").unwrap().0,
                None,
                "a pending delete hides sled's record"
            );
            assert_eq!(t.get(b"a").unwrap().0.unwrap().value, b"v2");
            let scan = t.scan(b"", None, 10).unwrap();
            assert_eq!(
                values(&scan),
                vec![
                    (b"a".to_vec(), b"v2".to_vec(), 2),
                    (b"c".to_vec(), b"v1".to_vec(), 1),
                    (b"d".to_vec(), b"v2".to_vec(), 2),
                ]
            );
            let limited = t.scan(b"", None, 1).unwrap();
            assert!(limited.more);
            assert_eq!(limited.records.len(), 1);
            let old = t.scan_at(b"", None, 10, 1).unwrap();
            assert_eq!(
                values(&old),
                vec![
                    (b"a".to_vec(), b"v1".to_vec(), 1),
                    (b"b".to_vec(), b"v1".to_vec(), 1),
                    (b"c".to_vec(), b"v1".to_vec(), 1),
                ]
            );
            assert_eq!(t.get_at(b"a", 1).unwrap().0.unwrap().value, b"v1");
            assert_eq!(t.get_at(b"b", 1).unwrap().0.unwrap().value, b"v1");
            assert_eq!(t.get_at(b"b", 2).unwrap().0, None);
            let revisions: Vec<u64> = t
                .history(b"b")
                .unwrap()
                .versions
                .iter()
                .map(|v| v.revision)
                .collect();
            assert_eq!(revisions, vec![1, 2]);
            assert_eq!(t.user_key_count().unwrap(), 3);
            assert_eq!(t.history_record_count().unwrap(), 3);
        };
        check(&t);
        let before = t.export().unwrap();
        t.persist().unwrap();
        assert_eq!(t.pending_records(), 0);
        check(&t);
        assert_eq!(t.export().unwrap(), before, "persisting changes no record");
    }

    /// Opens the sled database at `path` again. A dropped `Db` lets go of
    /// its file lock only once sled's background threads end, which on a
    /// busy machine can take a moment.
    fn reopen_sled(path: &std::path::Path) -> sled::Db {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match sled::Config::new().path(path).open() {
                Ok(db) => return db,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => panic!("reopening sled: {e}"),
            }
        }
    }

    #[test]
    fn after_a_crash_sled_holds_exactly_the_persisted_batches() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            let t = StateTree::open(&db, 1).unwrap();
            let mut b = t.batch();
            b.put(b"k", b"one".to_vec(), 1).unwrap();
            b.set_meta("applied", &1u64).unwrap();
            b.commit().unwrap();
            t.persist().unwrap();
            let mut b = t.batch();
            b.put(b"k", b"two".to_vec(), 2).unwrap();
            b.put(b"other", b"two".to_vec(), 2).unwrap();
            b.set_meta("applied", &2u64).unwrap();
            b.commit().unwrap();
            assert_eq!(t.meta::<u64>("applied").unwrap(), Some(2));
            db.flush().unwrap();
            // Dropped without persisting: a crash after the flush.
        }
        let db = reopen_sled(dir.path());
        let t = StateTree::open(&db, 1).unwrap();
        assert_eq!(t.meta::<u64>("applied").unwrap(), Some(1));
        assert_eq!(t.get(b"k").unwrap().0.unwrap().value, b"one");
        assert_eq!(t.get(b"other").unwrap().0, None);
    }

    #[test]
    fn pending_records_go_to_sled_once_they_pass_the_bound() {
        let (_dir, t) = tree();
        for i in 0..(PERSIST_RECORDS as u64) {
            let mut b = t.batch();
            b.put(&i.to_be_bytes(), vec![1; 16], i + 1).unwrap();
            b.set_applied(i + 1);
            b.commit().unwrap();
        }
        assert!(
            t.pending_records() < PERSIST_RECORDS,
            "{} pending",
            t.pending_records()
        );
        assert_eq!(t.user_key_count().unwrap(), PERSIST_RECORDS);
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
        assert!(b.delete(b"k", 8).unwrap().is_some());
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

    /// Applies one write per revision, as the state machine would.
    fn write(t: &StateTree, rev: u64, key: &[u8], value: Option<&[u8]>) {
        let mut b = t.batch();
        match value {
            Some(v) => {
                b.put(key, v.to_vec(), rev).unwrap();
            }
            None => {
                b.delete(key, rev).unwrap();
            }
        }
        b.set_applied(rev);
        b.commit().unwrap();
    }

    fn value_at(t: &StateTree, key: &[u8], at: u64) -> Option<Vec<u8>> {
        t.get_at(key, at).unwrap().0.map(|r| r.value)
    }

    #[test]
    fn reads_at_a_revision_see_exactly_that_revision() {
        let (_d, t) = tree();
        // rev: 1 a=1, 2 b=1, 3 a=2, 4 del a, 5 b=2, 6 a=3, 7 a\0=x
        write(&t, 1, b"a", Some(b"1"));
        write(&t, 2, b"b", Some(b"1"));
        write(&t, 3, b"a", Some(b"2"));
        write(&t, 4, b"a", None);
        write(&t, 5, b"b", Some(b"2"));
        write(&t, 6, b"a", Some(b"3"));
        write(&t, 7, b"a\x00", Some(b"x"));
        let want_a: [Option<&[u8]>; 7] = [
            Some(b"1"),
            Some(b"1"),
            Some(b"2"),
            None,
            None,
            Some(b"3"),
            Some(b"3"),
        ];
        for (i, want) in want_a.iter().enumerate() {
            let rev = i as u64 + 1;
            assert_eq!(value_at(&t, b"a", rev).as_deref(), *want, "a at {rev}");
        }
        assert_eq!(value_at(&t, b"b", 1), None);
        assert_eq!(value_at(&t, b"b", 4).as_deref(), Some(&b"1"[..]));
        let at3 = t.get_at(b"a", 3).unwrap().0.unwrap();
        assert_eq!(
            (at3.create_revision, at3.mod_revision, at3.version),
            (1, 3, 2)
        );
        let at6 = t.get_at(b"a", 6).unwrap().0.unwrap();
        assert_eq!((at6.create_revision, at6.version), (6, 1), "recreated");
        assert!(matches!(
            t.get_at(b"a", 8),
            Err(StoreError::FutureRevision {
                requested: 8,
                current: 7
            })
        ));
        let scan = |at| {
            let r = t.scan_at(b"", None, 10, at).unwrap();
            r.records
                .into_iter()
                .map(|(k, r)| (k, r.value))
                .collect::<Vec<_>>()
        };
        assert_eq!(scan(1), vec![(b"a".to_vec(), b"1".to_vec())]);
        assert_eq!(scan(4), vec![(b"b".to_vec(), b"1".to_vec())]);
        assert_eq!(
            scan(7),
            vec![
                (b"a".to_vec(), b"3".to_vec()),
                (b"a\x00".to_vec(), b"x".to_vec()),
                (b"b".to_vec(), b"2".to_vec())
            ]
        );
        let limited = t.scan_at(b"", None, 1, 5).unwrap();
        assert_eq!(
            (limited.records.len(), limited.more),
            (1, false),
            "only b exists at 5"
        );
        let limited = t.scan_at(b"", None, 1, 3).unwrap();
        assert!(limited.more);
        let bounded = t.scan_at(b"a", Some(b"b"), 10, 7).unwrap();
        assert_eq!(bounded.records.len(), 2);
        let h = t.history(b"a").unwrap();
        let revs: Vec<(u64, bool)> = h
            .versions
            .iter()
            .map(|v| (v.revision, v.record.is_some()))
            .collect();
        assert_eq!(revs, vec![(1, true), (3, true), (4, false), (6, true)]);
    }

    #[test]
    fn compaction_keeps_exactly_what_later_reads_need() {
        let (_d, t) = tree();
        write(&t, 1, b"a", Some(b"1"));
        write(&t, 2, b"a", Some(b"2"));
        write(&t, 3, b"b", Some(b"1"));
        write(&t, 4, b"b", None);
        write(&t, 5, b"c", Some(b"1"));
        write(&t, 6, b"a", Some(b"3"));
        write(&t, 7, b"c", None);
        let before: Vec<Vec<(Vec<u8>, Vec<u8>)>> = (5..=7)
            .map(|at| {
                t.scan_at(b"", None, 10, at)
                    .unwrap()
                    .records
                    .into_iter()
                    .map(|(k, r)| (k, r.value))
                    .collect()
            })
            .collect();
        let mut b = t.batch();
        assert!(b.compact(5).unwrap());
        b.commit().unwrap();
        assert_eq!(t.compacted(), 5);
        for (i, at) in (5..=7).enumerate() {
            let now: Vec<(Vec<u8>, Vec<u8>)> = t
                .scan_at(b"", None, 10, at)
                .unwrap()
                .records
                .into_iter()
                .map(|(k, r)| (k, r.value))
                .collect();
            assert_eq!(now, before[i], "state at {at} survives compaction at 5");
        }
        assert!(matches!(
            t.get_at(b"a", 4),
            Err(StoreError::Compacted {
                requested: 4,
                oldest: 5
            })
        ));
        // Left: a@2 (needed at 5: latest a is from 6), c@5 and its tombstone
        // @7. Gone: a@1, b@3 and b's tombstone @4.
        assert_eq!(t.history_record_count().unwrap(), 3);
        let mut b = t.batch();
        assert!(!b.compact(5).unwrap(), "already compacted");
        drop(b);
        let mut b = t.batch();
        assert!(b.compact(7).unwrap());
        b.commit().unwrap();
        assert_eq!(t.history_record_count().unwrap(), 0);
        assert_eq!(value_at(&t, b"a", 7).as_deref(), Some(&b"3"[..]));
        assert_eq!(value_at(&t, b"c", 7), None);
    }

    #[test]
    fn writes_within_one_revision_keep_one_version() {
        let (_d, t) = tree();
        write(&t, 1, b"k", Some(b"old"));
        let mut b = t.batch();
        b.delete(b"k", 2).unwrap();
        b.put(b"k", b"new".to_vec(), 2).unwrap();
        b.put(b"k", b"newer".to_vec(), 2).unwrap();
        b.set_applied(2);
        b.commit().unwrap();
        let h = t.history(b"k").unwrap();
        let revs: Vec<(u64, Option<Vec<u8>>)> = h
            .versions
            .into_iter()
            .map(|v| (v.revision, v.record.map(|r| r.value)))
            .collect();
        assert_eq!(
            revs,
            vec![(1, Some(b"old".to_vec())), (2, Some(b"newer".to_vec()))]
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
        b.set_applied(3);
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

    /// Keys whose slots are in `slots`, out of `n` candidates `k0..`.
    fn keys_in(slots: &SlotSet, n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("k{i}").into_bytes())
            .filter(|k| slots.contains_key(k))
            .collect()
    }

    #[test]
    fn reads_answer_only_for_owned_slots_and_scans_skip_the_rest() {
        let (_d, t) = tree();
        for i in 0..40 {
            write(&t, i + 1, format!("k{i}").as_bytes(), Some(b"v"));
        }
        let mine = SlotSet::of(
            (0..40)
                .map(|i| slot_of(format!("k{i}").as_bytes()))
                .take(20),
        );
        let owned_keys = keys_in(&mine, 40);
        let other = (0..40)
            .map(|i| format!("k{i}").into_bytes())
            .find(|k| !mine.contains_key(k))
            .unwrap();
        // Without a record every key is served (a group from before the map).
        assert!(t.get(&other).unwrap().0.is_some());
        let mut b = t.batch();
        let mut own = Ownership::of(mine.clone());
        own.moved_to.insert(slot_of(&other), 7);
        b.set_ownership(own).unwrap();
        b.set_applied(41);
        b.commit().unwrap();
        match t.get(&other) {
            Err(StoreError::NotOwned { moved_to, .. }) => assert_eq!(moved_to, Some(7)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            t.get_at(&other, 40),
            Err(StoreError::NotOwned { .. })
        ));
        assert!(matches!(
            t.history(&other),
            Err(StoreError::NotOwned { .. })
        ));
        assert!(matches!(t.lock(&other), Err(StoreError::NotOwned { .. })));
        let scan = t.scan(b"", None, 1000).unwrap();
        let scanned: Vec<Vec<u8>> = scan.records.into_iter().map(|(k, _)| k).collect();
        let mut want = owned_keys.clone();
        want.sort();
        assert_eq!(scanned, want);
        assert_eq!(t.scan_at(b"", None, 1000, 30).unwrap().records.len(), {
            // at 30 only k0..k29 existed
            owned_keys
                .iter()
                .filter(|k| String::from_utf8_lossy(&k[1..]).parse::<u64>().unwrap() < 30)
                .count()
        });
        assert_eq!(t.user_key_count().unwrap(), owned_keys.len());
        // The record survives a reopen of the tree.
        let t2 = StateTree::open(&sled::Config::new().temporary(true).open().unwrap(), 1).unwrap();
        assert!(t2.ownership().is_none());
        assert_eq!(t.ownership().unwrap().owned, mine);
    }

    #[test]
    fn slot_records_export_import_and_delete_with_their_history_locks_and_leases() {
        let (_d, src) = tree();
        for i in 0..30 {
            write(&src, 2 * i + 1, format!("k{i}").as_bytes(), Some(b"one"));
            write(&src, 2 * i + 2, format!("k{i}").as_bytes(), Some(b"two"));
        }
        let moving = SlotSet::of(
            (0..30)
                .map(|i| slot_of(format!("k{i}").as_bytes()))
                .take(10),
        );
        let moved = keys_in(&moving, 30);
        let lock_name = moved[0].clone();
        let moved_lease = palisade_shard::lease_id(slot_of(&moved[0]), 5);
        let staying_lease = palisade_shard::lease_id(4095, 6);
        let legacy_lease = (1u64 << 48) | 9;
        let mut b = src.batch();
        b.lock_put(
            &lock_name,
            &LockRecord {
                lease: moved_lease,
                token: 33,
                term: 1,
            },
        )
        .unwrap();
        for id in [moved_lease, staying_lease, legacy_lease] {
            b.lease_put(
                id,
                &LeaseRecord {
                    ttl_ms: 1000,
                    ..LeaseRecord::default()
                },
            )
            .unwrap();
        }
        b.dedup_put(5, 1, vec![1]);
        b.set_applied(61);
        b.commit().unwrap();
        // Export in small chunks, as a move does.
        let mut cursor = Vec::new();
        let mut records = Vec::new();
        let mut chunks = 0;
        loop {
            let (chunk, next) = src.export_slots(&moving, &cursor, 64).unwrap();
            records.extend(chunk);
            chunks += 1;
            match next {
                Some(k) => cursor = k,
                None => break,
            }
        }
        assert!(chunks > 3, "{chunks} chunks");
        let (_d2, dst) = tree();
        write(&dst, 1, b"theirs", Some(b"x"));
        let mut b = dst.batch();
        b.dedup_put(5, 1, vec![2]);
        b.import_records(records).unwrap();
        let mut own = Ownership::of(SlotSet::of([slot_of(b"theirs")]));
        own.owned.union_with(&moving);
        b.set_ownership(own).unwrap();
        b.set_rev_offset(100).unwrap();
        b.set_applied(2);
        b.commit().unwrap();
        assert_eq!(dst.revision(), 102, "the offset lifts the revision");
        assert_eq!(dst.applied_index(), 2);
        for k in &moved {
            let h = dst.history(k).unwrap();
            assert_eq!(h.versions.len(), 2, "history moves with the key");
            assert_eq!(h.versions[1].record.as_ref().unwrap().value, b"two");
        }
        assert_eq!(dst.lock(&lock_name).unwrap().0.unwrap().token, 33);
        assert!(dst.lease(moved_lease).unwrap().is_some());
        assert!(dst.lease(staying_lease).is_err(), "not this group's slot");
        assert_eq!(dst.leases().unwrap().len(), 1);
        assert_eq!(dst.batch().dedup_get(5, 1).unwrap(), Some(vec![2]), "kept");
        // The source deletes what moved, keeps the rest.
        let mut b = src.batch();
        let deleted = b.delete_slots(&moving).unwrap();
        b.commit().unwrap();
        assert_eq!(
            deleted,
            moved.len() * 2 + 2,
            "records, history, a lock, a lease"
        );
        assert_eq!(src.user_key_count().unwrap(), 30 - moved.len());
        assert!(src.lease(legacy_lease).unwrap().is_some());
        assert!(src.lease(staying_lease).unwrap().is_some());
        assert!(src.batch().dedup_get(5, 1).unwrap().is_some());
    }
}
