//! The coordinator: on the meta group's leader, it keeps the cluster in the
//! shape the map asks for. Every node runs the task; only the meta leader's
//! acts, so after a failover the new meta leader picks up where the old one
//! stopped: everything it does is recorded in the map *before* it is
//! carried out, and every step is idempotent.
//!
//! Each tick (`CoordinatorTimings::interval`):
//! 1. **Bootstrap.** With no map yet, write the first one: from `--peers` for
//!    a new cluster, or derived from the groups' layout for a data directory
//!    written before the map existed (nothing moves).
//! 2. **Observe.** Probe every node (`NodeStatus`): who answers, who leads
//!    which group, which groups still lack an ownership record (those get
//!    their slots `Adopt`ed). A node that has not answered for
//!    `--down-after` is *down*.
//! 3. **Resume.** Drive every recorded replica change and the recorded slot
//!    move (a task each; see [`drive_change`] and [`drive_move`]).
//! 4. **Plan.** Ask `palisade_shard::plan` for the next actions and record
//!    them (at most `max_concurrent_changes` replica changes at once, one
//!    slot move, one leader transfer).
//!
//! A replica change runs: (leader moved off a replica that leaves) → add the
//! new replica as a learner → wait until it has caught up → one
//! joint-consensus change of the voter set (never below a majority: the new
//! voter joins as the old one leaves) → remove a leaving learner → record
//! it finished. openraft users report groups stuck in joint configurations
//! when changes overlap, so a group has one change at a time and the next
//! starts only once the committed membership equals the effective one.
//!
//! Leader transfer (openraft 0.9 has none): the other voters' elections are
//! paused, the leader stops proposing and heartbeating, the followers'
//! leader lease (`election_timeout_max`) lapses, and the target campaigns.
//! Writes to the group wait about a second; LEASE reads stay safe because a
//! voter grants no vote while its lease from the old leader holds.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use palisade_group::{Command, CommandOp, GroupId, SlotCommand};
use palisade_proto::v1 as pb;
use palisade_proto::v1::peer_client::PeerClient;
use palisade_shard::{
    Action, ClusterMap, MapCommand, MapResult, MovePhase, NodeId, NodeState, Observation, Policy,
    ReplicaChange, Role, SlotMove, SlotSet, plan,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::manage::{GroupReport, ManageError, ManageReply, ManageRequest};
use crate::node::Node;
use crate::router::Peer;

/// Bytes of slot records per import entry.
const IMPORT_CHUNK_BYTES: u64 = 512 * 1024;
/// How long a new coordinator watches leaders before balancing them.
const LEADER_BALANCE_SETTLE: Duration = Duration::from_secs(5);
/// How far behind the leader's log a new replica may still be when it
/// becomes a voter: under steady writes it never has *every* entry, and
/// replication closes a gap this small within a heartbeat or two.
const CATCHUP_SLACK: u64 = 128;
/// Consecutive failures of a slot move before it is rolled back (only
/// possible before its hand-off).
const MOVE_ATTEMPTS_BEFORE_ROLLBACK: u32 = 30;

/// Starts the coordinator task.
pub(crate) fn spawn(node: &Arc<Node>) {
    let weak = Arc::downgrade(node);
    let interval = node.config.coordinator.interval;
    node.tasks()
        .spawn("coordinator", move |mut shutdown| async move {
            let mut state = Coordinator::default();
            while shutdown.sleep(interval).await {
                let Some(node) = weak.upgrade() else { return };
                let term = node
                    .meta()
                    .filter(|m| m.is_leader())
                    .map(|m| m.raft().metrics().borrow().current_term);
                match term {
                    Some(term) => state.tick(&node, term).await,
                    None => state.stand_down(),
                }
            }
            state.stand_down();
        });
}

/// Work in flight, per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Job {
    Change(GroupId),
    Move(u64),
    Transfer(GroupId),
}

/// The coordinator's memory; reset whenever this node stops leading.
#[derive(Default)]
struct Coordinator {
    /// The meta term this memory belongs to, and when it began.
    term: Option<(u64, Instant)>,
    last_seen: BTreeMap<NodeId, Instant>,
    /// Groups known to have an ownership record.
    adopted: BTreeSet<GroupId>,
    jobs: BTreeMap<Job, JoinHandle<()>>,
    /// When each group's leadership was last transferred.
    transferred: BTreeMap<GroupId, Instant>,
    /// Slots found pinned by leases from before the map, and when.
    pinned: Pins,
}

/// Slots a move found pinned (see `Rejection::Pinned`), shared with the
/// move tasks; each is tried again after [`PIN_RECHECK`].
type Pins = Arc<std::sync::Mutex<BTreeMap<palisade_shard::Slot, Instant>>>;

/// How long a pinned slot is left out of moves before it is tried again
/// (its lease may have ended).
const PIN_RECHECK: Duration = Duration::from_secs(60);

impl Coordinator {
    fn stand_down(&mut self) {
        for (_, job) in std::mem::take(&mut self.jobs) {
            job.abort();
        }
        self.term = None;
        self.last_seen.clear();
        self.adopted.clear();
    }

    async fn tick(&mut self, node: &Arc<Node>, term: u64) {
        tracing::trace!(node = node.id(), term, jobs = ?self.jobs.keys().collect::<Vec<_>>(), "coordinator tick");
        if self.term.map(|(t, _)| t) != Some(term) {
            self.stand_down();
            self.term = Some((term, Instant::now()));
        }
        self.jobs.retain(|_, j| !j.is_finished());
        let map = node.map();
        if !map.is_bootstrapped() {
            if let Err(e) = bootstrap_map(node).await {
                tracing::warn!(error = %e, "writing the first cluster map failed; retrying");
            }
            return;
        }
        let obs = self.observe(node, &map).await;
        self.adopt(node, &map, &obs).await;
        self.resume(node, &map);
        self.act(node, &map, &obs).await;
    }

    /// Probes every node; returns what the planner needs.
    async fn observe(&mut self, node: &Arc<Node>, map: &ClusterMap) -> Observed {
        let timeout = node
            .config
            .coordinator
            .interval
            .max(Duration::from_millis(300))
            * 2;
        let targets: Vec<(NodeId, String)> = map
            .nodes
            .iter()
            .filter(|(_, n)| n.state != NodeState::Removed)
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect();
        let probes = futures::future::join_all(
            targets
                .iter()
                .map(|(id, addr)| probe(node, *id, addr, timeout)),
        )
        .await;
        let now = Instant::now();
        let mut obs = Observation::default();
        let mut leaders: BTreeMap<GroupId, (u64, NodeId)> = BTreeMap::new();
        let mut serves_all = BTreeSet::new();
        let mut incarnations = Vec::new();
        for ((id, _), status) in targets.iter().zip(probes) {
            let recorded = map.nodes.get(id).map_or(0, |n| n.incarnation);
            let status = status.filter(|s| {
                let same_dir = s.incarnation == 0 || recorded == 0 || s.incarnation == recorded;
                if s.node_id != *id || !same_dir {
                    // Not the node the map knows: another process at its
                    // address, or the node restarted on a new data
                    // directory (it lost its votes and log). It is not
                    // counted as alive, so it is replaced in time.
                    tracing::error!(
                        node = id,
                        answered_as = s.node_id,
                        incarnation = format!("{:#x}", s.incarnation),
                        recorded = format!("{recorded:#x}"),
                        "a node answered with another identity or data directory than the map records; treating it as down"
                    );
                    return false;
                }
                if recorded == 0 && s.incarnation != 0 {
                    incarnations.push((*id, s.incarnation));
                }
                true
            });
            match status {
                Some(status) => {
                    self.last_seen.insert(*id, now);
                    obs.alive.insert(*id);
                    for g in status.groups {
                        let Some(r) = g.replica else { continue };
                        if r.role == pb::RaftRole::Leader as i32 {
                            let seen = leaders.entry(g.group_id).or_insert((r.term, *id));
                            if r.term >= seen.0 {
                                *seen = (r.term, *id);
                            }
                            if r.serves_all {
                                serves_all.insert(g.group_id);
                            }
                        }
                    }
                }
                None => {
                    // A node first seen in the map now (one that just
                    // registered) gets the whole `down_after` from here.
                    let last = *self.last_seen.entry(*id).or_insert(now);
                    if now.duration_since(last) > node.config.coordinator.down_after {
                        obs.down.insert(*id);
                    }
                }
            }
        }
        for (id, incarnation) in incarnations {
            let cmd = MapCommand::SetIncarnation {
                node: id,
                incarnation,
            };
            if let Err(e) = propose_map(node, cmd).await {
                tracing::debug!(node = id, error = %e, "recording a node's incarnation failed");
            }
        }
        obs.leaders = leaders.into_iter().map(|(g, (_, n))| (g, n)).collect();
        let mut pins = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
        pins.retain(|_, since| since.elapsed() < PIN_RECHECK);
        obs.pinned = SlotSet::of(pins.keys().copied());
        drop(pins);
        Observed { obs, serves_all }
    }

    /// Gives every data group without an ownership record the slots the
    /// map routes to it (groups from before the map, new ones).
    async fn adopt(&mut self, node: &Arc<Node>, map: &ClusterMap, observed: &Observed) {
        for g in map.data_groups() {
            if self.adopted.contains(&g) {
                continue;
            }
            if !observed.serves_all.contains(&g) {
                if observed.obs.leaders.contains_key(&g) {
                    self.adopted.insert(g);
                }
                continue;
            }
            let moving = map
                .moving
                .as_ref()
                .is_some_and(|m| m.from == g || m.to == g);
            if moving {
                continue;
            }
            let slots = map.slots_of(g);
            match propose_slots(node, g, SlotCommand::Adopt { slots }).await {
                Ok(_) => {
                    tracing::info!(group = g, "group adopted its slots");
                    self.adopted.insert(g);
                }
                Err(e) => tracing::debug!(group = g, error = %e, "adopting slots failed"),
            }
        }
    }

    /// Starts a task for every recorded change without one.
    fn resume(&mut self, node: &Arc<Node>, map: &ClusterMap) {
        for (g, info) in &map.groups {
            if info.change.is_some() {
                self.start(Job::Change(*g), drive_change(node.clone(), *g));
            }
        }
        if let Some(m) = &map.moving {
            let pins = self.pinned.clone();
            self.start(Job::Move(m.id), drive_move(node.clone(), m.id, pins));
        }
    }

    fn start<F>(&mut self, job: Job, work: F)
    where
        F: std::future::Future<Output = Result<(), String>> + Send + 'static,
    {
        if self.jobs.contains_key(&job) {
            return;
        }
        let handle = tokio::spawn(async move {
            if let Err(e) = work.await {
                tracing::info!(?job, error = %e, "coordinator step failed; it is retried");
            }
        });
        self.jobs.insert(job, handle);
    }

    /// Records the planner's next actions.
    async fn act(&mut self, node: &Arc<Node>, map: &ClusterMap, observed: &Observed) {
        let policy = Policy {
            max_move_slots: node.config.coordinator.max_move_slots,
        };
        let mut changes = map.groups.values().filter(|g| g.change.is_some()).count();
        for action in plan(map, &observed.obs, &policy) {
            let cmd = match action {
                Action::MarkServing(n) => set_state(n, NodeState::Serving),
                Action::MarkDraining(n) => {
                    tracing::warn!(node = n, "node down too long: draining it");
                    set_state(n, NodeState::Draining)
                }
                Action::MarkRemoved(n) => set_state(n, NodeState::Removed),
                Action::ChangeReplicas(spec) => {
                    if changes >= node.config.coordinator.max_concurrent_changes {
                        continue;
                    }
                    changes += 1;
                    MapCommand::BeginReplicaChange {
                        group: spec.group,
                        add: spec.add,
                        remove: spec.remove,
                        promote: spec.promote,
                        demote: spec.demote,
                    }
                }
                Action::TransferLeader { group, to } => {
                    // Leaders are balanced only once this coordinator has
                    // watched them for a while (not in the first elections
                    // after a start), and each group not too often.
                    let settling = self
                        .term
                        .is_none_or(|(_, since)| since.elapsed() < LEADER_BALANCE_SETTLE);
                    let cooling = settling
                        || self.transferred.get(&group).is_some_and(|t| {
                            t.elapsed() < node.config.coordinator.transfer_cooldown
                        });
                    let busy = self.jobs.keys().any(|j| matches!(j, Job::Transfer(_)));
                    if !cooling && !busy {
                        self.transferred.insert(group, Instant::now());
                        let n = node.clone();
                        self.start(Job::Transfer(group), async move {
                            transfer_leader(&n, group, to).await
                        });
                    }
                    continue;
                }
                Action::CreateGroup { nodes } => MapCommand::CreateGroup { nodes },
                Action::BeginMove { slots, from, to } => MapCommand::BeginMove { slots, from, to },
                Action::DropGroup(group) => MapCommand::DropGroup { group },
            };
            match propose_map(node, cmd.clone()).await {
                Ok(r) => {
                    tracing::info!(command = ?summary(&cmd), result = ?r, "cluster map changed")
                }
                Err(e) => {
                    tracing::debug!(command = ?summary(&cmd), error = %e, "cluster map change refused")
                }
            }
        }
    }
}

/// What one round of probes saw.
struct Observed {
    obs: Observation,
    /// Groups whose leader has no ownership record yet.
    serves_all: BTreeSet<GroupId>,
}

fn set_state(node: NodeId, state: NodeState) -> MapCommand {
    MapCommand::SetNodeState { node, state }
}

/// A short description of a map command for logs (a bootstrap map would
/// print thousands of route entries).
fn summary(cmd: &MapCommand) -> String {
    match cmd {
        MapCommand::Bootstrap(m) => format!("Bootstrap(epoch {})", m.epoch),
        MapCommand::BeginMove { slots, from, to } => {
            format!("BeginMove({} from {from} to {to})", slots.ranges_text())
        }
        other => format!("{other:?}"),
    }
}

/// One node's status, or `None` when it does not answer in time.
async fn probe(
    node: &Arc<Node>,
    id: NodeId,
    addr: &str,
    timeout: Duration,
) -> Option<pb::NodeStatusResponse> {
    if id == node.id() {
        return tokio::time::timeout(timeout, node.local_status())
            .await
            .ok();
    }
    let channel = node.channels.get(addr).ok()?;
    let mut req = tonic::Request::new(pb::NodeStatusRequest {});
    req.set_timeout(timeout);
    match tokio::time::timeout(timeout, PeerClient::new(channel).node_status(req)).await {
        Ok(Ok(r)) => Some(r.into_inner()),
        _ => {
            node.channels.drop_channel(addr);
            None
        }
    }
}

/// Proposes a change to the cluster map on this node (the meta leader).
pub(crate) async fn propose_map(node: &Arc<Node>, cmd: MapCommand) -> Result<MapResult, String> {
    propose_map_typed(node, cmd)
        .await
        .map_err(|e| e.to_string())
}

/// Like [`propose_map`], keeping the error typed: a refusal by the map is
/// `Rejected`; losing the meta leadership meanwhile is `NotLeader` (retry).
pub(crate) async fn propose_map_typed(
    node: &Arc<Node>,
    cmd: MapCommand,
) -> Result<MapResult, palisade_group::GroupError> {
    let meta = node.meta().ok_or(palisade_group::GroupError::NotLeader {
        group: palisade_shard::META_GROUP,
        leader: None,
    })?;
    let res = meta
        .write(
            Command {
                request_id: None,
                op: CommandOp::Map(cmd),
            },
            node.config.write_timeout,
        )
        .await?;
    if let Some(r) = res.rejected {
        return Err(palisade_group::GroupError::Rejected(r));
    }
    match res.results.first() {
        Some(palisade_group::OpResult::Map(r)) => Ok(*r),
        _ => Ok(MapResult::Done),
    }
}

/// Why a slot command did not go through.
#[derive(Debug, thiserror::Error)]
enum SlotsError {
    /// The group applied it and refused it (it changed nothing).
    #[error("refused: {0}")]
    Refused(String),
    /// Refused: these slots hold records of a lease from before the map.
    #[error("refused: slots {} are pinned by a lease from before the cluster map", .0.ranges_text())]
    Pinned(SlotSet),
    /// It may not have reached the group, or its outcome is unknown.
    #[error("{0}")]
    Failed(String),
}

impl From<String> for SlotsError {
    fn from(e: String) -> Self {
        SlotsError::Failed(e)
    }
}

impl From<SlotsError> for String {
    fn from(e: SlotsError) -> Self {
        e.to_string()
    }
}

/// Proposes a slot command at `group`'s leader; returns the entry's
/// revision.
async fn propose_slots(
    node: &Arc<Node>,
    group: GroupId,
    cmd: SlotCommand,
) -> Result<u64, SlotsError> {
    let reply = node
        .manage_leader(
            group,
            ManageRequest::Propose {
                op: CommandOp::Slots(cmd),
            },
            node.config.write_timeout,
        )
        .await
        .map_err(|e| SlotsError::Failed(e.to_string()))?;
    match reply {
        ManageReply::Applied(res) => match res.rejected {
            Some(palisade_group::Rejection::Pinned { slots, .. }) => Err(SlotsError::Pinned(slots)),
            Some(r) => Err(SlotsError::Refused(
                palisade_group::GroupError::Rejected(r).to_string(),
            )),
            None => Ok(res.revision),
        },
        other => Err(SlotsError::Failed(format!("unexpected reply {other:?}"))),
    }
}

/// The leader's account of `group`.
async fn leader_report(node: &Arc<Node>, group: GroupId) -> Result<GroupReport, String> {
    match node
        .manage_leader(group, ManageRequest::LeaderStatus, node.peer_timeout())
        .await
    {
        Ok(ManageReply::Status(r)) if r.is_leader => Ok(*r),
        Ok(ManageReply::Status(_)) => Err(format!("group {group} has no leader right now")),
        Ok(other) => Err(format!("unexpected reply {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// The first map: from the bootstrap peers, or derived from a data
/// directory written before the map.
async fn bootstrap_map(node: &Arc<Node>) -> Result<(), String> {
    let meta = node.meta().ok_or("no meta replica")?;
    let term = meta.raft().metrics().borrow().current_term;
    let map = if let Some(groups) = node.legacy_groups() {
        let addrs = meta.member_addrs();
        let view = meta.membership_view().await;
        let pick = |ids: &BTreeSet<u64>| -> BTreeMap<NodeId, String> {
            ids.iter()
                .filter_map(|id| Some((*id, addrs.get(id)?.clone())))
                .collect()
        };
        let voters = pick(&view.voters);
        let learners = pick(&view.learners);
        let cluster_id = cluster_id(&voters, groups, term);
        ClusterMap::legacy(cluster_id, &voters, &learners, groups).map_err(|e| e.to_string())?
    } else if !node.config.peers.is_empty() {
        let peers = &node.config.peers;
        let cluster_id = cluster_id(peers, node.config.data_groups, term);
        ClusterMap::bootstrap(
            cluster_id,
            peers,
            node.config.data_groups,
            node.config.replicas,
        )
        .map_err(|e| e.to_string())?
    } else {
        return Err("this node neither bootstrapped the cluster nor holds old data".into());
    };
    propose_map(node, MapCommand::Bootstrap(Box::new(map))).await?;
    tracing::info!(node = node.id(), "wrote the first cluster map");
    Ok(())
}

/// A cluster id derived from what bootstrapped it (no clock, no OS
/// randomness: the simulation replays it).
fn cluster_id(nodes: &BTreeMap<NodeId, String>, groups: u64, term: u64) -> u64 {
    palisade_shard::fnv1a64(format!("{nodes:?}/{groups}/{term}").as_bytes()).max(1)
}

/// Carries out the recorded replica change of `group` (see the module
/// doc); returns once it is finished (or aborted) in the map.
async fn drive_change(node: Arc<Node>, group: GroupId) -> Result<(), String> {
    let started = Instant::now();
    let catchup = node.config.coordinator.catchup_timeout;
    loop {
        // Act only as the confirmed meta leader, on the map as of now.
        let map = confirm_leadership(&node).await?;
        let Some(info) = map.groups.get(&group) else {
            return Ok(());
        };
        let Some(change) = info.change else {
            return Ok(());
        };
        let report = match leader_report(&node, group).await {
            Ok(r) => r,
            Err(e) => {
                if started.elapsed() > catchup {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
        };
        match next_change_step(&map, group, &change, &report) {
            ChangeStep::MoveLeader => {
                let to = info
                    .replicas
                    .iter()
                    .filter(|(id, r)| {
                        r.role == Role::Voter
                            && Some(**id) != change.remove
                            && Some(**id) != change.demote
                    })
                    .map(|(_, r)| r.node)
                    .find(|n| {
                        map.nodes
                            .get(n)
                            .is_some_and(|i| i.state == NodeState::Serving)
                    })
                    .ok_or("no voter to hand the leadership to")?;
                transfer_leader(&node, group, to).await?;
            }
            ChangeStep::AddLearner { replica, node: at } => {
                let addr = map.addr_of(at).ok_or("the new replica's node is unknown")?;
                manage(
                    &node,
                    group,
                    ManageRequest::AddLearner {
                        replica,
                        addr: addr.to_string(),
                    },
                )
                .await?;
            }
            ChangeStep::CatchUp { behind } => {
                let add = change.add.ok_or("catching up without an added replica")?;
                let gone = map
                    .nodes
                    .get(&add.node)
                    .is_none_or(|n| matches!(n.state, NodeState::Draining | NodeState::Removed));
                if gone || started.elapsed() > catchup {
                    tracing::warn!(
                        group,
                        replica = add.replica,
                        behind,
                        gone,
                        "new replica did not catch up: rolling the change back"
                    );
                    return abort_change(&node, group, add.replica).await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            ChangeStep::SetVoters {
                voters,
                keep_removed,
            } => {
                manage(
                    &node,
                    group,
                    ManageRequest::ChangeVoters {
                        voters,
                        keep_removed,
                    },
                )
                .await?;
            }
            ChangeStep::RemoveLearner(r) => {
                manage(
                    &node,
                    group,
                    ManageRequest::RemoveLearners {
                        replicas: [r].into(),
                    },
                )
                .await?;
            }
            ChangeStep::Finish => {
                propose_map(&node, MapCommand::FinishReplicaChange { group }).await?;
                tracing::info!(group, ?change, "replica change done");
                return Ok(());
            }
        }
    }
}

/// Sends a leader-only management request.
async fn manage(node: &Arc<Node>, group: GroupId, req: ManageRequest) -> Result<(), String> {
    node.manage_leader(group, req, node.config.write_timeout)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Rolls back a change whose new replica is still a learner.
async fn abort_change(node: &Arc<Node>, group: GroupId, replica: u64) -> Result<(), String> {
    let report = leader_report(node, group).await?;
    if report.voters.contains(&replica) {
        return Err("the new replica is a voter already; the change goes forward".into());
    }
    if report.learners.contains(&replica) {
        manage(
            node,
            group,
            ManageRequest::RemoveLearners {
                replicas: [replica].into(),
            },
        )
        .await?;
    }
    propose_map(node, MapCommand::AbortReplicaChange { group }).await?;
    Ok(())
}

/// The next step of a replica change, given the map and the leader's view.
#[derive(Debug, PartialEq, Eq)]
enum ChangeStep {
    /// The leader is leaving (or demoted): hand leadership to another voter.
    MoveLeader,
    AddLearner {
        replica: u64,
        node: NodeId,
    },
    /// The new replica is `behind` entries behind the leader.
    CatchUp {
        behind: u64,
    },
    SetVoters {
        voters: BTreeSet<u64>,
        keep_removed: bool,
    },
    RemoveLearner(u64),
    Finish,
}

fn next_change_step(
    map: &ClusterMap,
    group: GroupId,
    change: &ReplicaChange,
    report: &GroupReport,
) -> ChangeStep {
    let info = &map.groups[&group];
    let leaving = |r: u64| Some(r) == change.remove || Some(r) == change.demote;
    // A leader that leaves hands over first, if another voter can take
    // over; a lone voter instead steps down when the configuration without
    // it commits. A joint configuration is finished first either way (a
    // voter of its new half cannot win while the old half's leader leads).
    let settled = !report.joint && report.committed;
    if settled && leaving(report.replica) && report.voters.iter().any(|v| !leaving(*v)) {
        return ChangeStep::MoveLeader;
    }
    let members: BTreeSet<u64> = report.voters.union(&report.learners).copied().collect();
    if let Some(add) = change.add {
        if !members.contains(&add.replica) {
            return ChangeStep::AddLearner {
                replica: add.replica,
                node: add.node,
            };
        }
        if add.role == Role::Voter && !report.voters.contains(&add.replica) {
            let matched = report.matched.get(&add.replica).copied().unwrap_or(0);
            if matched + CATCHUP_SLACK < report.last_log_index {
                return ChangeStep::CatchUp {
                    behind: report.last_log_index - matched,
                };
            }
        }
    }
    // The voters the change ends with, from the map (not from a joint
    // configuration's union).
    let mut voters = info.voters();
    if let Some(add) = change.add
        && add.role == Role::Voter
    {
        voters.insert(add.replica);
    }
    if let Some(p) = change.promote {
        voters.insert(p);
    }
    for r in [change.remove, change.demote].into_iter().flatten() {
        voters.remove(&r);
    }
    if report.voters != voters || report.joint || !report.committed {
        return ChangeStep::SetVoters {
            voters,
            keep_removed: change.demote.is_some(),
        };
    }
    if let Some(r) = change.remove
        && report.learners.contains(&r)
    {
        return ChangeStep::RemoveLearner(r);
    }
    ChangeStep::Finish
}

/// Hands `group`'s leadership to its replica on node `to` (see the module
/// doc). Returns once `to` leads, or fails after putting things back.
pub(crate) async fn transfer_leader(
    node: &Arc<Node>,
    group: GroupId,
    to: NodeId,
) -> Result<(), String> {
    let map = node.map();
    let info = map.groups.get(&group).ok_or("no such group")?;
    let target = info
        .replicas
        .iter()
        .find(|(_, r)| r.node == to && r.role == Role::Voter)
        .map(|(id, _)| *id)
        .ok_or_else(|| format!("node {to} holds no voter of group {group}"))?;
    let peer_of = |n: NodeId| -> Option<Peer> {
        Some(Peer {
            node: n,
            addr: map.addr_of(n)?.to_string(),
        })
    };
    let target_peer = peer_of(to).ok_or("the target node has no address")?;
    let report = leader_report(node, group).await?;
    if report.replica == target {
        return Ok(());
    }
    let leader_peer = peer_of(report.node).ok_or("the leader's node has no address")?;
    // The target must have the whole log, or it cannot win: nearly all of
    // it now, the rest while the hand-over stops new entries.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = leader_report(node, group).await?;
        if r.replica != report.replica {
            return Err("the leadership moved meanwhile".into());
        }
        if r.matched.get(&target).copied().unwrap_or(0) + CATCHUP_SLACK >= r.last_log_index {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("node {to} did not catch up with the leader"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lease = node.config.timings.election_max;
    // Every voter but the target stops campaigning for the hand-over, the
    // old leader too: once the target's first vote request makes it step
    // down, it would otherwise campaign again at once and (holding the
    // whole log, and the followers' leases) win back the leadership before
    // the target's next try — over and over.
    let others: Vec<Peer> = info
        .replicas
        .iter()
        .filter(|(id, r)| r.role == Role::Voter && **id != target)
        .filter_map(|(_, r)| peer_of(r.node))
        .collect();
    // Longer than the whole transfer below (lease + 150 ms, then up to
    // three leases of campaigning, plus calls), so neither the pause nor
    // the hand-over lapses while it runs; both end by themselves if this
    // coordinator never comes back.
    let pause_ms = (lease * 6 + Duration::from_secs(1)).as_millis() as u64;
    let t = node.peer_timeout();
    for p in &others {
        let _ = node
            .manage(
                p,
                group,
                ManageRequest::SetElections {
                    enabled: false,
                    for_ms: pause_ms,
                },
                t,
            )
            .await;
    }
    let mut handover = None;
    let result = async {
        let started = node
            .manage(
                &leader_peer,
                group,
                ManageRequest::BeginHandover {
                    to: target,
                    for_ms: pause_ms,
                },
                t,
            )
            .await
            .map_err(|e| e.to_string())?;
        if let ManageReply::HandoverStarted(number) = started {
            handover = Some(number);
        }
        // Followers refuse votes while their lease from the old leader
        // holds (openraft: `election_timeout_max` since its last message).
        tokio::time::sleep(lease + Duration::from_millis(150)).await;
        let deadline = Instant::now() + lease * 3;
        loop {
            let _ = node
                .manage(&target_peer, group, ManageRequest::Campaign, t)
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Ok(ManageReply::Status(r)) = node
                .manage(&target_peer, group, ManageRequest::Status, t)
                .await
                && r.is_leader
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("node {to} did not win the election"));
            }
        }
    }
    .await;
    if let Some(number) = handover {
        let _ = node
            .manage(
                &leader_peer,
                group,
                ManageRequest::EndHandover { number },
                t,
            )
            .await;
    }
    for p in &others {
        let _ = node
            .manage(
                p,
                group,
                ManageRequest::SetElections {
                    enabled: true,
                    for_ms: 0,
                },
                t,
            )
            .await;
    }
    if result.is_ok() {
        node.leaders.remember(group, target_peer);
        tracing::info!(group, to, "leadership transferred");
    }
    result
}

/// Carries a recorded slot move through its phases (see
/// `palisade_group`'s `slots` module for what each does).
///
/// Every round first confirms this node still leads the meta group and
/// rereads the map, so a coordinator that lost its leadership stops within
/// a round; the group side fences whatever it sent meanwhile (see
/// `palisade_group::slots::decide`).
async fn drive_move(node: Arc<Node>, id: u64, pins: Pins) -> Result<(), String> {
    let mut failures = 0u32;
    loop {
        let map = confirm_leadership(&node).await?;
        let Some(m) = map.moving.clone().filter(|m| m.id == id) else {
            return Ok(());
        };
        match move_step(&node, &map, &m).await {
            Ok(()) => failures = 0,
            Err(SlotsError::Pinned(slots)) => {
                // Nothing was frozen: roll back now, and plan the next
                // move without these slots.
                tracing::warn!(id, slots = %slots.ranges_text(), "slots pinned by a lease from before the cluster map stay where they are");
                let now = Instant::now();
                pins.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(slots.iter().map(|s| (s, now)));
                if let Err(e) = set_phase(&node, id, MovePhase::Aborting).await {
                    tracing::info!(id, error = %e, "recording the roll-back failed");
                }
            }
            Err(e) => {
                failures += 1;
                tracing::info!(id, phase = m.phase.name(), failures, error = %e, "slot move step failed");
                if failures >= MOVE_ATTEMPTS_BEFORE_ROLLBACK && m.phase < MovePhase::Handoff {
                    tracing::warn!(id, from = m.from, to = m.to, "rolling back a slot move");
                    if let Err(e) = set_phase(&node, id, MovePhase::Aborting).await {
                        tracing::info!(id, error = %e, "recording the roll-back failed");
                    }
                    failures = 0;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The map as of now, once this node has confirmed with a quorum that it
/// still leads the meta group.
async fn confirm_leadership(node: &Arc<Node>) -> Result<Arc<ClusterMap>, String> {
    let meta = node.meta().ok_or("no meta replica here")?;
    meta.read_index(node.config.read_timeout)
        .await
        .map_err(|e| format!("not confirmed as the meta leader: {e}"))?;
    Ok(node.map())
}

/// Carries out move `m`'s current phase and records the next one.
async fn move_step(node: &Arc<Node>, map: &ClusterMap, m: &SlotMove) -> Result<(), SlotsError> {
    let id = m.id;
    tracing::debug!(
        node = node.id(),
        id,
        phase = m.phase.name(),
        "slot move step"
    );
    match m.phase {
        MovePhase::Freeze => {
            // A group from before the map serves every key until it has an
            // ownership record: both ends get theirs first (a no-op for a
            // group that has one).
            for g in [m.from, m.to] {
                let slots = map.slots_of(g);
                propose_slots(node, g, SlotCommand::Adopt { slots }).await?;
            }
            propose_slots(
                node,
                m.from,
                SlotCommand::Freeze {
                    move_id: id,
                    slots: m.slots.clone(),
                },
            )
            .await?;
            Ok(set_phase(node, id, MovePhase::Copy).await?)
        }
        MovePhase::Copy => {
            let (attempt, chunks) = copy_slots(node, m).await?;
            propose_map(
                node,
                MapCommand::CopyDone {
                    id,
                    attempt,
                    chunks,
                },
            )
            .await
            .map(|_| ())
            .map_err(SlotsError::Failed)
        }
        MovePhase::Handoff => {
            // (A repeat of the hand-off changes nothing and tells the
            // source's revision now: still above every revision the data
            // carries.)
            let revision = propose_slots(node, m.from, handoff(m)).await?;
            propose_map(node, MapCommand::HandedOff { id, revision }).await?;
            Ok(())
        }
        MovePhase::Commit => {
            // From the recorded hand-off: the target commits even if the
            // source is down by now.
            let Some(source_revision) = m.handoff_revision else {
                return Err(SlotsError::Failed(format!(
                    "move {id} reached its commit without a hand-off revision"
                )));
            };
            let Some((attempt, chunks)) = m.copied else {
                return Err(SlotsError::Failed(format!(
                    "move {id} reached its commit without a copy"
                )));
            };
            let commit = SlotCommand::ImportCommit {
                move_id: id,
                attempt,
                chunks,
                slots: m.slots.clone(),
                from: m.from,
                source_revision,
            };
            match propose_slots(node, m.to, commit).await {
                Ok(_) => {}
                Err(SlotsError::Refused(why)) => {
                    // The target does not hold the recorded copy (a
                    // coordinator that lost its leadership mixed in). The
                    // source still has every record and takes no writes:
                    // copy again, record it, and commit on the next round.
                    tracing::warn!(id, why, "the target's copy does not match; copying again");
                    let (attempt, chunks) = copy_slots(node, m).await?;
                    propose_map(
                        node,
                        MapCommand::CopyDone {
                            id,
                            attempt,
                            chunks,
                        },
                    )
                    .await?;
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
            propose_map(node, MapCommand::SwitchRoute { id }).await?;
            Ok(())
        }
        MovePhase::Release => {
            propose_slots(
                node,
                m.from,
                SlotCommand::Release {
                    move_id: id,
                    slots: m.slots.clone(),
                },
            )
            .await?;
            propose_map(node, MapCommand::EndMove { id }).await?;
            tracing::info!(
                id,
                from = m.from,
                to = m.to,
                slots = m.slots.len(),
                "slot move done"
            );
            Ok(())
        }
        MovePhase::Aborting => Ok(roll_back_move(node, m).await?),
    }
}

fn handoff(m: &SlotMove) -> SlotCommand {
    SlotCommand::Handoff {
        move_id: m.id,
        slots: m.slots.clone(),
        to: m.to,
    }
}

async fn set_phase(node: &Arc<Node>, id: u64, phase: MovePhase) -> Result<(), String> {
    propose_map(node, MapCommand::SetMovePhase { id, phase })
        .await
        .map(|_| ())
}

/// Copies the frozen slots' records from the source's leader into the
/// target, staged, as a new copy attempt; returns the attempt and how many
/// chunks it sent.
async fn copy_slots(node: &Arc<Node>, m: &SlotMove) -> Result<(u64, u64), String> {
    let id = m.id;
    let attempt = match propose_map(node, MapCommand::BeginCopy { id }).await? {
        MapResult::Attempt(a) => a,
        other => return Err(format!("unexpected answer {other:?} to a copy attempt")),
    };
    propose_slots(
        node,
        m.to,
        SlotCommand::ImportBegin {
            move_id: id,
            attempt,
            slots: m.slots.clone(),
        },
    )
    .await?;
    let mut cursor = Vec::new();
    let mut copied = 0usize;
    let mut seq = 0u64;
    loop {
        let reply = node
            .manage_leader(
                m.from,
                ManageRequest::Export {
                    slots: m.slots.clone(),
                    from: cursor.clone(),
                    max_bytes: IMPORT_CHUNK_BYTES,
                },
                node.config.write_timeout,
            )
            .await
            .map_err(|e: ManageError| e.to_string())?;
        let ManageReply::Records { records, next } = reply else {
            return Err("unexpected reply to an export".into());
        };
        copied += records.len();
        if !records.is_empty() {
            propose_slots(
                node,
                m.to,
                SlotCommand::ImportChunk {
                    move_id: id,
                    attempt,
                    seq,
                    slots: m.slots.clone(),
                    records,
                },
            )
            .await?;
            seq += 1;
        }
        match next {
            Some(k) => cursor = k,
            None => break,
        }
    }
    tracing::info!(
        id,
        attempt,
        from = m.from,
        to = m.to,
        records = copied,
        chunks = seq,
        "slot data copied"
    );
    Ok((attempt, seq))
}

/// Rolls back a move recorded as `Aborting`: the source takes writes
/// again, the target drops its staged copy, the map forgets the move.
/// The target's part is best effort: a staged copy left behind is never
/// served, and the next import into that group replaces it.
async fn roll_back_move(node: &Arc<Node>, m: &SlotMove) -> Result<(), String> {
    let id = m.id;
    propose_slots(
        node,
        m.from,
        SlotCommand::Unfreeze {
            move_id: id,
            slots: m.slots.clone(),
        },
    )
    .await?;
    if node.map().groups.contains_key(&m.to) {
        let abort = SlotCommand::ImportAbort {
            move_id: id,
            slots: m.slots.clone(),
        };
        if let Err(e) = propose_slots(node, m.to, abort).await {
            tracing::warn!(id, group = m.to, error = %e, "the target kept its staged copy");
        }
    }
    propose_map(node, MapCommand::AbortMove { id }).await?;
    tracing::warn!(id, from = m.from, to = m.to, "slot move rolled back");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_shard::{AddReplica, META_GROUP};

    fn report(
        replica: u64,
        voters: &[u64],
        learners: &[u64],
        matched: &[(u64, u64)],
    ) -> GroupReport {
        GroupReport {
            replica,
            is_leader: true,
            voters: voters.iter().copied().collect(),
            learners: learners.iter().copied().collect(),
            committed: true,
            last_log_index: 1000,
            matched: matched.iter().copied().collect(),
            ..GroupReport::default()
        }
    }

    #[test]
    fn a_replica_change_steps_from_learner_to_joint_change_to_finish() {
        let nodes: BTreeMap<u64, String> = (1..=4).map(|i| (i, format!("n{i}:1"))).collect();
        let map = ClusterMap::bootstrap(1, &nodes, 1, 3).unwrap();
        let new = 1 << 20;
        let change = ReplicaChange {
            add: Some(AddReplica {
                replica: new,
                node: 4,
                role: Role::Voter,
            }),
            remove: Some(3),
            promote: None,
            demote: None,
        };
        let step = |r: &GroupReport| next_change_step(&map, 1, &change, r);
        assert_eq!(
            step(&report(3, &[1, 2, 3], &[], &[])),
            ChangeStep::MoveLeader,
            "a leaving leader hands over first"
        );
        assert_eq!(
            step(&report(1, &[1, 2, 3], &[], &[])),
            ChangeStep::AddLearner {
                replica: new,
                node: 4
            }
        );
        assert_eq!(
            step(&report(1, &[1, 2, 3], &[new], &[(new, 60)])),
            ChangeStep::CatchUp { behind: 940 }
        );
        assert_eq!(
            step(&report(
                1,
                &[1, 2, 3],
                &[new],
                &[(new, 1000 - CATCHUP_SLACK)]
            )),
            ChangeStep::SetVoters {
                voters: [1, 2, new].into(),
                keep_removed: false
            }
        );
        let mut joint = report(1, &[1, 2, new], &[], &[]);
        joint.joint = true;
        assert!(
            matches!(step(&joint), ChangeStep::SetVoters { .. }),
            "a joint config is finished first"
        );
        let mut uncommitted = report(1, &[1, 2, new], &[], &[]);
        uncommitted.committed = false;
        assert!(matches!(step(&uncommitted), ChangeStep::SetVoters { .. }));
        assert_eq!(step(&report(1, &[1, 2, new], &[], &[])), ChangeStep::Finish);
    }

    #[test]
    fn a_lone_leaving_voter_does_not_wait_for_a_successor_to_lead() {
        // Replication 1: the only voter moves to node 2. No other voter
        // can take the leadership, so the change goes ahead and the old
        // voter steps down once the configuration without it commits.
        let nodes: BTreeMap<u64, String> = (1..=2).map(|i| (i, format!("n{i}:1"))).collect();
        let map = ClusterMap::bootstrap(1, &nodes, 1, 1).unwrap();
        let group = 1;
        let lone = *map.groups[&group].voters().iter().next().unwrap();
        let to = if map.groups[&group].replicas[&lone].node == 1 {
            2
        } else {
            1
        };
        let new = 1 << 20;
        let change = ReplicaChange {
            add: Some(AddReplica {
                replica: new,
                node: to,
                role: Role::Voter,
            }),
            remove: Some(lone),
            promote: None,
            demote: None,
        };
        let step = |r: &GroupReport| next_change_step(&map, group, &change, r);
        assert_eq!(
            step(&report(lone, &[lone], &[], &[])),
            ChangeStep::AddLearner {
                replica: new,
                node: to
            }
        );
        assert_eq!(
            step(&report(lone, &[lone], &[new], &[(new, 1000)])),
            ChangeStep::SetVoters {
                voters: [new].into(),
                keep_removed: false
            }
        );
        // Cut off between the joint and the final configuration: the old
        // voter still leads {lone, new}; finishing the change (not handing
        // the leadership to a replica the map does not list yet) is next.
        let mut joint = report(lone, &[lone, new], &[], &[(new, 1000)]);
        joint.joint = true;
        assert_eq!(
            step(&joint),
            ChangeStep::SetVoters {
                voters: [new].into(),
                keep_removed: false
            }
        );
    }

    #[test]
    fn demoting_a_meta_voter_keeps_it_as_a_learner() {
        let nodes: BTreeMap<u64, String> = (1..=5).map(|i| (i, format!("n{i}:1"))).collect();
        let map = ClusterMap::bootstrap(1, &nodes, 1, 3).unwrap();
        let change = ReplicaChange {
            add: None,
            remove: None,
            promote: None,
            demote: Some(5),
        };
        let step = next_change_step(
            &map,
            META_GROUP,
            &change,
            &report(1, &[1, 2, 3, 4, 5], &[], &[]),
        );
        assert_eq!(
            step,
            ChangeStep::SetVoters {
                voters: [1, 2, 3, 4].into(),
                keep_removed: true
            }
        );
        let done = next_change_step(
            &map,
            META_GROUP,
            &change,
            &report(1, &[1, 2, 3, 4], &[5], &[]),
        );
        assert_eq!(done, ChangeStep::Finish);
    }
}
