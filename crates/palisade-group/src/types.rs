//! openraft type configuration and the replicated command format.
//!
//! Every write is a [`Command`]: an optional request id (for at-most-once
//! application of retried writes) and a [`CommandOp`]. A plain put or
//! delete is a transaction with no compares and a single operation, so the
//! state machine has one write path for client data.
//!
//! # Compatibility
//!
//! Commands live in Raft logs and snapshots on disk, encoded with bincode,
//! which names enum variants by position and struct fields by order. So:
//! new variants go at the *end* of an enum, and no field is ever added to,
//! removed from or reordered in a struct that is already stored. (This is
//! why the epoch-free `LeaseGrant` and the group-embedding lease ids of
//! earlier versions are still understood.)

use std::io::Cursor;

use palisade_storage::KeyRecord;
use serde::{Deserialize, Serialize};

/// A Raft member id: the id of one replica of one group (see
/// `palisade_shard::map` on replica ids). Replicas created at bootstrap
/// have their node's id.
pub type NodeId = u64;

pub use palisade_shard::{GroupId, META_GROUP, ReplicaId};

openraft::declare_raft_types!(
    /// Types palisade plugs into openraft.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = crate::runtime::PalisadeRuntime,
);

/// A Raft instance of one group.
pub type Raft = openraft::Raft<TypeConfig>;

/// Identifies a client write so that retries apply at most once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestId {
    pub client_id: u64,
    pub seq: u64,
    /// Results of this client's writes below this seq may be forgotten.
    pub first_incomplete_seq: u64,
}

/// A replicated write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub request_id: Option<RequestId>,
    pub op: CommandOp,
}

impl Command {
    /// A client transaction.
    pub fn txn(request_id: Option<RequestId>, txn: Txn) -> Self {
        Self {
            request_id,
            op: CommandOp::Txn(txn),
        }
    }
}

/// What a replicated write does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOp {
    /// A client transaction (plain puts and deletes included).
    Txn(Txn),
    /// Drop history below `revision` (MVCC compaction). Succeeds only when
    /// it moves the compaction point forward.
    Compact { revision: u64 },
    /// Create a lease; its id is `group << 48 | this entry's index`.
    LeaseGrant { ttl_ms: u64 },
    /// End a lease (revoked by a client, or expired by the leader's clock):
    /// delete its keys and release its locks.
    LeaseRevoke { id: u64 },
    /// Take lock `name` with `lease`, if it is free (or already held with
    /// that lease). The fencing token is this entry's index.
    Lock { name: Vec<u8>, lease: u64 },
    /// Release lock `name` if `token` is its current token.
    Unlock { name: Vec<u8>, token: u64 },
    /// Several client transactions proposed as one entry (see
    /// `write_batch`): they apply in order at this entry's revision, each
    /// with its own request id and result. The proposer only batches
    /// transactions on pairwise disjoint keys (fence locks included), so no
    /// two versions of a key ever share a revision.
    Batch(Vec<Command>),
    /// Create a lease living with hash slot `slot` (it moves with the
    /// slot); its id is `palisade_shard::lease_id(slot, revision)`.
    LeaseGrantIn { ttl_ms: u64, slot: u16 },
    /// A change to the cluster map (meta group only).
    Map(palisade_shard::MapCommand),
    /// A change to the slots this group serves (data groups only).
    Slots(SlotCommand),
}

impl CommandOp {
    /// Whether applying it adds data (a put, a lease, a lock), so that a
    /// full disk refuses it; deletes, compaction, revocations and the
    /// cluster's own bookkeeping shrink the data or are small, and go on.
    pub fn grows_data(&self) -> bool {
        match self {
            CommandOp::Txn(t) => t
                .success
                .iter()
                .chain(&t.failure)
                .any(|op| matches!(op, TxnOp::Put { .. })),
            CommandOp::LeaseGrant { .. }
            | CommandOp::LeaseGrantIn { .. }
            | CommandOp::Lock { .. } => true,
            CommandOp::Batch(cmds) => cmds.iter().any(|c| c.op.grows_data()),
            CommandOp::Compact { .. }
            | CommandOp::LeaseRevoke { .. }
            | CommandOp::Unlock { .. }
            | CommandOp::Map(_)
            | CommandOp::Slots(_) => false,
        }
    }
}

/// Bits of a lease id (of an earlier version) below the group id.
pub const LEASE_GROUP_SHIFT: u32 = 48;

/// One record of the state tree, as a slot move copies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// Changes to the hash slots a data group serves, each applied at one log
/// index on every replica. They are the group-side half of a slot move (the
/// meta group records the other half, see `palisade_shard::MovePhase`), and
/// each is idempotent, so a coordinator that restarts repeats the current
/// step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SlotCommand {
    /// Serve `slots` from revision 0 on (a group created at bootstrap, or
    /// one written before the cluster map, taking its static slots).
    Adopt { slots: palisade_shard::SlotSet },
    /// Refuse writes to owned `slots` while move `move_id` copies them.
    Freeze {
        move_id: u64,
        slots: palisade_shard::SlotSet,
    },
    /// Lift a freeze (the move was rolled back).
    Unfreeze {
        move_id: u64,
        slots: palisade_shard::SlotSet,
    },
    /// Start copy attempt `attempt` (numbered by the cluster map) of
    /// `slots`: drop any records of them left by an earlier attempt, and
    /// stage them (present, not served).
    ImportBegin {
        move_id: u64,
        attempt: u64,
        slots: palisade_shard::SlotSet,
    },
    /// Chunk `seq` (from 0) of the attempt: records of staged slots (as
    /// `StateTree::export_slots` gives them).
    ImportChunk {
        move_id: u64,
        attempt: u64,
        seq: u64,
        slots: palisade_shard::SlotSet,
        records: Vec<SlotRecord>,
    },
    /// Stop serving `slots` (reads too) because group `to` takes them; the
    /// data stays until `Release`.
    Handoff {
        move_id: u64,
        slots: palisade_shard::SlotSet,
        to: GroupId,
    },
    /// Serve the staged `slots`, which group `from` handed off at its
    /// revision `source_revision`: from here on this group's revisions are
    /// above every revision the slots' data carries.
    ///
    /// Refused unless the staged copy is attempt `attempt` with exactly
    /// `chunks` chunks, as the cluster map recorded when that copy ended.
    ImportCommit {
        move_id: u64,
        attempt: u64,
        chunks: u64,
        slots: palisade_shard::SlotSet,
        from: GroupId,
        source_revision: u64,
    },
    /// Delete the data of `slots`, handed off earlier.
    Release {
        move_id: u64,
        slots: palisade_shard::SlotSet,
    },
    /// Drop the staged records of `slots` (the move was rolled back).
    ImportAbort {
        move_id: u64,
        slots: palisade_shard::SlotSet,
    },
}

impl SlotCommand {
    /// A one-line account for logs: the step, its move and how many slots.
    pub fn describe(&self) -> String {
        let (name, id, slots) = match self {
            SlotCommand::Adopt { slots } => ("adopt", 0, slots),
            SlotCommand::Freeze { move_id, slots } => ("freeze", *move_id, slots),
            SlotCommand::Unfreeze { move_id, slots } => ("unfreeze", *move_id, slots),
            SlotCommand::ImportBegin {
                move_id,
                attempt,
                slots,
            } => {
                return format!(
                    "import-begin move {move_id} attempt {attempt} slots {}",
                    slots.len()
                );
            }
            SlotCommand::ImportChunk {
                move_id,
                attempt,
                seq,
                records,
                ..
            } => {
                return format!(
                    "import-chunk move {move_id} attempt {attempt} chunk {seq} records {}",
                    records.len()
                );
            }
            SlotCommand::Handoff { move_id, slots, .. } => ("handoff", *move_id, slots),
            SlotCommand::ImportCommit {
                move_id,
                attempt,
                chunks,
                slots,
                ..
            } => {
                return format!(
                    "import-commit move {move_id} attempt {attempt} chunks {chunks} slots {}",
                    slots.len()
                );
            }
            SlotCommand::Release { move_id, slots } => ("release", *move_id, slots),
            SlotCommand::ImportAbort { move_id, slots } => ("import-abort", *move_id, slots),
        };
        format!("{name} move {id} slots {}", slots.len())
    }
}

/// A fenced write's fence: the lock whose current token it must carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    pub lock: Vec<u8>,
    pub token: u64,
}

/// Why the state machine refused a command (every replica refuses alike).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rejection {
    /// The fence's token is not the lock's current one (0: not held).
    StaleFence {
        lock: Vec<u8>,
        current: u64,
    },
    LeaseNotFound {
        id: u64,
    },
    /// The lock is held with another lease.
    LockHeld {
        lease: u64,
        token: u64,
    },
    /// Unlock with a token that is not the lock's current one.
    NotLockHolder {
        current: u64,
    },
    /// This group does not serve the slot (any more, or yet).
    NotOwned {
        slot: u16,
        moved_to: Option<GroupId>,
    },
    /// The slot is being moved to another group: writes wait for the move.
    Frozen {
        slot: u16,
    },
    /// The cluster map refused the change.
    Map(palisade_shard::MapError),
    /// A slot command that does not fit the group's state.
    BadSlots(String),
    /// These slots hold keys or locks of lease `lease`, granted before the
    /// cluster map (homed in this group): they cannot move until it ends.
    Pinned {
        lease: u64,
        slots: palisade_shard::SlotSet,
    },
}

/// If every compare holds, apply `success`, else `failure`. With a fence,
/// nothing applies unless the fence's token is its lock's current one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<TxnOp>,
    pub failure: Vec<TxnOp>,
    pub fence: Option<Fence>,
}

impl Txn {
    /// An unconditional single operation.
    pub fn single(op: TxnOp) -> Self {
        Self {
            compares: Vec::new(),
            success: vec![op],
            failure: Vec::new(),
            fence: None,
        }
    }

    /// Every key the transaction touches.
    pub fn keys(&self) -> impl Iterator<Item = &[u8]> {
        let ops = self.success.iter().chain(&self.failure).map(TxnOp::key);
        let fence = self.fence.iter().map(|f| f.lock.as_slice());
        self.compares
            .iter()
            .map(|c| c.key.as_slice())
            .chain(ops)
            .chain(fence)
    }
}

/// One operation inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOp {
    /// `lease`: attach the key to this lease (0: none).
    Put {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        lease: u64,
    },
    Delete {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    Get {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
}

impl TxnOp {
    pub fn key(&self) -> &[u8] {
        match self {
            TxnOp::Put { key, .. } | TxnOp::Delete { key } | TxnOp::Get { key } => key,
        }
    }
}

/// A condition on a key's current record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub op: CompareOp,
    pub target: CompareTarget,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Less,
    Greater,
}

/// What a compare looks at, with the operand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
    Version(u64),
    ModRevision(u64),
    CreateRevision(u64),
    /// Only `Equal` and `NotEqual` are meaningful (validated at the edge).
    Exists(bool),
}

impl Compare {
    /// Evaluates the compare against `record` (`None`: the key is absent).
    ///
    /// As in etcd, an absent key has version, create and mod revision 0, and
    /// any value compare against it fails.
    pub fn holds(&self, record: Option<&KeyRecord>) -> bool {
        use std::cmp::Ordering;
        let ord = match (&self.target, record) {
            (CompareTarget::Value(_), None) => return false,
            (CompareTarget::Value(v), Some(r)) => r.value.as_slice().cmp(v.as_slice()),
            (CompareTarget::Version(v), r) => r.map_or(0, |r| r.version).cmp(v),
            (CompareTarget::ModRevision(v), r) => r.map_or(0, |r| r.mod_revision).cmp(v),
            (CompareTarget::CreateRevision(v), r) => r.map_or(0, |r| r.create_revision).cmp(v),
            (CompareTarget::Exists(want), r) => {
                let same = r.is_some() == *want;
                return match self.op {
                    CompareOp::Equal => same,
                    CompareOp::NotEqual => !same,
                    CompareOp::Less | CompareOp::Greater => false,
                };
            }
        };
        match self.op {
            CompareOp::Equal => ord == Ordering::Equal,
            CompareOp::NotEqual => ord != Ordering::Equal,
            CompareOp::Less => ord == Ordering::Less,
            CompareOp::Greater => ord == Ordering::Greater,
        }
    }
}

/// What applying an entry produced. Failed compares are a *result*, not an
/// error: every replica reaches the same one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    /// The entry's log index: the revision of the write.
    pub revision: u64,
    pub succeeded: bool,
    /// One result per operation of the branch that ran.
    pub results: Vec<OpResult>,
    /// Set when the command was refused; nothing else changed.
    pub rejected: Option<Rejection>,
    /// For a [`CommandOp::Batch`]: one result per command, in order.
    pub batch: Vec<CommandResult>,
}

/// The result of one transaction operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    Put {
        prev: Option<KeyRecord>,
    },
    Delete {
        prev: Option<KeyRecord>,
    },
    Get {
        record: Option<KeyRecord>,
    },
    LeaseGranted {
        id: u64,
        ttl_ms: u64,
    },
    LockAcquired {
        token: u64,
        term: u64,
    },
    /// What an applied map command created.
    Map(palisade_shard::MapResult),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(value: &[u8], version: u64) -> KeyRecord {
        KeyRecord {
            value: value.to_vec(),
            create_revision: 3,
            mod_revision: 7,
            version,
            lease: 0,
        }
    }

    fn cmp(op: CompareOp, target: CompareTarget) -> Compare {
        Compare {
            key: b"k".to_vec(),
            op,
            target,
        }
    }

    #[test]
    fn compares_follow_etcd_semantics() {
        let r = rec(b"b", 2);
        use CompareOp::*;
        use CompareTarget::*;
        assert!(cmp(Equal, Value(b"b".to_vec())).holds(Some(&r)));
        assert!(cmp(Greater, Value(b"a".to_vec())).holds(Some(&r)));
        assert!(
            !cmp(Equal, Value(b"b".to_vec())).holds(None),
            "value compare on absent key fails"
        );
        assert!(!cmp(NotEqual, Value(b"b".to_vec())).holds(None));
        assert!(
            cmp(Equal, Version(0)).holds(None),
            "absent key has version 0"
        );
        assert!(cmp(Less, Version(3)).holds(Some(&r)));
        assert!(cmp(Equal, ModRevision(7)).holds(Some(&r)));
        assert!(cmp(Equal, CreateRevision(3)).holds(Some(&r)));
        assert!(cmp(Equal, Exists(true)).holds(Some(&r)));
        assert!(cmp(Equal, Exists(false)).holds(None));
        assert!(cmp(NotEqual, Exists(true)).holds(None));
        assert!(!cmp(Less, Exists(true)).holds(Some(&r)));
    }
}
