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

use palisade_shard::{LeaseHome, Slot, SlotSet, lease_home, slot_of};
use palisade_storage::{ImportProgress, Ownership, StateBatch, StoreError};

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
    /// Refused: these slots hold records of a lease from before the map.
    Pinned {
        lease: u64,
        slots: SlotSet,
    },
}

impl SlotOutcome {
    pub(crate) fn describe(&self) -> String {
        match self {
            SlotOutcome::Applied => "applied".into(),
            SlotOutcome::Lifted(offset) => format!("committed, revision offset {offset}"),
            SlotOutcome::Refused(why) => format!("refused: {why}"),
            SlotOutcome::Pinned { lease, slots } => {
                format!("refused: lease {lease} pins {}", slots.ranges_text())
            }
        }
    }
}

/// What a slot command does to a group, decided from its ownership record
/// alone (so every replica decides the same, and tests need no storage).
#[derive(Debug, PartialEq)]
pub(crate) enum Decision {
    /// Nothing changes (a repeated step, or one of a move that is over
    /// here); the command succeeds.
    Unchanged,
    Refused(String),
    Change(Box<Effect>),
}

/// The changes a command makes, in the order they are carried out.
#[derive(Debug, PartialEq)]
pub(crate) struct Effect {
    /// Delete the records of these slots first.
    pub(crate) delete: Option<SlotSet>,
    /// Then write the command's records (an import chunk).
    pub(crate) import: bool,
    /// Then store this record.
    pub(crate) ownership: Ownership,
    /// And raise the revision offset to this (an import commit).
    pub(crate) offset: Option<u64>,
}

impl Effect {
    fn record(ownership: Ownership) -> Self {
        Self {
            delete: None,
            import: false,
            ownership,
            offset: None,
        }
    }
}

/// The move a command belongs to (0: none, an adoption).
fn move_of(cmd: &SlotCommand) -> u64 {
    match cmd {
        SlotCommand::Adopt { .. } => 0,
        SlotCommand::Freeze { move_id, .. }
        | SlotCommand::Unfreeze { move_id, .. }
        | SlotCommand::ImportBegin { move_id, .. }
        | SlotCommand::ImportChunk { move_id, .. }
        | SlotCommand::Handoff { move_id, .. }
        | SlotCommand::ImportCommit { move_id, .. }
        | SlotCommand::Release { move_id, .. }
        | SlotCommand::ImportAbort { move_id, .. } => *move_id,
    }
}

/// Decides what `cmd`, at log index `index` with revision offset `offset`,
/// does to a group whose record is `current` (`None`: a group from before
/// the cluster map, serving every key).
///
/// Besides the phase checks, three fences keep a coordinator that lost its
/// leadership (and acts on an old map) from undoing a newer one's work:
/// a move that is over here (`fence`) ignores every later command of it;
/// an import takes chunks only of its own attempt, in order, and commits
/// only with the attempt and chunk count the map recorded; and a hand-off
/// needs the slots frozen by the same move.
pub(crate) fn decide(
    current: Option<&Ownership>,
    cmd: &SlotCommand,
    index: u64,
    offset: u64,
) -> Decision {
    let refused = |m: String| Decision::Refused(m);
    let Some(cur) = current else {
        return match cmd {
            SlotCommand::Adopt { slots } => {
                Decision::Change(Box::new(Effect::record(Ownership::of(slots.clone()))))
            }
            // Undoing a move that never reached this group: nothing to undo.
            SlotCommand::Unfreeze { .. } | SlotCommand::ImportAbort { .. } => Decision::Unchanged,
            _ => refused("the group has not adopted its slots yet".into()),
        };
    };
    let id = move_of(cmd);
    if id != 0 && id <= cur.fence {
        return Decision::Unchanged;
    }
    let mut own = cur.clone();
    own.epoch += 1;
    match cmd {
        SlotCommand::Adopt { slots } => {
            let clash = own.staged.intersects(slots);
            if clash || slots.iter().any(|s| own.moved_to.contains_key(&s)) {
                return refused(format!(
                    "cannot adopt {}: some of them are moving",
                    slots.ranges_text()
                ));
            }
            if own.owned.is_superset(slots) {
                return Decision::Unchanged;
            }
            own.owned.union_with(slots);
            Decision::Change(Box::new(Effect::record(own)))
        }
        SlotCommand::Freeze { move_id, slots } => {
            if !own.owned.is_superset(slots) {
                return refused(format!(
                    "cannot freeze {}: not all of them are served here",
                    slots.ranges_text()
                ));
            }
            if !own.frozen.is_empty() && own.freeze_move != *move_id {
                return refused(format!("slots here are frozen by move {}", own.freeze_move));
            }
            if own.frozen.is_superset(slots) {
                return Decision::Unchanged;
            }
            own.frozen.union_with(slots);
            own.freeze_move = *move_id;
            Decision::Change(Box::new(Effect::record(own)))
        }
        SlotCommand::Unfreeze { move_id, slots } => {
            // Sent only once the map records the move as aborting: the
            // move is over here either way.
            if own.freeze_move == *move_id {
                own.frozen.subtract(slots);
                if own.frozen.is_empty() {
                    own.freeze_move = 0;
                }
            }
            own.fence = own.fence.max(*move_id);
            Decision::Change(Box::new(Effect::record(own)))
        }
        SlotCommand::ImportBegin {
            move_id,
            attempt,
            slots,
        } => {
            if own.owned.intersects(slots) {
                return refused(format!(
                    "cannot import {}: some of them are served here",
                    slots.ranges_text()
                ));
            }
            let mut delete = slots.clone();
            if let Some(p) = own.import {
                if (p.move_id, p.attempt) > (*move_id, *attempt) {
                    return refused(format!(
                        "copy attempt {attempt} of move {move_id} is stale (attempt {} of move {} is under way)",
                        p.attempt, p.move_id
                    ));
                }
                if p.move_id != *move_id {
                    // An older move left its staging behind: drop it too.
                    delete.union_with(&own.staged);
                    own.staged = SlotSet::default();
                }
            }
            own.staged.union_with(slots);
            own.import = Some(ImportProgress {
                move_id: *move_id,
                attempt: *attempt,
                chunks: 0,
            });
            Decision::Change(Box::new(Effect {
                delete: Some(delete),
                import: false,
                ownership: own,
                offset: None,
            }))
        }
        SlotCommand::ImportChunk {
            move_id,
            attempt,
            seq,
            slots,
            records,
        } => {
            let Some(p) = own.import.as_mut() else {
                return refused(format!("no copy of move {move_id} is under way here"));
            };
            if (p.move_id, p.attempt) != (*move_id, *attempt) {
                return refused(format!(
                    "chunk of copy attempt {attempt} of move {move_id}, but attempt {} of move {} is under way",
                    p.attempt, p.move_id
                ));
            }
            if *seq < p.chunks {
                // A proposal retried after its first try was applied.
                return Decision::Unchanged;
            }
            if *seq > p.chunks {
                return refused(format!("chunk {seq} arrived before chunk {}", p.chunks));
            }
            if !own.staged.is_superset(slots) {
                return refused(format!(
                    "cannot import into {}: not staged",
                    slots.ranges_text()
                ));
            }
            let raw: Vec<_> = records
                .iter()
                .map(|r| (r.key.clone(), r.value.clone()))
                .collect();
            if let Some(why) = StateBatch::check_import(slots, &raw) {
                return refused(format!("the chunk carries {why}"));
            }
            p.chunks += 1;
            Decision::Change(Box::new(Effect {
                delete: None,
                import: true,
                ownership: own,
                offset: None,
            }))
        }
        SlotCommand::Handoff { move_id, slots, to } => {
            if !own.owned.intersects(slots)
                && slots.iter().all(|s| own.moved_to.get(&s) == Some(to))
            {
                return Decision::Unchanged;
            }
            if !own.frozen.is_superset(slots) || own.freeze_move != *move_id {
                return refused(format!(
                    "cannot hand off {}: move {move_id} has not frozen them here",
                    slots.ranges_text()
                ));
            }
            own.owned.subtract(slots);
            own.frozen.subtract(slots);
            if own.frozen.is_empty() {
                own.freeze_move = 0;
            }
            for s in slots.iter() {
                own.moved_to.insert(s, *to);
                own.since.remove(&s);
                own.came_from.remove(&s);
            }
            Decision::Change(Box::new(Effect::record(own)))
        }
        SlotCommand::ImportCommit {
            move_id,
            attempt,
            chunks,
            slots,
            from,
            source_revision,
        } => {
            let expected = Some(ImportProgress {
                move_id: *move_id,
                attempt: *attempt,
                chunks: *chunks,
            });
            if own.import != expected || !own.staged.is_superset(slots) {
                return refused(format!(
                    "cannot commit {}: the staged copy is {:?}, the map's is attempt {attempt} with {chunks} chunks",
                    slots.ranges_text(),
                    own.import
                ));
            }
            // This entry's revision must be above every revision the
            // imported data carries.
            let offset = offset.max((source_revision + 1).saturating_sub(index));
            let revision = index + offset;
            own.staged.subtract(slots);
            own.import = None;
            own.owned.union_with(slots);
            for s in slots.iter() {
                own.since.insert(s, revision);
                own.came_from.insert(s, (*from, *source_revision));
                own.moved_to.remove(&s);
            }
            own.fence = own.fence.max(*move_id);
            Decision::Change(Box::new(Effect {
                delete: None,
                import: false,
                ownership: own,
                offset: Some(offset),
            }))
        }
        SlotCommand::Release { move_id, slots } => {
            if own.owned.intersects(slots) || own.staged.intersects(slots) {
                return refused(format!(
                    "cannot release {}: still served or being imported here",
                    slots.ranges_text()
                ));
            }
            own.fence = own.fence.max(*move_id);
            Decision::Change(Box::new(Effect {
                delete: Some(slots.clone()),
                import: false,
                ownership: own,
                offset: None,
            }))
        }
        SlotCommand::ImportAbort { move_id, slots } => {
            own.fence = own.fence.max(*move_id);
            let ours = own.import.is_some_and(|p| p.move_id == *move_id);
            if !ours {
                // Another move's staging (or none): leave it be.
                return Decision::Change(Box::new(Effect::record(own)));
            }
            if own.owned.intersects(slots) {
                return refused(format!(
                    "cannot abort the import of {}: already served here",
                    slots.ranges_text()
                ));
            }
            let dropped = own.staged.clone();
            own.staged = SlotSet::default();
            own.import = None;
            Decision::Change(Box::new(Effect {
                delete: Some(dropped),
                import: false,
                ownership: own,
                offset: None,
            }))
        }
    }
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
    let effect = match decide(current.as_deref(), cmd, index, batch.rev_offset()) {
        Decision::Unchanged => return Ok(SlotOutcome::Applied),
        Decision::Refused(why) => return Ok(SlotOutcome::Refused(why)),
        Decision::Change(effect) => effect,
    };
    // Keys and locks of a lease granted before the cluster map cannot
    // move (the lease, homed in this group, would not follow them); their
    // slots move once it ends.
    if let SlotCommand::Freeze { slots, .. } = cmd
        && let Some((lease, slots)) = batch.legacy_leases_in(slots)?
    {
        return Ok(SlotOutcome::Pinned { lease, slots });
    }
    if let Some(slots) = &effect.delete {
        let deleted = batch.delete_slots(slots)?;
        tracing::debug!(group, deleted, "slot records deleted");
    }
    if effect.import
        && let SlotCommand::ImportChunk { records, .. } = cmd
    {
        batch.import_records(
            records
                .iter()
                .map(|r| (r.key.clone(), r.value.clone()))
                .collect(),
        )?;
    }
    batch.set_ownership(effect.ownership)?;
    match effect.offset {
        Some(offset) => {
            if offset != batch.rev_offset() {
                batch.set_rev_offset(offset)?;
            }
            Ok(SlotOutcome::Lifted(offset))
        }
        None => Ok(SlotOutcome::Applied),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(slots: &[Slot]) -> SlotSet {
        SlotSet::of(slots.iter().copied())
    }

    /// Applies `cmd` to `own` as the state machine would (records aside);
    /// panics on a refusal.
    fn step(own: &mut Ownership, cmd: SlotCommand) -> Decision {
        let d = decide(Some(own), &cmd, 100, 0);
        if let Decision::Change(e) = &d {
            *own = e.ownership.clone();
        }
        d
    }

    fn begin(move_id: u64, attempt: u64) -> SlotCommand {
        SlotCommand::ImportBegin {
            move_id,
            attempt,
            slots: s(&[7]),
        }
    }

    fn chunk(move_id: u64, attempt: u64, seq: u64) -> SlotCommand {
        SlotCommand::ImportChunk {
            move_id,
            attempt,
            seq,
            slots: s(&[7]),
            records: Vec::new(),
        }
    }

    fn commit(move_id: u64, attempt: u64, chunks: u64) -> SlotCommand {
        SlotCommand::ImportCommit {
            move_id,
            attempt,
            chunks,
            slots: s(&[7]),
            from: 1,
            source_revision: 500,
        }
    }

    fn refused(d: &Decision) -> bool {
        matches!(d, Decision::Refused(_))
    }

    #[test]
    fn a_stale_copy_attempt_cannot_wipe_or_mix_into_a_newer_one() {
        // What a deposed coordinator did in simulation seed 5071: its
        // ImportBegin landed between the new coordinator's copy and its
        // commit, which then committed an empty copy.
        let mut target = Ownership::of(s(&[1]));
        assert!(!refused(&step(&mut target, begin(2, 2))));
        assert!(!refused(&step(&mut target, chunk(2, 2, 0))));
        assert!(refused(&step(&mut target, begin(2, 1))), "older attempt");
        assert!(refused(&step(&mut target, chunk(2, 1, 1))), "older attempt");
        assert_eq!(
            step(&mut target, chunk(2, 2, 0)),
            Decision::Unchanged,
            "a chunk applied twice counts once"
        );
        assert!(refused(&step(&mut target, chunk(2, 2, 2))), "a gap");
        assert!(
            refused(&step(&mut target, commit(2, 2, 2))),
            "the map recorded another chunk count"
        );
        assert!(refused(&step(&mut target, commit(2, 1, 1))));
        let d = step(&mut target, commit(2, 2, 1));
        match d {
            Decision::Change(e) => assert_eq!(e.offset, Some(401), "revisions jump past 500"),
            other => panic!("{other:?}"),
        }
        assert!(target.serves(7) && target.import.is_none());
        // The move is over here: its late commands change nothing.
        assert_eq!(step(&mut target, begin(2, 3)), Decision::Unchanged);
        assert_eq!(step(&mut target, commit(2, 2, 1)), Decision::Unchanged);
        assert!(target.serves(7));
    }

    #[test]
    fn a_newer_attempt_restarts_the_copy() {
        let mut target = Ownership::of(SlotSet::default());
        step(&mut target, begin(3, 1));
        step(&mut target, chunk(3, 1, 0));
        match step(&mut target, begin(3, 2)) {
            Decision::Change(e) => assert_eq!(e.delete, Some(s(&[7])), "the old copy goes"),
            other => panic!("{other:?}"),
        }
        assert!(refused(&step(&mut target, commit(3, 1, 1))));
        assert!(!refused(&step(&mut target, commit(3, 2, 0))));
    }

    #[test]
    fn only_the_move_that_froze_slots_hands_them_off_and_a_rolled_back_move_stays_over() {
        let mut source = Ownership::of(s(&[7, 8]));
        let freeze = |m| SlotCommand::Freeze {
            move_id: m,
            slots: s(&[7]),
        };
        let handoff = |m| SlotCommand::Handoff {
            move_id: m,
            slots: s(&[7]),
            to: 2,
        };
        assert!(refused(&step(&mut source, handoff(4))), "not frozen");
        step(&mut source, freeze(4));
        assert!(refused(&step(&mut source, freeze(5))), "frozen by move 4");
        assert!(refused(&step(&mut source, handoff(5))), "another move");
        // Rolled back: the source writes again, and a late freeze or
        // hand-off of that move does nothing.
        step(
            &mut source,
            SlotCommand::Unfreeze {
                move_id: 4,
                slots: s(&[7]),
            },
        );
        assert!(source.writable(7));
        assert_eq!(step(&mut source, freeze(4)), Decision::Unchanged);
        assert_eq!(step(&mut source, handoff(4)), Decision::Unchanged);
        assert!(source.writable(7));
        // A later move goes through.
        step(&mut source, freeze(6));
        assert!(!refused(&step(&mut source, handoff(6))));
        assert!(!source.serves(7) && source.serves(8));
        assert_eq!(step(&mut source, handoff(6)), Decision::Unchanged, "repeat");
    }

    #[test]
    fn release_never_deletes_slots_being_imported_back() {
        let mut g = Ownership::of(SlotSet::default());
        g.moved_to.insert(7, 2);
        step(&mut g, begin(9, 1));
        let release = SlotCommand::Release {
            move_id: 8,
            slots: s(&[7]),
        };
        assert!(refused(&step(&mut g, release)));
    }

    #[test]
    fn an_abort_of_another_move_leaves_the_staging_alone() {
        let mut g = Ownership::of(SlotSet::default());
        step(&mut g, begin(9, 1));
        let abort = |m| SlotCommand::ImportAbort {
            move_id: m,
            slots: s(&[7]),
        };
        match step(&mut g, abort(8)) {
            Decision::Change(e) => assert_eq!(e.delete, None),
            other => panic!("{other:?}"),
        }
        assert!(g.import.is_some());
        match step(&mut g, abort(9)) {
            Decision::Change(e) => assert_eq!(e.delete, Some(s(&[7]))),
            other => panic!("{other:?}"),
        }
        assert!(g.import.is_none() && g.staged.is_empty());
    }

    #[test]
    fn a_group_from_before_the_map_imports_nothing_until_it_adopts() {
        assert!(refused(&decide(None, &begin(1, 1), 10, 0)));
        // A move rolled back before it got anywhere undoes nothing here
        // (and does not get stuck refusing to).
        let unfreeze = SlotCommand::Unfreeze {
            move_id: 1,
            slots: s(&[1]),
        };
        assert_eq!(decide(None, &unfreeze, 10, 0), Decision::Unchanged);
        let adopt = SlotCommand::Adopt { slots: s(&[1, 2]) };
        match decide(None, &adopt, 10, 0) {
            Decision::Change(e) => assert_eq!(e.ownership.owned, s(&[1, 2])),
            other => panic!("{other:?}"),
        }
    }
}
