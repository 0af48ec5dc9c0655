//! The SignalR JSON hub protocol as the load generator speaks it: the frames it sends
//! (`SendChatMessage` invocations carrying a measurement header) and the classification of
//! the records it receives.

use std::sync::LazyLock;
use std::time::Duration;

use memchr::memchr2;
use memchr::memmem::Finder;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Record separator ending every SignalR JSON record.
pub(crate) const RS: u8 = 0x1e;
/// The handshake request: JSON protocol, version 1.
pub(crate) const HANDSHAKE: &str = "{\"protocol\":\"json\",\"version\":1}\u{1e}";
/// A Ping record.
pub(crate) const PING: Utf8Bytes = Utf8Bytes::from_static("{\"type\":6}\u{1e}");
/// Client keep-alive interval (the JS client's default).
pub(crate) const KEEPALIVE: Duration = Duration::from_secs(15);
/// Smallest payload that holds the embedded header for any realistic run.
pub(crate) const MIN_PAYLOAD: usize = 48;

// ---------------------------------------------------------------------------------------------
// Outgoing frames
// ---------------------------------------------------------------------------------------------

/// Builds `SendChatMessage` invocation records with the embedded measurement header.
pub(crate) struct FrameBuilder {
    /// Payload size, bytes.
    payload: usize,
    /// Room for a whole record.
    capacity: usize,
}

impl FrameBuilder {
    /// A builder for payloads of exactly `payload` bytes.
    pub(crate) fn new(payload: usize) -> Self {
        Self {
            payload,
            capacity: payload + 128,
        }
    }

    /// `{"type":1[,"invocationId":"<id>"],"target":"SendChatMessage","arguments":["user-<t>","<payload>"]}␞`
    pub(crate) fn build(
        &self,
        target: usize,
        seq: u64,
        intended_ns: u64,
        measured: bool,
        invocation_id: Option<u64>,
    ) -> Utf8Bytes {
        let mut s = String::with_capacity(self.capacity);
        s.push_str("{\"type\":1,");
        if let Some(id) = invocation_id {
            s.push_str("\"invocationId\":\"");
            push_u64(&mut s, id);
            s.push_str("\",");
        }
        s.push_str("\"target\":\"SendChatMessage\",\"arguments\":[\"user-");
        push_u64(&mut s, target as u64);
        s.push_str("\",\"");
        let start = s.len();
        s.push(if measured { 'm' } else { 'w' });
        push_u64(&mut s, target as u64);
        s.push('.');
        push_u64(&mut s, seq);
        s.push('.');
        push_u64(&mut s, intended_ns);
        s.push('.');
        while s.len() - start < self.payload {
            s.push('x');
        }
        s.push_str("\"]}\u{1e}");
        Utf8Bytes::from(s)
    }
}

/// Appends the decimal digits of `v` to `s`.
fn push_u64(s: &mut String, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for &b in &buf[i..] {
        s.push(char::from(b));
    }
}

// ---------------------------------------------------------------------------------------------
// Incoming records
// ---------------------------------------------------------------------------------------------

/// The measurement header parsed out of a delivered payload.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Embedded {
    /// Sent in the measured window (`m`), not during the warm-up (`w`).
    pub(crate) measured: bool,
    /// The receiver user the message was addressed to.
    pub(crate) target: u64,
    /// The sender's sequence number (closed loop) or schedule round (open loop).
    pub(crate) seq: u64,
    /// Intended send time, nanoseconds since the epoch.
    pub(crate) intended_ns: u64,
}

/// What one received record is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Record {
    /// `addChatMessage` carrying one of our payloads.
    Chat(Embedded),
    /// Ping (`type 6`).
    Ping,
    /// Completion: invocation id (if numeric) and whether it carried an error.
    Completion {
        /// The invocation id, if it is a number.
        id: Option<u64>,
        /// Whether the Completion carried an `error`.
        error: bool,
    },
    /// Server Close record (`type 7`), with its error text if any.
    Close(Option<String>),
    /// `showErrorMessage` invocation, with its first argument.
    ShowError(String),
    /// Anything else: the raw text, for the report.
    Other(String),
}

/// The byte strings the fast paths look for, each with its searcher built once.
struct Needles {
    /// `"addChatMessage"`
    chat: Finder<'static>,
    /// `"arguments":["`, just before the first argument's text.
    arguments: Finder<'static>,
    /// `: ` between the sender's name and the payload in a delivered message.
    sender_end: Finder<'static>,
    /// `"type":3`
    completion: Finder<'static>,
    /// `"invocationId":"`, just before the id.
    invocation_id: Finder<'static>,
    /// `"error":`
    error: Finder<'static>,
}

/// The searchers of [`Needles`], built on first use.
static NEEDLES: LazyLock<Needles> = LazyLock::new(|| Needles {
    chat: Finder::new(b"\"addChatMessage\""),
    arguments: Finder::new(b"\"arguments\":[\""),
    sender_end: Finder::new(b": "),
    completion: Finder::new(b"\"type\":3"),
    invocation_id: Finder::new(b"\"invocationId\":\""),
    error: Finder::new(b"\"error\":"),
});

/// Position just past the first `needle` in `hay`.
fn find_end(needle: &Finder<'_>, hay: &[u8]) -> Option<usize> {
    Some(needle.find(hay)? + needle.needle().len())
}

/// Parses `<digits><term>` at the start of `b`; returns the value and the rest after `term`.
fn parse_num(b: &[u8], term: u8) -> Option<(u64, &[u8])> {
    let mut v: u64 = 0;
    for (n, &c) in b.iter().enumerate() {
        if c == term {
            return if n == 0 { None } else { Some((v, &b[n + 1..])) };
        }
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    None
}

/// Parses the header of a payload: `<m|w><target>.<seq>.<t>.` (anything may follow).
fn parse_embedded(p: &[u8]) -> Option<Embedded> {
    let (&flag, rest) = p.split_first()?;
    let measured = match flag {
        b'm' => true,
        b'w' => false,
        _ => return None,
    };
    let (target, rest) = parse_num(rest, b'.')?;
    let (seq, rest) = parse_num(rest, b'.')?;
    let (intended_ns, _) = parse_num(rest, b'.')?;
    Some(Embedded {
        measured,
        target,
        seq,
        intended_ns,
    })
}

/// Fast path for `{"type":1,"target":"addChatMessage","arguments":["<sender>: <payload>"]}`
/// in any property order: no JSON parse, just find the argument string.
fn fast_chat(rec: &[u8]) -> Option<Embedded> {
    let n = &*NEEDLES;
    n.chat.find(rec)?;
    let arg = &rec[find_end(&n.arguments, rec)?..];
    let end = memchr2(b'"', b'\\', arg)?;
    if arg[end] != b'"' {
        return None; // escapes: leave it to the slow path
    }
    let arg = &arg[..end];
    parse_embedded(&arg[find_end(&n.sender_end, arg)?..])
}

/// Fast path for `{"type":3,"invocationId":"<n>","result":null}` (any property order).
fn fast_completion(rec: &[u8]) -> Option<Record> {
    let n = &*NEEDLES;
    n.completion.find(rec)?;
    let (id, _) = parse_num(&rec[find_end(&n.invocation_id, rec)?..], b'"')?;
    let error = n.error.find(rec).is_some();
    Some(Record::Completion {
        id: Some(id),
        error,
    })
}

/// Classifies one record (without its separator): fast paths first, then a JSON parse.
pub(crate) fn classify(rec: &[u8]) -> Record {
    if rec == b"{\"type\":6}" {
        return Record::Ping;
    }
    if let Some(e) = fast_chat(rec) {
        return Record::Chat(e);
    }
    if let Some(c) = fast_completion(rec) {
        return c;
    }
    slow_classify(rec)
}

/// Classifies a record the fast paths did not recognise, by parsing it as JSON.
fn slow_classify(rec: &[u8]) -> Record {
    let text = || String::from_utf8_lossy(rec).into_owned();
    let Ok(v) = serde_json::from_slice::<Value>(rec) else {
        return Record::Other(text());
    };
    match v.get("type").and_then(Value::as_u64) {
        Some(1) => {
            let target = v.get("target").and_then(Value::as_str).unwrap_or_default();
            let first = v
                .get("arguments")
                .and_then(Value::as_array)
                .and_then(|a| a.first())
                .and_then(Value::as_str);
            if target.eq_ignore_ascii_case("addChatMessage")
                && let Some(arg) = first
                && let Some(colon) = arg.find(": ")
                && let Some(e) = parse_embedded(&arg.as_bytes()[colon + 2..])
            {
                return Record::Chat(e);
            }
            if target.eq_ignore_ascii_case("showErrorMessage") {
                return Record::ShowError(first.unwrap_or_default().to_owned());
            }
            Record::Other(text())
        }
        Some(3) => Record::Completion {
            id: v
                .get("invocationId")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok()),
            error: v.get("error").is_some(),
        },
        Some(6) => Record::Ping,
        Some(7) => Record::Close(v.get("error").and_then(Value::as_str).map(str::to_owned)),
        _ => Record::Other(text()),
    }
}

/// Splits a text frame into records. Returns the records and whether the frame ended exactly
/// on a record boundary (the protocol requires it).
pub(crate) fn records(frame: &[u8]) -> (impl Iterator<Item = &[u8]>, bool) {
    let whole = frame.last() == Some(&RS);
    let body = if whole {
        &frame[..frame.len() - 1]
    } else {
        frame
    };
    let iter = body.split(|&b| b == RS).filter(|r| !r.is_empty());
    (iter, whole)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip_open_loop() {
        let fb = FrameBuilder::new(64);
        let f = fb.build(17, 5, 123_456_789, true, None);
        let s = f.as_str();
        assert!(s.ends_with('\u{1e}'));
        let v: Value = serde_json::from_str(s.trim_end_matches('\u{1e}')).expect("json");
        assert_eq!(v["type"], 1);
        assert!(v.get("invocationId").is_none());
        assert_eq!(v["target"], "SendChatMessage");
        assert_eq!(v["arguments"][0], "user-17");
        let payload = v["arguments"][1].as_str().expect("payload");
        assert_eq!(payload.len(), 64);
        // What the hub sends to user-17.
        let delivered = format!(
            "{{\"type\":1,\"target\":\"addChatMessage\",\"arguments\":[\"sender-3: {payload}\"]}}\u{1e}"
        );
        let (mut recs, whole) = records(delivered.as_bytes());
        assert!(whole);
        let rec = recs.next().expect("one record");
        assert_eq!(
            classify(rec),
            Record::Chat(Embedded {
                measured: true,
                target: 17,
                seq: 5,
                intended_ns: 123_456_789
            })
        );
        assert!(recs.next().is_none());
    }

    #[test]
    fn frame_closed_loop_has_invocation_id() {
        let fb = FrameBuilder::new(48);
        let f = fb.build(0, 9, u64::MAX, false, Some(42));
        let v: Value = serde_json::from_str(f.as_str().trim_end_matches('\u{1e}')).expect("json");
        assert_eq!(v["invocationId"], "42");
        let payload = v["arguments"][1].as_str().expect("payload");
        assert!(payload.len() >= 48);
        assert_eq!(
            parse_embedded(payload.as_bytes()),
            Some(Embedded {
                measured: false,
                target: 0,
                seq: 9,
                intended_ns: u64::MAX
            })
        );
    }

    #[test]
    fn several_records_per_frame_any_order() {
        let frame = b"{\"type\":6}\x1e{\"arguments\":[\"bob: m1.2.3.xx\"],\"target\":\"addChatMessage\",\"type\":1}\x1e{\"type\":3,\"invocationId\":\"7\",\"result\":null}\x1e{\"invocationId\":\"8\",\"type\":3,\"error\":\"boom\"}\x1e";
        let (recs, whole) = records(frame);
        assert!(whole);
        let got: Vec<Record> = recs.map(classify).collect();
        assert_eq!(
            got,
            vec![
                Record::Ping,
                Record::Chat(Embedded {
                    measured: true,
                    target: 1,
                    seq: 2,
                    intended_ns: 3
                }),
                Record::Completion {
                    id: Some(7),
                    error: false
                },
                Record::Completion {
                    id: Some(8),
                    error: true
                },
            ]
        );
    }

    #[test]
    fn partial_frame_is_flagged() {
        let (recs, whole) = records(b"{\"type\":6}\x1e{\"type\":");
        assert!(!whole);
        assert_eq!(recs.count(), 2);
    }

    #[test]
    fn slow_path_cases() {
        assert_eq!(
            classify(b"{\"type\":7,\"error\":\"bye\"}"),
            Record::Close(Some("bye".into()))
        );
        assert_eq!(classify(b"{ \"type\" : 6 }"), Record::Ping);
        assert_eq!(
            classify(b"{\"type\":1,\"target\":\"showErrorMessage\",\"arguments\":[\"nope\"]}"),
            Record::ShowError("nope".into())
        );
        // Case-insensitive target and whitespace go through the JSON parser.
        assert_eq!(
            classify(
                b"{\"type\": 1, \"target\": \"AddChatMessage\", \"arguments\": [\"a: w4.5.6.\"]}"
            ),
            Record::Chat(Embedded {
                measured: false,
                target: 4,
                seq: 5,
                intended_ns: 6
            })
        );
        assert!(matches!(classify(b"not json"), Record::Other(_)));
        assert!(matches!(
            classify(
                b"{\"type\":1,\"target\":\"addChatMessage\",\"arguments\":[\"someone: hello\"]}"
            ),
            Record::Other(_)
        ));
        assert!(matches!(classify(b"{\"type\":42}"), Record::Other(_)));
    }

    #[test]
    fn numbers_are_checked() {
        assert_eq!(parse_num(b"123.", b'.'), Some((123, &b""[..])));
        assert_eq!(parse_num(b".", b'.'), None);
        assert_eq!(parse_num(b"12a.", b'.'), None);
        assert_eq!(parse_num(b"99999999999999999999999.", b'.'), None);
        assert_eq!(parse_num(b"12", b'.'), None);
        assert_eq!(parse_embedded(b"x1.2.3."), None);
        assert_eq!(parse_embedded(b""), None);
    }

    #[test]
    fn fast_paths_find_their_fields() {
        let n = &*NEEDLES;
        assert_eq!(find_end(&n.sender_end, b"bob: m1."), Some(5));
        assert_eq!(find_end(&n.sender_end, b"bob m1."), None);
        assert_eq!(find_end(&n.error, b"{\"error\":\"x\"}"), Some(9));
        // An escape in the argument leaves the record to the JSON parser.
        let escaped = br#"{"type":1,"target":"addChatMessage","arguments":["a\"b: m1.2.3."]}"#;
        assert_eq!(fast_chat(escaped), None);
        assert_eq!(
            classify(escaped),
            Record::Chat(Embedded {
                measured: true,
                target: 1,
                seq: 2,
                intended_ns: 3
            })
        );
    }
}
