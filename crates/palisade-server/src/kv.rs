//! The Kv service: validates requests, routes them to the owning group, and
//! runs them there when this node leads it, or forwards them (one hop) to the
//! leader it knows of.
//!
//! A forwarded request carries the `x-palisade-forwarded` header; a node that
//! receives one and does not lead the group answers `UNAVAILABLE` with its
//! leader hint instead of forwarding again, so requests never loop.

use std::future::Future;
use std::sync::Arc;

use palisade_group::{
    Command, CommandResult, GroupError, OpResult, RaftGroup, RequestId, Txn, TxnOp,
};
use palisade_proto::v1 as pb;
use palisade_proto::v1::kv_client::KvClient;
use palisade_proto::v1::kv_server::Kv;
use palisade_proto::v1::peer_client::PeerClient;
use palisade_storage::KeyRecord;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::error::{ServerError, error_detail, not_leader_status, unknown_outcome_status};
use crate::node::Node;
use crate::read::{self, ReadParams, Receipt};
use crate::validate;

/// The session token covering a write at `revision` in `group`.
fn write_token(group: u64, revision: u64) -> Option<pb::SessionToken> {
    Some(pb::SessionToken {
        revisions: vec![pb::GroupRevision {
            group_id: group,
            revision,
        }],
    })
}

/// Metadata header marking a request forwarded by another node.
pub const FORWARDED: &str = "x-palisade-forwarded";

pub struct KvService {
    node: Arc<Node>,
}

/// Whether a forwarded request was a write (its failure in transit leaves the
/// outcome unknown) or a read (safe to report as unavailable).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
}

fn kv(key: Vec<u8>, r: KeyRecord, keys_only: bool) -> pb::KeyValue {
    pb::KeyValue {
        key,
        value: if keys_only { Vec::new() } else { r.value },
        create_revision: r.create_revision,
        mod_revision: r.mod_revision,
        version: r.version,
    }
}

fn is_forwarded<T>(request: &Request<T>) -> bool {
    request.metadata().contains_key(FORWARDED)
}

impl KvService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    fn header(&self, group: &RaftGroup, revision: u64) -> pb::ResponseHeader {
        pb::ResponseHeader {
            node_id: self.node.id(),
            group_id: group.id(),
            revision,
            term: group.raft().metrics().borrow().current_term,
            ..Default::default()
        }
    }

    fn read_header(
        &self,
        group: &RaftGroup,
        revision: u64,
        receipt: Receipt,
    ) -> pb::ResponseHeader {
        pb::ResponseHeader {
            consistency: receipt.level as i32,
            staleness_bound_ms: receipt.staleness_bound_ms,
            staleness_unbounded: receipt.unbounded,
            ..self.header(group, revision)
        }
    }

    /// Proposes `txn`; with `ack = ALL`, also waits until every replica of
    /// the group has applied it.
    async fn write(
        &self,
        group: &RaftGroup,
        request_id: Option<RequestId>,
        txn: Txn,
        ack: pb::WriteAck,
    ) -> Result<CommandResult, GroupError> {
        let res = group
            .write(
                Command::txn(request_id, txn),
                self.node.config.write_timeout,
            )
            .await?;
        // Refused by the state machine (e.g. a stale fence): nothing changed.
        if let Some(r) = res.rejected {
            return Err(GroupError::Rejected(r));
        }
        if ack == pb::WriteAck::All {
            self.wait_everywhere(group, res.revision).await?;
        }
        Ok(res)
    }

    /// Waits (bounded) until every other voter and learner of `group` has
    /// applied `revision`; names the ones that did not.
    async fn wait_everywhere(&self, group: &RaftGroup, revision: u64) -> Result<(), GroupError> {
        let wait = self.node.config.ack_all_wait;
        let others: Vec<(u64, String)> = group
            .member_addrs()
            .into_iter()
            .filter(|(id, _)| *id != self.node.id())
            .collect();
        let confirmations = futures::future::join_all(others.iter().map(|(id, addr)| async move {
            let Ok(channel) = self.node.channels.get(*id, addr) else {
                return false;
            };
            let mut req = tonic::Request::new(pb::WaitAppliedRequest {
                group_id: group.id(),
                revision,
                timeout_ms: wait.as_millis() as u64,
            });
            req.set_timeout(wait + std::time::Duration::from_millis(500));
            let mut client = PeerClient::new(channel);
            let call = client.wait_applied(req);
            match tokio::time::timeout(wait + std::time::Duration::from_millis(500), call).await {
                Ok(Ok(r)) => r.into_inner().applied >= revision,
                Ok(Err(_)) | Err(_) => {
                    self.node.channels.drop_channel(*id);
                    false
                }
            }
        }))
        .await;
        let lagging: Vec<u64> = others
            .iter()
            .zip(confirmations)
            .filter(|(_, ok)| !ok)
            .map(|((id, _), _)| *id)
            .collect();
        if lagging.is_empty() {
            Ok(())
        } else {
            Err(GroupError::NotEverywhere {
                group: group.id(),
                revision,
                lagging,
            })
        }
    }

    /// Sends `req` to the leader named in `err`, or turns `err` into a status.
    async fn forward<Req, Resp, F, Fut>(
        &self,
        group: &RaftGroup,
        err: GroupError,
        forwarded: bool,
        kind: Kind,
        req: Req,
        call: F,
    ) -> Result<Response<Resp>, Status>
    where
        F: FnOnce(KvClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let leader = match &err {
            GroupError::NotLeader {
                leader: Some((id, Some(addr))),
                ..
            } if *id != self.node.id() && !forwarded => (*id, addr.clone()),
            _ => return Err(ServerError::Group(err).into()),
        };
        let channel = self
            .node
            .channels
            .get(leader.0, &leader.1)
            .map_err(|e| Status::internal(format!("bad leader address {}: {e}", leader.1)))?;
        let mut request = Request::new(req);
        request
            .metadata_mut()
            .insert(FORWARDED, "1".parse().expect("static header"));
        request.set_timeout(self.node.peer_timeout());
        let client = KvClient::new(channel).max_decoding_message_size(usize::MAX);
        match tokio::time::timeout(self.node.peer_timeout(), call(client, request)).await {
            Ok(Ok(resp)) => Ok(resp),
            // An answer from the leader (including its own routing errors)
            // goes back as is.
            Ok(Err(status))
                if error_detail(&status).is_some()
                    || !matches!(
                        status.code(),
                        Code::Unavailable
                            | Code::Unknown
                            | Code::Cancelled
                            | Code::DeadlineExceeded
                    ) =>
            {
                Err(status)
            }
            failed => {
                self.node.channels.drop_channel(leader.0);
                let why = match failed {
                    Ok(Err(status)) => status.message().to_string(),
                    _ => "no reply in time".into(),
                };
                let msg = format!(
                    "forwarding to leader {} of group {} failed: {why}",
                    leader.0,
                    group.id()
                );
                Err(match kind {
                    Kind::Write => unknown_outcome_status(group.id(), msg),
                    Kind::Read => {
                        not_leader_status(group.id(), Some((leader.0, Some(leader.1))), msg)
                    }
                })
            }
        }
    }

    /// Scans one data group: locally if this node leads it, else at its leader.
    async fn scan_group(
        &self,
        group: &RaftGroup,
        range: &validate::ScanRange,
        req: &pb::ScanRequest,
        forwarded: bool,
    ) -> Result<pb::ScanResponse, Status> {
        let params = ReadParams::parse(
            req.consistency,
            req.max_staleness_ms,
            req.session.as_ref(),
            req.min_revision,
            req.at_revision,
            group.id(),
        )?;
        match read::prepare(&self.node, group, &params).await {
            Ok(receipt) => {
                let res = group
                    .state()
                    .scan_at(&range.start, range.end.as_deref(), range.limit, params.at)
                    .map_err(|e| ServerError::from_store(group.id(), e))?;
                let header = self.read_header(group, res.revision, receipt);
                Ok(pb::ScanResponse {
                    header: Some(header),
                    kvs: res
                        .records
                        .into_iter()
                        .map(|(k, r)| kv(k, r, req.keys_only))
                        .collect(),
                    more: res.more,
                    group_headers: vec![header],
                })
            }
            Err(e) => {
                let sub = pb::ScanRequest {
                    group_id: group.id(),
                    ..req.clone()
                };
                let resp = self
                    .forward(
                        group,
                        e,
                        forwarded,
                        Kind::Read,
                        sub,
                        |mut c, r| async move { c.scan(r).await },
                    )
                    .await?;
                Ok(resp.into_inner())
            }
        }
    }
}

fn prev_kv(key: &[u8], want: bool, prev: Option<KeyRecord>) -> Option<pb::KeyValue> {
    if want {
        prev.map(|r| kv(key.to_vec(), r, false))
    } else {
        None
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    #[tracing::instrument(skip_all)]
    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let req = request.into_inner();
        let txn = validate::put_txn(&self.node.config.limits, &req)?;
        let rid = validate::request_id(req.request_id.as_ref())?;
        let ack = validate::write_ack(req.ack)?;
        let group = self.node.group(txn_group(self.node.shard_map(), &txn)?)?;
        match self.write(group, rid, txn, ack).await {
            Ok(res) => {
                let prev = match res.results.into_iter().next() {
                    Some(OpResult::Put { prev }) => prev,
                    _ => None,
                };
                Ok(Response::new(pb::PutResponse {
                    header: Some(self.header(group, res.revision)),
                    prev_kv: prev_kv(&req.key, req.prev_kv, prev),
                    session: write_token(group.id(), res.revision),
                }))
            }
            Err(e) => {
                self.forward(
                    group,
                    e,
                    forwarded,
                    Kind::Write,
                    req,
                    |mut c, r| async move { c.put(r).await },
                )
                .await
            }
        }
    }

    #[tracing::instrument(skip_all)]
    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let req = request.into_inner();
        validate::check_key(&self.node.config.limits, &req.key)?;
        let group = self.node.group_for_key(&req.key)?;
        let params = ReadParams::parse(
            req.consistency,
            req.max_staleness_ms,
            req.session.as_ref(),
            req.min_revision,
            req.at_revision,
            group.id(),
        )?;
        let prepared = if self.node.config.unsafe_local_reads {
            // Test-only: answer locally whatever was asked (positive control).
            Ok(Receipt {
                level: params.level,
                staleness_bound_ms: 0,
                unbounded: false,
            })
        } else {
            read::prepare(&self.node, group, &params).await
        };
        match prepared {
            Ok(receipt) => {
                let (record, revision) = group
                    .state()
                    .get_at(&req.key, params.at)
                    .map_err(|e| ServerError::from_store(group.id(), e))?;
                Ok(Response::new(pb::GetResponse {
                    header: Some(self.read_header(group, revision, receipt)),
                    kv: record.map(|r| kv(req.key, r, false)),
                }))
            }
            Err(e) => {
                self.forward(
                    group,
                    e,
                    forwarded,
                    Kind::Read,
                    req,
                    |mut c, r| async move { c.get(r).await },
                )
                .await
            }
        }
    }

    #[tracing::instrument(skip_all)]
    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let req = request.into_inner();
        let txn = validate::delete_txn(&self.node.config.limits, &req)?;
        let rid = validate::request_id(req.request_id.as_ref())?;
        let ack = validate::write_ack(req.ack)?;
        let group = self.node.group(txn_group(self.node.shard_map(), &txn)?)?;
        match self.write(group, rid, txn, ack).await {
            Ok(res) => {
                let prev = match res.results.into_iter().next() {
                    Some(OpResult::Delete { prev }) => prev,
                    _ => None,
                };
                Ok(Response::new(pb::DeleteResponse {
                    header: Some(self.header(group, res.revision)),
                    deleted: u64::from(prev.is_some()),
                    prev_kv: prev_kv(&req.key, req.prev_kv, prev),
                    session: write_token(group.id(), res.revision),
                }))
            }
            Err(e) => {
                self.forward(
                    group,
                    e,
                    forwarded,
                    Kind::Write,
                    req,
                    |mut c, r| async move { c.delete(r).await },
                )
                .await
            }
        }
    }

    #[tracing::instrument(skip_all)]
    async fn scan(
        &self,
        request: Request<pb::ScanRequest>,
    ) -> Result<Response<pb::ScanResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let req = request.into_inner();
        let range = validate::scan_range(&self.node.config.limits, &req)?;
        let groups: Vec<&Arc<RaftGroup>> = if req.group_id != 0 {
            if req.group_id == palisade_shard::META_GROUP
                || !self.node.shard_map().has_group(req.group_id)
            {
                return Err(ServerError::UnknownGroup(req.group_id).into());
            }
            vec![self.node.group(req.group_id)?]
        } else {
            self.node
                .shard_map()
                .groups()
                .map(|g| self.node.group(g))
                .collect::<Result<_, _>>()?
        };
        if req.at_revision > 0 && groups.len() > 1 {
            return Err(ServerError::InvalidArgument(format!(
                "at_revision is a revision of one group: set group_id (this cluster has {} data groups)",
                groups.len()
            ))
            .into());
        }
        let parts = futures::future::try_join_all(
            groups
                .iter()
                .map(|g| self.scan_group(g, &range, &req, forwarded)),
        )
        .await?;
        let mut kvs = Vec::new();
        let mut more = false;
        let mut group_headers = Vec::new();
        for part in parts {
            more |= part.more;
            kvs.extend(part.kvs);
            group_headers.extend(part.group_headers);
        }
        kvs.sort_by(|a, b| a.key.cmp(&b.key));
        if kvs.len() > range.limit {
            kvs.truncate(range.limit);
            more = true;
        }
        let header = pb::ResponseHeader {
            node_id: self.node.id(),
            group_id: if groups.len() == 1 { groups[0].id() } else { 0 },
            revision: if groups.len() == 1 {
                group_headers.first().map_or(0, |h| h.revision)
            } else {
                0
            },
            ..Default::default()
        };
        Ok(Response::new(pb::ScanResponse {
            header: Some(header),
            kvs,
            more,
            group_headers,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let req = request.into_inner();
        validate::check_key(&self.node.config.limits, &req.key)?;
        let group = self.node.group_for_key(&req.key)?;
        let params = ReadParams::parse(
            req.consistency,
            req.max_staleness_ms,
            req.session.as_ref(),
            req.min_revision,
            0,
            group.id(),
        )?;
        match read::prepare(&self.node, group, &params).await {
            Ok(receipt) => Ok(Response::new(
                self.history_local(group, &req, receipt).await?,
            )),
            Err(e) => {
                self.forward(
                    group,
                    e,
                    forwarded,
                    Kind::Read,
                    req,
                    |mut c, r| async move { c.history(r).await },
                )
                .await
            }
        }
    }

    #[tracing::instrument(skip_all)]
    async fn txn(
        &self,
        request: Request<pb::TxnRequest>,
    ) -> Result<Response<pb::TxnResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let req = request.into_inner();
        let txn = validate::txn(&self.node.config.limits, &req)?;
        let rid = validate::request_id(req.request_id.as_ref())?;
        let ack = validate::write_ack(req.ack)?;
        let group = self.node.group(txn_group(self.node.shard_map(), &txn)?)?;
        let res = match self.write(group, rid, txn, ack).await {
            Ok(res) => res,
            Err(e) => {
                return self
                    .forward(
                        group,
                        e,
                        forwarded,
                        Kind::Write,
                        req,
                        |mut c, r| async move { c.txn(r).await },
                    )
                    .await;
            }
        };
        let header = self.header(group, res.revision);
        let branch = if res.succeeded {
            &req.success
        } else {
            &req.failure
        };
        let responses = branch
            .iter()
            .zip(res.results)
            .map(|(op, result)| op_response(op, result, header))
            .collect();
        Ok(Response::new(pb::TxnResponse {
            header: Some(header),
            succeeded: res.succeeded,
            responses,
            session: write_token(group.id(), res.revision),
        }))
    }
}

impl KvService {
    async fn history_local(
        &self,
        group: &RaftGroup,
        req: &pb::HistoryRequest,
        receipt: Receipt,
    ) -> Result<pb::HistoryResponse, ServerError> {
        let h = group
            .state()
            .history(&req.key)
            .map_err(|e| ServerError::from_store(group.id(), e))?;
        let versions = h
            .versions
            .into_iter()
            .map(|v| pb::KeyVersion {
                revision: v.revision,
                deleted: v.record.is_none(),
                kv: v.record.map(|r| kv(req.key.clone(), r, false)),
            })
            .collect();
        Ok(pb::HistoryResponse {
            header: Some(self.read_header(group, h.revision, receipt)),
            versions,
            compact_revision: h.compacted,
        })
    }
}

/// The one group that owns every key of `txn` (and its fence's lock, and
/// the leases its puts attach keys to).
pub(crate) fn txn_group(shard: palisade_shard::ShardMap, txn: &Txn) -> Result<u64, ServerError> {
    let mut keys = txn.keys();
    let first = keys
        .next()
        .ok_or_else(|| ServerError::InvalidArgument("transaction has no keys".into()))?;
    let group = shard.group_for_key(first);
    if let Some(other) = keys.find(|k| shard.group_for_key(k) != group) {
        let what = match &txn.fence {
            Some(f) if f.lock == other => "a fenced write's lock",
            _ => "all keys of a transaction",
        };
        return Err(ServerError::InvalidArgument(format!(
            "{what} must belong to one group: {:?} is in group {} but {:?} is in group {} (co-locate them with a hash tag, e.g. {{tag}}lock and {{tag}}key)",
            String::from_utf8_lossy(first),
            group,
            String::from_utf8_lossy(other),
            shard.group_for_key(other)
        )));
    }
    for op in txn.success.iter().chain(&txn.failure) {
        if let TxnOp::Put { key, lease, .. } = op
            && *lease != 0
            && palisade_group::lease_group(*lease) != group
        {
            return Err(ServerError::InvalidArgument(format!(
                "lease {lease} lives in group {} but key {:?} is in group {group}: grant the lease with a key of the same group",
                palisade_group::lease_group(*lease),
                String::from_utf8_lossy(key)
            )));
        }
    }
    Ok(group)
}

fn op_response(op: &pb::RequestOp, result: OpResult, header: pb::ResponseHeader) -> pb::ResponseOp {
    use pb::request_op::Request as Rq;
    use pb::response_op::Response as Rs;
    let response = match (&op.request, result) {
        (Some(Rq::Put(p)), OpResult::Put { prev }) => Rs::Put(pb::PutResponse {
            header: Some(header),
            prev_kv: prev_kv(&p.key, p.prev_kv, prev),
            session: None,
        }),
        (Some(Rq::Delete(d)), OpResult::Delete { prev }) => Rs::Delete(pb::DeleteResponse {
            header: Some(header),
            deleted: u64::from(prev.is_some()),
            prev_kv: prev_kv(&d.key, d.prev_kv, prev),
            session: None,
        }),
        (Some(Rq::Get(g)), OpResult::Get { record }) => Rs::Get(pb::GetResponse {
            header: Some(header),
            kv: record.map(|r| kv(g.key.clone(), r, false)),
        }),
        // The state machine answers op for op; a mismatch is a bug, but the
        // client still deserves a well-formed (empty) answer for that slot.
        _ => Rs::Get(pb::GetResponse {
            header: Some(header),
            kv: None,
        }),
    };
    pb::ResponseOp {
        response: Some(response),
    }
}
