//! A structural pre-check of CBOR bytes, run before serde decodes a datagram.
//!
//! serde pre-allocates collections from their declared length (capped, but at about a mebibyte
//! per collection), so a 60-byte datagram declaring a billion-element array could make the
//! decoder allocate far beyond its own size. This walk checks every declared length against
//! the bytes that remain: each element takes at least one byte, so nothing the decoder then
//! allocates can exceed a small multiple of the datagram. It also bounds nesting depth.

/// Nesting deeper than any stormdht message.
const MAX_DEPTH: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    #[error("truncated at byte {0}")]
    Truncated(usize),
    #[error(
        "item at byte {at} declares {declared} entries or bytes but only {remaining} bytes remain"
    )]
    Oversized {
        at: usize,
        declared: u64,
        remaining: usize,
    },
    #[error("nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("reserved additional-information value at byte {0}")]
    Reserved(usize),
    #[error("{0} bytes follow the first item")]
    Trailing(usize),
}

/// Checks that `bytes` is exactly one well-formed CBOR item with honest lengths.
pub fn check(bytes: &[u8]) -> Result<(), GuardError> {
    let mut walker = Walker { bytes, pos: 0 };
    walker.item(0)?;
    match bytes.len() - walker.pos {
        0 => Ok(()),
        n => Err(GuardError::Trailing(n)),
    }
}

struct Walker<'a> {
    bytes: &'a [u8],
    pos: usize,
}

/// What an item's head says: its major type and its argument (None: indefinite length).
struct Head {
    major: u8,
    arg: Option<u64>,
    at: usize,
}

impl Walker<'_> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn byte(&mut self) -> Result<u8, GuardError> {
        let b = *self
            .bytes
            .get(self.pos)
            .ok_or(GuardError::Truncated(self.pos))?;
        self.pos += 1;
        Ok(b)
    }

    fn head(&mut self) -> Result<Head, GuardError> {
        let at = self.pos;
        let initial = self.byte()?;
        let (major, info) = (initial >> 5, initial & 0x1f);
        let arg = match info {
            0..=23 => Some(u64::from(info)),
            24..=27 => {
                let n = 1usize << (info - 24);
                let end = self.pos.checked_add(n).filter(|e| *e <= self.bytes.len());
                let end = end.ok_or(GuardError::Truncated(self.pos))?;
                let v = self.bytes[self.pos..end]
                    .iter()
                    .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
                self.pos = end;
                Some(v)
            }
            31 if matches!(major, 2..=5 | 7) => None,
            _ => return Err(GuardError::Reserved(at)),
        };
        Ok(Head { major, arg, at })
    }

    /// `declared` units each needing at least `min_bytes` must fit in what remains.
    fn fits(&self, at: usize, declared: u64, min_bytes: u64) -> Result<(), GuardError> {
        let remaining = self.remaining();
        if declared.saturating_mul(min_bytes) > remaining as u64 {
            return Err(GuardError::Oversized {
                at,
                declared,
                remaining,
            });
        }
        Ok(())
    }

    fn item(&mut self, depth: usize) -> Result<(), GuardError> {
        if depth > MAX_DEPTH {
            return Err(GuardError::TooDeep);
        }
        let head = self.head()?;
        match (head.major, head.arg) {
            (0 | 1 | 7, _) => Ok(()),
            (2 | 3, Some(len)) => {
                self.fits(head.at, len, 1)?;
                self.pos += len as usize;
                Ok(())
            }
            (2 | 3, None) => {
                // Indefinite string: definite chunks of the same major type until a break.
                loop {
                    if self.bytes.get(self.pos) == Some(&0xff) {
                        self.pos += 1;
                        return Ok(());
                    }
                    let chunk = self.head()?;
                    let len = chunk
                        .arg
                        .filter(|_| chunk.major == head.major)
                        .ok_or(GuardError::Reserved(chunk.at))?;
                    self.fits(chunk.at, len, 1)?;
                    self.pos += len as usize;
                }
            }
            (4 | 5, Some(n)) => {
                let per_entry = if head.major == 5 { 2 } else { 1 };
                self.fits(head.at, n, per_entry)?;
                for _ in 0..n.saturating_mul(per_entry) {
                    self.item(depth + 1)?;
                }
                Ok(())
            }
            (4 | 5, None) => loop {
                if self.bytes.get(self.pos) == Some(&0xff) {
                    self.pos += 1;
                    return Ok(());
                }
                self.item(depth + 1)?;
            },
            (6, _) => self.item(depth + 1),
            _ => Err(GuardError::Reserved(head.at)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cbor(v: &impl serde::Serialize) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::ser::into_writer(v, &mut out).unwrap();
        out
    }

    #[test]
    fn honest_items_pass() {
        assert_eq!(check(&cbor(&vec!["a".to_string(); 100])), Ok(()));
        assert_eq!(
            check(&cbor(&(
                1u8,
                -5i64,
                2.5f64,
                true,
                (),
                "x",
                vec![vec![1u8, 2], vec![]]
            ))),
            Ok(())
        );
        let map: std::collections::BTreeMap<String, Vec<u64>> =
            (0..50).map(|i| (i.to_string(), vec![i; 3])).collect();
        assert_eq!(check(&cbor(&map)), Ok(()));
        // Indefinite-length array and string.
        assert_eq!(check(&[0x9f, 0x01, 0x7f, 0x61, 0x41, 0xff, 0xff]), Ok(()));
    }

    #[test]
    fn dishonest_lengths_are_caught_before_any_allocation() {
        // An array declaring 2^32 entries in a 9-byte datagram.
        let r = check(&[0x9a, 0xff, 0xff, 0xff, 0xff, 0x01, 0x02, 0x03, 0x04]);
        assert!(
            matches!(
                r,
                Err(GuardError::Oversized {
                    declared: 4_294_967_295,
                    ..
                })
            ),
            "{r:?}"
        );
        // A text string declaring 1000 bytes with 2 present.
        assert!(matches!(
            check(&[0x79, 0x03, 0xe8, 0x41, 0x42]),
            Err(GuardError::Oversized { .. })
        ));
        // A map declaring 3 pairs with 5 bytes left: each pair needs at least 2.
        assert!(matches!(
            check(&[0xa3, 1, 2, 3, 4, 5]),
            Err(GuardError::Oversized { .. })
        ));
    }

    #[test]
    fn truncation_depth_and_reserved_values_are_errors() {
        assert_eq!(check(&[]), Err(GuardError::Truncated(0)));
        assert_eq!(check(&[0x19, 0x01]), Err(GuardError::Truncated(1)));
        assert_eq!(check(&[0x1c]), Err(GuardError::Reserved(0)));
        assert_eq!(check(&[0x81; 100]), Err(GuardError::TooDeep));
        assert_eq!(check(&[0x01, 0x02]), Err(GuardError::Trailing(1)));
        assert!(
            check(&[0x9f, 0x01]).is_err(),
            "unterminated indefinite array"
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(0x2545_f491_4f6c_dd1d);
        for len in 0..2000 {
            let bytes: Vec<u8> = (0..len % 97).map(|_| rng.random()).collect();
            let _ = check(&bytes);
        }
    }
}
