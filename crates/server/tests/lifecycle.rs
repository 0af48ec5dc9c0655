//! The hub lifecycle wired to the store: exactly-once delivery to every connection of a user,
//! `on_disconnected` on every exit path, a store that goes away, and clients that stop reading.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{FlakyStore, TestServer, chat, messages};
use serde_json::json;
use switchboard::HubOptions;
use switchboard::hub::{Hub, HubContext, HubError};
use switchboard_core::UserId;
use switchboard_memory::MemoryStore;

#[tokio::test]
async fn a_message_reaches_every_connection_of_the_user_exactly_once() {
    let server = TestServer::start(HubOptions::default()).await;
    let mut bobs = Vec::new();
    for _ in 0..3 {
        bobs.push(server.connect("bob").await);
    }
    let mut carol = server.connect("carol").await;
    let mut alice = server.connect("alice").await;
    server.wait_for_connections(5).await;

    alice
        .invoke("1", "SendChatMessage", json!(["bob", "hello"]))
        .await;
    // A marker sent afterwards to both users: per-connection order is FIFO, so each bob
    // connection must see exactly [hello, marker] and carol exactly [marker].
    alice
        .invoke("2", "SendChatMessage", json!(["bob", "marker"]))
        .await;
    alice
        .invoke("3", "SendChatMessage", json!(["carol", "marker"]))
        .await;
    for bob in &mut bobs {
        assert_eq!(
            messages(bob, 2).await,
            [chat("alice: hello"), chat("alice: marker")]
        );
    }
    assert_eq!(messages(&mut carol, 1).await, [chat("alice: marker")]);
}

#[tokio::test]
async fn sending_to_an_offline_user_tells_only_the_caller() {
    let server = TestServer::start(HubOptions::default()).await;
    let mut bob = server.connect("bob").await;
    let mut alice = server.connect("alice").await;
    let mut alice_phone = server.connect("alice").await;
    alice
        .send_record(
            r#"{"type":1,"invocationId":"1","target":"SendChatMessage","arguments":["nobody","are you there?"]}"#,
        )
        .await;
    // The caller is told, before its Completion.
    assert_eq!(
        messages(&mut alice, 2).await,
        [
            json!({"type": 1, "target": "showErrorMessage", "arguments": ["The user 'nobody' is not connected."]}),
            json!({"type": 3, "invocationId": "1", "result": null}),
        ],
        "the call itself succeeds, after the error message"
    );
    alice
        .invoke("2", "SendChatMessage", json!(["bob", "marker"]))
        .await;
    alice
        .invoke("3", "SendChatMessage", json!(["alice", "marker"]))
        .await;
    assert_eq!(messages(&mut bob, 1).await, [chat("alice: marker")]);
    // The caller saw the error before its Completion; the other device did not.
    assert_eq!(messages(&mut alice_phone, 1).await, [chat("alice: marker")]);
}

#[tokio::test]
async fn a_user_who_left_is_offline_again() {
    let server = TestServer::start(HubOptions::default()).await;
    let bob = server.connect("bob").await;
    let mut alice = server.connect("alice").await;
    server.wait_for_connections(2).await;
    drop(bob);
    server.wait_for_connections(1).await;
    alice
        .send_record(
            r#"{"type":1,"invocationId":"1","target":"SendChatMessage","arguments":["bob","hi"]}"#,
        )
        .await;
    let error = alice.next_message().await.expect("error message");
    assert_eq!(
        error,
        json!({"type":1,"target":"showErrorMessage","arguments":["The user 'bob' is not connected."]})
    );
}

#[derive(Default)]
struct Hooks {
    connected: AtomicUsize,
    disconnected: AtomicUsize,
}

fn hooked_hub(hooks: &Arc<Hooks>) -> Hub {
    let on_connect = hooks.clone();
    let on_disconnect = hooks.clone();
    switchboard::chat::hub()
        .method("Boom", |_ctx: HubContext, (): ()| async move {
            if true {
                panic!("a bug in a hub method");
            }
            Ok::<(), HubError>(())
        })
        .on_connected(move |_ctx| {
            let hooks = on_connect.clone();
            async move {
                hooks.connected.fetch_add(1, Ordering::SeqCst);
            }
        })
        .on_disconnected(move |_ctx| {
            let hooks = on_disconnect.clone();
            async move {
                hooks.disconnected.fetch_add(1, Ordering::SeqCst);
            }
        })
}

async fn wait_for(hooks: &Hooks, disconnected: usize) {
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    while hooks.disconnected.load(Ordering::SeqCst) != disconnected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "on_disconnected ran {} times, expected {disconnected}",
            hooks.disconnected.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn on_disconnected_runs_on_every_exit_path() {
    let hooks = Arc::new(Hooks::default());
    let mut server = TestServer::start_with(
        hooked_hub(&hooks),
        Arc::new(MemoryStore::new()),
        HubOptions::default().with_client_timeout(Duration::from_millis(400)),
    )
    .await;

    // 1. The client sends Close.
    let mut client = server.connect("u").await;
    client.send_record(r#"{"type":7}"#).await;
    wait_for(&hooks, 1).await;

    // 2. The socket drops without any goodbye.
    let client = server.connect("u").await;
    server.wait_for_connections(1).await;
    drop(client);
    wait_for(&hooks, 2).await;

    // 3. A protocol error.
    let mut client = server.connect("u").await;
    client.send_text("nonsense\u{1e}").await;
    client.expect_close().await;
    wait_for(&hooks, 3).await;

    // 4. A panic inside a hub method: the caller gets an error, the connection lives on, and
    //    its disconnect still runs later.
    let mut client = server.connect("u").await;
    let completion = client.invoke("1", "Boom", json!([])).await;
    assert_eq!(
        completion["error"],
        "An unexpected error occurred invoking 'Boom' on the server."
    );
    let completion = client
        .invoke("2", "SendChatMessage", json!(["u", "alive"]))
        .await;
    assert!(completion.get("error").is_none());
    assert_eq!(hooks.disconnected.load(Ordering::SeqCst), 3);
    drop(client);
    wait_for(&hooks, 4).await;

    // 5. A silent client times out.
    let mut client = server.connect("u").await;
    client.expect_close().await;
    wait_for(&hooks, 5).await;

    // 6. Server shutdown.
    let mut client = server.connect("u").await;
    server.wait_for_connections(1).await;
    let (_, close) = tokio::join!(server.stop(), client.expect_close());
    assert_eq!(close["allowReconnect"], true);
    wait_for(&hooks, 6).await;

    assert_eq!(hooks.connected.load(Ordering::SeqCst), 6);
    assert_eq!(server.store.counts().await.expect("counts").connections, 0);
}

#[tokio::test]
async fn a_store_that_went_away_gives_clear_errors_and_loses_nothing() {
    let store = Arc::new(FlakyStore::default());
    let server = TestServer::start_with(
        switchboard::chat::hub(),
        store.clone(),
        HubOptions::default(),
    )
    .await;
    let mut bob = server.connect("bob").await;
    let mut alice = server.connect("alice").await;

    store.down.store(true, Ordering::SeqCst);
    // A call that needs the store fails with a clear, retryable error; the connection stays.
    let completion = alice
        .invoke("1", "SendChatMessage", json!(["bob", "lost?"]))
        .await;
    assert_eq!(
        completion["error"],
        "Failed to invoke 'SendChatMessage': the connection store is unavailable; try again later."
    );
    // A new connection cannot be recorded: it is refused with a Close it may retry after.
    let mut late = server
        .open("", Some(&server.token("carol")))
        .await
        .expect("authorized");
    late.handshake().await;
    let close = late.expect_close().await;
    assert_eq!(
        close,
        json!({
            "type": 7,
            "error": "The connection store is unavailable; try again later.",
            "allowReconnect": true
        })
    );

    store.down.store(false, Ordering::SeqCst);
    alice
        .invoke("2", "SendChatMessage", json!(["bob", "back"]))
        .await;
    assert_eq!(
        bob.next_message().await.expect("message"),
        chat("alice: back"),
        "the failed message was reported, not silently delivered later"
    );
}

#[tokio::test]
async fn a_refusal_or_a_permanent_store_error_is_a_clear_error_without_a_retry_invitation() {
    let store = Arc::new(FlakyStore::default());
    let server = TestServer::start_with(
        switchboard::chat::hub(),
        store.clone(),
        HubOptions::default(),
    )
    .await;
    for (flag, expected) in [
        (&store.refusing, "You are banned from this chat."),
        (&store.broken, "The server could not record the connection."),
    ] {
        flag.store(true, Ordering::SeqCst);
        let mut client = server.open_as("carol").await;
        client
            .send_record(r#"{"protocol":"json","version":1}"#)
            .await;
        // A handshake error: the client's start() fails with the reason and it does not
        // reconnect by itself.
        let reply = client.next_text().await.expect("handshake answer");
        assert_eq!(reply, format!("{}\u{1e}", json!({ "error": expected })));
        assert!(client.next_text().await.is_none(), "the socket closes");
        flag.store(false, Ordering::SeqCst);
    }
    server.wait_for_connections(0).await;
    let _carol = server.connect("carol").await;
}

#[tokio::test]
async fn a_store_that_hangs_never_hangs_a_connect_or_a_call() {
    let store = Arc::new(FlakyStore::default());
    let server = TestServer::start_with(
        switchboard::chat::hub(),
        store.clone(),
        HubOptions::default().with_store_timeout(Duration::from_millis(300)),
    )
    .await;
    let mut alice = server.connect("alice").await;
    store.hung.store(true, Ordering::SeqCst);
    let completion = alice
        .invoke("1", "SendChatMessage", json!(["bob", "anyone?"]))
        .await;
    assert_eq!(
        completion["error"],
        "Failed to invoke 'SendChatMessage': the connection store is unavailable; try again later."
    );
    let mut late = server.open_as("bob").await;
    late.handshake().await;
    let close = late.expect_close().await;
    assert_eq!(
        close["allowReconnect"], true,
        "a timeout is worth retrying: {close}"
    );
    store.hung.store(false, Ordering::SeqCst);
    let completion = alice
        .invoke("2", "SendChatMessage", json!(["alice", "back"]))
        .await;
    assert!(completion.get("error").is_none(), "{completion}");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_and_others_are_unaffected() {
    let server = TestServer::start(
        HubOptions::default()
            .with_send_queue_size(8 * 1024)
            .with_client_timeout(Duration::from_secs(2)),
    )
    .await;
    let _stuck = server.connect("stuck").await; // never reads again
    let mut alice = server.connect("alice").await;
    server.wait_for_connections(2).await;
    let payload = "z".repeat(16 * 1024);
    let stuck = UserId::new("stuck").expect("user");
    let mut sent = 0;
    while !server
        .store
        .connections(&stuck)
        .await
        .expect("lookup")
        .is_empty()
    {
        assert!(sent < 20_000, "a client that never reads must be dropped");
        let record = json!({"type":1,"target":"SendChatMessage","arguments":["stuck", payload]});
        alice.send_record(&record.to_string()).await;
        sent += 1;
        if sent % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // The sender is fine.
    let completion = alice
        .invoke("x", "SendChatMessage", json!(["alice", "ok"]))
        .await;
    assert!(completion.get("error").is_none());
}

#[tokio::test]
async fn the_application_can_send_from_outside_a_hub_method() {
    let server = TestServer::start(HubOptions::default()).await;
    let mut bob = server.connect("bob").await;
    let mut bob_tablet = server.connect("bob").await;
    server.wait_for_connections(2).await;
    let bob_id = UserId::new("bob").expect("user");
    let reached = server
        .hub
        .user(&bob_id)
        .send("addChatMessage", &("system: maintenance at noon",))
        .await
        .expect("send");
    assert_eq!(reached.local, 2);
    for client in [&mut bob, &mut bob_tablet] {
        assert_eq!(
            client.next_message().await.expect("message"),
            chat("system: maintenance at noon")
        );
    }
    let nobody = UserId::new("nobody").expect("user");
    let reached = server
        .hub
        .user(&nobody)
        .send("addChatMessage", &("x",))
        .await
        .expect("send");
    assert_eq!(reached.local, 0, "nobody there is reported, not hidden");
    let reached = server
        .hub
        .all()
        .send("addChatMessage", &("all",))
        .await
        .expect("send");
    assert_eq!(reached.local, 2);
    assert!(
        server
            .hub
            .user(&bob_id)
            .send("x", &"not an array")
            .await
            .is_err(),
        "arguments must be an array"
    );
}

#[tokio::test]
async fn a_connection_is_reachable_as_soon_as_its_handshake_is_answered() {
    let store = Arc::new(FlakyStore::default());
    let server = TestServer::start_with(
        switchboard::chat::hub(),
        store.clone(),
        HubOptions::default(),
    )
    .await;
    let mut alice = server.connect("alice").await;
    // Recording a connection now takes a while, as with a store across a network.
    store.slow_adds.store(true, Ordering::SeqCst);
    let bob_id = UserId::new("bob").expect("user");
    for round in 0..5 {
        let mut bob = server.connect("bob").await;
        // No waiting: the handshake answer promises the connection is recorded.
        assert_eq!(
            server
                .store
                .connections(&bob_id)
                .await
                .expect("lookup")
                .len(),
            1,
            "round {round}"
        );
        let text = format!("hi {round}");
        alice
            .invoke(&round.to_string(), "SendChatMessage", json!(["bob", text]))
            .await;
        assert_eq!(
            bob.next_message().await.expect("message"),
            chat(&format!("alice: {text}"))
        );
        drop(bob);
        server.wait_for_connections(1).await;
    }
}
