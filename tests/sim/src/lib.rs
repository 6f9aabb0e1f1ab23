//! Deterministic simulation of palisade clusters.
//!
//! The hosts run the *real* node (`palisade_server::Node`: the same gRPC
//! services, Raft glue and sled storage as production) over turmoil's
//! simulated network. Only the edges are swapped, through the seams the node
//! exposes for this:
//! - outgoing connections: [`SimConnector`] (a tonic channel whose
//!   connector opens a `turmoil::net::TcpStream`);
//! - incoming connections: [`incoming`] (a `turmoil::net::TcpListener`);
//! - durability: `FlushMode::Inline` — each durable write flushes sled
//!   synchronously on the simulation thread, since a completion arriving from
//!   sled's or a flusher's OS thread would happen at a time turmoil does not
//!   control;
//! - randomness: openraft's election timeouts come from
//!   `palisade_group::runtime::seed_thread_rng`.
//!
//! Storage: each host's sled database lives in a directory that outlives the
//! host, so `crash` + `bounce` restarts a node on its own data.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use palisade_group::Connector;
use palisade_proto::v1::kv_client::KvClient;
use palisade_server::{Node, NodeConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::{Channel, Endpoint, Uri};

/// Port every simulated node listens on.
pub const PORT: u16 = 7000;

/// Host name of node `id`.
pub fn host(id: u64) -> String {
    format!("n{id}")
}

/// `host:port` of node `id`.
pub fn addr(id: u64) -> String {
    format!("{}:{PORT}", host(id))
}

/// A turmoil TCP stream that tonic's server accepts.
pub struct SimIo(pub turmoil::net::TcpStream);

impl tonic::transport::server::Connected for SimIo {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for SimIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Connections accepted on a simulated listener.
pub fn incoming(
    listener: turmoil::net::TcpListener,
) -> impl futures::Stream<Item = io::Result<SimIo>> {
    futures::stream::unfold(listener, |l| async move {
        let next = l.accept().await.map(|(s, _)| SimIo(s));
        Some((next, l))
    })
}

/// Opens channels over turmoil's network.
#[derive(Debug, Clone, Copy, Default)]
pub struct SimConnector;

/// A lazily connected channel to `addr` (`host:port`) over the simulation.
pub fn sim_channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_millis(500))
        .connect_with_connector_lazy(tower::service_fn(|uri: Uri| async move {
            let host = uri.host().unwrap_or_default().to_string();
            let port = uri.port_u16().unwrap_or(PORT);
            let stream = turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(stream))
        })))
}

impl Connector for SimConnector {
    fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        sim_channel(addr)
    }
}

/// A Kv client stub for node `id`, usable inside the simulation.
pub fn kv_client(id: u64) -> KvClient<Channel> {
    KvClient::new(sim_channel(&addr(id)).expect("static address"))
}

/// A simulation with LAN-like links (1–10 ms per message), seeded.
pub fn builder(seed: u64, duration: Duration) -> turmoil::Builder {
    let mut b = turmoil::Builder::new();
    b.simulation_duration(duration)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(10))
        .rng_seed(seed);
    b
}

/// Retries `f` while it fails with `UNAVAILABLE` (elections, forwarding),
/// up to `tries` times, 100 ms apart in simulated time.
pub async fn retry_unavailable<T, F, Fut>(tries: usize, mut f: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut last = None;
    for _ in 0..tries {
        match f().await {
            Ok(v) => return Ok(v),
            Err(s) if s.code() == tonic::Code::Unavailable => last = Some(s),
            Err(s) => return Err(s),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last.unwrap_or_else(|| tonic::Status::unavailable("no attempt made")))
}

/// The config of node `id` in an `n`-node simulated cluster.
pub fn node_config(id: u64, n: u64, data_dir: PathBuf, groups: u64) -> NodeConfig {
    let peers = (1..=n).map(|i| (i, addr(i))).collect();
    let listen: SocketAddr = ([0, 0, 0, 0], PORT).into();
    let mut config = NodeConfig::new(id, listen, peers, data_dir);
    config.data_groups = groups;
    config.flush_mode = palisade_storage::FlushMode::Inline;
    config.cache_bytes = 4 * 1024 * 1024;
    config
}

/// Runs node `id` until the host is crashed or the simulation ends.
pub async fn run_node(config: NodeConfig) -> Result<(), Box<dyn std::error::Error>> {
    let node = Node::open_with(config, Arc::new(SimConnector)).await?;
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
    node.serve_with_incoming(incoming(listener), std::future::pending())
        .await?;
    Ok(())
}
