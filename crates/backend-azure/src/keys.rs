//! Reversible encoding of user names and ids into PartitionKey and RowKey values.
//!
//! Table keys may not contain `/`, `\`, `#`, `?` or control characters, are limited to 1 KiB,
//! and some characters that are allowed cause trouble in practice: a single quote must be
//! doubled inside the `(PartitionKey='…')` URL and in filters (Azurite silently cuts the key
//! at an undoubled one), and `%` and non-ASCII characters depend on every proxy and client
//! percent-encoding them the same way. So a key holds only bytes that need no escaping
//! anywhere: ASCII letters, digits, `-`, `_` and `.`. Every other byte of the UTF-8 text is
//! written as `~` followed by two upper-case hex digits, so the encoding is reversible and
//! the same text always gives the same key (which is what makes a user's partition
//! findable by one point query).
//!
//! A key whose encoding would be longer than [`MAX_ENCODED`] is replaced by `~h` and the
//! SHA-256 of the text in hex: `~h` cannot start an escape (escapes use upper-case hex), so
//! the two forms never collide. The text of a hashed key is kept in the entity's `User`
//! property, and [`decode`] says when it must be read from there.

use std::fmt::Write as _;

use sha2::{Digest, Sha256};

/// Longest encoded key, in bytes (all ASCII). The service allows 1 KiB per key; this leaves a
/// wide margin for the service counting UTF-16 code units.
pub(crate) const MAX_ENCODED: usize = 400;

/// Prefix of a hashed key.
const HASHED: &str = "~h";

/// Whether `b` stands for itself in a key.
fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

/// The key for `text`: the escaped form, or the hashed form when that is too long.
pub(crate) fn encode(text: &str) -> String {
    let mut key = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        if is_plain(b) {
            key.push(char::from(b));
        } else {
            let _ = write!(key, "~{b:02X}");
        }
        if key.len() > MAX_ENCODED {
            return hashed(text);
        }
    }
    key
}

fn hashed(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let mut key = String::with_capacity(HASHED.len() + 64);
    key.push_str(HASHED);
    for b in digest {
        let _ = write!(key, "{b:02x}");
    }
    key
}

/// What a key says about the text it was made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decoded {
    /// The key spells the text.
    Text(String),
    /// The key is a hash: the text is in the entity's `User` property; [`matches_hash`]
    /// checks it.
    Hashed,
}

/// Why a key is not one this encoding writes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{key}` is not a key Switchboard writes: {why}")]
pub(crate) struct BadKey {
    key: String,
    why: &'static str,
}

/// Reverses [`encode`].
pub(crate) fn decode(key: &str) -> Result<Decoded, BadKey> {
    let bad = |why| BadKey {
        key: key.chars().take(80).collect(),
        why,
    };
    if let Some(hex) = key.strip_prefix(HASHED) {
        return if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Decoded::Hashed)
        } else {
            Err(bad("a hashed key is `~h` and 64 lower-case hex digits"))
        };
    }
    let bytes = key.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'~' {
            let hex = bytes
                .get(i + 1..i + 3)
                .ok_or_else(|| bad("`~` must be followed by two hex digits"))?;
            let value = hex_pair(hex)
                .ok_or_else(|| bad("`~` must be followed by two upper-case hex digits"))?;
            if is_plain(value) {
                return Err(bad("a plain character is escaped"));
            }
            out.push(value);
            i += 3;
        } else if is_plain(b) {
            out.push(b);
            i += 1;
        } else {
            return Err(bad("it holds a character that is always escaped"));
        }
    }
    String::from_utf8(out)
        .map(Decoded::Text)
        .map_err(|_| bad("the escaped bytes are not UTF-8"))
}

fn hex_pair(hex: &[u8]) -> Option<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    Some(digit(hex[0])? << 4 | digit(hex[1])?)
}

/// Whether `text` is the text behind the hashed `key`.
pub(crate) fn matches_hash(key: &str, text: &str) -> bool {
    hashed(text) == key
}

/// A string literal for an OData filter: quoted, with single quotes doubled. Keys from
/// [`encode`] never hold a quote; this keeps any other value safe too.
pub(crate) fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Characters the service refuses in keys, or that need escaping somewhere on the way.
    fn is_troublesome(c: char) -> bool {
        matches!(c, '/' | '\\' | '#' | '?' | '\'' | '%' | '~' | '!' | ' ')
            || c.is_control()
            || !c.is_ascii()
    }

    fn round_trip(text: &str) {
        let key = encode(text);
        assert!(
            !key.chars().any(|c| is_troublesome(c) && c != '~'),
            "the key of {text:?} holds a troublesome character: {key}"
        );
        assert!(key.len() <= MAX_ENCODED, "the key of {text:?} is too long");
        match decode(&key).expect("a key of ours decodes") {
            Decoded::Text(back) => assert_eq!(back, text),
            Decoded::Hashed => assert!(matches_hash(&key, text)),
        }
    }

    #[test]
    fn names_a_token_can_carry_round_trip() {
        for name in [
            "alice",
            "Alice",
            "a/b",
            "o'brien",
            "#",
            "?",
            "%",
            "%41",
            "~41",
            "~h",
            "a\\b",
            "tab\there",
            "nul\u{0}byte",
            "del\u{7f}",
            "c1\u{85}control",
            "zoë",
            "用户",
            "🦀 crab",
            "!leases",
            "PartitionKey eq 'x'",
            "trailing space ",
        ] {
            round_trip(name);
        }
    }

    #[test]
    fn plain_names_stay_readable_and_escapes_are_upper_case_hex() {
        assert_eq!(encode("bob.smith-1_x"), "bob.smith-1_x");
        assert_eq!(encode("o'brien"), "o~27brien");
        assert_eq!(encode("a/b"), "a~2Fb");
        assert_eq!(encode("~"), "~7E");
        assert_eq!(encode("é"), "~C3~A9");
    }

    #[test]
    fn long_names_are_hashed_and_stay_distinct() {
        let long = "x".repeat(1024);
        let key = encode(&long);
        assert!(key.starts_with("~h") && key.len() == 66, "{key}");
        assert_eq!(decode(&key), Ok(Decoded::Hashed));
        assert!(matches_hash(&key, &long));
        let other = format!("{}y", "x".repeat(1023));
        assert_ne!(encode(&other), key);
        assert!(!matches_hash(&key, &other));
        // A 1 KiB name of multi-byte characters, and one right at the limit.
        round_trip(&"é".repeat(512));
        let at_limit = "a".repeat(MAX_ENCODED);
        assert_eq!(encode(&at_limit), at_limit);
        round_trip(&"a".repeat(MAX_ENCODED + 1));
    }

    #[test]
    fn foreign_keys_are_refused_not_misread() {
        for key in ["a/b", "~", "~4", "~zz", "~41", "o'brien", "~h123", "~C3"] {
            assert!(decode(key).is_err(), "{key:?} must not decode");
        }
    }

    #[test]
    fn literals_double_quotes() {
        assert_eq!(literal("o'brien"), "'o''brien'");
        assert_eq!(literal("plain"), "'plain'");
    }

    proptest! {
        #[test]
        fn any_text_round_trips(text in any::<String>()) {
            round_trip(&text);
        }

        #[test]
        fn distinct_texts_get_distinct_keys(a in any::<String>(), b in any::<String>()) {
            prop_assume!(a != b);
            prop_assert_ne!(encode(&a), encode(&b));
        }
    }
}
