//! Workload definitions: which operation comes next and on which key.
//!
//! | workload | mix |
//! |---|---|
//! | `put` | 100% put |
//! | `get` | 100% get |
//! | `ycsb-a` | 50% get, 50% put (update heavy) |
//! | `ycsb-b` | 95% get, 5% put (read mostly) |
//! | `ycsb-c` | 100% get (read only) |
//! | `ycsb-f` | 50% get, 50% read-modify-write (get, then compare-and-swap) |
//!
//! Keys are `user{n:08}`-style 8-byte names over `--keys` keys, drawn
//! uniformly or from a scrambled Zipfian distribution (YCSB's: θ = 0.99,
//! ranks hashed so the hot keys spread over the groups).

use rand::Rng;

/// An operation to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Get,
    Put,
    /// Read, then compare-and-swap the value read.
    ReadModifyWrite,
}

/// A workload: an operation mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    Put,
    Get,
    YcsbA,
    YcsbB,
    YcsbC,
    YcsbF,
}

impl Workload {
    /// The next operation.
    pub fn next_op(self, rng: &mut impl Rng) -> Op {
        let roll: f64 = rng.r#gen();
        match self {
            Workload::Put => Op::Put,
            Workload::Get | Workload::YcsbC => Op::Get,
            Workload::YcsbA if roll < 0.5 => Op::Get,
            Workload::YcsbA => Op::Put,
            Workload::YcsbB if roll < 0.95 => Op::Get,
            Workload::YcsbB => Op::Put,
            Workload::YcsbF if roll < 0.5 => Op::Get,
            Workload::YcsbF => Op::ReadModifyWrite,
        }
    }

    /// Whether the workload reads keys (so they should exist first).
    pub fn reads(self) -> bool {
        self != Workload::Put
    }
}

/// How keys are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyDist {
    Uniform,
    Zipfian,
}

/// Draws key indexes in `0..n`.
#[derive(Debug, Clone)]
pub struct KeyChooser {
    n: u64,
    zipf: Option<Zipf>,
}

impl KeyChooser {
    pub fn new(n: u64, dist: KeyDist) -> Self {
        Self {
            n: n.max(1),
            zipf: (dist == KeyDist::Zipfian).then(|| Zipf::new(n.max(1), 0.99)),
        }
    }

    pub fn next(&self, rng: &mut impl Rng) -> u64 {
        match &self.zipf {
            None => rng.gen_range(0..self.n),
            // Scramble the rank so hot keys are not neighbours.
            Some(z) => fnv(z.next(rng)) % self.n,
        }
    }
}

/// The 8-byte key of index `i`.
pub fn key(i: u64) -> Vec<u8> {
    format!("k{i:07}").into_bytes()
}

fn fnv(x: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in x.to_le_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Zipfian ranks in `0..n` (Gray et al., "Quickly generating
/// billion-record synthetic databases", as in YCSB).
#[derive(Debug, Clone)]
pub struct Zipf {
    n: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

fn zeta(n: u64, theta: f64) -> f64 {
    (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum()
}

impl Zipf {
    pub fn new(n: u64, theta: f64) -> Self {
        let zetan = zeta(n, theta);
        let zeta2 = zeta(2, theta);
        Self {
            n,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zetan,
            eta: (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan),
        }
    }

    pub fn next(&self, rng: &mut impl Rng) -> u64 {
        let u: f64 = rng.r#gen();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1.min(self.n - 1);
        }
        let r = (self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        r.min(self.n - 1)
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn mixes_match_their_definitions() {
        let mut rng = StdRng::seed_from_u64(1);
        let count = |w: Workload, op: Op, rng: &mut StdRng| {
            (0..10_000).filter(|_| w.next_op(rng) == op).count()
        };
        assert_eq!(count(Workload::Put, Op::Put, &mut rng), 10_000);
        assert_eq!(count(Workload::YcsbC, Op::Get, &mut rng), 10_000);
        let a = count(Workload::YcsbA, Op::Put, &mut rng);
        assert!((4_700..5_300).contains(&a), "{a}");
        let b = count(Workload::YcsbB, Op::Put, &mut rng);
        assert!((350..650).contains(&b), "{b}");
        let f = count(Workload::YcsbF, Op::ReadModifyWrite, &mut rng);
        assert!((4_700..5_300).contains(&f), "{f}");
    }

    #[test]
    fn zipfian_keys_are_skewed_and_in_range() {
        let mut rng = StdRng::seed_from_u64(2);
        let z = KeyChooser::new(100_000, KeyDist::Zipfian);
        let mut hits = std::collections::BTreeMap::new();
        for _ in 0..100_000 {
            let k = z.next(&mut rng);
            assert!(k < 100_000);
            *hits.entry(k).or_insert(0u32) += 1;
        }
        let top = hits.values().max().copied().unwrap_or(0);
        assert!(top > 5_000, "the hottest key gets a big share: {top}");
        let u = KeyChooser::new(100_000, KeyDist::Uniform);
        let mut hits = std::collections::BTreeMap::new();
        for _ in 0..100_000 {
            *hits.entry(u.next(&mut rng)).or_insert(0u32) += 1;
        }
        assert!(hits.values().max().copied().unwrap_or(0) < 20);
        assert_eq!(key(42), b"k0000042");
    }
}
