//! Read consistency: for one read of one group, decide whether this replica
//! may answer from its local state, and what it can vouch for (the receipt).
//!
//! | level               | this replica answers when…                                   | receipt                  |
//! |---------------------|--------------------------------------------------------------|--------------------------|
//! | `LINEARIZABLE`      | it leads the group and ReadIndex confirmed it (else forward)  | 0 ms behind              |
//! | `LEASE`             | it leads and its lease holds (see `RaftGroup::lease_read`);   | LEASE or LINEARIZABLE    |
//! |                     | else ReadIndex as above, which renews the lease               |                          |
//! | `SESSION`           | it has applied the session's revision (waits, then forwards)  | unbounded, ≥ the session |
//! | `BOUNDED_STALENESS` | it fetched the leader's read index at t0, applied it, and     | now − t0                 |
//! |                     | now − t0 ≤ d (else forwards); read indexes younger than d/2   |                          |
//! |                     | are shared between reads of a group                           |                          |
//! | `STALE`             | always                                                        | unbounded                |
//!
//! On top of every level, `min_revision` (and a session's revision) makes
//! the replica wait a bounded time until it has applied that revision.
//!
//! A versioned read (`at_revision = r`) skips the level checks: history at
//! `r` never changes once `r` is applied, so any replica that has applied
//! `r` answers exactly (it waits for `r` like for `min_revision`; at the
//! leader, a revision still missing after the wait is a future revision).
//! "Forward" means the read is sent one hop to the leader, which applies the
//! same rules; a replica never answers with older data than promised.

use std::time::Duration;
use tokio::time::Instant;

use palisade_group::{GroupError, RaftGroup};
use palisade_proto::v1 as pb;
use palisade_proto::v1::ReadConsistency;
use palisade_proto::v1::peer_client::PeerClient;

use crate::error::ServerError;
use crate::node::Node;

/// What a read asks for, for one group.
#[derive(Debug, Clone, Copy)]
pub struct ReadParams {
    pub level: ReadConsistency,
    pub max_staleness: Duration,
    /// The replica must have applied at least this revision.
    pub required: u64,
    /// Read the state as of this revision (0: the latest).
    pub at: u64,
}

impl ReadParams {
    /// Validates the read options of a request for `group`.
    pub fn parse(
        level: i32,
        max_staleness_ms: u64,
        session: Option<&pb::SessionToken>,
        min_revision: u64,
        at_revision: u64,
        group: u64,
    ) -> Result<Self, ServerError> {
        let level = match ReadConsistency::try_from(level) {
            // Unset in the request: the default.
            Ok(ReadConsistency::Unspecified) => ReadConsistency::Linearizable,
            Ok(l) => l,
            Err(_) => {
                return Err(ServerError::InvalidArgument(format!(
                    "unknown read consistency {level}"
                )));
            }
        };
        if level == ReadConsistency::BoundedStaleness && max_staleness_ms == 0 {
            return Err(ServerError::InvalidArgument(
                "BOUNDED_STALENESS needs max_staleness_ms > 0".into(),
            ));
        }
        let from_session = session
            .into_iter()
            .flat_map(|s| &s.revisions)
            .filter(|r| r.group_id == group)
            .map(|r| r.revision)
            .max()
            .unwrap_or(0);
        Ok(Self {
            level,
            max_staleness: Duration::from_millis(max_staleness_ms),
            required: from_session.max(min_revision).max(at_revision),
            at: at_revision,
        })
    }
}

/// What the replica vouches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    pub level: ReadConsistency,
    pub staleness_bound_ms: u64,
    pub unbounded: bool,
}

impl Receipt {
    fn exact(level: ReadConsistency) -> Self {
        Self {
            level,
            staleness_bound_ms: 0,
            unbounded: false,
        }
    }

    fn unbounded(level: ReadConsistency) -> Self {
        Self {
            level,
            staleness_bound_ms: 0,
            unbounded: true,
        }
    }
}

/// Sends the read to the leader (the caller forwards on `NotLeader`).
fn go_to_leader(group: &RaftGroup) -> GroupError {
    GroupError::NotLeader {
        group: group.id(),
        leader: group.leader(),
    }
}

/// Decides whether this replica may answer; see the module doc.
pub async fn prepare(
    node: &Node,
    group: &RaftGroup,
    params: &ReadParams,
) -> Result<Receipt, ReadRefusal> {
    let read_timeout = node.config.read_timeout;
    if params.at > 0 {
        // Exact as of `at`, wherever it is served.
        let receipt = Receipt::exact(params.level);
        if !group
            .wait_revision(params.at, node.config.session_wait)
            .await
            && !group.is_leader()
        {
            return Err(go_to_leader(group).into());
        }
        return Ok(receipt);
    }
    let receipt = match params.level {
        // `parse` turns an unset level into the default.
        ReadConsistency::Linearizable | ReadConsistency::Unspecified => {
            group.read_index(read_timeout).await?;
            Receipt::exact(ReadConsistency::Linearizable)
        }
        ReadConsistency::Lease => {
            if group.lease_read(read_timeout).await {
                Receipt::exact(ReadConsistency::Lease)
            } else {
                // The ReadIndex round that serves this read also renews
                // the lease for the reads that follow.
                group
                    .read_index_renewing_lease(node.config.lease(), read_timeout)
                    .await?;
                Receipt::exact(ReadConsistency::Linearizable)
            }
        }
        ReadConsistency::Session | ReadConsistency::Stale => Receipt::unbounded(params.level),
        ReadConsistency::BoundedStaleness => bounded(node, group, params.max_staleness).await?,
    };
    if group.state().revision() < params.required {
        let wait = node.config.session_wait;
        if !group.wait_revision(params.required, wait).await {
            return Err(if group.is_leader() {
                ReadRefusal::NotReached {
                    required: params.required,
                    current: group.state().revision(),
                }
            } else {
                ReadRefusal::Group(go_to_leader(group))
            });
        }
    }
    Ok(receipt)
}

/// Why a replica did not serve a read.
#[derive(Debug)]
pub enum ReadRefusal {
    /// Redirect or retry (not leader, no quorum).
    Group(GroupError),
    /// The leader itself has not reached the revision the read needs.
    NotReached { required: u64, current: u64 },
}

impl From<GroupError> for ReadRefusal {
    fn from(e: GroupError) -> Self {
        ReadRefusal::Group(e)
    }
}

impl ReadRefusal {
    /// As a server error of `group`.
    pub fn into_error(self, group: u64) -> ServerError {
        match self {
            ReadRefusal::Group(e) => ServerError::Group(e),
            ReadRefusal::NotReached { required, current } => ServerError::RevisionNotReached {
                group,
                required,
                current,
            },
        }
    }
}

/// BOUNDED_STALENESS: fetch the leader's read index at t0, wait to apply it;
/// everything committed before t0 is then visible, so the answer is at most
/// now − t0 old, measured on this node's monotonic clock alone.
async fn bounded(node: &Node, group: &RaftGroup, max: Duration) -> Result<Receipt, GroupError> {
    // A read index fetched at t0 vouches for every read until now − t0
    // exceeds the bound, so recent ones are shared: while the cached one is
    // younger than half the bound (half left for the next fetch and apply)
    // and applied here, no round trip is needed.
    if let Some((t0, index)) = node.cached_read_index(group.id())
        && t0.elapsed() < max / 2
        && group.state().applied_index() >= index
    {
        return Ok(Receipt {
            level: ReadConsistency::BoundedStaleness,
            staleness_bound_ms: t0.elapsed().as_millis().max(1) as u64,
            unbounded: false,
        });
    }
    let t0 = Instant::now();
    let index = leader_read_index(node, group, max).await?;
    node.cache_read_index(group.id(), t0, index);
    let left = max.saturating_sub(t0.elapsed());
    if !group.wait_applied(index, left).await {
        return Err(go_to_leader(group));
    }
    let bound = t0.elapsed();
    if bound > max {
        return Err(go_to_leader(group));
    }
    Ok(Receipt {
        level: ReadConsistency::BoundedStaleness,
        staleness_bound_ms: bound.as_millis().max(1) as u64,
        unbounded: false,
    })
}

/// The group leader's read index, asked locally or over the peer protocol.
async fn leader_read_index(
    node: &Node,
    group: &RaftGroup,
    timeout: Duration,
) -> Result<u64, GroupError> {
    match group.leader() {
        Some((id, _)) if id == group.replica_id() => group.leader_read_index(timeout).await,
        Some((id, Some(addr))) => {
            let unreachable = |why: String| GroupError::NoQuorum {
                group: group.id(),
                reason: format!("read index from leader {id}: {why}"),
            };
            let channel = node
                .channels
                .get(&addr)
                .map_err(|e| unreachable(e.to_string()))?;
            let mut req = tonic::Request::new(pb::ReadIndexRequest {
                group_id: group.id(),
            });
            req.set_timeout(timeout);
            match tokio::time::timeout(timeout, PeerClient::new(channel).read_index(req)).await {
                Ok(Ok(r)) => Ok(r.into_inner().index),
                Ok(Err(status)) => {
                    node.channels.drop_channel(&addr);
                    Err(unreachable(status.message().to_string()))
                }
                Err(_) => {
                    node.channels.drop_channel(&addr);
                    Err(unreachable(format!("no answer within {timeout:?}")))
                }
            }
        }
        _ => Err(GroupError::NoQuorum {
            group: group.id(),
            reason: "no leader known".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(pairs: &[(u64, u64)]) -> pb::SessionToken {
        pb::SessionToken {
            revisions: pairs
                .iter()
                .map(|(g, r)| pb::GroupRevision {
                    group_id: *g,
                    revision: *r,
                })
                .collect(),
        }
    }

    #[test]
    fn params_take_the_session_revision_of_their_group() {
        let t = token(&[(1, 40), (2, 7), (1, 42)]);
        let p = ReadParams::parse(ReadConsistency::Session as i32, 0, Some(&t), 0, 0, 1).unwrap();
        assert_eq!(p.required, 42);
        let p = ReadParams::parse(ReadConsistency::Session as i32, 0, Some(&t), 50, 0, 2).unwrap();
        assert_eq!(p.required, 50, "min_revision wins when higher");
        let p = ReadParams::parse(ReadConsistency::Stale as i32, 0, Some(&t), 0, 60, 3).unwrap();
        assert_eq!(
            (p.required, p.at),
            (60, 60),
            "a versioned read needs its revision"
        );
    }

    #[test]
    fn params_are_validated() {
        assert!(ReadParams::parse(99, 0, None, 0, 0, 1).is_err());
        let unset = ReadParams::parse(0, 0, None, 0, 0, 1).unwrap();
        assert_eq!(
            unset.level,
            ReadConsistency::Linearizable,
            "an unset level reads linearizably"
        );
        let e = ReadParams::parse(ReadConsistency::BoundedStaleness as i32, 0, None, 0, 0, 1)
            .unwrap_err();
        assert!(e.to_string().contains("max_staleness_ms"));
        assert!(
            ReadParams::parse(ReadConsistency::BoundedStaleness as i32, 100, None, 0, 0, 1).is_ok()
        );
    }
}
