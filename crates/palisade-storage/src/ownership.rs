//! Which hash slots a group serves, as its own replicated state says.
//!
//! The cluster map (in the meta group) says where slots *should* be; this
//! record, kept in each data group's state tree and changed only by that
//! group's own log entries, says what the group *does* serve at each point
//! of its log. Every replica of the group therefore agrees on it at every
//! index, reads check it under the same lock as the data they return, and
//! the state machine checks it for every write it applies: a replica never
//! applies a write to a slot it does not own, and a read never answers for a
//! slot that moved away (see `palisade-group`'s slot commands).
//!
//! A group without the record (data written before the cluster map existed)
//! serves every key it is sent, as those versions did; the coordinator
//! gives every such group its record before any slot moves.

use std::collections::BTreeMap;

use palisade_shard::{Slot, SlotSet};
use serde::{Deserialize, Serialize};

/// The slots a group serves, and the traces of moves in and out.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Ownership {
    /// Bumps with every change of this record.
    pub epoch: u64,
    /// Slots served: reads, and writes unless frozen.
    pub owned: SlotSet,
    /// Owned slots whose writes are refused while their data is copied out.
    pub frozen: SlotSet,
    /// Slots being copied in: their records may be present, nothing is
    /// served from them until the import commits.
    pub staged: SlotSet,
    /// For slots imported from another group: the revision from which this
    /// group answers for their history (reads at older revisions are out of
    /// range here).
    pub since: BTreeMap<Slot, u64>,
    /// For slots handed to another group: that group (a routing hint).
    pub moved_to: BTreeMap<Slot, u64>,
    /// For imported slots: the group they came from and its revision when
    /// it handed them off. A session that saw this group's data of the
    /// slot has seen everything that group did with it.
    pub came_from: BTreeMap<Slot, (u64, u64)>,
    /// The move whose `Freeze` froze `frozen` (0: none).
    pub freeze_move: u64,
    /// The copy being imported into `staged`, if any.
    pub import: Option<ImportProgress>,
    /// The highest move that is over as far as this group goes (committed
    /// or aborted here, released or unfrozen here). A command of such a
    /// move changes nothing: it is a repeat, or a step of a coordinator
    /// that lost its leadership and does not know yet.
    pub fence: u64,
}

/// One attempt at copying a move's slots in: which move, which attempt (the
/// cluster map hands out attempt numbers, so a coordinator that lost its
/// leadership can only send older ones), and how many chunks arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ImportProgress {
    pub move_id: u64,
    pub attempt: u64,
    pub chunks: u64,
}

impl Ownership {
    /// A group that owns `owned` from revision 0 (a legacy group adopting
    /// its static slots, or a new cluster's group at bootstrap).
    pub fn of(owned: SlotSet) -> Self {
        Self {
            epoch: 1,
            owned,
            ..Self::default()
        }
    }

    pub fn serves(&self, slot: Slot) -> bool {
        self.owned.contains(slot)
    }

    pub fn writable(&self, slot: Slot) -> bool {
        self.owned.contains(slot) && !self.frozen.contains(slot)
    }

    /// The revision from which this group answers for `slot`'s history.
    pub fn since(&self, slot: Slot) -> u64 {
        self.since.get(&slot).copied().unwrap_or(0)
    }
}
