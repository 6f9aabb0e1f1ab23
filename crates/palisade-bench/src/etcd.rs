//! The etcd backend (cargo feature `etcd`): etcd v3 through `etcd-client`.
//!
//! Every connection goes to etcd's current leader (found with the
//! maintenance `Status` call), so puts and linearizable gets take the same
//! path as palisade's client, which sends them to the group leader: no
//! follower-to-leader forwarding on either side.
//!
//! Counters come from each member's Prometheus endpoint (`/metrics` on the
//! client port): `etcd_disk_wal_fsync_duration_seconds_count` +
//! `etcd_disk_backend_commit_duration_seconds_count` (fsyncs),
//! `process_resident_memory_bytes`, `etcd_mvcc_db_total_size_in_bytes`.

use std::time::Duration;

use anyhow::{Context, bail};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, KvClient, Txn, TxnOp};

use crate::backend::{Failure, NodeCounters};
use crate::prom::{fetch_metrics, metric_sum};

/// Connections to an etcd cluster.
#[derive(Clone)]
pub struct Etcd {
    kv: Vec<KvClient>,
    /// host:port of every member's client URL, for `/metrics`.
    members: Vec<String>,
}

fn options(timeout: Duration) -> ConnectOptions {
    ConnectOptions::new()
        .with_timeout(timeout)
        .with_connect_timeout(Duration::from_secs(5))
}

fn host_port(endpoint: &str) -> &str {
    endpoint.trim_start_matches("http://").trim_end_matches('/')
}

impl Etcd {
    /// Finds the leader among `endpoints` and opens `connections`
    /// connections to it.
    pub async fn connect(
        endpoints: &[String],
        connections: usize,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let leader = find_leader(endpoints, timeout).await?;
        let mut kv = Vec::new();
        for _ in 0..connections.max(1) {
            let client = Client::connect([leader.as_str()], Some(options(timeout)))
                .await
                .with_context(|| format!("cannot connect to etcd at {leader}"))?;
            kv.push(client.kv_client());
        }
        Ok(Self {
            kv,
            members: endpoints.iter().map(|e| host_port(e).to_string()).collect(),
        })
    }

    pub fn connections(&self) -> usize {
        self.kv.len()
    }

    pub async fn get(
        &self,
        conn: usize,
        key: Vec<u8>,
        serializable: bool,
    ) -> Result<Option<Vec<u8>>, Failure> {
        let opts = serializable.then(|| GetOptions::new().with_serializable());
        let mut kv = self.kv[conn].clone();
        let resp = kv.get(key, opts).await.map_err(failure)?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    pub async fn put(&self, conn: usize, key: Vec<u8>, value: Vec<u8>) -> Result<(), Failure> {
        let mut kv = self.kv[conn].clone();
        kv.put(key, value, None).await.map_err(failure)?;
        Ok(())
    }

    pub async fn compare_and_swap(
        &self,
        conn: usize,
        key: Vec<u8>,
        old: Option<Vec<u8>>,
        new: Vec<u8>,
    ) -> Result<bool, Failure> {
        let compare = match old {
            Some(v) => Compare::value(key.clone(), CompareOp::Equal, v),
            None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(key, new, None)]);
        let mut kv = self.kv[conn].clone();
        let resp = kv.txn(txn).await.map_err(failure)?;
        Ok(resp.succeeded())
    }

    /// Counters of every member that answers `/metrics`.
    pub async fn counters(&self) -> Vec<NodeCounters> {
        let mut out = Vec::new();
        for m in &self.members {
            if let Ok(text) = fetch_metrics(m).await {
                let get = |name: &str| metric_sum(&text, name) as u64;
                out.push(NodeCounters {
                    id: m.clone(),
                    fsyncs: get("etcd_disk_wal_fsync_duration_seconds_count")
                        + get("etcd_disk_backend_commit_duration_seconds_count"),
                    rss_bytes: get("process_resident_memory_bytes"),
                    disk_bytes: get("etcd_mvcc_db_total_size_in_bytes"),
                    write_bytes: 0,
                });
            }
        }
        out
    }
}

fn failure(e: etcd_client::Error) -> Failure {
    match e {
        etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::DeadlineExceeded => {
            Failure::Timeout
        }
        _ => Failure::Error,
    }
}

/// The client endpoint of the member that leads.
async fn find_leader(endpoints: &[String], timeout: Duration) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut last = String::from("no member answered");
    while tokio::time::Instant::now() < deadline {
        for ep in endpoints {
            let Ok(mut client) = Client::connect([ep.as_str()], Some(options(timeout))).await
            else {
                last = format!("cannot connect to {ep}");
                continue;
            };
            match client.status().await {
                Ok(s) => {
                    let me = s.header().map_or(0, |h| h.member_id());
                    if s.leader() != 0 && s.leader() == me {
                        return Ok(ep.clone());
                    }
                    last = format!("{ep} is not the leader (leader {:x})", s.leader());
                }
                Err(e) => last = format!("{ep}: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("no etcd leader among {}: {last}", endpoints.join(","))
}
