//! The backplane wire encoding: `Message::decode` over arbitrary bytes, as a node receives
//! them from a broker. Nothing panics; every refusal is `Corrupt`; whatever is accepted is
//! the canonical encoding of the message decoded (`encode` gives back the input byte for
//! byte), its payload is a slice of the input, and the input without its last byte is
//! refused. Then the input itself, carried as a payload, survives `encode` and `decode`.
//!
//! Input layout: one encoded message.

#![no_main]

use std::sync::Arc;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use switchboard_core::{Address, BackplaneError, ConnectionId, Message, MessageId, NodeId};

fuzz_target!(|data: &[u8]| {
    let input = Bytes::copy_from_slice(data);
    match Message::decode(input.clone()) {
        Ok(message) => {
            assert_eq!(message.encode(), input, "accepted input is not canonical");
            let range = input.as_ptr_range();
            if !message.payload.is_empty() {
                assert!(
                    range.contains(&message.payload.as_ptr()),
                    "payload was copied"
                );
                assert_eq!(message.payload.as_ptr_range().end, range.end);
            }
            let shorter = input.slice(..input.len() - 1);
            assert!(
                Message::decode(shorter).is_err(),
                "a truncated message was accepted"
            );
        }
        Err(BackplaneError::Corrupt(reason)) => assert!(!reason.is_empty()),
        Err(other) => panic!("decode failed with {other:?}, not Corrupt"),
    }

    let name = String::from_utf8_lossy(&data[..data.len().min(40)]);
    let connections = data
        .chunks(8)
        .take(4)
        .filter_map(|chunk| {
            let token: String = chunk.iter().map(|&b| char::from(b'a' + b % 26)).collect();
            ConnectionId::new(&token).ok()
        })
        .collect();
    let carried = Message::new(
        MessageId {
            origin: NodeId::new("fuzz").expect("a valid node id"),
            seq: data.len() as u64,
        },
        Address::Group(Arc::from(name.as_ref())),
        connections,
        input,
    );
    let decoded = Message::decode(carried.encode()).expect("an encoded message decodes");
    assert_eq!(decoded, carried);
});
