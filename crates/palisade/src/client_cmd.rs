//! Client subcommands: get, history, put, del, scan, txn, cluster
//! status / compact / add-learner.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use palisade_client::{Client, proto as pb};

/// Where the cluster is. The default covers a local `palisade demo` of up
/// to five nodes, so it keeps working when some of them are down.
#[derive(Args, Clone)]
pub struct Conn {
    /// Comma-separated HOST:PORT of some nodes.
    #[arg(
        long,
        env = "PALISADE_ENDPOINTS",
        default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003,127.0.0.1:7004,127.0.0.1:7005",
        value_delimiter = ','
    )]
    pub endpoints: Vec<String>,
}

impl Conn {
    async fn client(&self) -> anyhow::Result<Client> {
        Client::connect(self.endpoints.clone())
            .await
            .with_context(|| format!("cannot reach the cluster at {}", self.endpoints.join(",")))
    }
}

/// Read consistency levels on the command line.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Level {
    Linearizable,
    Lease,
    Session,
    Bounded,
    Stale,
}

#[derive(Args)]
pub struct GetArgs {
    pub key: String,
    /// Print the key's metadata and the consistency receipt as JSON.
    #[arg(long)]
    pub json: bool,
    /// How fresh the read must be.
    #[arg(long, value_enum, default_value = "linearizable")]
    pub consistency: Level,
    /// For --consistency bounded: the staleness allowed, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub max_staleness_ms: u64,
    /// A session token (`group:revision,...`, as printed by put/del/txn) for
    /// --consistency session: the read sees at least those writes.
    #[arg(long, value_parser = palisade_client::parse_session)]
    pub session: Option<pb::SessionToken>,
    /// Only answer from a replica that has applied this revision.
    #[arg(long, default_value_t = 0)]
    pub min_revision: u64,
    /// Read the key as it was at this revision of its group (any replica
    /// that has applied it answers; below the compaction point: error).
    #[arg(long, default_value_t = 0)]
    pub at_revision: u64,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args)]
pub struct HistoryArgs {
    pub key: String,
    #[command(flatten)]
    pub conn: Conn,
}

/// Write acknowledgement levels on the command line.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Ack {
    /// Committed on a majority and applied on the leader.
    Majority,
    /// Also applied on every voter and learner (bounded wait).
    All,
}

impl Ack {
    fn proto(self) -> i32 {
        match self {
            Ack::Majority => pb::WriteAck::Majority as i32,
            Ack::All => pb::WriteAck::All as i32,
        }
    }
}

#[derive(Args)]
pub struct PutArgs {
    pub key: String,
    pub value: String,
    /// When the write is acknowledged.
    #[arg(long, value_enum, default_value = "majority")]
    pub ack: Ack,
    /// Write only while NAME:TOKEN is the lock's current fencing token (as
    /// printed by `palisade lock`, or $PALISADE_FENCE inside it).
    #[arg(long, value_parser = palisade_client::FencingToken::parse)]
    pub fence: Option<palisade_client::FencingToken>,
    /// Attach the key to this lease: it is deleted when the lease ends.
    #[arg(long, default_value_t = 0)]
    pub lease: u64,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args)]
pub struct DelArgs {
    pub key: String,
    #[arg(long, value_enum, default_value = "majority")]
    pub ack: Ack,
    #[arg(long, value_parser = palisade_client::FencingToken::parse)]
    pub fence: Option<palisade_client::FencingToken>,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args)]
pub struct ScanArgs {
    /// Keys starting with this prefix.
    #[arg(long, conflicts_with_all = ["from", "to"])]
    pub prefix: Option<String>,
    /// First key of the range (inclusive).
    #[arg(long)]
    pub from: Option<String>,
    /// End of the range (exclusive).
    #[arg(long)]
    pub to: Option<String>,
    /// Maximum number of keys (0: server default of 1000).
    #[arg(long, default_value_t = 0)]
    pub limit: u32,
    /// Print keys only.
    #[arg(long)]
    pub keys_only: bool,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args)]
pub struct TxnArgs {
    #[command(subcommand)]
    pub op: TxnOp,
}

#[derive(Subcommand)]
pub enum TxnOp {
    /// Set KEY to NEW if its value is --expect (or it is absent, with
    /// --absent). Exits 0 when swapped, 1 when the comparison failed.
    Cas {
        key: String,
        new: String,
        /// The value KEY must currently hold.
        #[arg(long, required_unless_present = "absent", conflicts_with = "absent")]
        expect: Option<String>,
        /// Swap only if KEY does not exist.
        #[arg(long)]
        absent: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    pub op: ClusterOp,
}

#[derive(Subcommand)]
pub enum ClusterOp {
    /// Show every group's leader, term and indexes on every node.
    Status {
        /// Print the raw status as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Drop a group's history below REVISION (reads below it then fail).
    Compact {
        group: u64,
        revision: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Register a node (started with `palisade start --learner`, or any
    /// fresh node) as a read replica of some data groups (default: all).
    AddLearner {
        id: u64,
        addr: String,
        #[arg(long, value_delimiter = ',')]
        groups: Vec<u64>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Change the number of data groups of the hash keyspace; slots move
    /// between groups online (writes to a moving slot wait a moment).
    /// Returns once recorded; `cluster status` shows the progress.
    SetGroups {
        groups: u32,
        #[command(flatten)]
        conn: Conn,
    },
    /// Move GROUP's voter on node FROM to node TO (learner, catch-up, joint
    /// consensus). Returns once recorded.
    MoveReplica {
        group: u64,
        from: u64,
        to: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Hand GROUP's leadership to its replica on NODE (writes to the group
    /// pause for about one election timeout).
    TransferLeader {
        group: u64,
        node: u64,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Args)]
pub struct NodeArgs {
    #[command(subcommand)]
    pub op: NodeOp,
}

#[derive(Subcommand)]
pub enum NodeOp {
    /// Move every replica off a live node, then mark it removed (it may be
    /// stopped afterwards). Returns once recorded; `cluster status` shows
    /// the progress.
    Drain {
        id: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Remove a dead node: its groups are re-replicated from the other
    /// replicas, then it is marked removed and never rejoins under its id.
    Remove {
        id: u64,
        #[command(flatten)]
        conn: Conn,
    },
}

pub async fn node(args: NodeArgs) -> anyhow::Result<ExitCode> {
    let (id, dead, conn) = match args.op {
        NodeOp::Drain { id, conn } => (id, false, conn),
        NodeOp::Remove { id, conn } => (id, true, conn),
    };
    let client = conn.client().await?;
    let r = client.drain_node(id, dead).await?;
    let state = pb::NodeState::try_from(r.state)
        .map(node_state_name)
        .unwrap_or("unknown");
    println!(
        "node {id} is {state} (map epoch {}); its replicas move to the other nodes — watch `palisade cluster status`",
        r.map_epoch
    );
    Ok(ExitCode::SUCCESS)
}

fn node_state_name(s: pb::NodeState) -> &'static str {
    match s {
        pb::NodeState::Unspecified => "-",
        pb::NodeState::Joining => "joining",
        pb::NodeState::Serving => "serving",
        pb::NodeState::Draining => "draining",
        pb::NodeState::Removed => "removed",
    }
}

fn role_name(role: i32) -> &'static str {
    match pb::RaftRole::try_from(role) {
        Ok(pb::RaftRole::Leader) => "leader",
        Ok(pb::RaftRole::Follower) => "follower",
        Ok(pb::RaftRole::Candidate) => "candidate",
        Ok(pb::RaftRole::Learner) => "learner",
        Ok(pb::RaftRole::Shutdown) => "shutdown",
        Ok(pb::RaftRole::Unreachable) => "unreachable",
        _ => "-",
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn receipt(h: Option<&pb::ResponseHeader>) -> String {
    match h {
        Some(h) => format!(
            "revision={} group={} node={} term={}",
            h.revision, h.group_id, h.node_id, h.term
        ),
        None => String::new(),
    }
}

fn read_receipt(h: &pb::ResponseHeader) -> String {
    let level = pb::ReadConsistency::try_from(h.consistency)
        .map(|l| l.as_str_name())
        .unwrap_or("?");
    let staleness = if h.staleness_unbounded {
        "unbounded".to_string()
    } else {
        format!("<={}ms", h.staleness_bound_ms)
    };
    format!(
        "{} consistency={level} staleness={staleness}",
        receipt(Some(h))
    )
}

fn token_suffix(token: Option<&pb::SessionToken>) -> String {
    token.map_or(String::new(), |t| {
        format!(" session={}", palisade_client::format_session(t))
    })
}

pub async fn get(args: GetArgs) -> anyhow::Result<ExitCode> {
    let client = args.conn.client().await?;
    if let Some(token) = &args.session {
        client.merge_session(token);
    }
    let mut opts = match args.consistency {
        Level::Linearizable => palisade_client::ReadOptions::linearizable(),
        Level::Lease => palisade_client::ReadOptions::lease(),
        Level::Session => palisade_client::ReadOptions::session(),
        Level::Bounded => palisade_client::ReadOptions::bounded(std::time::Duration::from_millis(
            args.max_staleness_ms,
        )),
        Level::Stale => palisade_client::ReadOptions::stale(),
    };
    opts.min_revision = args.min_revision;
    opts.at_revision = args.at_revision;
    let resp = client.get_with(args.key.clone(), opts).await?;
    let header = resp.header.unwrap_or_default();
    if args.json {
        let kv = resp.kv.as_ref().map(|kv| {
            serde_json::json!({
                "key": text(&kv.key),
                "value": text(&kv.value),
                "create_revision": kv.create_revision,
                "mod_revision": kv.mod_revision,
                "version": kv.version,
            })
        });
        let out = serde_json::json!({
            "kv": kv,
            "header": {
                "node_id": header.node_id,
                "group_id": header.group_id,
                "revision": header.revision,
                "term": header.term,
                "consistency": pb::ReadConsistency::try_from(header.consistency).map(|l| l.as_str_name()).unwrap_or("?"),
                "staleness_bound_ms": header.staleness_bound_ms,
                "staleness_unbounded": header.staleness_unbounded,
            },
        });
        println!("{out}");
        return Ok(if resp.kv.is_some() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    match resp.kv {
        Some(kv) => {
            println!("{}", text(&kv.value));
            Ok(ExitCode::SUCCESS)
        }
        None => {
            eprintln!("key {:?} not found ({})", args.key, read_receipt(&header));
            Ok(ExitCode::FAILURE)
        }
    }
}

pub async fn history(args: HistoryArgs) -> anyhow::Result<ExitCode> {
    let client = args.conn.client().await?;
    let resp = client
        .history(args.key.clone(), palisade_client::ReadOptions::default())
        .await?;
    println!("REVISION  VERSION  VALUE");
    for v in &resp.versions {
        match &v.kv {
            Some(kv) if !v.deleted => {
                println!("{:<9} {:<8} {}", v.revision, kv.version, text(&kv.value))
            }
            _ => println!("{:<9} {:<8} (deleted)", v.revision, "-"),
        }
    }
    let compacted = match resp.compact_revision {
        0 => "nothing compacted yet".to_string(),
        r => format!("history compacted below revision {r}"),
    };
    eprintln!(
        "({} versions retained; {compacted}; {})",
        resp.versions.len(),
        receipt(resp.header.as_ref())
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn put(args: PutArgs) -> anyhow::Result<ExitCode> {
    let client = args.conn.client().await?;
    let resp = client
        .put_request(pb::PutRequest {
            key: args.key.into_bytes(),
            value: args.value.into_bytes(),
            ack: args.ack.proto(),
            fence: args
                .fence
                .as_ref()
                .map(palisade_client::FencingToken::fence),
            lease: args.lease,
            ..Default::default()
        })
        .await?;
    println!(
        "OK {}{}",
        receipt(resp.header.as_ref()),
        token_suffix(resp.session.as_ref())
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn del(args: DelArgs) -> anyhow::Result<ExitCode> {
    let client = args.conn.client().await?;
    let resp = client
        .delete_request(pb::DeleteRequest {
            key: args.key.into_bytes(),
            ack: args.ack.proto(),
            fence: args
                .fence
                .as_ref()
                .map(palisade_client::FencingToken::fence),
            ..Default::default()
        })
        .await?;
    println!(
        "deleted {} {}{}",
        resp.deleted,
        receipt(resp.header.as_ref()),
        token_suffix(resp.session.as_ref())
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn scan(args: ScanArgs) -> anyhow::Result<ExitCode> {
    let client = args.conn.client().await?;
    let req = match args.prefix {
        Some(p) => pb::ScanRequest {
            key: p.into_bytes(),
            prefix: true,
            ..Default::default()
        },
        None => pb::ScanRequest {
            key: args.from.unwrap_or_default().into_bytes(),
            range_end: args.to.unwrap_or_default().into_bytes(),
            ..Default::default()
        },
    };
    let resp = client
        .scan(pb::ScanRequest {
            limit: args.limit,
            keys_only: args.keys_only,
            ..req
        })
        .await?;
    for kv in &resp.kvs {
        if args.keys_only {
            println!("{}", text(&kv.key));
        } else {
            println!("{}\t{}", text(&kv.key), text(&kv.value));
        }
    }
    if resp.more {
        eprintln!("(more keys past the limit)");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn txn(args: TxnArgs) -> anyhow::Result<ExitCode> {
    match args.op {
        TxnOp::Cas {
            key,
            new,
            expect,
            absent,
            conn,
        } => {
            let client = conn.client().await?;
            let expected = if absent {
                None
            } else {
                expect.map(String::into_bytes)
            };
            let (swapped, resp) = client.compare_and_swap(key, expected, new).await?;
            if swapped {
                println!(
                    "SWAPPED {}{}",
                    receipt(resp.header.as_ref()),
                    token_suffix(resp.session.as_ref())
                );
                return Ok(ExitCode::SUCCESS);
            }
            let current = resp.responses.first().and_then(|r| match &r.response {
                Some(pb::response_op::Response::Get(g)) => g.kv.as_ref().map(|kv| text(&kv.value)),
                _ => None,
            });
            match current {
                Some(v) => println!(
                    "NOT SWAPPED: current value is {v:?} {}",
                    receipt(resp.header.as_ref())
                ),
                None => println!(
                    "NOT SWAPPED: key does not exist {}",
                    receipt(resp.header.as_ref())
                ),
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

pub async fn cluster(args: ClusterArgs) -> anyhow::Result<ExitCode> {
    match args.op {
        ClusterOp::Status { json, conn } => {
            let client = conn.client().await?;
            let status = client.cluster_status().await?;
            if json {
                println!("{}", status_json(&status));
            } else {
                print!("{}", status_table(&status));
            }
            Ok(ExitCode::SUCCESS)
        }
        ClusterOp::Compact {
            group,
            revision,
            conn,
        } => {
            let client = conn.client().await?;
            let point = client.compact(group, revision).await?;
            println!("group {group} history compacted below revision {point}");
            Ok(ExitCode::SUCCESS)
        }
        ClusterOp::AddLearner {
            id,
            addr,
            groups,
            conn,
        } => {
            let client = conn.client().await?;
            let joined = client.add_learner(id, &addr, &groups).await?;
            println!("node {id} ({addr}) is registered as a learner of groups {joined:?}");
            Ok(ExitCode::SUCCESS)
        }
        ClusterOp::SetGroups { groups, conn } => {
            let client = conn.client().await?;
            let r = client.set_groups(groups).await?;
            println!(
                "the hash keyspace is moving to {} data groups (map epoch {}); watch `palisade cluster status`",
                r.groups, r.map_epoch
            );
            Ok(ExitCode::SUCCESS)
        }
        ClusterOp::MoveReplica {
            group,
            from,
            to,
            conn,
        } => {
            let client = conn.client().await?;
            let replica = client.move_replica(group, from, to).await?;
            println!(
                "group {group}: replica {replica} on node {to} replaces node {from}'s; watch `palisade cluster status`"
            );
            Ok(ExitCode::SUCCESS)
        }
        ClusterOp::TransferLeader { group, node, conn } => {
            let client = conn.client().await?;
            let r = client.transfer_leader(group, node).await?;
            println!(
                "group {group} is led by node {} (term {})",
                r.leader_id, r.term
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn status_json(s: &pb::ClusterStatusResponse) -> serde_json::Value {
    let map = s.map.clone().unwrap_or_default();
    serde_json::json!({
        "data_groups": s.data_groups,
        "map_epoch": map.epoch,
        "cluster_id": map.cluster_id,
        "replication": map.replication,
        "target_groups": map.target_groups,
        "moving": map.moving.as_ref().map(|m| serde_json::json!({
            "id": m.id, "from": m.from_group, "to": m.to_group, "slots": m.slots,
            "slot_count": m.slot_count, "phase": m.phase,
        })),
        "nodes": s.nodes.iter().map(|n| serde_json::json!({
            "id": n.id, "addr": n.addr, "reachable": n.reachable, "error": n.error,
            "state": pb::NodeState::try_from(n.state).map(node_state_name).unwrap_or("-"),
            "region": n.region, "zone": n.zone, "read_replica": n.read_replica,
            "flushes": n.flushes, "flush_waiters": n.flush_waiters,
            "disk_free_bytes": n.disk_free_bytes, "disk_full": n.disk_full,
        })).collect::<Vec<_>>(),
        "map_groups": map.groups.iter().map(|g| serde_json::json!({
            "id": g.id, "epoch": g.epoch, "slots": g.slots, "change": g.change,
            "replicas": g.replicas.iter().map(|r| serde_json::json!({
                "replica_id": r.replica_id, "node_id": r.node_id,
                "role": if r.role == pb::ReplicaRole::Voter as i32 { "voter" } else { "learner" },
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "groups": s.groups.iter().map(|g| serde_json::json!({
            "group_id": g.group_id,
            "leader_id": g.leader_id,
            "term": g.term,
            "epoch": g.epoch,
            "slots": g.slots,
            "replicas": g.replicas.iter().map(|r| serde_json::json!({
                "node_id": r.node_id, "replica_id": r.replica_id,
                "role": role_name(r.role), "term": r.term, "revision": r.revision,
                "last_log_index": r.last_log_index, "commit_index": r.commit_index,
                "applied_index": r.applied_index, "snapshot_index": r.snapshot_index,
                "purged_index": r.purged_index, "snapshots_installed": r.snapshots_installed,
                "voters": r.voters, "learners": r.learners, "key_count": r.key_count,
                "lag": r.lag, "compact_revision": r.compact_revision,
                "history_records": r.history_records,
                "quarantine": (!r.quarantine.is_empty()).then_some(&r.quarantine),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// The status as fixed-width tables: nodes, the map's groups, and every
/// replica's Raft state.
pub fn status_table(s: &pb::ClusterStatusResponse) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let map = s.map.clone().unwrap_or_default();
    let _ = writeln!(
        out,
        "cluster {:016x}  map epoch {}  {} data groups (target {})  {} voters per group",
        map.cluster_id, map.epoch, s.data_groups, map.target_groups, map.replication
    );
    if let Some(m) = &map.moving {
        let _ = writeln!(
            out,
            "moving {} slots ({}) from group {} to group {}: {}",
            m.slot_count, m.slots, m.from_group, m.to_group, m.phase
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "NODE  ADDRESS                 STATE     REGION/ZONE   REPLICAS  LEADS  FSYNCS    DISK FREE      REACHABLE"
    );
    for n in &s.nodes {
        let state = pb::NodeState::try_from(n.state)
            .map(node_state_name)
            .unwrap_or("-");
        let state = if n.read_replica {
            format!("{state}*")
        } else {
            state.to_string()
        };
        let place = if n.region.is_empty() && n.zone.is_empty() {
            "-".to_string()
        } else {
            format!("{}/{}", n.region, n.zone)
        };
        let replicas = map
            .groups
            .iter()
            .filter(|g| g.replicas.iter().any(|r| r.node_id == n.id))
            .count();
        let leads = s.groups.iter().filter(|g| g.leader_id == n.id).count();
        let reach = if n.reachable {
            "up".to_string()
        } else {
            format!("DOWN ({})", n.error)
        };
        let disk = match (n.reachable, n.disk_full) {
            (false, _) => "-".to_string(),
            (true, full) => format!(
                "{} MiB{}",
                n.disk_free_bytes / (1024 * 1024),
                if full { " FULL" } else { "" }
            ),
        };
        let _ = writeln!(
            out,
            "{:<5} {:<23} {:<9} {:<13} {:<9} {:<6} {:<9} {:<14} {}",
            n.id, n.addr, state, place, replicas, leads, n.flushes, disk, reach
        );
    }
    if s.nodes.iter().any(|n| n.read_replica) {
        let _ = writeln!(out, "(* a read replica: learners only)");
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "GROUP  EPOCH  SLOTS  VOTERS          LEARNERS   CHANGE"
    );
    for g in &map.groups {
        let nodes = |voter: bool| {
            let ids: Vec<String> = g
                .replicas
                .iter()
                .filter(|r| (r.role == pb::ReplicaRole::Voter as i32) == voter)
                .map(|r| r.node_id.to_string())
                .collect();
            if ids.is_empty() {
                "-".to_string()
            } else {
                ids.join(",")
            }
        };
        let name = if g.id == 0 {
            "0 meta".to_string()
        } else {
            g.id.to_string()
        };
        let _ = writeln!(
            out,
            "{:<6} {:<6} {:<6} {:<15} {:<10} {}",
            name,
            g.epoch,
            if g.id == 0 {
                "-".to_string()
            } else {
                g.slots.to_string()
            },
            nodes(true),
            nodes(false),
            if g.change.is_empty() { "-" } else { &g.change }
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "GROUP  LEADER  TERM  NODE  ROLE        LAST_LOG  COMMIT  APPLIED  LAG     REVISION  KEYS"
    );
    for g in &s.groups {
        let name = if g.group_id == 0 {
            "0 meta".to_string()
        } else {
            g.group_id.to_string()
        };
        let leader = if g.leader_id == 0 {
            "-".to_string()
        } else {
            g.leader_id.to_string()
        };
        for (i, r) in g.replicas.iter().enumerate() {
            let (gname, lead, term) = if i == 0 {
                (name.as_str(), leader.as_str(), g.term.to_string())
            } else {
                ("", "", String::new())
            };
            let _ = writeln!(
                out,
                "{:<6} {:<7} {:<5} {:<5} {:<11} {:<9} {:<7} {:<8} {:<7} {:<9} {}",
                gname,
                lead,
                term,
                r.node_id,
                role_name(r.role),
                r.last_log_index,
                r.commit_index,
                r.applied_index,
                r.lag,
                r.revision,
                r.key_count
            );
        }
    }
    let quarantined: Vec<String> = s
        .groups
        .iter()
        .flat_map(|g| {
            g.replicas
                .iter()
                .filter(|r| !r.quarantine.is_empty())
                .map(move |r| {
                    format!(
                        "group {} on node {}: QUARANTINED (does not vote until its leader re-sends what it lost): {}",
                        g.group_id, r.node_id, r.quarantine
                    )
                })
        })
        .collect();
    if !quarantined.is_empty() {
        let _ = writeln!(out);
        for line in quarantined {
            let _ = writeln!(out, "{line}");
        }
    }
    out
}

#[derive(Args)]
pub struct LeaseArgs {
    #[command(subcommand)]
    pub op: LeaseOp,
}

#[derive(Subcommand)]
pub enum LeaseOp {
    /// Create a lease; prints its id.
    Grant {
        /// Time to live in milliseconds (at least 1000).
        ttl_ms: u64,
        /// The lease lives in this key's group (use the lock name or a key
        /// with the same hash tag as the keys you will attach).
        #[arg(long, default_value = "")]
        key: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Keep a lease alive: every TTL/3 until Ctrl-C (or once, with --once).
    Keepalive {
        id: u64,
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// End a lease now (its keys are deleted, its locks released).
    Revoke {
        id: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show a lease's TTL, time left, keys and locks.
    Ttl {
        id: u64,
        #[command(flatten)]
        conn: Conn,
    },
}

pub async fn lease(args: LeaseArgs) -> anyhow::Result<ExitCode> {
    match args.op {
        LeaseOp::Grant { ttl_ms, key, conn } => {
            let client = conn.client().await?;
            let id = client
                .lease_grant(std::time::Duration::from_millis(ttl_ms), key.as_bytes())
                .await?;
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
        LeaseOp::Keepalive { id, once, conn } => {
            let client = conn.client().await?;
            loop {
                let ttl = client.lease_keep_alive(id).await?;
                println!("lease {id} kept alive for {} ms", ttl.as_millis());
                if once {
                    return Ok(ExitCode::SUCCESS);
                }
                tokio::time::sleep(ttl / 3).await;
            }
        }
        LeaseOp::Revoke { id, conn } => {
            let client = conn.client().await?;
            client.lease_revoke(id).await?;
            println!("lease {id} revoked");
            Ok(ExitCode::SUCCESS)
        }
        LeaseOp::Ttl { id, conn } => {
            let client = conn.client().await?;
            let r = client.lease_time_to_live(id).await?;
            println!(
                "lease {id}: ttl {} ms, {} ms left, keys {:?}, locks {:?}",
                r.granted_ttl_ms,
                r.remaining_ms,
                r.keys.iter().map(|k| text(k)).collect::<Vec<_>>(),
                r.locks.iter().map(|k| text(k)).collect::<Vec<_>>()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[derive(Args)]
pub struct LockArgs {
    /// The lock's name (hashes to a group like a key; use a hash tag such as
    /// `{job7}lock` to co-locate it with the keys it guards).
    pub name: String,
    /// TTL of the lock's lease, kept alive while this command runs.
    #[arg(long, default_value_t = 10_000)]
    pub ttl_ms: u64,
    /// How long to wait for the lock.
    #[arg(long, default_value_t = 10_000)]
    pub wait_ms: u64,
    /// Command to run while holding the lock; it gets PALISADE_FENCE
    /// (NAME:TOKEN), PALISADE_LOCK_TOKEN and PALISADE_LEASE. Without one,
    /// the lock is held until Ctrl-C.
    #[arg(last = true)]
    pub command: Vec<String>,
    #[command(flatten)]
    pub conn: Conn,
}

pub async fn lock(args: LockArgs) -> anyhow::Result<ExitCode> {
    let client = args.conn.client().await?;
    let guard = client
        .lock_with_lease(
            args.name.clone().into_bytes(),
            std::time::Duration::from_millis(args.ttl_ms),
            std::time::Duration::from_millis(args.wait_ms),
        )
        .await
        .with_context(|| format!("cannot take lock {:?}", args.name))?;
    let fence = guard.token().to_text();
    println!("{fence}");
    let code = match args.command.split_first() {
        Some((program, rest)) => {
            let status = tokio::process::Command::new(program)
                .args(rest)
                .env("PALISADE_FENCE", &fence)
                .env("PALISADE_LOCK_TOKEN", guard.token().token.to_string())
                .env("PALISADE_LEASE", guard.lease().to_string())
                .status()
                .await
                .with_context(|| format!("cannot run {program:?}"))?;
            ExitCode::from(status.code().unwrap_or(1).clamp(0, 255) as u8)
        }
        None => {
            eprintln!("holding {fence}; Ctrl-C releases it");
            let _ = tokio::signal::ctrl_c().await;
            ExitCode::SUCCESS
        }
    };
    if let Err(e) = guard.release().await {
        eprintln!("releasing the lock: {e}");
    }
    Ok(code)
}
