//! The latest snapshot of one group, on the `g{g}/snap` tree.
//!
//! A snapshot is two opaque blobs, its encoded meta and its data, replaced
//! together atomically. The group crate decides what they contain.

use crate::StoreError;

const META: &str = "meta";
const DATA: &str = "data";

/// Where a group keeps its latest snapshot. Cheap to clone.
#[derive(Clone)]
pub struct SnapshotStore {
    tree: sled::Tree,
}

impl SnapshotStore {
    pub(crate) fn open(db: &sled::Db, group: u64) -> Result<Self, StoreError> {
        Ok(Self {
            tree: db.open_tree(format!("g{group}/snap"))?,
        })
    }

    /// Replaces the stored snapshot (not yet durable: flush after).
    pub fn save(&self, meta: &[u8], data: &[u8]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(META, meta);
        batch.insert(DATA, data);
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// The stored snapshot's meta and data, if any.
    pub fn load(&self) -> Result<Option<crate::state::RawRecord>, StoreError> {
        let Some(meta) = self.tree.get(META)? else {
            return Ok(None);
        };
        let data = self.tree.get(DATA)?.ok_or_else(|| StoreError::Corrupt {
            what: "snapshot meta without data".into(),
        })?;
        Ok(Some((meta.to_vec(), data.to_vec())))
    }
}
