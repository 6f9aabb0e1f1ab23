//! Request validation and conversion from protobuf to domain types.
//!
//! Every check happens before anything is proposed, so a rejected request
//! changes nothing. Errors name the limit or field at fault.

use palisade_group::{Compare, CompareOp, CompareTarget, Fence, RequestId, Txn, TxnOp};
use palisade_proto::v1 as pb;
use palisade_storage::keys::prefix_end;

use crate::config::{DEFAULT_SCAN_LIMIT, Limits, MAX_SCAN_LIMIT};
use crate::error::ServerError;

fn invalid(msg: impl Into<String>) -> ServerError {
    ServerError::InvalidArgument(msg.into())
}

/// Checks a key: non-empty and within the key limit.
pub fn check_key(limits: &Limits, key: &[u8]) -> Result<(), ServerError> {
    if key.is_empty() {
        return Err(invalid("key must not be empty"));
    }
    if key.len() > limits.max_key_bytes {
        return Err(invalid(format!(
            "key is {} bytes, over the limit of {} bytes (max_key_bytes)",
            key.len(),
            limits.max_key_bytes
        )));
    }
    Ok(())
}

/// Checks a value against the value limit.
pub fn check_value(limits: &Limits, value: &[u8]) -> Result<(), ServerError> {
    if value.len() > limits.max_value_bytes {
        return Err(invalid(format!(
            "value is {} bytes, over the limit of {} bytes (max_value_bytes)",
            value.len(),
            limits.max_value_bytes
        )));
    }
    Ok(())
}

/// Converts an optional request id, checking its invariants.
pub fn request_id(id: Option<&pb::RequestId>) -> Result<Option<RequestId>, ServerError> {
    let Some(id) = id else { return Ok(None) };
    if id.client_id == 0 {
        return Err(invalid("request_id.client_id must be non-zero"));
    }
    if id.first_incomplete_seq > id.seq {
        return Err(invalid(format!(
            "request_id.first_incomplete_seq ({}) is above seq ({}): a write cannot be complete before it is sent",
            id.first_incomplete_seq, id.seq
        )));
    }
    Ok(Some(RequestId {
        client_id: id.client_id,
        seq: id.seq,
        first_incomplete_seq: id.first_incomplete_seq,
    }))
}

/// Converts a write's ack level (unset: MAJORITY).
pub fn write_ack(ack: i32) -> Result<pb::WriteAck, ServerError> {
    match pb::WriteAck::try_from(ack) {
        Ok(pb::WriteAck::Unspecified) => Ok(pb::WriteAck::Majority),
        Ok(a) => Ok(a),
        Err(_) => Err(invalid(format!("unknown write ack level {ack}"))),
    }
}

/// Converts an optional fence.
pub fn fence(limits: &Limits, fence: Option<&pb::Fence>) -> Result<Option<Fence>, ServerError> {
    let Some(f) = fence else { return Ok(None) };
    check_key(limits, &f.lock).map_err(|e| invalid(format!("fence.lock: {e}")))?;
    if f.token == 0 {
        return Err(invalid("fence.token must be a fencing token (non-zero)"));
    }
    Ok(Some(Fence {
        lock: f.lock.clone(),
        token: f.token,
    }))
}

pub fn put_txn(limits: &Limits, req: &pb::PutRequest) -> Result<Txn, ServerError> {
    check_key(limits, &req.key)?;
    check_value(limits, &req.value)?;
    Ok(Txn {
        fence: fence(limits, req.fence.as_ref())?,
        ..Txn::single(TxnOp::Put {
            key: req.key.clone(),
            value: req.value.clone(),
            lease: req.lease,
        })
    })
}

pub fn delete_txn(limits: &Limits, req: &pb::DeleteRequest) -> Result<Txn, ServerError> {
    check_key(limits, &req.key)?;
    Ok(Txn {
        fence: fence(limits, req.fence.as_ref())?,
        ..Txn::single(TxnOp::Delete {
            key: req.key.clone(),
        })
    })
}

fn txn_op(limits: &Limits, op: &pb::RequestOp, at: &str) -> Result<TxnOp, ServerError> {
    use pb::request_op::Request;
    match &op.request {
        Some(Request::Put(p)) => {
            check_key(limits, &p.key).map_err(|e| invalid(format!("{at}: {e}")))?;
            check_value(limits, &p.value).map_err(|e| invalid(format!("{at}: {e}")))?;
            Ok(TxnOp::Put {
                key: p.key.clone(),
                value: p.value.clone(),
                lease: p.lease,
            })
        }
        Some(Request::Delete(d)) => {
            check_key(limits, &d.key).map_err(|e| invalid(format!("{at}: {e}")))?;
            Ok(TxnOp::Delete { key: d.key.clone() })
        }
        Some(Request::Get(g)) => {
            check_key(limits, &g.key).map_err(|e| invalid(format!("{at}: {e}")))?;
            Ok(TxnOp::Get { key: g.key.clone() })
        }
        None => Err(invalid(format!("{at}: operation has no request set"))),
    }
}

fn compare(limits: &Limits, c: &pb::Compare, at: &str) -> Result<Compare, ServerError> {
    use pb::compare::{Op, Operand, Target};
    check_key(limits, &c.key).map_err(|e| invalid(format!("{at}: {e}")))?;
    let target = Target::try_from(c.target)
        .map_err(|_| invalid(format!("{at}: unknown target {}", c.target)))?;
    let op = match Op::try_from(c.op).map_err(|_| invalid(format!("{at}: unknown op {}", c.op)))? {
        Op::Unspecified => return Err(invalid(format!("{at}: the compare's op is not set"))),
        Op::Equal => CompareOp::Equal,
        Op::NotEqual => CompareOp::NotEqual,
        Op::Less => CompareOp::Less,
        Op::Greater => CompareOp::Greater,
    };
    let target = match (target, &c.operand) {
        (Target::Value, Some(Operand::Value(v))) => {
            check_value(limits, v).map_err(|e| invalid(format!("{at}: {e}")))?;
            CompareTarget::Value(v.clone())
        }
        (Target::Version, Some(Operand::Version(v))) => CompareTarget::Version(*v),
        (Target::ModRevision, Some(Operand::ModRevision(v))) => CompareTarget::ModRevision(*v),
        (Target::CreateRevision, Some(Operand::CreateRevision(v))) => {
            CompareTarget::CreateRevision(*v)
        }
        (Target::Exists, Some(Operand::Exists(v))) => {
            if matches!(op, CompareOp::Less | CompareOp::Greater) {
                return Err(invalid(format!(
                    "{at}: an EXISTS compare takes EQUAL or NOT_EQUAL"
                )));
            }
            CompareTarget::Exists(*v)
        }
        (Target::Unspecified, _) => {
            return Err(invalid(format!("{at}: the compare's target is not set")));
        }
        (t, _) => {
            return Err(invalid(format!(
                "{at}: target {} needs the matching operand field set",
                t.as_str_name()
            )));
        }
    };
    Ok(Compare {
        key: c.key.clone(),
        op,
        target,
    })
}

/// Converts and checks a transaction (not yet its group: see the server).
pub fn txn(limits: &Limits, req: &pb::TxnRequest) -> Result<Txn, ServerError> {
    let mut out = Txn {
        fence: fence(limits, req.fence.as_ref())?,
        ..Txn::default()
    };
    for (i, c) in req.compare.iter().enumerate() {
        out.compares
            .push(compare(limits, c, &format!("compare[{i}]"))?);
    }
    for (i, op) in req.success.iter().enumerate() {
        out.success
            .push(txn_op(limits, op, &format!("success[{i}]"))?);
    }
    for (i, op) in req.failure.iter().enumerate() {
        out.failure
            .push(txn_op(limits, op, &format!("failure[{i}]"))?);
    }
    if out.keys().next().is_none() {
        return Err(invalid(
            "transaction is empty: it has no compares and no operations",
        ));
    }
    let bytes: usize = out.keys().map(<[u8]>::len).sum::<usize>()
        + out
            .success
            .iter()
            .chain(&out.failure)
            .map(|op| match op {
                TxnOp::Put { value, .. } => value.len(),
                _ => 0,
            })
            .sum::<usize>();
    if bytes > limits.max_request_bytes {
        return Err(invalid(format!(
            "transaction carries {bytes} bytes of keys and values, over the limit of {} bytes (max_request_bytes)",
            limits.max_request_bytes
        )));
    }
    Ok(out)
}

/// A validated scan range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanRange {
    pub start: Vec<u8>,
    /// Exclusive end; `None` means no upper bound.
    pub end: Option<Vec<u8>>,
    pub limit: usize,
}

pub fn scan_range(limits: &Limits, req: &pb::ScanRequest) -> Result<ScanRange, ServerError> {
    if req.key.len() > limits.max_key_bytes || req.range_end.len() > limits.max_key_bytes {
        return Err(invalid(format!(
            "scan bound is over the key limit of {} bytes (max_key_bytes)",
            limits.max_key_bytes
        )));
    }
    let limit = match req.limit as usize {
        0 => DEFAULT_SCAN_LIMIT,
        n if n > MAX_SCAN_LIMIT => {
            return Err(invalid(format!(
                "limit {n} is over the maximum of {MAX_SCAN_LIMIT}"
            )));
        }
        n => n,
    };
    let (start, end) = if req.prefix {
        if !req.range_end.is_empty() {
            return Err(invalid("range_end must be empty when prefix is set"));
        }
        (req.key.clone(), prefix_end(&req.key))
    } else if req.range_end.is_empty() {
        (req.key.clone(), None)
    } else {
        if req.range_end <= req.key {
            return Err(invalid(format!(
                "range_end must be greater than key (got key={:?}, range_end={:?})",
                String::from_utf8_lossy(&req.key),
                String::from_utf8_lossy(&req.range_end)
            )));
        }
        (req.key.clone(), Some(req.range_end.clone()))
    };
    Ok(ScanRange { start, end, limit })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::compare::{Op, Operand, Target};

    fn limits() -> Limits {
        Limits {
            max_key_bytes: 8,
            max_value_bytes: 16,
            max_request_bytes: 40,
        }
    }

    fn err(r: Result<impl std::fmt::Debug, ServerError>) -> String {
        match r.unwrap_err() {
            ServerError::InvalidArgument(m) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    fn put(key: &[u8], value: &[u8]) -> pb::PutRequest {
        pb::PutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn keys_and_values_are_bounded() {
        let l = limits();
        assert!(put_txn(&l, &put(b"k", b"v")).is_ok());
        assert!(err(put_txn(&l, &put(b"", b"v"))).contains("empty"));
        assert!(err(put_txn(&l, &put(b"123456789", b"v"))).contains("max_key_bytes"));
        assert!(err(put_txn(&l, &put(b"k", &[0; 17]))).contains("max_value_bytes"));
        assert!(
            put_txn(&l, &put(b"12345678", &[0; 16])).is_ok(),
            "limits are inclusive"
        );
        assert!(err(delete_txn(&l, &pb::DeleteRequest::default())).contains("empty"));
    }

    #[test]
    fn request_ids_are_checked() {
        assert_eq!(request_id(None).unwrap(), None);
        let bad = pb::RequestId {
            client_id: 0,
            seq: 1,
            first_incomplete_seq: 1,
        };
        assert!(err(request_id(Some(&bad))).contains("client_id"));
        let ahead = pb::RequestId {
            client_id: 1,
            seq: 1,
            first_incomplete_seq: 2,
        };
        assert!(err(request_id(Some(&ahead))).contains("first_incomplete_seq"));
    }

    #[test]
    fn scan_ranges_are_validated() {
        let l = limits();
        let scan = |key: &[u8], end: &[u8], prefix: bool, limit: u32| pb::ScanRequest {
            key: key.to_vec(),
            range_end: end.to_vec(),
            prefix,
            limit,
            keys_only: false,
            ..Default::default()
        };
        let r = scan_range(&l, &scan(b"a", b"c", false, 0)).unwrap();
        assert_eq!(
            (r.start, r.end, r.limit),
            (b"a".to_vec(), Some(b"c".to_vec()), DEFAULT_SCAN_LIMIT)
        );
        let r = scan_range(&l, &scan(b"ab", b"", true, 5)).unwrap();
        assert_eq!((r.end, r.limit), (Some(b"ac".to_vec()), 5));
        assert_eq!(scan_range(&l, &scan(b"", b"", false, 1)).unwrap().end, None);
        assert!(err(scan_range(&l, &scan(b"c", b"a", false, 0))).contains("greater than key"));
        assert!(err(scan_range(&l, &scan(b"a", b"a", false, 0))).contains("greater than key"));
        assert!(err(scan_range(&l, &scan(b"a", b"b", true, 0))).contains("prefix"));
        assert!(err(scan_range(&l, &scan(b"a", b"", false, 1_000_000))).contains("maximum"));
    }

    fn cmp(target: Target, op: Op, operand: Option<Operand>) -> pb::Compare {
        pb::Compare {
            key: b"k".to_vec(),
            target: target as i32,
            op: op as i32,
            operand,
        }
    }

    fn put_op(key: &[u8], value: &[u8]) -> pb::RequestOp {
        pb::RequestOp {
            request: Some(pb::request_op::Request::Put(put(key, value))),
        }
    }

    #[test]
    fn transactions_are_validated() {
        let l = limits();
        let ok = pb::TxnRequest {
            compare: vec![cmp(
                Target::Value,
                Op::Equal,
                Some(Operand::Value(b"v".to_vec())),
            )],
            success: vec![put_op(b"k", b"w")],
            ..Default::default()
        };
        let t = txn(&l, &ok).unwrap();
        assert_eq!(t.compares.len(), 1);
        assert!(err(txn(&l, &pb::TxnRequest::default())).contains("empty"));
        let mismatched = pb::TxnRequest {
            compare: vec![cmp(
                Target::Version,
                Op::Equal,
                Some(Operand::Value(b"v".to_vec())),
            )],
            ..Default::default()
        };
        assert!(err(txn(&l, &mismatched)).contains("VERSION"));
        let exists_less = pb::TxnRequest {
            compare: vec![cmp(Target::Exists, Op::Less, Some(Operand::Exists(true)))],
            ..Default::default()
        };
        assert!(err(txn(&l, &exists_less)).contains("EQUAL"));
        let unknown = pb::TxnRequest {
            compare: vec![pb::Compare {
                target: 42,
                ..cmp(Target::Value, Op::Equal, None)
            }],
            ..Default::default()
        };
        assert!(err(txn(&l, &unknown)).contains("unknown target"));
        let too_big = pb::TxnRequest {
            success: vec![
                put_op(b"a", &[0; 16]),
                put_op(b"b", &[0; 16]),
                put_op(b"c", &[0; 16]),
            ],
            ..Default::default()
        };
        assert!(err(txn(&l, &too_big)).contains("max_request_bytes"));
        let empty_op = pb::TxnRequest {
            success: vec![pb::RequestOp { request: None }],
            ..Default::default()
        };
        assert!(err(txn(&l, &empty_op)).contains("success[0]"));
    }
}
