//! The shard map: which Raft group owns a key.
//!
//! Today's map is static and hash-based: a key hashes (64-bit FNV-1a, fixed
//! forever so every node and client agrees across versions and platforms) to
//! one of [`SLOTS`] slots, and slots are dealt round-robin to the data groups
//! `1..=data_groups`. Group 0 is the meta group and owns no user keys. The
//! slot indirection is there so a later, dynamic map (owned by the meta group,
//! with an epoch) can move slots between groups without rehashing keys.
//!
//! **Hash tags** co-locate keys: when a key contains `{tag}` (a non-empty run
//! between the first `{` and the next `}`), only `tag` is hashed, so
//! `{job7}lock` and `{job7}counter` always share a group — which single-group
//! transactions and fenced writes (a lock and the keys it guards) need.

/// Number of hash slots.
pub const SLOTS: u64 = 4096;

/// Group id of the meta group.
pub const META_GROUP: u64 = 0;

/// Maps keys to data groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardMap {
    data_groups: u64,
}

impl ShardMap {
    /// A map over `data_groups` data groups (at least one).
    pub fn new(data_groups: u64) -> Option<Self> {
        (data_groups > 0 && data_groups <= SLOTS).then_some(Self { data_groups })
    }

    /// Number of data groups.
    pub fn data_groups(&self) -> u64 {
        self.data_groups
    }

    /// Ids of the data groups, ascending.
    pub fn groups(&self) -> impl Iterator<Item = u64> {
        1..=self.data_groups
    }

    /// Whether `group` is a group of this map (meta or data).
    pub fn has_group(&self, group: u64) -> bool {
        group <= self.data_groups
    }

    /// The slot of `key` (of its hash tag, if it has one).
    pub fn slot(key: &[u8]) -> u64 {
        fnv1a64(hash_tag(key).unwrap_or(key)) % SLOTS
    }

    /// The data group that owns `key`.
    pub fn group_for_key(&self, key: &[u8]) -> u64 {
        1 + Self::slot(key) % self.data_groups
    }
}

/// The hash tag of `key`: the bytes between its first `{` and the next `}`,
/// when there are any.
pub fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|b| *b == b'{')?;
    let rest = &key[open + 1..];
    let close = rest.iter().position(|b| *b == b'}')?;
    (close > 0).then(|| &rest[..close])
}

/// 64-bit FNV-1a. Chosen for being trivially stable: the mapping of keys to
/// groups is part of the on-disk format.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_tags_co_locate_keys() {
        assert_eq!(hash_tag(b"{job7}lock"), Some(&b"job7"[..]));
        assert_eq!(hash_tag(b"x{a}y{b}"), Some(&b"a"[..]));
        assert_eq!(hash_tag(b"{}k"), None, "an empty tag does not count");
        assert_eq!(hash_tag(b"no tag"), None);
        assert_eq!(hash_tag(b"{open"), None);
        let m = ShardMap::new(64).unwrap();
        for tag in ["a", "job7", "users/42"] {
            let g = m.group_for_key(format!("{{{tag}}}lock").as_bytes());
            for suffix in ["counter", "x", "", "{other}"] {
                let key = format!("pre{{{tag}}}{suffix}");
                assert_eq!(m.group_for_key(key.as_bytes()), g, "{key}");
            }
        }
    }

    #[test]
    fn hash_is_the_published_fnv1a() {
        // Reference values of 64-bit FNV-1a.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn keys_map_to_data_groups_only_and_spread() {
        let map = ShardMap::new(4).unwrap();
        let mut counts = [0u32; 5];
        for i in 0..4000 {
            let g = map.group_for_key(format!("key-{i}").as_bytes());
            assert!((1..=4).contains(&g), "group {g}");
            counts[g as usize] += 1;
        }
        assert_eq!(counts[0], 0, "meta group owns no keys");
        assert!(
            counts[1..].iter().all(|c| *c > 800),
            "uneven spread: {counts:?}"
        );
    }

    #[test]
    fn mapping_is_stable() {
        let map = ShardMap::new(4).unwrap();
        assert_eq!(
            map.group_for_key(b"foobar"),
            1 + (0x8594_4171_f739_67e8u64 % SLOTS) % 4
        );
    }

    #[test]
    fn rejects_empty_maps() {
        assert!(ShardMap::new(0).is_none());
        assert!(ShardMap::new(SLOTS + 1).is_none());
        assert!(ShardMap::new(1).unwrap().has_group(1));
        assert!(!ShardMap::new(1).unwrap().has_group(2));
    }
}
