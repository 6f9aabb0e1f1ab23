//! Key encoding for the per-group trees.
//!
//! The `state` tree holds three kinds of records, told apart by their first
//! byte so that a range scan over user keys never meets anything else:
//!
//! | prefix | rest                        | value                         |
//! |--------|-----------------------------|-------------------------------|
//! | `0x00` | meta name (`applied`, ...)  | bincode of the meta value     |
//! | `0x01` | user key bytes              | bincode of [`KeyRecord`]      |
//! | `0x02` | client id (BE) ++ seq (BE)  | the write's encoded result    |
//! | `0x03` | escaped key ++ revision (BE)| bincode of a past version     |
//! | `0x04` | lease id (BE)               | bincode of a lease record     |
//! | `0x05` | lock name bytes             | bincode of a lock record      |
//!
//! History keys escape the user key (`0x00` → `0x00 0xff`, then the
//! terminator `0x00 0x00`) so that they sort by user key first and revision
//! second, and no key's history can interleave with another's.
//!
//! Earlier versions kept the Raft log in a sled tree keyed by the big-endian
//! log index ([`log_key`]); it is read once, to move it into the
//! write-ahead log.
//!
//! [`KeyRecord`]: crate::state::KeyRecord

/// First byte of metadata records.
pub const META: u8 = 0x00;
/// First byte of user key records.
pub const USER: u8 = 0x01;
/// First byte of request-deduplication records.
pub const DEDUP: u8 = 0x02;

/// First byte of history records (superseded versions and tombstones).
pub const HISTORY: u8 = 0x03;

/// First byte of lease records.
pub const LEASE: u8 = 0x04;
/// First byte of lock records.
pub const LOCK: u8 = 0x05;

/// Key of a lease record.
pub fn lease_key(id: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = LEASE;
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

/// The lease id of an encoded lease key, if it is one.
pub fn decode_lease_key(encoded: &[u8]) -> Option<u64> {
    match encoded.split_first() {
        Some((&LEASE, rest)) => Some(u64::from_be_bytes(rest.try_into().ok()?)),
        _ => None,
    }
}

/// Key of a lock record.
pub fn lock_key(name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(LOCK);
    k.extend_from_slice(name);
    k
}

/// Appends `key` in the order-preserving, prefix-free escaped form.
fn push_escaped(out: &mut Vec<u8>, key: &[u8]) {
    for &b in key {
        out.push(b);
        if b == 0 {
            out.push(0xff);
        }
    }
    out.extend_from_slice(&[0, 0]);
}

/// The prefix shared by every history record of `key`.
pub fn history_prefix(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + key.len());
    k.push(HISTORY);
    push_escaped(&mut k, key);
    k
}

/// Key of `key`'s history record at `revision`.
pub fn history_key(key: &[u8], revision: u64) -> Vec<u8> {
    let mut k = history_prefix(key);
    k.extend_from_slice(&revision.to_be_bytes());
    k
}

/// The encoded bound just past every history record.
pub fn history_end() -> Vec<u8> {
    vec![HISTORY + 1]
}

/// The user key and revision of an encoded history key, if it is one.
pub fn decode_history_key(encoded: &[u8]) -> Option<(Vec<u8>, u64)> {
    let (&first, mut rest) = encoded.split_first()?;
    if first != HISTORY {
        return None;
    }
    let mut key = Vec::new();
    loop {
        match rest {
            [0, 0, tail @ ..] => {
                let bytes: [u8; 8] = tail.try_into().ok()?;
                return Some((key, u64::from_be_bytes(bytes)));
            }
            [0, 0xff, tail @ ..] => {
                key.push(0);
                rest = tail;
            }
            [0, ..] | [] => return None,
            [b, tail @ ..] => {
                key.push(*b);
                rest = tail;
            }
        }
    }
}

/// Key of a metadata record.
pub fn meta_key(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(META);
    k.extend_from_slice(name.as_bytes());
    k
}

/// Key of a user key's record.
pub fn user_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(USER);
    k.extend_from_slice(key);
    k
}

/// The user key inside an encoded user record key, if it is one.
pub fn decode_user_key(encoded: &[u8]) -> Option<&[u8]> {
    match encoded.split_first() {
        Some((&USER, rest)) => Some(rest),
        _ => None,
    }
}

/// The encoded bound just past every user key: the first dedup key.
pub fn user_keys_end() -> Vec<u8> {
    vec![DEDUP]
}

/// Key of a deduplication record.
pub fn dedup_key(client_id: u64, seq: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = DEDUP;
    k[1..9].copy_from_slice(&client_id.to_be_bytes());
    k[9..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Key of a log entry.
pub fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// The index of a log key, or `None` when it is not 8 bytes.
pub fn decode_log_key(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// The smallest key greater than every key that starts with `prefix`, or
/// `None` when no such key exists (the prefix is all `0xff`, or empty).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_keys_sort_like_raw_keys_and_stay_below_dedup() {
        let mut raw: Vec<&[u8]> = vec![b"b", b"a", b"", b"ab", b"\xff\xff", b"a\x00"];
        let mut enc: Vec<Vec<u8>> = raw.iter().map(|k| user_key(k)).collect();
        raw.sort();
        enc.sort();
        let back: Vec<&[u8]> = enc.iter().map(|k| decode_user_key(k).unwrap()).collect();
        assert_eq!(raw, back);
        assert!(
            enc.iter()
                .all(|k| k.as_slice() < user_keys_end().as_slice())
        );
        assert!(
            enc.iter()
                .all(|k| k.as_slice() > meta_key("applied").as_slice())
        );
    }

    #[test]
    fn decode_user_key_rejects_other_records() {
        assert_eq!(decode_user_key(&meta_key("applied")), None);
        assert_eq!(decode_user_key(&dedup_key(1, 2)), None);
        assert_eq!(decode_user_key(&[]), None);
    }

    #[test]
    fn history_keys_sort_by_key_then_revision_and_round_trip() {
        let keys: Vec<&[u8]> = vec![b"", b"a", b"a\x00", b"a\x00b", b"a\x01", b"ab", b"b\xff"];
        let mut enc = Vec::new();
        for k in &keys {
            for rev in [1u64, 2, 300, u64::MAX] {
                let e = history_key(k, rev);
                assert_eq!(decode_history_key(&e), Some((k.to_vec(), rev)));
                assert!(e.starts_with(&history_prefix(k)));
                enc.push(((k.to_vec(), rev), e));
            }
        }
        let mut by_encoding = enc.clone();
        by_encoding.sort_by(|a, b| a.1.cmp(&b.1));
        enc.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(enc, by_encoding, "encoded order is (key, revision) order");
        assert!(
            enc.iter()
                .all(|(_, e)| e.as_slice() < history_end().as_slice()
                    && e.as_slice() > user_keys_end().as_slice())
        );
        assert_eq!(decode_history_key(&user_key(b"a")), None);
        assert_eq!(decode_history_key(&[HISTORY, b'a', 0, 0, 1]), None);
    }

    #[test]
    fn log_keys_order_by_index() {
        let keys: Vec<[u8; 8]> = [0u64, 1, 255, 256, u64::MAX]
            .iter()
            .map(|i| log_key(*i))
            .collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(decode_log_key(&log_key(42)), Some(42));
        assert_eq!(decode_log_key(b"short"), None);
    }

    #[test]
    fn dedup_keys_order_by_client_then_seq() {
        assert!(dedup_key(1, u64::MAX) < dedup_key(2, 0));
        assert!(dedup_key(1, 1) < dedup_key(1, 2));
    }

    #[test]
    fn prefix_end_is_the_tight_upper_bound() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }
}
