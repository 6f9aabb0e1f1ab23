//! Cluster management between nodes: the requests the coordinator (on the
//! meta group's leader) sends to the nodes that host a group's replicas,
//! over the peer service's `Manage` call (bincode payloads: not a public
//! API), and how a node answers them.
//!
//! Leader-only requests (membership changes, proposals, exports) answer
//! `NotLeader` with the leader's address from any other replica;
//! [`Node::manage_leader`] follows such hints a few times. A request for the
//! node itself is answered without a network call.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use palisade_group::{
    Command, CommandOp, CommandResult, GroupError, GroupId, RaftGroup, ReplicaId, SlotRecord,
};
use palisade_proto::v1::ManageMessage;
use palisade_proto::v1::peer_client::PeerClient;
use palisade_shard::{NodeId, SlotSet};
use serde::{Deserialize, Serialize};

use crate::node::Node;
use crate::router::Peer;

/// A management request for one group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ManageRequest {
    /// The group as this replica sees it (any replica answers).
    Status,
    /// The group as its leader sees it (others answer `NotLeader`).
    LeaderStatus,
    AddLearner {
        replica: ReplicaId,
        addr: String,
    },
    ChangeVoters {
        voters: BTreeSet<ReplicaId>,
        keep_removed: bool,
    },
    RemoveLearners {
        replicas: BTreeSet<ReplicaId>,
    },
    /// Propose an internal command (a slot or map command) at the leader.
    Propose {
        op: CommandOp,
    },
    /// Up to `max_bytes` of the records of `slots` from encoded key `from`
    /// on, read on the leader after a ReadIndex.
    Export {
        slots: SlotSet,
        from: Vec<u8>,
        max_bytes: u64,
    },
    /// Hand leadership to `to`; ends by itself after `for_ms` (at most
    /// 30 s) if nobody ends it sooner. Answered with the hand-over's
    /// number ([`ManageReply::HandoverStarted`]).
    BeginHandover {
        to: ReplicaId,
        for_ms: u64,
    },
    /// End hand-over `number` (a later one is left alone).
    EndHandover {
        number: u64,
    },
    /// Turn this replica's own elections off (for `for_ms` at most) or on.
    SetElections {
        enabled: bool,
        for_ms: u64,
    },
    /// Start an election now.
    Campaign,
}

impl ManageRequest {
    fn name(&self) -> &'static str {
        match self {
            ManageRequest::Status => "status",
            ManageRequest::LeaderStatus => "leader status",
            ManageRequest::AddLearner { .. } => "add learner",
            ManageRequest::ChangeVoters { .. } => "change voters",
            ManageRequest::RemoveLearners { .. } => "remove learners",
            ManageRequest::Propose { .. } => "propose",
            ManageRequest::Export { .. } => "export",
            ManageRequest::BeginHandover { .. } => "begin hand-over",
            ManageRequest::EndHandover { .. } => "end hand-over",
            ManageRequest::SetElections { .. } => "set elections",
            ManageRequest::Campaign => "campaign",
        }
    }
}

/// A replica's account of its group.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GroupReport {
    pub replica: ReplicaId,
    pub node: NodeId,
    pub is_leader: bool,
    pub term: u64,
    /// The leader's replica id and address, as this replica knows them.
    pub leader: Option<(ReplicaId, String)>,
    pub voters: BTreeSet<ReplicaId>,
    pub learners: BTreeSet<ReplicaId>,
    pub joint: bool,
    pub committed: bool,
    pub last_log_index: u64,
    pub applied_index: u64,
    pub revision: u64,
    /// On the leader: the highest index replicated to each other member.
    pub matched: BTreeMap<ReplicaId, u64>,
    /// The ownership record's epoch and slot count (`None`: the group
    /// serves every key, as groups from before the cluster map do).
    pub ownership: Option<(u64, usize)>,
}

/// The answer to a [`ManageRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ManageReply {
    Done,
    HandoverStarted(u64),
    Status(Box<GroupReport>),
    Applied(CommandResult),
    Records {
        records: Vec<SlotRecord>,
        next: Option<Vec<u8>>,
    },
}

/// Why a management request failed.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
pub enum ManageError {
    #[error("not the leader of group {group}")]
    NotLeader {
        group: GroupId,
        /// The leader's replica id and address, when known.
        leader: Option<(ReplicaId, String)>,
    },
    #[error("group {0} is not hosted on this node")]
    NotHosted(GroupId),
    /// The request may or may not have taken effect.
    #[error("{0}: outcome unknown")]
    Unknown(String),
    #[error("{0}")]
    Failed(String),
}

impl ManageError {
    fn from_group(group: GroupId, e: GroupError) -> Self {
        match e {
            GroupError::NotLeader { leader, .. } => ManageError::NotLeader {
                group,
                leader: leader.and_then(|(r, a)| Some((r, a?))),
            },
            GroupError::UnknownOutcome { .. } => ManageError::Unknown(e.to_string()),
            other => ManageError::Failed(other.to_string()),
        }
    }
}

type ManageResult = Result<ManageReply, ManageError>;

/// The answer to a replica's status request.
pub(crate) async fn report(group: &RaftGroup) -> GroupReport {
    let st = group.replica_state().await;
    let view = group.membership_view().await;
    GroupReport {
        replica: st.replica,
        node: st.node,
        is_leader: group.is_leader(),
        term: st.term,
        leader: group.leader().and_then(|(r, a)| Some((r, a?))),
        voters: view.voters,
        learners: view.learners,
        joint: view.joint,
        committed: view.committed,
        last_log_index: st.last_log_index,
        applied_index: st.applied_index,
        revision: st.revision,
        matched: st.matched.into_iter().collect(),
        ownership: st.owned_slots.map(|n| (st.slot_epoch, n)),
    }
}

impl Node {
    /// Answers a management request for `group` on this node.
    pub(crate) async fn handle_manage(
        self: &Arc<Self>,
        group_id: GroupId,
        req: ManageRequest,
    ) -> ManageResult {
        let group = self
            .registry
            .get(group_id)
            .ok_or(ManageError::NotHosted(group_id))?;
        let timeout = self.config.write_timeout;
        let g = |e| ManageError::from_group(group_id, e);
        match req {
            ManageRequest::Status => Ok(ManageReply::Status(Box::new(report(&group).await))),
            ManageRequest::LeaderStatus => {
                if !group.is_leader() {
                    return Err(g(GroupError::NotLeader {
                        group: group_id,
                        leader: group.leader(),
                    }));
                }
                Ok(ManageReply::Status(Box::new(report(&group).await)))
            }
            ManageRequest::AddLearner { replica, addr } => {
                group.add_learner(replica, addr, timeout).await.map_err(g)?;
                Ok(ManageReply::Done)
            }
            ManageRequest::ChangeVoters {
                voters,
                keep_removed,
            } => {
                group
                    .change_voters(voters, keep_removed, timeout)
                    .await
                    .map_err(g)?;
                Ok(ManageReply::Done)
            }
            ManageRequest::RemoveLearners { replicas } => {
                group.remove_learners(replicas, timeout).await.map_err(g)?;
                Ok(ManageReply::Done)
            }
            ManageRequest::Propose { op } => {
                if !group.is_leader() {
                    return Err(g(GroupError::NotLeader {
                        group: group_id,
                        leader: group.leader(),
                    }));
                }
                let cmd = Command {
                    request_id: None,
                    op,
                };
                let res = group.write(cmd, timeout).await.map_err(g)?;
                Ok(ManageReply::Applied(res))
            }
            ManageRequest::Export {
                slots,
                from,
                max_bytes,
            } => {
                if !group.is_leader() {
                    return Err(g(GroupError::NotLeader {
                        group: group_id,
                        leader: group.leader(),
                    }));
                }
                group
                    .read_index(self.config.read_timeout)
                    .await
                    .map_err(g)?;
                let (records, next) = group
                    .state()
                    .export_slots(&slots, &from, max_bytes as usize)
                    .map_err(|e| ManageError::Failed(e.to_string()))?;
                Ok(ManageReply::Records {
                    records: records
                        .into_iter()
                        .map(|(key, value)| SlotRecord { key, value })
                        .collect(),
                    next,
                })
            }
            ManageRequest::BeginHandover { to, for_ms } => {
                let number = group.begin_handover(to).map_err(g)?;
                let group = group.clone();
                let for_ = Duration::from_millis(for_ms).min(Duration::from_secs(30));
                tokio::spawn(async move {
                    tokio::time::sleep(for_).await;
                    group.end_handover_of(number);
                });
                Ok(ManageReply::HandoverStarted(number))
            }
            ManageRequest::EndHandover { number } => {
                group.end_handover_of(number);
                Ok(ManageReply::Done)
            }
            ManageRequest::SetElections { enabled, for_ms } => {
                self.set_elections(&group, enabled, Duration::from_millis(for_ms));
                Ok(ManageReply::Done)
            }
            ManageRequest::Campaign => {
                group.campaign().await.map_err(g)?;
                Ok(ManageReply::Done)
            }
        }
    }

    /// Turns a replica's elections off for at most `for_` (a hand-over to
    /// another replica), or back on. An interrupted hand-over cannot leave
    /// a replica unable to elect: the switch turns itself back.
    fn set_elections(self: &Arc<Self>, group: &Arc<RaftGroup>, enabled: bool, for_: Duration) {
        group.set_elections(enabled);
        if enabled {
            return;
        }
        let group = group.clone();
        let for_ = for_.min(Duration::from_secs(30));
        tokio::spawn(async move {
            tokio::time::sleep(for_).await;
            group.set_elections(true);
        });
    }

    /// Sends `req` for `group` to the node at `peer` (or answers it here).
    pub(crate) async fn manage(
        self: &Arc<Self>,
        peer: &Peer,
        group: GroupId,
        req: ManageRequest,
        timeout: Duration,
    ) -> ManageResult {
        let what = req.name();
        if peer.node == self.id() || peer.addr == self.config.advertise_addr() {
            // The same deadline as a remote call: a raft core that stopped
            // answering must not hang the caller (the coordinator) forever.
            return tokio::time::timeout(timeout, self.handle_manage(group, req))
                .await
                .unwrap_or_else(|_| {
                    Err(ManageError::Unknown(format!(
                        "{what} here: no answer within {timeout:?}"
                    )))
                });
        }
        let payload = bincode::serde::encode_to_vec(&req, bincode::config::standard())
            .map_err(|e| ManageError::Failed(format!("encoding {what}: {e}")))?;
        let channel = self
            .channels
            .get(&peer.addr)
            .map_err(|e| ManageError::Failed(format!("bad address {}: {e}", peer.addr)))?;
        let mut request = tonic::Request::new(ManageMessage {
            group_id: group,
            payload,
        });
        request.set_timeout(timeout);
        let mut client = PeerClient::new(channel).max_decoding_message_size(usize::MAX);
        let reply = match tokio::time::timeout(timeout, client.manage(request)).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => {
                self.channels.drop_channel(&peer.addr);
                return Err(ManageError::Unknown(format!(
                    "{what} at node {}: {}: {}",
                    peer.node,
                    status.code(),
                    status.message()
                )));
            }
            Err(_) => {
                self.channels.drop_channel(&peer.addr);
                return Err(ManageError::Unknown(format!(
                    "{what} at node {}: no reply within {timeout:?}",
                    peer.node
                )));
            }
        };
        let (result, _): (ManageResult, _) =
            bincode::serde::decode_from_slice(&reply.payload, bincode::config::standard())
                .map_err(|e| ManageError::Failed(format!("decoding the {what} reply: {e}")))?;
        result
    }

    /// Sends `req` to `group`'s leader, following leader hints (a few hops
    /// at most). A node that does not answer is forgotten as the group's
    /// leader and another is tried: every management request is idempotent,
    /// so repeating one whose outcome is unknown is safe.
    pub(crate) async fn manage_leader(
        self: &Arc<Self>,
        group: GroupId,
        req: ManageRequest,
        timeout: Duration,
    ) -> ManageResult {
        let mut peer = self
            .pick_peer_or_self(group)
            .ok_or_else(|| ManageError::Failed(format!("no node of group {group} is known")))?;
        let mut last = ManageError::Failed(format!("no leader of group {group} answered"));
        for _ in 0..6 {
            match self.manage(&peer, group, req.clone(), timeout).await {
                Err(ManageError::NotLeader {
                    leader: Some((replica, addr)),
                    ..
                }) if addr != peer.addr => {
                    let node = self.map().node_of(group, replica).unwrap_or(0);
                    peer = Peer { node, addr };
                    last = ManageError::Failed(format!("group {group}: leader moved"));
                }
                Ok(reply) => {
                    if peer.node != 0 {
                        self.leaders.remember(group, peer.clone());
                    }
                    return Ok(reply);
                }
                Err(e @ ManageError::Failed(_)) => return Err(e),
                Err(e) => {
                    // No leader there (or no answer): ask another node.
                    self.leaders.forget(group);
                    last = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    match self.pick_peer_or_self(group) {
                        Some(p) => peer = p,
                        None => break,
                    }
                }
            }
        }
        Err(last)
    }

    /// This node when it hosts a replica of `group` that knows or is the
    /// leader, else a peer to ask.
    fn pick_peer_or_self(self: &Arc<Self>, group: GroupId) -> Option<Peer> {
        if let Some(g) = self.registry.get(group)
            && g.is_leader()
        {
            return Some(Peer {
                node: self.id(),
                addr: self.config.advertise_addr(),
            });
        }
        if let Some(p) = self.leader_hint(group) {
            return Some(p);
        }
        self.pick_peer(group).ok()
    }
}
