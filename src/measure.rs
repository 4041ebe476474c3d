//! How much an arc of the hash ring holds: by key space alone, or by where the rows of the data
//! actually hash.
//!
//! With a few hundred rows per peer, equal arcs do not hold equal numbers of rows: counting
//! rows alone spreads the largest share ~3 standard deviations (3/√rows) above the mean. The
//! manager therefore keeps a [`KeyCensus`] of the keys it distributed (a histogram over the
//! ring, fixed size whatever the data), and places tokens by a [`Measure`] that weighs an arc by
//! the rows in it. A small uniform part keeps empty stretches of the ring from weighing
//! nothing, so keys the census has not seen still spread over every member.

use crate::record::RecordKey;
use crate::ring::key_hash;

/// Buckets of the census: 2^16 arcs of 2^48 positions each, 256 KiB of counts.
const BUCKET_BITS: u32 = 16;
const BUCKETS: usize = 1 << BUCKET_BITS;
const BUCKET_SHIFT: u32 = 64 - BUCKET_BITS;
const BUCKET_WIDTH: u128 = 1 << BUCKET_SHIFT;
/// The census part of a measure outweighs its uniform part this many times.
const DATA_OVER_UNIFORM: u128 = 16;

/// Where on the ring the keys of the rows seen so far hash, in `BUCKETS` equal arcs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCensus {
    counts: Vec<u32>,
    total: u64,
}

impl Default for KeyCensus {
    fn default() -> Self {
        KeyCensus {
            counts: vec![0; BUCKETS],
            total: 0,
        }
    }
}

impl KeyCensus {
    pub fn add(&mut self, key: RecordKey) {
        self.add_hash(key_hash(key));
    }

    pub fn add_hash(&mut self, hash: u64) {
        let b = (hash >> BUCKET_SHIFT) as usize;
        self.counts[b] = self.counts[b].saturating_add(1);
        self.total += 1;
    }

    pub fn merge(&mut self, other: &KeyCensus) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine = mine.saturating_add(*theirs);
        }
        self.total += other.total;
    }

    /// Rows counted.
    pub fn total(&self) -> u64 {
        self.total
    }
}

/// A weight on the ring's positions: cumulative, exact in integers. [`Measure::uniform`] weighs
/// an arc by its length (what placement did before there was a census); [`Measure::of`] by
/// the census's rows in it, plus a sixteenth as much spread evenly.
#[derive(Debug, Clone)]
pub struct Measure {
    /// Per bucket: its weight per position; and the weight of the buckets before it.
    density: Vec<u128>,
    before: Vec<u128>,
    total: u128,
}

impl Measure {
    /// Weight = length: `arc(a, b) == b.wrapping_sub(a)`, `point_after(a, w) == a + w`.
    pub fn uniform() -> Measure {
        Measure {
            density: Vec::new(),
            before: Vec::new(),
            total: 1 << 64,
        }
    }

    /// By the rows of `census` (uniform when it counted none).
    pub fn of(census: &KeyCensus) -> Measure {
        if census.total == 0 {
            return Measure::uniform();
        }
        let spread = u128::from(census.total);
        let per_row = DATA_OVER_UNIFORM * BUCKETS as u128;
        let density: Vec<u128> = census
            .counts
            .iter()
            .map(|&c| u128::from(c) * per_row + spread)
            .collect();
        let mut before = Vec::with_capacity(BUCKETS);
        let mut sum = 0u128;
        for d in &density {
            before.push(sum);
            sum += d * BUCKET_WIDTH;
        }
        Measure {
            density,
            before,
            total: sum,
        }
    }

    pub fn total(&self) -> u128 {
        self.total
    }

    /// Weight is length (no census).
    pub fn is_uniform(&self) -> bool {
        self.density.is_empty()
    }

    /// The weight of `[0, x)`.
    fn cumulative(&self, x: u64) -> u128 {
        if self.density.is_empty() {
            return u128::from(x);
        }
        let b = (x >> BUCKET_SHIFT) as usize;
        let offset = u128::from(x) & (BUCKET_WIDTH - 1);
        self.before[b] + self.density[b] * offset
    }

    /// The weight of the arc from `from` (exclusive) round to `to` (inclusive); 0 when they
    /// are equal, as the length of an arc between two equal tokens.
    pub fn arc(&self, from: u64, to: u64) -> u128 {
        let (a, b) = (self.cumulative(from), self.cumulative(to));
        if b >= a { b - a } else { self.total - a + b }
    }

    /// The first position after `from`, going round, where the arc from `from` weighs at
    /// least `w` (`w` below the total).
    pub fn point_after(&self, from: u64, w: u128) -> u64 {
        if self.density.is_empty() {
            return from.wrapping_add(w as u64);
        }
        let mut target = self.cumulative(from) + w % self.total;
        if target >= self.total {
            target -= self.total;
        }
        // The end of the ring (2^64) is its 0.
        self.position_of(target) as u64
    }

    /// The first position in `0..=2^64` whose cumulative weight reaches `target` (census only).
    fn position_of(&self, target: u128) -> u128 {
        // The last bucket starting at or below the target.
        let b = self.before.partition_point(|&s| s <= target) - 1;
        let offset = (target - self.before[b]).div_ceil(self.density[b]);
        ((b as u128) << BUCKET_SHIFT) + offset
    }

    /// `k` distinct points cutting the ring into arcs of equal weight, the last at the top of
    /// the ring. By a census, each cut is moved to the nearer edge of its bucket: the census
    /// knows how many rows a bucket holds, not where in it they hash, so an arc between edges
    /// weighs exactly the rows it owns.
    pub fn equal_cuts(&self, k: usize) -> Vec<u64> {
        if self.density.is_empty() {
            return crate::ring::evenly_spaced_tokens(k);
        }
        let k = k.max(1) as u128;
        let top = u128::from(u64::MAX);
        let mut cuts: Vec<u64> = Vec::with_capacity(k as usize);
        for i in 1..=k {
            let target = self.total * i / k;
            let at = self.position_of(target).min(top);
            let below = at & !(BUCKET_WIDTH - 1);
            let above = (below + BUCKET_WIDTH).min(top);
            let off = |p: u128| self.cumulative(p as u64).abs_diff(target);
            let mut cut = (if off(below) <= off(above) {
                below
            } else {
                above
            }) as u64;
            if i == k {
                cut = u64::MAX;
            }
            // Distinct and increasing, even where one bucket outweighs an arc.
            if let Some(&last) = cuts.last()
                && cut <= last
            {
                cut = last.saturating_add(1);
            }
            cuts.push(cut);
        }
        cuts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::mix64;

    #[test]
    fn the_uniform_measure_is_the_arc_length() {
        let m = Measure::uniform();
        for (a, b) in [(0u64, 10u64), (10, 0), (u64::MAX - 5, 7), (42, 42)] {
            assert_eq!(m.arc(a, b), u128::from(b.wrapping_sub(a)));
            assert_eq!(m.point_after(a, 1000), a.wrapping_add(1000));
        }
        assert_eq!(m.equal_cuts(4), crate::ring::evenly_spaced_tokens(4));
    }

    #[test]
    fn an_empty_census_measures_like_the_key_space() {
        let m = Measure::of(&KeyCensus::default());
        assert_eq!(m.arc(5, 2), u128::from(2u64.wrapping_sub(5)));
    }

    #[test]
    fn arcs_add_up_and_points_land_where_their_weight_is() {
        let mut census = KeyCensus::default();
        for i in 0..10_000u64 {
            census.add(RecordKey::Event(i));
        }
        let m = Measure::of(&census);
        let cuts = [3u64 << 60, 9 << 60, 15 << 60];
        let whole: u128 = (0..3).map(|i| m.arc(cuts[i], cuts[(i + 1) % 3])).sum();
        assert_eq!(whole, m.total());
        for from in [0u64, 1 << 63, u64::MAX - 3] {
            for w in [1u128, m.total() / 3, m.total() / 2 + 7] {
                let p = m.point_after(from, w);
                let got = m.arc(from, p);
                // At least w, and less than one position's weight more.
                assert!(got >= w, "from {from} w {w}: {got}");
                assert!(
                    got - w < m.density.iter().max().copied().unwrap_or(1),
                    "{got} {w}"
                );
            }
        }
    }

    /// The point of the census: cut by it, equal arcs hold equal numbers of rows, where equal
    /// lengths spread them by several standard deviations.
    #[test]
    fn cuts_by_the_census_hold_equal_rows() {
        let keys: Vec<u64> = (0..48_000u64).map(|i| mix64(i ^ 0xabc)).collect();
        let mut census = KeyCensus::default();
        for k in &keys {
            census.add(RecordKey::Event(*k));
        }
        let rows_per_arc = |cuts: &[u64]| -> Vec<usize> {
            let mut n = vec![0usize; cuts.len()];
            for k in &keys {
                let h = key_hash(RecordKey::Event(*k));
                let i = cuts.partition_point(|&c| c < h) % cuts.len();
                n[i] += 1;
            }
            n
        };
        let max_over_mean = |n: &[usize]| {
            *n.iter().max().unwrap() as f64 / (n.iter().sum::<usize>() as f64 / n.len() as f64)
        };
        let even = max_over_mean(&rows_per_arc(&Measure::uniform().equal_cuts(256)));
        let by_data = max_over_mean(&rows_per_arc(&Measure::of(&census).equal_cuts(256)));
        assert!(even > 1.12, "row noise alone: {even}");
        assert!(by_data < 1.04, "cut by the census: {by_data}");
    }
}
