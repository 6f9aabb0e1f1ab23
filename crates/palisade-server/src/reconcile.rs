//! The reconciler: makes the replicas this node hosts match the cluster
//! map. It runs on every node, after every new map version and once a
//! second.
//!
//! - A replica the map lists for this node (including one being added) is
//!   opened. A replica of a group's initial set on a fresh disk creates the
//!   group's Raft (`initialize`, with the same members on every node); any
//!   other new replica waits for the leader to send it the log or a
//!   snapshot.
//! - A replica the map does not list is deleted only when the map *proves*
//!   it was removed: the group is gone (ids are never reused), or its epoch
//!   moved past the epoch at which this node first opened the replica and
//!   the replica is no longer listed. A map that is merely behind (this
//!   node's meta replica lagging, or re-applying after a restart) proves
//!   nothing, so a replica is never deleted because the map has not caught
//!   up with it — only after the map says it is gone everywhere it must be.
//! - Before the first map exists, whatever the disk holds is opened (a data
//!   directory from before the map, or a restart).
//!
//! The meta group's replica is never closed while the node is a member of
//! the cluster: it is how the node learns the map.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use palisade_group::{GroupId, ReplicaId};
use palisade_shard::{ClusterMap, META_GROUP, NodeState};

use crate::node::Node;

/// How often the reconciler looks even when the map did not change.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);

/// Starts the reconciler task.
pub(crate) fn spawn(node: &Arc<Node>) {
    let weak = Arc::downgrade(node);
    let mut maps = node.watch_map();
    node.tasks()
        .spawn("reconciler", move |mut shutdown| async move {
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = maps.changed() => {}
                    _ = tokio::time::sleep(RECONCILE_EVERY) => {}
                }
                let Some(node) = weak.upgrade() else { return };
                node.reconcile().await;
            }
        });
}

/// Whether `map` proves that replica `replica` of `group`, first opened on
/// this node at map epoch `added_epoch` of the group, was removed.
pub(crate) fn proven_removed(
    map: &ClusterMap,
    group: GroupId,
    replica: ReplicaId,
    added_epoch: u64,
) -> bool {
    if !map.is_bootstrapped() {
        return false;
    }
    match map.groups.get(&group) {
        // Group ids are never reused: an id below the next one that is not
        // in the map was dropped.
        None => group != META_GROUP && group < map.next_group_id,
        Some(info) => info.node_of(replica).is_none() && info.epoch > added_epoch,
    }
}

impl Node {
    /// One reconciliation pass (see the module doc).
    pub(crate) async fn reconcile(self: &Arc<Self>) {
        let _one_at_a_time = self.reconciling.lock().await;
        let map = self.map();
        if map
            .nodes
            .get(&self.id())
            .is_some_and(|n| n.state == NodeState::Removed)
        {
            self.mark_removed();
        }
        let desired = if map.is_bootstrapped() {
            map.replicas_on(self.id())
        } else {
            Default::default()
        };
        let mut known: BTreeSet<GroupId> = self.stored_groups().into_iter().collect();
        known.extend(self.registry.ids());
        known.extend(desired.keys().copied());
        for group in known {
            if group == META_GROUP {
                continue;
            }
            if let Err(e) = self
                .reconcile_group(&map, group, desired.get(&group).copied())
                .await
            {
                tracing::warn!(node = self.id(), group, error = %e, "reconciling a replica failed");
            }
        }
    }

    async fn reconcile_group(
        self: &Arc<Self>,
        map: &ClusterMap,
        group: GroupId,
        wanted: Option<ReplicaId>,
    ) -> Result<(), crate::error::ServerError> {
        let here = self.replica_record(group).map(|r| {
            let replica = if r.replica == 0 { self.id() } else { r.replica };
            (replica, r.added_epoch)
        });
        if let Some((replica, added_epoch)) = here
            && wanted != Some(replica)
        {
            if proven_removed(map, group, replica, added_epoch) {
                self.destroy_replica(group).await?;
            } else {
                // Maybe a member the map has not caught up with: keep it.
                self.open_replica(group, replica, added_epoch).await?;
                return Ok(());
            }
        }
        let Some(replica) = wanted else {
            return Ok(());
        };
        let Some(info) = map.groups.get(&group) else {
            return Ok(());
        };
        let fresh = self.registry.get(group).is_none() && self.replica_record(group).is_none();
        let g = self.open_replica(group, replica, info.epoch).await?;
        if fresh && info.initial.contains(&replica) && !g.is_initialized().await {
            let members = info
                .initial
                .iter()
                .filter_map(|r| {
                    let node = info.node_of(*r)?;
                    let addr = map.addr_of(node)?.to_string();
                    Some((*r, BasicNode { addr }))
                })
                .collect();
            g.initialize(members).await?;
            tracing::info!(node = self.id(), group, replica, "created the group's Raft");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use palisade_shard::{MapCommand, Role};

    use super::*;

    #[test]
    fn only_a_map_that_moved_past_a_replica_proves_it_removed() {
        let nodes: BTreeMap<u64, String> = (1..=4).map(|i| (i, format!("n{i}:1"))).collect();
        let mut map = ClusterMap::bootstrap(1, &nodes, 2, 3).unwrap();
        assert!(
            !proven_removed(&ClusterMap::default(), 1, 1, 0),
            "no map, no proof"
        );
        // Replica 3 of group 1 (node 3) is listed: not removed.
        assert!(!proven_removed(&map, 1, 3, 0));
        let epoch_before = map.groups[&1].epoch;
        // Node 4 gets a replica of group 1 (recorded at the new epoch).
        map.apply(&MapCommand::BeginReplicaChange {
            group: 1,
            add: Some((4, Role::Voter)),
            remove: Some(3),
            promote: None,
            demote: None,
        })
        .unwrap();
        let added_at = map.groups[&1].epoch;
        let new = map.groups[&1].replica_on(4).unwrap();
        // A stale map (before the add) does not prove the new replica gone.
        let mut stale = map.clone();
        stale.groups.get_mut(&1).unwrap().change = None;
        stale.groups.get_mut(&1).unwrap().epoch = epoch_before;
        assert!(!proven_removed(&stale, 1, new, added_at));
        map.apply(&MapCommand::FinishReplicaChange { group: 1 })
            .unwrap();
        assert!(
            proven_removed(&map, 1, 3, 0),
            "the replaced replica is gone"
        );
        assert!(!proven_removed(&map, 1, new, added_at));
        // A dropped group is gone; an id the map never had is not proof.
        assert!(!proven_removed(&map, 9, 1, 0));
        map.groups.remove(&2);
        assert!(proven_removed(&map, 2, 2, 0));
        assert!(!proven_removed(&map, META_GROUP, 1, 0));
    }
}
