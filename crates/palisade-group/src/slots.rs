//! The group-side half of moving hash slots: how a data group's state
//! machine applies [`SlotCommand`]s to its [`Ownership`] record, and how it
//! checks every client write against that record.
//!
//! A move of slots S from group A to group B goes (each step recorded in the
//! meta group first, see `palisade_shard::MovePhase`):
//!
//! | step | group | command        | effect                                               |
//! |------|-------|----------------|------------------------------------------------------|
//! | 1    | A     | `Freeze`       | writes to S refused (`Frozen`, retryable); reads go on |
//! | 2    | B     | `ImportBegin`  | stale records of S dropped; S staged (not served)    |
//! | 3    | B     | `ImportChunk`… | A's records of S (history, locks, leases, dedup) copied |
//! | 4    | A     | `Handoff`      | A stops serving S, reads included; keeps the data    |
//! | 5    | B     | `ImportCommit` | B serves S; its revisions jump past A's              |
//! | 6    | A     | `Release`      | A deletes its copy of S                              |
//!
//! Between 4 and 5 nobody serves S (a moment of `NotOwned`, retryable), so
//! no two groups ever serve a slot at once and a read can never see B's
//! older copy after A took a write, or the reverse: A takes no write after
//! 1, and B takes none before 5. Every step is idempotent, so a coordinator
//! that restarts repeats its step. Steps 1–3 roll back with `Unfreeze` and
//! `ImportAbort`; from 4 on a move only goes forward.
//!
//! **Revisions.** A key's `mod_revision`, its history and a lock's fencing
//! token are revisions of the group that wrote them. After step 5, B's
//! revision of every entry is above A's revision at the handoff (B raises
//! its revision offset), so per key, revisions keep increasing across the
//! move and a fencing token handed out by B is above every token A gave.

use palisade_shard::{LeaseHome, Slot, lease_home, slot_of};
use palisade_storage::{Ownership, StateBatch, StoreError};

use crate::types::{CommandOp, GroupId, Rejection, SlotCommand, TxnOp};

/// The rejection of a write touching `slot`, if this group may not write it.
fn refuse(own: &Ownership, slot: Slot) -> Option<Rejection> {
    if !own.serves(slot) {
        Some(Rejection::NotOwned {
            slot,
            moved_to: own.moved_to.get(&slot).copied(),
        })
    } else if own.frozen.contains(slot) {
        Some(Rejection::Frozen { slot })
    } else {
        None
    }
}

/// The slots a client command writes.
pub(crate) fn written_slots(op: &CommandOp) -> Vec<Slot> {
    match op {
        CommandOp::Txn(txn) => txn.keys().map(slot_of).collect(),
        CommandOp::Lock { name, .. } | CommandOp::Unlock { name, .. } => vec![slot_of(name)],
        CommandOp::LeaseGrantIn { slot, .. } => vec![*slot],
        CommandOp::LeaseRevoke { id } => match lease_home(*id) {
            Some(LeaseHome::Slot(s)) => vec![s],
            _ => Vec::new(),
        },
        // Group-level, or applied per inner command.
        CommandOp::Compact { .. }
        | CommandOp::LeaseGrant { .. }
        | CommandOp::Batch(_)
        | CommandOp::Map(_)
        | CommandOp::Slots(_) => Vec::new(),
    }
}

/// Why this group must refuse the client command `op`, if it must: a slot
/// it does not serve (or that is frozen), or a lease attached to a key of
/// another slot.
pub(crate) fn check_write(batch: &StateBatch<'_>, op: &CommandOp) -> Option<Rejection> {
    if let CommandOp::Txn(txn) = op {
        for o in txn.success.iter().chain(&txn.failure) {
            if let TxnOp::Put { key, lease, .. } = o
                && let Some(LeaseHome::Slot(s)) = lease_home(*lease)
                && s != slot_of(key)
            {
                return Some(Rejection::BadSlots(format!(
                    "lease {lease} lives in slot {s}, key {:?} in slot {}",
                    String::from_utf8_lossy(key),
                    slot_of(key)
                )));
            }
        }
    }
    let own = batch.ownership()?;
    written_slots(op).into_iter().find_map(|s| refuse(&own, s))
}

/// The outcome of a slot command: the new revision offset to set (for an
/// import commit), or a refusal.
pub(crate) enum SlotOutcome {
    Applied,
    /// Applied, and the revision offset becomes this (before the entry's
    /// revision is taken).
    Lifted(u64),
    Refused(String),
}

/// Applies `cmd` at log index `index` (revision `index + offset` before
/// this entry). Deterministic: every replica reaches the same outcome.
pub(crate) fn apply(
    batch: &mut StateBatch<'_>,
    group: GroupId,
    index: u64,
    cmd: &SlotCommand,
) -> Result<SlotOutcome, StoreError> {
    if group == palisade_shard::META_GROUP {
        return Ok(SlotOutcome::Refused("the meta group owns no slots".into()));
    }
    let current = batch.ownership();
    let mut own: Ownership = current.as_deref().cloned().unwrap_or_default();
    let refused = |m: String| Ok(SlotOutcome::Refused(m));
    match cmd {
        SlotCommand::Adopt { slots } => {
            let clash = !own.staged.is_empty() && own.staged.intersects(slots);
            if clash || slots.iter().any(|s| own.moved_to.contains_key(&s)) {
                return refused(format!(
                    "cannot adopt {}: some of them are moving",
                    slots.ranges_text()
                ));
            }
            if current.is_some() && own.owned.is_superset(slots) {
                return Ok(SlotOutcome::Applied);
            }
            own.owned.union_with(slots);
        }
        SlotCommand::Freeze { slots, .. } => {
            if current.is_none() {
                return refused("the group has not adopted its slots yet".into());
            }
            if !own.owned.is_superset(slots) {
                return refused(format!(
                    "cannot freeze {}: not all of them are served here",
                    slots.ranges_text()
                ));
            }
            if own.frozen.is_superset(slots) {
                return Ok(SlotOutcome::Applied);
            }
            own.frozen.union_with(slots);
        }
        SlotCommand::Unfreeze { slots, .. } => {
            if !own.frozen.intersects(slots) {
                return Ok(SlotOutcome::Applied);
            }
            own.frozen.subtract(slots);
        }
        SlotCommand::ImportBegin { slots, .. } => {
            if own.owned.is_superset(slots) && current.is_some() {
                // Committed already: a repeated step.
                return Ok(SlotOutcome::Applied);
            }
            if own.owned.intersects(slots) {
                return refused(format!(
                    "cannot import {}: some of them are served here",
                    slots.ranges_text()
                ));
            }
            batch.delete_slots(slots)?;
            own.staged.union_with(slots);
        }
        SlotCommand::ImportChunk { slots, records, .. } => {
            if !own.staged.is_superset(slots) {
                if own.owned.is_superset(slots) {
                    // Committed already: the copy is complete.
                    return Ok(SlotOutcome::Applied);
                }
                return refused(format!(
                    "cannot import into {}: not staged",
                    slots.ranges_text()
                ));
            }
            batch.import_records(
                records
                    .iter()
                    .map(|r| (r.key.clone(), r.value.clone()))
                    .collect(),
            )?;
            return Ok(SlotOutcome::Applied);
        }
        SlotCommand::Handoff { slots, to, .. } => {
            if !own.owned.intersects(slots)
                && slots.iter().all(|s| own.moved_to.get(&s) == Some(to))
            {
                return Ok(SlotOutcome::Applied);
            }
            if current.is_none() || !own.owned.is_superset(slots) {
                return refused(format!(
                    "cannot hand off {}: not all of them are served here",
                    slots.ranges_text()
                ));
            }
            own.owned.subtract(slots);
            own.frozen.subtract(slots);
            for s in slots.iter() {
                own.moved_to.insert(s, *to);
                own.since.remove(&s);
                own.came_from.remove(&s);
            }
        }
        SlotCommand::ImportCommit {
            slots,
            from,
            source_revision,
            ..
        } => {
            if own.owned.is_superset(slots) && current.is_some() {
                return Ok(SlotOutcome::Applied);
            }
            if !own.staged.is_superset(slots) {
                return refused(format!("cannot commit {}: not staged", slots.ranges_text()));
            }
            // This entry's revision must be above every revision the
            // imported data carries.
            let offset = batch
                .rev_offset()
                .max((source_revision + 1).saturating_sub(index));
            let revision = index + offset;
            own.staged.subtract(slots);
            own.owned.union_with(slots);
            for s in slots.iter() {
                own.since.insert(s, revision);
                own.came_from.insert(s, (*from, *source_revision));
                own.moved_to.remove(&s);
            }
            own.epoch += 1;
            batch.set_ownership(own)?;
            if offset != batch.rev_offset() {
                batch.set_rev_offset(offset)?;
            }
            return Ok(SlotOutcome::Lifted(offset));
        }
        SlotCommand::Release { slots, .. } => {
            if own.owned.intersects(slots) {
                return refused(format!(
                    "cannot release {}: still served here",
                    slots.ranges_text()
                ));
            }
            batch.delete_slots(slots)?;
            return Ok(SlotOutcome::Applied);
        }
        SlotCommand::ImportAbort { slots, .. } => {
            if own.owned.intersects(slots) {
                return refused(format!(
                    "cannot abort the import of {}: already served here",
                    slots.ranges_text()
                ));
            }
            batch.delete_slots(slots)?;
            if !own.staged.intersects(slots) {
                return Ok(SlotOutcome::Applied);
            }
            own.staged.subtract(slots);
        }
    }
    own.epoch += 1;
    batch.set_ownership(own)?;
    Ok(SlotOutcome::Applied)
}
