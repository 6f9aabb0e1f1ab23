//! The Kv service: validates each request, names the group that owns its
//! key(s), and hands it to the router ([`Node::dispatch`]) with a local
//! handler (run on this node's replica) and a remote call (one hop to the
//! group's leader).

use std::sync::Arc;

use palisade_group::{
    Command, CommandResult, GroupError, GroupId, OpResult, RaftGroup, RequestId, Txn, TxnOp,
};
use palisade_proto::v1 as pb;
use palisade_proto::v1::kv_client::KvClient;
use palisade_proto::v1::kv_server::Kv;
use palisade_proto::v1::peer_client::PeerClient;
use palisade_shard::{LeaseHome, lease_home, slot_of};
use palisade_storage::KeyRecord;
use tonic::{Request, Response, Status};

use crate::error::ServerError;
use crate::node::Node;
use crate::read::{self, ReadParams, Receipt};
use crate::router::{Kind, RouteInfo};
use crate::validate;

pub struct KvService {
    node: Arc<Node>,
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

fn prev_kv(key: &[u8], want: bool, prev: Option<KeyRecord>) -> Option<pb::KeyValue> {
    if want {
        prev.map(|r| kv(key.to_vec(), r, false))
    } else {
        None
    }
}

impl KvService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    /// Proposes `txn`; with `ack = ALL`, also waits until every replica of
    /// the group has applied it.
    async fn write(
        &self,
        group: &RaftGroup,
        request_id: Option<RequestId>,
        txn: Txn,
        ack: pb::WriteAck,
    ) -> Result<CommandResult, ServerError> {
        let res = group
            .write(
                Command::txn(request_id, txn),
                self.node.config.write_timeout,
            )
            .await?;
        // Refused by the state machine (e.g. a stale fence): nothing changed.
        if let Some(r) = res.rejected {
            return Err(GroupError::Rejected(r).into());
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
            .filter(|(id, _)| *id != group.replica_id())
            .collect();
        let grace = std::time::Duration::from_millis(500);
        let confirmations = futures::future::join_all(others.iter().map(|(_, addr)| async move {
            let Ok(channel) = self.node.channels.get(addr) else {
                return false;
            };
            let mut req = tonic::Request::new(pb::WaitAppliedRequest {
                group_id: group.id(),
                revision,
                timeout_ms: wait.as_millis() as u64,
            });
            req.set_timeout(wait + grace);
            let mut peer = PeerClient::new(channel);
            match tokio::time::timeout(wait + grace, peer.wait_applied(req)).await {
                Ok(Ok(r)) => r.into_inner().applied >= revision,
                Ok(Err(_)) | Err(_) => {
                    self.node.channels.drop_channel(addr);
                    false
                }
            }
        }))
        .await;
        let map = self.node.map();
        let lagging: Vec<u64> = others
            .iter()
            .zip(confirmations)
            .filter(|(_, ok)| !ok)
            .map(|((replica, _), _)| map.node_of(group.id(), *replica).unwrap_or(*replica))
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

    fn header(&self, group: &RaftGroup, revision: u64) -> pb::ResponseHeader {
        header(&self.node, group, revision)
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

    /// Scans one data group here (or at its leader).
    async fn scan_group(
        &self,
        group: GroupId,
        range: &validate::ScanRange,
        req: &pb::ScanRequest,
        route: RouteInfo,
    ) -> Result<pb::ScanResponse, Status> {
        let sub = pb::ScanRequest {
            group_id: group,
            ..req.clone()
        };
        let resp = self
            .node
            .dispatch(
                group,
                Kind::Read,
                route,
                sub,
                |g| async move {
                    let params = ReadParams::parse(
                        req.consistency,
                        req.max_staleness_ms,
                        req.session.as_ref(),
                        req.min_revision,
                        req.at_revision,
                        g.id(),
                    )?;
                    let receipt = read::prepare(&self.node, &g, &params)
                        .await
                        .map_err(|e| e.into_error(g.id()))?;
                    let res = g
                        .state()
                        .scan_at(&range.start, range.end.as_deref(), range.limit, params.at)
                        .map_err(|e| ServerError::from_store(g.id(), e))?;
                    let header = self.read_header(&g, res.revision, receipt);
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
                },
                |ch, r| async move { client(ch).scan(r).await },
            )
            .await?;
        Ok(resp.into_inner())
    }

    /// The one group that owns every key of `txn` (and its fence's lock,
    /// and the leases its puts attach keys to).
    fn txn_group(&self, txn: &Txn, route: &RouteInfo) -> Result<GroupId, ServerError> {
        let map = self.node.map();
        let mut keys = txn.keys();
        let first = keys
            .next()
            .ok_or_else(|| ServerError::InvalidArgument("transaction has no keys".into()))?;
        let group_of = |k: &[u8]| self.node.map_group_for_key(&map, k);
        let group = group_of(first)?;
        for other in keys {
            let g = group_of(other)?;
            if g != group {
                let what = match &txn.fence {
                    Some(f) if f.lock == other => "a fenced write's lock",
                    _ => "all keys of a transaction",
                };
                return Err(ServerError::InvalidArgument(format!(
                    "{what} must belong to one group: {:?} is in group {group} but {:?} is in group {g} (co-locate them with a hash tag, e.g. {{tag}}lock and {{tag}}key)",
                    String::from_utf8_lossy(first),
                    String::from_utf8_lossy(other),
                )));
            }
        }
        for op in txn.success.iter().chain(&txn.failure) {
            if let TxnOp::Put { key, lease, .. } = op
                && *lease != 0
            {
                check_lease_for_key(&self.node, *lease, key, group)?;
            }
        }
        // The router prefers a hinted group this node hosts (its ownership
        // record then decides).
        self.node.group_for_key(first, route)
    }
}

/// A lease attached to `key` must live with it: in its slot (a lease of
/// this version) or in its group (a lease of an earlier version).
pub(crate) fn check_lease_for_key(
    node: &Node,
    lease: u64,
    key: &[u8],
    group: GroupId,
) -> Result<(), ServerError> {
    match lease_home(lease) {
        Some(LeaseHome::Slot(s)) if s == slot_of(key) => Ok(()),
        Some(LeaseHome::Slot(s)) => Err(ServerError::InvalidArgument(format!(
            "lease {lease} lives in hash slot {s} but key {:?} is in slot {}: grant the lease with a key of the same hash tag (e.g. {{tag}}lease for {{tag}}key)",
            String::from_utf8_lossy(key),
            slot_of(key)
        ))),
        Some(LeaseHome::LegacyGroup(g)) if g == group => Ok(()),
        Some(LeaseHome::LegacyGroup(g)) => Err(ServerError::InvalidArgument(format!(
            "lease {lease} lives in group {g} but key {:?} is in group {group}",
            String::from_utf8_lossy(key)
        ))),
        None => {
            let _ = node;
            Err(ServerError::InvalidArgument(format!(
                "{lease} is not a lease id of this cluster"
            )))
        }
    }
}

fn client(ch: tonic::transport::Channel) -> KvClient<tonic::transport::Channel> {
    KvClient::new(ch).max_decoding_message_size(usize::MAX)
}

/// The receipt of a response from `group` at `revision`.
pub(crate) fn header(node: &Node, group: &RaftGroup, revision: u64) -> pb::ResponseHeader {
    let map = node.map();
    pb::ResponseHeader {
        node_id: node.id(),
        group_id: group.id(),
        revision,
        term: group.raft().metrics().borrow().current_term,
        group_epoch: map.groups.get(&group.id()).map_or(0, |g| g.epoch),
        map_epoch: map.epoch,
        ..Default::default()
    }
}

/// The session token covering a write at `revision` in `group` to `key`:
/// the write itself, and — when the key's slot moved into the group — the
/// revision at which the previous owner handed it over, so a session read
/// sent there by a stale route waits for the hand-over and is redirected
/// instead of answering from before the move.
fn write_token(group: &RaftGroup, key: &[u8], revision: u64) -> Option<pb::SessionToken> {
    let mut revisions = vec![pb::GroupRevision {
        group_id: group.id(),
        revision,
    }];
    if let Some(own) = group.state().ownership()
        && let Some((from, at)) = own.came_from.get(&slot_of(key))
    {
        revisions.push(pb::GroupRevision {
            group_id: *from,
            revision: *at,
        });
    }
    Some(pb::SessionToken { revisions })
}

#[tonic::async_trait]
impl Kv for KvService {
    #[tracing::instrument(skip_all)]
    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let route = RouteInfo::of(request.metadata());
        let req = request.into_inner();
        let txn = validate::put_txn(&self.node.config.limits, &req)?;
        let rid = validate::request_id(req.request_id.as_ref())?;
        let ack = validate::write_ack(req.ack)?;
        let group = self
            .txn_group(&txn, &route)
            .map_err(|e| self.node.to_status(e))?;
        let r = &req;
        self.node
            .dispatch(
                group,
                Kind::Write,
                route,
                req.clone(),
                |g| {
                    let txn = txn.clone();
                    async move {
                        let res = self.write(&g, rid, txn, ack).await?;
                        let prev = match res.results.into_iter().next() {
                            Some(OpResult::Put { prev }) => prev,
                            _ => None,
                        };
                        Ok(pb::PutResponse {
                            header: Some(self.header(&g, res.revision)),
                            prev_kv: prev_kv(&r.key, r.prev_kv, prev),
                            session: write_token(&g, &r.key, res.revision),
                        })
                    }
                },
                |ch, r| async move { client(ch).put(r).await },
            )
            .await
    }

    #[tracing::instrument(skip_all)]
    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let route = RouteInfo::of(request.metadata());
        let req = request.into_inner();
        validate::check_key(&self.node.config.limits, &req.key)?;
        let group = self
            .node
            .group_for_key(&req.key, &route)
            .map_err(|e| self.node.to_status(e))?;
        let r = &req;
        self.node
            .dispatch(
                group,
                Kind::Read,
                route,
                req.clone(),
                |g| async move {
                    let params = ReadParams::parse(
                        r.consistency,
                        r.max_staleness_ms,
                        r.session.as_ref(),
                        r.min_revision,
                        r.at_revision,
                        g.id(),
                    )?;
                    let receipt = if self.node.config.unsafe_local_reads {
                        // Test-only: answer locally whatever was asked
                        // (jepsen-lite's positive control).
                        Receipt {
                            level: params.level,
                            staleness_bound_ms: 0,
                            unbounded: false,
                        }
                    } else {
                        read::prepare(&self.node, &g, &params)
                            .await
                            .map_err(|e| e.into_error(g.id()))?
                    };
                    let (record, revision) = g
                        .state()
                        .get_at(&r.key, params.at)
                        .map_err(|e| ServerError::from_store(g.id(), e))?;
                    Ok(pb::GetResponse {
                        header: Some(self.read_header(&g, revision, receipt)),
                        kv: record.map(|rec| kv(r.key.clone(), rec, false)),
                    })
                },
                |ch, r| async move { client(ch).get(r).await },
            )
            .await
    }

    #[tracing::instrument(skip_all)]
    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let route = RouteInfo::of(request.metadata());
        let req = request.into_inner();
        let txn = validate::delete_txn(&self.node.config.limits, &req)?;
        let rid = validate::request_id(req.request_id.as_ref())?;
        let ack = validate::write_ack(req.ack)?;
        let group = self
            .txn_group(&txn, &route)
            .map_err(|e| self.node.to_status(e))?;
        let r = &req;
        self.node
            .dispatch(
                group,
                Kind::Write,
                route,
                req.clone(),
                |g| {
                    let txn = txn.clone();
                    async move {
                        let res = self.write(&g, rid, txn, ack).await?;
                        let prev = match res.results.into_iter().next() {
                            Some(OpResult::Delete { prev }) => prev,
                            _ => None,
                        };
                        Ok(pb::DeleteResponse {
                            header: Some(self.header(&g, res.revision)),
                            deleted: u64::from(prev.is_some()),
                            prev_kv: prev_kv(&r.key, r.prev_kv, prev),
                            session: write_token(&g, &r.key, res.revision),
                        })
                    }
                },
                |ch, r| async move { client(ch).delete(r).await },
            )
            .await
    }

    #[tracing::instrument(skip_all)]
    async fn scan(
        &self,
        request: Request<pb::ScanRequest>,
    ) -> Result<Response<pb::ScanResponse>, Status> {
        self.node.check_serving()?;
        let route = RouteInfo::of(request.metadata());
        let req = request.into_inner();
        let range = validate::scan_range(&self.node.config.limits, &req)?;
        let map = self.node.map();
        let all: Vec<GroupId> = if map.is_bootstrapped() {
            map.data_groups().collect()
        } else {
            match self.node.legacy_groups() {
                Some(n) => (1..=n).collect(),
                None => return Err(self.node.to_status(ServerError::MapNotReady)),
            }
        };
        let groups: Vec<GroupId> = if req.group_id != 0 {
            let hosted = self.node.group(req.group_id).is_some();
            if req.group_id == palisade_shard::META_GROUP
                || !(all.contains(&req.group_id) || hosted)
            {
                return Err(ServerError::UnknownGroup(req.group_id).into());
            }
            vec![req.group_id]
        } else {
            all
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
                .map(|g| self.scan_group(*g, &range, &req, route)),
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
        let single = groups.len() == 1;
        let header = pb::ResponseHeader {
            node_id: self.node.id(),
            group_id: if single { groups[0] } else { 0 },
            revision: if single {
                group_headers.first().map_or(0, |h| h.revision)
            } else {
                0
            },
            map_epoch: map.epoch,
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
        let route = RouteInfo::of(request.metadata());
        let req = request.into_inner();
        validate::check_key(&self.node.config.limits, &req.key)?;
        let group = self
            .node
            .group_for_key(&req.key, &route)
            .map_err(|e| self.node.to_status(e))?;
        let r = &req;
        self.node
            .dispatch(
                group,
                Kind::Read,
                route,
                req.clone(),
                |g| async move {
                    let params = ReadParams::parse(
                        r.consistency,
                        r.max_staleness_ms,
                        r.session.as_ref(),
                        r.min_revision,
                        0,
                        g.id(),
                    )?;
                    let receipt = read::prepare(&self.node, &g, &params)
                        .await
                        .map_err(|e| e.into_error(g.id()))?;
                    let h = g
                        .state()
                        .history(&r.key)
                        .map_err(|e| ServerError::from_store(g.id(), e))?;
                    let versions = h
                        .versions
                        .into_iter()
                        .map(|v| pb::KeyVersion {
                            revision: v.revision,
                            deleted: v.record.is_none(),
                            kv: v.record.map(|rec| kv(r.key.clone(), rec, false)),
                        })
                        .collect();
                    Ok(pb::HistoryResponse {
                        header: Some(self.read_header(&g, h.revision, receipt)),
                        versions,
                        compact_revision: h.compacted,
                    })
                },
                |ch, r| async move { client(ch).history(r).await },
            )
            .await
    }

    #[tracing::instrument(skip_all)]
    async fn txn(
        &self,
        request: Request<pb::TxnRequest>,
    ) -> Result<Response<pb::TxnResponse>, Status> {
        let route = RouteInfo::of(request.metadata());
        let req = request.into_inner();
        let txn = validate::txn(&self.node.config.limits, &req)?;
        let rid = validate::request_id(req.request_id.as_ref())?;
        let ack = validate::write_ack(req.ack)?;
        let group = self
            .txn_group(&txn, &route)
            .map_err(|e| self.node.to_status(e))?;
        let first_key = txn.keys().next().map(<[u8]>::to_vec).unwrap_or_default();
        let r = &req;
        let first_key = &first_key;
        self.node
            .dispatch(
                group,
                Kind::Write,
                route,
                req.clone(),
                |g| {
                    let txn = txn.clone();
                    async move {
                        let res = self.write(&g, rid, txn, ack).await?;
                        let header = self.header(&g, res.revision);
                        let branch = if res.succeeded {
                            &r.success
                        } else {
                            &r.failure
                        };
                        let responses = branch
                            .iter()
                            .zip(res.results)
                            .map(|(op, result)| op_response(op, result, header))
                            .collect();
                        Ok(pb::TxnResponse {
                            header: Some(header),
                            succeeded: res.succeeded,
                            responses,
                            session: write_token(&g, first_key, res.revision),
                        })
                    }
                },
                |ch, r| async move { client(ch).txn(r).await },
            )
            .await
    }
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
