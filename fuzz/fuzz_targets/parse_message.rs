//! The hub message parser, `protocol::parse_message`, on arbitrary records: it never panics,
//! what it accepts is well-formed, and it agrees with a model of the protocol written
//! against a plain reading of the JSON object.

#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use serde::de::IgnoredAny;
use switchboard::protocol::{self, ClientMessage, MAX_INVOCATION_ID_LEN, ProtocolError};
use switchboard_fuzz::Members;

/// What the model expects `parse_message` to return.
#[derive(Debug, PartialEq)]
enum Expected {
    Invocation {
        invocation_id: Option<String>,
        target: String,
        arguments: String,
        has_streams: bool,
    },
    StreamInvocation {
        invocation_id: String,
        target: String,
    },
    Ping,
    Close,
    Ack(u64),
    Sequence(u64),
    Ignored(i64),
}

/// The typed members every message may carry, each `None` when absent or `null`; `None`
/// overall when a known member occurs twice or has the wrong JSON type.
struct Fields {
    kind: Option<i64>,
    invocation_id: Option<String>,
    target: Option<String>,
    arguments: Option<String>,
    stream_ids: Option<Vec<IgnoredAny>>,
    sequence_id: Option<u64>,
}

fn fields(members: &Members) -> Option<Fields> {
    // `arguments` may hold any JSON value; `null` counts as absent.
    let arguments = match members.get("arguments").ok()? {
        Some(raw) if raw.get() != "null" => Some(raw.get().to_owned()),
        _ => None,
    };
    Some(Fields {
        kind: members.typed("type")?,
        invocation_id: members.typed("invocationId")?,
        target: members.typed("target")?,
        arguments,
        stream_ids: members.typed("streamIds")?,
        sequence_id: members.typed("sequenceId")?,
    })
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_INVOCATION_ID_LEN
}

/// The protocol as the model reads it; `None` for a record that must be refused.
fn model(record: &[u8]) -> Option<Expected> {
    let f = fields(&Members::parse(record)?)?;
    let target = f.target.filter(|t| !t.is_empty());
    Some(match f.kind? {
        1 => {
            let arguments = f.arguments.filter(|a| a.starts_with('['))?;
            if f.invocation_id.as_deref().is_some_and(|id| !valid_id(id)) {
                return None;
            }
            Expected::Invocation {
                invocation_id: f.invocation_id,
                target: target?,
                arguments,
                has_streams: f.stream_ids.is_some_and(|s| !s.is_empty()),
            }
        }
        4 => {
            let invocation_id = f.invocation_id.filter(|id| valid_id(id))?;
            Expected::StreamInvocation {
                invocation_id,
                target: target?,
            }
        }
        6 => Expected::Ping,
        7 => Expected::Close,
        8 => Expected::Ack(f.sequence_id?),
        9 => Expected::Sequence(f.sequence_id?),
        other => Expected::Ignored(other),
    })
}

/// Checks what a successful parse returned and converts it for comparison with the model.
fn checked(record: &[u8], message: ClientMessage<'_>) -> Expected {
    let within = |s: &str| {
        let range = record.as_ptr_range();
        range.contains(&s.as_ptr()) && s.len() <= record.len()
    };
    match message {
        ClientMessage::Invocation {
            invocation_id,
            target,
            arguments,
            has_streams,
        } => {
            assert!(!target.is_empty(), "an invocation with an empty target");
            let raw = arguments.get();
            assert!(
                raw.starts_with('[') && raw.ends_with(']'),
                "arguments {raw:?}"
            );
            assert!(
                within(raw),
                "the arguments are not borrowed from the record"
            );
            assert!(
                serde_json::from_str::<Vec<IgnoredAny>>(raw).is_ok(),
                "the arguments are not a JSON array"
            );
            if let Some(id) = &invocation_id {
                assert!(valid_id(id), "invocation id of {} bytes", id.len());
            }
            if let Cow::Borrowed(t) = &target {
                assert!(within(t));
            }
            Expected::Invocation {
                invocation_id: invocation_id.map(Cow::into_owned),
                target: target.into_owned(),
                arguments: raw.to_owned(),
                has_streams,
            }
        }
        ClientMessage::StreamInvocation {
            invocation_id,
            target,
        } => {
            assert!(valid_id(&invocation_id));
            assert!(!target.is_empty());
            Expected::StreamInvocation {
                invocation_id: invocation_id.into_owned(),
                target: target.into_owned(),
            }
        }
        ClientMessage::Ping => Expected::Ping,
        ClientMessage::Close => Expected::Close,
        ClientMessage::Ack(n) => Expected::Ack(n),
        ClientMessage::Sequence(n) => Expected::Sequence(n),
        ClientMessage::Ignored(kind) => {
            assert!(
                ![1, 4, 6, 7, 8, 9].contains(&kind),
                "type {kind} was ignored"
            );
            Expected::Ignored(kind)
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // Records arrive in WebSocket text frames, which are valid UTF-8. On other bytes the parser
    // only has to stay panic-free (serde skips unknown members without checking their text).
    let utf8 = std::str::from_utf8(data).is_ok();
    let expected = model(data);
    match protocol::parse_message(data) {
        Ok(message) => {
            let first = data.iter().find(|b| !b.is_ascii_whitespace());
            assert_eq!(
                first,
                Some(&b'{'),
                "accepted a record that is not a JSON object"
            );
            let got = checked(data, message);
            if utf8 {
                assert_eq!(
                    Some(got),
                    expected,
                    "the parser accepted what the model refuses"
                );
            }
        }
        Err(err) => {
            assert!(
                matches!(err, ProtocolError::InvalidMessage(_)),
                "unexpected error kind {err:?}"
            );
            let _ = err.to_string();
            assert!(
                expected.is_none(),
                "the parser refused a message the model accepts"
            );
        }
    }
});
