//! The server's error type and its single mapping to gRPC statuses.
//!
//! Routing errors carry typed data in the status details (an encoded
//! `palisade.v1.ErrorDetail`), so clients reroute without parsing messages:
//!
//! | error                 | code                | detail            |
//! |-----------------------|---------------------|-------------------|
//! | invalid request       | `INVALID_ARGUMENT`  | —                 |
//! | unknown group         | `NOT_FOUND`         | —                 |
//! | not leader / no quorum| `UNAVAILABLE`       | `NotLeader` hint  |
//! | write outcome unknown | `DEADLINE_EXCEEDED` | `UnknownOutcome`  |
//! | ack=ALL not everywhere| `DEADLINE_EXCEEDED` | `NotEverywhere`   |
//! | compacted/future rev. | `OUT_OF_RANGE`      | `Compacted`       |
//! | stale fence / unlock  | `FAILED_PRECONDITION` | `StaleFence`    |
//! | lease not found       | `NOT_FOUND`         | —                 |
//! | lock held (timed out) | `DEADLINE_EXCEEDED` | —                 |
//! | storage, internal     | `INTERNAL`          | —                 |

use palisade_group::GroupError;
use palisade_group::Rejection;
use palisade_proto::v1::{
    Compacted, ErrorDetail, NotEverywhere, NotLeader, StaleFence, UnknownOutcome, error_detail,
};
use palisade_storage::StoreError;
use prost::Message;
use thiserror::Error;
use tonic::{Code, Status};

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("group {0} does not exist on this cluster")]
    UnknownGroup(u64),
    /// A read or compaction at a revision the group does not have (any
    /// more, or yet).
    #[error("group {group}: {source}")]
    Revision { group: u64, source: StoreError },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    Group(#[from] GroupError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("storage: {0}")]
    Storage(#[from] palisade_storage::StoreError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
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
    /// `OUT_OF_RANGE`, the rest stay storage errors.
    pub fn from_store(group: u64, e: StoreError) -> Self {
        match e {
            StoreError::Compacted { .. } | StoreError::FutureRevision { .. } => {
                ServerError::Revision { group, source: e }
            }
            other => ServerError::Storage(other),
        }
    }
}

impl From<ServerError> for Status {
    fn from(e: ServerError) -> Status {
        let msg = e.to_string();
        match e {
            ServerError::InvalidArgument(_) => Status::invalid_argument(msg),
            ServerError::UnknownGroup(_) => Status::not_found(msg),
            ServerError::Group(GroupError::NotLeader { group, leader }) => {
                not_leader_status(group, leader, msg)
            }
            ServerError::Group(GroupError::NoQuorum { group, .. }) => {
                not_leader_status(group, None, msg)
            }
            ServerError::Group(GroupError::Stopped { group, .. }) => {
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
            ServerError::Group(GroupError::Rejected(r)) => match r {
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
                    error_detail::Kind::StaleFence(StaleFence {
                        lock: Vec::new(),
                        current_token: current,
                    }),
                ),
                Rejection::LeaseNotFound { .. } => Status::not_found(msg),
                Rejection::LockHeld { .. } => Status::deadline_exceeded(msg),
            },
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
            ServerError::FailedPrecondition(_) => Status::failed_precondition(msg),
            ServerError::Group(GroupError::Raft { .. } | GroupError::Storage(_))
            | ServerError::Storage(_)
            | ServerError::Io(_)
            | ServerError::Transport(_) => Status::internal(msg),
            ServerError::Config(_) => Status::failed_precondition(msg),
        }
    }
}

/// The typed detail of a palisade error status, if it has one.
pub fn error_detail(status: &Status) -> Option<error_detail::Kind> {
    ErrorDetail::decode(status.details()).ok()?.kind
}
