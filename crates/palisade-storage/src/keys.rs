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
//!
//! The `log` tree is keyed by the big-endian log index, so sled's byte order
//! is log order.
//!
//! [`KeyRecord`]: crate::state::KeyRecord

/// First byte of metadata records.
pub const META: u8 = 0x00;
/// First byte of user key records.
pub const USER: u8 = 0x01;
/// First byte of request-deduplication records.
pub const DEDUP: u8 = 0x02;

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
