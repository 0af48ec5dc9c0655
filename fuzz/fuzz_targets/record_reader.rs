//! Record framing: `RecordReader::complete`, `records` and `check_size` over a sequence of
//! WebSocket frames, checked against a plain reference splitter of the concatenated input.
//!
//! Input layout: the first byte picks the record size limit, the rest is a list of frames,
//! each a length byte followed by that many bytes (the last frame takes what is left).

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use switchboard::protocol::{self, ProtocolError, RECORD_SEPARATOR, RecordReader};
use switchboard_fuzz::{Frames, Reference};

/// The record size limit for selector byte `b`: mostly small, so that both the carry-over and
/// the limit are reached within short inputs; 255 stands for "no practical limit".
fn limit(b: u8) -> usize {
    match b {
        255 => usize::MAX,
        b => usize::from(b % 64),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let max = limit(selector);
    let mut reader = RecordReader::default();
    let mut reference = Reference::default();
    let mut accepted: Vec<Vec<u8>> = Vec::new();
    for frame in Frames::new(rest) {
        let pending_before = reference.pending();
        let expected = reference.feed(frame);
        let frame = Bytes::copy_from_slice(frame);
        match reader.complete(frame.clone(), max) {
            Err(ProtocolError::TooLarge { size, limit }) => {
                // Refused exactly when the unfinished record outgrows the limit, and the error
                // reports its size.
                assert!(
                    reference.pending() > max,
                    "refused a pending record within the limit"
                );
                assert_eq!(size, reference.pending());
                assert_eq!(limit, max);
                let _ = ProtocolError::TooLarge { size, limit }.to_string();
                return;
            }
            Err(other) => panic!("unexpected error {other:?}"),
            Ok(whole) => {
                // The reader holds at most `max` bytes of an unfinished record.
                assert!(
                    reference.pending() <= max,
                    "kept {} pending bytes over a limit of {max}",
                    reference.pending()
                );
                assert_eq!(reader.has_partial(), reference.pending() > 0);
                // Whole records only: empty, or ending with a separator.
                assert!(whole.is_empty() || whole.last() == Some(&RECORD_SEPARATOR));
                // Zero-copy in the common case: nothing pending and the frame ends a record.
                if pending_before == 0 && frame.last() == Some(&RECORD_SEPARATOR) {
                    assert_eq!(whole.as_ptr(), frame.as_ptr());
                    assert_eq!(whole.len(), frame.len());
                }
                let got: Vec<&[u8]> = protocol::records(&whole).collect();
                assert_eq!(got, expected, "records differ from the reference splitter");
                for record in got {
                    assert!(!record.is_empty());
                    assert!(!record.contains(&RECORD_SEPARATOR));
                    match protocol::check_size(record, max) {
                        Ok(()) => {
                            assert!(record.len() <= max);
                            accepted.push(record.to_vec());
                        }
                        Err(ProtocolError::TooLarge { size, limit }) => {
                            assert!(record.len() > max);
                            assert_eq!((size, limit), (record.len(), max));
                            // The session closes the connection at the first refused record.
                            return;
                        }
                        Err(other) => panic!("unexpected error {other:?}"),
                    }
                }
            }
        }
    }
    // Without any error, the records accepted so far are exactly the reference's records of
    // the concatenated input.
    assert_eq!(accepted, reference.records(), "accepted records differ");
});
