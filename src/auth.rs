//! The cluster key: every datagram carries an HMAC-SHA256 tag over all its bytes, checked before
//! any CBOR is decoded, so only holders of a key are heard.
//!
//! A sealed datagram is `"SK" | key id (4) | sent at (8, ms since the Unix epoch) | envelope |
//! tag (32)`; the tag covers everything before it. A keyring holds several keys: the first
//! seals, every one opens, so a key rotates without downtime (add the new key second
//! everywhere, then first, then drop the old one). The key id (the first bytes of the key's
//! SHA-256) only picks which key to try; it reveals nothing of the key.
//!
//! Replays: a datagram older (or newer) than [`REPLAY_WINDOW`] is refused, and within the
//! window the link's duplicate suppression hands a sequenced message to the protocol once per
//! sender incarnation. Clocks of the cluster's hosts must agree to within the window.

use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

type HmacSha256 = hmac::Hmac<Sha256>;

const MAGIC: [u8; 2] = *b"SK";
const KEY_ID_LEN: usize = 4;
const HEADER_LEN: usize = MAGIC.len() + KEY_ID_LEN + 8;
pub const TAG_LEN: usize = 32;
/// Bytes a seal adds to a datagram.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// How far a datagram's send time may be from the receiver's clock.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(30);
/// Shorter keys are refused: a cluster key should be long and random (`openssl rand -hex 32`).
pub const MIN_KEY_LEN: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("no key given (an empty keyring)")]
    Empty,
    #[error("key {index} is {len} bytes; a cluster key must be at least {MIN_KEY_LEN}")]
    TooShort { index: usize, len: usize },
}

/// Why a datagram was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("not sealed with a cluster key")]
    Unsealed,
    #[error("sealed with a key this keyring does not hold")]
    UnknownKey,
    #[error("its tag does not match its bytes")]
    BadTag,
    #[error("sent {age_ms} ms away from this host's clock, outside the replay window")]
    OutsideWindow { age_ms: u64 },
}

#[derive(Clone)]
struct Key {
    id: [u8; KEY_ID_LEN],
    mac: HmacSha256,
}

/// The keys of a cluster: the first seals, all open.
#[derive(Clone)]
pub struct Keyring {
    keys: Vec<Key>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        write!(f, "Keyring({} keys)", self.keys.len())
    }
}

fn key_id(secret: &[u8]) -> [u8; KEY_ID_LEN] {
    let digest = Sha256::digest(secret);
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&digest[..KEY_ID_LEN]);
    id
}

/// `payload` as it goes on the wire: sealed when the cluster has a keyring, as it is otherwise.
pub fn seal_if_keyed<'a>(keyring: Option<&Keyring>, payload: &'a [u8]) -> Cow<'a, [u8]> {
    match keyring {
        Some(ring) => Cow::Owned(ring.seal(payload, wall_clock_ms())),
        None => Cow::Borrowed(payload),
    }
}

/// The envelope bytes of a received datagram: opened when the cluster has a keyring, as they
/// are otherwise.
pub fn open_if_keyed<'a>(
    keyring: Option<&Keyring>,
    datagram: &'a [u8],
) -> Result<&'a [u8], AuthError> {
    match keyring {
        Some(ring) => ring.open(datagram, wall_clock_ms()),
        None => Ok(datagram),
    }
}

/// Milliseconds since the Unix epoch on this host.
pub fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Keyring {
    pub fn new<S: AsRef<[u8]>>(secrets: &[S]) -> Result<Keyring, KeyError> {
        if secrets.is_empty() {
            return Err(KeyError::Empty);
        }
        let keys = secrets
            .iter()
            .enumerate()
            .map(|(index, s)| {
                let s = s.as_ref();
                if s.len() < MIN_KEY_LEN {
                    return Err(KeyError::TooShort {
                        index: index + 1,
                        len: s.len(),
                    });
                }
                // HMAC takes keys of any length; this cannot fail.
                let mac =
                    <HmacSha256 as KeyInit>::new_from_slice(s).map_err(|_| KeyError::Empty)?;
                Ok(Key { id: key_id(s), mac })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Keyring { keys })
    }

    /// Keys as written by people: one per line (a file) or separated by commas (a variable);
    /// blank lines and `#` comments are skipped, surrounding white space is not part of a key.
    pub fn parse(text: &str) -> Result<Keyring, KeyError> {
        let secrets: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .flat_map(|l| l.split(','))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .collect();
        Keyring::new(&secrets)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// `payload` sealed with the first key, stamped with `now_ms`.
    pub fn seal(&self, payload: &[u8], now_ms: u64) -> Vec<u8> {
        let key = &self.keys[0];
        let mut out = Vec::with_capacity(payload.len() + OVERHEAD);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&now_ms.to_be_bytes());
        out.extend_from_slice(payload);
        let mut mac = key.mac.clone();
        mac.update(&out);
        out.extend_from_slice(&mac.finalize().into_bytes());
        out
    }

    /// The payload of a datagram sealed by any key of this ring, within the replay window of
    /// `now_ms`.
    pub fn open<'a>(&self, datagram: &'a [u8], now_ms: u64) -> Result<&'a [u8], AuthError> {
        if datagram.len() < OVERHEAD || datagram[..MAGIC.len()] != MAGIC {
            return Err(AuthError::Unsealed);
        }
        let (signed, tag) = datagram.split_at(datagram.len() - TAG_LEN);
        let id = &signed[MAGIC.len()..MAGIC.len() + KEY_ID_LEN];
        let mut tried = false;
        for key in self.keys.iter().filter(|k| k.id == id) {
            tried = true;
            let mut mac = key.mac.clone();
            mac.update(signed);
            // Constant-time comparison.
            if mac.verify_slice(tag).is_ok() {
                let mut sent = [0u8; 8];
                sent.copy_from_slice(&signed[MAGIC.len() + KEY_ID_LEN..HEADER_LEN]);
                let age_ms = now_ms.abs_diff(u64::from_be_bytes(sent));
                if age_ms > REPLAY_WINDOW.as_millis() as u64 {
                    return Err(AuthError::OutsideWindow { age_ms });
                }
                return Ok(&signed[HEADER_LEN..]);
            }
        }
        Err(if tried {
            AuthError::BadTag
        } else {
            AuthError::UnknownKey
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "0123456789abcdef-old-key";
    const NEW: &str = "fedcba9876543210-new-key";
    const NOW: u64 = 1_790_000_000_000;

    #[test]
    fn a_sealed_datagram_opens_to_its_payload() {
        let ring = Keyring::new(&[OLD]).unwrap();
        let sealed = ring.seal(b"envelope bytes", NOW);
        assert_eq!(sealed.len(), b"envelope bytes".len() + OVERHEAD);
        assert_eq!(ring.open(&sealed, NOW + 5), Ok(&b"envelope bytes"[..]));
    }

    #[test]
    fn every_single_changed_byte_is_refused() {
        let ring = Keyring::new(&[OLD]).unwrap();
        let sealed = ring.seal(b"teardown", NOW);
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(
                ring.open(&bad, NOW).is_err(),
                "byte {i} changed and still accepted"
            );
        }
        assert_eq!(
            ring.open(&sealed[..sealed.len() - 1], NOW),
            Err(AuthError::BadTag)
        );
    }

    #[test]
    fn strangers_and_plain_envelopes_are_refused() {
        let ring = Keyring::new(&[OLD]).unwrap();
        let stranger = Keyring::new(&["someone-elses-key-entirely"]).unwrap();
        assert_eq!(
            ring.open(&stranger.seal(b"x", NOW), NOW),
            Err(AuthError::UnknownKey)
        );
        assert_eq!(ring.open(b"\xa1plain cbor", NOW), Err(AuthError::Unsealed));
        assert_eq!(ring.open(b"", NOW), Err(AuthError::Unsealed));
        // A forged tag under a known key id.
        let mut forged = ring.seal(b"exit", NOW);
        let n = forged.len();
        forged[n - TAG_LEN..].fill(0);
        assert_eq!(ring.open(&forged, NOW), Err(AuthError::BadTag));
    }

    #[test]
    fn keys_rotate_first_seals_all_open() {
        let before = Keyring::new(&[OLD]).unwrap();
        let during = Keyring::parse(&format!(
            "{NEW}\n# the old one, until every host has the new\n{OLD}\n"
        ))
        .unwrap();
        let after = Keyring::new(&[NEW]).unwrap();
        assert_eq!(during.len(), 2);
        assert!(during.open(&before.seal(b"a", NOW), NOW).is_ok());
        assert!(after.open(&during.seal(b"b", NOW), NOW).is_ok());
        assert!(before.open(&after.seal(b"c", NOW), NOW).is_err());
    }

    #[test]
    fn old_and_future_datagrams_are_outside_the_window() {
        let ring = Keyring::new(&[OLD]).unwrap();
        let window = REPLAY_WINDOW.as_millis() as u64;
        let sealed = ring.seal(b"store", NOW);
        assert!(ring.open(&sealed, NOW + window).is_ok());
        assert_eq!(
            ring.open(&sealed, NOW + window + 1),
            Err(AuthError::OutsideWindow { age_ms: window + 1 })
        );
        assert!(ring.open(&sealed, NOW - window - 1).is_err());
    }

    #[test]
    fn short_or_missing_keys_are_refused_by_name() {
        assert_eq!(
            Keyring::parse("long-enough-key-here,short").unwrap_err(),
            KeyError::TooShort { index: 2, len: 5 }
        );
        assert_eq!(
            Keyring::parse(" \n# nothing\n").unwrap_err(),
            KeyError::Empty
        );
        assert_eq!(
            format!("{:?}", Keyring::new(&[OLD]).unwrap()),
            "Keyring(1 keys)"
        );
    }
}
