//! A peer's share of the records, and the batching that moves rows in datagrams.

use crate::record::RecordKey;
use crate::wire::{PackedRow, RecordOut, StoreBatch, WireRow};
use std::collections::HashMap;
use std::sync::Arc;

/// Column names shared by every row of one CSV file, interned so that 48,000 rows cost one
/// copy of the header, not 48,000.
pub type Columns = Arc<[String]>;

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

/// The rows of one key: almost always one, kept inline (no second allocation per key).
#[derive(Debug)]
enum Held {
    One(StoredRow),
    /// Boxed, so that a key costs no more than its one row in the map (the rare key with
    /// several rows pays the extra allocation).
    #[allow(clippy::box_collection)]
    Many(Box<Vec<StoredRow>>),
}

impl Held {
    fn as_slice(&self) -> &[StoredRow] {
        match self {
            Held::One(r) => std::slice::from_ref(r),
            Held::Many(v) => v,
        }
    }

    fn push(&mut self, row: StoredRow) {
        match self {
            Held::Many(v) => v.push(row),
            Held::One(_) => {
                let Held::One(first) = std::mem::replace(self, Held::Many(Box::default())) else {
                    unreachable!("matched One above")
                };
                *self = Held::Many(Box::new(vec![first, row]));
            }
        }
    }

    /// Keeps the rows for which `keep` holds; false when none is left.
    fn retain(&mut self, keep: impl Fn(&StoredRow) -> bool) -> bool {
        match self {
            Held::One(r) => keep(r),
            Held::Many(v) => {
                v.retain(keep);
                if v.len() == 1
                    && let Some(r) = v.pop()
                {
                    *self = Held::One(r);
                }
                !self.as_slice().is_empty()
            }
        }
    }
}

#[derive(Debug, Default)]
pub struct Store {
    schemas: Vec<Columns>,
    rows: HashMap<RecordKey, Held>,
    row_count: u64,
}

impl Store {
    pub fn intern(&mut self, columns: &[String]) -> Columns {
        if let Some(c) = self.schemas.iter().find(|c| c.as_ref() == columns) {
            return c.clone();
        }
        let c: Columns = columns.to_vec().into();
        self.schemas.push(c.clone());
        c
    }

    /// Keeps a row; returns false if an equal row is held already (storing is idempotent).
    pub fn insert(&mut self, key: RecordKey, columns: &Columns, row: PackedRow) -> bool {
        let new = StoredRow {
            columns: columns.clone(),
            row,
        };
        match self.rows.get_mut(&key) {
            Some(held) => {
                if held
                    .as_slice()
                    .iter()
                    .any(|r| Arc::ptr_eq(&r.columns, &new.columns) && r.row == new.row)
                {
                    return false;
                }
                held.push(new);
            }
            None => {
                self.rows.insert(key, Held::One(new));
            }
        }
        self.row_count += 1;
        true
    }

    /// Stores a whole batch; returns how many rows were new.
    pub fn insert_batch(&mut self, batch: StoreBatch) -> u32 {
        let columns = self.intern(&batch.columns);
        let mut new_rows = 0;
        for WireRow(key, row) in batch.rows {
            if self.insert(key, &columns, row) {
                new_rows += 1;
            }
        }
        new_rows
    }

    pub fn get(&self, key: RecordKey) -> Option<&[StoredRow]> {
        self.rows.get(&key).map(Held::as_slice)
    }

    pub fn records_out(&self, key: RecordKey) -> Vec<RecordOut> {
        self.get(key)
            .unwrap_or_default()
            .iter()
            .map(|r| RecordOut::new(&r.columns, r.row.clone()))
            .collect()
    }

    /// Removes the given rows of `key` (after their hand-off was acknowledged).
    pub fn remove_rows(&mut self, key: RecordKey, gone: &[StoredRow]) {
        if let Some(held) = self.rows.get_mut(&key) {
            let before = held.as_slice().len();
            let left = held.retain(|r| !gone.contains(r));
            let after = if left { held.as_slice().len() } else { 0 };
            self.row_count -= (before - after) as u64;
            if !left {
                self.rows.remove(&key);
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&RecordKey, &[StoredRow])> {
        self.rows.iter().map(|(k, held)| (k, held.as_slice()))
    }

    pub fn row_count(&self) -> u64 {
        self.row_count
    }

    pub fn key_count(&self) -> u64 {
        self.rows.len() as u64
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
    let mut batches = Vec::new();
    let mut oversized = Vec::new();
    let mut current: Vec<WireRow> = Vec::new();
    let mut used = 0;
    for row in rows {
        let size = row_size(&row.1);
        if size > budget {
            oversized.push(row);
            continue;
        }
        if used + size > budget && !current.is_empty() {
            batches.push(StoreBatch {
                epoch,
                columns: columns.to_vec(),
                rows: std::mem::take(&mut current),
            });
            used = 0;
        }
        used += size;
        current.push(row);
    }
    if !current.is_empty() {
        batches.push(StoreBatch {
            epoch,
            columns: columns.to_vec(),
            rows: current,
        });
    }
    (batches, oversized)
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
        assert!(out[0].is(&cols(), &["1".to_string(), "OHIO".to_string()]));
        assert_eq!(out[1].get("state"), Some("IOWA"));
    }

    #[test]
    fn a_key_with_one_row_costs_one_row_in_the_map() {
        assert_eq!(
            std::mem::size_of::<Held>(),
            std::mem::size_of::<StoredRow>()
        );
        let mut s = Store::default();
        let c = s.intern(&cols());
        let k = RecordKey::Event(9);
        for v in ["A", "B", "C"] {
            assert!(s.insert(k, &c, PackedRow::pack(&["9", v])));
        }
        assert!(!s.insert(k, &c, PackedRow::pack(&["9", "B"])));
        let first_two: Vec<StoredRow> = s.get(k).unwrap()[..2].to_vec();
        s.remove_rows(k, &first_two);
        assert_eq!(
            s.get(k).map(|r| r[0].values()),
            Some(vec!["9".into(), "C".into()])
        );
        assert_eq!((s.row_count(), s.key_count()), (1, 1));
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
