//! The systems a benchmark can drive, behind one small interface so both pay
//! the same client-side cost: one gRPC call per operation (two for a
//! read-modify-write), `--connections` HTTP/2 connections shared by the
//! clients, the same request timeout.
//!
//! - [`Backend::Palisade`]: palisade's own client (leader-bound requests go
//!   straight to the group's leader).
//! - [`Backend::Etcd`] (cargo feature `etcd`): etcd v3 through the
//!   `etcd-client` crate, every connection to etcd's leader, so writes and
//!   linearizable reads take the same path as palisade's.
//!
//! Each backend also reports the per-node server counters that explain a
//! result ([`NodeCounters`]): fsyncs, RSS, bytes on disk and bytes written.

use std::time::Duration;

use anyhow::Context;
use palisade_client::{Client, ClientConfig, ReadOptions};

/// How an operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The request ran out of time (DEADLINE_EXCEEDED or the client timeout).
    Timeout,
    /// Any other error.
    Error,
}

/// Server-side counters of one node, as the system itself reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeCounters {
    /// The system's name for the node (palisade node id, etcd endpoint).
    pub id: String,
    /// fsyncs since the node started. palisade: group-commit flushes (each a
    /// sled `flush()`); etcd: WAL fsyncs plus backend (bbolt) commits.
    pub fsyncs: u64,
    /// Resident memory, bytes.
    pub rss_bytes: u64,
    /// Bytes on disk: sled's size on disk; etcd's bbolt database size.
    pub disk_bytes: u64,
    /// Bytes the process caused to be written to storage since it started
    /// (0 when the system does not say).
    pub write_bytes: u64,
}

/// Which system to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    Palisade,
    /// etcd v3 (needs a build with the `etcd` feature).
    Etcd,
}

/// Connections to the system under test.
#[derive(Clone)]
pub enum Backend {
    Palisade(Vec<Client>),
    #[cfg(feature = "etcd")]
    Etcd(crate::etcd::Etcd),
}

/// Read consistency as the backends understand it.
#[derive(Debug, Clone, Copy)]
pub struct ReadLevel {
    pub palisade: ReadOptions,
    /// etcd has two levels: linearizable (ReadIndex) and serializable
    /// (member-local). LINEARIZABLE and LEASE map to the first, the rest to
    /// the second.
    pub etcd_serializable: bool,
}

impl Backend {
    /// Opens `connections` connections to `endpoints`.
    pub async fn connect(
        kind: BackendKind,
        endpoints: &[String],
        connections: usize,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        match kind {
            BackendKind::Palisade => {
                let mut clients = Vec::new();
                for _ in 0..connections {
                    let mut c = ClientConfig::new(endpoints.iter().cloned());
                    c.request_timeout = timeout;
                    clients.push(
                        Client::with_config(c)
                            .await
                            .with_context(|| format!("cannot reach {}", endpoints.join(",")))?,
                    );
                }
                Ok(Backend::Palisade(clients))
            }
            #[cfg(feature = "etcd")]
            BackendKind::Etcd => Ok(Backend::Etcd(
                crate::etcd::Etcd::connect(endpoints, connections, timeout).await?,
            )),
            #[cfg(not(feature = "etcd"))]
            BackendKind::Etcd => anyhow::bail!(
                "this palisade was built without etcd support: build it with \
                 `cargo build --release --features etcd` (needs protoc), or run \
                 scripts/bench-compare.sh"
            ),
        }
    }

    /// A short name for reports.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Palisade(_) => "palisade",
            #[cfg(feature = "etcd")]
            Backend::Etcd(_) => "etcd",
        }
    }

    fn connections(&self) -> usize {
        match self {
            Backend::Palisade(c) => c.len(),
            #[cfg(feature = "etcd")]
            Backend::Etcd(e) => e.connections(),
        }
    }

    /// The connection client `index` uses.
    pub fn connection_for(&self, index: usize) -> usize {
        index % self.connections().max(1)
    }

    /// Reads `key`; `Ok(None)` when absent.
    pub async fn get(
        &self,
        conn: usize,
        key: Vec<u8>,
        level: ReadLevel,
    ) -> Result<Option<Vec<u8>>, Failure> {
        match self {
            Backend::Palisade(c) => c[conn]
                .get_with(key, level.palisade)
                .await
                .map(|r| r.kv.map(|kv| kv.value))
                .map_err(palisade_failure),
            #[cfg(feature = "etcd")]
            Backend::Etcd(e) => e.get(conn, key, level.etcd_serializable).await,
        }
    }

    /// Writes `key`.
    pub async fn put(&self, conn: usize, key: Vec<u8>, value: Vec<u8>) -> Result<(), Failure> {
        match self {
            Backend::Palisade(c) => c[conn]
                .put(key, value)
                .await
                .map(|_| ())
                .map_err(palisade_failure),
            #[cfg(feature = "etcd")]
            Backend::Etcd(e) => e.put(conn, key, value).await,
        }
    }

    /// Writes `new` if the value is still `old` (`None`: absent); returns
    /// whether it did.
    pub async fn compare_and_swap(
        &self,
        conn: usize,
        key: Vec<u8>,
        old: Option<Vec<u8>>,
        new: Vec<u8>,
    ) -> Result<bool, Failure> {
        match self {
            Backend::Palisade(c) => c[conn]
                .compare_and_swap(key, old, new)
                .await
                .map(|(swapped, _)| swapped)
                .map_err(palisade_failure),
            #[cfg(feature = "etcd")]
            Backend::Etcd(e) => e.compare_and_swap(conn, key, old, new).await,
        }
    }

    /// Per-node counters (empty when the system cannot be asked).
    pub async fn counters(&self) -> Vec<NodeCounters> {
        match self {
            Backend::Palisade(c) => match c[0].cluster_status().await {
                Ok(s) => s
                    .nodes
                    .iter()
                    .filter(|n| n.reachable)
                    .map(|n| NodeCounters {
                        id: n.id.to_string(),
                        fsyncs: n.flushes,
                        rss_bytes: n.rss_bytes,
                        disk_bytes: n.disk_bytes,
                        write_bytes: n.write_bytes,
                    })
                    .collect(),
                Err(_) => Vec::new(),
            },
            #[cfg(feature = "etcd")]
            Backend::Etcd(e) => e.counters().await,
        }
    }
}

fn palisade_failure(e: palisade_client::Error) -> Failure {
    if e.code() == palisade_client::Code::DeadlineExceeded {
        Failure::Timeout
    } else {
        Failure::Error
    }
}
