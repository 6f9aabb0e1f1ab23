//! One Raft group of a palisade node: openraft glue, the replicated state
//! machine and the peer network.
//!
//! A node hosts many groups (multi-Raft). Each [`RaftGroup`] is one replica:
//! it owns an `openraft::Raft` whose member id is the replica's id (unique
//! in the cluster, see `palisade_shard::map`), whose log and state live in
//! the node's shared storage (see `palisade-storage`), and whose messages
//! travel over the node's shared peer channels tagged with the group and the
//! target replica.
//!
//! Membership changes ([`RaftGroup::add_learner`],
//! [`RaftGroup::change_voters`]) and leader hand-over
//! ([`RaftGroup::begin_handover`]) are the primitives the server's
//! coordinator builds replica moves and leader balancing from.
//!
//! Reads go through [`RaftGroup::read_index`] (openraft's ReadIndex: the
//! leader confirms with a quorum that it still leads, then waits until it has
//! applied the read index) before touching the state, which makes them
//! linearizable. Writes go through [`RaftGroup::write`], which resolves once
//! the entry is committed (fsynced on a majority) and applied on this leader.

pub mod error;
pub mod network;
pub mod observe;
mod read_batch;
pub mod runtime;
mod slots;
pub mod state_machine;
pub mod types;
mod write_batch;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use error::SharedError;
use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState};
use palisade_storage::{DiskGuard, LogStore, NodeStore, StateTree};
use read_batch::ReadBatcher;
use write_batch::WriteBatcher;

pub use error::GroupError;
pub use network::{Connector, PeerChannels, PeerNetwork, TcpConnector};
pub use state_machine::{MapState, StateMachine};
pub use types::*;

/// The result of an openraft leadership check (ReadIndex).
type LeadershipCheck<T> = Result<T, RaftError<NodeId, CheckIsLeaderError<NodeId, BasicNode>>>;

/// The Raft role of a replica right now, as it sees itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RaftRole {
    Leader,
    #[default]
    Follower,
    Candidate,
    Learner,
    Shutdown,
}

impl RaftRole {
    pub fn name(self) -> &'static str {
        match self {
            RaftRole::Leader => "leader",
            RaftRole::Follower => "follower",
            RaftRole::Candidate => "candidate",
            RaftRole::Learner => "learner",
            RaftRole::Shutdown => "shutdown",
        }
    }
}

impl From<ServerState> for RaftRole {
    fn from(s: ServerState) -> Self {
        match s {
            ServerState::Leader => RaftRole::Leader,
            ServerState::Follower => RaftRole::Follower,
            ServerState::Candidate => RaftRole::Candidate,
            ServerState::Learner => RaftRole::Learner,
            ServerState::Shutdown => RaftRole::Shutdown,
        }
    }
}

/// A group's membership as one replica sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MembershipView {
    pub voters: BTreeSet<ReplicaId>,
    pub learners: BTreeSet<ReplicaId>,
    /// In a joint configuration (a change half done).
    pub joint: bool,
    /// The effective membership is committed (no change in flight).
    pub committed: bool,
}

/// A replica's view of its group, for status reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaState {
    pub group: GroupId,
    /// This replica's Raft member id.
    pub replica: ReplicaId,
    pub node: NodeId,
    pub role: RaftRole,
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
    pub matched: Vec<(ReplicaId, u64)>,
    /// The group's revision on this replica (applied index + offset).
    pub revision: u64,
    /// The slots this replica's state serves (`None`: every key, a group
    /// written before the cluster map).
    pub owned_slots: Option<usize>,
    pub slot_epoch: u64,
    /// Why the replica is quarantined, while it is (see
    /// [`RaftGroup::append_entries`]).
    pub quarantine: Option<String>,
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
    /// This replica's Raft member id.
    replica: ReplicaId,
    /// The node hosting it.
    node: NodeId,
    raft: Raft,
    /// While leadership is being handed to this replica (of the group),
    /// proposals are refused so the followers' leader lease can lapse.
    /// A hand-over under way: its target and number.
    handover: std::sync::Mutex<Option<(ReplicaId, u64)>>,
    handovers: std::sync::atomic::AtomicU64,
    state: StateTree,
    installed: Arc<AtomicU64>,
    lease: std::sync::Mutex<Option<LeaderLease>>,
    /// Shares leadership rounds among concurrent reads (see `read_batch`).
    reads: ReadBatcher,
    /// Puts concurrent client transactions into one entry (see
    /// `write_batch`).
    writes: WriteBatcher,
    /// The log store, kept to end a quarantine durably.
    log: LogStore<TypeConfig>,
    /// Why this replica is quarantined, while it is (see
    /// [`Self::append_entries`]).
    quarantine: std::sync::Mutex<Option<String>>,
    /// Whether elections are wanted (hand-overs switch them off for a
    /// while); they run only when wanted and not quarantined.
    elections_wanted: std::sync::atomic::AtomicBool,
    /// This node's disk-space alarm.
    disk: DiskGuard,
    /// The node's peer channels (they know which peers' disks are full).
    channels: PeerChannels,
}

impl RaftGroup {
    /// Opens replica `replica` of group `id` on `store` (of node `node`)
    /// and starts its Raft instance. The meta group passes where to publish
    /// the cluster map.
    pub async fn open(
        node: NodeId,
        replica: ReplicaId,
        id: GroupId,
        store: &NodeStore,
        config: Arc<openraft::Config>,
        channels: PeerChannels,
        map: Option<MapState>,
    ) -> Result<Self, GroupError> {
        let log = store.log_store::<TypeConfig>(id)?;
        let quarantine = log.quarantine()?;
        // A quarantined replica must not campaign from its first moment.
        let config = match &quarantine {
            Some(why) => {
                tracing::warn!(group = id, %why, "replica quarantined: it neither votes nor campaigns until a leader has re-sent what its log lost");
                let mut c = (*config).clone();
                c.enable_elect = false;
                Arc::new(c)
            }
            None => config,
        };
        let state = store.state_tree(id)?;
        let sm = StateMachine::new(
            id,
            state.clone(),
            store.snapshot_store(id)?,
            store.flusher().clone(),
            map,
        )?;
        let installed = sm.installed_counter();
        let raft = Raft::new(
            replica,
            config,
            PeerNetwork::new(id, channels.clone()),
            log.clone(),
            sm,
        )
        .await
        .map_err(|e| GroupError::Raft {
            group: id,
            what: "starting Raft",
            source: Arc::new(e),
        })?;
        let writes = WriteBatcher::start(id, raft.clone());
        let group = Self {
            id,
            replica,
            node,
            raft,
            handover: std::sync::Mutex::new(None),
            handovers: std::sync::atomic::AtomicU64::new(0),
            state,
            installed,
            lease: std::sync::Mutex::new(None),
            reads: ReadBatcher::default(),
            writes,
            log,
            quarantine: std::sync::Mutex::new(quarantine),
            elections_wanted: std::sync::atomic::AtomicBool::new(true),
            disk: store.disk().clone(),
            channels,
        };
        // The disk may be full already (see `apply_elections`).
        group.apply_elections();
        Ok(group)
    }

    /// Why this replica is quarantined, while it is.
    pub fn quarantine(&self) -> Option<String> {
        self.quarantine
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Handles a leader's AppendEntries, and ends this replica's quarantine
    /// once the leader has given back everything it may have lost.
    ///
    /// # Why this is enough
    ///
    /// A quarantined replica may have lost entries it acknowledged, so a
    /// majority counting on its copy no longer holds them: it takes no part
    /// in elections (no votes, no campaigns). The quarantine ends on an
    /// accepted AppendEntries whose `leader_commit` is an entry of the
    /// leader's own term that the request covers (so this log now holds it
    /// and everything before it). That leader holds every entry committed
    /// before its term (it was elected by a majority that did not count this
    /// replica's lost copy), and its commit index — sent after this replica
    /// restarted — covers everything it committed since; an entry of its own
    /// term being committed means all before it are too. So every entry this
    /// replica ever acknowledged that was committed is in its log again.
    pub async fn append_entries(
        &self,
        req: openraft::raft::AppendEntriesRequest<TypeConfig>,
    ) -> Result<openraft::raft::AppendEntriesResponse<NodeId>, openraft::error::RaftError<NodeId>>
    {
        let restores = self.quarantine().is_some() && restores_lost_entries(&req);
        let resp = self.raft.append_entries(req).await?;
        if restores && matches!(resp, openraft::raft::AppendEntriesResponse::Success) {
            self.end_quarantine().await;
        }
        Ok(resp)
    }

    /// Handles a candidate's vote request; a quarantined replica abstains
    /// (see [`Self::append_entries`]).
    pub async fn vote(
        &self,
        req: openraft::raft::VoteRequest<NodeId>,
    ) -> Result<openraft::raft::VoteResponse<NodeId>, openraft::error::RaftError<NodeId>> {
        if self.quarantine().is_some() {
            tracing::info!(
                group = self.id,
                candidate = %req.vote,
                "a quarantined replica abstains from a vote"
            );
            // Not granted, and our own vote (never above the candidate's
            // unless we saw a higher term): the candidate just counts no vote.
            let vote = self.raft.metrics().borrow().vote;
            return Ok(openraft::raft::VoteResponse {
                vote,
                vote_granted: false,
                last_log_id: None,
            });
        }
        self.raft.vote(req).await
    }

    /// Ends the quarantine on an operator's word (`palisade start
    /// --accept-log-damage`): the replica votes with what its log has left,
    /// accepting that entries it lost may be lost for good. Needed when no
    /// other replica can give them back (a group whose only voter is
    /// damaged, or a majority of damaged replicas).
    pub async fn accept_log_damage(&self) {
        if let Some(why) = self.quarantine() {
            tracing::error!(
                group = self.id,
                %why,
                "quarantine lifted by the operator (--accept-log-damage): entries this replica lost may be lost for good"
            );
            self.end_quarantine().await;
        }
    }

    async fn end_quarantine(&self) {
        if let Err(e) = self.log.lift_quarantine().await {
            // Stay quarantined: the next AppendEntries tries again.
            tracing::warn!(group = self.id, error = %e, "recording the end of a quarantine failed");
            return;
        }
        let was = self
            .quarantine
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if was.is_some() {
            tracing::warn!(
                group = self.id,
                "quarantine over: the leader has re-sent every entry this replica could have lost; it votes again"
            );
            self.apply_elections();
        }
    }

    pub fn id(&self) -> GroupId {
        self.id
    }

    /// This replica's Raft member id.
    pub fn replica_id(&self) -> ReplicaId {
        self.replica
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
                what: "initializing",
                source: Arc::new(e),
            }),
        }
    }

    /// Whether this replica's Raft has ever been initialized or joined (it
    /// has a vote or a log).
    pub async fn is_initialized(&self) -> bool {
        self.raft.is_initialized().await.unwrap_or(true)
    }

    /// Proposes `cmd` and waits until it is committed and applied here.
    ///
    /// On `timeout` the outcome is unknown: the entry may still commit.
    pub async fn write(
        &self,
        cmd: Command,
        timeout: Duration,
    ) -> Result<CommandResult, GroupError> {
        if let Some((to, _)) = *self.handover.lock().unwrap_or_else(|p| p.into_inner()) {
            // Handing leadership over: a proposal now would renew the
            // followers' lease and keep the new leader from being elected.
            let addr = self.member_addrs().get(&to).cloned();
            return Err(GroupError::NotLeader {
                group: self.id,
                leader: Some((to, addr)),
            });
        }
        if cmd.op.grows_data() {
            self.check_space()?;
        }
        match write_batch::batch_keys(&cmd) {
            Some(keys) => self.writes.write(cmd, keys, timeout).await,
            None => propose(self.id, &self.raft, cmd, timeout).await,
        }
    }

    /// Refuses a write that grows the data when this node's disk is below
    /// its reserve (the leader appends every entry itself), or when too few
    /// voters have space to commit it (followers whose disk is full refuse
    /// entries, see `PeerChannels::mark_disk_full`).
    fn check_space(&self) -> Result<(), GroupError> {
        // Every write that adds data comes here: no copy of the metrics
        // unless some disk is actually full.
        if !self.disk.is_full() && !self.channels.any_disk_full_recently() {
            return Ok(());
        }
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let full: Vec<NodeId> = voters
            .iter()
            .copied()
            .filter(|v| {
                if *v == self.replica {
                    self.disk.is_full()
                } else {
                    membership
                        .get_node(v)
                        .is_some_and(|n| self.channels.disk_full_recently(&n.addr))
                }
            })
            .collect();
        let local_full = full.contains(&self.replica);
        let quorum = voters.len() / 2 + 1;
        if local_full || voters.len() - full.len() < quorum {
            return Err(GroupError::DiskFull {
                group: self.id,
                replicas: full,
            });
        }
        Ok(())
    }

    /// Whether this node's disk is below its reserve.
    pub fn disk_full(&self) -> bool {
        self.disk.is_full()
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
        if self.state.applied_index() >= index {
            return true;
        }
        let waited = self
            .raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "read waits for apply")
            .await
            .is_ok();
        waited || self.state.applied_index() >= index
    }

    /// Waits up to `timeout` until this replica's revision is at least
    /// `revision`; returns whether it is.
    ///
    /// Revisions are log indexes plus an offset that only grows, so the
    /// index that reaches `revision` is at most `revision − offset now`;
    /// waiting for that index (and checking again) never waits too little.
    pub async fn wait_revision(&self, revision: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.state.revision() >= revision {
                return true;
            }
            let index = revision.saturating_sub(self.state.rev_offset());
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            // Every apply re-checks the revision itself too: an entry that
            // raises the offset (an import commit) reaches `revision` well
            // before `index`.
            let state = self.state.clone();
            let reached = move |m: &openraft::RaftMetrics<NodeId, BasicNode>| {
                state.revision() >= revision || m.last_applied.is_some_and(|l| l.index >= index)
            };
            let waited = self
                .raft
                .wait(Some(left))
                .metrics(reached, "read waits for a revision")
                .await
                .is_ok();
            if !waited {
                return self.state.revision() >= revision;
            }
        }
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
        let ownership = self.state.ownership();
        ReplicaState {
            group: self.id,
            replica: self.replica,
            node: self.node,
            role: m.state.into(),
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
                .filter(|(id, _)| **id != self.replica)
                .map(|(id, l)| (*id, l.map_or(0, |l| l.index)))
                .collect(),
            revision: self.state.revision(),
            owned_slots: ownership.as_ref().map(|o| o.owned.len()),
            slot_epoch: ownership.as_ref().map_or(0, |o| o.epoch),
            quarantine: self.quarantine(),
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

    /// The group's membership as this replica sees it.
    pub async fn membership_view(&self) -> MembershipView {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let mut view = MembershipView {
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            joint: membership.get_joint_config().len() > 1,
            committed: false,
        };
        view.committed = self
            .raft
            .with_raft_state(|st| {
                st.membership_state.committed().log_id() == st.membership_state.effective().log_id()
            })
            .await
            .unwrap_or(false);
        view
    }

    /// On the leader: its last log index and the highest index known
    /// replicated to each other member (`None` when not leading).
    pub fn replication_progress(&self) -> Option<(u64, BTreeMap<ReplicaId, u64>)> {
        let m = self.raft.metrics().borrow().clone();
        let replication = m.replication.as_ref()?;
        let matched = replication
            .iter()
            .map(|(id, l)| (*id, l.map_or(0, |l| l.index)))
            .collect();
        Some((m.last_log_index.unwrap_or(0), matched))
    }

    /// Refuses with `NotLeader` unless this replica leads.
    fn must_lead(&self) -> Result<(), GroupError> {
        if self.is_leader() {
            Ok(())
        } else {
            Err(GroupError::NotLeader {
                group: self.id,
                leader: self.leader(),
            })
        }
    }

    /// Adds replica `replica` (at `addr`) as a learner and starts
    /// replicating to it; returns once the change is committed, not when
    /// the learner has caught up (see [`Self::replication_progress`]).
    /// Re-adding a member is a no-op.
    pub async fn add_learner(
        &self,
        replica: ReplicaId,
        addr: String,
        timeout: Duration,
    ) -> Result<(), GroupError> {
        self.must_lead()?;
        if self.has_member(replica) {
            return Ok(());
        }
        let add = self.raft.add_learner(replica, BasicNode { addr }, false);
        self.membership_call(add, timeout).await
    }

    /// Makes `voters` the group's voters in one joint-consensus change
    /// (openraft commits the joint configuration, then the final one);
    /// every new voter must already be a learner. Voters not in `voters`
    /// stay as learners when `keep_removed`, else leave the group. Returns
    /// once the final configuration is committed; a no-op when it already
    /// is the committed configuration.
    pub async fn change_voters(
        &self,
        voters: BTreeSet<ReplicaId>,
        keep_removed: bool,
        timeout: Duration,
    ) -> Result<(), GroupError> {
        self.must_lead()?;
        if voters.is_empty() {
            return Err(GroupError::Membership {
                group: self.id,
                reason: "a group needs at least one voter".into(),
            });
        }
        let view = self.membership_view().await;
        if view.voters == voters && !view.joint && view.committed {
            return Ok(());
        }
        let change = self
            .raft
            .change_membership(ChangeMembers::ReplaceAllVoters(voters), keep_removed);
        self.membership_call(change, timeout).await
    }

    /// Removes learners `learners` from the group.
    pub async fn remove_learners(
        &self,
        learners: BTreeSet<ReplicaId>,
        timeout: Duration,
    ) -> Result<(), GroupError> {
        self.must_lead()?;
        let view = self.membership_view().await;
        let present: BTreeSet<ReplicaId> = learners.intersection(&view.learners).copied().collect();
        if present.is_empty() {
            return Ok(());
        }
        let change = self
            .raft
            .change_membership(ChangeMembers::RemoveNodes(present), false);
        self.membership_call(change, timeout).await
    }

    async fn membership_call<F>(&self, call: F, timeout: Duration) -> Result<(), GroupError>
    where
        F: std::future::Future<
                Output = Result<
                    openraft::raft::ClientWriteResponse<TypeConfig>,
                    RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>,
                >,
            >,
    {
        match tokio::time::timeout(timeout, call).await {
            Err(_) => Err(GroupError::UnknownOutcome { group: self.id }),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(write_error(self.id, e)),
        }
    }

    /// Starts handing leadership to replica `to`: proposals are refused
    /// and heartbeats stop, so that no follower's leader lease is renewed
    /// and `to` can win an election once the lease lapses (openraft 0.9 has
    /// no leader transfer; see the server's coordinator for the rest).
    ///
    /// Returns the hand-over's number, for [`Self::end_handover_of`]: the
    /// caller must end it even if whoever started it never comes back.
    pub fn begin_handover(&self, to: ReplicaId) -> Result<u64, GroupError> {
        self.must_lead()?;
        let number = self.handovers.fetch_add(1, Ordering::Relaxed) + 1;
        *self.handover.lock().unwrap_or_else(|p| p.into_inner()) = Some((to, number));
        self.raft.runtime_config().heartbeat(false);
        Ok(number)
    }

    /// Ends hand-over `number` (done, given up, or past its deadline):
    /// proposals and heartbeats resume. A later hand-over is left alone.
    pub fn end_handover_of(&self, number: u64) {
        let mut h = self.handover.lock().unwrap_or_else(|p| p.into_inner());
        if h.is_some_and(|(_, n)| n == number) {
            *h = None;
            self.raft.runtime_config().heartbeat(true);
        }
    }

    /// Whether this replica may start elections on its own (turned off on
    /// the other voters while leadership is handed to one of them).
    pub fn set_elections(&self, enabled: bool) {
        self.elections_wanted.store(enabled, Ordering::Relaxed);
        self.apply_elections();
    }

    /// Elections run when wanted, the replica is not quarantined and its
    /// disk is not full: a replica that cannot store new data must not
    /// lead, and one that refuses entries for a full disk hears no leader
    /// and would otherwise campaign again and again, unsettling the group.
    pub fn apply_elections(&self) {
        let on = self.elections_wanted.load(Ordering::Relaxed)
            && self.quarantine().is_none()
            && !self.disk.is_full();
        self.raft.runtime_config().elect(on);
    }

    /// Starts an election now (the target of a hand-over).
    pub async fn campaign(&self) -> Result<(), GroupError> {
        if let Some(why) = self.quarantine() {
            return Err(GroupError::Membership {
                group: self.id,
                reason: format!("this replica is quarantined and cannot campaign: {why}"),
            });
        }
        self.raft
            .trigger()
            .elect()
            .await
            .map_err(|e| GroupError::Stopped {
                group: self.id,
                source: Arc::new(e),
            })
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
            source: Arc::new(e),
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
            what: "changing the membership",
            source: Arc::new(e),
        },
        // The replica stopped with the proposal in flight: it may have
        // reached the others and commit there.
        RaftError::Fatal(_) => GroupError::UnknownOutcome { group },
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

/// Whether an AppendEntries, once accepted, proves the receiving replica
/// holds every committed entry again (see [`RaftGroup::append_entries`]):
/// its `leader_commit` is an entry of the leader's term, within what the
/// request covers.
fn restores_lost_entries(req: &openraft::raft::AppendEntriesRequest<TypeConfig>) -> bool {
    let term = req.vote.leader_id().term;
    let covered = req
        .entries
        .last()
        .map(|e| e.log_id)
        .or(req.prev_log_id)
        .map_or(0, |l| l.index);
    req.leader_commit
        .is_some_and(|c| c.leader_id.term == term && c.index <= covered)
}
