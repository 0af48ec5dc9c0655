//! The SignalR JSON hub protocol: record framing, the handshake, and the messages Switchboard
//! reads and writes.
//!
//! Every record is one JSON object followed by the record separator `0x1E`. A WebSocket text
//! frame may carry several records; Switchboard only ever sends whole records per frame.
//! Property order is free and unknown properties (such as `headers`) are ignored.

use std::borrow::Cow;

use bytes::Bytes;

use serde::Deserialize;
use serde::Serialize;
use serde_json::value::RawValue;

/// The record separator that ends every JSON record.
pub const RECORD_SEPARATOR: u8 = 0x1e;

/// Longest accepted `invocationId`, in bytes.
pub const MAX_INVOCATION_ID_LEN: usize = 128;

/// A Ping record, as sent on the wire.
pub const PING: &str = "{\"type\":6}\u{1e}";

/// The successful handshake response.
pub const HANDSHAKE_OK: &str = "{}\u{1e}";

/// Message type numbers of the hub protocol.
pub mod kind {
    /// Invocation (both directions).
    pub const INVOCATION: i64 = 1;
    /// One item of a stream.
    pub const STREAM_ITEM: i64 = 2;
    /// Completion of an invocation.
    pub const COMPLETION: i64 = 3;
    /// Invocation of a streaming method.
    pub const STREAM_INVOCATION: i64 = 4;
    /// Cancel a stream.
    pub const CANCEL_INVOCATION: i64 = 5;
    /// Keep-alive.
    pub const PING: i64 = 6;
    /// Close.
    pub const CLOSE: i64 = 7;
    /// Stateful reconnect acknowledgement.
    pub const ACK: i64 = 8;
    /// Stateful reconnect sequence.
    pub const SEQUENCE: i64 = 9;
}

/// A violation of the protocol: the connection is closed with this text in its Close message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A record is not valid JSON, or lacks a required field.
    #[error("Invalid message: {0}")]
    InvalidMessage(String),
    /// A record exceeds the configured maximum size.
    #[error(
        "Message too large: a record of at least {size} bytes exceeds the limit of {limit} bytes"
    )]
    TooLarge {
        /// Size seen so far, in bytes.
        size: usize,
        /// The configured limit, in bytes.
        limit: usize,
    },
    /// A binary WebSocket frame arrived on a JSON connection.
    #[error("Binary frames are not supported by the JSON hub protocol; send text frames")]
    BinaryFrame,
    /// The handshake did not arrive in time.
    #[error("Handshake was not received within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    /// The handshake was refused.
    #[error("Handshake failed: {0}")]
    Handshake(String),
}

/// The client's handshake request.
#[derive(Debug, Deserialize)]
struct HandshakeRequest<'a> {
    #[serde(borrow)]
    protocol: Option<Cow<'a, str>>,
    version: Option<i64>,
}

/// Whether `record` starts like a JSON object. serde reads a struct from a JSON array too
/// (`[6]` as `{"type":6}`), which the protocol does not allow, so records are checked first.
fn is_object(record: &[u8]) -> bool {
    record.trim_ascii_start().first() == Some(&b'{')
}

/// Newest version of the JSON hub protocol this server speaks.
pub const MAX_VERSION: i64 = 2;

/// Parses the handshake record (without its separator) and returns the protocol version the
/// connection runs: 2 when the client asked for 2, else 1. Like ASP.NET Core, any version up to
/// [`MAX_VERSION`] is accepted (some clients, such as Python's `signalrcore`, send 0); the
/// versions below 2 differ only in lacking stateful reconnect.
///
/// # Errors
///
/// [`ProtocolError::Handshake`] with a text the client will see.
pub fn parse_handshake(record: &[u8]) -> Result<u8, ProtocolError> {
    if !is_object(record) {
        return Err(ProtocolError::Handshake(
            "the handshake is not a JSON object".into(),
        ));
    }
    let request: HandshakeRequest<'_> = serde_json::from_slice(record)
        .map_err(|e| ProtocolError::Handshake(format!("the handshake is not valid JSON: {e}")))?;
    let protocol = request
        .protocol
        .ok_or_else(|| ProtocolError::Handshake("the handshake has no 'protocol'".into()))?;
    let version = request
        .version
        .ok_or_else(|| ProtocolError::Handshake("the handshake has no 'version'".into()))?;
    if protocol != "json" {
        return Err(ProtocolError::Handshake(format!(
            "The protocol '{protocol}' is not supported; this server speaks 'json'."
        )));
    }
    match version {
        2 => Ok(2),
        v if v < 2 => Ok(1),
        other => Err(ProtocolError::Handshake(format!(
            "The server does not support version {other} of the 'json' protocol."
        ))),
    }
}

/// The error for a handshake that arrived in a binary frame. Clients that speak MessagePack
/// send their (JSON) handshake that way: they are told MessagePack is not supported, not that
/// frames must be text.
pub fn binary_handshake_error(frame: &[u8]) -> ProtocolError {
    let record = frame
        .split(|&b| b == RECORD_SEPARATOR)
        .next()
        .unwrap_or_default();
    match parse_handshake(record) {
        Err(ProtocolError::Handshake(text)) if text.contains("is not supported") => {
            ProtocolError::Handshake(text)
        }
        _ => ProtocolError::Handshake("the handshake must be sent in a text frame".into()),
    }
}

/// The handshake error response for `error`.
pub fn handshake_error(error: &str) -> String {
    let mut out = serde_json::json!({ "error": error }).to_string();
    out.push(RECORD_SEPARATOR as char);
    out
}

/// One record received from a client, borrowed from the frame.
#[derive(Debug, Deserialize)]
pub struct Incoming<'a> {
    /// Message type; see [`kind`].
    #[serde(rename = "type")]
    pub kind: Option<i64>,
    /// The caller's id for an invocation that wants a Completion.
    #[serde(rename = "invocationId", borrow, default)]
    pub invocation_id: Option<Cow<'a, str>>,
    /// Method name of an invocation.
    #[serde(borrow, default)]
    pub target: Option<Cow<'a, str>>,
    /// Arguments of an invocation: a JSON array, kept raw for typed decoding later.
    #[serde(borrow, default)]
    pub arguments: Option<&'a RawValue>,
    /// Ids of client-to-server streams.
    #[serde(rename = "streamIds", default)]
    pub stream_ids: Option<Vec<serde::de::IgnoredAny>>,
    /// Sequence id of an Ack or Sequence message.
    #[serde(rename = "sequenceId", default)]
    pub sequence_id: Option<u64>,
}

/// A parsed, validated client message.
#[derive(Debug)]
pub enum ClientMessage<'a> {
    /// A method call.
    Invocation {
        /// `Some` when the caller waits for a Completion.
        invocation_id: Option<Cow<'a, str>>,
        /// Method name.
        target: Cow<'a, str>,
        /// The raw JSON array of arguments.
        arguments: &'a RawValue,
        /// Whether the call names client-to-server streams (unsupported).
        has_streams: bool,
    },
    /// A call of a streaming method (unsupported; answered with an error Completion).
    StreamInvocation {
        /// The caller's id.
        invocation_id: Cow<'a, str>,
        /// Method name.
        target: Cow<'a, str>,
    },
    /// Keep-alive.
    Ping,
    /// The client is closing the connection.
    Close,
    /// Stateful reconnect: the client received our records up to this number.
    Ack(u64),
    /// Stateful reconnect: the number of the first record the client is about to (re)send.
    Sequence(u64),
    /// A valid message this server has no use for (stream items, cancellations, completions,
    /// unknown types): ignored, as the protocol asks.
    Ignored(i64),
}

fn invalid(what: impl Into<String>) -> ProtocolError {
    ProtocolError::InvalidMessage(what.into())
}

fn check_invocation_id(id: &str) -> Result<(), ProtocolError> {
    if id.is_empty() {
        return Err(invalid("'invocationId' must not be empty"));
    }
    if id.len() > MAX_INVOCATION_ID_LEN {
        return Err(invalid(format!(
            "'invocationId' is longer than {MAX_INVOCATION_ID_LEN} bytes"
        )));
    }
    Ok(())
}

/// Parses one record (without its separator).
///
/// # Errors
///
/// [`ProtocolError::InvalidMessage`] when the record is not a JSON object of a known shape.
pub fn parse_message(record: &[u8]) -> Result<ClientMessage<'_>, ProtocolError> {
    if !is_object(record) {
        return Err(invalid("the message is not a JSON object"));
    }
    let msg: Incoming<'_> = serde_json::from_slice(record).map_err(|e| invalid(format!("{e}")))?;
    let kind = msg
        .kind
        .ok_or_else(|| invalid("the message has no 'type'"))?;
    match kind {
        kind::INVOCATION => {
            let target = msg
                .target
                .filter(|t| !t.is_empty())
                .ok_or_else(|| invalid("an invocation needs a non-empty 'target'"))?;
            let arguments = msg
                .arguments
                .filter(|a| a.get().starts_with('['))
                .ok_or_else(|| invalid("an invocation needs an 'arguments' array"))?;
            if let Some(id) = &msg.invocation_id {
                check_invocation_id(id)?;
            }
            Ok(ClientMessage::Invocation {
                invocation_id: msg.invocation_id,
                target,
                arguments,
                has_streams: msg.stream_ids.is_some_and(|s| !s.is_empty()),
            })
        }
        kind::STREAM_INVOCATION => {
            let invocation_id = msg
                .invocation_id
                .ok_or_else(|| invalid("a stream invocation needs an 'invocationId'"))?;
            check_invocation_id(&invocation_id)?;
            let target = msg
                .target
                .filter(|t| !t.is_empty())
                .ok_or_else(|| invalid("a stream invocation needs a non-empty 'target'"))?;
            Ok(ClientMessage::StreamInvocation {
                invocation_id,
                target,
            })
        }
        kind::PING => Ok(ClientMessage::Ping),
        kind::CLOSE => Ok(ClientMessage::Close),
        kind::ACK => msg
            .sequence_id
            .map(ClientMessage::Ack)
            .ok_or_else(|| invalid("an Ack needs a 'sequenceId'")),
        kind::SEQUENCE => msg
            .sequence_id
            .map(ClientMessage::Sequence)
            .ok_or_else(|| invalid("a Sequence needs a 'sequenceId'")),
        other => Ok(ClientMessage::Ignored(other)),
    }
}

/// Splits a byte stream into whole records. Bytes after the last separator of a frame are kept
/// until a later frame completes them, up to the record size limit.
#[derive(Debug, Default)]
pub struct RecordReader {
    partial: Vec<u8>,
}

impl RecordReader {
    /// Feeds one frame and returns the bytes that hold whole records (each followed by its
    /// separator; possibly empty). In the common case (nothing pending, the frame ends on a
    /// separator) this is the frame itself, not a copy. Iterate the result with [`records`].
    ///
    /// # Errors
    ///
    /// [`ProtocolError::TooLarge`] when an unfinished record grows past `max_record` bytes.
    pub fn complete(&mut self, frame: Bytes, max_record: usize) -> Result<Bytes, ProtocolError> {
        let Some(last) = frame.iter().rposition(|&b| b == RECORD_SEPARATOR) else {
            let size = self.partial.len() + frame.len();
            if size > max_record {
                return Err(too_large(size, max_record));
            }
            self.partial.extend_from_slice(&frame);
            return Ok(Bytes::new());
        };
        let tail = &frame[last + 1..];
        if tail.len() > max_record {
            return Err(too_large(tail.len(), max_record));
        }
        let whole = if self.partial.is_empty() {
            frame.slice(..=last)
        } else {
            let mut joined = std::mem::take(&mut self.partial);
            joined.extend_from_slice(&frame[..=last]);
            Bytes::from(joined)
        };
        self.partial.extend_from_slice(tail);
        Ok(whole)
    }

    /// Whether an incomplete record is waiting for more bytes.
    pub fn has_partial(&self) -> bool {
        !self.partial.is_empty()
    }
}

/// The records in bytes returned by [`RecordReader::complete`], without separators; empty
/// records (two separators in a row) are skipped.
pub fn records(whole: &[u8]) -> impl Iterator<Item = &[u8]> {
    whole
        .split(|&b| b == RECORD_SEPARATOR)
        .filter(|record| !record.is_empty())
}

/// Checks one record against the size limit.
///
/// # Errors
///
/// [`ProtocolError::TooLarge`] when `record` is longer than `max_record` bytes.
pub fn check_size(record: &[u8], max_record: usize) -> Result<(), ProtocolError> {
    if record.len() > max_record {
        return Err(too_large(record.len(), max_record));
    }
    Ok(())
}

fn too_large(size: usize, limit: usize) -> ProtocolError {
    ProtocolError::TooLarge { size, limit }
}

#[derive(Serialize)]
struct InvocationOut<'a, A: Serialize> {
    #[serde(rename = "type")]
    kind: i64,
    target: &'a str,
    arguments: &'a A,
}

/// Serializes a server-to-client invocation (no `invocationId`: no answer expected) whose
/// arguments serialize to a JSON array (use a tuple: `("text",)`).
///
/// # Errors
///
/// When `arguments` cannot be serialized or is not an array.
pub fn invocation<A: Serialize>(target: &str, arguments: &A) -> Result<String, serde_json::Error> {
    let mut out = serde_json::to_string(&InvocationOut {
        kind: kind::INVOCATION,
        target,
        arguments,
    })?;
    let array_start = out
        .find("\"arguments\":")
        .map(|i| i + "\"arguments\":".len());
    if array_start.is_none_or(|i| out.as_bytes().get(i) != Some(&b'[')) {
        return Err(serde::ser::Error::custom(
            "invocation arguments must serialize to a JSON array (use a tuple)",
        ));
    }
    out.push(RECORD_SEPARATOR as char);
    Ok(out)
}

#[derive(Serialize)]
struct CompletionOut<'a> {
    #[serde(rename = "type")]
    kind: i64,
    #[serde(rename = "invocationId")]
    invocation_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

/// A Completion carrying `result` (raw JSON; `null` for methods without a result).
pub fn completion_ok(invocation_id: &str, result: &RawValue) -> String {
    completion(invocation_id, Some(result), None)
}

/// A Completion carrying an error text.
pub fn completion_error(invocation_id: &str, error: &str) -> String {
    completion(invocation_id, None, Some(error))
}

fn completion(invocation_id: &str, result: Option<&RawValue>, error: Option<&str>) -> String {
    let mut out = serde_json::to_string(&CompletionOut {
        kind: kind::COMPLETION,
        invocation_id,
        result,
        error,
    })
    // Serializing strings and an already-valid raw value cannot fail.
    .unwrap_or_else(|_| String::from("{\"type\":7,\"error\":\"internal serialization error\"}"));
    out.push(RECORD_SEPARATOR as char);
    out
}

/// A Close message, optionally with an error and the permission to reconnect.
pub fn close(error: Option<&str>, allow_reconnect: bool) -> String {
    let mut value = serde_json::json!({ "type": kind::CLOSE });
    if let Some(error) = error {
        value["error"] = serde_json::Value::from(error);
    }
    if allow_reconnect {
        value["allowReconnect"] = serde_json::Value::Bool(true);
    }
    let mut out = value.to_string();
    out.push(RECORD_SEPARATOR as char);
    out
}

/// An Ack or Sequence message.
pub fn sequence_message(kind: i64, sequence_id: u64) -> String {
    format!("{{\"type\":{kind},\"sequenceId\":{sequence_id}}}\u{1e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_versions_and_protocols() {
        assert_eq!(
            parse_handshake(br#"{"protocol":"json","version":1}"#),
            Ok(1)
        );
        assert_eq!(
            parse_handshake(br#"{"version":2,"protocol":"json"}"#),
            Ok(2)
        );
        let err = parse_handshake(br#"{"protocol":"messagepack","version":1}"#)
            .expect_err("messagepack is refused");
        assert!(err.to_string().contains("'messagepack' is not supported"));
        assert!(parse_handshake(br#"{"protocol":"json","version":3}"#).is_err());
        // As ASP.NET Core: anything up to the newest version, as the version without
        // stateful reconnect.
        assert_eq!(
            parse_handshake(br#"{"protocol":"json","version":0}"#),
            Ok(1)
        );
        assert_eq!(
            parse_handshake(br#"{"protocol":"json","version":-1}"#),
            Ok(1)
        );
        let err = binary_handshake_error(b"{\"protocol\":\"messagepack\",\"version\":1}\x1e");
        assert!(
            err.to_string().contains("'messagepack' is not supported"),
            "{err}"
        );
        let err = binary_handshake_error(b"{\"protocol\":\"json\",\"version\":1}\x1e");
        assert!(err.to_string().contains("text frame"), "{err}");
        let err = binary_handshake_error(b"\x81\xa8protocol");
        assert!(err.to_string().contains("text frame"), "{err}");
        assert!(parse_handshake(b"not json").is_err());
        assert!(parse_handshake(br#"{"type":6}"#).is_err());
        assert_eq!(handshake_error("x"), "{\"error\":\"x\"}\u{1e}");
    }

    #[test]
    fn records_must_be_json_objects() {
        // serde would read these arrays as the structs' fields in order.
        for bad in [
            &b"[6]"[..],
            b"[10]",
            b" [1,null,\"x\",[]]",
            b"[8,null,null,null,null,3]",
        ] {
            assert_eq!(
                parse_message(bad).map(|_| ()),
                Err(invalid("the message is not a JSON object")),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(
            parse_message(b" \r\n\t{\"type\":6} "),
            Ok(ClientMessage::Ping)
        ));
        let err = parse_handshake(br#"["json",1]"#).expect_err("an array is refused");
        assert_eq!(
            err,
            ProtocolError::Handshake("the handshake is not a JSON object".into())
        );
        assert_eq!(
            parse_handshake(b"\n {\"protocol\":\"json\",\"version\":2}"),
            Ok(2)
        );
    }

    #[test]
    fn invocations_in_any_property_order() {
        let msg = parse_message(
            br#"{"target":"SendChatMessage","arguments":["bob","hi"],"invocationId":"0","type":1,"headers":{"a":"b"}}"#,
        )
        .expect("valid");
        match msg {
            ClientMessage::Invocation {
                invocation_id,
                target,
                arguments,
                has_streams,
            } => {
                assert_eq!(invocation_id.as_deref(), Some("0"));
                assert_eq!(target, "SendChatMessage");
                assert_eq!(arguments.get(), r#"["bob","hi"]"#);
                assert!(!has_streams);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn malformed_messages_are_protocol_errors() {
        for bad in [
            &b"{"[..],
            b"[]",
            b"{}",
            br#"{"type":"1"}"#,
            br#"{"type":1,"arguments":[]}"#,
            br#"{"type":1,"target":"","arguments":[]}"#,
            br#"{"type":1,"target":"x","arguments":{}}"#,
            br#"{"type":1,"target":"x","arguments":[],"invocationId":""}"#,
            br#"{"type":1,"target":"x","arguments":[],"invocationId":5}"#,
            br#"{"type":8}"#,
        ] {
            assert!(
                matches!(parse_message(bad), Err(ProtocolError::InvalidMessage(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let long_id = format!(
            r#"{{"type":1,"target":"x","arguments":[],"invocationId":"{}"}}"#,
            "i".repeat(129)
        );
        assert!(parse_message(long_id.as_bytes()).is_err());
    }

    #[test]
    fn unknown_types_and_client_only_messages_are_ignored() {
        assert!(matches!(
            parse_message(br#"{"type":42}"#),
            Ok(ClientMessage::Ignored(42))
        ));
        assert!(matches!(
            parse_message(br#"{"type":5,"invocationId":"1"}"#),
            Ok(ClientMessage::Ignored(5))
        ));
        assert!(matches!(
            parse_message(br#"{"type":6}"#),
            Ok(ClientMessage::Ping)
        ));
        assert!(matches!(
            parse_message(br#"{"type":8,"sequenceId":3}"#),
            Ok(ClientMessage::Ack(3))
        ));
    }

    fn collect(reader: &mut RecordReader, frame: &[u8], max: usize) -> Vec<String> {
        let whole = reader
            .complete(Bytes::copy_from_slice(frame), max)
            .expect("fits");
        records(&whole)
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .collect()
    }

    #[test]
    fn records_are_split_and_partial_records_carried_over() {
        let mut reader = RecordReader::default();
        let seen = collect(&mut reader, b"{\"a\":1}\x1e{\"b\":2}\x1e{\"c\"", 100);
        assert_eq!(seen, [r#"{"a":1}"#, r#"{"b":2}"#]);
        assert!(reader.has_partial());
        assert!(collect(&mut reader, b":", 100).is_empty());
        let seen = collect(&mut reader, b"3}\x1e\x1e", 100);
        assert_eq!(seen, [r#"{"c":3}"#]);
        assert!(!reader.has_partial());
    }

    #[test]
    fn oversized_records_are_refused() {
        let mut reader = RecordReader::default();
        let err = reader
            .complete(Bytes::from_static(&[b'x'; 11]), 10)
            .expect_err("too large");
        assert_eq!(
            err,
            ProtocolError::TooLarge {
                size: 11,
                limit: 10
            }
        );
        let mut reader = RecordReader::default();
        reader
            .complete(Bytes::from_static(b"01234"), 10)
            .expect("fits so far");
        assert!(reader.complete(Bytes::from_static(b"567890"), 10).is_err());
        assert!(check_size(b"0123456789", 10).is_ok());
        assert!(check_size(b"0123456789a", 10).is_err());
    }

    #[test]
    fn outgoing_messages() {
        assert_eq!(
            invocation("addChatMessage", &("bob: hi",)).expect("array"),
            "{\"type\":1,\"target\":\"addChatMessage\",\"arguments\":[\"bob: hi\"]}\u{1e}"
        );
        assert!(invocation("x", &"not an array").is_err());
        let null = RawValue::from_string("null".into()).expect("valid");
        assert_eq!(
            completion_ok("7", &null),
            "{\"type\":3,\"invocationId\":\"7\",\"result\":null}\u{1e}"
        );
        assert_eq!(
            completion_error("7", "nope \"quoted\""),
            "{\"type\":3,\"invocationId\":\"7\",\"error\":\"nope \\\"quoted\\\"\"}\u{1e}"
        );
        assert_eq!(close(None, false), "{\"type\":7}\u{1e}");
        assert_eq!(
            close(Some("bye"), true),
            "{\"allowReconnect\":true,\"error\":\"bye\",\"type\":7}\u{1e}"
        );
        assert_eq!(
            sequence_message(kind::SEQUENCE, 3),
            "{\"type\":9,\"sequenceId\":3}\u{1e}"
        );
    }
}
