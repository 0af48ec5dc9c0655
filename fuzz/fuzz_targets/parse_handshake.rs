//! The handshake parser, `protocol::parse_handshake`, on arbitrary records: it never panics,
//! accepts only `{"protocol":"json","version":N}` with an integer N up to 2, as ASP.NET Core
//! does (in any member order, with any other members), answers 2 for 2 and 1 below, and agrees
//! with a model written against a plain reading of the JSON object.

#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::protocol::{self, ProtocolError};
use switchboard_fuzz::Members;

/// The version the model expects to be accepted, `None` for a refused handshake.
fn model(record: &[u8]) -> Option<u8> {
    let members = Members::parse(record)?;
    let protocol: Option<String> = members.typed("protocol")?;
    let version: Option<i64> = members.typed("version")?;
    match (protocol?.as_str(), version?) {
        ("json", 2) => Some(2),
        ("json", v) if v < 2 => Some(1),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    // Records arrive in WebSocket text frames, which are valid UTF-8. On other bytes the parser
    // only has to stay panic-free (serde skips unknown members without checking their text).
    let utf8 = std::str::from_utf8(data).is_ok();
    let expected = model(data);
    match protocol::parse_handshake(data) {
        Ok(version) => {
            assert!(version == 1 || version == 2, "version {version}");
            let first = data.iter().find(|b| !b.is_ascii_whitespace());
            assert_eq!(
                first,
                Some(&b'{'),
                "accepted a handshake that is not a JSON object"
            );
            if utf8 {
                assert_eq!(Some(version), expected, "accepted what the model refuses");
            }
        }
        Err(err) => {
            assert!(matches!(err, ProtocolError::Handshake(_)), "{err:?}");
            // The refusal is sent to the client as a JSON record: it must stay one record.
            let response = protocol::handshake_error(&err.to_string());
            let body = response
                .strip_suffix('\u{1e}')
                .expect("ends with a separator");
            assert!(
                !body.contains('\u{1e}'),
                "the error splits into two records"
            );
            let parsed: serde_json::Value = serde_json::from_str(body).expect("valid JSON");
            assert!(parsed["error"].is_string());
            assert_eq!(expected, None, "refused a handshake the model accepts");
        }
    }
});
