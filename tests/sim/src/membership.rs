//! Membership changes in the simulation, and the invariants that watch
//! slot ownership.
//!
//! Changes (one every few seconds of simulated time, interleaved with the
//! network faults and crashes): a spare node joins with `--join`, a node
//! drains, a node is crashed and removed, a replica moves, a leader is
//! transferred, the hash group count changes. Each runs as a simulated
//! client calling the Admin API, retrying through elections.
//!
//! Ownership invariants, checked from what the state machines apply (the
//! `palisade_group::observe` seam), not from what they claim:
//! - **one owner**: a group gains a slot only after the slot's previous
//!   owner lost it (in simulated time, by the first replica of each group to
//!   apply the change), so no two groups ever serve a slot at once;
//! - **writes only to owned slots**: every applied client write touches
//!   only slots its group owned, and not frozen, at that log index.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use palisade_group::observe::{Applied, ApplyEvent};
use palisade_proto::v1 as pb;
use palisade_proto::v1::admin_client::AdminClient;
use palisade_shard::{SLOTS, Slot, SlotSet};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{addr, sim_channel};

/// A change of the cluster's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Join(u64),
    Drain(u64),
    /// Crash the node for good, then `node remove` it.
    Remove(u64),
    MoveReplica,
    TransferLeader,
    SetGroups,
}

/// Carries out `change` through the members `via`, retrying for up to a
/// minute of simulated time; returns what it did, or why not.
pub async fn carry_out(change: Change, via: Vec<u64>, seed: u64) -> Result<String, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut last = String::from("no attempt");
    for attempt in 0..120u64 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let node = via[(attempt as usize) % via.len()];
        let Ok(channel) = sim_channel(&addr(node)) else {
            continue;
        };
        let mut admin = AdminClient::new(channel);
        let call = attempt_change(&mut admin, &change, &mut rng);
        match tokio::time::timeout(Duration::from_secs(3), call).await {
            Ok(Ok(done)) => return Ok(done),
            Ok(Err(e)) => last = e,
            Err(_) => last = "no answer in time".into(),
        }
    }
    Err(format!("{change:?} never went through: {last}"))
}

async fn attempt_change(
    admin: &mut AdminClient<tonic::transport::Channel>,
    change: &Change,
    rng: &mut StdRng,
) -> Result<String, String> {
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    match change {
        Change::Drain(n) | Change::Remove(n) => {
            let dead = matches!(change, Change::Remove(_));
            match admin
                .drain_node(pb::DrainNodeRequest { node_id: *n, dead })
                .await
            {
                Ok(_) => {}
                // A joining node stopped before it registered: the cluster
                // never knew it, which is what removing it asks for.
                Err(e) if dead && e.code() == tonic::Code::NotFound => {
                    return Ok(format!("node {n} never registered"));
                }
                Err(e) => return Err(status(e)),
            }
            Ok(format!(
                "{} node {n}",
                if dead { "removed" } else { "drained" }
            ))
        }
        Change::Join(n) => Ok(format!("node {n} joining")),
        Change::MoveReplica | Change::TransferLeader | Change::SetGroups => {
            let map = admin
                .get_cluster_map(pb::GetClusterMapRequest { min_epoch: 0 })
                .await
                .map_err(status)?
                .into_inner()
                .map
                .ok_or("no map")?;
            let serving: Vec<u64> = map
                .nodes
                .iter()
                .filter(|n| n.state == pb::NodeState::Serving as i32)
                .map(|n| n.id)
                .collect();
            let data: Vec<&pb::MapGroup> = map.groups.iter().filter(|g| g.id != 0).collect();
            if data.is_empty() {
                return Err("no data group".into());
            }
            let g = data[rng.gen_range(0..data.len())];
            let voters: Vec<u64> = g
                .replicas
                .iter()
                .filter(|r| r.role == pb::ReplicaRole::Voter as i32)
                .map(|r| r.node_id)
                .collect();
            match change {
                Change::MoveReplica => {
                    let holders: Vec<u64> = g.replicas.iter().map(|r| r.node_id).collect();
                    let to: Vec<u64> = serving
                        .iter()
                        .copied()
                        .filter(|n| !holders.contains(n))
                        .collect();
                    if to.is_empty() || voters.is_empty() || !g.change.is_empty() {
                        return Ok(format!("no replica of group {} could move", g.id));
                    }
                    let (from, to) = (
                        voters[rng.gen_range(0..voters.len())],
                        to[rng.gen_range(0..to.len())],
                    );
                    admin
                        .move_replica(pb::MoveReplicaRequest {
                            group_id: g.id,
                            from_node: from,
                            to_node: to,
                        })
                        .await
                        .map_err(status)?;
                    Ok(format!(
                        "moved group {}'s replica from {from} to {to}",
                        g.id
                    ))
                }
                Change::TransferLeader => {
                    let to = voters[rng.gen_range(0..voters.len())];
                    admin
                        .transfer_leader(pb::TransferLeaderRequest {
                            group_id: g.id,
                            node_id: to,
                        })
                        .await
                        .map_err(status)?;
                    Ok(format!("group {}'s leadership to node {to}", g.id))
                }
                _ => {
                    let choices: Vec<u32> = [1u32, 2, 3, 4]
                        .into_iter()
                        .filter(|c| *c != map.target_groups)
                        .collect();
                    let n = choices[rng.gen_range(0..choices.len())];
                    admin
                        .set_groups(pb::SetGroupsRequest { groups: n })
                        .await
                        .map_err(status)?;
                    Ok(format!("set-groups {} -> {n}", map.target_groups))
                }
            }
        }
    }
}

/// Watches what the state machines apply (see the module doc).
#[derive(Default)]
pub struct OwnershipTracker {
    /// Per group: the highest index reported, and the ownership (owned,
    /// frozen) after each slot command, by index.
    groups: BTreeMap<u64, GroupTimeline>,
    /// Per slot: the group serving it now (as its first replica to apply
    /// the change says).
    owner: BTreeMap<Slot, u64>,
    /// Applied writes to check once the timeline reaches their index.
    writes: Vec<(u64, u64, Vec<Slot>)>,
    pub problems: Vec<String>,
    pub ownership_changes: u64,
    pub writes_checked: u64,
}

#[derive(Default)]
struct GroupTimeline {
    /// Highest slot-command index seen (first replica to apply it wins).
    seen: u64,
    /// index → (owned, frozen) after the slot command at that index.
    changes: BTreeMap<u64, (SlotSet, SlotSet)>,
}

impl OwnershipTracker {
    /// An observer to install, sharing this tracker.
    pub fn observer(tracker: &Rc<RefCell<Self>>) -> impl Fn(ApplyEvent) + 'static {
        let t = tracker.clone();
        move |e| t.borrow_mut().apply(e)
    }

    fn apply(&mut self, e: ApplyEvent) {
        match e.what {
            Applied::Ownership { owned, frozen } => {
                let timeline = self.groups.entry(e.group).or_default();
                if e.index <= timeline.seen {
                    return; // another replica applying the same entry
                }
                let before = timeline
                    .changes
                    .values()
                    .next_back()
                    .map(|(o, _)| o.clone())
                    .unwrap_or_default();
                timeline.seen = e.index;
                timeline.changes.insert(e.index, (owned.clone(), frozen));
                self.ownership_changes += 1;
                for s in 0..SLOTS as Slot {
                    let (had, has) = (before.contains(s), owned.contains(s));
                    if had && !has && self.owner.get(&s) == Some(&e.group) {
                        self.owner.remove(&s);
                    }
                    if has && !had {
                        match self.owner.get(&s) {
                            Some(g) if *g != e.group => self.problems.push(format!(
                                "slot {s}: group {} took it at index {} while group {g} still served it",
                                e.group, e.index
                            )),
                            _ => {
                                self.owner.insert(s, e.group);
                            }
                        }
                    }
                }
            }
            Applied::Write { slots } => {
                self.writes.push((e.group, e.index, slots));
                self.check_writes();
            }
        }
    }

    /// Checks every pending write whose group's timeline is known up to
    /// its index (a group that never adopted slots serves every key).
    fn check_writes(&mut self) {
        let pending = std::mem::take(&mut self.writes);
        for (group, index, slots) in pending {
            let Some(timeline) = self.groups.get(&group) else {
                // Not adopted yet: it serves every key it is sent.
                continue;
            };
            let Some((_, (owned, frozen))) = timeline.changes.range(..index).next_back() else {
                continue;
            };
            self.writes_checked += 1;
            for s in &slots {
                if !owned.contains(*s) || frozen.contains(*s) {
                    self.problems.push(format!(
                        "group {group} applied a write to slot {s} at index {index} while {}",
                        if owned.contains(*s) {
                            "the slot was frozen"
                        } else {
                            "it did not own the slot"
                        }
                    ));
                }
            }
        }
    }

    /// Slots no group serves, and the number of slots served (for the end
    /// of a run: every slot must have exactly one owner).
    pub fn unowned(&self) -> Vec<Slot> {
        if self.groups.is_empty() {
            return Vec::new();
        }
        (0..SLOTS as Slot)
            .filter(|s| !self.owner.contains_key(s))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own(group: u64, index: u64, owned: &[Slot]) -> ApplyEvent {
        ApplyEvent {
            group,
            index,
            what: Applied::Ownership {
                owned: SlotSet::of(owned.iter().copied()),
                frozen: SlotSet::empty(),
            },
        }
    }

    fn write(group: u64, index: u64, slots: &[Slot]) -> ApplyEvent {
        ApplyEvent {
            group,
            index,
            what: Applied::Write {
                slots: slots.to_vec(),
            },
        }
    }

    #[test]
    fn the_tracker_catches_two_owners_and_writes_to_slots_not_owned() {
        let mut t = OwnershipTracker::default();
        t.apply(own(1, 5, &[1, 2]));
        t.apply(own(2, 3, &[3]));
        t.apply(write(1, 6, &[1]));
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        // A correct move of slot 2: the source lets go first.
        t.apply(own(1, 7, &[1]));
        t.apply(own(2, 4, &[2, 3]));
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        // A broken move: group 1 takes slot 3 while group 2 serves it.
        t.apply(own(1, 8, &[1, 3]));
        assert_eq!(t.problems.len(), 1, "{:?}", t.problems);
        // A write to a slot the group did not own at that index.
        t.apply(write(1, 9, &[2]));
        assert_eq!(t.problems.len(), 2, "{:?}", t.problems);
        // Another replica re-applying index 5 changes nothing.
        t.apply(own(1, 5, &[1, 2]));
        assert_eq!(t.problems.len(), 2);
    }
}
