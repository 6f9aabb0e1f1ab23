//! Errors of a Raft group, shaped by what the caller does with them.

use std::sync::Arc;

use palisade_storage::StoreError;
use thiserror::Error;

/// A task or channel that went away (its reason, as a source).
#[derive(Debug, Error)]
#[error("{0}")]
pub struct Gone(pub &'static str);

/// An openraft error kept as the source of ours (shared: one failed round
/// can answer many waiters).
pub type RaftSource = Arc<dyn std::error::Error + Send + Sync>;

use crate::types::{GroupId, NodeId, Rejection};

#[derive(Debug, Error)]
pub enum GroupError {
    /// Redirect: this node does not lead the group. Nothing was applied.
    #[error("node is not the leader of group {group}")]
    NotLeader {
        group: GroupId,
        /// The leader this node knows of, with its address when known.
        leader: Option<(NodeId, Option<String>)>,
    },
    /// Retry later: leadership could not be confirmed by a quorum.
    #[error("group {group} has no quorum: {reason}")]
    NoQuorum { group: GroupId, reason: String },
    /// The write was proposed but did not complete in time; it may still
    /// apply. Safe to retry only with the same request id.
    #[error("outcome of the write to group {group} is unknown (timed out waiting for commit)")]
    UnknownOutcome { group: GroupId },
    /// An `ack = ALL` write committed (durable on a majority) but these
    /// replicas had not applied it within the wait.
    #[error(
        "write to group {group} is committed at revision {revision} but not yet applied on nodes {lagging:?}"
    )]
    NotEverywhere {
        group: GroupId,
        revision: u64,
        lagging: Vec<NodeId>,
    },
    /// The state machine refused the command (on every replica alike).
    #[error("{}", describe(.0))]
    Rejected(Rejection),
    /// The group's Raft instance stopped on this node (e.g. a storage error).
    #[error("group {group} stopped on this node: {source}")]
    Stopped {
        group: GroupId,
        #[source]
        source: RaftSource,
    },
    /// openraft refused or failed `what`.
    #[error("group {group}: {what}: {source}")]
    Raft {
        group: GroupId,
        what: &'static str,
        #[source]
        source: RaftSource,
    },
    /// A write that grows the data was refused: the disk of this node (the
    /// leader), or of too many of the group's voters to commit it, is below
    /// its reserve. Nothing was applied. Reads, deletes and compaction
    /// still work; the alarm clears by itself once space is freed.
    #[error(
        "group {group}: disk full at replicas {replicas:?}; only reads, deletes and compaction are taken until space is freed"
    )]
    DiskFull {
        group: GroupId,
        /// The replicas (member ids) whose disk is full.
        replicas: Vec<NodeId>,
    },
    /// A membership change could not be carried out as asked.
    #[error("group {group}: {reason}")]
    Membership { group: GroupId, reason: String },
    #[error(transparent)]
    Storage(#[from] StoreError),
}

fn describe(r: &Rejection) -> String {
    match r {
        Rejection::StaleFence { lock, current: 0 } => format!(
            "fenced write refused: lock {:?} is not held (released, or its holder's lease ended)",
            String::from_utf8_lossy(lock)
        ),
        Rejection::StaleFence { lock, current } => format!(
            "fenced write refused: the fencing token is not lock {:?}'s current token {current}",
            String::from_utf8_lossy(lock)
        ),
        Rejection::LeaseNotFound { id } => format!("lease {id} not found (expired or revoked)"),
        Rejection::LockHeld { lease, token } => {
            format!("lock is held with lease {lease} (token {token})")
        }
        Rejection::NotLockHolder { current: 0 } => "unlock refused: the lock is not held".into(),
        Rejection::NotLockHolder { current } => {
            format!("unlock refused: the lock's current token is {current}")
        }
        Rejection::NotOwned {
            slot,
            moved_to: Some(g),
        } => format!("slot {slot} is not served by this group (it moved to group {g})"),
        Rejection::NotOwned {
            slot,
            moved_to: None,
        } => format!("slot {slot} is not served by this group"),
        Rejection::Frozen { slot } => {
            format!("slot {slot} is moving to another group; retry in a moment")
        }
        Rejection::Map(e) => format!("cluster map change refused: {e}"),
        Rejection::BadSlots(why) => why.clone(),
        Rejection::Pinned { lease, slots } => format!(
            "lease {lease}, granted before the cluster map, holds keys or locks in slots {}: \
             they move once the lease ends (revoke it or let it expire)",
            slots.ranges_text()
        ),
    }
}

/// A copy of the [`GroupError`]s a shared Raft round can end with (a
/// ReadIndex round shared by reads, a batch entry shared by writes), so that
/// every waiter of the round gets its own.
#[derive(Debug, Clone)]
pub(crate) enum SharedError {
    NotLeader(Option<(NodeId, Option<String>)>),
    NoQuorum(String),
    UnknownOutcome,
    Stopped(RaftSource),
    Raft(&'static str, RaftSource),
    Other(Arc<str>),
}

impl SharedError {
    pub(crate) fn from_group_error(e: &GroupError) -> Self {
        match e {
            GroupError::NotLeader { leader, .. } => SharedError::NotLeader(leader.clone()),
            GroupError::NoQuorum { reason, .. } => SharedError::NoQuorum(reason.clone()),
            GroupError::UnknownOutcome { .. } => SharedError::UnknownOutcome,
            GroupError::Stopped { source, .. } => SharedError::Stopped(source.clone()),
            GroupError::Raft { what, source, .. } => SharedError::Raft(what, source.clone()),
            other => SharedError::Other(other.to_string().into()),
        }
    }

    pub(crate) fn into_group_error(self, group: GroupId) -> GroupError {
        match self {
            SharedError::NotLeader(leader) => GroupError::NotLeader { group, leader },
            SharedError::NoQuorum(reason) => GroupError::NoQuorum { group, reason },
            SharedError::UnknownOutcome => GroupError::UnknownOutcome { group },
            SharedError::Stopped(source) => GroupError::Stopped { group, source },
            SharedError::Raft(what, source) => GroupError::Raft {
                group,
                what,
                source,
            },
            SharedError::Other(message) => GroupError::Membership {
                group,
                reason: message.to_string(),
            },
        }
    }
}
