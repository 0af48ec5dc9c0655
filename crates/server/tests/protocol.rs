//! The SignalR JSON hub protocol against raw WebSocket frames: the happy path, and a clear
//! error for every kind of bad input — never a panic, a silent drop or a hang.

mod common;

use std::time::Duration;

use common::TestServer;
use futures_util::SinkExt;
use serde_json::json;
use switchboard::HubOptions;
use tokio_tungstenite::tungstenite::Message;

fn options() -> HubOptions {
    HubOptions::default()
}

#[tokio::test]
async fn handshake_then_invocation_gets_exactly_one_completion() {
    let server = TestServer::start(options()).await;
    let mut alice = server.connect("alice").await;
    let completion = alice
        .invoke("0", "SendChatMessage", json!(["alice", "hi me"]))
        .await;
    assert_eq!(
        completion,
        json!({"type": 3, "invocationId": "0", "result": null})
    );
}

#[tokio::test]
async fn handshake_version_2_is_accepted() {
    let server = TestServer::start(options()).await;
    let mut client = server.open_as("alice").await;
    client
        .send_record(r#"{"protocol":"json","version":2}"#)
        .await;
    assert_eq!(client.next_text().await.as_deref(), Some("{}\u{1e}"));
}

#[tokio::test]
async fn every_handshake_version_up_to_2_is_accepted_as_asp_net_core_does() {
    // Python's `signalrcore` sends version 0 by default.
    let server = TestServer::start(options()).await;
    for version in [0, 1, 2] {
        let mut client = server.open_as("alice").await;
        client
            .send_record(&format!(r#"{{"protocol":"json","version":{version}}}"#))
            .await;
        assert_eq!(
            client.next_text().await.as_deref(),
            Some("{}\u{1e}"),
            "version {version}"
        );
        let completion = client
            .invoke("1", "SendChatMessage", json!(["alice", "hi"]))
            .await;
        assert!(
            completion.get("error").is_none(),
            "version {version}: {completion}"
        );
    }
}

#[tokio::test]
async fn a_messagepack_handshake_in_a_binary_frame_is_told_messagepack_is_not_supported() {
    // What both popular Python clients send when asked for MessagePack.
    let server = TestServer::start(options()).await;
    let mut client = server.open_as("alice").await;
    client
        .ws
        .send(Message::binary(
            b"{\"protocol\":\"messagepack\",\"version\":1}\x1e".to_vec(),
        ))
        .await
        .expect("send");
    let reply = client.next_text().await.expect("handshake error");
    assert!(
        reply.contains("The protocol 'messagepack' is not supported; this server speaks 'json'."),
        "{reply}"
    );
    assert!(client.next_text().await.is_none(), "the socket closes");
}

#[tokio::test]
async fn messagepack_is_refused_in_the_handshake() {
    let server = TestServer::start(options()).await;
    let mut client = server.open_as("alice").await;
    client
        .send_record(r#"{"protocol":"messagepack","version":1}"#)
        .await;
    let reply = client.next_text().await.expect("handshake error");
    let error: serde_json::Value =
        serde_json::from_str(reply.trim_end_matches('\u{1e}')).expect("JSON");
    assert!(
        error["error"]
            .as_str()
            .expect("error text")
            .contains("'messagepack' is not supported"),
        "{error}"
    );
    assert!(
        error.get("type").is_none(),
        "a handshake response has no type"
    );
    assert!(client.next_text().await.is_none(), "the socket closes");
    server.wait_for_connections(0).await;
}

#[tokio::test]
async fn unsupported_handshake_version_and_garbage_handshakes_are_refused() {
    let server = TestServer::start(options()).await;
    for handshake in [
        r#"{"protocol":"json","version":3}"#,
        r#"{"type":1,"target":"x","arguments":[]}"#,
        "definitely not json",
    ] {
        let mut client = server.open_as("alice").await;
        client.send_record(handshake).await;
        let reply = client.next_text().await.expect("handshake error");
        assert!(reply.starts_with("{\"error\":"), "{handshake} → {reply}");
        assert!(client.next_text().await.is_none());
    }
}

#[tokio::test]
async fn a_missing_handshake_times_out_with_an_error() {
    let server =
        TestServer::start(options().with_handshake_timeout(Duration::from_millis(200))).await;
    let mut client = server.open_as("alice").await;
    let reply = client.next_text().await.expect("handshake error");
    assert!(reply.contains("Handshake was not received"), "{reply}");
    assert!(client.next_text().await.is_none());
}

#[tokio::test]
async fn malformed_json_closes_with_a_clear_error() {
    let server = TestServer::start(options()).await;
    let mut client = server.connect("alice").await;
    server.wait_for_connections(1).await;
    client.send_text("{\"type\":1,\"target\":\u{1e}").await;
    let error = client.close_error().await;
    assert!(error.starts_with("Invalid message"), "{error}");
    server.wait_for_connections(0).await;
}

#[tokio::test]
async fn records_without_a_type_or_with_bad_fields_close_with_an_error() {
    let server = TestServer::start(options()).await;
    for bad in [
        r#"{"target":"SendChatMessage","arguments":[]}"#,
        r#"{"type":1,"arguments":[]}"#,
        r#"{"type":1,"target":"SendChatMessage","arguments":"nope"}"#,
        r#"{"type":1,"target":"SendChatMessage","arguments":[],"invocationId":""}"#,
        "[1,2,3]",
    ] {
        let mut client = server.connect("alice").await;
        client.send_record(bad).await;
        let error = client.close_error().await;
        assert!(error.starts_with("Invalid message"), "{bad} → {error}");
    }
}

#[tokio::test]
async fn an_oversized_record_closes_with_a_clear_error() {
    let server = TestServer::start(options().with_max_record_size(1024)).await;
    let mut client = server.connect("alice").await;
    let big = format!(
        r#"{{"type":1,"target":"SendChatMessage","arguments":["bob","{}"]}}"#,
        "x".repeat(2000)
    );
    client.send_record(&big).await;
    let error = client.close_error().await;
    assert!(error.starts_with("Message too large"), "{error}");
    assert!(error.contains("1024"), "{error}");
}

#[tokio::test]
async fn an_unterminated_oversized_record_is_refused_too() {
    let server = TestServer::start(options().with_max_record_size(1024)).await;
    let mut client = server.connect("alice").await;
    client.send_text(&"x".repeat(700)).await;
    client.send_text(&"x".repeat(700)).await;
    let close = client.expect_close().await;
    assert!(
        close["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("Message too large"))
    );
}

#[tokio::test]
async fn a_frame_beyond_the_transport_limit_ends_the_connection_cleanly() {
    let server = TestServer::start(options().with_max_record_size(1024)).await;
    let mut client = server.connect("alice").await;
    server.wait_for_connections(1).await;
    // Four times the record limit is the WebSocket message limit.
    client.send_text(&"y".repeat(10 * 1024)).await;
    // Whatever the transport says first, the connection ends and is cleaned up.
    while client.next_text().await.is_some() {}
    server.wait_for_connections(0).await;
}

#[tokio::test]
async fn binary_frames_close_with_a_clear_error() {
    let server = TestServer::start(options()).await;
    let mut client = server.connect("alice").await;
    client
        .ws
        .send(Message::binary(vec![0x91, 0x06]))
        .await
        .expect("send");
    let close = client.expect_close().await;
    assert!(
        close["error"]
            .as_str()
            .is_some_and(|e| e.contains("Binary frames are not supported")),
        "{close}"
    );
}

#[tokio::test]
async fn unknown_methods_get_an_error_completion_and_the_connection_survives() {
    let server = TestServer::start(options()).await;
    let mut client = server.connect("alice").await;
    let completion = client.invoke("1", "NoSuchMethod", json!([1, 2])).await;
    assert_eq!(completion["error"], "Unknown hub method 'NoSuchMethod'");
    assert!(completion.get("result").is_none());
    let completion = client
        .invoke("2", "SendChatMessage", json!(["alice", "still here"]))
        .await;
    assert_eq!(completion["result"], serde_json::Value::Null);
    assert!(completion.get("error").is_none());
}

#[tokio::test]
async fn method_names_match_case_insensitively() {
    let server = TestServer::start(options()).await;
    let mut client = server.connect("alice").await;
    let completion = client
        .invoke("1", "sendchatmessage", json!(["alice", "lower"]))
        .await;
    assert!(completion.get("error").is_none(), "{completion}");
}

#[tokio::test]
async fn wrong_argument_counts_and_types_get_an_error_completion() {
    let server = TestServer::start(options()).await;
    let mut client = server.connect("alice").await;
    for (id, args) in [
        ("1", json!(["only-one"])),
        ("2", json!(["a", "b", "c"])),
        ("3", json!([1, "text"])),
        ("4", json!([])),
    ] {
        let completion = client.invoke(id, "SendChatMessage", args.clone()).await;
        let error = completion["error"].as_str().expect("an error");
        assert!(
            error.starts_with("Failed to invoke 'SendChatMessage'"),
            "{args} → {error}"
        );
    }
    let completion = client
        .invoke("5", "SendChatMessage", json!(["alice", "ok"]))
        .await;
    assert!(completion.get("error").is_none());
}

#[tokio::test]
async fn invocations_without_an_id_never_get_an_answer() {
    let server = TestServer::start(options()).await;
    let mut client = server.connect("alice").await;
    // Unknown method, bad arguments and a good call, all without an id...
    client
        .send_record(r#"{"type":1,"target":"Nope","arguments":[]}"#)
        .await;
    client
        .send_record(r#"{"type":1,"target":"SendChatMessage","arguments":[1]}"#)
        .await;
    client
        .send_record(r#"{"type":1,"target":"SendChatMessage","arguments":["bob","x"]}"#)
        .await;
    // ...then one with an id: the only Completion must be that one, after the error message
    // the good call produced for the offline user.
    client
        .send_record(
            r#"{"type":1,"invocationId":"9","target":"SendChatMessage","arguments":["alice","x"]}"#,
        )
        .await;
    let mut seen = Vec::new();
    loop {
        let message = client.next_message().await.expect("messages");
        if message["type"] == 3 {
            assert_eq!(message["invocationId"], "9");
            break;
        }
        seen.push(message);
    }
    assert_eq!(
        seen,
        [
            json!({"type":1,"target":"showErrorMessage","arguments":["The user 'bob' is not connected."]}),
            json!({"type":1,"target":"addChatMessage","arguments":["alice: x"]}),
        ]
    );
}

#[tokio::test]
async fn several_records_in_one_frame_and_records_split_across_frames() {
    let server = TestServer::start(options()).await;
    let mut client = server.connect("alice").await;
    let one =
        r#"{"type":1,"invocationId":"a","target":"SendChatMessage","arguments":["alice","1"]}"#;
    let two = r#"{"arguments":["alice","2"],"target":"SendChatMessage","invocationId":"b","type":1,"headers":{"x":"y"}}"#;
    client
        .send_text(&format!("{one}\u{1e}{two}\u{1e}{{\"type\":6}}\u{1e}"))
        .await;
    let (head, tail) = one.split_at(20);
    client.send_text(head).await;
    client.send_text(&format!("{tail}\u{1e}")).await;
    let mut completions = Vec::new();
    while completions.len() < 3 {
        let message = client.next_message().await.expect("messages");
        if message["type"] == 3 {
            completions.push(message["invocationId"].as_str().expect("id").to_owned());
        }
    }
    assert_eq!(completions, ["a", "b", "a"]);
}

#[tokio::test]
async fn streaming_requests_are_refused_with_error_completions() {
    let server = TestServer::start(options()).await;
    let mut client = server.connect("alice").await;
    client
        .send_record(r#"{"type":4,"invocationId":"s1","target":"SendChatMessage","arguments":[]}"#)
        .await;
    let completion = client.next_message().await.expect("completion");
    assert_eq!(completion["invocationId"], "s1");
    assert!(
        completion["error"]
            .as_str()
            .is_some_and(|e| e.contains("streaming"))
    );
    let completion = client
        .invoke("s2", "SendChatMessage", json!(["alice", "x"]))
        .await;
    assert!(completion.get("error").is_none());
    let record = json!({"type":1,"invocationId":"s3","target":"SendChatMessage","arguments":["alice","x"],"streamIds":["0"]});
    client.send_record(&record.to_string()).await;
    let completion = client.next_message().await.expect("completion");
    assert_eq!(completion["invocationId"], "s3");
    assert!(
        completion["error"]
            .as_str()
            .is_some_and(|e| e.contains("streaming"))
    );
}

#[tokio::test]
async fn unknown_message_types_cancellations_and_acks_are_ignored() {
    let server = TestServer::start(options()).await;
    let mut client = server.connect("alice").await;
    for record in [
        r#"{"type":42,"whatever":true}"#,
        r#"{"type":5,"invocationId":"nope"}"#,
        r#"{"type":3,"invocationId":"nope","result":1}"#,
        r#"{"type":8,"sequenceId":1}"#,
        r#"{"type":6}"#,
    ] {
        client.send_record(record).await;
    }
    let completion = client
        .invoke("1", "SendChatMessage", json!(["alice", "x"]))
        .await;
    assert!(completion.get("error").is_none());
}

#[tokio::test]
async fn the_server_pings_an_idle_connection() {
    let server =
        TestServer::start(options().with_keep_alive_interval(Duration::from_millis(100))).await;
    let mut client = server.connect("alice").await;
    let records = client.next_records().await.expect("a ping");
    assert_eq!(records, [json!({"type": 6})]);
}

#[tokio::test]
async fn a_silent_client_times_out_with_an_error_and_is_removed() {
    let server = TestServer::start(
        options()
            .with_client_timeout(Duration::from_millis(300))
            .with_keep_alive_interval(Duration::from_millis(100)),
    )
    .await;
    let mut client = server.connect("alice").await;
    server.wait_for_connections(1).await;
    let close = client.expect_close().await;
    assert!(
        close["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("Client timeout")),
        "{close}"
    );
    server.wait_for_connections(0).await;
}

#[tokio::test]
async fn a_client_close_message_ends_the_connection() {
    let server = TestServer::start(options()).await;
    let mut client = server.connect("alice").await;
    server.wait_for_connections(1).await;
    client.send_record(r#"{"type":7}"#).await;
    assert!(client.next_text().await.is_none());
    server.wait_for_connections(0).await;
}

#[tokio::test]
async fn a_dropped_tcp_connection_is_cleaned_up() {
    let server = TestServer::start(options()).await;
    let client = server.connect("alice").await;
    server.wait_for_connections(1).await;
    drop(client);
    server.wait_for_connections(0).await;
}

#[tokio::test]
async fn shutdown_closes_connections_with_a_close_message_and_empties_the_store() {
    let mut server = TestServer::start(options()).await;
    let mut a = server.connect("alice").await;
    let mut b = server.connect("bob").await;
    server.wait_for_connections(2).await;
    let stopping = async {
        server.stop().await;
    };
    let (_, close_a, close_b) = tokio::join!(stopping, a.expect_close(), b.expect_close());
    assert_eq!(close_a, json!({"type": 7, "allowReconnect": true}));
    assert_eq!(close_b, json!({"type": 7, "allowReconnect": true}));
    let counts = server.store.counts().await.expect("counts");
    assert_eq!(counts.connections, 0);
}

#[tokio::test]
async fn frames_always_end_on_record_boundaries_under_load() {
    let server = TestServer::start(options()).await;
    let mut receiver = server.connect("bob").await;
    let mut sender = server.connect("alice").await;
    let burst: String = (0..200)
        .map(|i| {
            format!(
                r#"{{"type":1,"target":"SendChatMessage","arguments":["bob","m{i}"]}}{}"#,
                '\u{1e}'
            )
        })
        .collect();
    sender.send_text(&burst).await;
    let mut received = Vec::new();
    while received.len() < 200 {
        // next_records asserts every frame ends on a separator.
        for record in receiver.next_records().await.expect("records") {
            if record["type"] == 1 {
                received.push(record["arguments"][0].as_str().expect("text").to_owned());
            }
        }
    }
    let expected: Vec<String> = (0..200).map(|i| format!("alice: m{i}")).collect();
    assert_eq!(received, expected, "in order, exactly once");
}
