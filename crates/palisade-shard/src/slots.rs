//! Hash slots: the fixed, version-independent first step of routing a key.
//!
//! A key hashes (64-bit FNV-1a, of its `{hash tag}` when it has one) to one
//! of [`SLOTS`] slots. The hash and the slot count are part of the on-disk
//! format: every node, client and version must agree on them forever. Which
//! *group* owns a slot is data (the cluster map's route), so slots move
//! between groups without rehashing a key.
//!
//! **Hash tags** co-locate keys: when a key contains `{tag}` (a non-empty run
//! between the first `{` and the next `}`), only `tag` is hashed, so
//! `{job7}lock` and `{job7}counter` always share a slot — and therefore a
//! group, whatever the group count — which single-group transactions, leases
//! and fenced writes need.

use serde::{Deserialize, Serialize};

/// Number of hash slots.
pub const SLOTS: u64 = 4096;

/// Words of a [`SlotSet`].
const WORDS: usize = (SLOTS / 64) as usize;

/// A hash slot, `0..SLOTS`.
pub type Slot = u16;

/// The slot of `key` (of its hash tag, if it has one).
pub fn slot_of(key: &[u8]) -> Slot {
    (fnv1a64(hash_tag(key).unwrap_or(key)) % SLOTS) as Slot
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
/// slots is part of the on-disk format.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Lease ids of leases granted since the cluster map exists have this bit
/// set, their home slot in bits 48..60 and the granting revision below:
/// a lease lives with its slot and moves with it. Ids without the bit were
/// granted by earlier versions and name their group in bits 48.. instead.
pub const LEASE_SLOT_FLAG: u64 = 1 << 63;

/// Revisions a lease id can hold.
pub const LEASE_REVISION_MASK: u64 = (1 << 48) - 1;

/// The id of a lease granted in `slot` at `revision`.
pub fn lease_id(slot: Slot, revision: u64) -> u64 {
    LEASE_SLOT_FLAG | (u64::from(slot) << 48) | (revision & LEASE_REVISION_MASK)
}

/// Where lease `id` lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseHome {
    /// With a hash slot (and it moves with it).
    Slot(Slot),
    /// In a group (a lease granted by a version before the cluster map).
    LegacyGroup(u64),
}

/// Where lease `id` lives; `None` for ids no version ever handed out.
pub fn lease_home(id: u64) -> Option<LeaseHome> {
    if id & LEASE_SLOT_FLAG != 0 {
        let slot = (id >> 48) & 0x7fff;
        (slot < SLOTS).then_some(LeaseHome::Slot(slot as Slot))
    } else {
        let group = id >> 48;
        (group > 0 && id & LEASE_REVISION_MASK != 0).then_some(LeaseHome::LegacyGroup(group))
    }
}

/// A set of slots (a 4096-bit bitmap). Serialized as its 64 words.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SlotSet {
    words: Vec<u64>,
}

impl Default for SlotSet {
    fn default() -> Self {
        Self::empty()
    }
}

impl std::fmt::Debug for SlotSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SlotSet({})", self.ranges_text())
    }
}

impl SlotSet {
    /// No slots.
    pub fn empty() -> Self {
        Self {
            words: vec![0; WORDS],
        }
    }

    /// Every slot.
    pub fn all() -> Self {
        Self {
            words: vec![u64::MAX; WORDS],
        }
    }

    /// The slots in `iter`.
    pub fn of(iter: impl IntoIterator<Item = Slot>) -> Self {
        let mut s = Self::empty();
        for slot in iter {
            s.insert(slot);
        }
        s
    }

    /// A decoded set is only usable with exactly [`SLOTS`] bits.
    pub fn is_well_formed(&self) -> bool {
        self.words.len() == WORDS
    }

    fn word(&self, slot: Slot) -> (usize, u64) {
        ((slot as usize) / 64, 1u64 << (slot % 64))
    }

    pub fn contains(&self, slot: Slot) -> bool {
        let (w, bit) = self.word(slot);
        self.words.get(w).is_some_and(|x| x & bit != 0)
    }

    pub fn insert(&mut self, slot: Slot) {
        let (w, bit) = self.word(slot);
        if let Some(x) = self.words.get_mut(w) {
            *x |= bit;
        }
    }

    pub fn remove(&mut self, slot: Slot) {
        let (w, bit) = self.word(slot);
        if let Some(x) = self.words.get_mut(w) {
            *x &= !bit;
        }
    }

    /// Adds every slot of `other`.
    pub fn union_with(&mut self, other: &SlotSet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Removes every slot of `other`.
    pub fn subtract(&mut self, other: &SlotSet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !b;
        }
    }

    /// Whether every slot of `other` is in this set.
    pub fn is_superset(&self, other: &SlotSet) -> bool {
        other
            .words
            .iter()
            .enumerate()
            .all(|(i, b)| self.words.get(i).is_some_and(|a| a & b == *b))
    }

    /// Whether the two sets share a slot.
    pub fn intersects(&self, other: &SlotSet) -> bool {
        self.words.iter().zip(&other.words).any(|(a, b)| a & b != 0)
    }

    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// The slots, ascending.
    pub fn iter(&self) -> impl Iterator<Item = Slot> + '_ {
        (0..SLOTS as Slot).filter(|s| self.contains(*s))
    }

    /// Whether `key`'s slot is in the set.
    pub fn contains_key(&self, key: &[u8]) -> bool {
        self.contains(slot_of(key))
    }

    /// `0-511,1024-1030` style text, for logs and status tables.
    pub fn ranges_text(&self) -> String {
        let mut out = Vec::new();
        let mut start: Option<Slot> = None;
        let mut prev = 0;
        for s in self.iter() {
            match start {
                Some(_) if s == prev + 1 => {}
                Some(a) => {
                    out.push(range_text(a, prev));
                    start = Some(s);
                }
                None => start = Some(s),
            }
            prev = s;
        }
        if let Some(a) = start {
            out.push(range_text(a, prev));
        }
        if out.is_empty() {
            "-".into()
        } else {
            out.join(",")
        }
    }
}

fn range_text(a: Slot, b: Slot) -> String {
    if a == b {
        a.to_string()
    } else {
        format!("{a}-{b}")
    }
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
        for tag in ["a", "job7", "users/42"] {
            let s = slot_of(format!("{{{tag}}}lock").as_bytes());
            for suffix in ["counter", "x", "", "{other}"] {
                let key = format!("pre{{{tag}}}{suffix}");
                assert_eq!(slot_of(key.as_bytes()), s, "{key}");
            }
        }
    }

    #[test]
    fn hash_is_the_published_fnv1a_and_slots_are_stable() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(
            u64::from(slot_of(b"foobar")),
            0x8594_4171_f739_67e8u64 % SLOTS
        );
    }

    #[test]
    fn lease_ids_name_their_home() {
        let id = lease_id(4095, 77);
        assert_eq!(lease_home(id), Some(LeaseHome::Slot(4095)));
        assert_eq!(lease_home(lease_id(0, 1)), Some(LeaseHome::Slot(0)));
        // Ids of earlier versions: group << 48 | index.
        assert_eq!(lease_home((1 << 48) | 109), Some(LeaseHome::LegacyGroup(1)));
        assert_eq!(lease_home(0), None);
        assert_eq!(lease_home(5), None, "group 0 never held leases");
        assert_eq!(lease_home(LEASE_SLOT_FLAG | (5000 << 48)), None);
    }

    #[test]
    fn slot_sets_behave_like_sets() {
        let mut a = SlotSet::of([1, 2, 3, 64, 4095]);
        assert_eq!(a.len(), 5);
        assert!(a.contains(4095) && !a.contains(4));
        assert_eq!(a.ranges_text(), "1-3,64,4095");
        let b = SlotSet::of([3, 64]);
        assert!(a.is_superset(&b) && a.intersects(&b));
        a.subtract(&b);
        assert_eq!(a.ranges_text(), "1-2,4095");
        assert!(!a.intersects(&b));
        a.union_with(&b);
        assert_eq!(a.len(), 5);
        assert_eq!(SlotSet::all().len(), SLOTS as usize);
        assert_eq!(SlotSet::empty().ranges_text(), "-");
        let bytes = bincode::serde::encode_to_vec(&a, bincode::config::standard()).unwrap();
        let (back, _): (SlotSet, _) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(back, a);
    }
}
