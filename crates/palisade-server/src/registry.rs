//! The Raft groups this node hosts right now. The reconciler opens and
//! closes replicas as the cluster map changes; everything else only looks
//! groups up (and holds an `Arc` for the length of one request).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use palisade_group::{GroupId, RaftGroup};

#[derive(Default)]
pub struct GroupRegistry {
    groups: RwLock<BTreeMap<GroupId, Arc<RaftGroup>>>,
}

impl GroupRegistry {
    /// The local replica of `group`, if this node hosts one.
    pub fn get(&self, group: GroupId) -> Option<Arc<RaftGroup>> {
        self.read().get(&group).cloned()
    }

    /// Every hosted group, by id.
    pub fn all(&self) -> Vec<(GroupId, Arc<RaftGroup>)> {
        self.read().iter().map(|(id, g)| (*id, g.clone())).collect()
    }

    pub fn ids(&self) -> Vec<GroupId> {
        self.read().keys().copied().collect()
    }

    pub(crate) fn insert(&self, group: Arc<RaftGroup>) {
        self.write().insert(group.id(), group);
    }

    pub(crate) fn remove(&self, group: GroupId) -> Option<Arc<RaftGroup>> {
        self.write().remove(&group)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<GroupId, Arc<RaftGroup>>> {
        self.groups.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<GroupId, Arc<RaftGroup>>> {
        self.groups.write().unwrap_or_else(|p| p.into_inner())
    }
}
