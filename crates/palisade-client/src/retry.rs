//! The client's retry decision: one function, [`decide`], turns a failed
//! attempt's status into what to do next. Every request of every service
//! goes through it, and its table is tested below.
//!
//! | status (detail)                          | decision                         | may have applied |
//! |------------------------------------------|----------------------------------|------------------|
//! | `UNAVAILABLE` (`NotLeader` with address) | retry at once at that leader     | no               |
//! | `UNAVAILABLE` (`NotLeader`, no address)  | back off, forget the leader      | no               |
//! | `UNAVAILABLE` (`WrongGroup`)             | refresh the map, retry           | no               |
//! | `UNAVAILABLE` (`EpochMismatch`)          | back off, try another node       | no               |
//! | `UNAVAILABLE` (`SlotMoving`)             | wait `retry_after_ms`, retry     | no               |
//! | `UNAVAILABLE` (`RevisionNotReached`)     | back off, retry                  | no               |
//! | `DEADLINE_EXCEEDED` (`UnknownOutcome`)   | back off, retry (same request id)| **yes**          |
//! | `DEADLINE_EXCEEDED` (`NotEverywhere`)    | give up: the write is committed  | yes (committed)  |
//! | transport (`UNAVAILABLE`, `UNKNOWN`, `CANCELLED`, `DEADLINE_EXCEEDED` without detail) | back off, new connection, forget the leader | **yes** |
//! | `RESOURCE_EXHAUSTED` (`DiskFull`)         | give up: retrying fails alike until space is freed | no |
//! | anything else (`INVALID_ARGUMENT`, `FAILED_PRECONDITION`, `NOT_FOUND`, `OUT_OF_RANGE`…) | give up | no |
//!
//! A write that runs out of time after any attempt that may have applied
//! fails with *unknown outcome*, never with a false failure; retries reuse
//! the write's request id, so the server applies it at most once.

use std::time::Duration;

use palisade_proto::v1 as pb;
use prost::Message;
use tonic::{Code, Status};

/// What to do after a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Retry at once at this address (a leader hint for `group`).
    RetryAt { group: u64, addr: String },
    /// The map the request was routed with is stale: refresh it (to at
    /// least this epoch; 0: any newer one) and retry.
    RefreshMap { min_epoch: u64 },
    /// Retry after a pause.
    RetryLater {
        /// The failed attempt may have taken effect.
        maybe_applied: bool,
        /// Do not send the next attempt to the same leader.
        forget_leader: bool,
        /// The connection itself failed: open a new one.
        reconnect: bool,
        /// How long the server asked to wait (else: exponential backoff).
        after: Option<Duration>,
    },
    /// The status is the answer.
    GiveUp,
}

/// The typed detail of a status, if any.
pub fn detail(status: &Status) -> Option<pb::error_detail::Kind> {
    pb::ErrorDetail::decode(status.details()).ok()?.kind
}

fn later(maybe_applied: bool, forget_leader: bool) -> Decision {
    Decision::RetryLater {
        maybe_applied,
        forget_leader,
        reconnect: false,
        after: None,
    }
}

/// The decision for a failed attempt sent to `addr` (see the module doc).
pub fn decide(status: &Status, addr: &str) -> Decision {
    use pb::error_detail::Kind as D;
    match (status.code(), detail(status)) {
        (Code::Unavailable, Some(D::NotLeader(nl))) => {
            if !nl.leader_addr.is_empty() && nl.leader_addr != addr {
                Decision::RetryAt {
                    group: nl.group_id,
                    addr: nl.leader_addr,
                }
            } else {
                later(false, true)
            }
        }
        (Code::Unavailable, Some(D::WrongGroup(w))) => Decision::RefreshMap {
            min_epoch: w.map_epoch,
        },
        (Code::Unavailable, Some(D::EpochMismatch(_))) => later(false, true),
        (Code::Unavailable, Some(D::SlotMoving(m))) => Decision::RetryLater {
            maybe_applied: false,
            forget_leader: false,
            reconnect: false,
            after: Some(Duration::from_millis(m.retry_after_ms.clamp(1, 1000))),
        },
        (Code::Unavailable, Some(D::RevisionNotReached(_))) => later(false, false),
        (Code::DeadlineExceeded, Some(D::UnknownOutcome(_))) => later(true, true),
        (Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded, None) => {
            Decision::RetryLater {
                maybe_applied: true,
                forget_leader: true,
                reconnect: true,
                after: None,
            }
        }
        _ => Decision::GiveUp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(code: Code, kind: pb::error_detail::Kind) -> Status {
        let bytes = pb::ErrorDetail { kind: Some(kind) }.encode_to_vec();
        Status::with_details(code, "x", bytes.into())
    }

    #[test]
    fn every_status_has_one_decision() {
        use pb::error_detail::Kind as D;
        let hint = |addr: &str| {
            with(
                Code::Unavailable,
                D::NotLeader(pb::NotLeader {
                    group_id: 3,
                    leader_id: 2,
                    leader_addr: addr.into(),
                }),
            )
        };
        let cases: Vec<(Status, Decision)> = vec![
            (
                hint("10.0.0.2:7001"),
                Decision::RetryAt {
                    group: 3,
                    addr: "10.0.0.2:7001".into(),
                },
            ),
            (hint(""), later(false, true)),
            (hint("self:1"), later(false, true)),
            (
                with(
                    Code::Unavailable,
                    D::WrongGroup(pb::WrongGroup {
                        slot: 9,
                        group_id: 1,
                        owner_group_id: 5,
                        map_epoch: 44,
                    }),
                ),
                Decision::RefreshMap { min_epoch: 44 },
            ),
            (
                with(
                    Code::Unavailable,
                    D::EpochMismatch(pb::EpochMismatch::default()),
                ),
                later(false, true),
            ),
            (
                with(
                    Code::Unavailable,
                    D::SlotMoving(pb::SlotMoving {
                        slot: 1,
                        group_id: 1,
                        retry_after_ms: 50,
                    }),
                ),
                Decision::RetryLater {
                    maybe_applied: false,
                    forget_leader: false,
                    reconnect: false,
                    after: Some(Duration::from_millis(50)),
                },
            ),
            (
                with(
                    Code::Unavailable,
                    D::RevisionNotReached(pb::RevisionNotReached::default()),
                ),
                later(false, false),
            ),
            (
                with(
                    Code::DeadlineExceeded,
                    D::UnknownOutcome(pb::UnknownOutcome { group_id: 1 }),
                ),
                later(true, true),
            ),
            (
                with(
                    Code::DeadlineExceeded,
                    D::NotEverywhere(pb::NotEverywhere::default()),
                ),
                Decision::GiveUp,
            ),
            (
                Status::unavailable("tcp connect error"),
                Decision::RetryLater {
                    maybe_applied: true,
                    forget_leader: true,
                    reconnect: true,
                    after: None,
                },
            ),
            (
                Status::deadline_exceeded("timeout"),
                Decision::RetryLater {
                    maybe_applied: true,
                    forget_leader: true,
                    reconnect: true,
                    after: None,
                },
            ),
            (Status::invalid_argument("bad"), Decision::GiveUp),
            (
                with(
                    Code::FailedPrecondition,
                    D::LockHeld(pb::LockHeld::default()),
                ),
                Decision::GiveUp,
            ),
            (
                with(
                    Code::NotFound,
                    D::LeaseNotFound(pb::LeaseNotFound { lease_id: 1 }),
                ),
                Decision::GiveUp,
            ),
            (Status::out_of_range("compacted"), Decision::GiveUp),
            (
                with(
                    Code::ResourceExhausted,
                    D::DiskFull(pb::DiskFull {
                        group_id: 1,
                        node_ids: vec![2],
                    }),
                ),
                Decision::GiveUp,
            ),
        ];
        for (status, want) in cases {
            assert_eq!(decide(&status, "self:1"), want, "{status:?}");
        }
    }
}
