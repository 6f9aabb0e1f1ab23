//! Raft messages between nodes, over the `Peer` gRPC service.
//!
//! One [`PeerChannels`] cache per node holds a lazily connected tonic channel
//! per peer, shared by all groups. Every RPC runs under the deadline openraft
//! gives it; on a transport error or timeout the channel is dropped so the
//! next RPC dials afresh (a stream wedged by a partition never recovers on
//! its own). openraft's request and response types travel as bincode payloads
//! tagged with the group id.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use palisade_proto::v1::RaftMessage;
use palisade_proto::v1::peer_client::PeerClient;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, Endpoint};

use crate::types::{GroupId, NodeId, TypeConfig};

/// How long dialing a peer may take before the RPC counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Opens (lazily connected) channels to other nodes. Production uses TCP
/// ([`TcpConnector`]); a simulation supplies its own network, so the node
/// code is the same in both.
pub trait Connector: Send + Sync + 'static {
    fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error>;
}

/// TCP channels, optionally from a fixed source address.
#[derive(Debug, Clone, Default)]
pub struct TcpConnector {
    /// Source address for outgoing connections. Set when the node advertises
    /// a loopback address of its own (127.x.y.z), so that per-address packet
    /// filters (the fault drills' partitions) see which node sent a packet.
    pub local_ip: Option<std::net::IpAddr>,
}

impl Connector for TcpConnector {
    fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        Ok(Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .local_address(self.local_ip)
            .connect_lazy())
    }
}

/// Cached channels to peers, keyed by address (every replica on a node
/// shares the node's channel). Cheap to clone.
#[derive(Clone)]
pub struct PeerChannels {
    /// Each channel with the dial it came from (see [`Self::get_tagged`]).
    inner: Arc<Mutex<BTreeMap<String, (Channel, u64)>>>,
    dials: Arc<std::sync::atomic::AtomicU64>,
    connector: Arc<dyn Connector>,
    /// Peers that refused entries because their disk is full, and when
    /// they last did (see [`Self::disk_full_recently`]).
    disk_full: Arc<Mutex<BTreeMap<String, tokio::time::Instant>>>,
}

/// How long a peer's "disk full" refusal counts without a new one.
const DISK_FULL_MEMORY: std::time::Duration = std::time::Duration::from_secs(3);

impl Default for PeerChannels {
    fn default() -> Self {
        Self::new(Arc::new(TcpConnector::default()))
    }
}

impl PeerChannels {
    /// Channels made by `connector`.
    pub fn new(connector: Arc<dyn Connector>) -> Self {
        Self {
            inner: Arc::default(),
            dials: Arc::default(),
            connector,
            disk_full: Arc::default(),
        }
    }

    /// Records that the node at `addr` refused entries: its disk is full.
    pub fn mark_disk_full(&self, addr: &str) {
        self.disk_full
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr.to_string(), tokio::time::Instant::now());
    }

    /// Whether any peer refused entries for a full disk within the last few
    /// seconds (the write path's cheap first check).
    pub fn any_disk_full_recently(&self) -> bool {
        let mut full = self.disk_full.lock().unwrap_or_else(|p| p.into_inner());
        full.retain(|_, at| at.elapsed() < DISK_FULL_MEMORY);
        !full.is_empty()
    }

    /// Whether the node at `addr` refused entries for a full disk within
    /// the last few seconds (a leader refuses writes that grow the data
    /// when too few of its voters could store them).
    pub fn disk_full_recently(&self, addr: &str) -> bool {
        let mut full = self.disk_full.lock().unwrap_or_else(|p| p.into_inner());
        match full.get(addr) {
            Some(at) if at.elapsed() < DISK_FULL_MEMORY => true,
            Some(_) => {
                full.remove(addr);
                false
            }
            None => false,
        }
    }

    /// The channel to `addr`, created if missing.
    pub fn get(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        self.get_tagged(addr).map(|(ch, _)| ch)
    }

    /// Like [`Self::get`], with the number of the dial the channel came
    /// from, for [`Self::drop_dial`].
    pub fn get_tagged(&self, addr: &str) -> Result<(Channel, u64), tonic::transport::Error> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((ch, dial)) = map.get(addr) {
            return Ok((ch.clone(), *dial));
        }
        let channel = self.connector.channel(addr)?;
        let dial = self
            .dials
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        map.insert(addr.to_string(), (channel.clone(), dial));
        Ok((channel, dial))
    }

    /// Forgets the channel to `addr` if it is still the one from `dial`
    /// (a channel dialed since is left alone).
    pub fn drop_dial(&self, addr: &str, dial: u64) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(addr).is_some_and(|(_, d)| *d == dial) {
            map.remove(addr);
        }
    }

    /// The connector channels are made with.
    pub fn connector(&self) -> &Arc<dyn Connector> {
        &self.connector
    }

    /// Forgets the channel to `addr`, so the next call dials again.
    pub fn drop_channel(&self, addr: &str) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(addr);
    }
}

/// Creates per-target connections for one group.
#[derive(Clone)]
pub struct PeerNetwork {
    group: GroupId,
    channels: PeerChannels,
}

impl PeerNetwork {
    pub fn new(group: GroupId, channels: PeerChannels) -> Self {
        Self { group, channels }
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerConnection {
        PeerConnection {
            group: self.group,
            target,
            addr: node.addr.clone(),
            channels: self.channels.clone(),
        }
    }
}

/// Sends one group's Raft messages to one peer.
pub struct PeerConnection {
    group: GroupId,
    target: NodeId,
    addr: String,
    channels: PeerChannels,
}

#[derive(Clone, Copy)]
enum Rpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

/// Errors of one peer RPC before openraft's error types are chosen.
enum CallError {
    /// Could not reach the peer (or no answer in time): retry later.
    Unreachable(String),
    /// The peer answered with something we cannot decode.
    Network(String),
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

impl PeerConnection {
    async fn call<Req, Resp, E>(
        &self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Result<Resp, E>, CallError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: DeserializeOwned,
    {
        let payload = bincode::serde::encode_to_vec(req, bincode::config::standard())
            .map_err(|e| CallError::Network(format!("encoding request: {e}")))?;
        let channel = self
            .channels
            .get(&self.addr)
            .map_err(|e| CallError::Unreachable(format!("bad address {}: {e}", self.addr)))?;
        let mut client = PeerClient::new(channel).max_decoding_message_size(usize::MAX);
        let deadline = option.hard_ttl();
        let mut request = tonic::Request::new(RaftMessage {
            group_id: self.group,
            payload,
            target_replica: self.target,
        });
        request.set_timeout(deadline);
        let fut = async {
            match rpc {
                Rpc::AppendEntries => client.append_entries(request).await,
                Rpc::Vote => client.vote(request).await,
                Rpc::InstallSnapshot => client.install_snapshot(request).await,
            }
        };
        let reply = match tokio::time::timeout(deadline, fut).await {
            Ok(Ok(reply)) => reply.into_inner(),
            Ok(Err(status)) if status.code() == tonic::Code::ResourceExhausted => {
                // The peer's disk is full: it keeps the connection but
                // stores no new data until space is freed. `Unreachable`
                // makes openraft back off instead of re-sending the batch at
                // once; the heartbeats it skips meanwhile cost nothing, as a
                // full node does not campaign.
                self.channels.mark_disk_full(&self.addr);
                return Err(CallError::Unreachable(format!(
                    "{}: {}",
                    status.code(),
                    status.message()
                )));
            }
            Ok(Err(status)) => {
                // Transport failures and timeouts surface as statuses too;
                // either way, dial afresh next time.
                self.channels.drop_channel(&self.addr);
                return Err(CallError::Unreachable(format!(
                    "{}: {}",
                    status.code(),
                    status.message()
                )));
            }
            Err(_) => {
                self.channels.drop_channel(&self.addr);
                return Err(CallError::Unreachable(format!(
                    "no reply within {deadline:?}"
                )));
            }
        };
        let (result, _) =
            bincode::serde::decode_from_slice(&reply.payload, bincode::config::standard())
                .map_err(|e| CallError::Network(format!("decoding reply: {e}")))?;
        Ok(result)
    }

    fn rpc_error<E: std::error::Error>(&self, e: CallError) -> RPCError<NodeId, BasicNode, E> {
        match e {
            CallError::Unreachable(m) => RPCError::Unreachable(Unreachable::new(&Msg(m))),
            CallError::Network(m) => RPCError::Network(NetworkError::new(&Msg(m))),
        }
    }

    fn remote<E: std::error::Error>(&self, e: E) -> RPCError<NodeId, BasicNode, E> {
        RPCError::RemoteError(RemoteError::new_with_node(
            self.target,
            BasicNode {
                addr: self.addr.clone(),
            },
            e,
        ))
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self
            .call::<_, _, RaftError<NodeId>>(Rpc::AppendEntries, &rpc, &option)
            .await
        {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(self.remote(e)),
            Err(e) => Err(self.rpc_error(e)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self
            .call::<_, _, RaftError<NodeId, InstallSnapshotError>>(
                Rpc::InstallSnapshot,
                &rpc,
                &option,
            )
            .await
        {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(self.remote(e)),
            Err(e) => Err(self.rpc_error(e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self
            .call::<_, _, RaftError<NodeId>>(Rpc::Vote, &rpc, &option)
            .await
        {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(self.remote(e)),
            Err(e) => Err(self.rpc_error(e)),
        }
    }
}
