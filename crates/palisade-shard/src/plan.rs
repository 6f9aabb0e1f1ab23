//! The rebalancer's decisions: given the map and what the meta leader
//! observes (which nodes answer, which lead which group), what should change
//! next. Pure and deterministic (ties broken by id), so it is tested as a
//! table and every meta leader decides alike; carrying the actions out is
//! the server's coordinator.
//!
//! Priorities, highest first:
//! 1. node lifecycle: a joining node first becomes a meta learner, then
//!    `Serving`; a node down longer than `--down-after` starts draining; a
//!    draining node that holds nothing is `Removed`;
//! 2. safety of each group: replicas on draining nodes are replaced (one
//!    joint change adds the new voter and removes the old one, so the voter
//!    count never dips), missing replicas are added, surplus ones removed;
//!    read-replica nodes get a learner of every group they read;
//! 3. balance, only while nothing else is in flight: replica counts per node
//!    within one, then leaders within each node's fair share;
//! 4. the hash group count (`set-groups`): create groups, move slots (at most
//!    [`Policy::max_move_slots`] per move, one move at a time), drop emptied
//!    groups.
//!
//! Placement of a new voter: a serving, answering, voting node without a
//! replica of the group, in a zone none of the group's other voters use when
//! there is one (nodes without a zone label count as zones of their own),
//! then the fewest data voters, then the lowest id.

use std::collections::{BTreeMap, BTreeSet};

use crate::map::{
    ClusterMap, GroupId, GroupInfo, META_GROUP, NodeId, NodeKind, NodeState, ReplicaId, Role,
    meta_voter_target,
};
use crate::slots::{SLOTS, Slot, SlotSet};

/// What the meta leader sees of the cluster right now.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    /// Nodes that answered recently.
    pub alive: BTreeSet<NodeId>,
    /// Nodes that have not answered for longer than `--down-after`.
    pub down: BTreeSet<NodeId>,
    /// The node leading each group, where known.
    pub leaders: BTreeMap<GroupId, NodeId>,
    /// Slots that cannot move now (they hold records of a lease granted
    /// before the cluster map); other slots move in their place.
    pub pinned: SlotSet,
}

/// Knobs of the planner.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Most slots one move carries (a move freezes writes to its slots
    /// while their data is copied, so smaller moves mean shorter pauses).
    pub max_move_slots: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_move_slots: 256,
        }
    }
}

/// One step the coordinator should take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    MarkServing(NodeId),
    MarkDraining(NodeId),
    MarkRemoved(NodeId),
    ChangeReplicas(ChangeSpec),
    TransferLeader {
        group: GroupId,
        to: NodeId,
    },
    CreateGroup {
        nodes: Vec<NodeId>,
    },
    BeginMove {
        slots: SlotSet,
        from: GroupId,
        to: GroupId,
    },
    DropGroup(GroupId),
}

/// A replica change of one group (see `MapCommand::BeginReplicaChange`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChangeSpec {
    pub group: GroupId,
    pub add: Option<(NodeId, Role)>,
    pub remove: Option<ReplicaId>,
    pub promote: Option<ReplicaId>,
    pub demote: Option<ReplicaId>,
}

impl Action {
    /// The group a replica change or leader transfer concerns.
    pub fn group(&self) -> Option<GroupId> {
        match self {
            Action::ChangeReplicas(c) => Some(c.group),
            Action::TransferLeader { group, .. } => Some(*group),
            _ => None,
        }
    }
}

fn change(group: GroupId) -> ChangeSpec {
    ChangeSpec {
        group,
        ..ChangeSpec::default()
    }
}

/// Every action worth taking now, most urgent first. Replica changes name
/// distinct groups that have no change in flight.
pub fn plan(map: &ClusterMap, obs: &Observation, policy: &Policy) -> Vec<Action> {
    if !map.is_bootstrapped() {
        return Vec::new();
    }
    let mut actions = lifecycle(map, obs);
    let mut touched: BTreeSet<GroupId> = BTreeSet::new();
    for (g, info) in &map.groups {
        if info.change.is_some() {
            continue;
        }
        if let Some(a) = repair(map, obs, *g, info) {
            touched.insert(*g);
            actions.push(a);
        }
    }
    let quiet = actions.is_empty()
        && map.groups.values().all(|g| g.change.is_none())
        && !map
            .nodes
            .values()
            .any(|n| matches!(n.state, NodeState::Joining | NodeState::Draining));
    if quiet {
        if let Some(a) = balance_replicas(map, obs) {
            actions.push(a);
        } else if let Some(a) = balance_leaders(map, obs) {
            actions.push(a);
        }
    }
    if map.moving.is_none()
        && let Some(a) = group_count(map, obs, policy)
    {
        actions.push(a);
    }
    actions
}

/// Nodes that may take a new voter: serving, voting, answering.
fn voting_nodes(map: &ClusterMap, obs: &Observation) -> Vec<NodeId> {
    map.nodes
        .iter()
        .filter(|(id, n)| {
            n.state == NodeState::Serving
                && n.kind == NodeKind::Voting
                && obs.alive.contains(id)
                && !obs.down.contains(id)
        })
        .map(|(id, _)| *id)
        .collect()
}

/// Serving voting nodes, answering or not (what the voter targets count).
fn serving_voting(map: &ClusterMap) -> usize {
    map.nodes
        .values()
        .filter(|n| n.state == NodeState::Serving && n.kind == NodeKind::Voting)
        .count()
}

fn lifecycle(map: &ClusterMap, obs: &Observation) -> Vec<Action> {
    let mut out = Vec::new();
    let meta = &map.groups[&META_GROUP];
    for (id, node) in &map.nodes {
        match node.state {
            NodeState::Joining if obs.down.contains(id) => out.push(Action::MarkDraining(*id)),
            NodeState::Joining => {
                let has_meta = meta.replicas.contains_key(id);
                if has_meta {
                    out.push(Action::MarkServing(*id));
                }
            }
            NodeState::Serving if obs.down.contains(id) => out.push(Action::MarkDraining(*id)),
            NodeState::Draining => {
                // It may keep a meta learner: it learns that way that it
                // was removed (the learner goes once it is).
                let holds = map.groups.iter().any(|(g, info)| {
                    if *g == META_GROUP {
                        info.voter_nodes().contains(id)
                            || info
                                .change
                                .and_then(|c| c.add)
                                .is_some_and(|a| a.node == *id)
                    } else {
                        info.nodes().contains(id)
                    }
                });
                if !holds {
                    out.push(Action::MarkRemoved(*id));
                }
            }
            _ => {}
        }
    }
    out
}

/// Data voters per node.
fn data_voter_counts(map: &ClusterMap) -> BTreeMap<NodeId, usize> {
    let mut counts: BTreeMap<NodeId, usize> = BTreeMap::new();
    for (g, info) in &map.groups {
        if *g == META_GROUP {
            continue;
        }
        for r in info.replicas.values() {
            if r.role == Role::Voter {
                *counts.entry(r.node).or_default() += 1;
            }
        }
        if let Some(a) = info.change.and_then(|c| c.add)
            && a.role == Role::Voter
        {
            *counts.entry(a.node).or_default() += 1;
        }
    }
    counts
}

/// A node's zone for spreading (no label: a zone of its own).
fn zone_of(map: &ClusterMap, node: NodeId) -> String {
    match map.nodes.get(&node) {
        Some(n) if !n.zone.is_empty() => format!("{}/{}", n.region, n.zone),
        _ => format!("#node-{node}"),
    }
}

/// The best node for a new voter of `info`, given the voters that stay.
fn best_node(
    map: &ClusterMap,
    obs: &Observation,
    info: &GroupInfo,
    staying: &BTreeSet<NodeId>,
) -> Option<NodeId> {
    let counts = data_voter_counts(map);
    let used: BTreeSet<String> = staying.iter().map(|n| zone_of(map, *n)).collect();
    let holders = info.nodes();
    voting_nodes(map, obs)
        .into_iter()
        .filter(|n| !holders.contains(n))
        .min_by_key(|n| {
            (
                used.contains(&zone_of(map, *n)),
                counts.get(n).copied().unwrap_or(0),
                *n,
            )
        })
}

/// Voters `group` should have.
fn voter_target(map: &ClusterMap, group: GroupId) -> usize {
    let serving = serving_voting(map);
    if group == META_GROUP {
        meta_voter_target(serving)
    } else {
        (map.replication as usize).min(serving).max(1)
    }
}

/// What keeps one group healthy, if anything is amiss.
fn repair(map: &ClusterMap, obs: &Observation, g: GroupId, info: &GroupInfo) -> Option<Action> {
    let leaving = |node: &NodeId| {
        map.nodes
            .get(node)
            .is_none_or(|n| matches!(n.state, NodeState::Draining | NodeState::Removed))
    };
    let voters: BTreeMap<ReplicaId, NodeId> = info
        .replicas
        .iter()
        .filter(|(_, r)| r.role == Role::Voter)
        .map(|(id, r)| (*id, r.node))
        .collect();
    let staying: BTreeSet<NodeId> = voters.values().filter(|n| !leaving(n)).copied().collect();
    let removed = |node: &NodeId| {
        map.nodes
            .get(node)
            .is_none_or(|n| n.state == NodeState::Removed)
    };
    // 1. Replicas on nodes that leave.
    for (id, r) in &info.replicas {
        if !leaving(&r.node) {
            continue;
        }
        if r.role == Role::Learner {
            // A draining node keeps its meta learner until it is removed.
            if g == META_GROUP && !removed(&r.node) {
                continue;
            }
            return Some(Action::ChangeReplicas(ChangeSpec {
                remove: Some(*id),
                ..change(g)
            }));
        }
        if g == META_GROUP {
            // Meta voters leave as learners (see above); a learner on a
            // serving node takes the vote when the count needs it.
            let target = voter_target(map, g);
            let promote = if staying.len() < target {
                promotable_meta_learner(map, obs, info)
            } else {
                None
            };
            if promote.is_none() && staying.is_empty() {
                continue;
            }
            return Some(Action::ChangeReplicas(ChangeSpec {
                demote: Some(*id),
                promote,
                ..change(g)
            }));
        }
        let target = voter_target(map, g);
        let add = if staying.len() < target {
            best_node(map, obs, info, &staying).map(|n| (n, Role::Voter))
        } else {
            None
        };
        if add.is_none() && staying.is_empty() {
            // Never remove the last voter that stays without a successor.
            continue;
        }
        return Some(Action::ChangeReplicas(ChangeSpec {
            add,
            remove: Some(*id),
            ..change(g)
        }));
    }
    let target = voter_target(map, g);
    // 2. Learners every node needs: a meta replica on every live node, and
    //    read replicas' learners.
    for (id, node) in &map.nodes {
        let wants = match node.state {
            NodeState::Serving | NodeState::Joining => {
                if g == META_GROUP {
                    true
                } else {
                    node.reads_group(g)
                }
            }
            _ => false,
        };
        if wants && info.replica_on(*id).is_none() && obs.alive.contains(id) {
            return Some(Action::ChangeReplicas(ChangeSpec {
                add: Some((*id, Role::Learner)),
                ..change(g)
            }));
        }
    }
    // 3. Too few voters.
    if staying.len() < target {
        if g == META_GROUP {
            return promotable_meta_learner(map, obs, info).map(|p| {
                Action::ChangeReplicas(ChangeSpec {
                    promote: Some(p),
                    ..change(g)
                })
            });
        }
        return best_node(map, obs, info, &staying).map(|n| {
            Action::ChangeReplicas(ChangeSpec {
                add: Some((n, Role::Voter)),
                ..change(g)
            })
        });
    }
    // 4. Too many voters: drop the one on the busiest node that does not
    //    lead (meta voters become learners: every node keeps the map).
    if staying.len() > target {
        let counts = data_voter_counts(map);
        let leader = obs.leaders.get(&g);
        let victim = voters
            .iter()
            .filter(|(_, n)| Some(*n) != leader)
            .max_by_key(|(id, n)| (counts.get(n).copied().unwrap_or(0), **id))
            .map(|(id, _)| *id)?;
        return Some(if g == META_GROUP {
            Action::ChangeReplicas(ChangeSpec {
                demote: Some(victim),
                ..change(g)
            })
        } else {
            Action::ChangeReplicas(ChangeSpec {
                remove: Some(victim),
                ..change(g)
            })
        });
    }
    None
}

/// A meta learner on a serving, voting, answering node.
fn promotable_meta_learner(
    map: &ClusterMap,
    obs: &Observation,
    info: &GroupInfo,
) -> Option<ReplicaId> {
    let candidates = voting_nodes(map, obs);
    info.replicas
        .iter()
        .filter(|(_, r)| r.role == Role::Learner && candidates.contains(&r.node))
        .map(|(id, _)| *id)
        .min()
}

/// Moves one data voter from the busiest node to the idlest when their
/// counts differ by more than one.
fn balance_replicas(map: &ClusterMap, obs: &Observation) -> Option<Action> {
    let nodes = voting_nodes(map, obs);
    if nodes.len() < 2 {
        return None;
    }
    let counts = data_voter_counts(map);
    let count = |n: &NodeId| counts.get(n).copied().unwrap_or(0);
    let busiest = *nodes
        .iter()
        .max_by_key(|n| (count(n), std::cmp::Reverse(**n)))?;
    let idlest = *nodes.iter().min_by_key(|n| (count(n), **n))?;
    if count(&busiest) <= count(&idlest) + 1 {
        return None;
    }
    // A group on the busiest node, not on the idlest; prefer one the busiest
    // does not lead and whose zones stay spread.
    let mut best: Option<(bool, bool, GroupId, ReplicaId)> = None;
    for (g, info) in &map.groups {
        if *g == META_GROUP || info.change.is_some() || info.nodes().contains(&idlest) {
            continue;
        }
        let Some((rid, _)) = info
            .replicas
            .iter()
            .find(|(_, r)| r.node == busiest && r.role == Role::Voter)
        else {
            continue;
        };
        let led = obs.leaders.get(g) == Some(&busiest);
        let others: BTreeSet<String> = info
            .voter_nodes()
            .into_iter()
            .filter(|n| *n != busiest)
            .map(|n| zone_of(map, n))
            .collect();
        let clash = others.contains(&zone_of(map, idlest));
        let key = (clash, led, *g, *rid);
        if best.as_ref().is_none_or(|b| key < *b) {
            best = Some(key);
        }
    }
    let (_, _, group, replica) = best?;
    Some(Action::ChangeReplicas(ChangeSpec {
        add: Some((idlest, Role::Voter)),
        remove: Some(replica),
        ..change(group)
    }))
}

/// Transfers one leadership from a node leading more than its fair share
/// (groups / nodes, rounded up) to a voter node leading fewer.
fn balance_leaders(map: &ClusterMap, obs: &Observation) -> Option<Action> {
    let nodes = voting_nodes(map, obs);
    if nodes.len() < 2 {
        return None;
    }
    let groups: Vec<GroupId> = map.data_groups().collect();
    let mut led: BTreeMap<NodeId, Vec<GroupId>> = nodes.iter().map(|n| (*n, Vec::new())).collect();
    for g in &groups {
        if let Some(n) = obs.leaders.get(g)
            && let Some(list) = led.get_mut(n)
        {
            list.push(*g);
        }
    }
    let fair = groups.len().div_ceil(nodes.len());
    let (busy, busy_groups) = led
        .iter()
        .max_by_key(|(n, gs)| (gs.len(), std::cmp::Reverse(**n)))?;
    if busy_groups.len() <= fair {
        return None;
    }
    for g in busy_groups {
        let info = &map.groups[g];
        let target = info
            .voter_nodes()
            .into_iter()
            .filter(|n| n != busy && led.get(n).is_some_and(|l| l.len() < fair))
            .min_by_key(|n| (led[n].len(), *n));
        if let Some(to) = target {
            return Some(Action::TransferLeader { group: *g, to });
        }
    }
    None
}

/// The next step towards `target_groups` data groups with even slot counts.
fn group_count(map: &ClusterMap, obs: &Observation, policy: &Policy) -> Option<Action> {
    let target = map.target_groups as usize;
    if target == 0 {
        return None;
    }
    let groups: Vec<GroupId> = map.data_groups().collect();
    if groups.len() < target {
        let r = (map.replication as usize).min(serving_voting(map)).max(1);
        // Chosen nodes count as holders of the new group, so each next pick
        // avoids them and their zones.
        let mut picked = GroupInfo {
            epoch: 0,
            replicas: BTreeMap::new(),
            initial: BTreeSet::new(),
            change: None,
        };
        for i in 0..r {
            let chosen = picked.voter_nodes();
            let n = best_node(map, obs, &picked, &chosen)?;
            picked.replicas.insert(
                i as ReplicaId,
                crate::map::Replica {
                    node: n,
                    role: Role::Voter,
                },
            );
        }
        return Some(Action::CreateGroup {
            nodes: picked.voter_nodes().into_iter().collect(),
        });
    }
    // The `target` lowest ids stay; the rest retire.
    let keep: Vec<GroupId> = groups.iter().take(target).copied().collect();
    let mut have: BTreeMap<GroupId, SlotSet> =
        groups.iter().map(|g| (*g, SlotSet::empty())).collect();
    for (s, g) in map.route.iter().enumerate() {
        if let Some(set) = have.get_mut(g) {
            set.insert(s as Slot);
        }
    }
    let per = SLOTS as usize / target;
    let extra = SLOTS as usize % target;
    let want: BTreeMap<GroupId, usize> = groups
        .iter()
        .map(|g| {
            let w = match keep.iter().position(|k| k == g) {
                Some(i) => per + usize::from(i < extra),
                None => 0,
            };
            (*g, w)
        })
        .collect();
    let surplus = |g: &GroupId| have[g].len() as i64 - want[g] as i64;
    let movable = |g: &GroupId| have[g].iter().filter(|s| !obs.pinned.contains(*s));
    let source = groups
        .iter()
        .filter(|g| surplus(g) > 0 && movable(g).next().is_some())
        .max_by_key(|g| (want[*g] == 0, surplus(g), std::cmp::Reverse(**g)));
    let sink = groups
        .iter()
        .filter(|g| surplus(g) < 0)
        .min_by_key(|g| (surplus(g), **g));
    if let (Some(from), Some(to)) = (source, sink) {
        let n = (surplus(from) as usize)
            .min((-surplus(to)) as usize)
            .min(policy.max_move_slots);
        let slots = SlotSet::of(movable(from).take(n));
        return Some(Action::BeginMove {
            slots,
            from: *from,
            to: *to,
        });
    }
    groups
        .iter()
        .find(|g| want[*g] == 0 && have[*g].is_empty() && map.groups[*g].change.is_none())
        .map(|g| Action::DropGroup(*g))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::{MapCommand, MapResult};

    fn nodes(n: u64) -> BTreeMap<NodeId, String> {
        (1..=n).map(|i| (i, format!("10.0.0.{i}:7001"))).collect()
    }

    fn alive(map: &ClusterMap) -> Observation {
        Observation {
            alive: map.nodes.keys().copied().collect(),
            ..Observation::default()
        }
    }

    fn join(map: &mut ClusterMap, zone: &str) -> NodeId {
        let id = map.next_node_id;
        map.apply(&MapCommand::RegisterNode {
            id: 0,
            addr: format!("10.0.1.{id}:7001"),
            region: "r".into(),
            zone: zone.into(),
            kind: NodeKind::Voting,
        })
        .unwrap();
        id
    }

    /// Runs the plan to a fixed point the way the coordinator does, with
    /// every change succeeding at once; returns the actions taken.
    fn settle(map: &mut ClusterMap, obs: &mut Observation) -> Vec<Action> {
        let mut taken = Vec::new();
        for _ in 0..500 {
            let actions = plan(map, obs, &Policy::default());
            let Some(a) = actions.into_iter().next() else {
                return taken;
            };
            taken.push(a.clone());
            execute(map, obs, &a);
        }
        panic!(
            "the plan did not settle: last actions {:?}",
            &taken[taken.len() - 5..]
        );
    }

    fn execute(map: &mut ClusterMap, obs: &mut Observation, a: &Action) {
        let set = |map: &mut ClusterMap, node, state| {
            map.apply(&MapCommand::SetNodeState { node, state })
                .unwrap();
        };
        match a.clone() {
            Action::MarkServing(n) => set(map, n, NodeState::Serving),
            Action::MarkDraining(n) => set(map, n, NodeState::Draining),
            Action::MarkRemoved(n) => set(map, n, NodeState::Removed),
            Action::ChangeReplicas(ChangeSpec {
                group,
                add,
                remove,
                promote,
                demote,
            }) => {
                map.apply(&MapCommand::BeginReplicaChange {
                    group,
                    add,
                    remove,
                    promote,
                    demote,
                })
                .unwrap();
                map.apply(&MapCommand::FinishReplicaChange { group })
                    .unwrap();
                // A removed leader's group elects a remaining voter.
                if let Some(l) = obs.leaders.get(&group)
                    && !map.groups[&group].voter_nodes().contains(l)
                {
                    let first = *map.groups[&group].voter_nodes().first().unwrap();
                    obs.leaders.insert(group, first);
                }
            }
            Action::TransferLeader { group, to } => {
                obs.leaders.insert(group, to);
            }
            Action::CreateGroup { nodes } => {
                let MapResult::Group(g) = map.apply(&MapCommand::CreateGroup { nodes }).unwrap()
                else {
                    panic!()
                };
                let first = *map.groups[&g].voter_nodes().first().unwrap();
                obs.leaders.insert(g, first);
            }
            Action::BeginMove { slots, from, to } => {
                let MapResult::Move(id) = map
                    .apply(&MapCommand::BeginMove { slots, from, to })
                    .unwrap()
                else {
                    panic!()
                };
                for cmd in [
                    MapCommand::SetMovePhase {
                        id,
                        phase: crate::map::MovePhase::Copy,
                    },
                    MapCommand::BeginCopy { id },
                    MapCommand::CopyDone {
                        id,
                        attempt: 1,
                        chunks: 0,
                    },
                    MapCommand::HandedOff { id, revision: 1 },
                ] {
                    map.apply(&cmd).unwrap();
                }
                map.apply(&MapCommand::SwitchRoute { id }).unwrap();
                map.apply(&MapCommand::EndMove { id }).unwrap();
            }
            Action::DropGroup(g) => {
                map.apply(&MapCommand::DropGroup { group: g }).unwrap();
                obs.leaders.remove(&g);
            }
        }
    }

    fn counts(map: &ClusterMap) -> Vec<usize> {
        let c = data_voter_counts(map);
        map.nodes
            .iter()
            .filter(|(_, n)| n.state == NodeState::Serving)
            .map(|(id, _)| c.get(id).copied().unwrap_or(0))
            .collect()
    }

    fn all_led_by(map: &ClusterMap, node: NodeId) -> BTreeMap<GroupId, NodeId> {
        map.groups.keys().map(|g| (*g, node)).collect()
    }

    #[test]
    fn a_balanced_cluster_needs_nothing() {
        let map = ClusterMap::bootstrap(1, &nodes(3), 4, 3).unwrap();
        let mut obs = alive(&map);
        obs.leaders = BTreeMap::from([(0, 1), (1, 1), (2, 2), (3, 3), (4, 1)]);
        assert_eq!(plan(&map, &obs, &Policy::default()), vec![]);
    }

    #[test]
    fn joining_nodes_become_meta_learners_then_serving_then_take_replicas_and_leaders() {
        let mut map = ClusterMap::bootstrap(1, &nodes(3), 4, 3).unwrap();
        let (a, b) = (join(&mut map, ""), join(&mut map, ""));
        let mut obs = alive(&map);
        obs.leaders = all_led_by(&map, 1);
        let first = plan(&map, &obs, &Policy::default());
        assert_eq!(
            first[0],
            Action::ChangeReplicas(ChangeSpec {
                group: META_GROUP,
                add: Some((a, Role::Learner)),
                ..change(META_GROUP)
            })
        );
        let taken = settle(&mut map, &mut obs);
        assert!(taken.contains(&Action::MarkServing(a)));
        assert!(taken.contains(&Action::MarkServing(b)));
        // Five serving nodes: five meta voters, 12 data voters dealt 3/3/2/2/2.
        assert_eq!(map.groups[&META_GROUP].voters().len(), 5);
        let mut c = counts(&map);
        c.sort();
        assert_eq!(c, vec![2, 2, 2, 3, 3]);
        let mut leaders: BTreeMap<NodeId, usize> = BTreeMap::new();
        for g in map.data_groups() {
            *leaders.entry(obs.leaders[&g]).or_default() += 1;
        }
        assert!(leaders.values().all(|n| *n <= 1), "{leaders:?}");
        assert!(map.groups.values().all(|g| g.change.is_none()));
    }

    #[test]
    fn draining_replaces_every_replica_then_removes_the_node() {
        let mut map = ClusterMap::bootstrap(1, &nodes(5), 4, 3).unwrap();
        let mut obs = alive(&map);
        obs.leaders = all_led_by(&map, 4);
        for n in [4, 5] {
            map.apply(&MapCommand::SetNodeState {
                node: n,
                state: NodeState::Draining,
            })
            .unwrap();
        }
        let taken = settle(&mut map, &mut obs);
        assert!(taken.contains(&Action::MarkRemoved(4)));
        assert!(taken.contains(&Action::MarkRemoved(5)));
        for (g, info) in &map.groups {
            assert_eq!(info.voter_nodes(), [1, 2, 3].into(), "group {g}");
            assert_eq!(info.nodes(), [1, 2, 3].into(), "group {g}: no learner left");
        }
        // The meta voters left as learners first, so the drained nodes
        // could learn they were removed.
        assert!(taken.iter().any(|a| matches!(
            a,
            Action::ChangeReplicas(ChangeSpec {
                group: META_GROUP,
                demote: Some(4 | 5),
                ..
            })
        )));
        // Replacements were joint changes: add and remove in one step.
        assert!(taken.iter().any(|a| matches!(
            a,
            Action::ChangeReplicas(ChangeSpec {
                add: Some(_),
                remove: Some(_),
                ..
            })
        )));
    }

    #[test]
    fn a_node_down_too_long_is_drained_from_the_survivors() {
        let mut map = ClusterMap::bootstrap(1, &nodes(4), 4, 3).unwrap();
        let mut obs = alive(&map);
        obs.alive.remove(&2);
        obs.down.insert(2);
        obs.leaders = all_led_by(&map, 1);
        let taken = settle(&mut map, &mut obs);
        assert_eq!(taken[0], Action::MarkDraining(2));
        assert!(taken.contains(&Action::MarkRemoved(2)));
        for g in map.data_groups() {
            assert_eq!(map.groups[&g].voters().len(), 3);
            assert!(!map.groups[&g].voter_nodes().contains(&2));
        }
    }

    #[test]
    fn new_voters_go_to_unused_zones_first() {
        let mut map = ClusterMap::bootstrap(1, &nodes(3), 1, 3).unwrap();
        for (id, zone) in [(1, "a"), (2, "a"), (3, "b")] {
            map.nodes.get_mut(&id).unwrap().zone = zone.into();
        }
        let c = join(&mut map, "c");
        let d = join(&mut map, "a");
        for n in [c, d] {
            map.apply(&MapCommand::SetNodeState {
                node: n,
                state: NodeState::Serving,
            })
            .unwrap();
        }
        map.apply(&MapCommand::SetNodeState {
            node: 1,
            state: NodeState::Draining,
        })
        .unwrap();
        let obs = alive(&map);
        let actions = plan(&map, &obs, &Policy::default());
        let replaced = actions
            .iter()
            .find(|a| a.group() == Some(1))
            .expect("group 1 repaired");
        assert!(
            matches!(replaced, Action::ChangeReplicas(ChangeSpec { add: Some((n, Role::Voter)), remove: Some(1), .. }) if *n == c),
            "{replaced:?}"
        );
    }

    #[test]
    fn set_groups_grows_and_shrinks_by_moving_slots() {
        let mut map = ClusterMap::bootstrap(1, &nodes(3), 4, 3).unwrap();
        let mut obs = alive(&map);
        obs.leaders = all_led_by(&map, 1);
        map.apply(&MapCommand::SetTargetGroups { groups: 8 })
            .unwrap();
        let taken = settle(&mut map, &mut obs);
        assert_eq!(map.data_groups().count(), 8);
        for g in map.data_groups() {
            assert_eq!(map.slots_of(g).len(), 512, "group {g}");
        }
        let moves = taken
            .iter()
            .filter(|a| matches!(a, Action::BeginMove { .. }))
            .count();
        assert_eq!(moves, 8, "256 slots at most per move");
        map.apply(&MapCommand::SetTargetGroups { groups: 2 })
            .unwrap();
        settle(&mut map, &mut obs);
        assert_eq!(map.data_groups().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(map.slots_of(1).len(), 2048);
        assert_eq!(map.slots_of(2).len(), 2048);
        map.apply(&MapCommand::SetTargetGroups { groups: 3 })
            .unwrap();
        settle(&mut map, &mut obs);
        let sizes: Vec<usize> = map.data_groups().map(|g| map.slots_of(g).len()).collect();
        assert_eq!(sizes, vec![1366, 1365, 1365]);
        assert_eq!(
            map.data_groups().collect::<Vec<_>>(),
            vec![1, 2, 9],
            "ids never reused"
        );
    }

    #[test]
    fn pinned_slots_stay_and_other_slots_move_in_their_place() {
        let mut map = ClusterMap::bootstrap(1, &nodes(3), 2, 3).unwrap();
        let mut obs = alive(&map);
        obs.leaders = all_led_by(&map, 1);
        let pinned = map.slots_of(1).iter().take(3).collect::<Vec<_>>();
        obs.pinned = SlotSet::of(pinned.iter().copied());
        map.apply(&MapCommand::SetTargetGroups { groups: 4 })
            .unwrap();
        settle(&mut map, &mut obs);
        for g in map.data_groups() {
            assert_eq!(map.slots_of(g).len(), 1024, "group {g} balanced");
        }
        for s in &pinned {
            assert_eq!(map.group_of_slot(*s), Some(1), "slot {s} stayed");
        }
        // Shrinking: a retiring group holding a pinned slot gives up all
        // the others and stays until the slot can move.
        let retiring = map.data_groups().last().unwrap();
        let stuck = map.slots_of(retiring).iter().next().unwrap();
        obs.pinned = SlotSet::of([stuck]);
        map.apply(&MapCommand::SetTargetGroups { groups: 2 })
            .unwrap();
        settle(&mut map, &mut obs);
        assert_eq!(map.slots_of(retiring), SlotSet::of([stuck]));
        obs.pinned = SlotSet::empty();
        settle(&mut map, &mut obs);
        assert_eq!(map.data_groups().count(), 2, "gone once the slot moves");
    }

    #[test]
    fn read_replicas_get_learners_of_the_groups_they_read() {
        let mut map = ClusterMap::bootstrap(1, &nodes(3), 2, 3).unwrap();
        map.apply(&MapCommand::RegisterNode {
            id: 9,
            addr: "10.0.0.9:7001".into(),
            region: String::new(),
            zone: String::new(),
            kind: NodeKind::ReadReplica { groups: vec![2] },
        })
        .unwrap();
        let mut obs = alive(&map);
        obs.leaders = all_led_by(&map, 1);
        settle(&mut map, &mut obs);
        assert_eq!(map.nodes[&9].state, NodeState::Serving);
        assert!(map.groups[&2].replica_on(9).is_some());
        assert!(map.groups[&1].replica_on(9).is_none());
        assert_eq!(
            map.groups[&META_GROUP].replicas[&9].role,
            Role::Learner,
            "a read replica never votes"
        );
    }
}
