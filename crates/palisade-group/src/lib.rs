//! One Raft group of a palisade node: openraft glue, the replicated state
//! machine and the peer network.
//!
//! A node hosts many groups (multi-Raft). Each [`RaftGroup`] owns an
//! `openraft::Raft` whose log and state live in the node's shared sled
//! database (see `palisade-storage`), and whose messages travel over the
//! node's shared peer channels tagged with the group id.
//!
//! Reads go through [`RaftGroup::read_index`] (openraft's ReadIndex: the
//! leader confirms with a quorum that it still leads, then waits until it has
//! applied the read index) before touching the state, which makes them
//! linearizable. Writes go through [`RaftGroup::write`], which resolves once
//! the entry is committed (fsynced on a majority) and applied on this leader.

pub mod error;
pub mod network;
mod read_batch;
pub mod runtime;
pub mod state_machine;
pub mod types;
mod write_batch;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use error::SharedError;
use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, ServerState};
use palisade_storage::{NodeStore, StateTree};
use read_batch::ReadBatcher;
use write_batch::WriteBatcher;

pub use error::GroupError;
pub use network::{Connector, PeerChannels, PeerNetwork, TcpConnector};
pub use state_machine::StateMachine;
pub use types::*;

/// The result of an openraft leadership check (ReadIndex).
type LeadershipCheck<T> = Result<T, RaftError<NodeId, CheckIsLeaderError<NodeId, BasicNode>>>;

/// A replica's view of its group, for status reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaState {
    pub group: GroupId,
    pub node: NodeId,
    pub role: &'static str,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub last_log_index: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub purged_index: u64,
    pub snapshots_installed: u64,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// Live user keys in this replica's state.
    pub key_count: u64,
    /// The MVCC compaction point.
    pub compacted: u64,
    /// Superseded versions and tombstones kept for MVCC reads.
    pub history_records: u64,
    /// On a leader: the highest index replicated to each other member.
    pub matched: Vec<(NodeId, u64)>,
}

/// A leader lease: while it holds, no other node can lead the group.
#[derive(Debug, Clone, Copy)]
struct LeaderLease {
    term: u64,
    until: tokio::time::Instant,
    /// Read index confirmed when the lease was taken; a lease read waits
    /// until it is applied (a new leader may not have applied its
    /// predecessor's last entries yet).
    read_index: u64,
}

/// One Raft group hosted on this node.
pub struct RaftGroup {
    id: GroupId,
    node: NodeId,
    raft: Raft,
    state: StateTree,
    installed: Arc<AtomicU64>,
    lease: std::sync::Mutex<Option<LeaderLease>>,
    /// Shares leadership rounds among concurrent reads (see `read_batch`).
    reads: ReadBatcher,
    /// Puts concurrent client transactions into one entry (see
    /// `write_batch`).
    writes: WriteBatcher,
}

impl RaftGroup {
    /// Opens the group's storage on `store` and starts its Raft instance.
    pub async fn open(
        node: NodeId,
        id: GroupId,
        store: &NodeStore,
        config: Arc<openraft::Config>,
        channels: PeerChannels,
    ) -> Result<Self, GroupError> {
        let log = store.log_store::<TypeConfig>(id)?;
        let state = store.state_tree(id)?;
        let sm = StateMachine::new(
            id,
            state.clone(),
            store.snapshot_store(id)?,
            store.flusher().clone(),
        )?;
        let installed = sm.installed_counter();
        let raft = Raft::new(node, config, PeerNetwork::new(id, channels), log, sm)
            .await
            .map_err(|e| GroupError::Raft {
                group: id,
                message: e.to_string(),
            })?;
        let writes = WriteBatcher::start(id, raft.clone());
        Ok(Self {
            id,
            node,
            raft,
            state,
            installed,
            lease: std::sync::Mutex::new(None),
            reads: ReadBatcher::default(),
            writes,
        })
    }

    pub fn id(&self) -> GroupId {
        self.id
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The group's replicated key-value state on this node.
    pub fn state(&self) -> &StateTree {
        &self.state
    }

    /// Makes `members` the group's first voters. A no-op when the group is
    /// already initialized (e.g. on restart), so every node may call it.
    pub async fn initialize(&self, members: BTreeMap<NodeId, BasicNode>) -> Result<(), GroupError> {
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(GroupError::Raft {
                group: self.id,
                message: e.to_string(),
            }),
        }
    }

    /// Proposes `cmd` and waits until it is committed and applied here.
    ///
    /// On `timeout` the outcome is unknown: the entry may still commit.
    pub async fn write(
        &self,
        cmd: Command,
        timeout: Duration,
    ) -> Result<CommandResult, GroupError> {
        match write_batch::batch_keys(&cmd) {
            Some(keys) => self.writes.write(cmd, keys, timeout).await,
            None => propose(self.id, &self.raft, cmd, timeout).await,
        }
    }

    /// ReadIndex: returns once this node is confirmed leader by a quorum and
    /// has applied everything committed before the call. Reads of the state
    /// after this are linearizable.
    pub async fn read_index(&self, timeout: Duration) -> Result<(), GroupError> {
        let index = self.leader_read_index(timeout).await?;
        if self.wait_applied(index, timeout).await {
            Ok(())
        } else {
            Err(GroupError::NoQuorum {
                group: self.id,
                reason: format!("read index {index} not applied within {timeout:?}"),
            })
        }
    }

    /// The leader's read index: confirms leadership with a quorum (like
    /// [`Self::read_index`]) but does not wait for the local apply. Every
    /// entry committed before the call has an index at most this.
    /// Concurrent calls share quorum rounds (each joins a round that starts
    /// after it arrived; see `read_batch`).
    pub async fn leader_read_index(&self, timeout: Duration) -> Result<u64, GroupError> {
        let raft = self.raft.clone();
        let id = self.id;
        let round = move |t: Duration| {
            let raft = raft.clone();
            async move {
                let read = tokio::time::timeout(t, raft.get_read_log_id()).await;
                check_leadership(id, read, t)
                    .map(|(read, _applied)| read.map_or(0, |l| l.index))
                    .map_err(|e| SharedError::from_group_error(&e))
            }
        };
        self.reads
            .read_index(timeout, round)
            .await
            .map_err(|e| e.into_group_error(self.id))
    }

    /// Waits up to `timeout` until this replica has applied `index`; returns
    /// whether it has.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> bool {
        if self.state.revision() >= index {
            return true;
        }
        let waited = self
            .raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "read waits for apply")
            .await
            .is_ok();
        waited || self.state.revision() >= index
    }

    /// A LEASE read: if this node holds a valid leader lease, waits until it
    /// has applied the lease's read index and returns true. Returns false
    /// when there is no valid lease (the caller falls back to ReadIndex, see
    /// [`Self::read_index_renewing_lease`]).
    ///
    /// The lease starts at a monotonic instant taken *before* a quorum
    /// confirmed this node's leadership, and lasts `lease`, which must be
    /// shorter than the minimum election timeout: followers that confirmed
    /// do not elect another leader sooner than that after the confirmation,
    /// so within the lease no other leader can have committed anything. It
    /// is tied to the term it was obtained in, and measured on the
    /// monotonic clock, which keeps running while a process is paused:
    /// a leader resuming from SIGSTOP finds its lease expired (openraft's
    /// own metrics would still show its pre-pause quorum acknowledgement).
    pub async fn lease_read(&self, timeout: Duration) -> bool {
        let m = self.raft.metrics().borrow().clone();
        let lease = *self.lease.lock().unwrap_or_else(|p| p.into_inner());
        let Some(lease) = lease else { return false };
        let valid = m.state == ServerState::Leader
            && m.current_term == lease.term
            && tokio::time::Instant::now() < lease.until;
        valid && self.wait_applied(lease.read_index, timeout).await
    }

    /// ReadIndex (like [`Self::read_index`]) that also renews this node's
    /// leader lease for `lease` from the instant before the quorum round.
    pub async fn read_index_renewing_lease(
        &self,
        lease: Duration,
        timeout: Duration,
    ) -> Result<(), GroupError> {
        let term = self.raft.metrics().borrow().current_term;
        let t0 = tokio::time::Instant::now();
        let index = self.leader_read_index(timeout).await?;
        if !self.wait_applied(index, timeout).await {
            return Err(GroupError::NoQuorum {
                group: self.id,
                reason: format!("read index {index} not applied within {timeout:?}"),
            });
        }
        let m = self.raft.metrics().borrow().clone();
        if m.state == ServerState::Leader && m.current_term == term {
            *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = Some(LeaderLease {
                term,
                until: t0 + lease,
                read_index: index,
            });
        }
        Ok(())
    }

    /// The leader this node currently knows of, with its address.
    pub fn leader(&self) -> Option<(NodeId, Option<String>)> {
        // Never hold the metrics borrow across an await.
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone());
        Some((id, addr))
    }

    /// Whether this node is the group's leader right now (by its own view).
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    /// Addresses of every member (voters and learners) of the group.
    pub fn member_addrs(&self) -> BTreeMap<NodeId, String> {
        let m = self.raft.metrics().borrow().clone();
        m.membership_config
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect()
    }

    /// This replica's state.
    pub async fn replica_state(&self) -> ReplicaState {
        let m = self.raft.metrics().borrow().clone();
        let commit_index = self
            .raft
            .with_raft_state(|st| st.committed.map_or(0, |l| l.index))
            .await
            .unwrap_or(0);
        let voters: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
        let learners: BTreeSet<NodeId> = m.membership_config.membership().learner_ids().collect();
        ReplicaState {
            group: self.id,
            node: self.node,
            role: match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            },
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index.unwrap_or(0),
            commit_index,
            applied_index: m.last_applied.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            purged_index: m.purged.map_or(0, |l| l.index),
            snapshots_installed: self.installed.load(Ordering::Relaxed),
            voters: voters.into_iter().collect(),
            learners: learners.into_iter().collect(),
            key_count: self.state.user_key_count().unwrap_or(0) as u64,
            compacted: self.state.compacted(),
            history_records: self.state.history_record_count().unwrap_or(0) as u64,
            matched: m
                .replication
                .iter()
                .flatten()
                .filter(|(id, _)| **id != self.node)
                .map(|(id, l)| (*id, l.map_or(0, |l| l.index)))
                .collect(),
        }
    }

    /// Voter ids of the group, as this replica sees them.
    pub fn voter_ids(&self) -> BTreeSet<NodeId> {
        let m = self.raft.metrics().borrow().clone();
        m.membership_config.membership().voter_ids().collect()
    }

    /// Whether `node` is a member (voter or learner) of the group, as this
    /// replica sees it.
    pub fn has_member(&self, node: NodeId) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.membership_config.membership().get_node(&node).is_some()
    }

    /// Adds `node` as a non-voting learner; returns once the membership
    /// change is committed (not when the learner has caught up).
    pub async fn add_learner(
        &self,
        node: NodeId,
        addr: String,
        timeout: Duration,
    ) -> Result<(), GroupError> {
        if self.has_member(node) && self.is_leader() {
            return Ok(());
        }
        let add = self.raft.add_learner(node, BasicNode { addr }, false);
        match tokio::time::timeout(timeout, add).await {
            Err(_) => Err(GroupError::UnknownOutcome { group: self.id }),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(write_error(self.id, e)),
        }
    }

    /// Stops the Raft instance.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(group = self.id, error = %e, "raft shutdown failed");
        }
        // Not needed for safety (the log re-applies it), but it makes the
        // next start quicker.
        if let Err(e) = self.state.persist() {
            tracing::warn!(group = self.id, error = %e, "persisting the state at shutdown failed");
        }
    }
}

/// Maps the outcome of an openraft leadership check (with its timeout) to
/// ours.
fn check_leadership<T>(
    id: GroupId,
    outcome: Result<LeadershipCheck<T>, tokio::time::error::Elapsed>,
    timeout: Duration,
) -> Result<T, GroupError> {
    match outcome {
        Err(_) => Err(GroupError::NoQuorum {
            group: id,
            reason: format!("leadership not confirmed within {timeout:?}"),
        }),
        Ok(Ok(v)) => Ok(v),
        Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
            Err(GroupError::NotLeader {
                group: id,
                leader: f.leader_id.map(|id| (id, f.leader_node.map(|n| n.addr))),
            })
        }
        Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)))) => {
            Err(GroupError::NoQuorum {
                group: id,
                reason: q.to_string(),
            })
        }
        Ok(Err(RaftError::Fatal(e))) => Err(GroupError::Stopped {
            group: id,
            reason: e.to_string(),
        }),
    }
}

/// Maps a failed proposal (a write or a membership change) to ours.
fn write_error(
    group: GroupId,
    e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>,
) -> GroupError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => GroupError::NotLeader {
            group,
            leader: f.leader_id.map(|id| (id, f.leader_node.map(|n| n.addr))),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => GroupError::Raft {
            group,
            message: e.to_string(),
        },
        RaftError::Fatal(e) => GroupError::Stopped {
            group,
            reason: e.to_string(),
        },
    }
}

/// Proposes `cmd` as one entry and waits up to `timeout` until it is
/// committed and applied here.
pub(crate) async fn propose(
    group: GroupId,
    raft: &Raft,
    cmd: Command,
    timeout: Duration,
) -> Result<CommandResult, GroupError> {
    match tokio::time::timeout(timeout, raft.client_write(cmd)).await {
        Err(_) => Err(GroupError::UnknownOutcome { group }),
        Ok(Ok(resp)) => Ok(resp.data),
        Ok(Err(e)) => Err(write_error(group, e)),
    }
}
