//! SignalR stateful reconnect: a client whose socket drops re-attaches to the same connection,
//! gets a Sequence and every unacknowledged record, and nothing is lost or duplicated.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{TestServer, ask_for_stateful, attach, connect_stateful, negotiate_stateful};
use serde_json::{Value, json};
use switchboard::HubOptions;
use switchboard_core::UserId;
use switchboard_memory::MemoryStore;

fn options(window: Duration) -> HubOptions {
    HubOptions::default().with_stateful_reconnect(true, window)
}

fn chat(text: &str) -> Value {
    json!({"type": 1, "target": "addChatMessage", "arguments": [text]})
}

#[tokio::test]
async fn stateful_reconnect_is_only_offered_when_asked() {
    let server = TestServer::start(options(Duration::from_secs(5))).await;
    assert!(
        server
            .negotiate("alice")
            .await
            .get("useStatefulReconnect")
            .is_none()
    );
    negotiate_stateful(&server, "alice").await;
    let off = TestServer::start(
        HubOptions::default().with_stateful_reconnect(false, Duration::from_secs(5)),
    )
    .await;
    let answer = ask_for_stateful(&off, "alice").await;
    assert!(answer.get("useStatefulReconnect").is_none(), "{answer}");
}

#[tokio::test]
async fn a_dropped_socket_reattaches_and_gets_everything_it_missed() {
    let reconnected = Arc::new(AtomicUsize::new(0));
    let counter = reconnected.clone();
    let hub = switchboard::chat::hub().on_reconnected(move |_ctx| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    let server = TestServer::start_with(
        hub,
        Arc::new(MemoryStore::new()),
        options(Duration::from_secs(10)),
    )
    .await;
    let (token, mut bob) = connect_stateful(&server, "bob").await;
    let mut alice = server.connect("alice").await;
    server.wait_for_connections(2).await;

    // Server trackable #1: a message; bob acknowledges it.
    alice
        .invoke("1", "SendChatMessage", json!(["bob", "one"]))
        .await;
    assert_eq!(
        bob.next_message().await.expect("message"),
        chat("alice: one")
    );
    bob.send_record(r#"{"type":8,"sequenceId":1}"#).await;
    // Bob's trackable #1: an invocation; its Completion is server trackable #2 (unacked).
    let completion = bob
        .invoke("b1", "SendChatMessage", json!(["bob", "self"]))
        .await;
    assert!(completion.get("error").is_none());

    // The socket dies without a Close message.
    drop(bob);
    // Meanwhile bob still counts as connected: alice's messages are kept for him.
    alice
        .invoke("2", "SendChatMessage", json!(["bob", "two"]))
        .await;
    alice
        .invoke("3", "SendChatMessage", json!(["bob", "three"]))
        .await;
    let bob_id = UserId::new("bob").expect("user");
    assert_eq!(
        server
            .store
            .connections(&bob_id)
            .await
            .expect("lookup")
            .len(),
        1
    );

    // Re-attach: no handshake; the server's Sequence names the oldest unacked record (#2),
    // then everything from there is replayed in order.
    let mut bob = attach(&server, "bob", &token).await;
    let mut replay = Vec::new();
    while replay.len() < 5 {
        replay.extend(bob.next_records().await.expect("replay"));
    }
    assert_eq!(replay[0], json!({"type": 9, "sequenceId": 2}));
    assert_eq!(replay[1], chat("bob: self"));
    assert_eq!(replay[2]["invocationId"], "b1");
    assert_eq!(replay[3], chat("alice: two"));
    assert_eq!(replay[4], chat("alice: three"));

    // The client re-sends from its oldest unacked record (#1, never acknowledged): the server
    // must not run it twice, and new records go on normally.
    bob.send_record(r#"{"type":9,"sequenceId":1}"#).await;
    bob.send_record(
        r#"{"type":1,"invocationId":"b1","target":"SendChatMessage","arguments":["bob","self"]}"#,
    )
    .await;
    bob.send_record(
        r#"{"type":1,"invocationId":"b2","target":"SendChatMessage","arguments":["alice","back"]}"#,
    )
    .await;
    let mut after = Vec::new();
    loop {
        let message = bob.next_message().await.expect("messages");
        let done = message["invocationId"] == "b2";
        if message["type"] != 8 {
            after.push(message);
        }
        if done {
            break;
        }
    }
    // Had the duplicate run again, "bob: self" and a second b1 Completion would come first.
    assert_eq!(
        after,
        [json!({"type": 3, "invocationId": "b2", "result": null})]
    );
    assert_eq!(
        alice.next_message().await.expect("message"),
        chat("bob: back")
    );
    assert_eq!(reconnected.load(Ordering::SeqCst), 1);
    assert_eq!(
        server
            .store
            .connections(&bob_id)
            .await
            .expect("lookup")
            .len(),
        1
    );
}

#[tokio::test]
async fn the_server_acknowledges_what_it_received() {
    let server = TestServer::start(options(Duration::from_secs(5))).await;
    let (_token, mut bob) = connect_stateful(&server, "bob").await;
    bob.invoke("1", "SendChatMessage", json!(["nobody", "x"]))
        .await;
    bob.invoke("2", "SendChatMessage", json!(["nobody", "y"]))
        .await;
    loop {
        let message = bob.next_message().await.expect("an Ack");
        if message["type"] == 8 {
            assert_eq!(message["sequenceId"], 2);
            break;
        }
    }
}

#[tokio::test]
async fn a_client_that_does_not_come_back_is_disconnected_after_the_window() {
    let server = TestServer::start(options(Duration::from_millis(300))).await;
    let (token, bob) = connect_stateful(&server, "bob").await;
    server.wait_for_connections(1).await;
    drop(bob);
    server.wait_for_connections(0).await;
    assert_eq!(server.attach_refusal(&token, "bob").await, Some(404));
}

#[tokio::test]
async fn a_version_1_handshake_turns_stateful_reconnect_off() {
    let server = TestServer::start(options(Duration::from_secs(5))).await;
    let token = negotiate_stateful(&server, "bob").await;
    let mut bob = attach(&server, "bob", &token).await;
    bob.handshake().await; // version 1
    server.wait_for_connections(1).await;
    assert_eq!(server.attach_refusal(&token, "bob").await, Some(409));
    drop(bob);
    server.wait_for_connections(0).await;
}

#[tokio::test]
async fn only_the_same_user_can_reattach() {
    let server = TestServer::start(options(Duration::from_secs(5))).await;
    let (token, bob) = connect_stateful(&server, "bob").await;
    drop(bob);
    assert_eq!(server.attach_refusal(&token, "mallory").await, Some(403));
    assert_eq!(
        server.open(&format!("?id={token}"), None).await.err(),
        Some(401)
    );
}

#[tokio::test]
async fn a_sequence_beyond_what_was_received_is_fatal() {
    let server = TestServer::start(options(Duration::from_secs(5))).await;
    let (token, bob) = connect_stateful(&server, "bob").await;
    drop(bob);
    let mut bob = attach(&server, "bob", &token).await;
    let sequence = bob.next_message().await.expect("sequence");
    assert_eq!(sequence, json!({"type": 9, "sequenceId": 1}));
    bob.send_record(r#"{"type":9,"sequenceId":5}"#).await;
    let close = bob.expect_close().await;
    assert_eq!(
        close["error"],
        "Sequence ID greater than amount of messages we've received."
    );
    server.wait_for_connections(0).await;
}
