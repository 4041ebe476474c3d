//! A peer's share of the records, and the batching that moves rows in datagrams.

use crate::record::RecordKey;
use crate::wire::{PackedRow, RecordOut, StoreBatch, WireRow};
use hashbrown::HashTable;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

/// Column names shared by every row of one CSV file, interned so that 48,000 rows cost one
/// copy of the header, not 48,000.
pub type Columns = Arc<[String]>;

/// One row, owned: what moves in hand-offs and repair plans (the store keeps rows packed in
/// its arena, not as these).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRow {
    pub columns: Columns,
    /// The values, packed: one allocation per row.
    pub row: PackedRow,
}

impl StoredRow {
    pub fn values(&self) -> Vec<String> {
        self.row.values()
    }
}

/// One row as the store holds it: its header and its packed bytes, borrowed from the arena.
#[derive(Debug, Clone, Copy)]
pub struct RowRef<'a> {
    pub columns: &'a Columns,
    /// The packed values ([`PackedRow`]'s bytes).
    pub bytes: &'a [u8],
    /// The header's [`columns_digest`], kept with the interned header.
    columns_digest: u64,
}

impl RowRef<'_> {
    pub fn to_stored(&self) -> StoredRow {
        StoredRow {
            columns: self.columns.clone(),
            row: self.packed(),
        }
    }

    pub fn values(&self) -> Vec<String> {
        self.packed().values()
    }

    pub fn packed(&self) -> PackedRow {
        PackedRow::from_checked(self.bytes)
    }

    /// This row's [`row_digest`] as a row of `key`.
    pub fn digest(&self, key: RecordKey) -> u64 {
        row_digest(key, self.columns_digest, self.bytes)
    }

    /// The same row as `other`: the same header (the same interned one, or equal) and bytes.
    pub fn is(&self, other: &StoredRow) -> bool {
        self.bytes == other.row.as_bytes()
            && (Arc::ptr_eq(self.columns, &other.columns) || **self.columns == *other.columns)
    }
}

/// Bytes per arena segment. Segments are never reallocated (a growing contiguous buffer would
/// copy itself and leave its old copy resident in the heap); any row fits one, as a row
/// travels in one datagram.
const SEGMENT: usize = 1 << 18;
/// A slot's fields, packed in one u64 (from bit 0): the row's offset in the arena (32 GiB),
/// its length (a row fits a datagram: under 64 KiB), its header (1,024 per peer), whether it
/// is its key's first row, whether another row of the key follows, whether the key is a
/// fallback.
const OFFSET_BITS: u32 = 35;
const LEN_BITS: u32 = 16;
const SCHEMA_BITS: u32 = 10;
const LEN_SHIFT: u32 = OFFSET_BITS;
const SCHEMA_SHIFT: u32 = LEN_SHIFT + LEN_BITS;
const FIRST_BIT: u64 = 1 << 61;
const HAS_NEXT_BIT: u64 = 1 << 62;
const FALLBACK_BIT: u64 = 1 << 63;
/// No next row of the same key.
const END: u32 = u32::MAX;

fn field(word: u64, shift: u32, bits: u32) -> usize {
    ((word >> shift) & ((1 << bits) - 1)) as usize
}

/// Where one row lives: 16 bytes, whatever the row.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// The key's number ([`RecordKey::as_u64`]).
    key: u64,
    /// Offset, length, header, and two flags (see [`OFFSET_BITS`]).
    at: u64,
}

impl Slot {
    fn offset(&self) -> usize {
        field(self.at, 0, OFFSET_BITS)
    }

    fn len(&self) -> usize {
        field(self.at, LEN_SHIFT, LEN_BITS)
    }

    fn schema(&self) -> usize {
        field(self.at, SCHEMA_SHIFT, SCHEMA_BITS)
    }

    fn has_next(&self) -> bool {
        self.at & HAS_NEXT_BIT != 0
    }

    fn is_first(&self) -> bool {
        self.at & FIRST_BIT != 0
    }

    fn record_key(&self) -> RecordKey {
        if self.at & FALLBACK_BIT != 0 {
            RecordKey::Fallback(self.key)
        } else {
            RecordKey::Event(self.key)
        }
    }
}

/// A peer's rows, compact: every row's packed bytes back to back in fixed-size segments, a
/// 16-byte slot per row, and a hash table of the first slot of each key (4 bytes a bucket).
/// The rows of one key (the locations files have several) are chained in arrival order, the
/// links in a side map (most keys have one row). About 1.5 times the raw CSV bytes for
/// NOAA's rows, by capacity (a map of boxed rows cost 2.5).
#[derive(Default)]
pub struct Store {
    schemas: Vec<Columns>,
    /// Each schema's column names packed as a query's answer carries them, made once: packing
    /// them for every answer was a tenth of a peer's work per query.
    packed_schemas: Vec<PackedRow>,
    /// Each header's [`columns_digest`], for the digests of rows a repair compares.
    schema_digests: Vec<u64>,
    segments: Vec<Vec<u8>>,
    slots: Vec<Slot>,
    /// The first slot of each key.
    heads: HashTable<u32>,
    /// The next slot of the same key, for slots whose `HAS_NEXT_BIT` is set.
    links: HashMap<u32, u32>,
    hasher: RandomState,
    /// Arena bytes of removed rows, given back by [`Store::compact`].
    dead_bytes: usize,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("keys", &self.heads.len())
            .field("rows", &self.slots.len())
            .field("segments", &self.segments.len())
            .field("dead_bytes", &self.dead_bytes)
            .finish()
    }
}

/// The rows of one key, in arrival order.
pub struct Rows<'a> {
    store: &'a Store,
    next: u32,
}

impl<'a> Iterator for Rows<'a> {
    type Item = RowRef<'a>;
    fn next(&mut self) -> Option<RowRef<'a>> {
        let slot = self.store.slots.get(self.next as usize)?;
        self.next = self.store.next_of(self.next);
        Some(self.store.row_at(slot))
    }
}

/// FNV-1a, 64 bits: the same on every peer and every build (a std hasher promises neither),
/// for digests that peers compare.
fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A well-mixed 64-bit value of `x` (splitmix64's finaliser), so that digests of near rows
/// do not cancel when summed.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The digest of a header, for [`row_digest`].
pub fn columns_digest(columns: &[String]) -> u64 {
    columns
        .iter()
        .fold(0, |h, c| fnv1a(h, c.as_bytes()).rotate_left(5))
}

/// The digest of one row: its key, its header's digest and its packed values. A range's
/// digest is the wrapping sum of its rows' (order-free, and a row held twice would count
/// twice), so two holders of a range report the same digest exactly when they hold the same
/// rows, but for a 2^-64 chance.
pub fn row_digest(key: RecordKey, columns_digest: u64, packed: &[u8]) -> u64 {
    let kind = match key {
        RecordKey::Event(_) => 1,
        RecordKey::Fallback(_) => 2,
    };
    mix(fnv1a(mix(key.as_u64() ^ kind) ^ columns_digest, packed))
}

fn same_key(slot: &Slot, key: RecordKey) -> bool {
    slot.record_key() == key
}

impl Store {
    pub fn intern(&mut self, columns: &[String]) -> Columns {
        if let Some(c) = self.schemas.iter().find(|c| c.as_ref() == columns) {
            return c.clone();
        }
        let c: Columns = columns.to_vec().into();
        self.push_schema(c.clone());
        c
    }

    fn push_schema(&mut self, columns: Columns) {
        self.packed_schemas.push(PackedRow::pack(&columns));
        self.schema_digests.push(columns_digest(&columns));
        self.schemas.push(columns);
    }

    fn hash(&self, key: RecordKey) -> u64 {
        self.hasher.hash_one(key)
    }

    fn head(&self, key: RecordKey) -> Option<u32> {
        let slots = &self.slots;
        self.heads
            .find(self.hash(key), |&i| same_key(&slots[i as usize], key))
            .copied()
    }

    fn row_at(&self, slot: &Slot) -> RowRef<'_> {
        let (segment, at) = (slot.offset() / SEGMENT, slot.offset() % SEGMENT);
        RowRef {
            columns: &self.schemas[slot.schema()],
            columns_digest: self.schema_digests[slot.schema()],
            bytes: &self.segments[segment][at..at + slot.len()],
        }
    }

    /// The slot after `at` in its key's chain, or [`END`].
    fn next_of(&self, at: u32) -> u32 {
        match self.slots.get(at as usize) {
            Some(slot) if slot.has_next() => self.links.get(&at).copied().unwrap_or(END),
            _ => END,
        }
    }

    fn set_next(&mut self, at: u32, next: u32) {
        let slot = &mut self.slots[at as usize];
        if next == END {
            slot.at &= !HAS_NEXT_BIT;
            self.links.remove(&at);
        } else {
            slot.at |= HAS_NEXT_BIT;
            self.links.insert(at, next);
        }
    }

    /// Copies `bytes` into the arena; its offset.
    fn append(&mut self, bytes: &[u8]) -> usize {
        let fits = self
            .segments
            .last()
            .is_some_and(|s| s.len() + bytes.len() <= s.capacity());
        if !fits {
            // Not zeroed, so a segment's untouched tail is not resident.
            self.segments
                .push(Vec::with_capacity(SEGMENT.max(bytes.len())));
        }
        let index = self.segments.len() - 1;
        let segment = &mut self.segments[index];
        let at = index * SEGMENT + segment.len();
        segment.extend_from_slice(bytes);
        at
    }

    /// Keeps a row; returns false if an equal row is held already (storing is idempotent),
    /// or if the row cannot be placed (over 2^26 headers or 64 GiB of rows in one peer).
    pub fn insert(&mut self, key: RecordKey, columns: &Columns, row: PackedRow) -> bool {
        self.insert_bytes(key, columns, row.as_bytes())
    }

    fn insert_bytes(&mut self, key: RecordKey, columns: &Columns, bytes: &[u8]) -> bool {
        let schema = match self.schemas.iter().position(|c| Arc::ptr_eq(c, columns)) {
            Some(i) => i,
            None => {
                self.push_schema(columns.clone());
                self.schemas.len() - 1
            }
        };
        let head = self.head(key);
        let mut last = None;
        let mut at = head.unwrap_or(END);
        while let Some(slot) = self.slots.get(at as usize) {
            if slot.schema() == schema && self.row_at(slot).bytes == bytes {
                return false;
            }
            last = Some(at);
            at = self.next_of(at);
        }
        let offset_room = (self.segments.len() + 1) * SEGMENT + bytes.len();
        if schema >= 1 << SCHEMA_BITS
            || offset_room >= 1 << OFFSET_BITS
            || self.slots.len() >= END as usize
            || bytes.len() >= 1 << LEN_BITS
        {
            return false;
        }
        let offset = self.append(bytes);
        let kind = match key {
            RecordKey::Event(_) => 0,
            RecordKey::Fallback(_) => FALLBACK_BIT,
        };
        let index = self.slots.len() as u32;
        self.slots.push(Slot {
            key: key.as_u64(),
            at: offset as u64
                | (bytes.len() as u64) << LEN_SHIFT
                | (schema as u64) << SCHEMA_SHIFT
                | kind,
        });
        match last {
            Some(l) => self.set_next(l, index),
            None => {
                self.slots[index as usize].at |= FIRST_BIT;
                let (slots, hasher) = (&self.slots, &self.hasher);
                let hash = hasher.hash_one(key);
                self.heads.insert_unique(hash, index, |&i| {
                    hasher.hash_one(slots[i as usize].record_key())
                });
            }
        }
        true
    }

    /// Stores a whole batch; returns how many rows were new.
    pub fn insert_batch(&mut self, batch: StoreBatch) -> u32 {
        let columns = self.intern(&batch.columns);
        let mut new_rows = 0;
        for WireRow(key, row) in &batch.rows {
            if self.insert_bytes(*key, &columns, row.as_bytes()) {
                new_rows += 1;
            }
        }
        new_rows
    }

    pub fn contains(&self, key: RecordKey) -> bool {
        self.head(key).is_some()
    }

    /// The rows of `key`, in arrival order (none when it is not held).
    pub fn get(&self, key: RecordKey) -> Rows<'_> {
        Rows {
            store: self,
            next: self.head(key).unwrap_or(END),
        }
    }

    /// The rows of `key`, owned (for a hand-off).
    pub fn rows_of(&self, key: RecordKey) -> Vec<StoredRow> {
        self.get(key).map(|r| r.to_stored()).collect()
    }

    /// The rows of `key` as (packed column names, packed values), borrowed from the store: an
    /// answer encodes them without a copy of either (two allocations and a row's bytes per
    /// record were it copied out into a `RecordOut`).
    pub fn packed_rows(&self, key: RecordKey) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        let mut at = self.head(key).unwrap_or(END);
        std::iter::from_fn(move || {
            let slot = self.slots.get(at as usize)?;
            at = self.next_of(at);
            let columns = self.packed_schemas[slot.schema()].as_bytes();
            Some((columns, self.row_at(slot).bytes))
        })
    }

    /// The rows of `key` as owned records (tests compare them with what was stored).
    #[cfg(test)]
    pub fn records_out(&self, key: RecordKey) -> Vec<RecordOut> {
        self.packed_rows(key)
            .map(|(columns, values)| RecordOut::from_packed(columns, values))
            .collect()
    }

    /// Removes the given rows of `key` (after their hand-off was acknowledged).
    pub fn remove_rows(&mut self, key: RecordKey, gone: &[StoredRow]) {
        loop {
            let mut at = self.head(key).unwrap_or(END);
            let mut found = None;
            while let Some(slot) = self.slots.get(at as usize) {
                if gone.iter().any(|g| self.row_at(slot).is(g)) {
                    found = Some(at);
                    break;
                }
                at = self.next_of(at);
            }
            match found {
                Some(at) => self.remove_slot(at),
                None => break,
            }
        }
        self.compact_if_worth_it();
    }

    /// Unlinks slot `at` from its key's chain and fills its place with the last slot.
    fn remove_slot(&mut self, at: u32) {
        let slot = self.slots[at as usize];
        let after = self.next_of(at);
        self.set_next(at, END);
        self.redirect(slot.record_key(), at, after);
        self.dead_bytes += slot.len();
        let last = (self.slots.len() - 1) as u32;
        if at != last {
            // The last slot moves into `at`: whoever points at it points at `at` (redirected
            // before the move, while every index in the table is still a slot), and its own
            // link moves with it.
            self.redirect(self.slots[last as usize].record_key(), last, at);
            let after_last = self.next_of(last);
            self.set_next(last, END);
            self.slots.swap_remove(at as usize);
            self.set_next(at, after_last);
        } else {
            self.slots.swap_remove(at as usize);
        }
    }

    /// Points whoever points at slot `from` (the table, when it is the key's first row, else
    /// the row before it in the chain) at `to` instead; a first row redirected to [`END`]
    /// takes the key out of the table.
    fn redirect(&mut self, key: RecordKey, from: u32, to: u32) {
        let hash = self.hash(key);
        let slots = &self.slots;
        let mut before = None;
        let mut first = None;
        if let Ok(head) = self
            .heads
            .find_entry(hash, |&i| same_key(&slots[i as usize], key))
        {
            if *head.get() != from {
                before = Some(*head.get());
            } else if to == END {
                head.remove();
            } else {
                *head.into_mut() = to;
                first = Some(to);
            }
        }
        if let Some(to) = first {
            self.slots[to as usize].at |= FIRST_BIT;
        }
        let Some(mut p) = before else { return };
        loop {
            let next = self.next_of(p);
            if next == from {
                return self.set_next(p, to);
            }
            if next == END {
                return; // not in the chain: nothing points at it
            }
            p = next;
        }
    }

    /// Copies the live rows into fresh segments once removed rows take more than half of the
    /// arena: a peer that handed most of its rows over keeps no more than twice what it holds.
    fn compact_if_worth_it(&mut self) {
        let used: usize = self.segments.iter().map(Vec::len).sum();
        if self.dead_bytes >= SEGMENT.min(used) && self.dead_bytes * 2 > used {
            self.compact();
        }
    }

    fn compact(&mut self) {
        let old = std::mem::take(&mut self.segments);
        for i in 0..self.slots.len() {
            let slot = self.slots[i];
            let (segment, at) = (slot.offset() / SEGMENT, slot.offset() % SEGMENT);
            let offset = self.append(&old[segment][at..at + slot.len()]);
            self.slots[i].at = (slot.at & !((1 << OFFSET_BITS) - 1)) | offset as u64;
        }
        self.dead_bytes = 0;
        if self.slots.is_empty() {
            self.slots = Vec::new();
            self.heads = HashTable::new();
            self.links = HashMap::new();
        }
    }

    /// Every key and its rows, in the slots' order: a scan, not a walk of the table in hash
    /// order, which touched the slots at random (1.5 s for a status report of 940,000 rows on
    /// this machine, during which the peer answered nothing, against 0.1 s in order).
    pub fn iter(&self) -> impl Iterator<Item = (RecordKey, Rows<'_>)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.is_first())
            .map(|(i, slot)| {
                (
                    slot.record_key(),
                    Rows {
                        store: self,
                        next: i as u32,
                    },
                )
            })
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// (Tests: a bound on the store's overhead, counted rather than timed.)
    /// Bytes of memory the rows and their index take: the filled part of the segments (a
    /// segment's tail is never written until used, so never resident) and the capacity of the
    /// slots and the tables (buckets and control bytes).
    #[cfg(test)]
    fn held_bytes(&self) -> usize {
        let segments: usize = self.segments.iter().map(Vec::len).sum();
        let table = self.heads.capacity() * 8 / 7;
        let links = self.links.capacity() * 8 / 7;
        segments
            + self.slots.capacity() * std::mem::size_of::<Slot>()
            + table * (std::mem::size_of::<u32>() + 1)
            + links * (2 * std::mem::size_of::<u32>() + 1)
    }

    pub fn row_count(&self) -> u64 {
        self.slots.len() as u64
    }

    pub fn key_count(&self) -> u64 {
        self.heads.len() as u64
    }
}

/// Room kept in every datagram for the envelope and the trace context.
const ENVELOPE_SLACK: usize = 512;

/// An upper bound on a CBOR text string's encoded size.
fn text_size(s: &str) -> usize {
    s.len() + 9
}

/// An upper bound on one row's encoded size.
pub fn row_size(row: &PackedRow) -> usize {
    // Array header, the key (a one-entry map holding a u64), the byte string's header.
    32 + row.len()
}

/// An upper bound on one query answer's encoded size (in a peer's `Answers`).
pub fn answer_size(answer: &crate::wire::FindResult) -> usize {
    let records: usize = answer.records.iter().map(RecordOut::encoded_size).sum();
    // Query number, key and flags; a path entry and a hop timing are a few integers each.
    64 + records + 9 * answer.path.len() + 32 * answer.hops.len()
}

/// The room for rows in one batch of this schema.
pub fn batch_budget(columns: &[String], max_datagram: usize) -> usize {
    let header = ENVELOPE_SLACK + columns.iter().map(|c| text_size(c)).sum::<usize>();
    max_datagram.saturating_sub(header)
}

/// Splits rows of one schema into batches whose encoded envelopes stay under `max_datagram`.
/// A row too large for any datagram is returned in the second list, not dropped silently.
pub fn make_batches(
    epoch: u64,
    columns: &[String],
    rows: impl IntoIterator<Item = WireRow>,
    max_datagram: usize,
) -> (Vec<StoreBatch>, Vec<WireRow>) {
    let budget = batch_budget(columns, max_datagram);
    let (fitting, oversized): (Vec<WireRow>, Vec<WireRow>) =
        rows.into_iter().partition(|row| row_size(&row.1) <= budget);
    let batches = cut_by_budget(fitting.into_iter().map(|row| ((), row)), budget)
        .into_iter()
        .map(|(_, rows)| StoreBatch {
            epoch,
            columns: columns.to_vec(),
            rows,
        })
        .collect();
    (batches, oversized)
}

/// Cuts `rows` into batches of at most `budget` bytes of rows (a row alone may fill one),
/// each with the tags of its rows, a run of equal tags named once.
pub fn cut_by_budget<T: PartialEq>(
    rows: impl IntoIterator<Item = (T, WireRow)>,
    budget: usize,
) -> Vec<(Vec<T>, Vec<WireRow>)> {
    let mut batches = Vec::new();
    let (mut tags, mut current, mut used) = (Vec::new(), Vec::new(), 0);
    for (tag, row) in rows {
        let size = row_size(&row.1);
        if used + size > budget && !current.is_empty() {
            batches.push((std::mem::take(&mut tags), std::mem::take(&mut current)));
            used = 0;
        }
        used += size;
        if tags.last() != Some(&tag) {
            tags.push(tag);
        }
        current.push(row);
    }
    if !current.is_empty() {
        batches.push((tags, current));
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Body, Envelope};

    fn cols() -> Vec<String> {
        vec!["event_id".into(), "state".into()]
    }

    #[test]
    fn insert_is_idempotent_and_keeps_distinct_rows_of_one_key() {
        let mut s = Store::default();
        let c = s.intern(&cols());
        let k = RecordKey::Event(1);
        assert!(s.insert(k, &c, PackedRow::pack(&["1", "OHIO"])));
        assert!(!s.insert(k, &c, PackedRow::pack(&["1", "OHIO"])));
        assert!(s.insert(k, &c, PackedRow::pack(&["1", "IOWA"])));
        assert_eq!((s.row_count(), s.key_count()), (2, 1));
        let out = s.records_out(k);
        assert_eq!(out.len(), 2);
        assert!(out[0].is(&cols(), &PackedRow::pack(&["1", "OHIO"])));
        assert_eq!(out[1].get("state"), Some("IOWA"));
    }

    #[test]
    fn rows_of_one_key_keep_their_order_through_removals() {
        assert_eq!(std::mem::size_of::<Slot>(), 16);
        let mut s = Store::default();
        let c = s.intern(&cols());
        let k = RecordKey::Event(9);
        for v in ["A", "B", "C"] {
            assert!(s.insert(k, &c, PackedRow::pack(&["9", v])));
        }
        assert!(!s.insert(k, &c, PackedRow::pack(&["9", "B"])));
        let first_two: Vec<StoredRow> = s.rows_of(k)[..2].to_vec();
        s.remove_rows(k, &first_two);
        let left: Vec<Vec<String>> = s.get(k).map(|r| r.values()).collect();
        assert_eq!(left, vec![vec!["9".to_string(), "C".to_string()]]);
        assert_eq!((s.row_count(), s.key_count()), (1, 1));
    }

    #[test]
    fn an_event_id_and_a_fallback_key_of_the_same_number_are_two_keys() {
        let mut s = Store::default();
        let c = s.intern(&cols());
        assert!(s.insert(RecordKey::Event(5), &c, PackedRow::pack(&["5", "E"])));
        assert!(s.insert(RecordKey::Fallback(5), &c, PackedRow::pack(&["5", "F"])));
        assert_eq!(s.key_count(), 2);
        assert_eq!(
            s.records_out(RecordKey::Fallback(5))[0].get("state"),
            Some("F")
        );
        assert!(!s.contains(RecordKey::Fallback(6)));
    }

    /// Random inserts and removals against a plain map of vectors (seeded: a failure replays),
    /// through several compactions: the same rows, in the same order, for every key.
    #[test]
    fn the_store_holds_what_a_plain_map_holds_through_removals_and_compaction() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(0x5702e);
        let mut s = Store::default();
        let wide = s.intern(&["event_id".to_string(), "narrative".to_string()]);
        let narrow = s.intern(&cols());
        let mut model: std::collections::BTreeMap<RecordKey, Vec<StoredRow>> = Default::default();
        let mut compactions = 0;
        for step in 0..40_000u32 {
            let n = rng.random_range(0..2_000u64);
            let key = if n % 7 == 0 {
                RecordKey::Fallback(n)
            } else {
                RecordKey::Event(n)
            };
            if rng.random_bool(0.6) {
                let columns = if rng.random_bool(0.5) { &wide } else { &narrow };
                let text = "x".repeat(rng.random_range(0..300));
                let row = PackedRow::pack(&[n.to_string(), format!("{}{text}", step % 3)]);
                let stored = StoredRow {
                    columns: columns.clone(),
                    row: row.clone(),
                };
                let rows = model.entry(key).or_default();
                let new = !rows.contains(&stored);
                if new {
                    rows.push(stored);
                }
                assert_eq!(s.insert(key, columns, row), new, "step {step}");
            } else if let Some(rows) = model.get_mut(&key) {
                let gone: Vec<StoredRow> = rows
                    .iter()
                    .filter(|_| rng.random_bool(0.7))
                    .cloned()
                    .collect();
                rows.retain(|r| !gone.contains(r));
                if rows.is_empty() {
                    model.remove(&key);
                }
                let before = s.dead_bytes;
                s.remove_rows(key, &gone);
                if s.dead_bytes < before {
                    compactions += 1;
                }
            }
        }
        assert!(compactions > 0, "no compaction happened");
        let rows: usize = model.values().map(Vec::len).sum();
        assert_eq!(
            (s.row_count(), s.key_count()),
            (rows as u64, model.len() as u64)
        );
        for (key, expected) in &model {
            assert_eq!(&s.rows_of(*key), expected, "{key}");
        }
        let mut seen = 0;
        for (key, rows) in s.iter() {
            let rows: Vec<StoredRow> = rows.map(|r| r.to_stored()).collect();
            assert_eq!(model.get(&key), Some(&rows));
            seen += 1;
        }
        assert_eq!(seen, model.len());
    }

    /// NOAA-sized rows (66 bytes packed, as details-1996's average) cost well under twice their
    /// bytes, counted by what the store holds (not by timing, not by RSS).
    #[test]
    fn a_row_costs_less_than_twice_its_bytes() {
        let mut s = Store::default();
        let c = s.intern(&cols());
        let rows = 20_000u64;
        let mut raw = 0;
        for i in 0..rows {
            let row = PackedRow::pack(&[format!("{}", 5_000_000 + i), "Y".repeat(57)]);
            raw += row.len();
            assert!(s.insert(RecordKey::Event(5_000_000 + i), &c, row));
        }
        let ratio = s.held_bytes() as f64 / raw as f64;
        assert!(ratio < 1.7, "{ratio:.2} bytes held per raw byte");
    }

    #[test]
    fn interning_shares_one_header() {
        let mut s = Store::default();
        let a = s.intern(&cols());
        let b = s.intern(&cols());
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn remove_rows_drops_only_those_rows() {
        let mut s = Store::default();
        let c = s.intern(&cols());
        let k = RecordKey::Event(1);
        s.insert(k, &c, PackedRow::pack(&["1", "A"]));
        s.insert(k, &c, PackedRow::pack(&["1", "B"]));
        let gone = vec![StoredRow {
            columns: c.clone(),
            row: PackedRow::pack(&["1", "A"]),
        }];
        s.remove_rows(k, &gone);
        assert_eq!(s.row_count(), 1);
        s.remove_rows(
            k,
            &[StoredRow {
                columns: c,
                row: PackedRow::pack(&["1", "B"]),
            }],
        );
        assert_eq!((s.row_count(), s.key_count()), (0, 0));
    }

    #[test]
    fn batches_fit_the_datagram_and_keep_every_row() {
        let rows: Vec<WireRow> = (0..5000u64)
            .map(|i| {
                WireRow(
                    RecordKey::Event(i),
                    PackedRow::pack(&[i.to_string(), "X".repeat((i % 200) as usize)]),
                )
            })
            .collect();
        let (batches, oversized) = make_batches(3, &cols(), rows.clone(), 8_000);
        assert!(oversized.is_empty());
        assert!(batches.len() > 10);
        let mut seen = Vec::new();
        for b in batches {
            let bytes = Envelope::new(u64::MAX, u64::MAX, None, Body::Store(b.clone()))
                .encode()
                .unwrap();
            assert!(bytes.len() <= 8_000 - 256, "batch of {} bytes", bytes.len());
            seen.extend(b.rows);
        }
        assert_eq!(seen, rows);
    }

    #[test]
    fn a_row_larger_than_a_datagram_is_reported() {
        let rows = vec![
            WireRow(
                RecordKey::Event(1),
                PackedRow::pack(&["1".into(), "y".repeat(10_000)]),
            ),
            WireRow(RecordKey::Event(2), PackedRow::pack(&["2", "ok"])),
        ];
        let (batches, oversized) = make_batches(1, &cols(), rows, 4_000);
        assert_eq!(batches.len(), 1);
        assert_eq!(oversized.len(), 1);
        assert_eq!(oversized[0].0, RecordKey::Event(1));
    }
}
