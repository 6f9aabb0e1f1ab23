//! The server's error type and its single mapping to gRPC statuses.
//!
//! Every refusal a client must act on carries typed data in the status
//! details (an encoded `palisade.v1.ErrorDetail`), so clients decide without
//! parsing messages:
//!
//! | error                          | code                  | detail               | nothing applied? |
//! |--------------------------------|-----------------------|----------------------|------------------|
//! | invalid request                | `INVALID_ARGUMENT`    | —                    | yes              |
//! | unknown group                  | `NOT_FOUND`           | —                    | yes              |
//! | not leader / no quorum         | `UNAVAILABLE`         | `NotLeader` hint     | yes              |
//! | slot served by another group   | `UNAVAILABLE`         | `WrongGroup`         | yes              |
//! | request epoch newer than ours  | `UNAVAILABLE`         | `EpochMismatch`      | yes              |
//! | slot moving (writes paused)    | `UNAVAILABLE`         | `SlotMoving`         | yes              |
//! | read revision not reached      | `UNAVAILABLE`         | `RevisionNotReached` | yes              |
//! | write outcome unknown          | `DEADLINE_EXCEEDED`   | `UnknownOutcome`     | **maybe**        |
//! | ack=ALL not everywhere         | `DEADLINE_EXCEEDED`   | `NotEverywhere`      | no: committed    |
//! | compacted/future revision      | `OUT_OF_RANGE`        | `Compacted`          | yes              |
//! | stale fence                    | `FAILED_PRECONDITION` | `StaleFence`         | yes              |
//! | unlock by a non-holder         | `FAILED_PRECONDITION` | `NotLockHolder`      | yes              |
//! | lock held for the whole wait   | `FAILED_PRECONDITION` | `LockHeld`           | yes              |
//! | lease not found                | `NOT_FOUND`           | `LeaseNotFound`      | yes              |
//! | node removed from the cluster  | `UNAVAILABLE`         | `NotLeader`, no hint | yes              |
//! | map change refused             | `FAILED_PRECONDITION` | —                    | yes              |
//! | storage, internal              | `INTERNAL`            | —                    | —                |
//!
//! A status that came back from another node (forwarding) passes through
//! unchanged ([`ServerError::Remote`]).

use palisade_group::{GroupError, Rejection};
use palisade_proto::v1::{
    Compacted, DiskFull, EpochMismatch, ErrorDetail, LeaseNotFound, LockHeld, NotEverywhere,
    NotLeader, NotLockHolder, RevisionNotReached, SlotMoving, StaleFence, UnknownOutcome,
    WrongGroup, error_detail,
};
use palisade_storage::StoreError;
use prost::Message;
use thiserror::Error;
use tonic::{Code, Status};

/// How long a client should wait before retrying a write to a moving slot.
pub const SLOT_MOVING_RETRY_MS: u64 = 50;

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("group {0} does not exist on this cluster")]
    UnknownGroup(u64),
    #[error("node {0} is not in the cluster")]
    UnknownNode(u64),
    /// A read or compaction at a revision the group does not have (any
    /// more, or yet).
    #[error("group {group}: {source}")]
    Revision { group: u64, source: StoreError },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    Group(#[from] GroupError),
    /// The key's slot is served by another group (or by none, a moment
    /// during a move).
    #[error("group {group} does not serve slot {slot}{}", owner.map(|g| format!("; group {g} does")).unwrap_or_default())]
    WrongGroup {
        slot: u16,
        group: u64,
        owner: Option<u64>,
        map_epoch: u64,
    },
    /// The request was routed with a newer epoch of `group` than this node
    /// knows.
    #[error(
        "request routed with epoch {request_epoch} of group {group}; this node knows epoch {current_epoch}"
    )]
    EpochMismatch {
        group: u64,
        request_epoch: u64,
        current_epoch: u64,
    },
    /// The cluster map is not there yet (a new cluster, an upgrade).
    #[error("the cluster map is not ready yet")]
    MapNotReady,
    /// This node was removed from the cluster.
    #[error("node {0} was removed from the cluster; it serves nothing")]
    NodeRemoved(u64),
    /// A lock stayed held by another lease for the whole wait.
    #[error("lock {:?} is held with lease {lease} (token {token}); waited {waited_ms} ms", String::from_utf8_lossy(.name))]
    LockHeld {
        name: Vec<u8>,
        lease: u64,
        token: u64,
        waited_ms: u64,
    },
    /// A read could not reach the revision it needs on any replica asked.
    #[error("group {group}: revision {required} needed, this replica has {current}")]
    RevisionNotReached {
        group: u64,
        required: u64,
        current: u64,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("storage: {0}")]
    Storage(#[from] palisade_storage::StoreError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Another node's answer, passed on as it is.
    #[error("{}", .0.message())]
    Remote(Status),
}

fn with_detail(code: Code, message: String, kind: error_detail::Kind) -> Status {
    let detail = ErrorDetail { kind: Some(kind) }.encode_to_vec();
    Status::with_details(code, message, detail.into())
}

/// An `UNAVAILABLE` status with a leader hint.
pub fn not_leader_status(
    group: u64,
    leader: Option<(u64, Option<String>)>,
    message: String,
) -> Status {
    let (leader_id, leader_addr) = match leader {
        Some((id, addr)) => (id, addr.unwrap_or_default()),
        None => (0, String::new()),
    };
    with_detail(
        Code::Unavailable,
        message,
        error_detail::Kind::NotLeader(NotLeader {
            group_id: group,
            leader_id,
            leader_addr,
        }),
    )
}

/// A `DEADLINE_EXCEEDED` status saying a write may or may not have applied.
pub fn unknown_outcome_status(group: u64, message: String) -> Status {
    with_detail(
        Code::DeadlineExceeded,
        message,
        error_detail::Kind::UnknownOutcome(UnknownOutcome { group_id: group }),
    )
}

impl ServerError {
    /// A storage error met while serving `group`: revision errors become
    /// `OUT_OF_RANGE`, a slot the group does not serve `WrongGroup`, the
    /// rest stay storage errors.
    pub fn from_store(group: u64, e: StoreError) -> Self {
        match e {
            StoreError::Compacted { .. } | StoreError::FutureRevision { .. } => {
                ServerError::Revision { group, source: e }
            }
            StoreError::NotOwned { slot, moved_to } => ServerError::WrongGroup {
                slot,
                group,
                owner: moved_to,
                map_epoch: 0,
            },
            other => ServerError::Storage(other),
        }
    }

    /// The group this error is about, when it is a routing refusal that a
    /// re-route could fix: the slot's new owner.
    pub fn moved_to(&self) -> Option<u64> {
        match self {
            ServerError::WrongGroup { owner, .. } => *owner,
            ServerError::Group(GroupError::Rejected(Rejection::NotOwned { moved_to, .. })) => {
                *moved_to
            }
            _ => None,
        }
    }
}

impl From<ServerError> for Status {
    fn from(e: ServerError) -> Status {
        let msg = e.to_string();
        match e {
            ServerError::InvalidArgument(_) => Status::invalid_argument(msg),
            ServerError::UnknownGroup(_) | ServerError::UnknownNode(_) => Status::not_found(msg),
            ServerError::Remote(status) => status,
            ServerError::MapNotReady => not_leader_status(0, None, msg),
            // Retryable elsewhere: the cluster goes on without this node.
            ServerError::NodeRemoved(_) => not_leader_status(0, None, msg),
            ServerError::WrongGroup {
                slot,
                group,
                owner,
                map_epoch,
            } => with_detail(
                Code::Unavailable,
                msg,
                error_detail::Kind::WrongGroup(WrongGroup {
                    slot: u32::from(slot),
                    group_id: group,
                    owner_group_id: owner.unwrap_or(0),
                    map_epoch,
                }),
            ),
            ServerError::EpochMismatch {
                group,
                request_epoch,
                current_epoch,
            } => with_detail(
                Code::Unavailable,
                msg,
                error_detail::Kind::EpochMismatch(EpochMismatch {
                    group_id: group,
                    request_epoch,
                    current_epoch,
                }),
            ),
            ServerError::LockHeld {
                name, lease, token, ..
            } => with_detail(
                Code::FailedPrecondition,
                msg,
                error_detail::Kind::LockHeld(LockHeld {
                    name,
                    lease_id: lease,
                    token,
                }),
            ),
            ServerError::RevisionNotReached {
                group,
                required,
                current,
            } => with_detail(
                Code::Unavailable,
                msg,
                error_detail::Kind::RevisionNotReached(RevisionNotReached {
                    group_id: group,
                    required_revision: required,
                    current_revision: current,
                }),
            ),
            ServerError::Group(GroupError::NotLeader { group, leader }) => {
                not_leader_status(group, leader, msg)
            }
            ServerError::Group(GroupError::NoQuorum { group, .. })
            | ServerError::Group(GroupError::Stopped { group, .. })
            | ServerError::Group(GroupError::Membership { group, .. }) => {
                not_leader_status(group, None, msg)
            }
            ServerError::Group(GroupError::UnknownOutcome { group }) => {
                unknown_outcome_status(group, msg)
            }
            ServerError::Group(GroupError::NotEverywhere {
                group,
                revision,
                lagging,
            }) => with_detail(
                Code::DeadlineExceeded,
                msg,
                error_detail::Kind::NotEverywhere(NotEverywhere {
                    group_id: group,
                    revision,
                    lagging_node_ids: lagging,
                }),
            ),
            ServerError::Group(GroupError::DiskFull { group, replicas }) => with_detail(
                Code::ResourceExhausted,
                msg,
                error_detail::Kind::DiskFull(DiskFull {
                    group_id: group,
                    node_ids: replicas,
                }),
            ),
            ServerError::Group(GroupError::Rejected(r)) => rejection_status(r, msg),
            ServerError::Revision { group, source } => {
                let (requested, oldest, current) = match source {
                    StoreError::Compacted { requested, oldest } => (requested, oldest, 0),
                    StoreError::FutureRevision { requested, current } => (requested, 0, current),
                    _ => (0, 0, 0),
                };
                with_detail(
                    Code::OutOfRange,
                    msg,
                    error_detail::Kind::Compacted(Compacted {
                        group_id: group,
                        requested_revision: requested,
                        oldest_revision: oldest,
                        current_revision: current,
                    }),
                )
            }
            ServerError::FailedPrecondition(_) | ServerError::Config(_) => {
                Status::failed_precondition(msg)
            }
            ServerError::Group(GroupError::Raft { .. } | GroupError::Storage(_))
            | ServerError::Storage(_)
            | ServerError::Io(_)
            | ServerError::Transport(_) => Status::internal(msg),
        }
    }
}

/// The status of a command the state machine refused (on every replica
/// alike; nothing changed).
fn rejection_status(r: Rejection, msg: String) -> Status {
    match r {
        Rejection::StaleFence { lock, current } => with_detail(
            Code::FailedPrecondition,
            msg,
            error_detail::Kind::StaleFence(StaleFence {
                lock,
                current_token: current,
            }),
        ),
        Rejection::NotLockHolder { current } => with_detail(
            Code::FailedPrecondition,
            msg,
            error_detail::Kind::NotLockHolder(NotLockHolder {
                name: Vec::new(),
                current_token: current,
            }),
        ),
        Rejection::LeaseNotFound { id } => with_detail(
            Code::NotFound,
            msg,
            error_detail::Kind::LeaseNotFound(LeaseNotFound { lease_id: id }),
        ),
        Rejection::LockHeld { lease, token } => with_detail(
            Code::FailedPrecondition,
            msg,
            error_detail::Kind::LockHeld(LockHeld {
                name: Vec::new(),
                lease_id: lease,
                token,
            }),
        ),
        Rejection::NotOwned { slot, moved_to } => with_detail(
            Code::Unavailable,
            msg,
            error_detail::Kind::WrongGroup(WrongGroup {
                slot: u32::from(slot),
                group_id: 0,
                owner_group_id: moved_to.unwrap_or(0),
                map_epoch: 0,
            }),
        ),
        Rejection::Frozen { slot } => with_detail(
            Code::Unavailable,
            msg,
            error_detail::Kind::SlotMoving(SlotMoving {
                slot: u32::from(slot),
                group_id: 0,
                retry_after_ms: SLOT_MOVING_RETRY_MS,
            }),
        ),
        Rejection::Map(palisade_shard::MapError::NodeRemoved(id)) => with_detail(
            Code::FailedPrecondition,
            msg,
            error_detail::Kind::NodeRemoved(palisade_proto::v1::NodeRemoved { node_id: id }),
        ),
        Rejection::Map(_) | Rejection::BadSlots(_) | Rejection::Pinned { .. } => {
            Status::failed_precondition(msg)
        }
    }
}

/// The typed detail of a palisade error status, if it has one.
pub fn error_detail(status: &Status) -> Option<error_detail::Kind> {
    ErrorDetail::decode(status.details()).ok()?.kind
}

/// Whether a status from a forwarded call means the call itself failed in
/// transit (the peer never answered for itself), as opposed to an answer
/// from the peer. Every forwarding path asks this one function.
pub fn is_transport_failure(status: &Status) -> bool {
    error_detail(status).is_none()
        && matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_a_client_acts_on_has_a_typed_detail() {
        let cases: Vec<(ServerError, Code)> = vec![
            (
                ServerError::WrongGroup {
                    slot: 7,
                    group: 1,
                    owner: Some(5),
                    map_epoch: 9,
                },
                Code::Unavailable,
            ),
            (
                ServerError::EpochMismatch {
                    group: 1,
                    request_epoch: 9,
                    current_epoch: 8,
                },
                Code::Unavailable,
            ),
            (
                ServerError::LockHeld {
                    name: b"l".to_vec(),
                    lease: 1,
                    token: 2,
                    waited_ms: 10,
                },
                Code::FailedPrecondition,
            ),
            (
                ServerError::RevisionNotReached {
                    group: 1,
                    required: 9,
                    current: 3,
                },
                Code::Unavailable,
            ),
            (
                ServerError::Group(GroupError::Rejected(Rejection::Frozen { slot: 3 })),
                Code::Unavailable,
            ),
            (
                ServerError::Group(GroupError::Rejected(Rejection::NotOwned {
                    slot: 3,
                    moved_to: None,
                })),
                Code::Unavailable,
            ),
            (
                ServerError::Group(GroupError::Rejected(Rejection::LeaseNotFound { id: 4 })),
                Code::NotFound,
            ),
            (
                ServerError::Group(GroupError::Rejected(Rejection::NotLockHolder {
                    current: 4,
                })),
                Code::FailedPrecondition,
            ),
            (ServerError::MapNotReady, Code::Unavailable),
        ];
        for (err, code) in cases {
            let text = err.to_string();
            let status = Status::from(err);
            assert_eq!(status.code(), code, "{text}");
            assert!(error_detail(&status).is_some(), "{text}: no detail");
            assert!(!is_transport_failure(&status), "{text}");
        }
        assert!(is_transport_failure(&Status::unavailable(
            "tcp connect error"
        )));
        assert!(is_transport_failure(&Status::deadline_exceeded("timeout")));
        assert!(!is_transport_failure(&Status::invalid_argument("bad")));
    }
}
