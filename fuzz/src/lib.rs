//! Helpers shared by the fuzz targets: input splitting, a reference record splitter, a JSON
//! object reader that keeps duplicate keys, and HS256 signing.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde::de::{MapAccess, Visitor};
use serde_json::value::RawValue;
use sha2::Sha256;

/// The record separator of the JSON hub protocol.
pub const SEPARATOR: u8 = 0x1e;

/// Splits fuzz input into frames: a length byte, then that many bytes; the last frame takes
/// whatever is left when it is shorter than its length byte says.
pub struct Frames<'a> {
    rest: &'a [u8],
}

impl<'a> Frames<'a> {
    /// Frames of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { rest: data }
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let (&len, rest) = self.rest.split_first()?;
        let len = usize::from(len).min(rest.len());
        let (frame, rest) = rest.split_at(len);
        self.rest = rest;
        Some(frame)
    }
}

/// A byte-at-a-time record splitter: the model the record reader is checked against.
#[derive(Debug, Default)]
pub struct Reference {
    current: Vec<u8>,
    done: Vec<Vec<u8>>,
}

impl Reference {
    /// Feeds one frame and returns the non-empty records it completed, without separators.
    pub fn feed(&mut self, frame: &[u8]) -> Vec<Vec<u8>> {
        let before = self.done.len();
        for &byte in frame {
            if byte == SEPARATOR {
                let record = std::mem::take(&mut self.current);
                if !record.is_empty() {
                    self.done.push(record);
                }
            } else {
                self.current.push(byte);
            }
        }
        self.done[before..].to_vec()
    }

    /// Length of the unfinished record after the last separator.
    pub fn pending(&self) -> usize {
        self.current.len()
    }

    /// Every non-empty record completed so far.
    pub fn records(&self) -> &[Vec<u8>] {
        &self.done
    }
}

/// The members of one JSON object in document order, duplicates included, each value kept as
/// raw JSON text (so, like serde's own handling of ignored values, without a nesting limit).
#[derive(Debug)]
pub struct Members(pub Vec<(String, Box<RawValue>)>);

impl Members {
    /// Parses `json` as exactly one JSON object (surrounding whitespace allowed).
    pub fn parse(json: &[u8]) -> Option<Self> {
        serde_json::from_slice(json).ok()
    }

    /// The raw value of `key`: `Ok(None)` when absent, `Err(Duplicate)` when it occurs more
    /// than once.
    pub fn get(&self, key: &str) -> Result<Option<&RawValue>, Duplicate> {
        let mut found = self.0.iter().filter(|(k, _)| k == key).map(|(_, v)| &**v);
        let first = found.next();
        match found.next() {
            None => Ok(first),
            Some(_) => Err(Duplicate),
        }
    }

    /// The value of `key` decoded as `T` (absent counts as JSON `null`); `None` when `key`
    /// occurs more than once or its value does not decode as `T`.
    pub fn typed<'a, T: Deserialize<'a>>(&'a self, key: &str) -> Option<T> {
        let raw = self.get(key).ok()?;
        serde_json::from_str(raw.map_or("null", RawValue::get)).ok()
    }
}

/// A key that occurs more than once in an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duplicate;

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;

        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = Members;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, Box<RawValue>>()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }

        deserializer.deserialize_map(ObjectVisitor)
    }
}

/// base64url without padding, as JWS segments use it.
pub fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The HS256 signature segment of `signing_input` (`header.claims`) under `secret`.
pub fn hs256(secret: &[u8], signing_input: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(signing_input.as_bytes());
    b64(mac.finalize().into_bytes())
}

/// A compact JWS of the raw `header` and `claims` bytes, signed with HS256 under `secret`.
pub fn sign(secret: &[u8], header: &[u8], claims: &[u8]) -> String {
    let input = format!("{}.{}", b64(header), b64(claims));
    let signature = hs256(secret, &input);
    format!("{input}.{signature}")
}
