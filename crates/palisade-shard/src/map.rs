//! The cluster map: which nodes exist, which groups exist and where their
//! replicas are, and which group owns each hash slot.
//!
//! The map is the state of the meta group (group 0). It changes only by
//! [`MapCommand`]s applied through Raft, so every node's copy goes through
//! the same sequence of versions; [`ClusterMap::apply`] is deterministic and
//! a refused command is a replicated *result* ([`MapError`]) that changes
//! nothing. Every applied command bumps the map's `epoch`; every command that
//! changes a group (its replicas, its slots) bumps that group's `epoch` too
//! (TiKV's region epoch, CockroachDB's descriptor generation): a request
//! routed with an older epoch may be routed wrong and is checked.
//!
//! # Lifecycles (explicit, checked at every transition)
//!
//! - node: `Joining → Serving → Draining → Removed` (also `Joining →
//!   Draining`, and `Draining → Serving` to cancel a drain). `Removed` is
//!   final: a removed node's id is never reused, so a node that comes back
//!   with an old identity is recognized and refused.
//! - replica: a replica change is *recorded* here first
//!   ([`MapCommand::BeginReplicaChange`]), then carried out on the group's
//!   Raft (learner → catch-up → joint consensus), then *finished* here. A
//!   crash in between leaves the recorded change, which the next meta leader
//!   resumes (or aborts while the new replica is only a learner).
//! - slot move: `Freeze → Copy → Handoff → Commit → Release`, recorded here
//!   at each phase (see [`MovePhase`]), so an interrupted move is resumed or
//!   rolled back (before `Handoff`) after a restart.
//!
//! # Replica ids
//!
//! A replica's Raft member id is a [`ReplicaId`], unique forever within the
//! cluster. Replicas created at bootstrap (and every replica of a data
//! directory written before the map existed) use their node's id; replicas
//! added later get ids from [`FIRST_ADDED_REPLICA_ID`] up. A replica removed
//! from a node and added back later is a *new* member, so a stale message
//! or stale data of the old incarnation can never be mistaken for the new
//! one (TiKV's peer ids). The meta group's replica on a node always has the
//! node's id: a node leaves the meta group only when it is removed for good.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::slots::{SLOTS, Slot, SlotSet, slot_of};

pub type NodeId = u64;
pub type GroupId = u64;
pub type ReplicaId = u64;

/// Group id of the meta group (which owns no user keys).
pub const META_GROUP: GroupId = 0;

/// Node ids must be below this; replicas added after bootstrap get ids from
/// here on.
pub const FIRST_ADDED_REPLICA_ID: ReplicaId = 1 << 20;

/// Most data groups a cluster may have.
pub const MAX_GROUPS: u64 = 256;

/// Where a node is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum NodeState {
    /// Registered; becomes `Serving` once it replicates the meta group.
    Joining,
    /// Takes replicas and leadership.
    Serving,
    /// Every replica is being moved off it (drained or removed by an
    /// operator, or down for longer than `--down-after`).
    Draining,
    /// Holds nothing and never will again.
    Removed,
}

impl NodeState {
    pub fn name(self) -> &'static str {
        match self {
            NodeState::Joining => "joining",
            NodeState::Serving => "serving",
            NodeState::Draining => "draining",
            NodeState::Removed => "removed",
        }
    }

    /// Whether `self → to` is a transition of the lifecycle.
    pub fn can_become(self, to: NodeState) -> bool {
        use NodeState::*;
        matches!(
            (self, to),
            (Joining, Serving)
                | (Joining, Draining)
                | (Serving, Draining)
                | (Draining, Serving)
                | (Draining, Removed)
        )
    }
}

/// What a node is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeKind {
    /// Holds voters and learners as the rebalancer decides.
    Voting,
    /// A read replica: holds only learners, of the listed data groups (all
    /// of them when empty), and never votes.
    ReadReplica { groups: Vec<GroupId> },
}

/// A node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// `host:port` that peers and clients reach it at.
    pub addr: String,
    pub region: String,
    pub zone: String,
    pub state: NodeState,
    pub kind: NodeKind,
    /// The incarnation of the node's data directory (a random number drawn
    /// when the directory was created), recorded the first time the node
    /// reports in; 0 until then. A process that starts under this node's id
    /// with another incarnation lost the state the node promised to keep
    /// (its votes and log) and must not take its place.
    pub incarnation: u64,
}

impl NodeInfo {
    pub fn is_read_replica(&self) -> bool {
        matches!(self.kind, NodeKind::ReadReplica { .. })
    }

    /// Whether the node is a read replica that should replicate `group`.
    pub fn reads_group(&self, group: GroupId) -> bool {
        match &self.kind {
            NodeKind::ReadReplica { groups } => {
                group == META_GROUP || groups.is_empty() || groups.contains(&group)
            }
            NodeKind::Voting => false,
        }
    }
}

/// A replica's role in its group's Raft.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    Voter,
    Learner,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Voter => "voter",
            Role::Learner => "learner",
        }
    }
}

/// One replica of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub node: NodeId,
    pub role: Role,
}

/// A replica being added (always first as a learner).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddReplica {
    pub replica: ReplicaId,
    pub node: NodeId,
    /// The role it ends with.
    pub role: Role,
}

/// A recorded, possibly half-done change of one group's replicas: add one,
/// remove one, or both at once (one joint-consensus step, so the voter count
/// never dips).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaChange {
    pub add: Option<AddReplica>,
    pub remove: Option<ReplicaId>,
    /// A learner that becomes a voter (meta voters growing).
    pub promote: Option<ReplicaId>,
    /// A voter that ends as a learner instead (meta voters shrinking).
    pub demote: Option<ReplicaId>,
}

/// A group and its replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    /// Bumps with every change of the group's replicas or slots.
    pub epoch: u64,
    pub replicas: BTreeMap<ReplicaId, Replica>,
    /// The replicas that create the group's Raft (`initialize`) on a fresh
    /// disk; emptied by the first replica change, after which a new replica
    /// only ever learns the group from its leader.
    pub initial: BTreeSet<ReplicaId>,
    /// The change in flight, if any (one at a time per group).
    pub change: Option<ReplicaChange>,
}

impl GroupInfo {
    /// The replica on `node`, if any (the one being added included).
    pub fn replica_on(&self, node: NodeId) -> Option<ReplicaId> {
        self.replicas
            .iter()
            .find(|(_, r)| r.node == node)
            .map(|(id, _)| *id)
            .or_else(|| {
                self.change
                    .and_then(|c| c.add)
                    .filter(|a| a.node == node)
                    .map(|a| a.replica)
            })
    }

    /// Voter replica ids.
    pub fn voters(&self) -> BTreeSet<ReplicaId> {
        self.replicas
            .iter()
            .filter(|(_, r)| r.role == Role::Voter)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Nodes holding a voter.
    pub fn voter_nodes(&self) -> BTreeSet<NodeId> {
        self.replicas
            .values()
            .filter(|r| r.role == Role::Voter)
            .map(|r| r.node)
            .collect()
    }

    /// Every node holding a replica (or getting one).
    pub fn nodes(&self) -> BTreeSet<NodeId> {
        let mut nodes: BTreeSet<NodeId> = self.replicas.values().map(|r| r.node).collect();
        if let Some(a) = self.change.and_then(|c| c.add) {
            nodes.insert(a.node);
        }
        nodes
    }

    /// The node of replica `id` (the one being added included).
    pub fn node_of(&self, id: ReplicaId) -> Option<NodeId> {
        self.replicas.get(&id).map(|r| r.node).or_else(|| {
            self.change
                .and_then(|c| c.add)
                .filter(|a| a.replica == id)
                .map(|a| a.node)
        })
    }
}

/// A phase of moving slots between groups. Each is recorded before it is
/// carried out; every step is idempotent, so a new coordinator repeats the
/// current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum MovePhase {
    /// The source refuses writes to the slots (reads go on).
    Freeze,
    /// The slots' data is copied into the target, staged (not yet served).
    Copy,
    /// The source stops serving the slots (reads too); it keeps the data.
    Handoff,
    /// The target starts serving them.
    Commit,
    /// The route points at the target; the source deletes its copy.
    Release,
    /// The move is being rolled back (only from `Freeze` or `Copy`): the
    /// source takes writes again, the target drops its staged copy, then
    /// the map forgets the move. Recorded first, so no coordinator can
    /// take the move forward once any of that has happened.
    Aborting,
}

impl MovePhase {
    pub fn name(self) -> &'static str {
        match self {
            MovePhase::Freeze => "freeze",
            MovePhase::Copy => "copy",
            MovePhase::Handoff => "handoff",
            MovePhase::Commit => "commit",
            MovePhase::Release => "release",
            MovePhase::Aborting => "aborting",
        }
    }
}

/// Slots moving from one group to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotMove {
    pub id: u64,
    pub slots: SlotSet,
    pub from: GroupId,
    pub to: GroupId,
    pub phase: MovePhase,
    /// The last copy attempt handed out (see [`MapCommand::BeginCopy`]).
    pub attempt: u64,
    /// The copy the target must hold to commit: its attempt and chunk
    /// count, recorded when it ended.
    pub copied: Option<(u64, u64)>,
    /// The source's revision at its hand-off: above every revision the
    /// moved data carries (the target's revisions start past it).
    pub handoff_revision: Option<u64>,
}

/// What registering a node did.
enum Registered {
    New(NodeId),
    /// It was registered already (a retry).
    Already(NodeId),
}

/// The whole map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// Chosen at bootstrap; a node of another cluster is refused.
    pub cluster_id: u64,
    /// Bumps with every applied command; 0: not bootstrapped yet.
    pub epoch: u64,
    /// Voters per data group.
    pub replication: u32,
    /// Data groups the hash keyspace should have (`cluster set-groups`).
    pub target_groups: u32,
    pub nodes: BTreeMap<NodeId, NodeInfo>,
    /// Every group, the meta group included.
    pub groups: BTreeMap<GroupId, GroupInfo>,
    /// slot → owning data group (length [`SLOTS`]).
    pub route: Vec<GroupId>,
    /// The slot move in flight, if any (one at a time).
    pub moving: Option<SlotMove>,
    pub next_node_id: NodeId,
    pub next_group_id: GroupId,
    pub next_replica_id: ReplicaId,
    pub next_move_id: u64,
}

impl Default for ClusterMap {
    fn default() -> Self {
        Self {
            cluster_id: 0,
            epoch: 0,
            replication: 3,
            target_groups: 0,
            nodes: BTreeMap::new(),
            groups: BTreeMap::new(),
            route: Vec::new(),
            moving: None,
            next_node_id: 1,
            next_group_id: 1,
            next_replica_id: FIRST_ADDED_REPLICA_ID,
            next_move_id: 1,
        }
    }
}

/// A change to the map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MapCommand {
    /// The first map (only when there is none yet).
    Bootstrap(Box<ClusterMap>),
    /// Adds a node (`id` 0: allocate one) as `Joining`. Repeating it for a
    /// node already registered with the same address is a no-op, so a
    /// joining node may retry.
    RegisterNode {
        id: NodeId,
        addr: String,
        region: String,
        zone: String,
        kind: NodeKind,
    },
    SetNodeState {
        node: NodeId,
        state: NodeState,
    },
    /// Creates a data group with a voter on each node (allocating its id and
    /// replica ids). It owns no slots until some move into it.
    CreateGroup {
        nodes: Vec<NodeId>,
    },
    /// Records a replica change of `group` before it is carried out.
    BeginReplicaChange {
        group: GroupId,
        /// Add a replica on this node, ending with this role.
        add: Option<(NodeId, Role)>,
        remove: Option<ReplicaId>,
        promote: Option<ReplicaId>,
        demote: Option<ReplicaId>,
    },
    /// The recorded change is done on the group's Raft: make it the map's.
    FinishReplicaChange {
        group: GroupId,
    },
    /// Forget the recorded change (its added replica never became a voter).
    AbortReplicaChange {
        group: GroupId,
    },
    SetTargetGroups {
        groups: u32,
    },
    BeginMove {
        slots: SlotSet,
        from: GroupId,
        to: GroupId,
    },
    /// Moves the recorded slot move `id` to `phase`: `Copy` from `Freeze`,
    /// `Aborting` from `Freeze` or `Copy` (`Handoff` is reached through
    /// [`MapCommand::CopyDone`], `Commit` through [`MapCommand::HandedOff`],
    /// `Release` through [`MapCommand::SwitchRoute`]).
    SetMovePhase {
        id: u64,
        phase: MovePhase,
    },
    /// Hands out the next copy attempt number of move `id` (in `Copy`, or
    /// in `Commit` when the target's staged copy must be redone). Group
    /// commands carry it, so a copy by a coordinator that since lost its
    /// leadership cannot mix with a newer one.
    BeginCopy {
        id: u64,
    },
    /// Copy attempt `attempt` of move `id` ended with `chunks` chunks
    /// (from `Copy` this enters `Handoff`).
    CopyDone {
        id: u64,
        attempt: u64,
        chunks: u64,
    },
    /// The source handed the slots off at `revision` (phase `Commit`).
    HandedOff {
        id: u64,
        revision: u64,
    },
    /// The target serves the slots: route them there (phase `Release`).
    SwitchRoute {
        id: u64,
    },
    /// The move is over (after `Release`).
    EndMove {
        id: u64,
    },
    /// Forgets a move being rolled back (in `Aborting`).
    AbortMove {
        id: u64,
    },
    /// Removes a data group that owns no slots and has nothing in flight.
    DropGroup {
        group: GroupId,
    },
    /// Records the incarnation node `node` reported (see
    /// [`NodeInfo::incarnation`]); once recorded it never changes.
    SetIncarnation {
        node: NodeId,
        incarnation: u64,
    },
}

/// What an applied command created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MapResult {
    Done,
    Node(NodeId),
    Group(GroupId),
    Replica(ReplicaId),
    Move(u64),
    /// A copy attempt number.
    Attempt(u64),
}

/// Why a command was refused (the same on every replica; nothing changed).
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum MapError {
    #[error("the cluster map is not bootstrapped yet")]
    NotBootstrapped,
    #[error("the cluster map is already bootstrapped")]
    AlreadyBootstrapped,
    #[error("node {0} is not in the cluster")]
    UnknownNode(NodeId),
    #[error("node {0} was removed from the cluster")]
    NodeRemoved(NodeId),
    #[error("node {node} cannot go from {from} to {to}")]
    BadTransition {
        node: NodeId,
        from: String,
        to: String,
    },
    #[error("address {addr} is already used by node {node}")]
    AddressInUse { addr: String, node: NodeId },
    #[error("node id {0} is taken by a node at another address")]
    NodeIdTaken(NodeId),
    #[error("node ids must be between 1 and {max}, got {id}", max = FIRST_ADDED_REPLICA_ID - 1)]
    BadNodeId { id: NodeId },
    #[error("group {0} does not exist")]
    UnknownGroup(GroupId),
    #[error("group {0} already has a replica change in flight")]
    ChangeInProgress(GroupId),
    #[error("group {0} has no replica change in flight")]
    NoChange(GroupId),
    #[error("invalid replica change of group {group}: {reason}")]
    BadChange { group: GroupId, reason: String },
    #[error("a slot move is already in flight")]
    MoveInProgress,
    #[error("slot move {0} is not the one in flight")]
    UnknownMove(u64),
    #[error("invalid slot move: {0}")]
    BadMove(String),
    #[error("group count must be between 1 and {MAX_GROUPS}, got {0}")]
    BadGroupCount(u32),
    #[error("group {0} still owns slots or has work in flight")]
    GroupInUse(GroupId),
    #[error("invalid map: {0}")]
    BadMap(String),
    #[error(
        "node {node} is recorded with data directory incarnation {recorded:#x}, not {offered:#x}: \
         the process under that id lost the node's state"
    )]
    WrongIncarnation {
        node: NodeId,
        recorded: u64,
        offered: u64,
    },
}

impl ClusterMap {
    /// The map of a new cluster: `nodes` (id → address) as serving voting
    /// nodes, `data_groups` groups of `replication` voters dealt round-robin
    /// over the nodes, and slots dealt round-robin over the groups (slot `s`
    /// to group `1 + s % data_groups`, the layout earlier versions used).
    /// The meta group's voters are the first (by id) 5, 3 or all nodes;
    /// others join it as learners later. Replica ids equal node ids.
    pub fn bootstrap(
        cluster_id: u64,
        nodes: &BTreeMap<NodeId, String>,
        data_groups: u64,
        replication: u32,
    ) -> Result<ClusterMap, MapError> {
        if nodes.is_empty() {
            return Err(MapError::BadMap("no nodes".into()));
        }
        if data_groups == 0 || data_groups > MAX_GROUPS {
            return Err(MapError::BadGroupCount(data_groups as u32));
        }
        if replication == 0 {
            return Err(MapError::BadMap(
                "replication factor must be at least 1".into(),
            ));
        }
        let ids: Vec<NodeId> = nodes.keys().copied().collect();
        let mut map = ClusterMap {
            cluster_id,
            epoch: 1,
            replication,
            target_groups: data_groups as u32,
            ..ClusterMap::default()
        };
        for (id, addr) in nodes {
            check_node_id(*id)?;
            map.nodes.insert(*id, serving_node(addr));
        }
        let meta_voters = meta_voter_target(ids.len());
        map.groups.insert(
            META_GROUP,
            group_of(ids.iter().take(meta_voters).map(|n| (*n, Role::Voter))),
        );
        let r = (replication as usize).min(ids.len());
        for g in 1..=data_groups {
            let start = (g as usize - 1) % ids.len();
            let members = (0..r).map(|j| (ids[(start + j) % ids.len()], Role::Voter));
            map.groups.insert(g, group_of(members));
        }
        map.route = (0..SLOTS).map(|s| 1 + s % data_groups).collect();
        map.next_node_id = ids.iter().max().copied().unwrap_or(0) + 1;
        map.next_group_id = data_groups + 1;
        Ok(map)
    }

    /// The map of a cluster written by a version before the map existed:
    /// every voter of the meta group (`voters`) is a voter of every group,
    /// `learners` learn every group, slots are dealt `1 + s % data_groups`
    /// — exactly the static layout that version used, so nothing moves. The
    /// replication factor is the voter count (no replica is dropped).
    pub fn legacy(
        cluster_id: u64,
        voters: &BTreeMap<NodeId, String>,
        learners: &BTreeMap<NodeId, String>,
        data_groups: u64,
    ) -> Result<ClusterMap, MapError> {
        let mut map = Self::bootstrap(cluster_id, voters, data_groups, voters.len() as u32)?;
        let all = voters.keys().map(|id| (*id, Role::Voter));
        let with_learners: Vec<(NodeId, Role)> = all
            .chain(learners.keys().map(|id| (*id, Role::Learner)))
            .collect();
        for group in map.groups.values_mut() {
            *group = group_of(with_learners.iter().copied());
            // These groups exist already: nobody initializes them again.
            group.initial.clear();
        }
        for (id, addr) in learners {
            check_node_id(*id)?;
            let mut node = serving_node(addr);
            node.kind = NodeKind::ReadReplica { groups: Vec::new() };
            map.nodes.insert(*id, node);
        }
        map.next_node_id = map.nodes.keys().max().copied().unwrap_or(0) + 1;
        Ok(map)
    }

    pub fn is_bootstrapped(&self) -> bool {
        self.epoch > 0
    }

    /// The data group that owns `slot`.
    pub fn group_of_slot(&self, slot: Slot) -> Option<GroupId> {
        self.route.get(slot as usize).copied()
    }

    /// The data group that owns `key`.
    pub fn group_for_key(&self, key: &[u8]) -> Option<GroupId> {
        self.group_of_slot(slot_of(key))
    }

    /// The slots routed to `group`.
    pub fn slots_of(&self, group: GroupId) -> SlotSet {
        SlotSet::of(
            self.route
                .iter()
                .enumerate()
                .filter(|(_, g)| **g == group)
                .map(|(s, _)| s as Slot),
        )
    }

    /// Data group ids, ascending.
    pub fn data_groups(&self) -> impl Iterator<Item = GroupId> + '_ {
        self.groups.keys().copied().filter(|g| *g != META_GROUP)
    }

    /// The address of node `id`.
    pub fn addr_of(&self, id: NodeId) -> Option<&str> {
        self.nodes.get(&id).map(|n| n.addr.as_str())
    }

    /// The node of replica `replica` of `group`.
    pub fn node_of(&self, group: GroupId, replica: ReplicaId) -> Option<NodeId> {
        self.groups.get(&group)?.node_of(replica)
    }

    /// The groups with a replica on `node`, with the replica id.
    pub fn replicas_on(&self, node: NodeId) -> BTreeMap<GroupId, ReplicaId> {
        self.groups
            .iter()
            .filter_map(|(g, info)| info.replica_on(node).map(|r| (*g, r)))
            .collect()
    }

    /// Nodes in `state`.
    pub fn nodes_in(&self, state: NodeState) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes
            .iter()
            .filter(move |(_, n)| n.state == state)
            .map(|(id, _)| *id)
    }

    /// Applies `cmd`: either it changes the map (and bumps its epoch) or it
    /// is refused and changes nothing.
    pub fn apply(&mut self, cmd: &MapCommand) -> Result<MapResult, MapError> {
        if !self.is_bootstrapped() && !matches!(cmd, MapCommand::Bootstrap(_)) {
            return Err(MapError::NotBootstrapped);
        }
        let result = match cmd {
            MapCommand::Bootstrap(map) => self.apply_bootstrap(map)?,
            MapCommand::RegisterNode {
                id,
                addr,
                region,
                zone,
                kind,
            } => {
                let node = NodeInfo {
                    addr: addr.clone(),
                    region: region.clone(),
                    zone: zone.clone(),
                    state: NodeState::Joining,
                    kind: kind.clone(),
                    incarnation: 0,
                };
                match self.register_node(*id, node)? {
                    Registered::New(id) => MapResult::Node(id),
                    // A retry: nothing changes, not even the epoch.
                    Registered::Already(id) => return Ok(MapResult::Node(id)),
                }
            }
            MapCommand::SetNodeState { node, state } => {
                let groups = &self.groups;
                let info = self
                    .nodes
                    .get_mut(node)
                    .ok_or(MapError::UnknownNode(*node))?;
                if info.state == *state {
                    return Ok(MapResult::Done);
                }
                if !info.state.can_become(*state) {
                    return Err(MapError::BadTransition {
                        node: *node,
                        from: info.state.name().into(),
                        to: state.name().into(),
                    });
                }
                // A node leaves holding at most a learner of the meta
                // group: that is how it learns it was removed.
                let holds_data = groups.iter().any(|(g, group)| {
                    let nodes = group.nodes();
                    if *g == META_GROUP {
                        group.voter_nodes().contains(node)
                            || group
                                .change
                                .and_then(|c| c.add)
                                .is_some_and(|a| a.node == *node)
                    } else {
                        nodes.contains(node)
                    }
                });
                if *state == NodeState::Removed && holds_data {
                    return Err(MapError::BadTransition {
                        node: *node,
                        from: info.state.name().into(),
                        to: "removed while it still holds replicas".into(),
                    });
                }
                info.state = *state;
                MapResult::Done
            }
            MapCommand::CreateGroup { nodes } => self.create_group(nodes)?,
            MapCommand::BeginReplicaChange {
                group,
                add,
                remove,
                promote,
                demote,
            } => self.begin_change(*group, *add, *remove, *promote, *demote)?,
            MapCommand::FinishReplicaChange { group } => self.finish_change(*group)?,
            MapCommand::AbortReplicaChange { group } => {
                let g = self.group_mut(*group)?;
                if g.change.take().is_none() {
                    return Err(MapError::NoChange(*group));
                }
                g.epoch += 1;
                MapResult::Done
            }
            MapCommand::SetTargetGroups { groups } => {
                if *groups == 0 || u64::from(*groups) > MAX_GROUPS {
                    return Err(MapError::BadGroupCount(*groups));
                }
                self.target_groups = *groups;
                MapResult::Done
            }
            MapCommand::BeginMove { slots, from, to } => self.begin_move(slots, *from, *to)?,
            MapCommand::SetMovePhase { id, phase } => {
                let m = self.move_mut(*id)?;
                let allowed = match phase {
                    MovePhase::Aborting => m.phase < MovePhase::Handoff,
                    MovePhase::Copy => m.phase == MovePhase::Freeze,
                    MovePhase::Freeze
                    | MovePhase::Handoff
                    | MovePhase::Commit
                    | MovePhase::Release => false,
                };
                if !allowed {
                    return Err(MapError::BadMove(format!(
                        "move {id} cannot go from {} to {}",
                        m.phase.name(),
                        phase.name()
                    )));
                }
                m.phase = *phase;
                MapResult::Done
            }
            MapCommand::BeginCopy { id } => {
                let m = self.move_mut(*id)?;
                if !matches!(m.phase, MovePhase::Copy | MovePhase::Commit) {
                    return Err(MapError::BadMove(format!(
                        "move {id} copies only in copy or commit (it is in {})",
                        m.phase.name()
                    )));
                }
                m.attempt += 1;
                MapResult::Attempt(m.attempt)
            }
            MapCommand::CopyDone {
                id,
                attempt,
                chunks,
            } => {
                let m = self.move_mut(*id)?;
                if !matches!(m.phase, MovePhase::Copy | MovePhase::Commit) || *attempt != m.attempt
                {
                    return Err(MapError::BadMove(format!(
                        "copy attempt {attempt} of move {id} is not the current one (attempt {}, {})",
                        m.attempt,
                        m.phase.name()
                    )));
                }
                m.copied = Some((*attempt, *chunks));
                if m.phase == MovePhase::Copy {
                    m.phase = MovePhase::Handoff;
                }
                MapResult::Done
            }
            MapCommand::HandedOff { id, revision } => {
                let m = self.move_mut(*id)?;
                if m.phase != MovePhase::Handoff {
                    return Err(MapError::BadMove(format!(
                        "move {id} records its hand-off only in handoff (it is in {})",
                        m.phase.name()
                    )));
                }
                m.handoff_revision = Some(*revision);
                m.phase = MovePhase::Commit;
                MapResult::Done
            }
            MapCommand::SetIncarnation { node, incarnation } => {
                let info = self
                    .nodes
                    .get_mut(node)
                    .ok_or(MapError::UnknownNode(*node))?;
                if info.incarnation == *incarnation {
                    // A repeat: nothing changes, not even the epoch.
                    return Ok(MapResult::Done);
                }
                if info.incarnation != 0 || *incarnation == 0 {
                    return Err(MapError::WrongIncarnation {
                        node: *node,
                        recorded: info.incarnation,
                        offered: *incarnation,
                    });
                }
                info.incarnation = *incarnation;
                MapResult::Done
            }
            MapCommand::SwitchRoute { id } => {
                let m = self.move_mut(*id)?;
                if m.phase != MovePhase::Commit {
                    return Err(MapError::BadMove(format!(
                        "move {id} switches its route only once committed (it is in {})",
                        m.phase.name()
                    )));
                }
                m.phase = MovePhase::Release;
                let (slots, from, to) = (m.slots.clone(), m.from, m.to);
                for s in slots.iter() {
                    self.route[s as usize] = to;
                }
                self.group_mut(from)?.epoch += 1;
                self.group_mut(to)?.epoch += 1;
                MapResult::Done
            }
            MapCommand::EndMove { id } => {
                let m = self.move_mut(*id)?;
                if m.phase != MovePhase::Release {
                    return Err(MapError::BadMove(format!(
                        "move {id} ends only after its release (it is in {})",
                        m.phase.name()
                    )));
                }
                self.moving = None;
                MapResult::Done
            }
            MapCommand::AbortMove { id } => {
                let m = self.move_mut(*id)?;
                if m.phase != MovePhase::Aborting {
                    return Err(MapError::BadMove(format!(
                        "move {id} is not being rolled back (it is in {})",
                        m.phase.name()
                    )));
                }
                self.moving = None;
                MapResult::Done
            }
            MapCommand::DropGroup { group } => {
                if *group == META_GROUP {
                    return Err(MapError::GroupInUse(*group));
                }
                let g = self.group_mut(*group)?;
                let busy = g.change.is_some();
                let moving = self
                    .moving
                    .as_ref()
                    .is_some_and(|m| m.from == *group || m.to == *group);
                if busy || moving || self.route.contains(group) {
                    return Err(MapError::GroupInUse(*group));
                }
                self.groups.remove(group);
                MapResult::Done
            }
        };
        self.epoch += 1;
        Ok(result)
    }

    fn apply_bootstrap(&mut self, map: &ClusterMap) -> Result<MapResult, MapError> {
        if self.is_bootstrapped() {
            return Err(MapError::AlreadyBootstrapped);
        }
        map.check()?;
        *self = map.clone();
        // `apply` adds one.
        self.epoch = map.epoch.max(1) - 1;
        Ok(MapResult::Done)
    }

    /// Structural invariants of a whole map (checked on bootstrap).
    pub fn check(&self) -> Result<(), MapError> {
        if self.route.len() != SLOTS as usize {
            return Err(MapError::BadMap(format!(
                "route has {} slots, not {SLOTS}",
                self.route.len()
            )));
        }
        if let Some(g) = self
            .route
            .iter()
            .find(|g| **g == META_GROUP || !self.groups.contains_key(g))
        {
            return Err(MapError::BadMap(format!(
                "a slot is routed to group {g}, which is not a data group"
            )));
        }
        if !self.groups.contains_key(&META_GROUP) {
            return Err(MapError::BadMap("no meta group".into()));
        }
        for (g, info) in &self.groups {
            for r in info.replicas.values() {
                if !self.nodes.contains_key(&r.node) {
                    return Err(MapError::BadMap(format!(
                        "group {g} has a replica on unknown node {}",
                        r.node
                    )));
                }
            }
            if info.voters().is_empty() {
                return Err(MapError::BadMap(format!("group {g} has no voter")));
            }
        }
        Ok(())
    }

    /// Registers a node; `None` when it was registered already (a retry).
    fn register_node(&mut self, id: NodeId, node: NodeInfo) -> Result<Registered, MapError> {
        if let Some((other, n)) = self
            .nodes
            .iter()
            .find(|(i, n)| n.addr == node.addr && n.state != NodeState::Removed && **i != id)
        {
            // A node asking for an id retries after its first request
            // committed unseen: it gets the id it was given.
            if id == 0 && n.state == NodeState::Joining && n.kind == node.kind {
                return Ok(Registered::Already(*other));
            }
            return Err(MapError::AddressInUse {
                addr: node.addr,
                node: *other,
            });
        }
        let id = if id == 0 { self.next_node_id } else { id };
        check_node_id(id)?;
        if let Some(existing) = self.nodes.get(&id) {
            if existing.state == NodeState::Removed {
                return Err(MapError::NodeRemoved(id));
            }
            if existing.addr == node.addr {
                return Ok(Registered::Already(id));
            }
            return Err(MapError::NodeIdTaken(id));
        }
        self.nodes.insert(id, node);
        self.next_node_id = self.next_node_id.max(id + 1);
        Ok(Registered::New(id))
    }

    fn create_group(&mut self, nodes: &[NodeId]) -> Result<MapResult, MapError> {
        if self.data_groups().count() as u64 >= MAX_GROUPS {
            return Err(MapError::BadGroupCount(MAX_GROUPS as u32 + 1));
        }
        let unique: BTreeSet<NodeId> = nodes.iter().copied().collect();
        if unique.is_empty() || unique.len() != nodes.len() {
            return Err(MapError::BadMap(format!(
                "a new group needs distinct nodes, got {nodes:?}"
            )));
        }
        for n in &unique {
            self.usable_node(*n)?;
        }
        let id = self.next_group_id;
        let mut replicas = BTreeMap::new();
        for n in nodes {
            replicas.insert(
                self.next_replica_id,
                Replica {
                    node: *n,
                    role: Role::Voter,
                },
            );
            self.next_replica_id += 1;
        }
        let initial = replicas.keys().copied().collect();
        self.groups.insert(
            id,
            GroupInfo {
                epoch: 1,
                replicas,
                initial,
                change: None,
            },
        );
        self.next_group_id += 1;
        Ok(MapResult::Group(id))
    }

    /// A node that may receive a new replica.
    fn usable_node(&self, node: NodeId) -> Result<&NodeInfo, MapError> {
        let info = self.nodes.get(&node).ok_or(MapError::UnknownNode(node))?;
        match info.state {
            NodeState::Removed => Err(MapError::NodeRemoved(node)),
            NodeState::Draining => Err(MapError::BadTransition {
                node,
                from: "draining".into(),
                to: "a new replica".into(),
            }),
            NodeState::Joining | NodeState::Serving => Ok(info),
        }
    }

    fn begin_change(
        &mut self,
        group: GroupId,
        add: Option<(NodeId, Role)>,
        remove: Option<ReplicaId>,
        promote: Option<ReplicaId>,
        demote: Option<ReplicaId>,
    ) -> Result<MapResult, MapError> {
        let bad = |reason: &str| MapError::BadChange {
            group,
            reason: reason.into(),
        };
        if add.is_none() && remove.is_none() && promote.is_none() && demote.is_none() {
            return Err(bad("nothing to change"));
        }
        if let Some((node, _)) = add {
            self.usable_node(node)?;
        }
        let next_replica = self.next_replica_id;
        let g = self
            .groups
            .get_mut(&group)
            .ok_or(MapError::UnknownGroup(group))?;
        if g.change.is_some() {
            return Err(MapError::ChangeInProgress(group));
        }
        if let Some((node, _)) = add
            && g.replica_on(node).is_some()
        {
            return Err(bad(&format!("node {node} already has a replica")));
        }
        let touched: Vec<ReplicaId> = [remove, promote, demote].into_iter().flatten().collect();
        for r in &touched {
            if !g.replicas.contains_key(r) {
                return Err(bad(&format!("replica {r} is not in the group")));
            }
        }
        let distinct: BTreeSet<ReplicaId> = touched.iter().copied().collect();
        if distinct.len() != touched.len() {
            return Err(bad("one replica can take part in one way only"));
        }
        if let Some(d) = demote
            && g.replicas[&d].role != Role::Voter
        {
            return Err(bad(&format!("replica {d} is not a voter")));
        }
        if let Some(p) = promote
            && g.replicas[&p].role != Role::Learner
        {
            return Err(bad(&format!("replica {p} is not a learner")));
        }
        // The group must keep a voter.
        let mut voters = g.voters();
        for r in [remove, demote].into_iter().flatten() {
            voters.remove(&r);
        }
        let adds_voter = add.is_some_and(|(_, role)| role == Role::Voter) || promote.is_some();
        if voters.is_empty() && !adds_voter {
            return Err(bad("it would leave no voter"));
        }
        let added = add.map(|(node, role)| AddReplica {
            // The meta group's replica on a node carries the node's id.
            replica: if group == META_GROUP {
                node
            } else {
                next_replica
            },
            node,
            role,
        });
        if let Some(a) = added
            && g.replicas.contains_key(&a.replica)
        {
            return Err(bad(&format!("replica id {} is in use", a.replica)));
        }
        g.change = Some(ReplicaChange {
            add: added,
            remove,
            promote,
            demote,
        });
        g.epoch += 1;
        if added.is_some() && group != META_GROUP {
            self.next_replica_id += 1;
        }
        Ok(match added {
            Some(a) => MapResult::Replica(a.replica),
            None => MapResult::Done,
        })
    }

    fn finish_change(&mut self, group: GroupId) -> Result<MapResult, MapError> {
        let g = self.group_mut(group)?;
        let change = g.change.take().ok_or(MapError::NoChange(group))?;
        if let Some(a) = change.add {
            g.replicas.insert(
                a.replica,
                Replica {
                    node: a.node,
                    role: a.role,
                },
            );
        }
        if let Some(r) = change.remove {
            g.replicas.remove(&r);
        }
        if let Some(d) = change.demote
            && let Some(r) = g.replicas.get_mut(&d)
        {
            r.role = Role::Learner;
        }
        if let Some(p) = change.promote
            && let Some(r) = g.replicas.get_mut(&p)
        {
            r.role = Role::Voter;
        }
        g.initial.clear();
        g.epoch += 1;
        Ok(MapResult::Done)
    }

    fn begin_move(
        &mut self,
        slots: &SlotSet,
        from: GroupId,
        to: GroupId,
    ) -> Result<MapResult, MapError> {
        if self.moving.is_some() {
            return Err(MapError::MoveInProgress);
        }
        if !slots.is_well_formed() || slots.is_empty() {
            return Err(MapError::BadMove("no slots".into()));
        }
        if from == to || from == META_GROUP || to == META_GROUP {
            return Err(MapError::BadMove(format!(
                "cannot move slots from group {from} to group {to}"
            )));
        }
        self.group_mut(to)?;
        self.group_mut(from)?;
        if !self.slots_of(from).is_superset(slots) {
            return Err(MapError::BadMove(format!(
                "group {from} does not own every slot of {}",
                slots.ranges_text()
            )));
        }
        let id = self.next_move_id;
        self.next_move_id += 1;
        self.moving = Some(SlotMove {
            id,
            slots: slots.clone(),
            from,
            to,
            phase: MovePhase::Freeze,
            attempt: 0,
            copied: None,
            handoff_revision: None,
        });
        Ok(MapResult::Move(id))
    }

    fn group_mut(&mut self, group: GroupId) -> Result<&mut GroupInfo, MapError> {
        self.groups
            .get_mut(&group)
            .ok_or(MapError::UnknownGroup(group))
    }

    fn move_mut(&mut self, id: u64) -> Result<&mut SlotMove, MapError> {
        match &mut self.moving {
            Some(m) if m.id == id => Ok(m),
            _ => Err(MapError::UnknownMove(id)),
        }
    }
}

/// How many voters the meta group wants with `serving` voting nodes: an odd
/// count up to five.
pub fn meta_voter_target(serving: usize) -> usize {
    match serving {
        0..=2 => serving,
        3 | 4 => 3,
        _ => 5,
    }
}

fn check_node_id(id: NodeId) -> Result<(), MapError> {
    if id == 0 || id >= FIRST_ADDED_REPLICA_ID {
        Err(MapError::BadNodeId { id })
    } else {
        Ok(())
    }
}

fn serving_node(addr: &str) -> NodeInfo {
    NodeInfo {
        addr: addr.to_string(),
        region: String::new(),
        zone: String::new(),
        state: NodeState::Serving,
        kind: NodeKind::Voting,
        incarnation: 0,
    }
}

/// A group whose replicas have their node's id (bootstrap, legacy).
fn group_of(members: impl Iterator<Item = (NodeId, Role)>) -> GroupInfo {
    let replicas: BTreeMap<ReplicaId, Replica> = members
        .map(|(node, role)| (node, Replica { node, role }))
        .collect();
    let initial = replicas
        .iter()
        .filter(|(_, r)| r.role == Role::Voter)
        .map(|(id, _)| *id)
        .collect();
    GroupInfo {
        epoch: 1,
        replicas,
        initial,
        change: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: u64) -> BTreeMap<NodeId, String> {
        (1..=n).map(|i| (i, format!("10.0.0.{i}:7001"))).collect()
    }

    fn three() -> ClusterMap {
        ClusterMap::bootstrap(7, &nodes(3), 4, 3).unwrap()
    }

    fn register(map: &mut ClusterMap, addr: &str) -> NodeId {
        match map
            .apply(&MapCommand::RegisterNode {
                id: 0,
                addr: addr.into(),
                region: "us".into(),
                zone: "a".into(),
                kind: NodeKind::Voting,
            })
            .unwrap()
        {
            MapResult::Node(id) => id,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_node_incarnation_is_recorded_once_and_never_replaced() {
        let mut map = three();
        let epoch = map.epoch;
        let set = |node, incarnation| MapCommand::SetIncarnation { node, incarnation };
        assert_eq!(map.apply(&set(2, 0xabc)).unwrap(), MapResult::Done);
        assert_eq!(map.nodes[&2].incarnation, 0xabc);
        assert_eq!(map.epoch, epoch + 1);
        // A repeat changes nothing, not even the epoch.
        assert_eq!(map.apply(&set(2, 0xabc)).unwrap(), MapResult::Done);
        assert_eq!(map.epoch, epoch + 1);
        // Another incarnation under the same id is refused.
        assert!(matches!(
            map.apply(&set(2, 0xdef)),
            Err(MapError::WrongIncarnation {
                node: 2,
                recorded: 0xabc,
                offered: 0xdef
            })
        ));
        assert!(matches!(
            map.apply(&set(2, 0)),
            Err(MapError::WrongIncarnation { .. })
        ));
        assert!(matches!(
            map.apply(&set(9, 1)),
            Err(MapError::UnknownNode(9))
        ));
        assert_eq!(map.nodes[&2].incarnation, 0xabc);
    }

    #[test]
    fn bootstrap_deals_replicas_and_slots_like_the_static_layout() {
        let map = ClusterMap::bootstrap(7, &nodes(5), 4, 3).unwrap();
        assert_eq!(map.epoch, 1);
        assert_eq!(map.groups[&META_GROUP].voters().len(), 5);
        // Group g starts at node g and takes the next two.
        let placed: Vec<Vec<NodeId>> = (1..=4)
            .map(|g| map.groups[&g].voter_nodes().into_iter().collect())
            .collect();
        assert_eq!(
            placed,
            vec![vec![1, 2, 3], vec![2, 3, 4], vec![3, 4, 5], vec![1, 4, 5]]
        );
        for s in [0u16, 1, 4095] {
            assert_eq!(map.group_of_slot(s), Some(1 + u64::from(s) % 4));
        }
        assert_eq!(map.slots_of(1).len(), 1024);
        assert!(map.check().is_ok());
        assert_eq!(map.groups[&2].initial, [2, 3, 4].into());
    }

    #[test]
    fn legacy_map_is_every_voter_in_every_group() {
        let learners = BTreeMap::from([(4, "10.0.0.4:7001".to_string())]);
        let map = ClusterMap::legacy(9, &nodes(3), &learners, 2).unwrap();
        assert_eq!(map.replication, 3);
        for g in [0, 1, 2] {
            let info = &map.groups[&g];
            assert_eq!(info.voter_nodes(), [1, 2, 3].into());
            assert_eq!(info.replicas[&4].role, Role::Learner);
            assert!(
                info.initial.is_empty(),
                "existing groups are never initialized again"
            );
        }
        assert!(map.nodes[&4].is_read_replica());
        assert_eq!(map.next_node_id, 5);
    }

    #[test]
    fn node_lifecycle_is_checked_at_every_transition() {
        let mut map = three();
        let id = register(&mut map, "10.0.0.9:7001");
        assert_eq!(id, 4);
        assert_eq!(map.nodes[&4].state, NodeState::Joining);
        // A retried registration changes nothing, not even the epoch.
        let epoch = map.epoch;
        let again = map.apply(&MapCommand::RegisterNode {
            id: 4,
            addr: "10.0.0.9:7001".into(),
            region: String::new(),
            zone: String::new(),
            kind: NodeKind::Voting,
        });
        assert_eq!(again, Ok(MapResult::Node(4)));
        assert_eq!(map.epoch, epoch);
        let set =
            |map: &mut ClusterMap, state| map.apply(&MapCommand::SetNodeState { node: 4, state });
        assert!(matches!(
            set(&mut map, NodeState::Removed),
            Err(MapError::BadTransition { .. })
        ));
        set(&mut map, NodeState::Serving).unwrap();
        set(&mut map, NodeState::Draining).unwrap();
        set(&mut map, NodeState::Removed).unwrap();
        assert!(matches!(
            set(&mut map, NodeState::Serving),
            Err(MapError::BadTransition { .. })
        ));
        // A removed node's id and address never come back under it.
        let back = map.apply(&MapCommand::RegisterNode {
            id: 4,
            addr: "10.0.0.9:7001".into(),
            region: String::new(),
            zone: String::new(),
            kind: NodeKind::Voting,
        });
        assert_eq!(back, Err(MapError::NodeRemoved(4)));
        assert_eq!(register(&mut map, "10.0.0.9:7001"), 5, "a fresh id");
        // A joining node whose request committed unseen retries: same id,
        // nothing changes.
        let epoch = map.epoch;
        assert_eq!(register(&mut map, "10.0.0.9:7001"), 5, "a retry");
        assert_eq!(map.epoch, epoch);
        // An address in use by a live node is refused.
        assert!(matches!(
            map.apply(&MapCommand::RegisterNode {
                id: 0,
                addr: "10.0.0.1:7001".into(),
                region: String::new(),
                zone: String::new(),
                kind: NodeKind::Voting,
            }),
            Err(MapError::AddressInUse { node: 1, .. })
        ));
        // A node holding data replicas cannot be marked removed (a meta
        // learner is fine: it learns that way that it was removed).
        map.apply(&MapCommand::SetNodeState {
            node: 1,
            state: NodeState::Draining,
        })
        .unwrap();
        assert!(matches!(
            map.apply(&MapCommand::SetNodeState {
                node: 1,
                state: NodeState::Removed
            }),
            Err(MapError::BadTransition { .. })
        ));
    }

    #[test]
    fn a_replica_change_is_recorded_then_finished_and_bumps_the_group_epoch() {
        let mut map = three();
        let id = register(&mut map, "10.0.0.4:7001");
        let e0 = map.groups[&1].epoch;
        let r = map
            .apply(&MapCommand::BeginReplicaChange {
                group: 1,
                add: Some((id, Role::Voter)),
                remove: Some(3),
                promote: None,
                demote: None,
            })
            .unwrap();
        assert_eq!(r, MapResult::Replica(FIRST_ADDED_REPLICA_ID));
        let g = &map.groups[&1];
        assert_eq!(g.epoch, e0 + 1);
        assert_eq!(
            g.replica_on(id),
            Some(FIRST_ADDED_REPLICA_ID),
            "pending adds count"
        );
        assert_eq!(g.voters(), [1, 2, 3].into(), "not a voter until finished");
        // One change at a time.
        assert_eq!(
            map.apply(&MapCommand::BeginReplicaChange {
                group: 1,
                add: None,
                remove: Some(2),
                promote: None,
                demote: None,
            }),
            Err(MapError::ChangeInProgress(1))
        );
        map.apply(&MapCommand::FinishReplicaChange { group: 1 })
            .unwrap();
        let g = &map.groups[&1];
        assert_eq!(g.voters(), [1, 2, FIRST_ADDED_REPLICA_ID].into());
        assert_eq!(g.epoch, e0 + 2);
        assert!(g.initial.is_empty());
        // Ids are never reused.
        map.apply(&MapCommand::BeginReplicaChange {
            group: 2,
            add: Some((id, Role::Learner)),
            remove: None,
            promote: None,
            demote: None,
        })
        .unwrap();
        assert_eq!(
            map.groups[&2].change.unwrap().add.unwrap().replica,
            FIRST_ADDED_REPLICA_ID + 1
        );
        map.apply(&MapCommand::AbortReplicaChange { group: 2 })
            .unwrap();
        assert!(map.groups[&2].change.is_none());
        assert_eq!(map.groups[&2].replica_on(id), None);
    }

    #[test]
    fn replica_changes_that_would_break_the_group_are_refused() {
        let mut map = ClusterMap::bootstrap(1, &nodes(1), 1, 1).unwrap();
        let change = |add, remove| MapCommand::BeginReplicaChange {
            group: 1,
            add,
            remove,
            promote: None,
            demote: None,
        };
        assert!(matches!(
            map.apply(&change(None, Some(1))),
            Err(MapError::BadChange { .. })
        ));
        assert!(matches!(
            map.apply(&change(Some((1, Role::Voter)), None)),
            Err(MapError::BadChange { .. })
        ));
        assert!(matches!(
            map.apply(&change(Some((9, Role::Voter)), None)),
            Err(MapError::UnknownNode(9))
        ));
        assert!(matches!(
            map.apply(&change(None, Some(77))),
            Err(MapError::BadChange { .. })
        ));
        // The meta group's replica carries the node id.
        let id = register(&mut map, "10.0.0.2:7001");
        let r = map
            .apply(&MapCommand::BeginReplicaChange {
                group: META_GROUP,
                add: Some((id, Role::Learner)),
                remove: None,
                promote: None,
                demote: None,
            })
            .unwrap();
        assert_eq!(r, MapResult::Replica(id));
    }

    #[test]
    fn a_slot_move_goes_through_its_phases_in_order() {
        let mut map = three();
        let g = match map.apply(&MapCommand::CreateGroup {
            nodes: vec![1, 2, 3],
        }) {
            Ok(MapResult::Group(g)) => g,
            other => panic!("{other:?}"),
        };
        assert_eq!(g, 5);
        assert!(map.slots_of(5).is_empty());
        let slots = SlotSet::of([0, 4, 8]);
        assert!(matches!(
            map.apply(&MapCommand::BeginMove {
                slots: SlotSet::of([0, 1]),
                from: 1,
                to: 5
            }),
            Err(MapError::BadMove(_))
        ));
        let id = match map.apply(&MapCommand::BeginMove {
            slots: slots.clone(),
            from: 1,
            to: 5,
        }) {
            Ok(MapResult::Move(id)) => id,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            map.apply(&MapCommand::BeginMove {
                slots: SlotSet::of([1]),
                from: 2,
                to: 5
            }),
            Err(MapError::MoveInProgress)
        );
        let phase =
            |map: &mut ClusterMap, phase| map.apply(&MapCommand::SetMovePhase { id, phase });
        let copy_done = |map: &mut ClusterMap, attempt, chunks| {
            map.apply(&MapCommand::CopyDone {
                id,
                attempt,
                chunks,
            })
        };
        assert!(
            phase(&mut map, MovePhase::Handoff).is_err(),
            "the hand-off needs a recorded copy"
        );
        assert!(
            map.apply(&MapCommand::BeginCopy { id }).is_err(),
            "no copy while freezing"
        );
        phase(&mut map, MovePhase::Copy).unwrap();
        assert_eq!(
            map.apply(&MapCommand::BeginCopy { id }),
            Ok(MapResult::Attempt(1))
        );
        assert_eq!(
            map.apply(&MapCommand::BeginCopy { id }),
            Ok(MapResult::Attempt(2))
        );
        assert!(copy_done(&mut map, 1, 3).is_err(), "a stale attempt");
        copy_done(&mut map, 2, 3).unwrap();
        let m = map.moving.clone().unwrap();
        assert_eq!((m.phase, m.copied), (MovePhase::Handoff, Some((2, 3))));
        assert!(phase(&mut map, MovePhase::Copy).is_err(), "never backwards");
        assert!(
            phase(&mut map, MovePhase::Aborting).is_err(),
            "no roll-back after the copy is recorded"
        );
        assert!(matches!(
            map.apply(&MapCommand::AbortMove { id }),
            Err(MapError::BadMove(_))
        ));
        assert!(map.apply(&MapCommand::SwitchRoute { id }).is_err());
        assert!(
            phase(&mut map, MovePhase::Commit).is_err(),
            "through HandedOff"
        );
        map.apply(&MapCommand::HandedOff { id, revision: 77 })
            .unwrap();
        assert_eq!(map.moving.as_ref().unwrap().handoff_revision, Some(77));
        // A copy redone at commit is recorded without changing the phase.
        assert_eq!(
            map.apply(&MapCommand::BeginCopy { id }),
            Ok(MapResult::Attempt(3))
        );
        copy_done(&mut map, 3, 4).unwrap();
        let m = map.moving.clone().unwrap();
        assert_eq!((m.phase, m.copied), (MovePhase::Commit, Some((3, 4))));
        let (e1, e5) = (map.groups[&1].epoch, map.groups[&5].epoch);
        map.apply(&MapCommand::SwitchRoute { id }).unwrap();
        assert_eq!(map.group_of_slot(4), Some(5));
        assert_eq!(map.group_of_slot(1), Some(2));
        assert_eq!(
            (map.groups[&1].epoch, map.groups[&5].epoch),
            (e1 + 1, e5 + 1)
        );
        assert_eq!(
            map.apply(&MapCommand::DropGroup { group: 5 }),
            Err(MapError::GroupInUse(5))
        );
        map.apply(&MapCommand::EndMove { id }).unwrap();
        assert!(map.moving.is_none());
        assert!(map.check().is_ok());
    }

    #[test]
    fn a_move_rolls_back_only_before_handoff_and_groups_drop_only_when_empty() {
        let mut map = three();
        let id = match map.apply(&MapCommand::BeginMove {
            slots: SlotSet::of([2]),
            from: 3,
            to: 4,
        }) {
            Ok(MapResult::Move(id)) => id,
            other => panic!("{other:?}"),
        };
        let phase =
            |map: &mut ClusterMap, phase| map.apply(&MapCommand::SetMovePhase { id, phase });
        phase(&mut map, MovePhase::Copy).unwrap();
        assert!(
            map.apply(&MapCommand::AbortMove { id }).is_err(),
            "the roll-back is recorded before it is carried out"
        );
        phase(&mut map, MovePhase::Aborting).unwrap();
        assert!(phase(&mut map, MovePhase::Commit).is_err(), "no way back");
        assert!(map.apply(&MapCommand::BeginCopy { id }).is_err());
        map.apply(&MapCommand::AbortMove { id }).unwrap();
        assert_eq!(map.group_of_slot(2), Some(3));
        assert_eq!(
            map.apply(&MapCommand::DropGroup { group: 4 }),
            Err(MapError::GroupInUse(4))
        );
        assert_eq!(
            map.apply(&MapCommand::DropGroup { group: META_GROUP }),
            Err(MapError::GroupInUse(META_GROUP))
        );
    }

    #[test]
    fn commands_before_bootstrap_and_a_second_bootstrap_are_refused() {
        let mut map = ClusterMap::default();
        assert_eq!(
            map.apply(&MapCommand::SetTargetGroups { groups: 2 }),
            Err(MapError::NotBootstrapped)
        );
        let first = three();
        map.apply(&MapCommand::Bootstrap(Box::new(first.clone())))
            .unwrap();
        assert_eq!(map, first);
        assert_eq!(
            map.apply(&MapCommand::Bootstrap(Box::new(first))),
            Err(MapError::AlreadyBootstrapped)
        );
        let mut bad = three();
        bad.route[7] = 99;
        let mut empty = ClusterMap::default();
        assert!(matches!(
            empty.apply(&MapCommand::Bootstrap(Box::new(bad))),
            Err(MapError::BadMap(_))
        ));
        assert!(!empty.is_bootstrapped());
    }

    #[test]
    fn meta_voters_are_odd_up_to_five() {
        let got: Vec<usize> = (0..8).map(meta_voter_target).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 3, 5, 5, 5]);
    }
}
