//! Record keys: a row's EVENT_ID, or a stable fallback key for rows without a usable one.

use std::fmt;
use std::str::FromStr;

/// The key a record is stored under.
///
/// `Event(n)` is the row's EVENT_ID; `Fallback(h)` is a stable hash of the row's values (see
/// [`fallback_key`]) for rows without a usable EVENT_ID.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum RecordKey {
    Event(u64),
    Fallback(u64),
}

impl RecordKey {
    /// The number inside either variant.
    pub fn as_u64(&self) -> u64 {
        match *self {
            RecordKey::Event(n) | RecordKey::Fallback(n) => n,
        }
    }
}

impl fmt::Display for RecordKey {
    /// `Event(123)` → `123`; `Fallback(h)` → `x` followed by 16 lowercase hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RecordKey::Event(n) => write!(f, "{n}"),
            RecordKey::Fallback(h) => write!(f, "x{h:016x}"),
        }
    }
}

/// Why a string is not a [`RecordKey`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyParseError {
    #[error("empty record key")]
    Empty,
    #[error(
        "invalid record key {input:?}: expected a decimal event id (e.g. \"5570068\") or \"x\" followed by 16 hex digits (e.g. \"x00ff12ab34cd56ef\")"
    )]
    Malformed { input: String },
    #[error("invalid record key {input:?}: event id does not fit in 64 bits")]
    OutOfRange { input: String },
    #[error(
        "invalid fallback key {input:?}: expected \"x\" followed by exactly 16 hex digits, found {digits} characters"
    )]
    FallbackLength { input: String, digits: usize },
}

impl FromStr for RecordKey {
    type Err = KeyParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.is_empty() {
            return Err(KeyParseError::Empty);
        }
        if let Some(hex) = t.strip_prefix('x') {
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(KeyParseError::Malformed { input: t.into() });
            }
            if hex.len() != 16 {
                return Err(KeyParseError::FallbackLength {
                    input: t.into(),
                    digits: hex.len(),
                });
            }
            return u64::from_str_radix(hex, 16)
                .map(RecordKey::Fallback)
                .map_err(|_| KeyParseError::Malformed { input: t.into() });
        }
        if !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(KeyParseError::Malformed { input: t.into() });
        }
        t.parse::<u64>()
            .map(RecordKey::Event)
            .map_err(|_| KeyParseError::OutOfRange { input: t.into() })
    }
}

/// A usable EVENT_ID: non-empty decimal digits (surrounding whitespace allowed) fitting u64.
pub(super) fn event_id(value: &str) -> Option<u64> {
    let t = value.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse().ok()
}

/// Fallback key for a row with no usable EVENT_ID: stable across runs, platforms and processes (do NOT use std's RandomState/DefaultHasher): FNV-1a 64 over the values joined with a 0x1f separator, then a splitmix64 finaliser.
///
/// The separator goes between values only (none before the first or after the last). The
/// finaliser is splitmix64's mixing step without the golden-ratio increment:
/// `z ^= z >> 30; z *= 0xbf58476d1ce4e5b9; z ^= z >> 27; z *= 0x94d049bb133111eb; z ^= z >> 31`.
pub fn fallback_key<I>(values: I) -> RecordKey
where
    I: IntoIterator,
    I::Item: AsRef<str>,
{
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    };
    for (i, v) in values.into_iter().enumerate() {
        if i > 0 {
            eat(0x1f);
        }
        v.as_ref().bytes().for_each(&mut eat);
    }
    let mut z = h;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    RecordKey::Fallback(z ^ (z >> 31))
}

#[cfg(test)]
mod tests {
    use super::super::testdata::strings;
    use super::*;

    #[test]
    fn fallback_key_is_pinned() {
        // Values computed independently (FNV-1a 64 over values joined by 0x1f, splitmix64 mix).
        let k = fallback_key(strings(&["", "TEXAS", "2020", "Hail"]));
        assert_eq!(k, RecordKey::Fallback(0x570b_0189_fc2d_68bf));
        assert_eq!(k.to_string(), "x570b0189fc2d68bf");
        assert_eq!(fallback_key([""; 0]).to_string(), "xf52a15e9a9b5e89b");
        // The separator matters: ["a"] and ["a", ""] differ, as do ["ab"] and ["a", "b"].
        assert_eq!(
            fallback_key(strings(&["a"])).to_string(),
            "x02c0bdbf481420f8"
        );
        assert_eq!(
            fallback_key(strings(&["a", ""])).to_string(),
            "xb9dc434663955e14"
        );
        assert_ne!(
            fallback_key(strings(&["ab"])),
            fallback_key(strings(&["a", "b"]))
        );
    }

    #[test]
    fn record_key_display_and_from_str() {
        for k in [
            RecordKey::Event(0),
            RecordKey::Event(123),
            RecordKey::Event(u64::MAX),
            RecordKey::Fallback(0),
            RecordKey::Fallback(0x00ff_12ab_34cd_56ef),
            RecordKey::Fallback(u64::MAX),
        ] {
            assert_eq!(k.to_string().parse::<RecordKey>(), Ok(k));
        }
        assert_eq!(RecordKey::Event(123).to_string(), "123");
        assert_eq!(RecordKey::Fallback(0xff).to_string(), "x00000000000000ff");
        assert_eq!(RecordKey::Fallback(7).as_u64(), 7);
        assert_eq!(RecordKey::Event(9).as_u64(), 9);
        assert_eq!(" 5570068\n".parse(), Ok(RecordKey::Event(5570068)));
        assert_eq!(
            " x00FF12ab34cd56ef ".parse(),
            Ok(RecordKey::Fallback(0x00ff_12ab_34cd_56ef))
        );
        assert_eq!("".parse::<RecordKey>(), Err(KeyParseError::Empty));
        assert_eq!("  ".parse::<RecordKey>(), Err(KeyParseError::Empty));
        for bad in [
            "abc",
            "-5",
            "+5",
            "1.5",
            "x",
            "xg000000000000000",
            "X00ff12ab34cd56ef",
            "12 3",
        ] {
            let e = bad.parse::<RecordKey>().unwrap_err();
            assert!(
                matches!(
                    e,
                    KeyParseError::Malformed { .. } | KeyParseError::FallbackLength { .. }
                ),
                "{bad}: {e:?}"
            );
            assert!(e.to_string().contains("invalid"), "{e}");
        }
        assert!(matches!(
            "x123".parse::<RecordKey>(),
            Err(KeyParseError::FallbackLength { digits: 3, .. })
        ));
        assert!(matches!(
            "18446744073709551616".parse::<RecordKey>(),
            Err(KeyParseError::OutOfRange { .. })
        ));
        assert!(
            "abc"
                .parse::<RecordKey>()
                .unwrap_err()
                .to_string()
                .contains("\"abc\"")
        );
    }
}
