//! Where data lives: hash slots, the cluster map owned by the meta group,
//! and the rebalancer's plan.
//!
//! - [`slots`]: a key hashes to one of [`SLOTS`] slots (fixed forever).
//! - [`map`]: the [`ClusterMap`] — nodes with their lifecycle, groups with
//!   their replicas and epochs, the slot → group route, the slot move in
//!   flight — and the [`MapCommand`]s that change it, applied
//!   deterministically by the meta group's state machine.
//! - [`plan`]: given the map and what the meta leader observes, the next
//!   [`Action`]s that keep every group replicated, balance replicas and
//!   leaders, and bring the hash keyspace to its requested group count.
//!
//! The crate is pure (no I/O, no clocks, no randomness): everything here is
//! tested as tables, and every replica and every meta leader computes the
//! same answers.

pub mod map;
pub mod plan;
pub mod slots;

pub use map::{
    AddReplica, ClusterMap, FIRST_ADDED_REPLICA_ID, GroupId, GroupInfo, MAX_GROUPS, META_GROUP,
    MapCommand, MapError, MapResult, MovePhase, NodeId, NodeInfo, NodeKind, NodeState, Replica,
    ReplicaChange, ReplicaId, Role, SlotMove, meta_voter_target,
};
pub use plan::{Action, ChangeSpec, Observation, Policy, plan};
pub use slots::{
    LEASE_SLOT_FLAG, LeaseHome, SLOTS, Slot, SlotSet, fnv1a64, hash_tag, lease_home, lease_id,
    slot_of,
};
